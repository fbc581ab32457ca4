"""Reconstruction metrics PSNR and SSIM, per image, as the RAE / UAE-v2 tokenizer evaluation computes them.

Inputs are float tensors (B, 3, H, W) in [0, 1]. By default both images are first rounded to the 256 levels of
a saved 8-bit PNG (the official numbers are computed on uint8 images rescaled to [0, 1]). Each function returns
one value per image; the reported number is the mean over all images (accumulate per-image values across
batches, then average).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 256 levels k / 255 of an 8-bit image (what a PNG round trip gives)."""
    return (images.clamp(0.0, 1.0) * 255).round() / 255


def _check_image_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if not (torch.is_tensor(images) and torch.is_tensor(reference)):
        raise ValueError("images and reference must be torch tensors")
    if images.shape != reference.shape or images.ndim != 4:
        raise ValueError(f"images and reference must both be (B, C, H, W); got {tuple(images.shape)} and "
                         f"{tuple(reference.shape)}")
    if not (images.is_floating_point() and reference.is_floating_point()):
        raise ValueError("images and reference must be float tensors in [0, 1]")


def psnr(images: torch.Tensor, reference: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 20 log10(1 / sqrt(MSE)) with MSE over (C, H, W); shape (B,).

    Identical images give +inf.
    """
    _check_image_pair(images, reference)
    if quantize:
        images, reference = quantize_to_uint8_levels(images), quantize_to_uint8_levels(reference)
    mse = (images.double() - reference.double()).square().flatten(1).mean(dim=1)
    return (-10.0 * torch.log10(mse)).to(images.dtype)


def _gaussian_window(size: int, sigma: float, channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    profile = torch.exp(-coords.square() / (2 * sigma**2))
    profile = profile / profile.sum()
    return (profile[:, None] * profile[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(images: torch.Tensor, reference: torch.Tensor, quantize: bool = True, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), shape (B,).

    Gaussian window 11 x 11 with sigma 1.5, k1 = 0.01, k2 = 0.03, data_range 1: the settings of torchmetrics'
    `structural_similarity_index_measure` used by the official evaluation. Local statistics use population
    (co)variances; the SSIM map is averaged over channels and the window positions that fit inside the image
    (torchmetrics pads and then crops that border away, which is the same).
    """
    _check_image_pair(images, reference)
    height, width = images.shape[-2:]
    if min(height, width) < window_size:
        raise ValueError(f"images ({height}x{width}) are smaller than the SSIM window ({window_size})")
    if quantize:
        images, reference = quantize_to_uint8_levels(images), quantize_to_uint8_levels(reference)
    dtype = torch.promote_types(images.dtype, torch.float32)
    x, y = images.to(dtype), reference.to(dtype)
    window = _gaussian_window(window_size, sigma, x.shape[1], dtype, x.device)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x.square()
    var_y = local_mean(y * y) - mu_y.square()
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1).to(images.dtype)
