"""torch-fidelity glue: image inputs -> features -> every generation metric.

Design choice: we do NOT call `torch_fidelity.calculate_metrics`. We use torch-fidelity for what it is the
reference for — its feature extractors (`inception-v3-compat` is the TF Inception graph ported bit-exactly,
including the TF1 resize to 299) and its batched extraction loop — and compute every metric ourselves from the
features (`uae_gen.metrics.generation`). That gives:
* one feature pass per input for all metrics (calculate_metrics switches precision/recall to VGG16 unless told
  otherwise, and would need a second pass);
* precision/recall on Inception pool_3 like ADM;
* FID against precomputed ADM reference statistics (`mu`/`sigma` of a reference npz), which calculate_metrics
  cannot take (it silently ignores unknown keyword arguments such as `fid_statistics_file`);
* numbers that tests can check against plain formulas.

Any extractor registered with torch-fidelity works (`register_feature_extractor`); each metric uses the layer
the extractor declares for it (`get_default_feature_layer_for_metric`: Inception gives "2048" for FID / P/R /
KID and "logits_unbiased" for IS).

Inputs: a folder of images (png/jpg/jpeg, non-recursive, sorted, all the same size), an ADM `.npz` (`arr_0`
uint8 N,H,W,3), a uint8 torch tensor (N, 3, H, W) or a uint8 numpy array (N, H, W, 3).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, glob_samples_paths

from .generation import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from .npz import SamplesNpz, load_samples_npz

IMAGE_EXTENSIONS = "png,jpg,jpeg"
LOSSY_EXTENSIONS = "jpg,jpeg"
METRICS = ("fid", "isc", "prc", "kid")


class UInt8ImageDataset(Dataset):
    """In-memory uint8 images as the (3, H, W) uint8 tensors torch-fidelity's extractors expect."""

    def __init__(self, images: torch.Tensor | np.ndarray):
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"numpy images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            self.images, self.channels_last = images, True
        elif torch.is_tensor(images):
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"tensor images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
            self.images, self.channels_last = images.cpu(), False
        else:
            raise ValueError(f"expected uint8 images as a tensor or numpy array, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("no images given")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.channels_last:
            return torch.from_numpy(np.ascontiguousarray(self.images[index].transpose(2, 0, 1)))
        return self.images[index]


def _load_npz_input(path: str | os.PathLike) -> SamplesNpz:
    """An npz of images; FileNotFoundError / ValueError when it is missing or holds no images."""
    samples = load_samples_npz(path)
    if samples.images is None:
        raise ValueError(f"{path} has no images (arr_0); it can only serve as FID reference statistics")
    return samples


def images_dataset(images) -> Dataset:
    """Folder, .npz path, uint8 tensor (N,3,H,W) or uint8 numpy (N,H,W,3) -> a Dataset of uint8 (3,H,W)."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            files = glob_samples_paths(str(path), samples_find_deep=False, samples_find_ext=IMAGE_EXTENSIONS,
                                       samples_ext_lossy=LOSSY_EXTENSIONS, verbose=False)
            if not files:
                raise ValueError(f"no {IMAGE_EXTENSIONS} images in folder {path}")
            return ImagesPathDataset(files)
        if path.suffix == ".npz":
            return UInt8ImageDataset(_load_npz_input(path).images)
        if not path.exists():
            raise FileNotFoundError(f"image input not found: {path}")
        raise ValueError(f"image input must be a folder or an .npz file, got {path}")
    return UInt8ImageDataset(images)


def register_feature_extractor(name: str, extractor_class: type) -> None:
    """Register a torch-fidelity feature extractor class under `name`; registering the same class again is a
    no-op (torch-fidelity itself refuses any second registration), a different class under a taken name an error."""
    registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if registered is extractor_class:
        return
    if registered is not None:
        raise ValueError(f'feature extractor name "{name}" is already taken by {registered.__name__}')
    torch_fidelity.register_feature_extractor(name, extractor_class)


def feature_layers_for_metrics(metrics, feature_extractor: str = "inception-v3-compat") -> dict[str, str]:
    """{metric: feature layer} from the extractor's own defaults, e.g. {"fid": "2048", "isc": "logits_unbiased"}."""
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f'feature extractor "{feature_extractor}" is not registered with torch-fidelity; '
                         f"known: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    extractor_class = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    layers = {}
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        try:
            layers[metric] = extractor_class.get_default_feature_layer_for_metric(metric)
        except KeyError as error:
            raise ValueError(
                f'feature extractor "{feature_extractor}" declares no feature layer for {metric}') from error
    return layers


def extract_features(images, layers, *, feature_extractor: str = "inception-v3-compat",
                     feature_extractor_weights_path: str | os.PathLike | None = None, batch_size: int = 64,
                     cuda: bool | None = None, verbose: bool = True) -> dict[str, np.ndarray]:
    """Run a torch-fidelity feature extractor over `images` (see `images_dataset`); returns {layer: (N, D) float32}.

    `feature_extractor_weights_path` is a local weights file (offline use; for Inception the converted
    `weights-inception-2015-12-05-6726825d.pth`); None lets torch-fidelity download. `cuda` defaults to
    `torch.cuda.is_available()`; on CPU the data loader runs in-process (torch-fidelity's `save_cpu_ram`).
    """
    dataset = images if isinstance(images, Dataset) else images_dataset(images)
    layers = list(dict.fromkeys(layers))
    if feature_extractor_weights_path is not None and not Path(feature_extractor_weights_path).is_file():
        raise FileNotFoundError(f"feature extractor weights not found: {feature_extractor_weights_path}")
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f'feature extractor "{feature_extractor}" is not registered with torch-fidelity')
    cuda = torch.cuda.is_available() if cuda is None else cuda
    extractor = create_feature_extractor(
        feature_extractor, layers, cuda=cuda, verbose=verbose,
        feature_extractor_weights_path=None if feature_extractor_weights_path is None
        else str(feature_extractor_weights_path),
    )
    features = get_featuresdict_from_dataset(dataset, extractor, batch_size=batch_size, cuda=cuda,
                                             save_cpu_ram=not cuda, verbose=verbose)
    return {layer: value.numpy() for layer, value in features.items()}


