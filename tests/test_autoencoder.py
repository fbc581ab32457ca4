"""AutoencoderUAE: shapes, reload in a new process, encoder weight loading, modulator behaviour, bad input."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.bands import BandProjector
from uae_gen.models.encoders import SemanticEncoder, load_encoder_weights, make_teacher
from uae_gen.models.modulator import FrequencyBandModulator

TINY_ENCODER = dict(depth=2, embed_dim=64, num_heads=2, patch_size=4)


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
    nan_images = images()
    nan_images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny.encode(nan_images)
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
