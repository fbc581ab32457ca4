"""Training losses for the UAE tokenizer: pixel, LPIPS (local weights), DINO discriminator with
DiffAugment, GAN losses with the adaptive weight and start schedule, and the semantic band loss."""

from .diffaugment import AugmentationDraw, DiffAugment
from .discriminator import DinoDiscriminator
from .gan import (
    GANLossSchedule,
    adaptive_generator_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    non_saturating_generator_loss,
    quantize_to_uint8_grid,
    vanilla_discriminator_loss,
)
from .lpips import LPIPS, lpips_package_linear_weights_path
from .pixel import l1_reconstruction_loss, l2_reconstruction_loss
from .semantic import semantic_band_loss

__all__ = [
    "AugmentationDraw",
    "DiffAugment",
    "DinoDiscriminator",
    "GANLossSchedule",
    "LPIPS",
    "adaptive_generator_weight",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "l1_reconstruction_loss",
    "l2_reconstruction_loss",
    "lpips_package_linear_weights_path",
    "non_saturating_generator_loss",
    "quantize_to_uint8_grid",
    "semantic_band_loss",
    "vanilla_discriminator_loss",
]
