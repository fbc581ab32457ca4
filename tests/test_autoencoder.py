"""AutoencoderUAE: shapes, reload in a new process, encoder weight loading, modulator behaviour, bad input, no host
sync on the per-step path."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import configuration_utils
from safetensors.torch import save_file

from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.bands import BandProjector, DCTBandTransform
from uae_gen.models.encoders import SemanticEncoder, load_encoder_weights, make_teacher
from uae_gen.models.modulator import FrequencyBandModulator

TINY_ENCODER = dict(depth=2, embed_dim=64, num_heads=2, patch_size=4)
# The v2 layout on the tiny model: DCT bands, token noise and a random zig-zag low-pass while training.
TINY_DCT = dict(num_bands=2, band_transform="dct", band_cutoffs=[0.25], band_noise_sigma=0.0, latent_noise_tau=0.8,
                dct_lowpass_train_range=[4, 64], dct_lowpass_train_prob=1.0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderUAE.from_preset("tiny").eval()


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes(tiny):
    z = tiny.encode(images()).latent
    assert z.shape == (2, 64, 8, 8)
    assert tiny.decode(z).sample.shape == (2, 3, 32, 32)
    out = tiny(images())
    assert out.bands.shape == (2, 4, 64, 8, 8)
    assert torch.allclose(tiny.merge_bands(out.bands), out.latent, atol=1e-5)


def test_reload_in_a_new_process_gives_identical_outputs(tiny, tmp_path):
    tiny.set_latent_statistics(torch.randn(64, 8, 8), torch.rand(64, 8, 8) + 0.5)
    tiny.save_pretrained(tmp_path / "uae")
    x = images(seed=1)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import torch, uae_gen.models.autoencoder_uae as m;"
        f"ae = m.AutoencoderUAE.from_pretrained(r'{tmp_path / 'uae'}');"
        f"x = torch.load(r'{tmp_path / 'x.pt'}', weights_only=True);"
        "z = ae.encode(x).latent;"
        f"torch.save({{'z': z, 'y': ae.decode(z).sample}}, r'{tmp_path / 'out.pt'}')"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    z = tiny.encode(x).latent
    assert torch.equal(out["z"], z)
    assert torch.equal(out["y"], tiny.decode(z).sample)


def test_latent_normalisation_round_trip(tiny):
    tiny.set_latent_statistics(torch.randn(64, 1, 1), torch.rand(64, 1, 1) + 0.5)
    raw = tiny.encode_raw(images())
    normalised = tiny.encode(images()).latent
    assert torch.allclose(normalised, (raw - tiny.latents_mean) / tiny.latents_std, atol=1e-6)
    assert torch.allclose(tiny.denormalize_latents(normalised), raw, atol=1e-5)
    with pytest.raises(ValueError, match="latent statistics"):
        tiny.set_latent_statistics(torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_encoder_weights_from_a_local_file(tmp_path, suffix):
    torch.manual_seed(1)
    source = SemanticEncoder(input_size=32, model_kwargs=TINY_ENCODER)
    path = str(tmp_path / f"dinov2{suffix}")
    state = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(2)
    target = SemanticEncoder(input_size=32, model_kwargs=TINY_ENCODER)
    x = images()
    assert not torch.allclose(target(x), source(x))
    load_encoder_weights(target, path)
    assert torch.equal(target(x), source(x))


def test_encoder_weight_errors(tmp_path):
    encoder = SemanticEncoder(input_size=32, model_kwargs=TINY_ENCODER)
    with pytest.raises(FileNotFoundError):
        load_encoder_weights(encoder, str(tmp_path / "missing.safetensors"))
    save_file({"blocks.0.norm1.weight": torch.ones(64)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_encoder_weights(encoder, str(tmp_path / "partial.safetensors"))


def test_encoder_tokens_are_layernormed_without_affine():
    encoder = SemanticEncoder(input_size=32, model_kwargs=TINY_ENCODER)
    z = encoder(images())
    assert z.shape == (2, 64, 8, 8)
    assert torch.allclose(z.mean(1), torch.zeros(1), atol=1e-5)
    assert torch.allclose(z.var(1, unbiased=False), torch.ones(1), atol=1e-3)


def test_teacher_is_a_frozen_copy():
    encoder = SemanticEncoder(input_size=32, model_kwargs=TINY_ENCODER)
    teacher = make_teacher(encoder)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher(images()), encoder(images()))
    with torch.no_grad():
        encoder.backbone.patch_embed.proj.weight.add_(torch.randn_like(encoder.backbone.patch_embed.proj.weight))
    assert not torch.equal(teacher(images()), encoder(images()))


def test_noise_touches_high_bands_only(tiny):
    bands = tiny.split_bands(tiny.encode_raw(images()))
    noised = tiny.modulator.add_band_noise(bands, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noised[:, 0], bands[:, 0])
    assert (noised[:, 1:] - bands[:, 1:]).abs().amax(dim=(2, 3, 4)).min() > 0
    # The added noise of band k is band-limited: splitting it again puts most of it back in band k.
    delta = noised[:, 2] - bands[:, 2]
    energy = tiny.split_bands(delta).pow(2).sum(dim=(0, 2, 3, 4))
    assert energy.argmax() == 2 and energy[0] < 0.01 * energy[2]


def test_train_mode_noise_and_eval_determinism(tiny):
    x = images()
    with torch.no_grad():
        eval_a, eval_b = tiny(x).sample, tiny(x).sample
        assert torch.equal(eval_a, eval_b)
        tiny.train()
        try:
            noisy = tiny(x, generator=torch.Generator().manual_seed(0)).sample
        finally:
            tiny.eval()
    assert not torch.allclose(noisy, eval_a)


def test_spectral_transform_starts_as_the_band_sum():
    modulator = FrequencyBandModulator(BandProjector(8, 8, num_bands=4), channels=16, hidden_channels=32)
    bands = torch.randn(2, 4, 16, 8, 8)
    assert torch.equal(modulator(bands), bands.sum(1))


def test_modulator_is_built_with_the_projector(tiny):
    assert tiny.modulator.projector is tiny.band_projector and tiny.modulator.num_bands == 4
    assert not any("projector" in key for key in tiny.state_dict())  # masks are recomputed, never saved
    # Noise is split by the modulator's own projector: the same draw as splitting the same eps by hand.
    bands = torch.zeros(2, 4, 64, 8, 8)
    noised = tiny.modulator(bands, inject_noise=True, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    eps_bands = tiny.split_bands(torch.randn(2, 64, 8, 8, generator=g))
    sigma = torch.rand(2, generator=g) * tiny.modulator.noise_sigma
    expected = (sigma.view(2, 1, 1, 1, 1) * eps_bands)[:, 1:].sum(1)
    assert torch.allclose(noised, expected, atol=1e-6) and expected.abs().max() > 0.1
    # The removed callback form cannot be passed positionally by mistake (it would read as inject_noise).
    with pytest.raises(TypeError):
        tiny.modulator(bands, tiny.split_bands, True)


def test_bad_inputs_raise(tiny):
    with pytest.raises(ValueError, match="3, 32, 32"):
        tiny.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="32x32"):
        tiny.encode(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="latents of shape"):
        tiny.decode(torch.zeros(1, 32, 8, 8))
    with pytest.raises(ValueError, match="preset"):
        AutoencoderUAE.from_preset("huge")
    with pytest.raises(ValueError, match="grid"):
        AutoencoderUAE.from_preset("tiny", image_size=36)


def test_slicing_matches_batched(tiny):
    z = tiny.encode(images(4)).latent
    tiny.enable_slicing()
    try:
        assert torch.allclose(tiny.encode(images(4)).latent, z, atol=1e-5)
    finally:
        tiny.disable_slicing()


def test_dct_lowpass_train_range_is_checked_when_built():
    for bad in ([0, 64], [40, 20]):
        with pytest.raises(ValueError, match="dct_lowpass_train_range"):
            AutoencoderUAE.from_preset("tiny", **{**TINY_DCT, "dct_lowpass_train_range": bad})
    # Counts above h*w (64 here) keep every coefficient: the released range [32, 256] on a small grid.
    model = AutoencoderUAE.from_preset("tiny", **{**TINY_DCT, "dct_lowpass_train_range": [100, 256]}).train()
    z = torch.randn(2, 64, 8, 8)
    assert torch.equal(model._dct_lowpass(z, torch.Generator().manual_seed(0)), model.band_projector.lowpass(z, 64))


def test_dct_lowpass_works_with_fft_bands():
    """The frequency-limited latent keeps zig-zag DCT coefficients, whatever transform splits the bands."""
    torch.manual_seed(0)
    model = AutoencoderUAE.from_preset("tiny", dct_lowpass_coefficients=16).eval()
    assert model.config.band_transform == "fft"
    x = images(2)
    full = model.encoder(x)
    low = model.encode_raw(x)
    assert torch.allclose(low, DCTBandTransform(8, 8, cutoffs=[]).lowpass(full, 16), atol=1e-5)
    assert (low - full).abs().mean() > 1e-3
    torch.manual_seed(0)
    trained = AutoencoderUAE.from_preset("tiny", dct_lowpass_train_range=[4, 32], dct_lowpass_train_prob=1.0).train()
    z = torch.randn(3, 64, 8, 8)
    generator = torch.Generator().manual_seed(1)
    counts = torch.randint(4, 33, (3,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(trained._dct_lowpass(z, generator), trained.lowpass(z, counts), atol=1e-6)


def test_finite_check_is_opt_in():
    torch.manual_seed(0)
    checked = AutoencoderUAE.from_preset("tiny", check_finite=True).eval()
    torch.manual_seed(0)
    unchecked = AutoencoderUAE.from_preset("tiny").eval()
    assert unchecked.config.check_finite is False
    nan_images, inf_images = images(), images()
    nan_images[0, 0, 0, 0] = float("nan")
    inf_images[1, 2, 3, 4] = float("inf")
    for bad in (nan_images, inf_images):
        with pytest.raises(ValueError, match="images contain NaN or infinite values"):
            checked.encode(bad)
    latent = checked.encode(images()).latent
    latent[1, 5, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="latents contain NaN"):
        checked.decode(latent)
    # Unchecked, bad values go through: no error, only the bad sample comes out non-finite.
    with torch.no_grad():
        out = unchecked.encode(nan_images).latent
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
        decoded = unchecked.decode(latent).sample
        assert torch.isnan(decoded[1]).all()
        assert torch.allclose(decoded[0], checked.decode(latent[:1]).sample[0], atol=1e-5)


def _forbid_host_sync(monkeypatch):
    def host_sync(self, *args, **kwargs):
        raise RuntimeError("host sync: a tensor was read on the host")

    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)


@pytest.mark.parametrize("overrides", [{}, TINY_DCT], ids=["fft", "dct"])
def test_no_host_sync_with_checks_off(monkeypatch, overrides):
    torch.manual_seed(0)
    model = AutoencoderUAE.from_preset("tiny", **overrides).eval()
    x = images()
    with torch.no_grad(), monkeypatch.context() as patch:
        _forbid_host_sync(patch)
        latent = model.encode(x).latent
        sample = model.decode(latent).sample
        model.train()
        try:
            train_out = model(x, generator=torch.Generator().manual_seed(0))  # noise and random low-pass
        finally:
            model.eval()
    assert latent.shape == (2, 64, 8, 8) and sample.shape == train_out.sample.shape == (2, 3, 32, 32)
    assert torch.isfinite(sample).all() and not torch.equal(train_out.sample, sample)
    # The same patch does catch the check when it is on: the test would see a sync.
    model.register_to_config(check_finite=True)
    with monkeypatch.context() as patch:
        _forbid_host_sync(patch)
        with pytest.raises(RuntimeError, match="host sync"):
            model.encode(x)


def test_configs_saved_with_check_inputs_load_silently(tiny, tmp_path, monkeypatch):
    tiny.save_pretrained(tmp_path / "uae")
    config_path = tmp_path / "uae" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["check_finite"] is False
    config.pop("check_finite")
    config["check_inputs"] = True  # what every checkpoint saved before check_finite carries
    config_path.write_text(json.dumps(config))
    warnings = []
    monkeypatch.setattr(configuration_utils.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    loaded = AutoencoderUAE.from_pretrained(tmp_path / "uae")
    assert warnings == []
    assert loaded.config.check_finite is False and "check_inputs" not in loaded.config
    assert torch.equal(loaded.encode(images()).latent, tiny.encode(images()).latent)
