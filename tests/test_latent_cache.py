"""Latent cache: uae_gen/scripts/cache_latents.py round trip, statistics estimators, flip choice, errors, two real
ranks."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from uae_gen.data import LatentCacheDataset, LatentStatistics, load_demo_digits
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.scripts import cache_latents

from .file_modes import unreadable_entries

NUM_SAMPLES = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache_args(vae_dir, output_dir, *extra):
    return cache_latents.parse_args(["--vae", str(vae_dir), "--dataset", "demo-digits", "--output_dir", str(output_dir),
                                     "--max_samples", str(NUM_SAMPLES), "--batch_size", "16", "--shard_size", "16",
                                     *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny random-weight UAE and a 3-part cache of the first 40 demo digits written by the script in-process."""
    root = tmp_path_factory.mktemp("latent_cache")
    torch.manual_seed(0)
    vae = AutoencoderUAE.from_preset("tiny").eval()
    vae.save_pretrained(root / "vae")
    summary = cache_latents.main(cache_args(root / "vae", root / "cache"))
    assert summary["num_samples"] == NUM_SAMPLES and summary["num_parts"] == 3
    assert unreadable_entries(root / "cache") == []
    data = load_demo_digits("train", image_size=32)
    return {"root": root, "vae": vae, "images": data.images[:NUM_SAMPLES], "labels": data.labels[:NUM_SAMPLES]}


