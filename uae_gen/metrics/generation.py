"""Generation metrics computed from feature arrays: Fréchet distance (FID), Inception Score, k-NN precision /
recall and KID.

Every formula lives here, on plain arrays, so that the numbers are testable against hand computations and do
not depend on how the features were obtained (`uae_gen.metrics.fidelity` extracts them with torch-fidelity's
feature extractors). Conventions follow the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`):
float64 statistics, `scipy.linalg.sqrtm` for the Fréchet distance, unshuffled IS splits, k = 3 manifolds for
precision / recall. "generated" is always the first argument, "real" the second (torch-fidelity's input1 /
input2).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch
from tqdm.auto import tqdm


def _as_feature_matrix(features, name: str) -> np.ndarray:
    if torch.is_tensor(features):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (num_samples, feature_dim), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or inf")
    return features


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, N-1) of a (N, D) feature array, in float64, as FID uses them."""
    features = _as_feature_matrix(features, "features")
    if len(features) < 2:
        raise ValueError(f"feature statistics need at least 2 samples, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d² = |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)), with `scipy.linalg.sqrtm` as ADM and
    pytorch-fid use it. Like them: a non-finite square root is retried with `eps` added to both diagonals, and the
    tiny imaginary part that sqrtm returns for (near-)singular products is dropped; a large one is an error.
    Note sqrtm on 2048 x 2048 takes tens of seconds on a small CPU.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"sigma1 and sigma2 must be ({dim}, {dim}) to match mu, got {sigma1.shape} and {sigma2.shape}"
        )

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"sqrtm(sigma1 sigma2) is singular; adding {eps} to the covariance diagonals")
        offset = np.eye(dim) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imaginary = np.abs(np.diagonal(covmean).imag).max()
        if largest_imaginary > 1e-3:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component of {largest_imaginary:.3g}")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(generated_features, real_features) -> float:
    """FID between two feature arrays (N1, D) and (N2, D).

    When a set has fewer samples than dimensions (any small evaluation: 2048-d Inception features), the
    covariances are rank-deficient: sqrtm is then slow and numerically poor. The trace term has an exact form
    through the centred features A, B: tr sqrt(sigma1 sigma2) = ||A Bᵀ||_* / sqrt((N1-1)(N2-1)) (the non-zero
    eigenvalues of AᵀA BᵀB are the squared singular values of A Bᵀ), an (N1 x N2) SVD. Otherwise the statistics
    go through `frechet_distance` (sqrtm, as ADM).
    """
    generated = _as_feature_matrix(generated_features, "generated_features")
    real = _as_feature_matrix(real_features, "real_features")
    if generated.shape[1] != real.shape[1]:
        raise ValueError(f"feature dims differ: generated {generated.shape[1]}, real {real.shape[1]}")
    n1, n2, dim = len(generated), len(real), generated.shape[1]
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {n1} generated and {n2} real")
    if min(n1, n2) >= dim:
        return frechet_distance(*feature_statistics(generated), *feature_statistics(real))

    mu1, mu2 = generated.mean(axis=0), real.mean(axis=0)
    centred1, centred2 = generated - mu1, real - mu2
    trace1 = np.sum(centred1**2) / (n1 - 1)
    trace2 = np.sum(centred2**2) / (n2 - 1)
    trace_covmean = np.linalg.svd(centred1 @ centred2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + trace1 + trace2 - 2.0 * trace_covmean)


