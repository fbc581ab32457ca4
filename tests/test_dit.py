"""UAEDiT (plain DiT and DiT^DH): parity with the official RAE DiT^DH, shapes, conditioning, save/load."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uae_gen.convert import convert_ditdh_state_dict
from uae_gen.models.bands import DCTBandTransform
from uae_gen.models.dit import DIT_PRESETS, UAEDiT, apply_rope, rope_tables_2d

from .fixture_paths import FIXTURES

TINY = dict(sample_size=8, in_channels=4, num_classes=10)


def perturbed(model: UAEDiT, seed: int = 0) -> UAEDiT:
    """Random weights everywhere, so no zero-initialised layer hides a difference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def inputs(model: UAEDiT, batch: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    timestep = torch.rand(batch, generator=generator)
    labels = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return sample, timestep, labels


def test_ditdh_matches_official_rae_output():
    official = json.loads((FIXTURES / "rae_ditdh_tiny_config.json").read_text())
    model = UAEDiT(
        sample_size=official["input_size"], patch_size=official["patch_size"], in_channels=official["in_channels"],
        hidden_size=official["hidden_size"][0], depth=official["depth"][0], num_heads=official["num_heads"][0],
        head_hidden_size=official["hidden_size"][1], head_depth=official["depth"][1],
        head_num_heads=official["num_heads"][1], mlp_ratio=official["mlp_ratio"],
        num_classes=official["num_classes"], class_dropout_prob=official["class_dropout_prob"],
        use_qknorm=official["use_qknorm"], use_swiglu=official["use_swiglu"], use_rope=official["use_rope"],
        use_rmsnorm=official["use_rmsnorm"], wo_shift=official["wo_shift"], use_pos_embed=official["use_pos_embed"],
        time_embedding_type="gaussian_fourier",
    ).eval()
    weights = load_file(FIXTURES / "rae_ditdh_tiny_weights.safetensors")
    model.load_state_dict(convert_ditdh_state_dict(weights), strict=True)
    # The fixed tables we rebuild from the config equal the official stored ones.
    torch.testing.assert_close(model.pos_embed, weights["pos_embed"], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.trunk_rope_cos, weights["enc_feat_rope.freqs_cos"], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.head_rope_sin, weights["dec_feat_rope.freqs_sin"], rtol=0, atol=1e-6)

    io = load_file(FIXTURES / "rae_ditdh_tiny_io.safetensors")
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"]).sample
    assert out.shape == io["out"].shape
    assert (out - io["out"]).abs().max().item() < 1e-5


def test_convert_ditdh_names_missing_and_unexpected_keys():
    weights = load_file(FIXTURES / "rae_ditdh_tiny_weights.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: \['t_embedder.W'\]"):
        convert_ditdh_state_dict({k: v for k, v in weights.items() if k != "t_embedder.W"})
    with pytest.raises(ValueError, match=r"missing keys: \['blocks.1.attn.qkv.weight'\]"):
        convert_ditdh_state_dict({k: v for k, v in weights.items() if k != "blocks.1.attn.qkv.weight"})
    with pytest.raises(ValueError, match=r"unexpected keys: \['blocks.0.attn.extra.weight', 'foo'\]"):
        convert_ditdh_state_dict({**weights, "blocks.0.attn.extra.weight": torch.zeros(1), "foo": torch.zeros(1)})
    converted = convert_ditdh_state_dict(weights)
    assert converted["head_blocks.0.mlp.w12.weight"] is weights["blocks.2.mlp.w12.weight"]
    assert converted["x_embedder.weight"] is weights["s_embedder.proj.weight"]
    # Equal trunk and head widths leave the split ambiguous: the caller must say where the trunk ends.
    same_width = {**weights, "x_embedder.proj.weight": torch.zeros(64, 16, 1, 1)}
    with pytest.raises(ValueError, match="trunk_depth"):
        convert_ditdh_state_dict(same_width)
    assert "head_blocks.0.norm1.weight" in convert_ditdh_state_dict(same_width, trunk_depth=2)


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_output_has_input_shape(preset, patch_size):
    model = perturbed(UAEDiT.from_preset(preset, patch_size=patch_size, **TINY)).eval()
    sample, timestep, labels = inputs(model)
    with torch.no_grad():
        velocity = model(sample, timestep, labels).sample
    assert velocity.shape == sample.shape
    assert torch.isfinite(velocity).all() and velocity.abs().max() > 0


def test_rope_rotates_each_channel_pair_by_its_angle():
    # Hand computation of the official rotation: pair (a, b) -> (a cos - b sin, b cos + a sin).
    cos, sin = rope_tables_2d(head_dim=8, grid_size=3)
    x = torch.randn(2, 4, 9, 8)
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, 0::2], sin[:, 0::2]
    expected = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-6)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], sin[:, 1::2])


