"""Frequency bands of a latent grid: masks, the band projector, iterative split and merge.

A UAE latent z (B, C, h, w) is split into K bands, band 0 holding the lowest spatial frequencies (semantics) and
band K-1 the highest (detail). The split is the paper's iterative residual split:

    r_0 = z;   b_k = P_k(r_k);   r_{k+1} = r_k - b_k

where P_k keeps the frequencies of r_k below the k-th cut-off. By default the last band takes the whole remaining
residual, so ``merge(split(z)) == z`` exactly and no frequency bin is lost.

Two transforms, one code path each:

* ``"fft"``: P_k multiplies the 2-D real FFT (rfft2 / irfft2, orthogonal round trip) by a radial mask over the
  integer frequency grid. ``mask_shape="smooth"`` uses raised-cosine low-pass masks (the paper's smooth radial
  masks). ``mask_shape="hard_ring"`` reproduces the released UAE v1 code: binary rings
  ``radius_k <= r <= radius_{k+1}`` on the centred grid, and with ``keep_residual=False`` the final residual (the
  corner bins beyond r_max) is dropped exactly as the official code drops it.
* ``"dct"``: the newer official code's orthonormal DCT-II with JPEG zig-zag order; band k is a range of zig-zag
  positions (a binary mask on coefficients, so bands are disjoint and exact).

Cut-offs (``cutoffs``, K-1 increasing numbers in (0, 1]) are fractions of r_max = min(h//2, w//2) for ``"fft"``
and fractions of the h*w zig-zag positions for ``"dct"``.

Everything here is pure tensor code: the masks and DCT matrices are non-persistent buffers, recomputed from the
config, so they never travel in a checkpoint. FFTs run in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

TRANSFORMS = ("fft", "dct")
MASK_SHAPES = ("smooth", "hard_ring")


def default_cutoffs(num_bands: int) -> list[float]:
    """Evenly spaced cut-offs: K-1 interior fractions of the frequency range (the official no-schedule default)."""
    return [k / num_bands for k in range(1, num_bands)]


def cutoffs_from_v1_schedule(schedule: Sequence[float]) -> list[float]:
    """Cut-offs from the released v1 ``v_patch_nums`` schedule (method.md 1.2).

    A non-decreasing schedule gives radii p_k / p_K * r_max; otherwise the entries are weights whose normalised
    cumulative sum places the radii. Returns the K-1 interior fractions (the top one is always 1).
    """
    values = [float(v) for v in schedule]
    if all(b >= a for a, b in zip(values, values[1:])):
        fractions = [v / values[-1] for v in values]
    else:
        total = sum(values)
        fractions = [sum(values[: k + 1]) / total for k in range(len(values))]
    return fractions[:-1]


def frequency_radius(height: int, width: int) -> torch.Tensor:
    """|f| in integer frequency units for every bin of an rfft2 of an (height, width) grid: (height, width//2+1)."""
    fy = torch.fft.fftfreq(height, d=1.0 / height, dtype=torch.float64)
    fx = torch.fft.rfftfreq(width, d=1.0 / width, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def smooth_lowpass(radius: torch.Tensor, cutoff: float, transition_width: float) -> torch.Tensor:
    """Raised-cosine low-pass: 1 below cutoff - width/2, 0 above cutoff + width/2, a half cosine between."""
    if transition_width <= 0:
        return (radius <= cutoff).to(radius.dtype)
    ramp = ((radius - cutoff) / transition_width + 0.5).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * ramp))


def fft_projector_masks(
    height: int,
    width: int,
    cutoffs: Sequence[float],
    mask_shape: str = "smooth",
    transition_width: float = 1.0,
) -> torch.Tensor:
    """Masks of the projectors P_k on the rfft2 grid, (num_masks, height, width//2+1), float32.

    ``smooth``: one low-pass per interior cut-off (the last band is the residual).
    ``hard_ring``: one binary ring per band, edges inclusive, the outermost ring ending at r_max.
    """
    radius = frequency_radius(height, width)
    r_max = min(height // 2, width // 2)
    edges = [c * r_max for c in cutoffs]
    if mask_shape == "smooth":
        masks = [smooth_lowpass(radius, edge, transition_width) for edge in edges]
    elif mask_shape == "hard_ring":
        bounds = [0.0, *edges, float(r_max)]
        masks = [((radius >= lo) & (radius <= hi)).to(radius.dtype) for lo, hi in zip(bounds, bounds[1:])]
    else:
        raise ValueError(f"mask_shape must be one of {MASK_SHAPES}, got {mask_shape!r}")
    if not masks:  # one band: it is the whole residual
        return torch.zeros(0, *radius.shape)
    return torch.stack(masks).float()


def zigzag_order(height: int, width: int) -> torch.Tensor:
    """Flat indices (y * width + x) of an (height, width) grid in JPEG zig-zag order, DC first.

    Anti-diagonal s = y + x in increasing order; odd diagonals run from bottom-left to top-right (y decreasing),
    even ones the other way, which is the order the official v2 code uses.
    """
    order = []
    for s in range(height + width - 1):
        ys = range(max(0, s - width + 1), min(s, height - 1) + 1)
        ys = reversed(ys) if s % 2 == 1 else ys
        order.extend(y * width + (s - y) for y in ys)
    return torch.tensor(order, dtype=torch.long)


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): coefficients = D @ signal, signal = D.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def dct_band_masks(height: int, width: int, cutoffs: Sequence[float]) -> torch.Tensor:
    """Binary coefficient masks (num_bands, height, width): band k holds zig-zag positions [n_{k-1}, n_k)."""
    total = height * width
    bounds = [0, *[round(c * total) for c in cutoffs], total]
    rank = torch.empty(total, dtype=torch.long)
    rank[zigzag_order(height, width)] = torch.arange(total)
    rank = rank.view(height, width)
    return torch.stack([((rank >= lo) & (rank < hi)).float() for lo, hi in zip(bounds, bounds[1:])])


