"""ADM-format sample files: `.npz` with `arr_0` = uint8 images (N, H, W, 3), optional `arr_1` = int labels.

This is what the OpenAI ADM evaluator (guided-diffusion `evaluations/evaluator.py`) and DiT/SiT/RAE sampling
scripts exchange. ADM *reference* batches (e.g. `VIRTUAL_imagenet256_labeled.npz`) also carry `mu`/`sigma`,
the pool_3 statistics of the whole reference data set, which FID uses instead of the stored images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def images_to_uint8(images: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float images -> uint8 (N, H, W, 3), the way they are saved as PNG for evaluation.

    `images` is a torch tensor (N, 3, H, W) or a numpy array (N, H, W, 3) (diffusers' `output_type="np"`), with
    values in `value_range`: (0, 1) (our decoders' [0, 1] output after `(x + 1) / 2`) or (-1, 1). The mapping is
    `(x01 * 255).round().clamp(0, 255)`; DiT's `clamp(127.5 * x + 128, 0, 255)` then truncation is the same up to
    exact .5 ties. Plain truncation of `x * 255` would be half a grey level darker on average.
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be (N, H, W, 3), got shape {images.shape}")
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in {value_range}, got dtype {images.dtype}")
    low, high = value_range
    if high <= low:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    unit = (images.detach().float().cpu() - low) / (high - low)
    return (unit * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _check_uint8_images(images: np.ndarray, what: str = "images") -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{what} must be a uint8 numpy array (N, H, W, 3); got "
            f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
            " (images_to_uint8 converts float images)"
        )


def save_samples_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write `arr_0` = images (uint8 N,H,W,3) and optionally `arr_1` = labels (N,) int64, uncompressed like ADM.

    Written to a temporary file in the same folder, then renamed, so a crash never leaves a truncated npz.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"sample file must end in .npz, got {path}")
    _check_uint8_images(images)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be {len(images)} integers, got {labels.dtype} array of shape {labels.shape}")
        arrays["arr_1"] = labels.astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:  # a file handle: np.savez would append ".npz" to a name
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@dataclass
class SamplesNpz:
    """Contents of an ADM npz. `images` uint8 (N, H, W, 3) or None (a statistics-only file); `labels` (N,) or
    None; `mu`, `sigma`: precomputed Inception pool_3 statistics of a reference batch, or None."""

    images: np.ndarray | None
    labels: np.ndarray | None
    mu: np.ndarray | None
    sigma: np.ndarray | None


def load_samples_npz(path: str | os.PathLike, load_images: bool = True) -> SamplesNpz:
    """Read an ADM sample or reference npz (`allow_pickle=False`). `load_images=False` skips `arr_0` (which is
    ~10 GB for 50k images at 256 px) when only `mu`/`sigma` are needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data and "mu" not in data:
            raise ValueError(f"{path} has neither images (arr_0) nor statistics (mu/sigma); keys: {list(data.keys())}")
        if ("mu" in data) != ("sigma" in data):
            raise ValueError(f"{path} has only one of mu and sigma")
        images = data["arr_0"] if load_images and "arr_0" in data else None
        if images is not None:
            _check_uint8_images(images, f"arr_0 of {path}")
        labels = data["arr_1"] if "arr_1" in data else None
        mu = data["mu"] if "mu" in data else None
        sigma = data["sigma"] if "sigma" in data else None
    return SamplesNpz(images=images, labels=labels, mu=mu, sigma=sigma)