def test_residual_stream_is_contiguous():
    # The residual stream keeps the layout of the patch tokens; a transposed one makes every norm and linear copy.
    model = UAEDiT.from_preset("DiT-tiny", patch_size=2, **TINY)
    layouts = []
    model.blocks[0].register_forward_hook(lambda module, args, output: layouts.append(output.is_contiguous()))
    model(*inputs(model))
    assert model._embed_patches(model.x_embedder, inputs(model)[0]).is_contiguous() and layouts == [True]


def test_unpatchify_inverts_patch_layout():
    # Tokens holding (p, q, C) patches in row-major order unpatchify to exactly the image they were cut from.
    model = UAEDiT.from_preset("DiT-tiny", patch_size=2, **TINY)
    sample = torch.randn(2, 4, 8, 8)
    tokens = sample.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 16)  # (p, q, c) per token
    torch.testing.assert_close(model._unpatchify(tokens), sample, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_adaln_zero_init_gives_exactly_zero_output(preset):
    model = UAEDiT.from_preset(preset, **TINY).eval()
    sample, timestep, labels = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(sample, timestep, labels).sample, torch.zeros_like(sample))
        # Each block starts as the identity: its gates are exactly zero.
        tokens = torch.randn(3, 64, 64)
        assert torch.equal(model.blocks[0](tokens, torch.randn(3, 1, 64), model._rope("trunk")), tokens)


def test_null_label_and_integer_labels():
    # Id num_classes is the null label: a row of its own. Label values are not range-checked in the model (that
    # would sync the device every step); the dtype is.
    model = perturbed(UAEDiT.from_preset("DiT-tiny", **TINY)).eval()
    sample, timestep, _ = inputs(model, batch=2)
    with torch.no_grad():
        null = model(sample, timestep, torch.tensor([10, 10])).sample
        conditional = model(sample, timestep, torch.tensor([0, 0])).sample
    assert model.y_embedder.embedding_table.num_embeddings == 11
    assert (null - conditional).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError, match="integers"):
        model(sample, timestep, torch.tensor([1.0, 2.0]))


def _raise_on_host_read(*args, **kwargs):
    raise AssertionError("a tensor value was read on the host inside UAEDiT.forward")


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_forward_reads_no_tensor_value_on_the_host(monkeypatch, preset):
    # .item() and bool(tensor) copy a value to the host, which on an accelerator waits for all queued work: the
    # per-step forward (and backward) must do neither.
    model = perturbed(UAEDiT.from_preset(preset, **TINY))
    sample, timestep, labels = inputs(model)
    monkeypatch.setattr(torch.Tensor, "item", _raise_on_host_read)
    monkeypatch.setattr(torch.Tensor, "__bool__", _raise_on_host_read)
    with pytest.raises(AssertionError, match="read on the host"):  # the patches are live
        bool(labels.max() > 10)
    with torch.no_grad():
        eval_out = model.eval()(sample, timestep, labels).sample
        scalar_out = model(sample, 0.3, labels).sample  # a Python timestep is filled on the device
    train_out = model.train()(sample, timestep, labels).sample
    train_out.square().mean().backward()
    monkeypatch.undo()  # before the asserts, which read values themselves
    assert eval_out.shape == scalar_out.shape == train_out.shape == sample.shape
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_forward_and_backward_do_not_sync_cuda(preset):
    model = perturbed(UAEDiT.from_preset(preset, **TINY)).cuda()
    sample, timestep, labels = (x.cuda() for x in inputs(model))
    model(sample, timestep, labels).sample.sum().backward()  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call now raises
    try:
        with torch.no_grad():
            eval_out = model.eval()(sample, timestep, labels).sample
            model(sample, 0.3, labels)
        model.train()(sample, timestep, labels).sample.square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert eval_out.shape == sample.shape and torch.isfinite(eval_out).all()


