"""Band split: exact inverse, frequency ordering, linearity, and parity with the official UAE v1/v2 code."""

import numpy as np
import pytest
import torch

from uae_gen.models.bands import (
    BAND_TRANSFORMS,
    BandProjector,
    BandTransform,
    DCTBandTransform,
    FFTBandTransform,
    LowFrequencyTokens,
    cutoffs_from_v1_schedule,
    dct_matrix,
    frequency_radius,
    zigzag_order,
)

from .fixture_paths import FIXTURES, requires_fixtures


@pytest.mark.parametrize("transform", ["fft", "dct"])
@pytest.mark.parametrize("num_bands", [1, 2, 4, 8, 10])
@pytest.mark.parametrize("size", [(16, 16), (15, 9), (12, 7)])
def test_merge_of_split_is_identity(transform, num_bands, size):
    z = torch.randn(3, 5, *size, generator=torch.Generator().manual_seed(0))
    projector = BandProjector(*size, num_bands=num_bands, transform=transform)
    bands = projector.split(z)
    assert bands.shape == (3, num_bands, 5, *size)
    assert not bands.is_complex()
    assert (projector.merge(bands) - z).abs().max() < 1e-5


@pytest.mark.parametrize("transform", ["fft", "dct"])
def test_split_is_linear(transform):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    projector = BandProjector(16, 16, num_bands=4, transform=transform)
    lhs = projector.split(2.5 * x + y)
    rhs = 2.5 * projector.split(x) + projector.split(y)
    assert (lhs - rhs).abs().max() < 1e-5


def test_white_noise_band_energy_sits_in_its_ring():
    size, num_bands = 32, 4
    projector = BandProjector(size, size, num_bands=num_bands, transition_width=0.5)
    bands = projector.split(torch.randn(8, 16, size, size, generator=torch.Generator().manual_seed(2)))
    power = torch.fft.rfft2(bands, norm="ortho").abs().pow(2).sum(dim=(0, 2))  # (K, h, w//2+1)
    radius = frequency_radius(size, size).float()
    r_max = size // 2
    edges = [0.0, *[k / num_bands * r_max for k in range(1, num_bands)], float("inf")]
    for k in range(num_bands):
        inside = (radius >= edges[k] - 0.25) & (radius <= edges[k + 1] + 0.25)
        share = power[k][inside].sum() / power[k].sum()
        assert share >= 0.9, f"band {k}: only {share:.3f} of its energy lies in its ring"
    # Energy is conserved up to the overlap of neighbouring smooth transitions.
    total = bands.sum(1).pow(2).sum()
    assert torch.isclose(bands.pow(2).sum() / total, torch.tensor(1.0), atol=0.05)


def test_smooth_latent_lives_in_band_zero():
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = torch.sin(2 * torch.pi * x / 16) + torch.cos(2 * torch.pi * y / 16) + 0.5
    z = smooth.expand(2, 8, 16, 16) + 0.05 * torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    bands = BandProjector(16, 16, num_bands=4).split(z)
    energy = bands.pow(2).sum(dim=(0, 2, 3, 4))
    assert energy[0] / energy.sum() > 0.95


def test_bfloat16_input_keeps_dtype():
    z = torch.randn(2, 4, 16, 16).bfloat16()
    projector = BandProjector(16, 16, num_bands=4)
    bands = projector.split(z)
    assert bands.dtype == torch.bfloat16
    assert (projector.merge(bands.float()) - z.float()).abs().max() < 0.1


def test_dct_is_orthonormal_and_zigzag_is_a_permutation():
    d = dct_matrix(12)
    assert torch.allclose(d @ d.T, torch.eye(12, dtype=d.dtype), atol=1e-12)
    order = zigzag_order(5, 7)
    assert sorted(order.tolist()) == list(range(35))
    assert order[:3].tolist() == [0, 7, 1]  # DC, then (1, 0), then (0, 1)


