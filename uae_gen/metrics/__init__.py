"""Evaluation metrics: generation (FID, IS, precision/recall, KID via torch-fidelity features), reconstruction
(PSNR, SSIM), linear probe accuracy, radial power spectra of feature grids and ADM npz sample files."""

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
from .spectrum import (
    RadialSpectrum,
    SpectrumAccumulator,
    band_energies,
    band_energy_shares,
    normalized_frequency_radius,
    radial_power_spectrum,
)

__all__ = [
    "RadialSpectrum",
    "SamplesNpz",
    "SpectrumAccumulator",
    "UInt8ImageDataset",
    "]",
    "band_energies",
    "band_energy_shares",
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
    "normalized_frequency_radius",
    "pooled_features",
    "precision_recall",
    "psnr",
    "quantize_to_uint8_levels",
    "radial_power_spectrum",
    "register_feature_extractor",
    "save_samples_npz",
    "ssim",
]
