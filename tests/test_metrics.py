"""Tests for uae_gen.metrics: metric formulas against hand / numpy / scipy / skimage computations, ADM npz I/O,
and the torch-fidelity glue with a tiny registered feature extractor (fast; the Inception end-to-end run lives in
test_evaluate_generation.py)."""

import numpy as np
import pytest
import scipy.linalg
import skimage.metrics
import torch
import torch.nn.functional as F
from PIL import Image
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from uae_gen.metrics import (
    compute_generation_metrics,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    images_to_uint8,
    inception_score,
    kernel_inception_distance,
    load_samples_npz,
    precision_recall,
    psnr,
    register_feature_extractor,
    save_samples_npz,
    ssim,
)


def random_features(n, dim, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


def reference_fid(a, b):
    """The textbook computation, written out: float64 stats, scipy sqrtm, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- FID


def test_fid_of_a_set_against_itself_is_zero():
    features = random_features(300, 16, seed=0)
    assert abs(frechet_distance_from_features(features, features)) < 1e-6
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    few = random_features(10, 64, seed=1)  # rank-deficient covariance: the nuclear-norm path
    assert abs(frechet_distance_from_features(few, few)) < 1e-6


@pytest.mark.parametrize("n1, n2, dim", [(400, 300, 16), (12, 15, 40)])
def test_fid_matches_scipy_reference(n1, n2, dim):
    a = random_features(n1, dim, seed=2)
    b = random_features(n2, dim, seed=3, shift=0.5)
    expected = reference_fid(a, b)
    assert expected > 1.0
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) == pytest.approx(expected, rel=1e-4)
    # torch-fidelity's eigenvalue formula on the same statistics agrees too.
    stats = [dict(zip(("mu", "sigma"), feature_statistics(x))) for x in (a, b)]
    assert fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"] == pytest.approx(
        expected, rel=1e-4)


def test_fid_of_two_known_gaussians():
    # N(0, I) vs N(m, 4 I) in d dims: |m|² + d (1 + 4 - 2 * 2) = |m|² + d.
    dim, m = 5, np.arange(5.0)
    value = frechet_distance(np.zeros(dim), np.eye(dim), m, 4 * np.eye(dim))
    assert value == pytest.approx(m @ m + dim, rel=1e-10)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance_from_features(np.zeros((5, 3)), np.zeros((5, 4)))


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_matches_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(30, 7)) * 3
    splits = 3
    expected_scores = []
    for part in np.split(logits, splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        expected_scores.append(np.exp(np.mean([np.sum(row * np.log(row / py)) for row in p])))
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.mean(expected_scores), rel=1e-10)
    assert std == pytest.approx(np.std(expected_scores), rel=1e-8)
    # Same as torch-fidelity's implementation without its shuffle.
    reference = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-10)


def test_inception_score_known_cases():
    uniform = np.full((20, 10), 0.1)
    assert inception_score(uniform, splits=1, from_logits=False)[0] == pytest.approx(1.0)
    one_hot = np.eye(10)
    assert inception_score(one_hot, splits=1, from_logits=False)[0] == pytest.approx(10.0)
    # Confident distinct logits approach the same limit.
    assert inception_score(np.eye(10) * 50, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match="splits"):
        inception_score(one_hot, splits=11, from_logits=False)


# ----------------------------------------------------------------------------- precision / recall


def brute_force_precision_recall(generated, real, k=3):
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def coverage(queries, points, points_radii):
        d = np.sqrt(((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1))
        return np.mean([(d[i] <= points_radii).any() for i in range(len(queries))])

    return coverage(generated, real, radii(real)), coverage(real, generated, radii(generated))


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(40, 6))
    generated = rng.normal(size=(50, 6)) * 1.5 + 0.4
    expected = brute_force_precision_recall(generated, real)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a case that can fail both ways
    # Small blocks exercise the blockwise top-k and coverage paths.
    for batch_size in (7, 10000):
        precision, recall = precision_recall(generated, real, batch_size=batch_size)
        assert (precision, recall) == pytest.approx(expected, abs=1e-12)
    tf_precision, tf_recall = calculate_precision_recall_full(
        torch.from_numpy(generated).float(), torch.from_numpy(real).float(), neighborhood=3)
    assert (precision, recall) == pytest.approx((tf_precision, tf_recall), abs=1e-6)  # theirs: float32 mean


def test_precision_recall_known_cases():
    rng = np.random.default_rng(6)
    points = rng.normal(size=(30, 8))
    assert precision_recall(points, points.copy()) == (1.0, 1.0)
    assert precision_recall(points + 1000.0, points) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than k samples"):
        precision_recall(points[:3], points)


# ----------------------------------------------------------------------------- KID


def test_kid_matches_unbiased_mmd_formula():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 0.7

    def kernel(a, b):
        return (a @ b.T / 5 + 1) ** 3

    m = 20
    expected = ((kernel(x, x).sum() - np.trace(kernel(x, x))) / (m * (m - 1))
                + (kernel(y, y).sum() - np.trace(kernel(y, y))) / (m * (m - 1))
                - 2 * kernel(x, y).mean())
    # One subset of the full size is the whole sets (MMD does not depend on the order).
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=m)
    assert mean == pytest.approx(expected, rel=1e-10) and std == 0.0
    assert expected > 0.1
    # Same distribution -> near 0 (unbiased: either sign), far below a shifted distribution.
    a, b, c = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) + 0.7
    same, _ = kernel_inception_distance(a, b, subsets=10, subset_size=100)
    shifted, _ = kernel_inception_distance(a, c, subsets=10, subset_size=100)
    assert abs(same) < 0.05 * shifted
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(x, y, subset_size=21)


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_of_constant_offset():
    generator = torch.Generator().manual_seed(0)
    reference = (torch.randint(20, 200, (2, 3, 16, 16), generator=generator).float()) / 255
    offset = torch.tensor([5.0, 10.0]).view(2, 1, 1, 1) / 255
    values = psnr(reference + offset, reference)
    expected = 20 * torch.log10(1 / (torch.tensor([5.0, 10.0]) / 255))
    assert torch.allclose(values, expected, atol=1e-4)
    # Quantisation: an offset of 0.3 grey levels rounds away; without quantising it does not.
    assert torch.isinf(psnr(reference + 0.3 / 255, reference)).all()
    assert torch.allclose(psnr(reference + 0.3 / 255, reference, quantize=False),
                          torch.full((2,), 20 * np.log10(255 / 0.3)), atol=1e-2)


def test_ssim_identity_noise_and_skimage():
    generator = torch.Generator().manual_seed(1)
    clean = F.avg_pool2d(torch.rand(2, 3, 36, 36, generator=generator), 3, 1)  # (2, 3, 34, 34), smooth
    assert torch.allclose(ssim(clean, clean), torch.ones(2))
    values = [ssim((clean + s * torch.randn(clean.shape, generator=generator)).clamp(0, 1), clean).mean().item()
              for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]

    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=generator)).clamp(0, 1).double()
    ours = ssim(noisy, clean.double(), quantize=False)
    for i in range(2):
        expected = skimage.metrics.structural_similarity(
            noisy[i].permute(1, 2, 0).numpy(), clean[i].double().permute(1, 2, 0).numpy(), channel_axis=2,
            data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(clean[..., :8, :8], clean[..., :8, :8])


# ----------------------------------------------------------------------------- npz


def test_images_to_uint8_rounds():
    images = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 1.0, 1.2, -0.1]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = images_to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 1, 255, 255, 0]
    assert images_to_uint8(images * 2 - 1, value_range=(-1, 1)).tolist() == out.tolist()
    assert images_to_uint8(images.permute(0, 2, 3, 1).numpy()).tolist() == out.tolist()


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = save_samples_npz(tmp_path / "sub" / "samples.npz", images, labels)
    assert sorted(p.name for p in path.parent.iterdir()) == ["samples.npz"]  # no temp file left behind
    loaded = load_samples_npz(path)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (5, 8, 6, 3)
    assert np.array_equal(loaded.images, images) and np.array_equal(loaded.labels, labels)
    assert loaded.mu is None and loaded.sigma is None
    assert load_samples_npz(save_samples_npz(tmp_path / "nolabels.npz", images)).labels is None
    with pytest.raises(ValueError, match="uint8"):
        save_samples_npz(tmp_path / "bad.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        save_samples_npz(tmp_path / "bad.npz", images, labels[:2])
    with pytest.raises(FileNotFoundError):
        load_samples_npz(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- torch-fidelity glue


class TinyColourExtractor(FeatureExtractorBase):
    """A cheap deterministic feature extractor: 4x4 pooled colours (48-d) and 5 'class' logits."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        projection = torch.randn(48, 5, generator=torch.Generator().manual_seed(0))
        self.register_buffer("projection", projection)

    @staticmethod
    def get_provided_features_list():
        return "pooled", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pooled", "kid": "pooled", "prc": "pooled"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        features = {"pooled": pooled, "logits": 4 * pooled @ self.projection}
        return tuple(features[name] for name in self.features_list)


@pytest.fixture(scope="module")
def tiny_extractor():
    register_feature_extractor("uae-gen-test-tiny", TinyColourExtractor)
    register_feature_extractor("uae-gen-test-tiny", TinyColourExtractor)  # idempotent
    with pytest.raises(ValueError, match="already taken"):
        register_feature_extractor("uae-gen-test-tiny", FeatureExtractorBase)
    return "uae-gen-test-tiny"


def random_uint8_images(n, seed, brightness=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=generator) * 255 * brightness).to(torch.uint8)