def test_input_validation_names_the_problem():
    model = UAEDiT.from_preset("DiT-tiny", patch_size=2, **TINY)
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(2, 3, 8, 8), 0.5, labels)
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        model(torch.randn(2, 4, 7, 8), 0.5, labels)
    with pytest.raises(ValueError, match="differs from sample_size 8"):
        model(torch.randn(2, 4, 6, 6), 0.5, labels)
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 4, 8, 8), torch.rand(3), labels)
    with pytest.raises(ValueError, match="Unknown preset"):
        UAEDiT.from_preset("DiT-XXL")
    with pytest.raises(ValueError, match="time_embedding_type"):
        UAEDiT.from_preset("DiT-tiny", time_embedding_type="learned")
    with pytest.raises(ValueError, match="Unknown attention backend"):
        UAEDiT.from_preset("DiT-tiny", attention_backend="flash")


def test_scalar_timestep_broadcasts():
    model = perturbed(UAEDiT.from_preset("DiT-DH-tiny", **TINY)).eval()
    sample, _, labels = inputs(model)
    with torch.no_grad():
        scalar = model(sample, 0.3, labels).sample
        torch.testing.assert_close(scalar, model(sample, torch.full((3,), 0.3), labels).sample)


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_label_dropout_only_in_training(preset):
    model = perturbed(UAEDiT.from_preset(preset, class_dropout_prob=1.0, **TINY))
    sample, timestep, labels = inputs(model)
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        model.eval()
        conditional = model(sample, timestep, labels).sample
        unconditional = model(sample, timestep, null).sample
        torch.testing.assert_close(model(sample, timestep, labels).sample, conditional, rtol=0, atol=0)
        assert (conditional - unconditional).abs().max() > 1e-3  # eval never drops the labels
        model.train()
        torch.testing.assert_close(model(sample, timestep, labels).sample, unconditional)


@pytest.mark.parametrize("preset,time_embedding", [("DiT-tiny", "sinusoidal"), ("DiT-DH-tiny", "gaussian_fourier")])
def test_save_and_reload_give_equal_outputs(tmp_path, preset, time_embedding):
    model = perturbed(UAEDiT.from_preset(preset, time_embedding_type=time_embedding, **TINY)).eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a reloaded model must not depend on fresh random Fourier frequencies
    reloaded = UAEDiT.from_pretrained(tmp_path).eval()
    assert reloaded.config.head_depth == model.config.head_depth
    sample, timestep, labels = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample, timestep, labels).sample, model(sample, timestep, labels).sample,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_gradient_checkpointing_gives_same_gradients(preset):
    def gradients(checkpointing: bool):
        torch.manual_seed(0)  # same fixed Fourier frequencies in both models
        model = perturbed(UAEDiT.from_preset(preset, class_dropout_prob=0.0, **TINY)).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        sample, timestep, labels = inputs(model)
        model(sample, timestep, labels).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # checkpointing re-runs the block in backward
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("options", [
    dict(use_swiglu=False, use_rmsnorm=False, use_rope=False, time_embedding_type="sinusoidal"),
    dict(use_qknorm=True, wo_shift=True),
    dict(use_qknorm=True, use_rmsnorm=False, use_pos_embed=False),
])
def test_option_variants_run_and_learn(options):
    model = perturbed(UAEDiT.from_preset("DiT-DH-tiny", **TINY, **options)).train()
    sample, timestep, labels = inputs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(sample, timestep, labels).sample.sub(sample).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def analytic_parameter_count(config: dict, in_channels=768, patch_size=1, num_classes=1000) -> int:
    """DiT^DH / DiT parameter count by hand (SwiGLU, RMSNorm, Gaussian Fourier time embedding)."""

    def block(d):
        hidden = int(2 / 3 * 4 * d)
        norms, attn, adaln = 2 * d, (3 * d * d + 3 * d) + (d * d + d), 6 * d * d + 6 * d
        return norms + attn + (2 * d * hidden + 2 * hidden) + (hidden * d + d) + adaln

    d, patch_dim = config["hidden_size"], in_channels * patch_size ** 2
    count = patch_dim * d + d + (512 * d + d) + (d * d + d) + (num_classes + 1) * d + config["depth"] * block(d)
    out = d
    if config["head_depth"]:
        h = out = config["head_hidden_size"]
        count += (d * h + h) + (patch_dim * h + h) + config["head_depth"] * block(h)
    return count + out + (2 * out * out + 2 * out) + (out * patch_dim + patch_dim)