def inception_score(predictions, splits: int = 10, from_logits: bool = True) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) as (mean, std) over `splits` contiguous, unshuffled splits.

    `predictions` (N, num_classes) are logits (softmax taken here, in float64) or, with `from_logits=False`,
    probabilities. p(y) is the mean prediction of each split. ADM does not shuffle; torch-fidelity does (seeded),
    which moves the std more than the mean.
    """
    predictions = _as_feature_matrix(predictions, "predictions")
    num_samples = len(predictions)
    if not 1 <= splits <= num_samples:
        raise ValueError(f"splits must be between 1 and the number of samples ({num_samples}), got {splits}")
    if from_logits:
        log_probs = torch.from_numpy(predictions).log_softmax(dim=1).numpy()
        probs = np.exp(log_probs)
    else:
        if (predictions < 0).any() or not np.allclose(predictions.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError("with from_logits=False, every row of predictions must be a probability vector")
        probs = predictions

    scores = []
    bounds = [i * num_samples // splits for i in range(splits + 1)]  # torch-fidelity's split boundaries
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = probs[start:stop]
        marginal = part.mean(axis=0, keepdims=True)
        # xlogy gives 0 * log 0 = 0 for classes a sample (or the whole split) never predicts.
        kl = (scipy.special.xlogy(part, part) - scipy.special.xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # |a|² + |b|² - 2 a·b in float64; clamped because rounding can make a zero distance slightly negative.
    return (a.square().sum(1, keepdim=True) + b.square().sum(1)[None, :] - 2.0 * a @ b.T).clamp_min_(0.0)


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int, progress: tqdm) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the same set (the point itself skipped)."""
    radii = []
    for rows in features.split(batch_size):
        # The k+1 smallest per column block, then over the blocks: memory stays (batch x batch).
        candidates = torch.cat(
            [_squared_distances(rows, cols).topk(min(k + 1, len(cols)), dim=1, largest=False).values
             for cols in features.split(batch_size)],
            dim=1,
        )
        # Index k of the sorted k+1 smallest: the self-distance (0) is index 0.
        radii.append(candidates.topk(k + 1, dim=1, largest=False).values[:, k])
        progress.update(len(rows))
    return torch.cat(radii)


def _inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch_size: int,
                     progress: tqdm) -> torch.Tensor:
    """For each query, whether it lies in at least one ball (point, k-NN radius) of the other set."""
    inside = []
    for rows in queries.split(batch_size):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, cols_radii in zip(points.split(batch_size), radii.split(batch_size)):
            hit |= (_squared_distances(rows, cols) <= cols_radii[None, :]).any(dim=1)
        inside.append(hit)
        progress.update(len(rows))
    return torch.cat(inside)


def precision_recall(generated_features, real_features, *, k: int = 3, batch_size: int = 10000,
                     device: str | torch.device | None = None, verbose: bool = False) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds with k = 3 as in ADM.

    Each point's ball has the radius of its k-th nearest neighbour in its own set. Precision is the share of
    generated points inside some real ball; recall the share of real points inside some generated ball.
    Distances are squared Euclidean in float64 (ADM: fp16, same ordering), computed in (batch x batch) blocks.
    """
    generated = torch.from_numpy(_as_feature_matrix(generated_features, "generated_features")).to(device)
    real = torch.from_numpy(_as_feature_matrix(real_features, "real_features")).to(device)
    if generated.shape[1] != real.shape[1]:
        raise ValueError(f"feature dims differ: generated {generated.shape[1]}, real {real.shape[1]}")
    if k < 1 or min(len(generated), len(real)) <= k:
        raise ValueError(
            f"k-NN precision/recall needs k >= 1 and more than k samples per set; got k={k}, "
            f"{len(generated)} generated and {len(real)} real"
        )
    with tqdm(total=2 * (len(generated) + len(real)), desc="precision/recall", unit="samples",
              disable=not verbose, leave=False) as progress:
        real_radii = _kth_neighbour_radii(real, k, batch_size, progress)
        generated_radii = _kth_neighbour_radii(generated, k, batch_size, progress)
        precision = _inside_manifold(generated, real, real_radii, batch_size, progress).double().mean().item()
        recall = _inside_manifold(real, generated, generated_radii, batch_size, progress).double().mean().item()
    return precision, recall


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # KID's kernel (Bińkowski et al. 2018): (x·y / d + 1)³.
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(generated_features, real_features, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """KID: unbiased MMD² with the cubic polynomial kernel, (mean, std) over random subsets (as torch-fidelity).

    Each subset draws `subset_size` samples without replacement from each set (numpy RandomState(seed)).
    """
    generated = _as_feature_matrix(generated_features, "generated_features")
    real = _as_feature_matrix(real_features, "real_features")
    if generated.shape[1] != real.shape[1]:
        raise ValueError(f"feature dims differ: generated {generated.shape[1]}, real {real.shape[1]}")
    if not 2 <= subset_size <= min(len(generated), len(real)):
        raise ValueError(
            f"KID subset_size must be between 2 and the smaller set size ({len(generated)} generated, "
            f"{len(real)} real), got {subset_size}"
        )
    rng = np.random.RandomState(seed)
    m = subset_size
    mmds = []
    for _ in range(subsets):
        x = generated[rng.choice(len(generated), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds.append(within - 2.0 * k_xy.sum() / (m * m))
    return float(np.mean(mmds)), float(np.std(mmds))
