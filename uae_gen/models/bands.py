"""Frequency bands of a latent grid: masks, the band projector, iterative split and merge.

A UAE latent z (B, C, h, w) is split into K bands, band 0 holding the lowest spatial frequencies (semantics) and
band K-1 the highest (detail). The split is the paper's iterative residual split:

    r_0 = z;   b_k = P_k(r_k);   r_{k+1} = r_k - b_k

where P_k keeps the frequencies of r_k below the k-th cut-off. By default the last band takes the whole remaining
residual, so ``merge(split(z)) == z`` exactly and no frequency bin is lost.

Each transform is one small class behind the ``BandTransform`` interface (masks, to/from coefficients, split,
merge, lowpass), chosen by name from ``BAND_TRANSFORMS``; ``BandProjector`` validates the band layout and delegates:

* ``"fft"`` (``FFTBandTransform``): P_k multiplies the 2-D real FFT (rfft2 / irfft2, orthogonal round trip) by a
  radial mask over the integer frequency grid. ``mask_shape="smooth"`` uses raised-cosine low-pass masks (the
  paper's smooth radial masks). ``mask_shape="hard_ring"`` reproduces the released UAE v1 code: binary rings
  ``radius_k <= r <= radius_{k+1}`` on the centred grid, and with ``keep_residual=False`` the final residual (the
  corner bins beyond r_max) is dropped exactly as the official code drops it.
* ``"dct"`` (``DCTBandTransform``): the newer official code's orthonormal DCT-II with JPEG zig-zag order; band k is
  a range of zig-zag positions (a binary mask on coefficients, so bands are disjoint and exact). Its
  ``lowpass(z, n)`` keeps the first n zig-zag coefficients of every channel (the v2 frequency-limited latent).

Cut-offs (``cutoffs``, K-1 increasing numbers in (0, 1]) are fractions of r_max = min(h//2, w//2) for ``"fft"``
and fractions of the h*w zig-zag positions for ``"dct"``.

Everything here is pure tensor code: the masks and DCT matrices are non-persistent buffers, recomputed from the
config, so they never travel in a checkpoint. FFTs run in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch
from torch import nn

MASK_SHAPES = ("smooth", "hard_ring")  # of the fft transform


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


def zigzag_rank(height: int, width: int) -> torch.Tensor:
    """Position of every coefficient of an (height, width) grid in zig-zag order, (height, width) long; DC is 0."""
    rank = torch.empty(height * width, dtype=torch.long)
    rank[zigzag_order(height, width)] = torch.arange(height * width)
    return rank.view(height, width)


def dct_band_masks(height: int, width: int, cutoffs: Sequence[float]) -> torch.Tensor:
    """Binary coefficient masks (num_bands, height, width): band k holds zig-zag positions [n_{k-1}, n_k)."""
    total = height * width
    bounds = [0, *[round(c * total) for c in cutoffs], total]
    rank = zigzag_rank(height, width)
    return torch.stack([((rank >= lo) & (rank < hi)).float() for lo, hi in zip(bounds, bounds[1:])])


def _check_grid(x: torch.Tensor, shape: tuple[int, int], what: str) -> torch.Tensor:
    if x.ndim < 2 or tuple(x.shape[-2:]) != tuple(shape):
        raise ValueError(f"expected {what} of shape (..., {shape[0]}, {shape[1]}), got {tuple(x.shape)}")
    return x


class BandTransform(nn.Module):
    """A linear transform of the (h, w) grid and the band masks on its coefficients.

    A subclass sets ``name`` and ``mask_shapes`` and defines ``band_masks``, ``to_coefficients`` and
    ``from_coefficients``; the iterative residual split and the merge are shared, so a new transform is one class.

    Args:
        height, width: latent grid size.
        cutoffs: K-1 increasing fractions in (0, 1] (validated by ``BandProjector``), so K = len(cutoffs) + 1.
        mask_shape: one of the subclass's ``mask_shapes``.
        transition_width: width of smooth masks' roll-off, for transforms that have one.
        keep_residual: the last band is what the first K-1 projectors leave; False keeps every mask's output
            instead and drops that residual (the released v1 code).
    """

    name: str = ""
    mask_shapes: tuple[str, ...] = ("smooth",)
    masks: torch.Tensor  # (num_masks, *coefficient_shape), float32

    def __init__(
        self,
        height: int,
        width: int,
        cutoffs: Sequence[float],
        mask_shape: str = "smooth",
        transition_width: float = 1.0,
        keep_residual: bool = True,
    ):
        super().__init__()
        if mask_shape not in self.mask_shapes:
            raise ValueError(
                f"mask_shape {mask_shape!r} is not available for the {self.name} transform; "
                f"choose from {self.mask_shapes}"
            )
        self.height, self.width, self.num_bands = height, width, len(cutoffs) + 1
        self.mask_shape, self.keep_residual = mask_shape, keep_residual
        self.register_buffer("masks", self.band_masks(cutoffs, transition_width), persistent=False)

    def band_masks(self, cutoffs: Sequence[float], transition_width: float) -> torch.Tensor:
        """The low-pass masks on the coefficients, (num_masks, *coefficient_shape) float32."""
        raise NotImplementedError

    @property
    def coefficient_shape(self) -> tuple[int, int]:
        """Last two dimensions of ``to_coefficients``'s output."""
        return self.height, self.width

    def extra_repr(self) -> str:
        return f"{self.height}x{self.width}, num_bands={self.num_bands}, mask_shape={self.mask_shape}"

    def to_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """(..., h, w) grid -> (..., *coefficient_shape) coefficients, computed in float32."""
        raise NotImplementedError

    def from_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The exact inverse of ``to_coefficients``: coefficients -> (..., h, w) float32 grid."""
        raise NotImplementedError

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, K, C, h, w) in z's dtype: r_0 = z, b_k = P_k(r_k), r_{k+1} = r_k - b_k."""
        residual = z.float()
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
        """Keep the first ``num_coefficients`` coefficients of each channel; only transforms with an order have it."""
        raise ValueError(
            f"lowpass keeps the first coefficients in zig-zag order: the {self.name} transform has no such order, "
            "use transform='dct'"
        )


