"""uae-gen convert: released layouts -> uae_gen directories whose outputs equal the original models'.

References: diffusers' ``AutoencoderRAE`` (built here with random weights); the official DiT^DH fixture; and
official UAE v1 / v2 state dicts built here with the official key names and shapes (encoder: an HF
``Dinov2WithRegistersModel`` in transformers-4 names under ``encoder.encoder.``; decoder: the RAE ViTMAE decoder
under ``decoder.`` with its stored sin-cos table; v1: ``freq_modulator.band_transform.layers.*`` and
``freq_modulator.denoiser.{0,2}``), whose band outputs are checked against the official band fixtures.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderRAE
from diffusers.models.autoencoders.autoencoder_rae import RAEDecoder
from safetensors.torch import load_file
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from uae_gen import cli
from uae_gen.convert import convert_checkpoint, infer_ditdh_config
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import UAEDiT

from .file_modes import unreadable_entries
from .fixture_paths import FIXTURES

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Head counts of the tiny official models below: their widths are not released ones, so they are passed in.
TINY_OVERRIDES = {"decoder_num_heads": 2, "encoder_kwargs": {"num_heads": 2}}
# transformers 5 / diffusers names -> the names in the official checkpoints (transformers 4 / HF ViTMAE).
ENCODER_OFFICIAL_NAMES = {
    "attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
}
DECODER_OFFICIAL_NAMES = {
    "attention.to_q": "attention.attention.query", "attention.to_k": "attention.attention.key",
    "attention.to_v": "attention.attention.value", "attention.to_out.0": "attention.output.dense",
}


class Payload:
    """Something torch.load(weights_only=True) must refuse: unpickling it runs this module's code."""


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random offsets on every parameter, so no zero / identity initialisation hides a wrong key map."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


