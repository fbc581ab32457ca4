"""Preset JSON files of the training scripts (uae_gen/configs) and the argparse merge: preset keys become flag
defaults, flags typed on the command line win."""

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def read_preset(config: str, prefix: str, config_dir: str = CONFIG_DIR) -> dict:
    """The JSON of ``config``: a path, a file name in ``config_dir``, or a short name (``tiny`` ->
    ``{prefix}tiny.json``). A missing path whose file name is a shipped preset (the old
    ``train/configs/NAME.json``) reads that preset. Keys starting with "_" are comments and are dropped."""
    name = os.path.basename(config)
    candidates = [config, os.path.join(config_dir, name), os.path.join(config_dir, f"{name}.json"),
                  os.path.join(config_dir, f"{prefix}{name}.json")]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise FileNotFoundError(f"config {config!r} not found; presets in {config_dir}: "
                                f"{sorted(os.listdir(config_dir))}")
    with open(path) as file:
        return {k: v for k, v in json.load(file).items() if not k.startswith("_")}


def parse_args_with_preset(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                           load_preset: Callable[[argparse.Namespace], dict],
                           forbidden: Sequence[str] = ()) -> argparse.Namespace:
    """Parse argv; with --config, parse again with ``load_preset(args)`` as flag defaults (the command line wins).

    A preset key that is no flag, is ``config`` or is in ``forbidden`` raises ValueError naming it, and so does a
    string value the flag would refuse on the command line (a choice or type it does not accept)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    if not args.config:
        return args
    preset = load_preset(args)
    bad = sorted(key for key in preset if key not in vars(args) or key in ("config", *forbidden))
    if bad:
        raise ValueError(f"config {args.config!r} sets unknown or forbidden keys {bad}")
    # argparse checks choices only on typed values: type the preset's strings to a non-exiting copy of the parser.
    strict = argparse.ArgumentParser(parents=[parser], add_help=False, exit_on_error=False)
    try:
        strict.parse_known_args(argv + [token for key, value in preset.items() if isinstance(value, str)
                                        for token in (f"--{key}", value)])
    except argparse.ArgumentError as error:
        raise ValueError(f"config {args.config!r}: {error}") from None
    parser.set_defaults(**preset)
    return parser.parse_args(argv)