class FFTBandTransform(BandTransform):
    """Orthonormal rfft2 with radial masks: smooth raised-cosine low-passes (paper) or hard rings (released v1)."""

    name = "fft"
    mask_shapes = MASK_SHAPES

    def band_masks(self, cutoffs: Sequence[float], transition_width: float) -> torch.Tensor:
        return fft_projector_masks(self.height, self.width, cutoffs, self.mask_shape, transition_width)

    @property
    def coefficient_shape(self) -> tuple[int, int]:
        return self.height, self.width // 2 + 1

    def to_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """(..., h, w) -> (..., h, w//2+1) complex64, orthonormal scaling."""
        return torch.fft.rfft2(_check_grid(z, (self.height, self.width), "a grid").float(), norm="ortho")

    def from_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        coefficients = _check_grid(coefficients, self.coefficient_shape, "rfft2 coefficients")
        return torch.fft.irfft2(coefficients, s=(self.height, self.width), norm="ortho")


class DCTBandTransform(BandTransform):
    """Orthonormal 2-D DCT-II (the v2 code's matrices) with bands as ranges of JPEG zig-zag positions.

    Its bands are disjoint binary masks covering every coefficient, so ``keep_residual`` changes nothing and the
    only mask shape is the projector's default, "smooth" (the name; the masks are binary).
    """

    name = "dct"
    mask_shapes = ("smooth",)

    def __init__(self, height: int, width: int, *args, **kwargs):
        super().__init__(height, width, *args, **kwargs)
        self.register_buffer("zigzag_rank", zigzag_rank(height, width), persistent=False)
        self.register_buffer("dct_h", dct_matrix(height).float(), persistent=False)
        self.register_buffer("dct_w", dct_matrix(width).float(), persistent=False)

    def band_masks(self, cutoffs: Sequence[float], transition_width: float) -> torch.Tensor:
        return dct_band_masks(self.height, self.width, cutoffs)

    def to_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """(..., h, w) -> (..., h, w) float32 coefficients D_h z D_w^T; [0, 0] is DC."""
        # .float() on the matrices too: a module cast to bf16 casts its buffers, and the transform stays float32.
        return self.dct_h.float() @ _check_grid(z, (self.height, self.width), "a grid").float() @ self.dct_w.float().T

    def from_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        coefficients = _check_grid(coefficients, self.coefficient_shape, "DCT coefficients")
        return self.dct_h.float().T @ coefficients.float() @ self.dct_w.float()

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, K, C, h, w): the masks are disjoint, so the iterative split is one masked product."""
        coefficients = self.to_coefficients(z).unsqueeze(1)
        return self.from_coefficients(coefficients * self.masks[:, None]).to(z.dtype)

    def lowpass(self, z: torch.Tensor, num_coefficients: torch.Tensor | int) -> torch.Tensor:
        """Keep the first N zig-zag coefficients of every channel, zero the rest, and return the grid in z's dtype.

        N is an int in [1, h*w], or a tensor of per-sample counts of shape (B,) for z (B, ...); a tensor is not
        range-checked (that would wait for the device): counts < 1 keep nothing and counts > h*w keep everything.
        """
        if isinstance(num_coefficients, torch.Tensor):
            count = num_coefficients.to(z.device).reshape(-1, *(1,) * (z.ndim - 1))
        else:
            count = _coefficient_count(num_coefficients, self.height * self.width)
        keep = (self.zigzag_rank < count).float()
        return self.from_coefficients(self.to_coefficients(z) * keep).to(z.dtype)


def _coefficient_count(value, total: int) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"num_coefficients must be an int or a tensor of per-sample counts, got {value!r}") from None
    if not 1 <= count <= total:
        raise ValueError(f"num_coefficients must lie in [1, {total}] (the grid's h*w), got {value}")
    return count


class LowFrequencyTokens(nn.Module):
    """The first N zig-zag DCT coefficients of each channel of a (C, h, w) grid, as a sequence of N tokens.

    ``to_tokens`` (B, C, h, w) -> (B, C, N) and ``from_tokens`` (B, C, N) -> (B, C, h, w) with the other
    coefficients zero: an orthonormal projection onto the low-pass subspace, so ``from_tokens(to_tokens(z))`` is
    the zig-zag low-pass of z and ``to_tokens(from_tokens(c)) == c``. ``indices`` (N,) holds each token's flat
    frequency position (row * w + column), for position embeddings.
    """

    def __init__(self, height: int, width: int, num_tokens: int):
        super().__init__()
        self.height, self.width = height, width
        self.num_tokens = _coefficient_count(num_tokens, height * width)
        self.dct = DCTBandTransform(height, width, cutoffs=[])
        self.register_buffer("indices", zigzag_order(height, width)[: self.num_tokens], persistent=False)

    def extra_repr(self) -> str:
        return f"{self.height}x{self.width}, num_tokens={self.num_tokens}"

    def to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        return self.dct.to_coefficients(z).flatten(-2)[..., self.indices].to(z.dtype)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} frequency tokens in the last dimension, got {tuple(tokens.shape)}")
        coefficients = tokens.new_zeros(*tokens.shape[:-1], self.height * self.width, dtype=torch.float32)
        coefficients[..., self.indices] = tokens.float()
        return self.dct.from_coefficients(coefficients.unflatten(-1, (self.height, self.width))).to(tokens.dtype)


BAND_TRANSFORMS: dict[str, type[BandTransform]] = {"fft": FFTBandTransform, "dct": DCTBandTransform}


class BandProjector(nn.Module):
    """Splits a latent grid into K frequency bands (iterative residual split) and merges them back.

    Validates the band layout and the latent's shape, and delegates to the ``BAND_TRANSFORMS[transform]`` class
    (``self.band_transform``).

    Args:
        height, width: latent grid size the masks are built for.
        num_bands: K.
        transform: a key of ``BAND_TRANSFORMS``: "fft" (radial masks) or "dct" (zig-zag positions).
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
        if transform not in BAND_TRANSFORMS:
            raise ValueError(f"transform must be one of {tuple(BAND_TRANSFORMS)}, got {transform!r}")
        if num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {num_bands}")
        cutoffs = list(default_cutoffs(num_bands) if cutoffs is None else cutoffs)
        if len(cutoffs) != num_bands - 1:
            raise ValueError(f"expected {num_bands - 1} cutoffs for {num_bands} bands, got {len(cutoffs)}")
        if any(not 0 < c <= 1 for c in cutoffs) or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
            raise ValueError(f"cutoffs must increase strictly within (0, 1], got {cutoffs}")
        self.height, self.width, self.num_bands = height, width, num_bands
        self.transform, self.mask_shape, self.keep_residual = transform, mask_shape, keep_residual
        self.band_transform = BAND_TRANSFORMS[transform](
            height, width, cutoffs, mask_shape=mask_shape, transition_width=transition_width,
            keep_residual=keep_residual,
        )

    def extra_repr(self) -> str:
        return f"{self.height}x{self.width}, num_bands={self.num_bands}, transform={self.transform}"

    @property
    def masks(self) -> torch.Tensor:
        """The transform's projector masks on its coefficients."""
        return self.band_transform.masks

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"expected a latent of shape (B, C, {self.height}, {self.width}), got {tuple(z.shape)}"
            )

    def to_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """(..., h, w) grid -> the coefficients the masks live on (float32, complex64 for fft)."""
        return self.band_transform.to_coefficients(z)

    def from_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The exact inverse of ``to_coefficients``."""
        return self.band_transform.from_coefficients(coefficients)

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, K, C, h, w), lowest band first, in z's dtype (computed in float32)."""
        self._check(z)
        return self.band_transform.split(z)

    def merge(self, bands: torch.Tensor) -> torch.Tensor:
        """(B, K, C, h, w) -> (B, C, h, w): the sum of the bands, the exact inverse of ``split``."""
        return self.band_transform.merge(bands)

    def lowpass(self, z: torch.Tensor, num_coefficients: torch.Tensor | int) -> torch.Tensor:
        """Keep the first N zig-zag DCT coefficients of each channel (the v2 low-pass); N per sample or an int."""
        self._check(z)
        return self.band_transform.lowpass(z, num_coefficients)
