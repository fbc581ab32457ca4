"""Evaluation metrics: generation (FID, IS, precision/recall, KID via torch-fidelity features), reconstruction
(PSNR, SSIM) and ADM npz sample files."""

from .fidelity import (
    UInt8ImageDataset,
    compute_generation_metrics,
    extract_features,
    feature_layers_for_metrics,
    images_dataset,
    load_reference_stats,
    register_feature_extractor,
)
from .generation import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from .npz import SamplesNpz, images_to_uint8, load_samples_npz, save_samples_npz
from .reconstruction import psnr, quantize_to_uint8_levels, ssim

__all__ = [
    "SamplesNpz",
    "UInt8ImageDataset",
    "compute_generation_metrics",
    "extract_features",
    "feature_layers_for_metrics",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "images_dataset",
    "images_to_uint8",
    "inception_score",
    "kernel_inception_distance",
    "load_reference_stats",
    "load_samples_npz",
    "precision_recall",
    "psnr",
    "quantize_to_uint8_levels",
    "register_feature_extractor",
    "save_samples_npz",
    "ssim",
]
