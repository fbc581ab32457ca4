"""Where the energy of a feature grid sits in frequency: the Prism hypothesis' measurement.

The paper's preliminary analysis compares encoders by the spatial power spectrum of their feature grids: semantic
encoders (DINOv2, CLIP) keep most of their energy at low frequencies, pixel encoders spread it to high ones.

* ``SpectrumAccumulator`` / ``radial_power_spectrum``: the 2-D power |F|^2 of every channel of every grid
  (orthonormal FFT, so by Parseval the power sums to the grid's energy sum x^2), averaged over channels and
  images, then binned by radial frequency. Frequencies are normalised per axis so that the Nyquist frequency is
  1; the corners of the grid reach sqrt(2). The bins split [0, sqrt(2)] into ``num_bins`` equal parts whatever the
  grid size, so grids of different sizes are compared bin by bin. On a square grid with an even side, a
  ``BandProjector`` cut-off c (a fraction of r_max) is the normalised radius c.
* ``band_energies`` / ``band_energy_shares``: how the energy of z splits over the bands of an actual band split.
  Band k gets <b_k, z>, its projection on z. The bands sum to z, so these energies add up to ||z||^2 exactly,
  and for disjoint masks (hard rings, DCT) <b_k, z> = ||b_k||^2. With smooth masks each frequency's energy is
  shared between neighbouring bands in proportion to the mask weights, where ||b_k||^2 alone would lose the
  cross terms. A split that drops its residual (released v1) leaves the dropped energy out, so the shares then
  sum to less than 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

MAX_RADIUS = math.sqrt(2.0)  # the corner of the frequency grid, in units of the Nyquist frequency


def squared_frequency_radius(height: int, width: int) -> torch.Tensor:
    """|f|^2 of every bin of an (height, width) ``torch.fft.fft2``, each axis scaled so its Nyquist frequency is 1:
    (height, width), float64, in [0, 2]. Products and sums only, which round alike on every CPU, so the binning
    compares these and not |f|: the last bit of torch's float64 square root differs between CPU kernels (one ulp low
    for sqrt(1/32) on an AVX-512 Xeon), which moved the diagonal frequencies (k, k) of a 16x16 grid, lying on edges
    of the 16 default bins, into the bin below."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64) * 2.0
    fx = torch.fft.fftfreq(width, dtype=torch.float64) * 2.0
    return fy[:, None] ** 2 + fx[None, :] ** 2


def normalized_frequency_radius(height: int, width: int) -> torch.Tensor:
    """|f| of every bin of an (height, width) ``torch.fft.fft2``, each axis scaled so its Nyquist frequency is 1:
    (height, width), float64, in [0, sqrt(2)]."""
    return squared_frequency_radius(height, width).sqrt()


