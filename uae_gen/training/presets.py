"""Preset JSON files of the training scripts: found by path or by name in uae_gen/configs."""

import json
import os


def read_preset(config: str, config_dir: str, prefix: str) -> dict:
    """The JSON of ``config``: a path, a file name in ``config_dir``, or a short name (``tiny`` ->
    ``{prefix}tiny.json``). A missing path whose file name is a shipped preset (the old
    ``train/configs/NAME.json``) reads that preset. Keys starting with "_" are comments and are dropped."""
    name = os.path.basename(config)
    candidates = [config, os.path.join(config_dir, name), os.path.join(config_dir, f"{name}.json"),
                  os.path.join(config_dir, f"{prefix}{name}.json")]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise FileNotFoundError(f"config {config!r} not found; presets in {config_dir}: {sorted(os.listdir(config_dir))}")
    with open(path) as file:
        return {k: v for k, v in json.load(file).items() if not k.startswith("_")}
