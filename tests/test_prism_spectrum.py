"""The radial power spectrum and band energy shares (uae_gen.metrics.spectrum) on signals with known spectra, and
eval/prism_spectrum.py end to end on a tiny random-weight UAE and encoder file saved to a temp dir."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from uae_gen import AutoencoderUAE
from uae_gen.data import load_demo_digits
from uae_gen.metrics import (
    SpectrumAccumulator,
    band_energies,
    band_energy_shares,
    normalized_frequency_radius,
    radial_power_spectrum,
)
from uae_gen.models.bands import BandProjector
from uae_gen.training.image_grid import CAPTION_HEIGHT, GRID_PADDING

from .test_eval_scripts import load_script

BIN_WIDTH_16 = math.sqrt(2.0) / 16  # the default 16 bins over [0, sqrt(2)]


def cosine_grid(fy: int, fx: int, size: int = 16) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = torch.cos(2 * math.pi * (fy * y + fx * x) / size)
    return torch.stack([wave, 3 * wave]).unsqueeze(0).float()  # (1, 2, size, size)


def test_the_bins_do_not_move_with_the_last_bit_of_a_square_root(monkeypatch):
    # torch's float64 sqrt is an ulp low for sqrt(1/32) on an AVX-512 Xeon; (1, 1) of a 16x16 grid lies on edge 2.
    true_sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: torch.nextafter(true_sqrt(x), torch.zeros_like(x)))
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda self: torch.sqrt(self))
    spectrum = radial_power_spectrum(cosine_grid(1, 1))
    assert spectrum.energy_share[2] == pytest.approx(1.0, abs=1e-6)
    assert spectrum.energy_share_within(math.sqrt(2) / 8) == pytest.approx(1.0, abs=1e-6)


def test_constant_grid_puts_all_energy_in_the_dc_bin():
    grid = torch.full((2, 3, 8, 8), 0.5)
    spectrum = radial_power_spectrum(grid)
    assert spectrum.total_energy == pytest.approx(64 * 0.25)  # mean over maps of sum x^2
    assert spectrum.energy_share[0] == pytest.approx(1.0) and spectrum.energy_share[1:].abs().max() < 1e-12
    assert spectrum.dc_share == pytest.approx(1.0)
    assert spectrum.power[0] == pytest.approx(64 * 0.25)  # bin 0 holds DC alone on an 8x8 grid
    assert spectrum.frequency_count[0] == 1 and spectrum.frequency_count.sum() == 64


@pytest.mark.parametrize("fy, fx", [(3, 0), (0, 3), (3, 4), (1, 1)])
def test_cosine_lands_in_the_bin_of_its_radius(fy, fx):
    spectrum = radial_power_spectrum(cosine_grid(fy, fx))
    radius = math.hypot(fy, fx) / 8  # integer frequency / (16 / 2)
    expected_bin = int(radius / BIN_WIDTH_16)
    assert spectrum.energy_share[expected_bin] == pytest.approx(1.0, abs=1e-6)
    assert spectrum.energy_share.sum() == pytest.approx(1.0)
    assert spectrum.dc_share == pytest.approx(0.0, abs=1e-9)
    # Energy within a radius switches from 0 to 1 at the cosine's radius.
    assert spectrum.energy_share_within(radius - 1e-3) == pytest.approx(0.0, abs=1e-6)
    assert spectrum.energy_share_within(radius + 1e-3) == pytest.approx(1.0, abs=1e-6)


def test_white_noise_is_flat_and_obeys_parseval():
    torch.manual_seed(0)
    sigma = 2.0
    grid = sigma * torch.randn(64, 8, 32, 32)
    spectrum = radial_power_spectrum(grid, num_bins=16)
    assert spectrum.total_energy == pytest.approx(grid.double().square().sum().item() / (64 * 8), rel=1e-5)
    assert spectrum.power_map.sum().item() == pytest.approx(spectrum.total_energy, rel=1e-9)
    filled = spectrum.frequency_count > 0
    assert filled.all()  # 32x32 has a frequency in every bin of width sqrt(2)/16
    assert torch.allclose(spectrum.power, torch.full((16,), sigma**2, dtype=torch.float64), rtol=0.1)
    assert spectrum.energy_share.sum() == pytest.approx(1.0)
    assert spectrum.cumulative_share[-1] == pytest.approx(1.0)
    by_count = spectrum.frequency_count * spectrum.power / spectrum.total_energy
    assert torch.allclose(spectrum.energy_share, by_count)


def test_accumulating_batches_equals_one_batch_and_empty_bins_are_nan():
    torch.manual_seed(1)
    grid = torch.randn(6, 4, 8, 8) + torch.linspace(-1, 1, 8)
    accumulator = SpectrumAccumulator()
    accumulator.update(grid[:2])
    accumulator.update(grid[2:])
    split, whole = accumulator.compute(), radial_power_spectrum(grid)
    assert accumulator.num_maps == 24
    assert torch.allclose(split.power_map, whole.power_map) and torch.allclose(split.energy_share, whole.energy_share)
    # An 8x8 grid has no frequency with normalised radius in [0.088, 0.177): that bin is empty.
    assert split.frequency_count[1] == 0 and math.isnan(split.power[1]) and split.to_dict()["power"][1] is None
    assert normalized_frequency_radius(8, 8).max().item() == pytest.approx(math.sqrt(2.0))


def test_spectrum_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        radial_power_spectrum(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="zero energy"):
        radial_power_spectrum(torch.zeros(1, 1, 8, 8))
    accumulator = SpectrumAccumulator()
    with pytest.raises(ValueError, match="no grids accumulated"):
        accumulator.compute()
    accumulator.update(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="grid size"):
        accumulator.update(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="num_bins"):
        accumulator.compute(num_bins=0)
    with pytest.raises(ValueError, match="bands"):
        band_energies(torch.randn(1, 2, 8, 8), torch.randn(1, 3, 2, 4, 4))


@pytest.mark.parametrize("projector_kwargs", [
    dict(num_bands=3, cutoffs=[0.3, 0.6], mask_shape="hard_ring"),
    dict(num_bands=4, transform="dct"),
])
def test_band_shares_of_disjoint_splits_are_band_norms(projector_kwargs):
    torch.manual_seed(2)
    latent = torch.randn(4, 5, 16, 16) + 2.0 * cosine_grid(1, 0).repeat(4, 3, 1, 1)[:, :5]
    projector = BandProjector(16, 16, **projector_kwargs)
    bands = projector.split(latent)
    shares = band_energy_shares(latent, bands)
    norms = bands.double().square().sum(dim=(0, 2, 3, 4)) / latent.double().square().sum()
    assert torch.allclose(shares, norms, atol=1e-6)
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-6)
    if projector_kwargs.get("mask_shape") == "hard_ring":
        # Band 0 of the hard split is exactly the frequencies with radius <= 0.3 r_max: the spectrum agrees.
        assert shares[0].item() == pytest.approx(radial_power_spectrum(latent).energy_share_within(0.3), abs=1e-6)


def test_band0_share_of_the_smooth_split_is_its_projection_on_the_latent():
    torch.manual_seed(3)
    latent = torch.randn(3, 4, 8, 8).cumsum(-1)  # red-ish noise: energy leans to low frequencies
    projector = BandProjector(8, 8, num_bands=4)  # smooth masks: neighbouring bands overlap
    bands = projector.split(latent)
    shares = band_energy_shares(latent, bands)
    by_hand = [(bands[:, k].double() * latent.double()).sum() / latent.double().square().sum() for k in range(4)]
    assert torch.allclose(shares, torch.stack(by_hand))
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-6) and (shares >= 0).all()
    # Accumulated over two batches, the energies still give the shares of the whole set.
    summed = band_energies(latent[:1], bands[:1]) + band_energies(latent[1:], bands[1:])
    assert torch.allclose(summed / latent.double().square().sum(), shares)


# ---- the script -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny UAE, its own encoder weights as a file, and a second tiny encoder with other random weights."""
    root = tmp_path_factory.mktemp("prism")
    torch.manual_seed(0)
    model = AutoencoderUAE.from_preset("tiny").eval()
    model.save_pretrained(root / "uae")
    save_file({k: v.contiguous() for k, v in model.encoder.backbone.state_dict().items()}, root / "initial.safetensors")
    torch.manual_seed(1)
    other = AutoencoderUAE.from_preset("tiny").encoder
    save_file({k: v.contiguous() for k, v in other.backbone.state_dict().items()}, root / "other.safetensors")
    return root


