"""Latent cache: a data set encoded once by a frozen AutoencoderUAE, read back as normalised latents.

Layout of a cache folder (written by `train/cache_latents.py`, one writer per rank):

    cache_dir/
      part-r000-00000.safetensors   latents (N, C, h, w) raw, latents_flipped (N, C, h, w) of the mirrored
      ...                           image, labels (N,) int64; at most `shard_size` samples per part
      autoencoder/                  the AutoencoderUAE (config + weights) with the data set's latent statistics
      cache_info.json               written last: parts in data-set order, latent shape, dtype, id2label

Every file is written to a temporary name and renamed into place, and `cache_info.json` goes in last, so a
folder without it is an unfinished cache and is refused.

The cache stores RAW latents (`encode_raw` in eval mode: no noise, the configured low-pass applied).
Normalisation lives in one place, `AutoencoderUAE.normalize_latents`: `LatentCacheDataset` calls it on the
cached autoencoder, built on the meta device with only its two statistics buffers loaded (the encoder and
decoder weights, gigabytes for the ImageNet model, are never read).

Latent statistics (`LatentStatistics`), per element (C, h, w) like the official stats or per channel (C, 1, 1):
- "exact" (default): the mean and population variance over the whole cached set, accumulated in float64
  with Chan's pairwise update per batch and merged across ranks the same way. It is deterministic and does not
  depend on batch size, order or the number of ranks.
- "running": the official estimator (method.md 1.6), BatchNorm-style running mean / variance with momentum
  0.1 over batches (unbiased batch variance, started from the first batch instead of BN's 0 / 1 so that small
  sets are not biased), merged across ranks as mean of means and var = mean of vars + var of means. It weights
  the last ~10 batches most, so it depends on the order of the data.
We default to "exact" because a cache pass sees the whole set anyway, so the running average's only effect
would be noise (the RAE README reports an L1 difference of 0.008 between two runs of it).
Statistics are computed on the un-flipped latents, as the official script does on centre crops.
"""

import bisect
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..models.autoencoder_uae import AutoencoderUAE
from ..training.checkpointing import make_readable

CACHE_INFO = "cache_info.json"
CACHE_AUTOENCODER = "autoencoder"
CACHE_FORMAT_VERSION = 1
STATS_ESTIMATORS = ("exact", "running")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LATENT_STD_EPS = 1e-5  # std = sqrt(var + eps), as the official normalisation


def _write_json_atomically(payload: dict, path: str) -> None:
    temp_path = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    with open(temp_path, "w") as file:
        json.dump(payload, file, indent=2)
    os.replace(temp_path, path)