def renamed(state_dict: dict, prefix: str, names: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for new, old in names.items():
            key = key.replace(new + ".", old + ".")
        out[prefix + key] = value.clone()
    return out


def mae_position_table(width: int, grid: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed with a zero class slot, as the official decoder stores it (column half first)."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
    columns, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def embed(positions):
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([np.zeros((1, width)), np.concatenate([embed(columns), embed(rows)], axis=1)])
    return torch.from_numpy(table).float()[None]


def official_uae(version: str, channels: int, grid: int, seed: int = 0):
    """A tiny official UAE state dict plus the reference modules it came from: the HF DINOv2 encoder (the official
    "Dinov2withNorm": final LayerNorm without affine) and the RAE ViT decoder (patch 2, width 32)."""
    config = Dinov2WithRegistersConfig(hidden_size=channels, num_hidden_layers=2, num_attention_heads=2,
                                       patch_size=2, image_size=2 * (grid + 3))  # a table resampled on conversion
    encoder = Dinov2WithRegistersModel(config)
    encoder.layernorm.weight, encoder.layernorm.bias = None, None
    encoder = perturb(encoder, seed)
    decoder = perturb(RAEDecoder(hidden_size=channels, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                                 decoder_num_attention_heads=2, decoder_intermediate_size=64, num_patches=grid * grid,
                                 patch_size=2, image_size=2 * grid), seed + 1)
    state_dict = renamed(encoder.state_dict(), "encoder.encoder.", ENCODER_OFFICIAL_NAMES)
    state_dict.update(renamed(decoder.state_dict(), "decoder.", DECODER_OFFICIAL_NAMES))
    state_dict["decoder.decoder_pos_embed"] = mae_position_table(32, grid)
    if version == "v1":  # K=2 bands, 2 band-mixing layers, conv fusion with the official width max(2C, 512)
        generator = torch.Generator().manual_seed(seed + 2)
        for i in range(2):
            state_dict[f"freq_modulator.band_transform.layers.{i}.weight"] = (
                torch.eye(2) + 0.3 * torch.randn(2, 2, generator=generator))
        fusion = perturb(torch.nn.Sequential(torch.nn.Conv2d(2 * channels, 512, 3, padding=1), torch.nn.SiLU(),
                                             torch.nn.Conv2d(512, channels, 3, padding=1)), seed + 3)
        state_dict.update({f"freq_modulator.denoiser.{k}": v for k, v in fusion.state_dict().items()})
    return state_dict, encoder, decoder


def official_v1_fusion(bands: torch.Tensor, state_dict: dict) -> torch.Tensor:
    """The official v1 modulator on given bands (B, K, C, h, w): K x K mixes over whole bands, then
    Conv3x3 -> SiLU -> Conv3x3 of the concatenated bands plus their sum."""
    mixed = bands
    for i in range(2):
        weight = state_dict[f"freq_modulator.band_transform.layers.{i}.weight"]
        mixed = torch.einsum("ij,bjk->bik", weight, mixed.flatten(2)).reshape(bands.shape)
    stacked = torch.cat(mixed.unbind(1), dim=1)
    hidden = F.silu(F.conv2d(stacked, state_dict["freq_modulator.denoiser.0.weight"],
                             state_dict["freq_modulator.denoiser.0.bias"], padding=1))
    fused = F.conv2d(hidden, state_dict["freq_modulator.denoiser.2.weight"],
                     state_dict["freq_modulator.denoiser.2.bias"], padding=1)
    return fused + mixed.sum(1)


def official_decode(decoder: RAEDecoder, latent: torch.Tensor) -> torch.Tensor:
    """The official decode of a (fused) latent, images in [0, 1]."""
    logits = decoder(latent.flatten(2).transpose(1, 2)).logits
    return decoder.unpatchify(logits) * IMAGENET_STD + IMAGENET_MEAN


def save_training_checkpoint(state_dict: dict, path, seed: int = 9) -> None:
    """An ``ep-last.pt``-style dict: EMA weights, different live weights, optimiser state and config."""
    generator = torch.Generator().manual_seed(seed)
    live = {k: v + torch.randn(v.shape, generator=generator) for k, v in state_dict.items()}
    torch.save({"model": live, "ema": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
                "epoch": 3, "config": {"noise_tau": 0.8}}, path)


def max_error(a: torch.Tensor, b) -> float:
    return (a - torch.as_tensor(b)).abs().max().item()


# ---- diffusers AutoencoderRAE -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_stats", [True, False])
def test_rae_diffusers_matches_autoencoder_rae(tmp_path, with_stats):
    torch.manual_seed(0)
    stats = dict(latents_mean=torch.randn(64, 16, 16) * 0.1, latents_std=torch.rand(64, 16, 16) + 0.5)
    rae = AutoencoderRAE(  # 64 px encoder input, patch 4 -> 16x16x64 latent; decoder patch 2 -> 32 px images
        encoder_hidden_size=64, encoder_patch_size=4, encoder_num_hidden_layers=2, encoder_input_size=64,
        decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=128, patch_size=2, noise_tau=0.8, **(stats if with_stats else {}),
    )
    rae = perturb(rae, seed=1)
    rae.save_pretrained(tmp_path / "rae")
    convert_checkpoint("rae-diffusers", tmp_path / "rae", tmp_path / "uae")
    assert unreadable_entries(tmp_path / "uae") == []  # mkdtemp's 0700 and safetensors' 0600 fixed
    uae = AutoencoderUAE.from_pretrained(tmp_path / "uae")

    config = uae.config
    assert (config.num_bands, config.spectral_transform_channels, config.latent_noise_tau) == (1, 0, 0.8)
    assert not any(key.startswith("modulator.") for key in uae.state_dict())  # RAE has no modulator
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # RAE's [0, 1] images
    with torch.no_grad():
        latent = rae.encode(images).latent
        assert max_error(uae.encode(images * 2 - 1).latent, latent) < 1e-5
        assert max_error((uae.decode(latent).sample + 1) / 2, rae.decode(latent).sample) < 1e-5


# ---- DiT^DH ---------------------------------------------------------------------------------------------------


def test_ditdh_fixture_converted_through_the_cli_reproduces_the_official_output(tmp_path, capsys):
    weights_file = FIXTURES / "rae_ditdh_tiny_weights.safetensors"
    official = json.loads((FIXTURES / "rae_ditdh_tiny_config.json").read_text())
    weights = load_file(weights_file)
    config = infer_ditdh_config(weights)
    assert config["sample_size"] == official["input_size"] and config["mlp_ratio"] == official["mlp_ratio"]
    assert [config["hidden_size"], config["head_hidden_size"]] == official["hidden_size"]
    assert [config["depth"], config["head_depth"]] == official["depth"]
    assert [config["num_heads"], config["head_num_heads"]] == official["num_heads"]
    assert all(config[flag] == official[flag] for flag in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm",
                                                           "wo_shift", "use_pos_embed", "num_classes"))

    cli.main(["convert", "--from", "ditdh", str(weights_file), str(tmp_path / "dit")])
    assert "wrote UAEDiT" in capsys.readouterr().out
    # The same weights as the EMA of a training checkpoint (.pt): the EMA is what gets converted.
    save_training_checkpoint(weights, tmp_path / "ep-last.pt")
    cli.main(["convert", "--from", "ditdh", str(tmp_path / "ep-last.pt"), str(tmp_path / "dit_ema")])

    io = load_file(FIXTURES / "rae_ditdh_tiny_io.safetensors")
    for directory in ("dit", "dit_ema"):
        model = UAEDiT.from_pretrained(tmp_path / directory)
        with torch.no_grad():
            assert max_error(model(io["x"], io["t"], io["y"]).sample, io["out"]) < 1e-5


# ---- UAE v1 / v2 ----------------------------------------------------------------------------------------------


def band_fixture(shape: str):
    data = np.load(FIXTURES / "uae_official_bands.npz")
    return torch.from_numpy(data[f"z_{shape}"]), {key: torch.from_numpy(data[key]) for key in data}


@pytest.mark.parametrize("shape", ["8x16x16", "4x12x12"])
def test_uae_v1_checkpoint_converts_to_the_v1_mode(tmp_path, shape):
    z, data = band_fixture(shape)
    channels, grid = z.shape[1], z.shape[-1]
    official, _, reference_decoder = official_uae("v1", channels, grid)
    save_training_checkpoint(official, tmp_path / "final.pt")
    cli.main(["convert", "--from", "uae-v1", str(tmp_path / "final.pt"), str(tmp_path / "uae"),
              "--set", "decoder_num_heads=2", "--set", 'encoder_kwargs={"num_heads": 2}'])
    model, info = AutoencoderUAE.from_pretrained(tmp_path / "uae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(model.decoder.pred.weight, official["decoder.decoder_pred.weight"])  # EMA, not "model"

    bands = model.split_bands(z)
    assert max_error(bands, data[f"v1_k2_released_{shape}"]) < 1e-5
    official_fused = official_v1_fusion(data[f"v1_k2_released_{shape}"], official)
    with torch.no_grad():
        assert max_error(model.modulator(bands), official_fused) < 1e-5
        if grid == 16:  # diffusers' RAEDecoder (the reference here) builds its position table for 16x16 only
            image, _ = model.decode_raw(z)
            assert max_error((image + 1) / 2, official_decode(reference_decoder, official_fused)) < 1e-5


@pytest.mark.parametrize("shape", ["8x16x16", "4x12x12"])
def test_uae_v2_checkpoint_converts_to_the_dct_mode(tmp_path, shape):
    z, data = band_fixture(shape)
    channels, grid = z.shape[1], z.shape[-1]
    official, reference_encoder, reference_decoder = official_uae("v2", channels, grid)
    save_training_checkpoint(official, tmp_path / "ep-last.pt")
    generator = torch.Generator().manual_seed(4)
    mean, var = torch.randn(channels, grid, grid, generator=generator), torch.rand(channels, grid, grid) + 0.1
    torch.save({"mean": mean, "var": var}, tmp_path / "normalization_stats.pt")
    convert_checkpoint("uae-v2", tmp_path / "ep-last.pt", tmp_path / "uae", stats=tmp_path / "normalization_stats.pt",
                       config_overrides={**TINY_OVERRIDES, "dct_lowpass_coefficients": 64})
    model, info = AutoencoderUAE.from_pretrained(tmp_path / "uae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.band_transform == "dct" and model.config.latents_stats == "per_element"
    assert torch.equal(model.latents_mean, mean)
    assert torch.allclose(model.latents_std, torch.sqrt(var + 1e-5))

    projector = model.band_projector
    assert max_error(projector.to_coefficients(z), data[f"v2_dct_{shape}"]) < 1e-5
    assert max_error(projector.lowpass(z, model.config.dct_lowpass_coefficients), data[f"v2_lowpass64_{shape}"]) < 1e-5
    for k in (36, 100):
        assert max_error(projector.lowpass(z, k), data[f"v2_lowpass{k}_{shape}"]) < 1e-5

    images = torch.rand(2, 3, 2 * grid, 2 * grid, generator=generator)  # at the encoder's input size: no resize
    with torch.no_grad():
        tokens = reference_encoder((images - IMAGENET_MEAN) / IMAGENET_STD).last_hidden_state[:, 5:]
        official_latent = tokens.transpose(1, 2).reshape(2, channels, grid, grid)
        assert max_error(model.encoder(images * 2 - 1), official_latent) < 1e-5
        if grid == 16:
            image, _ = model.decode_raw(z)
            assert max_error((image + 1) / 2, official_decode(reference_decoder, z)) < 1e-5


# ---- wrong inputs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_v2():
    return official_uae("v2", channels=8, grid=8)[0]


def write(tmp_path, payload, name="ep-last.pt"):
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return path


def without(state_dict, key):
    return {k: v for k, v in state_dict.items() if k != key}


# case: (checkpoint made from the tiny official v2 dict, layout, extras -- {"stats": file contents}, or None for no
# head-count overrides --, the error it must raise)
WRONG_INPUTS = {
    "unknown layout": (lambda sd: {"ema": sd}, "uae-v3", {}, "unknown layout 'uae-v3'"),
    "other layout": (lambda sd: {"ema": sd}, "ditdh", {}, r"DiT\^DH checkpoint is missing keys"),
    "v2 file as v1": (lambda sd: {"ema": sd}, "uae-v1", {}, "missing key 'freq_modulator.denoiser.0.weight'"),
    "missing key": (lambda sd: {"ema": without(sd, "decoder.decoder_norm.bias")}, "uae-v2", {},
                    "missing key 'decoder.decoder_norm.bias'"),
    "shape mismatch": (
        lambda sd: {"ema": {**sd, "decoder.decoder_layers.1.intermediate.dense.weight": torch.zeros(96, 32)}},
        "uae-v2", {}, r"decoder\.decoder_layers\.1\.intermediate\.dense\.weight has shape \(96, 32\)"),
    "unexpected key": (lambda sd: {"ema": {**sd, "decoder.extra.weight": torch.zeros(1)}}, "uae-v2", {},
                       r"unexpected keys: \['decoder.extra.weight'\]"),
    "pickle with code": (lambda sd: {"ema": sd, "args": Payload()}, "uae-v2", {},
                         r"needs unpickling of code \(tests\.test_convert\.Payload\)"),
    "not a checkpoint": (lambda sd: b"not a checkpoint", "uae-v2", {}, "not a readable torch checkpoint"),
    "heads unknown": (lambda sd: {"ema": sd}, "uae-v2", None,
                      r"do not determine \['decoder_num_heads', 'encoder_kwargs.num_heads'\]"),
    "stats without var": (lambda sd: {"ema": sd}, "uae-v2", {"stats": {"mean": torch.zeros(8, 8, 8)}},
                          r"missing tensor\(s\) \['var'\]"),
    "stats of another shape": (lambda sd: {"ema": sd}, "uae-v2",
                               {"stats": {"mean": torch.zeros(8, 4, 4), "var": torch.ones(8, 4, 4)}},
                               "latent statistics must both be"),
}


@pytest.mark.parametrize("case", list(WRONG_INPUTS))
def test_wrong_input_raises_one_clear_error_and_writes_nothing(tmp_path, official_v2, case):
    make_payload, layout, extra, message = WRONG_INPUTS[case]
    src = write(tmp_path, make_payload(official_v2))
    stats = write(tmp_path, extra["stats"], "stats.pt") if extra and "stats" in extra else None
    dst = tmp_path / "out" / "uae"
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(layout, src, dst, stats=stats, config_overrides=None if extra is None else TINY_OVERRIDES)
    assert not (tmp_path / "out").exists()


def test_cli_reports_the_error_and_writes_nothing(tmp_path, official_v2, capsys):
    src = write(tmp_path, {"ema": without(official_v2, "encoder.encoder.embeddings.register_tokens")})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--from", "uae-v2", str(src), str(tmp_path / "out" / "uae")])
    assert exit_info.value.code == 2
    assert "missing key 'encoder.encoder.embeddings.register_tokens'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse refuses an unknown layout before anything runs
        cli.main(["convert", "--from", "uae-v3", str(src), str(tmp_path / "out" / "uae")])
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_kept_unless_overwrite(tmp_path, official_v2):
    src = write(tmp_path, {"ema": official_v2})
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists"):
        convert_checkpoint("uae-v2", src, dst, config_overrides=TINY_OVERRIDES)
    assert [p.name for p in tmp_path.iterdir() if p.name != "in"] == ["out"]
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    convert_checkpoint("uae-v2", src, dst, overwrite=True, config_overrides=TINY_OVERRIDES)
    assert not (dst / "notes.txt").exists()
    assert AutoencoderUAE.from_pretrained(dst).config.decoder_num_heads == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary directory left behind


def test_missing_sources_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        convert_checkpoint("uae-v1", tmp_path / "missing.pt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nobody/no-such-rae"):  # offline: not in the hub cache
        convert_checkpoint("rae-diffusers", "nobody/no-such-rae", tmp_path / "out")
    assert not (tmp_path / "out").exists()