class BandProjector(nn.Module):
    """Splits a latent grid into K frequency bands (iterative residual split) and merges them back.

    Args:
        height, width: latent grid size the masks are built for.
        num_bands: K.
        transform: "fft" (radial masks) or "dct" (zig-zag positions).
        cutoffs: K-1 increasing fractions in (0, 1]; None = evenly spaced.
        mask_shape: "smooth" (paper) or "hard_ring" (released v1 code); fft only.
        transition_width: width in frequency bins of the smooth masks' cosine roll-off.
        keep_residual: the last band takes what the projectors leave, so merge(split(z)) == z. False drops it
            (released v1 behaviour, only meaningful with "hard_ring").
    """

    def __init__(
        self,
        height: int,
        width: int,
        num_bands: int = 4,
        transform: str = "fft",
        cutoffs: Optional[Sequence[float]] = None,
        mask_shape: str = "smooth",
        transition_width: float = 1.0,
        keep_residual: bool = True,
    ):
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {num_bands}")
        cutoffs = list(default_cutoffs(num_bands) if cutoffs is None else cutoffs)
        if len(cutoffs) != num_bands - 1:
            raise ValueError(f"expected {num_bands - 1} cutoffs for {num_bands} bands, got {len(cutoffs)}")
        if any(not 0 < c <= 1 for c in cutoffs) or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
            raise ValueError(f"cutoffs must increase strictly within (0, 1], got {cutoffs}")
        if transform == "dct" and mask_shape != "smooth":
            raise ValueError("mask_shape applies to the fft transform only")
        self.height, self.width, self.num_bands = height, width, num_bands
        self.transform, self.mask_shape, self.keep_residual = transform, mask_shape, keep_residual

        if transform == "fft":
            masks = fft_projector_masks(height, width, cutoffs, mask_shape, transition_width)
            self.register_buffer("masks", masks, persistent=False)
        else:
            self.register_buffer("masks", dct_band_masks(height, width, cutoffs), persistent=False)
            self.register_buffer("dct_h", dct_matrix(height).float(), persistent=False)
            self.register_buffer("dct_w", dct_matrix(width).float(), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.height}x{self.width}, num_bands={self.num_bands}, transform={self.transform}"

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"expected a latent of shape (B, C, {self.height}, {self.width}), got {tuple(z.shape)}"
            )

    # Transforms between the latent grid and the coefficient domain the masks live in.
    def to_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        if self.transform == "fft":
            return torch.fft.rfft2(z, norm="ortho")
        return self.dct_h @ z @ self.dct_w.T

    def from_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        if self.transform == "fft":
            return torch.fft.irfft2(coefficients, s=(self.height, self.width), norm="ortho")
        return self.dct_h.T @ coefficients @ self.dct_w

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, K, C, h, w), lowest band first."""
        self._check(z)
        residual = z.float()
        if self.transform == "dct":
            # The DCT masks are disjoint binary sets, so the iterative split is one masked product.
            coefficients = self.to_coefficients(residual).unsqueeze(1)
            bands = self.from_coefficients(coefficients * self.masks[:, None])
            return bands.to(z.dtype)
        bands = []
        for mask in self.masks[: self.num_bands - 1] if self.keep_residual else self.masks:
            band = self.from_coefficients(self.to_coefficients(residual) * mask)
            bands.append(band)
            residual = residual - band
        if self.keep_residual:
            bands.append(residual)
        return torch.stack(bands, dim=1).to(z.dtype)

    def merge(self, bands: torch.Tensor) -> torch.Tensor:
        """(B, K, C, h, w) -> (B, C, h, w): the sum of the bands, the exact inverse of ``split``."""
        if bands.ndim != 5 or bands.shape[1] != self.num_bands:
            raise ValueError(f"expected bands of shape (B, {self.num_bands}, C, h, w), got {tuple(bands.shape)}")
        return bands.sum(dim=1)

    def lowpass(self, z: torch.Tensor, num_coefficients: torch.Tensor | int) -> torch.Tensor:
        """Keep the first k zig-zag DCT coefficients of each channel (the v2 low-pass); k per sample or scalar."""
        if self.transform != "dct":
            raise ValueError("lowpass keeps zig-zag DCT coefficients: it needs transform='dct'")
        self._check(z)
        rank = torch.empty(self.height * self.width, dtype=torch.long, device=z.device)
        rank[zigzag_order(self.height, self.width).to(z.device)] = torch.arange(rank.numel(), device=z.device)
        k = torch.as_tensor(num_coefficients, device=z.device).reshape(-1, 1, 1, 1)
        keep = (rank.view(1, 1, self.height, self.width) < k).float()
        return self.from_coefficients(self.to_coefficients(z.float()) * keep).to(z.dtype)
