"""Linear probe: how linearly separable the classes are in a feature space (the paper's check that band 0 of the
UAE latent keeps the encoder's semantics).

Features are pooled to a small grid and flattened (`pooled_features`), standardised with the training split's
mean and std, and a multinomial logistic regression (scikit-learn, L-BFGS) is fitted on the training split and
scored (top-1 accuracy) on the other split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pooled_features(latent_or_bands: torch.Tensor, pool: int = 2) -> torch.Tensor:
    """Adaptive-average-pool a latent (B, C, h, w) or bands (B, K, C, h, w) to (pool x pool) and flatten to
    (B, [K *] C * pool * pool), float32 on the CPU."""
    if not torch.is_tensor(latent_or_bands) or latent_or_bands.ndim not in (4, 5):
        raise ValueError("latent_or_bands must be a (B, C, h, w) latent or (B, K, C, h, w) bands tensor, got "
                         f"{getattr(latent_or_bands, 'shape', type(latent_or_bands))}")
    if pool < 1:
        raise ValueError(f"pool must be at least 1, got {pool}")
    grid = latent_or_bands.flatten(0, 1) if latent_or_bands.ndim == 5 else latent_or_bands
    pooled = F.adaptive_avg_pool2d(grid.detach().float(), pool)
    return pooled.reshape(latent_or_bands.shape[0], -1).cpu()


def _as_array(values, name: str, ndim: int) -> np.ndarray:
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, max_iter: int = 1000,
                          regularization: float = 1.0) -> float:
    """Top-1 accuracy on the test split of a logistic regression trained on the train split.

    Features (N, D) are standardised with the train split's statistics (constant dimensions left at 0).
    `regularization` is scikit-learn's C (inverse L2 strength).
    """
    from sklearn.linear_model import LogisticRegression

    train_x = _as_array(train_features, "train_features", 2).astype(np.float64)
    test_x = _as_array(test_features, "test_features", 2).astype(np.float64)
    train_y = _as_array(train_labels, "train_labels", 1)
    test_y = _as_array(test_labels, "test_labels", 1)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature dims differ: train {train_x.shape[1]}, test {test_x.shape[1]}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"test {len(test_x)} vs {len(test_y)}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("the train split needs at least two classes")
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std[std == 0] = 1.0
    classifier = LogisticRegression(max_iter=max_iter, C=regularization)
    classifier.fit((train_x - mean) / std, train_y)
    return float((classifier.predict((test_x - mean) / std) == test_y).mean())