def load_reference_stats(reference_stats) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a tuple or from an npz that stores them (ADM reference batch)."""
    if isinstance(reference_stats, (str, os.PathLike)):
        samples = load_samples_npz(reference_stats, load_images=False)
        if samples.mu is None:
            raise ValueError(f"{reference_stats} holds no mu/sigma statistics")
        return samples.mu, samples.sigma
    if not (isinstance(reference_stats, (tuple, list)) and len(reference_stats) == 2):
        raise ValueError("reference_stats must be (mu, sigma) or a path to an npz with mu and sigma")
    return np.asarray(reference_stats[0]), np.asarray(reference_stats[1])


def compute_generation_metrics(generated, reference=None, *, reference_stats=None, fid: bool = True,
                               isc: bool = True, prc: bool = True, kid: bool = False,
                               feature_extractor: str = "inception-v3-compat",
                               feature_extractor_weights_path: str | os.PathLike | None = None,
                               batch_size: int = 64, isc_splits: int = 10, prc_neighborhood: int = 3,
                               kid_subsets: int = 100, kid_subset_size: int = 1000, cuda: bool | None = None,
                               verbose: bool = True) -> dict:
    """gFID / IS / precision / recall / KID of `generated` (input1) against `reference` (input2, real images).

    Inputs are anything `images_dataset` takes. When `reference` is an npz with `mu`/`sigma` (an ADM reference
    batch) or `reference_stats` is given, FID uses those statistics (they must come from the same feature layer:
    ADM's are Inception pool_3 = "2048"), and the reference images (arr_0) serve only precision/recall and KID,
    as in the ADM evaluator. IS uses the generated images only.

    Returns a dict: `fid`, `inception_score`, `inception_score_std`, `precision`, `recall`, `kid`, `kid_std`
    (those requested), `num_generated`, `num_reference` (images whose features were used; 0 when FID came from
    statistics alone) and `fid_from_reference_stats` (bool).
    """
    requested = [name for name, wanted in zip(METRICS, (fid, isc, prc, kid)) if wanted]
    if not requested:
        raise ValueError("no metric requested")
    layers = feature_layers_for_metrics(requested, feature_extractor)

    reference_images = reference
    if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".npz":
        # Statistics first (cheap); the images only when a metric needs them (~10 GB for ADM's 50k at 256 px).
        stored = load_samples_npz(reference, load_images=False)
        if reference_stats is None and stored.mu is not None:
            reference_stats = (stored.mu, stored.sigma)
        needs_images = prc or kid or (fid and reference_stats is None)
        reference_images = _load_npz_input(reference).images if needs_images else None
    if reference_stats is not None:
        reference_stats = load_reference_stats(reference_stats)

    reference_metrics = [m for m in requested if m != "isc" and not (m == "fid" and reference_stats is not None)]
    if reference_metrics and reference_images is None:
        raise ValueError(f"{', '.join(reference_metrics)} need reference images (a folder, npz or uint8 images)")
    if fid and reference_images is None and reference_stats is None:
        raise ValueError("FID needs a reference: images or precomputed statistics (mu, sigma)")

    cuda = torch.cuda.is_available() if cuda is None else cuda
    extraction = dict(feature_extractor=feature_extractor,
                      feature_extractor_weights_path=feature_extractor_weights_path, batch_size=batch_size,
                      cuda=cuda, verbose=verbose)
    generated_features = extract_features(generated, list(layers.values()), **extraction)
    reference_features = {}
    if reference_metrics:
        reference_features = extract_features(reference_images, [layers[m] for m in reference_metrics], **extraction)

    results = {}
    if fid:
        if reference_stats is not None:
            mu, sigma = reference_stats
            dim = generated_features[layers["fid"]].shape[1]
            if np.shape(mu) != (dim,):
                raise ValueError(f"reference mu has shape {np.shape(mu)} but feature layer {layers['fid']} of "
                                 f"{feature_extractor} gives {dim}-d features")
            results["fid"] = frechet_distance(*feature_statistics(generated_features[layers["fid"]]), mu, sigma)
        else:
            results["fid"] = frechet_distance_from_features(generated_features[layers["fid"]],
                                                            reference_features[layers["fid"]])
    if isc:
        results["inception_score"], results["inception_score_std"] = inception_score(
            generated_features[layers["isc"]], splits=isc_splits)
    if prc:
        results["precision"], results["recall"] = precision_recall(
            generated_features[layers["prc"]], reference_features[layers["prc"]], k=prc_neighborhood,
            device="cuda" if cuda else "cpu", verbose=verbose)
    if kid:
        results["kid"], results["kid_std"] = kernel_inception_distance(
            generated_features[layers["kid"]], reference_features[layers["kid"]], subsets=kid_subsets,
            subset_size=kid_subset_size)
    results["num_generated"] = len(next(iter(generated_features.values())))
    results["num_reference"] = len(next(iter(reference_features.values()))) if reference_features else 0
    results["fid_from_reference_stats"] = bool(fid and reference_stats is not None)
    return results