class LatentStatistics:
    """Accumulates the data-set mean and variance of raw latents (B, C, h, w); see the module docstring.

    Call `update` per batch on each rank, exchange `state()` between ranks and `merge` the list (the same on
    every rank, in rank order), then read `mean_and_std()`.
    """

    def __init__(self, per_channel: bool = False, estimator: str = "exact", momentum: float = 0.1):
        if estimator not in STATS_ESTIMATORS:
            raise ValueError(f"stats estimator must be one of {STATS_ESTIMATORS}, got {estimator!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.per_channel = per_channel
        self.estimator = estimator
        self.momentum = momentum
        self.count = 0  # exact: samples per statistic; running: batches seen
        self.mean: Optional[torch.Tensor] = None
        self.spread: Optional[torch.Tensor] = None  # exact: sum of squared deviations (M2); running: variance

    def _reduce_dims(self, latents: torch.Tensor) -> tuple:
        return (0, 2, 3) if self.per_channel else (0,)

    @torch.no_grad()
    def update(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4:
            raise ValueError(f"expected latents (B, C, h, w), got shape {tuple(latents.shape)}")
        latents = latents.detach().double().cpu()
        dims = self._reduce_dims(latents)
        batch_mean = latents.mean(dims, keepdim=True)[0]
        if self.estimator == "exact":
            batch_count = latents.numel() // batch_mean.numel()
            batch_m2 = (latents - batch_mean).pow(2).sum(dims, keepdim=True)[0]
            self._merge_exact(batch_count, batch_mean, batch_m2)
            return
        batch_var = latents.var(dims, unbiased=True, keepdim=True)[0]
        if self.count == 0:
            self.mean, self.spread = batch_mean, batch_var
        else:
            self.mean = (1 - self.momentum) * self.mean + self.momentum * batch_mean
            self.spread = (1 - self.momentum) * self.spread + self.momentum * batch_var
        self.count += 1

    def _merge_exact(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        # Chan et al.: combine (count, mean, M2) of two disjoint sets without losing precision.
        if count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.spread = count, mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.spread = self.spread + m2 + delta.pow(2) * (self.count * count / total)
        self.count = total

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "spread": self.spread}

    def merge(self, states: Sequence[dict]) -> None:
        """Replace this accumulator by the combination of per-rank `state()`s (including this rank's)."""
        states = [s for s in states if s["count"] > 0]
        self.count, self.mean, self.spread = 0, None, None
        if not states:
            return
        if self.estimator == "exact":
            for s in states:
                self._merge_exact(s["count"], s["mean"], s["spread"])
            return
        means = torch.stack([s["mean"] for s in states])
        variances = torch.stack([s["spread"] for s in states])
        self.mean = means.mean(0)
        self.spread = variances.mean(0) + means.var(0, unbiased=False)
        self.count = sum(s["count"] for s in states)

    def mean_and_std(self, eps: float = LATENT_STD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, sqrt(var + eps)) as float32, shaped (C, h, w) or (C, 1, 1): what `set_latent_statistics` takes."""
        if self.count == 0:
            raise ValueError("no latents were accumulated: the data set (or this rank's share of it) is empty")
        variance = self.spread / self.count if self.estimator == "exact" else self.spread
        return self.mean.float(), (variance + eps).sqrt().float()


class LatentCacheWriter:
    """Writes one rank's latents into parts of at most `shard_size` samples; `close()` returns their entries."""

    def __init__(self, cache_dir: str, rank: int, shard_size: int = 4096, dtype: str = "float32"):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        os.makedirs(cache_dir, exist_ok=True)
        self.cache_dir = cache_dir
        self.rank = rank
        self.shard_size = shard_size
        self.dtype = STORAGE_DTYPES[dtype]
        self.parts: list[dict] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_count = 0

    def add(self, latents: torch.Tensor, latents_flipped: torch.Tensor, labels: torch.Tensor) -> None:
        if latents.shape != latents_flipped.shape or latents.shape[0] != labels.shape[0]:
            raise ValueError(
                f"latents {tuple(latents.shape)}, flipped latents {tuple(latents_flipped.shape)} and labels "
                f"{tuple(labels.shape)} must agree"
            )
        self._pending.append((latents.detach().cpu(), latents_flipped.detach().cpu(), labels.detach().cpu()))
        self._pending_count += latents.shape[0]
        while self._pending_count >= self.shard_size:
            self._write_part(self.shard_size)

    def _write_part(self, count: int) -> None:
        latents, flipped, labels = (torch.cat(parts) for parts in zip(*self._pending))
        rest = (latents[count:], flipped[count:], labels[count:])
        self._pending = [rest] if rest[0].shape[0] else []
        self._pending_count = rest[0].shape[0]
        name = f"part-r{self.rank:03d}-{len(self.parts):05d}.safetensors"
        tensors = {
            "latents": latents[:count].to(self.dtype).contiguous(),
            "latents_flipped": flipped[:count].to(self.dtype).contiguous(),
            "labels": labels[:count].long().contiguous(),
        }
        temp_path = os.path.join(self.cache_dir, ".tmp-" + name)
        save_file(tensors, temp_path)
        make_readable(temp_path)
        os.replace(temp_path, os.path.join(self.cache_dir, name))
        self.parts.append({"file": name, "num_samples": count})

    def close(self) -> list[dict]:
        if self._pending_count:
            self._write_part(self._pending_count)
        return self.parts


def remove_cache_files(cache_dir: str) -> None:
    """Delete a previous cache's info file and parts in cache_dir (info first, so it is never half-valid)."""
    if not os.path.isdir(cache_dir):
        return
    info = os.path.join(cache_dir, CACHE_INFO)
    if os.path.exists(info):
        os.remove(info)
    for entry in os.scandir(cache_dir):
        if entry.name.endswith(".safetensors") and (entry.name.startswith("part-") or entry.name.startswith(".tmp-")):
            os.remove(entry.path)


def finalize_latent_cache(
    cache_dir: str,
    parts: Sequence[dict],
    autoencoder: AutoencoderUAE,
    mean: torch.Tensor,
    std: torch.Tensor,
    id2label: dict,
    estimator: str,
    dtype: str,
) -> None:
    """Install the statistics into the autoencoder, save it as cache_dir/autoencoder, then write cache_info.json.

    parts: every rank's `LatentCacheWriter.close()` entries, in data-set order.
    """
    autoencoder.set_latent_statistics(mean, std)
    autoencoder.save_pretrained(os.path.join(cache_dir, CACHE_AUTOENCODER))
    make_readable(os.path.join(cache_dir, CACHE_AUTOENCODER))
    info = {
        "format_version": CACHE_FORMAT_VERSION,
        "num_samples": sum(part["num_samples"] for part in parts),
        "latent_shape": [autoencoder.latent_channels, *autoencoder.latent_size],
        "dtype": dtype,
        "latents_stats": autoencoder.config.latents_stats,
        "stats_estimator": estimator,
        "id2label": {str(k): v for k, v in id2label.items()},
        "autoencoder": CACHE_AUTOENCODER,
        "parts": list(parts),
    }
    _write_json_atomically(info, os.path.join(cache_dir, CACHE_INFO))


def load_latent_normalizer(autoencoder_dir: str) -> AutoencoderUAE:
    """The AutoencoderUAE saved in autoencoder_dir with ONLY its latent statistics loaded (the rest on the meta
    device): enough to call its `normalize_latents` / `denormalize_latents`, and cheap for any model size."""
    config = AutoencoderUAE.load_config(autoencoder_dir)
    with torch.device("meta"):
        autoencoder = AutoencoderUAE.from_config(config)
    statistics = {}
    for name in sorted(os.listdir(autoencoder_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(autoencoder_dir, name), framework="pt") as file:
                statistics.update({key: file.get_tensor(key) for key in file.keys() if key.startswith("latents_")})
    if set(statistics) != {"latents_mean", "latents_std"}:
        raise ValueError(f"{autoencoder_dir!r} holds no latents_mean / latents_std weights")
    autoencoder.load_state_dict(statistics, strict=False, assign=True)
    return autoencoder.eval()


class LatentCacheDataset(Dataset):
    """(normalised latent (C, h, w) float32, label) pairs from a latent cache folder.

    random_flip: return the latent of the mirrored image for about half of the samples. The choice is a fixed
        function of (seed, epoch, index), so it needs no RNG state and a resumed run makes the same choices;
        accelerate's `set_epoch` on the prepared loader reaches `set_epoch` here.
    """

    def __init__(self, cache_dir: str, random_flip: bool = False, seed: int = 0):
        if not os.path.exists(cache_dir):
            raise FileNotFoundError(f"latent cache {cache_dir!r} does not exist")
        info_path = os.path.join(cache_dir, CACHE_INFO)
        if not os.path.isfile(info_path):
            raise ValueError(
                f"{cache_dir!r} is not a finished latent cache: it has no {CACHE_INFO} (empty, or the caching run "
                "did not complete; rerun train/cache_latents.py)"
            )
        try:
            with open(info_path) as file:
                info = json.load(file)
            parts = info["parts"]
            self.latent_shape = tuple(info["latent_shape"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"latent cache {cache_dir!r}: {CACHE_INFO} is corrupt ({error})") from error
        if info.get("num_samples", 0) < 1 or not parts:
            raise ValueError(f"latent cache {cache_dir!r} holds no samples")
        self.cache_dir = cache_dir
        self.info = info
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.id2label = {int(k): v for k, v in info["id2label"].items()}
        self.autoencoder_dir = os.path.join(cache_dir, info["autoencoder"])
        self.normalizer = load_latent_normalizer(self.autoencoder_dir)

        self.files = [os.path.join(cache_dir, part["file"]) for part in parts]
        self.labels = torch.cat([self._check_part(path, part["num_samples"]) for path, part in zip(self.files, parts)])
        self.part_starts = np.cumsum([0] + [part["num_samples"] for part in parts]).tolist()
        self._handles: dict = {}
        self._handles_pid: Optional[int] = None

    def _check_part(self, path: str, num_samples: int) -> torch.Tensor:
        """Open a part's header, check its shapes, and return its labels."""
        expected = (num_samples, *self.latent_shape)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"latent cache part {path!r} is missing")
        try:
            with safe_open(path, framework="pt") as file:
                shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
                labels = file.get_tensor("labels") if "labels" in shapes else None
        except (SafetensorError, OSError) as error:
            raise ValueError(f"latent cache part {path!r} is corrupt: {error}") from error
        if shapes.get("latents") != expected or shapes.get("latents_flipped") != expected or labels is None \
                or tuple(labels.shape) != (num_samples,):
            raise ValueError(f"latent cache part {path!r} is corrupt: tensor shapes {shapes}, expected {expected}")
        return labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_classes(self) -> int:
        return len(self.id2label)

    def __len__(self) -> int:
        return self.part_starts[-1]

    def _handle(self, part: int):
        # safetensors handles are memory maps: open lazily, once per process (DataLoader workers fork).
        if self._handles_pid != os.getpid():
            self._handles, self._handles_pid = {}, os.getpid()
        if part not in self._handles:
            self._handles[part] = safe_open(self.files[part], framework="pt")
        return self._handles[part]

    def flips(self, index: int) -> bool:
        """Whether sample `index` is served mirrored in the current epoch."""
        if not self.random_flip:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)

    def raw_latent(self, index: int, flipped: bool = False) -> torch.Tensor:
        """The stored (un-normalised) latent of sample `index`, as float32."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} samples")
        part = bisect.bisect_right(self.part_starts, index) - 1
        row = index - self.part_starts[part]
        key = "latents_flipped" if flipped else "latents"
        return self._handle(part).get_slice(key)[row : row + 1][0].float()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        latent = self.raw_latent(index, self.flips(index))
        return self.normalizer.normalize_latents(latent[None])[0], int(self.labels[index])