def test_generation_metrics_equal_features_computed_by_hand(tiny_extractor, tmp_path):
    generated, real = random_uint8_images(24, seed=0, brightness=0.8), random_uint8_images(30, seed=1)
    # The generated set as PNG files, the reference as an ADM npz: both go through the same features.
    folder = tmp_path / "generated"
    folder.mkdir()
    for i, image in enumerate(generated.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    reference_npz = save_samples_npz(tmp_path / "reference.npz", real.permute(0, 2, 3, 1).numpy())

    results = compute_generation_metrics(folder, reference_npz, kid=True, feature_extractor=tiny_extractor,
                                         isc_splits=3, kid_subsets=5, kid_subset_size=20, verbose=False)

    extractor = TinyColourExtractor(tiny_extractor, ["pooled", "logits"])
    gen_pooled, gen_logits = (t.numpy() for t in extractor(generated))
    real_pooled, _ = (t.numpy() for t in extractor(real))
    assert results["fid"] == pytest.approx(reference_fid(gen_pooled.astype(np.float64), real_pooled), rel=1e-4)
    assert results["fid"] > 0.01
    assert results["inception_score"] == pytest.approx(inception_score(gen_logits, splits=3)[0], rel=1e-6)
    assert (results["precision"], results["recall"]) == pytest.approx(
        brute_force_precision_recall(gen_pooled.astype(np.float64), real_pooled.astype(np.float64)), abs=1e-12)
    assert results["kid"] == pytest.approx(
        kernel_inception_distance(gen_pooled, real_pooled, subsets=5, subset_size=20)[0], rel=1e-6)
    assert results["num_generated"] == 24 and results["num_reference"] == 30
    assert results["fid_from_reference_stats"] is False
    # FID alone against an npz without statistics still reads its images.
    fid_only = compute_generation_metrics(folder, reference_npz, isc=False, prc=False,
                                          feature_extractor=tiny_extractor, verbose=False)
    assert fid_only["fid"] == pytest.approx(results["fid"], rel=1e-10) and fid_only["num_reference"] == 30


def test_reference_stats_npz_drives_fid(tiny_extractor, tmp_path):
    generated, real = random_uint8_images(20, seed=2, brightness=0.7), random_uint8_images(20, seed=3)
    # Statistics of a different (larger) set than the stored images, as in an ADM reference batch.
    stats_source = random_uint8_images(64, seed=4)
    extractor = TinyColourExtractor(tiny_extractor, ["pooled"])
    mu, sigma = feature_statistics(extractor(stats_source)[0].numpy())
    path = tmp_path / "ref_with_stats.npz"
    np.savez(path, arr_0=real.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma)

    results = compute_generation_metrics(generated, path, isc=False, feature_extractor=tiny_extractor,
                                         verbose=False)
    gen_pooled = extractor(generated)[0].numpy()
    assert results["fid_from_reference_stats"] is True
    assert results["fid"] == pytest.approx(frechet_distance(*feature_statistics(gen_pooled), mu, sigma), rel=1e-8)
    assert results["precision"] == pytest.approx(
        precision_recall(gen_pooled, extractor(real)[0].numpy())[0], abs=1e-12)

    # FID alone needs no reference images: a statistics-only npz is enough.
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    fid_only = compute_generation_metrics(generated, tmp_path / "stats_only.npz", isc=False, prc=False,
                                          feature_extractor=tiny_extractor, verbose=False)
    assert fid_only["fid"] == pytest.approx(results["fid"], rel=1e-10) and fid_only["num_reference"] == 0
    with pytest.raises(ValueError, match="no images"):
        compute_generation_metrics(generated, tmp_path / "stats_only.npz", feature_extractor=tiny_extractor,
                                   verbose=False)
    with pytest.raises(ValueError, match="reference mu has shape"):
        compute_generation_metrics(generated, reference_stats=(mu[:3], sigma[:3, :3]), isc=False, prc=False,
                                   feature_extractor=tiny_extractor, verbose=False)


def test_glue_rejects_bad_inputs(tiny_extractor, tmp_path):
    images = random_uint8_images(6, seed=5)
    with pytest.raises(ValueError, match="need reference images"):
        compute_generation_metrics(images, None, feature_extractor=tiny_extractor, verbose=False)
    with pytest.raises(ValueError, match="not registered"):
        compute_generation_metrics(images, images, feature_extractor="no-such-extractor", verbose=False)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(images.float(), ["pooled"], feature_extractor=tiny_extractor, verbose=False)
    with pytest.raises(ValueError, match="no png"):
        extract_features(tmp_path, ["pooled"], feature_extractor=tiny_extractor, verbose=False)
    with pytest.raises(FileNotFoundError):
        extract_features(tmp_path / "missing.npz", ["pooled"], feature_extractor=tiny_extractor, verbose=False)
    with pytest.raises(FileNotFoundError, match="weights"):
        extract_features(images, ["pooled"], feature_extractor=tiny_extractor,
                         feature_extractor_weights_path=tmp_path / "none.pth", verbose=False)
