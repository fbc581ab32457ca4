"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for discriminator inputs.

The policy of the StyleGAN-T copy used by UAE and RAE: integer translation by up to 1/8 of the image
size with zero fill, then colour (brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]), then an
optional square cutout. Each of the three groups is switched on for the whole batch with probability
`probability`; the amounts are drawn per image. Every op is differentiable in the pixels, so the
generator's adversarial gradient passes through it.

The official training loops augment real and fake batches with two independent draws; pass
`shared=True` to `augment_pair` to give both batches the same draw instead.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AugmentationDraw:
    """Random amounts for one batch; a field is None when its op is switched off for this batch."""

    translation: Optional[torch.Tensor]  # (B, 2) integer (row, column) shifts
    brightness: Optional[torch.Tensor]  # (B,) added offset in [-0.5, 0.5]
    saturation: Optional[torch.Tensor]  # (B,) factor in [0, 2]
    contrast: Optional[torch.Tensor]  # (B,) factor in [0.5, 1.5]
    cutout_origin: Optional[torch.Tensor]  # (B, 2) top-left (row, column) of the cutout square, may be negative


class DiffAugment:
    """Samples and applies DiffAugment transforms to (B, C, H, W) images in [-1, 1]."""

    def __init__(self, probability: float = 1.0, translation_ratio: float = 0.125, cutout_ratio: float = 0.0):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"DiffAugment probability must be in [0, 1], got {probability}")
        if not 0.0 <= cutout_ratio < 1.0 or not 0.0 <= translation_ratio < 1.0:
            raise ValueError(
                f"DiffAugment ratios must be in [0, 1), got translation {translation_ratio}, cutout {cutout_ratio}"
            )
        self.probability = probability
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio

    def sample(
        self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None
    ) -> AugmentationDraw:
        """Draw the amounts for a batch on the CPU (so a CPU generator reproduces them on any device)."""
        use_translation, use_color, use_cutout = (torch.rand(3, generator=generator) < self.probability).tolist()
        uniform = torch.rand(7, batch_size, generator=generator)
        size = torch.tensor([height, width])

        translation = None
        if use_translation:
            max_shift = torch.round(size * self.translation_ratio).long()  # (2,)
            # Uniform over the integers -max_shift..max_shift.
            translation = (uniform[0:2].T * (2 * max_shift + 1)).floor().long() - max_shift

        brightness = saturation = contrast = None
        if use_color:
            brightness = uniform[2] - 0.5
            saturation = uniform[3] * 2.0
            contrast = uniform[4] + 0.5

        cutout_origin = None
        if use_cutout and self.cutout_ratio > 0:
            cut_size = torch.round(size * self.cutout_ratio).long()
            center = (uniform[5:7].T * (size + 1 - cut_size % 2)).floor().long()
            cutout_origin = center - cut_size // 2
        return AugmentationDraw(translation, brightness, saturation, contrast, cutout_origin)

    def apply(self, images: torch.Tensor, draw: AugmentationDraw) -> torch.Tensor:
        """Apply a given draw to a batch of images (B, C, H, W)."""
        if images.ndim != 4:
            raise ValueError(f"DiffAugment expects (B, C, H, W) images, got shape {tuple(images.shape)}")
        batch, _, height, width = images.shape
        device = images.device
        if draw.translation is not None:
            images = _translate(images, draw.translation.to(device))
        if draw.brightness is not None:
            images = images + draw.brightness.to(device, images.dtype).view(batch, 1, 1, 1)
            mean = images.mean(dim=1, keepdim=True)
            images = (images - mean) * draw.saturation.to(device, images.dtype).view(batch, 1, 1, 1) + mean
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            images = (images - mean) * draw.contrast.to(device, images.dtype).view(batch, 1, 1, 1) + mean
        if draw.cutout_origin is not None:
            cut_size = torch.round(torch.tensor([height, width]) * self.cutout_ratio).long().to(device)
            origin = draw.cutout_origin.to(device)
            rows = torch.arange(height, device=device).view(1, height)
            cols = torch.arange(width, device=device).view(1, width)
            inside_rows = (rows >= origin[:, :1]) & (rows < origin[:, :1] + cut_size[0])
            inside_cols = (cols >= origin[:, 1:]) & (cols < origin[:, 1:] + cut_size[1])
            keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
            images = images * keep[:, None].to(images.dtype)
        return images

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        draw = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, draw)

    def augment_pair(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        shared: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a real and a fake batch: independent draws (official behaviour) or, with shared=True, one draw."""
        if not shared:
            return self(real, generator), self(fake, generator)
        if real.shape != fake.shape:
            raise ValueError(
                f"shared augmentation needs real and fake of the same shape, got {tuple(real.shape)} "
                f"and {tuple(fake.shape)}"
            )
        draw = self.sample(real.shape[0], real.shape[-2], real.shape[-1], generator)
        return self.apply(real, draw), self.apply(fake, draw)


def _translate(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = images[b, :, i + shifts[b, 0], j + shifts[b, 1]], zero where that falls outside."""
    batch, channels, height, width = images.shape
    rows = torch.arange(height, device=images.device).view(1, height) + shifts[:, :1]
    cols = torch.arange(width, device=images.device).view(1, width) + shifts[:, 1:]
    valid = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    row_index = rows.clamp(0, height - 1).view(batch, 1, height, 1).expand(batch, channels, height, width)
    col_index = cols.clamp(0, width - 1).view(batch, 1, 1, width).expand(batch, channels, height, width)
    shifted = images.gather(2, row_index).gather(3, col_index)
    return shifted * valid[:, None].to(images.dtype)
