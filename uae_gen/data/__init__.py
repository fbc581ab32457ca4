"""Data sets and label sampling shared by the trainers, the evaluation scripts and the demo."""

from .class_labels import balanced_class_labels, random_class_labels
from .demo_digits import DemoDigits, load_demo_digits
from .image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, adm_center_crop, pil_to_tensor
from .latent_cache import (
    LatentCacheDataset,
    LatentCacheWriter,
    LatentStatistics,
    finalize_latent_cache,
    load_latent_normalizer,
    remove_cache_files,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DemoDigits",
    "ImageFolderDataset",
    "LatentCacheDataset",
    "LatentCacheWriter",
    "LatentStatistics",
    "adm_center_crop",
    "balanced_class_labels",
    "finalize_latent_cache",
    "load_latent_normalizer",
    "load_demo_digits",
    "pil_to_tensor",
    "random_class_labels",
    "remove_cache_files",
]