@pytest.mark.parametrize("preset", ["DiT-XL", "DiT-DH-S", "DiT-DH-XL"])
def test_preset_parameter_counts(preset):
    with torch.device("meta"):  # no memory is allocated for the weights
        model = UAEDiT.from_preset(preset)
    count = sum(p.numel() for p in model.parameters())
    assert count == analytic_parameter_count(DIT_PRESETS[preset])
    if preset == "DiT-DH-XL":
        # method.md: 838.7M, counting the official frozen pos-embed (256 x 1152) and Fourier W (256) parameters.
        assert abs(count + 256 * 1152 + 256 - 838.7e6) < 0.05e6


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_frequency_tokens_run_on_the_low_pass_subspace(preset):
    model = perturbed(UAEDiT.from_preset(preset, **TINY, frequency_tokens=16)).eval()
    sample, timestep, labels = inputs(model)
    lowpass = DCTBandTransform(8, 8, cutoffs=[]).lowpass
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    velocity = model(sample, timestep, labels).sample
    assert velocity.shape == sample.shape and seen == [(3, 16, 64)]  # 16 tokens, not 8 * 8
    # The output lies in the 16-coefficient subspace, and only the input's part in it matters.
    assert velocity.abs().mean() > 1e-2
    assert (lowpass(velocity, 16) - velocity).abs().max() < 1e-5
    assert (model(lowpass(sample, 16), timestep, labels).sample - velocity).abs().max() < 1e-5
    assert (model(lowpass(sample, 15), timestep, labels).sample - velocity).abs().max() > 1e-3


def test_frequency_tokens_save_reload_and_validation(tmp_path):
    model = perturbed(UAEDiT.from_preset("DiT-tiny", **TINY, frequency_tokens=10)).eval()
    model.save_pretrained(tmp_path)
    reloaded = UAEDiT.from_pretrained(tmp_path).eval()
    assert reloaded.config.frequency_tokens == 10
    sample, timestep, labels = inputs(model)
    assert torch.equal(model(sample, timestep, labels).sample, reloaded(sample, timestep, labels).sample)
    for bad in (0, 65):
        with pytest.raises(ValueError, match=f"num_coefficients must lie in \\[1, 64\\].*got {bad}"):
            UAEDiT.from_preset("DiT-tiny", **TINY, frequency_tokens=bad)
    with pytest.raises(ValueError, match="frequency_tokens needs patch_size 1.*got 2"):
        UAEDiT.from_preset("DiT-tiny", **TINY, patch_size=2, frequency_tokens=16)


def test_grouped_frequency_tokens_read_back_in_the_order_they_were_embedded():
    model = UAEDiT.from_preset("DiT-tiny", **TINY, frequency_tokens=64, coefficients_per_token=2)
    channels, hidden = model.config.in_channels, model.config.hidden_size
    # An embedder that copies each token's (group, channel) coefficients into its first 2 * C features: the layout
    # in which the final layer's output is read back.
    weight = torch.zeros(hidden, channels, 1, 2)
    for g in range(2):
        for c in range(channels):
            weight[g * channels + c, c, 0, g] = 1.0
    with torch.no_grad():
        model.x_embedder.weight.copy_(weight)
        model.x_embedder.bias.zero_()
    sample = torch.randn(3, channels, 8, 8)
    tokens = model._embed_patches(model.x_embedder, sample)
    assert tokens.shape == (3, 32, hidden)  # 64 coefficients, two per token
    read_back = model.frequency_layout.from_tokens(model._coefficients(tokens[..., : 2 * channels]))
    assert torch.allclose(read_back, sample, atol=1e-5)  # all 64 kept


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_grouped_frequency_tokens_cover_the_whole_spectrum(preset, tmp_path):
    model = perturbed(UAEDiT.from_preset(preset, **TINY, frequency_tokens=64, coefficients_per_token=4)).eval()
    sample, timestep, labels = inputs(model)
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    velocity = model(sample, timestep, labels).sample
    assert seen == [(3, 16, 64)]  # 64 coefficients in 16 tokens
    lowpass = DCTBandTransform(8, 8, cutoffs=[]).lowpass
    assert (lowpass(velocity, 60) - velocity).abs().max() > 1e-3  # the top coefficients move too
    assert (model(lowpass(sample, 63), timestep, labels).sample - velocity).abs().max() > 1e-4  # and are seen
    model.save_pretrained(tmp_path)
    reloaded = UAEDiT.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(sample, timestep, labels).sample, velocity)
    with pytest.raises(ValueError, match="frequency_tokens=10 is not divisible by coefficients_per_token=4"):
        UAEDiT.from_preset(preset, **TINY, frequency_tokens=10, coefficients_per_token=4)
    for bad in ({"coefficients_per_token": 2}, {"frequency_tokens": 16, "coefficients_per_token": 0}):
        with pytest.raises(ValueError, match="coefficients_per_token must be >= 1, and above 1 only with"):
            UAEDiT.from_preset(preset, **TINY, **bad)


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_one_time_embedding_per_band_clock(preset):
    model = perturbed(UAEDiT.from_preset(preset, **TINY, num_time_embeddings=4)).eval()
    sample, _, labels = inputs(model)
    times = torch.tensor([[0.9, 1.0, 1.0, 1.0], [0.2, 0.5, 0.7, 0.9], [0.0, 0.0, 0.1, 0.3]])
    velocity = model(sample, times, labels).sample
    assert velocity.shape == sample.shape
    # each band's clock is seen: changing one band's time changes the output
    for k in range(4):
        moved = times.clone()
        moved[:, k] += 0.05
        assert (model(sample, moved, labels).sample - velocity).abs().max() > 1e-4, k
    assert torch.equal(model(sample, 0.5, labels).sample, model(sample, torch.full((3, 4), 0.5), labels).sample)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or shaped \(3, 4\): one time per band clock"):
        model(sample, torch.rand(3), labels)
    with pytest.raises(ValueError, match="num_time_embeddings must be >= 1 and divide hidden_size 64; got 3"):
        UAEDiT.from_preset(preset, **TINY, num_time_embeddings=3)