def radial_bin_edges(num_bins: int) -> torch.Tensor:
    """``num_bins`` + 1 equally spaced edges over [0, sqrt(2)], float64."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")
    return torch.linspace(0.0, MAX_RADIUS, num_bins + 1, dtype=torch.float64)


@dataclass
class RadialSpectrum:
    """The mean power spectrum of a set of feature grids, whole and binned by radial frequency.

    power_map: (h, w) mean |F|^2 per frequency over images and channels, fft2 layout (DC at [0, 0]).
    bin_edges: (num_bins + 1,) radial bin edges (Nyquist = 1); bin i holds edges[i] <= r < edges[i + 1], the
        last bin also r = sqrt(2).
    frequency_count: (num_bins,) how many frequencies of the grid fall in each bin (0 for bins the grid skips).
    power: (num_bins,) mean |F|^2 per frequency in each bin; NaN where the bin is empty.
    energy_share: (num_bins,) the bin's part of the total energy; sums to 1.
    cumulative_share: (num_bins,) energy at radius below each bin's upper edge, over the total.
    total_energy: mean over images and channels of sum(x^2) over the grid (= power_map.sum(), Parseval).
    num_maps: images x channels averaged.
    """

    power_map: torch.Tensor
    bin_edges: torch.Tensor
    frequency_count: torch.Tensor
    power: torch.Tensor
    energy_share: torch.Tensor
    cumulative_share: torch.Tensor
    total_energy: float
    num_maps: int

    @property
    def bin_centers(self) -> torch.Tensor:
        return (self.bin_edges[:-1] + self.bin_edges[1:]) / 2

    @property
    def dc_share(self) -> float:
        """The part of the energy in the zero frequency: the per-channel spatial mean of the grid."""
        return float(self.power_map[0, 0] / self.total_energy)

    def energy_share_within(self, radius: float) -> float:
        """The part of the energy at normalised radius <= ``radius`` (exact, from the unbinned power map)."""
        inside = squared_frequency_radius(*self.power_map.shape) <= radius * abs(radius)  # a negative radius: none
        return float(self.power_map[inside].sum() / self.total_energy)

    def to_dict(self) -> dict:
        """JSON-ready numbers (empty bins' power as None)."""
        return {
            "bin_edges": self.bin_edges.tolist(),
            "bin_centers": self.bin_centers.tolist(),
            "frequency_count": self.frequency_count.tolist(),
            "power": [None if math.isnan(p) else p for p in self.power.tolist()],
            "energy_share": self.energy_share.tolist(),
            "cumulative_share": self.cumulative_share.tolist(),
            "total_energy": self.total_energy,
            "dc_share": self.dc_share,
            "num_maps": self.num_maps,
        }


class SpectrumAccumulator:
    """Running mean of the 2-D power spectrum of feature grids (B, C, h, w), over images and channels.

    Feed batches with ``update``; ``compute`` bins the mean so far. All grids must share one (h, w); the channel
    count may differ between batches (every channel map counts once).
    """

    def __init__(self):
        self.power_sum: Optional[torch.Tensor] = None  # (h, w) float64, on the CPU
        self.num_maps = 0

    @torch.no_grad()
    def update(self, grid: torch.Tensor) -> None:
        if not torch.is_tensor(grid) or grid.ndim != 4 or not grid.is_floating_point():
            raise ValueError(f"grid must be a float (B, C, h, w) tensor, got {getattr(grid, 'shape', type(grid))}")
        if self.power_sum is not None and tuple(grid.shape[-2:]) != tuple(self.power_sum.shape):
            raise ValueError(f"grid size {tuple(grid.shape[-2:])} differs from the {tuple(self.power_sum.shape)} "
                             "grids accumulated so far")
        power = torch.fft.fft2(grid.detach().float(), norm="ortho").abs().square()
        batch_sum = power.sum(dim=(0, 1)).double().cpu()
        self.power_sum = batch_sum if self.power_sum is None else self.power_sum + batch_sum
        self.num_maps += grid.shape[0] * grid.shape[1]

    def compute(self, num_bins: int = 16) -> RadialSpectrum:
        if self.power_sum is None or self.num_maps == 0:
            raise ValueError("no grids accumulated: call update() with at least one (B, C, h, w) grid first")
        edges = radial_bin_edges(num_bins)
        power_map = self.power_sum / self.num_maps
        squared_edges = 2.0 * torch.arange(num_bins + 1, dtype=torch.float64).square() / num_bins**2  # edges^2
        index = torch.bucketize(squared_frequency_radius(*power_map.shape).flatten(), squared_edges, right=True)
        index = index.sub(1).clamp(0, num_bins - 1)
        count = torch.bincount(index, minlength=num_bins)
        energy = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, power_map.flatten())
        total = power_map.sum()
        if total <= 0:
            raise ValueError("the accumulated grids have zero energy: their spectrum has no shares")
        share = energy / total
        return RadialSpectrum(
            power_map=power_map,
            bin_edges=edges,
            frequency_count=count,
            power=energy / count.double(),  # 0 / 0 = NaN marks the bins the grid has no frequency in
            energy_share=share,
            cumulative_share=share.cumsum(0),
            total_energy=float(total),
            num_maps=self.num_maps,
        )


def radial_power_spectrum(grid: torch.Tensor, num_bins: int = 16) -> RadialSpectrum:
    """The radial power spectrum of one batch of feature grids (B, C, h, w), averaged over images and channels."""
    accumulator = SpectrumAccumulator()
    accumulator.update(grid)
    return accumulator.compute(num_bins)


def band_energies(latent: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """Energy of each band of ``bands = split(latent)``: <b_k, z> summed over the batch, (K,) float64 on the CPU.

    Summed (not averaged) so batches can be added up; divide by ``latent.square().sum()`` for shares."""
    if latent.ndim != 4 or bands.ndim != 5 or bands.shape[:1] + bands.shape[2:] != latent.shape:
        raise ValueError(f"expected a latent (B, C, h, w) and its bands (B, K, C, h, w), got {tuple(latent.shape)} "
                         f"and {tuple(bands.shape)}")
    projections = (bands.detach().double() * latent.detach().double().unsqueeze(1)).sum(dim=(0, 2, 3, 4))
    return projections.cpu()


def band_energy_shares(latent: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """<b_k, z> / ||z||^2 over the batch, (K,) float64: the part of the latent's energy each band carries."""
    total = latent.detach().double().square().sum().cpu()
    if total <= 0:
        raise ValueError("the latent has zero energy: band shares are undefined")
    return band_energies(latent, bands) / total
