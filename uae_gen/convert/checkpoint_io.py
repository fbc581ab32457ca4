"""What every layout shares: reading checkpoint files safely, handing their tensors out under new names (the
key-map helper), completing and checking the config, building the model, and writing the output directory
atomically."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import init_empty_weights

from ..training.checkpointing import make_readable

STATS_EPS = 1e-5  # official latent normalisation: (z - mean) / sqrt(var + 1e-5)

# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """A safetensors file, or a torch file loaded with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if needed is None:  # not a pickle the weights-only unpickler can parse at all
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            raise ValueError(f"{path} is not a readable torch checkpoint ({reason.group(1) if reason else error})"
                             ) from error
        raise ValueError(
            f"{path} needs unpickling of code ({needed.group(1)}) to load; uae_gen only reads tensors and plain "
            "containers (torch.load(..., weights_only=True)) or safetensors, so it refuses this file. Re-save its "
            "state dict with safetensors where you trust it."
        ) from error
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch checkpoint: {error!r}") from error


def select_state_dict(checkpoint: Any, path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights inside a training checkpoint: "ema" first, then "model" / "state_dict", else the dict itself.
    A DDP ("module.") or torch.compile ("_orig_mod.") prefix shared by every key is removed."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    for key in ("ema", "model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"no state dict in {path}: expected a dict of tensors, or one under 'ema', 'model' or "
                         f"'state_dict'; found keys {sorted(checkpoint)[:8]}")
    state_dict = dict(checkpoint)
    for prefix in ("module.", "_orig_mod."):
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file (see `read_checkpoint_file` and `select_state_dict`)."""
    return select_state_dict(read_checkpoint_file(path), path)


def read_latent_statistics(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``normalization_stats.pt``-style file {"mean", "var"} -> (mean, std) with std = sqrt(var + 1e-5), shaped
    (C, h, w) per element or (C, 1, 1) per channel (leading singleton axes dropped)."""
    stats = read_checkpoint_file(path)
    if not isinstance(stats, Mapping):
        raise ValueError(f"latent statistics file {path} holds a {type(stats).__name__}, not a dict")
    missing = [key for key in ("mean", "var") if not isinstance(stats.get(key), torch.Tensor)]
    if missing:
        raise ValueError(f"latent statistics file {path} is missing tensor(s) {missing}")
    mean, var = stats["mean"].float(), stats["var"].float()
    if mean.shape != var.shape:
        raise ValueError(f"latent statistics in {path}: mean {tuple(mean.shape)} and var {tuple(var.shape)} differ")
    if not torch.isfinite(var).all() or (var + STATS_EPS <= 0).any():
        raise ValueError(f"latent statistics in {path}: var must be finite and > -1e-5")
    return stats_shape(mean), stats_shape(torch.sqrt(var + STATS_EPS))


def stats_shape(stat: torch.Tensor) -> torch.Tensor:
    """Latent statistics as (C, h, w) per element or (C, 1, 1) per channel: leading singleton axes dropped."""
    while stat.ndim > 3 and stat.shape[0] == 1:
        stat = stat[0]
    return stat.reshape(-1, 1, 1) if stat.ndim == 1 else stat


# ---------------------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------------------