def test_script_compares_uae_encoder_and_pixels(saved_models, tmp_path, one_torch_thread):
    script = load_script("prism_spectrum")
    out_dir = tmp_path / "spectrum"
    results = script.main(script.parse_args(
        ["--autoencoder", str(saved_models / "uae"), "--encoder", str(saved_models / "initial.safetensors"),
         "--pixels", "--dataset", "demo-digits", "--max_images", "12", "--batch_size", "8", "--num_visualize", "3",
         "--out_dir", str(out_dir)]))
    stored = json.loads((out_dir / "prism_spectrum.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert set(stored) == {"sources", "band0_energy_share", "settings"}
    assert list(stored["sources"]) == ["uae latent", "initial", "pixels"]
    assert stored["settings"]["num_images"] == 12 and stored["settings"]["cutoff_radius"] == 0.25
    for source in stored["sources"].values():
        assert set(source) >= {"grid", "band_energy_shares", "band0_energy_share", "energy_share_within_cutoff",
                               "spectrum"}
        assert len(source["band_energy_shares"]) == 4
        assert sum(source["band_energy_shares"]) == pytest.approx(1.0, abs=1e-6)
        assert sum(source["spectrum"]["energy_share"]) == pytest.approx(1.0, abs=1e-9)
    assert stored["sources"]["pixels"]["grid"] == [3, 8, 8] and stored["sources"]["uae latent"]["grid"] == [64, 8, 8]

    # The band-0 share is the one computed here from the model's own split of the same images.
    model = AutoencoderUAE.from_pretrained(saved_models / "uae").eval()
    images = load_demo_digits("heldout", 32).images[:12]
    with torch.no_grad():
        latent = model.encode_raw(images)
    bands = model.split_bands(latent)
    direct = (bands[:, 0].double() * latent.double()).sum() / latent.double().square().sum()
    assert stored["band0_energy_share"]["uae latent"] == pytest.approx(direct.item(), rel=1e-5)
    # The initial encoder file holds the UAE's encoder weights (no low-pass in "tiny"): identical spectrum.
    uae, initial = stored["sources"]["uae latent"], stored["sources"]["initial"]
    assert initial["band_energy_shares"] == pytest.approx(uae["band_energy_shares"], rel=1e-5)
    assert initial["spectrum"]["energy_share"] == pytest.approx(uae["spectrum"]["energy_share"], rel=1e-5, abs=1e-9)

    figure = Image.open(out_dir / "spectrum.png")
    figure.load()
    colours = {colour for _, colour in figure.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert set(script.PALETTE[:3]) <= colours  # one curve colour per source
    decodes = Image.open(out_dir / "band_decodes.png")
    rows = model.config.num_bands + 1  # bands 0, 0-1, 0-2, 0-3, then the input
    assert decodes.size[1] == rows * (32 + CAPTION_HEIGHT + GRID_PADDING) + GRID_PADDING


def test_cumulative_decode_of_all_bands_is_the_full_decode(saved_models, one_torch_thread):
    script = load_script("prism_spectrum")
    model = AutoencoderUAE.from_pretrained(saved_models / "uae").eval()
    images = load_demo_digits("heldout", 32).images[:2]
    decodes = script.cumulative_band_decodes(model, images)
    assert decodes.shape == (4, 2, 3, 32, 32)
    with torch.no_grad():
        full = model(images).sample
    assert torch.allclose(decodes[-1], full, atol=1e-5)
    assert not torch.allclose(decodes[0], full, atol=1e-3)  # band 0 alone decodes to something else


def test_script_with_an_encoder_file_alone(saved_models, tmp_path, one_torch_thread):
    script = load_script("prism_spectrum")
    tiny = json.dumps(dict(depth=2, embed_dim=64, num_heads=2, patch_size=4))
    common = ["--dataset", "demo-digits", "--max_images", "8", "--image_size", "32", "--out_dir", str(tmp_path)]
    results = script.main(script.parse_args(
        ["--encoder", str(saved_models / "other.safetensors"), "--encoder_model", "vit_base_patch14_reg4_dinov2",
         "--encoder_kwargs", tiny, "--encoder_input_size", "32", "--num_bands", "2", "--band_cutoffs", "0.5",
         *common]))
    source = results["sources"]["other"]
    assert source["grid"] == [64, 8, 8] and len(source["band_energy_shares"]) == 2
    assert sum(source["band_energy_shares"]) == pytest.approx(1.0, abs=1e-6)
    assert results["settings"]["cutoff_radius"] == 0.5 and not (tmp_path / "band_decodes.png").exists()
    assert Image.open(tmp_path / "spectrum.png").size[0] > 0
    with pytest.raises(ValueError, match="--encoder_model"):
        script.main(script.parse_args(["--encoder", str(saved_models / "other.safetensors"), *common]))


def test_script_errors(tmp_path, capsys):
    script = load_script("prism_spectrum")
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "demo-digits"])
    assert "--autoencoder UAE_DIR and/or --encoder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        script.main(script.parse_args(["--encoder", "vit_small_patch14_dinov2.lvd142m", "--encoder_model",
                                       "vit_small_patch14_dinov2", "--data_dir", str(tmp_path / "empty")]))