def test_bad_inputs_raise():
    projector = BandProjector(16, 16, num_bands=4)
    with pytest.raises(ValueError, match="shape"):
        projector.split(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="cutoffs"):
        BandProjector(16, 16, num_bands=3, cutoffs=[0.5])
    with pytest.raises(ValueError, match="transform"):
        BandProjector(16, 16, transform="wavelet")
    with pytest.raises(ValueError, match="dct"):
        BandProjector(16, 16, transform="fft").lowpass(torch.randn(1, 1, 16, 16), 4)
    with pytest.raises(ValueError, match="hard_ring"):
        BandProjector(16, 16, transform="dct", mask_shape="hard_ring")
    with pytest.raises(ValueError, match="shape"):
        BandProjector(16, 16, transform="dct").to_coefficients(torch.randn(1, 1, 16, 12))
    with pytest.raises(ValueError, match="shape"):
        BandProjector(16, 16).from_coefficients(torch.randn(1, 1, 16, 16, dtype=torch.complex64))


def test_transforms_come_from_the_registry():
    assert BAND_TRANSFORMS == {"fft": FFTBandTransform, "dct": DCTBandTransform}
    for name, cls in BAND_TRANSFORMS.items():
        projector = BandProjector(12, 10, num_bands=3, transform=name)
        assert type(projector.band_transform) is cls and projector.band_transform.num_bands == 3
        assert projector.masks is projector.band_transform.masks


class RowBands(BandTransform):
    """A test transform: the identity, with bands as ranges of rows (so band k is known exactly)."""

    name = "rows"

    def band_masks(self, cutoffs, transition_width):
        bounds = [0, *[round(c * self.height) for c in cutoffs], self.height]
        rows = torch.arange(self.height)[:, None].expand(self.height, self.width)
        return torch.stack([((rows >= lo) & (rows < hi)).float() for lo, hi in zip(bounds, bounds[1:])])

    def to_coefficients(self, z):
        return z.float()

    def from_coefficients(self, coefficients):
        return coefficients


def test_a_new_transform_is_one_class(monkeypatch):
    monkeypatch.setitem(BAND_TRANSFORMS, "rows", RowBands)
    z = torch.randn(2, 3, 8, 5, generator=torch.Generator().manual_seed(4))
    projector = BandProjector(8, 5, num_bands=3, transform="rows", cutoffs=[0.25, 0.5])
    bands = projector.split(z)
    assert bands.shape == (2, 3, 3, 8, 5)
    assert torch.equal(bands[:, 0, :, :2], z[:, :, :2]) and not bands[:, 0, :, 2:].any()
    assert torch.equal(bands[:, 1, :, 2:4], z[:, :, 2:4]) and not bands[:, 1, :, :2].any()
    assert torch.equal(bands[:, 2, :, 4:], z[:, :, 4:])  # the residual
    assert torch.equal(projector.merge(bands), z)
    with pytest.raises(ValueError, match="rows transform has no such order"):
        projector.lowpass(z, 3)


@pytest.mark.parametrize("transform", ["fft", "dct"])
def test_coefficients_round_trip_in_float32(transform):
    z = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(5))
    projector = BandProjector(12, 10, transform=transform)
    coefficients = projector.to_coefficients(z)
    assert coefficients.shape[-2:] == projector.band_transform.coefficient_shape
    assert (projector.from_coefficients(coefficients) - z).abs().max() < 1e-5
    half = projector.to_coefficients(z.bfloat16())
    assert half.dtype == coefficients.dtype  # float32 (complex64 for fft), whatever the input dtype
    assert (half - coefficients).abs().max() < 0.05
    if transform == "dct":  # orthonormal: energy is kept
        assert torch.allclose(coefficients.square().sum(), z.square().sum(), rtol=1e-5)