class SourceWeights:
    """A checkpoint's tensors, handed out once each by name. Asking for an absent key names it; what is never
    taken is reported as unexpected. `origin` remembers which source key(s) each converted key came from."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], layout: str):
        self.tensors, self.layout = dict(state_dict), layout
        self.taken: set[str] = set()
        self.converted: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"{self.layout} checkpoint is missing key {key!r}")
        self.taken.add(key)
        return self.tensors[key]

    def indices(self, prefix: str) -> range:
        """0..n-1 for keys `prefix<i>.*` (a gap surfaces as a missing key when its tensors are taken)."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = [int(m.group(1)) for key in self.tensors if (m := pattern.match(key))]
        return range(max(found, default=-1) + 1)

    def put(self, target: str, tensor: torch.Tensor, source: str) -> None:
        self.converted[target], self.origin[target] = tensor, source

    def move(self, source: str, target: str) -> torch.Tensor:
        tensor = self.take(source)
        self.put(target, tensor, source)
        return tensor

    def move_all(self, source: str, target: str, names: Mapping[str, str]) -> None:
        """`source<old>.{weight,bias}` -> `target<new>.{weight,bias}` for every (old, new) in `names`."""
        for old, new in names.items():
            for kind in ("weight", "bias"):
                self.move(f"{source}{old}.{kind}", f"{target}{new}.{kind}")

    def fuse(self, sources: tuple[str, ...], target: str) -> None:
        """Separate q, k, v projections -> one fused qkv (timm's layout: rows [q; k; v])."""
        self.put(target, torch.cat([self.take(key) for key in sources]), " + ".join(sources))

    def check_all_taken(self) -> None:
        leftover = sorted(set(self.tensors) - self.taken)
        if leftover:
            more = f" and {len(leftover) - 10} more" if len(leftover) > 10 else ""
            raise ValueError(f"{self.layout} checkpoint has unexpected keys: {leftover[:10]}{more}")


# ---------------------------------------------------------------------------------------------------------
# Building, checking and writing
# ---------------------------------------------------------------------------------------------------------

# Config values that must be known: None in these means "the weights did not say".
_REQUIRED_WHEN_OPEN = ("band_cutoffs", "decoder_num_heads", "num_heads", "head_num_heads", "sample_size")
# How to supply the less obvious ones.
_OVERRIDE_HINTS = {
    "band_cutoffs": "band_cutoffs=[...] (uae_gen.models.bands.cutoffs_from_v1_schedule(v_patch_nums))",
    "sample_size": "sample_size=N (latent side)",
}


def complete_config(config: dict, overrides: Optional[Mapping], layout: str) -> dict:
    """Inferred config + overrides (dict values merged); every value left None must have been overridden."""
    config = dict(config)
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(config.get(key), Mapping):
            value = {**config[key], **value}
        config[key] = value
    open_keys = [key for key, value in config.items() if value is None and key in _REQUIRED_WHEN_OPEN]
    open_keys += [f"{key}.{sub}" for key, value in config.items() if isinstance(value, Mapping)
                  for sub, sub_value in value.items() if sub_value is None]
    if open_keys:
        hints = [_OVERRIDE_HINTS.get(key, f"{key}=N") for key in open_keys]
        raise ValueError(f"{layout}: the weights do not determine {open_keys}; set them with --set "
                         f"(config_overrides): {hints}")
    return config


def build_with_weights(model_class, config: dict, state_dict: dict, origin: dict, layout: str):
    """Build ``model_class(**config)`` without initialising weights, check the converted tensors against it key by
    key and shape by shape (naming the source key), and load them."""
    try:
        with init_empty_weights(include_buffers=False):
            model = model_class(**config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{layout}: the inferred config does not build a {model_class.__name__}: {error}") from error
    expected = model.state_dict()
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    for key in ("latents_mean", "latents_std"):  # set afterwards with set_latent_statistics
        if key in expected and key not in state_dict:
            state_dict[key] = expected[key]
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise ValueError(f"{layout} checkpoint does not provide weights for {missing[:8]}")
    unexpected = [origin.get(key, key) for key in state_dict if key not in expected]
    if unexpected:
        raise ValueError(f"{layout} checkpoint has weights the model does not use: {unexpected[:8]}")
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{layout} checkpoint: {origin.get(key, key)} has shape {tuple(tensor.shape)}, but the "
                             f"model its other weights describe needs {tuple(expected[key].shape)} ({key})")
    model.load_state_dict({k: v.contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def refuse_existing(dst: Path, overwrite: bool) -> None:
    """Refuse a non-empty DST unless `overwrite`."""
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} already exists and is not empty; choose a new directory or pass --overwrite "
                         "(overwrite=True)")


def write_directory(model, dst: Path, overwrite: bool) -> None:
    """save_pretrained into a temporary directory beside DST, then rename it into place."""
    refuse_existing(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        make_readable(str(tmp))
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
