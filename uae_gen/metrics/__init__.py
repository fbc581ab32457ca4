"""Evaluation metrics: generation (FID, IS, precision/recall, KID via torch-fidelity features), reconstruction
(PSNR, SSIM), linear probe accuracy and ADM npz sample files."""

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
from .linear_probe import linear_probe_accuracy, pooled_features
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
    "linear_probe_accuracy",
    "load_reference_stats",
    "load_samples_npz",
    "pooled_features",
    "precision_recall",
    "psnr",
    "quantize_to_uint8_levels",
    "register_feature_extractor",
    "save_samples_npz",
    "ssim",
]