@pytest.mark.parametrize("preset,layout", [("DiT-tiny", {}), ("DiT-DH-tiny", dict(frequency_tokens=16))])
def test_sample_prediction_returns_the_velocity_toward_the_predicted_latent(preset, layout, tmp_path):
    # x-prediction: the network's last layer gives x_hat and forward returns (x_t - x_hat) / max(t, 0.05), so the
    # same weights read as a velocity model give x_hat directly.
    model = perturbed(UAEDiT.from_preset(preset, **TINY, **layout, prediction_type="sample")).eval()
    as_velocity = UAEDiT.from_preset(preset, **TINY, **layout).eval()
    as_velocity.load_state_dict(model.state_dict())
    sample, _, labels = inputs(model)
    timestep = torch.tensor([0.8, 0.3, 0.01])
    if layout:
        sample = DCTBandTransform(8, 8, cutoffs=[]).lowpass(sample, 16)
    clean = as_velocity(sample, timestep, labels).sample
    expected = (sample - clean) / torch.tensor([0.8, 0.3, 0.05]).reshape(-1, 1, 1, 1)
    velocity = model(sample, timestep, labels).sample
    assert clean.abs().mean() > 1e-2
    torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = UAEDiT.from_pretrained(tmp_path).eval()
    assert reloaded.config.prediction_type == "sample"
    assert torch.equal(reloaded(sample, timestep, labels).sample, velocity)


def test_sample_prediction_at_initialisation_predicts_the_mean_latent():
    model = UAEDiT.from_preset("DiT-tiny", **TINY, prediction_type="sample").eval()  # zero-initialised output
    sample, timestep, labels = inputs(model)
    torch.testing.assert_close(model(sample, timestep, labels).sample, sample / timestep.reshape(-1, 1, 1, 1))


def test_prediction_type_validation():
    with pytest.raises(ValueError, match="prediction_type must be one of .*got 'epsilon'"):
        UAEDiT.from_preset("DiT-tiny", **TINY, prediction_type="epsilon")
    with pytest.raises(ValueError, match="cannot take 4 band times"):
        UAEDiT.from_preset("DiT-tiny", **TINY, prediction_type="sample", num_time_embeddings=4)


def coarse_to_fine(preset: str, **options) -> UAEDiT:
    return UAEDiT.from_preset(preset, **TINY, frequency_tokens=64, coefficients_per_token=4, **options).eval()