def test_cached_latents_equal_encodes_and_statistics_are_stored_and_used(cache):
    dataset = LatentCacheDataset(str(cache["root"] / "cache"))
    images, vae = cache["images"], cache["vae"]
    with torch.no_grad():
        raw, raw_flipped = vae.encode_raw(images), vae.encode_raw(images.flip(-1))
    assert len(dataset) == NUM_SAMPLES and dataset.id2label[3] == "digit 3"
    cached = torch.stack([dataset.raw_latent(i) for i in range(NUM_SAMPLES)])
    cached_flipped = torch.stack([dataset.raw_latent(i, flipped=True) for i in range(NUM_SAMPLES)])
    torch.testing.assert_close(cached, raw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached_flipped, raw_flipped, atol=1e-6, rtol=1e-5)
    assert torch.equal(dataset.labels, cache["labels"])

    # The statistics: per element, the exact mean / population variance of the un-flipped set, in the config.
    saved = AutoencoderUAE.from_pretrained(dataset.autoencoder_dir).eval()
    assert saved.config.latents_stats == "per_element" and saved.latents_mean.shape == (64, 8, 8)
    reference = raw.double()
    torch.testing.assert_close(saved.latents_mean, reference.mean(0).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(saved.latents_std, (reference.var(0, unbiased=False) + 1e-5).sqrt().float())

    # ... and used: the dataset's latents are the saved autoencoder's own normalised encodes, ~N(0, 1) per element.
    normalised = torch.stack([dataset[i][0] for i in range(NUM_SAMPLES)])
    with torch.no_grad():
        torch.testing.assert_close(normalised, saved.encode(images).latent, atol=1e-5, rtol=1e-5)
    assert normalised.mean(0).abs().max() < 1e-5
    assert (normalised.std(0, unbiased=False) - 1).abs().max() < 0.01
    assert [dataset[i][1] for i in range(5)] == cache["labels"][:5].tolist()


def test_flip_choice_is_random_per_sample_fixed_per_epoch(cache):
    cache_dir = str(cache["root"] / "cache")
    dataset = LatentCacheDataset(cache_dir, random_flip=True, seed=3)
    flips = [dataset.flips(i) for i in range(NUM_SAMPLES)]
    assert 8 <= sum(flips) <= 32
    again = LatentCacheDataset(cache_dir, random_flip=True, seed=3)  # a fresh dataset, the same seed
    assert flips == [again.flips(i) for i in range(NUM_SAMPLES)]
    normalizer = dataset.normalizer
    for i in (flips.index(True), flips.index(False)):
        expected = normalizer.normalize_latents(dataset.raw_latent(i, flipped=flips[i])[None])[0]
        assert torch.equal(dataset[i][0], expected)
    dataset.set_epoch(1)
    assert [dataset.flips(i) for i in range(NUM_SAMPLES)] != flips
    unflipped = LatentCacheDataset(cache_dir)  # random_flip off: never flipped
    assert not any(unflipped.flips(i) for i in range(NUM_SAMPLES))


@pytest.mark.parametrize("per_channel", [False, True])
def test_exact_statistics_do_not_depend_on_batches_or_ranks(per_channel):
    latents = torch.randn(30, 4, 3, 3, dtype=torch.float64) * torch.arange(1, 5).view(1, 4, 1, 1) + 2
    ranks = []
    for share in (latents[:7], latents[7:]):  # two "ranks" with uneven batches
        stats = LatentStatistics(per_channel=per_channel)
        for batch in share.split(5):
            stats.update(batch)
        ranks.append(stats.state())
    merged = LatentStatistics(per_channel=per_channel)
    merged.merge(ranks)
    mean, std = merged.mean_and_std()
    dims = (0, 2, 3) if per_channel else (0,)
    expected_mean = latents.mean(dims, keepdim=True)[0]
    expected_var = latents.var(dims, unbiased=False, keepdim=True)[0]
    assert mean.shape == ((4, 1, 1) if per_channel else (4, 3, 3))
    torch.testing.assert_close(mean, expected_mean.float())
    torch.testing.assert_close(std, (expected_var + 1e-5).sqrt().float())


def test_running_statistics_follow_the_official_estimator():
    batches = [torch.randn(6, 2, 2, 2, dtype=torch.float64) + k for k in range(3)]
    stats = LatentStatistics(estimator="running")
    for batch in batches:
        stats.update(batch)
    means = [b.mean(0) for b in batches]
    variances = [b.var(0, unbiased=True) for b in batches]
    expected_mean = 0.9 * (0.9 * means[0] + 0.1 * means[1]) + 0.1 * means[2]
    expected_var = 0.9 * (0.9 * variances[0] + 0.1 * variances[1]) + 0.1 * variances[2]
    mean, std = stats.mean_and_std()
    torch.testing.assert_close(mean, expected_mean.float())
    torch.testing.assert_close(std, (expected_var + 1e-5).sqrt().float())

    other = LatentStatistics(estimator="running")
    other.update(batches[0] * 3)
    merged = LatentStatistics(estimator="running")
    merged.merge([stats.state(), other.state()])  # mean of means; var = mean of vars + var of means
    rank_means = torch.stack([expected_mean, means[0] * 3])
    rank_vars = torch.stack([expected_var, variances[0] * 9])
    mean, std = merged.mean_and_std()
    torch.testing.assert_close(mean, rank_means.mean(0).float())
    torch.testing.assert_close(std, (rank_vars.mean(0) + rank_means.var(0, unbiased=False) + 1e-5).sqrt().float())

    with pytest.raises(ValueError, match="estimator"):
        LatentStatistics(estimator="ema")
    with pytest.raises(ValueError, match="no latents"):
        LatentStatistics().mean_and_std()


def test_missing_empty_and_corrupt_caches_are_refused(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentCacheDataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a finished latent cache"):
        LatentCacheDataset(str(tmp_path / "empty"))

    broken = tmp_path / "broken"
    shutil.copytree(cache["root"] / "cache", broken)
    part = broken / "part-r000-00001.safetensors"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"part-r000-00001.safetensors.? is corrupt"):
        LatentCacheDataset(str(broken))
    part.unlink()
    with pytest.raises(FileNotFoundError, match="part-r000-00001.safetensors"):
        LatentCacheDataset(str(broken))
    (broken / "cache_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="cache_info.json is corrupt"):
        LatentCacheDataset(str(broken))

    with pytest.raises(ValueError, match="--overwrite"):
        cache_latents.main(cache_args(cache["root"] / "vae", cache["root"] / "cache"))


def test_two_ranks_each_encode_a_share_and_merge_statistics(cache):
    """ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2: a real 2-rank gloo run."""
    root = cache["root"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "uae_gen.scripts.cache_latents",
               "--vae", str(root / "vae"), "--dataset", "demo-digits", "--output_dir", str(root / "cache2"),
               "--max_samples", str(NUM_SAMPLES), "--batch_size", "16", "--shard_size", "16"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    info = json.loads((root / "cache2" / "cache_info.json").read_text())
    assert [p["file"] for p in info["parts"]] == ["part-r000-00000.safetensors", "part-r000-00001.safetensors",
                                                  "part-r001-00000.safetensors", "part-r001-00001.safetensors"]
    two_ranks, one_rank = LatentCacheDataset(str(root / "cache2")), LatentCacheDataset(str(root / "cache"))
    assert torch.equal(two_ranks.labels, one_rank.labels)
    for i in range(0, NUM_SAMPLES, 7):
        torch.testing.assert_close(two_ranks.raw_latent(i), one_rank.raw_latent(i), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(two_ranks.normalizer.latents_mean, one_rank.normalizer.latents_mean)
    torch.testing.assert_close(two_ranks.normalizer.latents_std, one_rank.normalizer.latents_std)