def test_dct_lowpass_keeps_the_first_zigzag_coefficients():
    h, w = 12, 10
    z = torch.randn(3, 4, h, w, generator=torch.Generator().manual_seed(6))
    dct = DCTBandTransform(h, w, cutoffs=[0.5])
    rank = torch.empty(h * w, dtype=torch.long)
    rank[zigzag_order(h, w)] = torch.arange(h * w)
    for n in (1, 7, 64, h * w):
        low = dct.lowpass(z, n)
        kept = (rank < n).view(h, w)
        coefficients = dct.to_coefficients(low)
        assert (coefficients[..., kept] - dct.to_coefficients(z)[..., kept]).abs().max() < 1e-5
        assert (coefficients[..., ~kept].abs() < 1e-5).all()
    # One coefficient is the DC term: each channel becomes its spatial mean. All of them give z back.
    assert torch.allclose(dct.lowpass(z, 1), z.mean(dim=(-2, -1), keepdim=True).expand_as(z), atol=1e-6)
    assert (dct.lowpass(z, h * w) - z).abs().max() < 1e-5
    # Per-sample counts give each sample its own low-pass; the projector's lowpass is the class's.
    per_sample = dct.lowpass(z, torch.tensor([1, 7, 64]))
    for i, n in enumerate((1, 7, 64)):
        assert torch.equal(per_sample[i], dct.lowpass(z[i : i + 1], n)[0])
    assert torch.equal(BandProjector(h, w, 2, "dct").lowpass(z, 7), dct.lowpass(z, 7))
    assert dct.lowpass(z.bfloat16(), 7).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [0, -3, 121, 1000])
def test_dct_lowpass_rejects_counts_outside_the_grid(bad):
    with pytest.raises(ValueError, match=f"num_coefficients must lie in \\[1, 120\\].*got {bad}$"):
        DCTBandTransform(12, 10, cutoffs=[0.5]).lowpass(torch.randn(1, 2, 12, 10), bad)
    with pytest.raises(TypeError, match="num_coefficients"):
        DCTBandTransform(12, 10, cutoffs=[0.5]).lowpass(torch.randn(1, 2, 12, 10), 2.5)


def test_low_frequency_tokens_are_the_first_zigzag_coefficients():
    h, w, n = 6, 5, 11
    z = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(7))
    tokens = LowFrequencyTokens(h, w, n)
    dct = DCTBandTransform(h, w, cutoffs=[])
    coefficients = tokens.to_tokens(z)
    assert coefficients.shape == (2, 3, n)
    assert torch.allclose(coefficients, dct.to_coefficients(z).flatten(-2)[..., zigzag_order(h, w)[:n]], atol=1e-6)
    assert (tokens.from_tokens(coefficients) - dct.lowpass(z, n)).abs().max() < 1e-5
    assert (tokens.to_tokens(tokens.from_tokens(coefficients)) - coefficients).abs().max() < 1e-5
    with pytest.raises(ValueError, match="expected 11 frequency tokens"):
        tokens.from_tokens(torch.zeros(2, 3, 12))
    with pytest.raises(ValueError, match="num_coefficients must lie in \\[1, 30\\].*got 31"):
        LowFrequencyTokens(h, w, 31)


@requires_fixtures
@pytest.mark.parametrize("shape", ["8x16x16", "4x12x12"])
def test_official_v1_and_v2_bands(shape):
    data = np.load(FIXTURES / "uae_official_bands.npz")
    z = torch.from_numpy(data[f"z_{shape}"])
    size = z.shape[-1]

    released = BandProjector(size, size, 2, "fft", cutoffs_from_v1_schedule([0.32, 16.0]), "hard_ring",
                             keep_residual=False)
    assert (released.split(z) - torch.from_numpy(data[f"v1_k2_released_{shape}"])).abs().max() < 1e-5
    linear = BandProjector(size, size, 4, "fft", None, "hard_ring", keep_residual=False)
    assert (linear.split(z) - torch.from_numpy(data[f"v1_k4_linear_{shape}"])).abs().max() < 1e-5

    assert torch.equal(zigzag_order(size, size), torch.from_numpy(data[f"v2_zigzag_perm_{size}x{size}"]))
    dct = BandProjector(size, size, 2, "dct")
    assert (dct.to_coefficients(z) - torch.from_numpy(data[f"v2_dct_{shape}"])).abs().max() < 1e-5
    for k in (36, 64, 100):
        assert (dct.lowpass(z, k) - torch.from_numpy(data[f"v2_lowpass{k}_{shape}"])).abs().max() < 1e-5

    # The official v1 split loses the corner bins; ours (same radii, smooth, residual kept) loses nothing.
    official_loss = (z - torch.from_numpy(data[f"v1_k2_released_{shape}"]).sum(1)).norm() / z.norm()
    ours = BandProjector(size, size, 2, "fft", cutoffs_from_v1_schedule([0.32, 16.0]))
    assert official_loss > 0.3
    assert (ours.merge(ours.split(z)) - z).norm() / z.norm() < 1e-6