@pytest.mark.parametrize("preset", ["DiT-tiny", "DiT-DH-tiny"])
def test_coarse_stage_runs_the_first_tokens_and_leaves_the_rest_to_noise(preset, tmp_path):
    model = perturbed(coarse_to_fine(preset, coarse_tokens=2, coarse_time=0.6))
    fine = coarse_to_fine(preset)  # the same weights: the coarse stage adds none
    fine.load_state_dict(model.state_dict())
    coarse = UAEDiT.from_preset(preset, **TINY, frequency_tokens=8, coefficients_per_token=4).eval()  # 2 tokens
    coarse.load_state_dict(model.state_dict())
    sample, _, labels = inputs(model)
    timestep = torch.tensor([0.9, 0.3, 0.7])  # rows 0 and 2 are in the coarse stage
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    velocity = model(sample, timestep, labels).sample
    assert seen == [(2, 2, 64), (1, 16, 64)]  # the coarse rows run on 2 tokens, the other on all 16
    torch.testing.assert_close(velocity[1:2], fine(sample[1:2], timestep[1:2], labels[1:2]).sample)
    to_coefficients = model.frequency_layout.to_tokens
    rows = [0, 2]
    coefficients = to_coefficients(velocity[rows])
    # the first 8 coefficients are those of the 2-token model; the rest are noise moving with the flow's std
    torch.testing.assert_close(coefficients[..., :8], to_coefficients(coarse(sample[rows], timestep[rows],
                                                                              labels[rows]).sample)[..., :8])
    t = timestep[rows].reshape(-1, 1, 1)
    torch.testing.assert_close(coefficients[..., 8:],
                               to_coefficients(sample[rows])[..., 8:] * (2 * t - 1) / (t**2 + (1 - t)**2))
    assert coefficients[..., :8].abs().mean() > 1e-2
    model.save_pretrained(tmp_path)
    reloaded = UAEDiT.from_pretrained(tmp_path).eval()
    assert (reloaded.config.coarse_tokens, reloaded.config.coarse_time) == (2, 0.6)
    torch.testing.assert_close(reloaded(sample, timestep, labels).sample, velocity, rtol=1e-5, atol=1e-6)


def test_the_coefficients_not_generated_yet_join_with_the_flows_standard_deviation():
    # A sampler run through the coarse stage: the finer coefficients stay the initial noise, scaled to
    # sqrt(t^2 + (1 - t)^2) at coarse_time (Euler's error shrinks with the step), as a unit-variance coefficient's
    # x_t = (1 - t) x + t eps would be.
    model = perturbed(coarse_to_fine("DiT-tiny", coarse_tokens=2, coarse_time=0.6))
    noise, _, labels = inputs(model)
    to_coefficients = model.frequency_layout.to_tokens
    for steps, tolerance in ((8, 2e-2), (64, 3e-3)):
        times = torch.linspace(1.0, 0.6, steps + 1)
        x = noise
        with torch.no_grad():
            for t, t_next in zip(times[:-1], times[1:]):
                x = x + (t_next - t) * model(x, t.item(), labels).sample
        scale = to_coefficients(x)[..., 8:] / to_coefficients(noise)[..., 8:]
        assert (scale - (0.6**2 + 0.4**2) ** 0.5).abs().max() < tolerance, steps
    assert (to_coefficients(x)[..., :8] - to_coefficients(noise)[..., :8]).abs().mean() > 1e-2  # generated


def test_coarse_to_fine_trains_both_stages_in_one_batch():
    model = coarse_to_fine("DiT-tiny", coarse_tokens=2).train()
    sample, _, labels = inputs(model, batch=4)
    timestep = torch.tensor([0.9, 0.2, 0.6, 0.4])
    model(sample, timestep, labels).sample.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_coarse_to_fine_validation():
    for bad in (0, 16):
        with pytest.raises(ValueError, match=f"coarse_tokens must lie in \\[1, 16\\) frequency tokens; got {bad}"):
            coarse_to_fine("DiT-tiny", coarse_tokens=bad)
    with pytest.raises(ValueError, match="coarse_tokens=4 needs frequency_tokens"):
        UAEDiT.from_preset("DiT-tiny", **TINY, coarse_tokens=4)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=f"coarse_time must lie in \\(0, 1\\); got {bad}"):
            coarse_to_fine("DiT-tiny", coarse_tokens=4, coarse_time=bad)
    with pytest.raises(ValueError, match="coarse_tokens switches on one time t; it cannot take 4 band times"):
        coarse_to_fine("DiT-tiny", coarse_tokens=4, num_time_embeddings=4)
