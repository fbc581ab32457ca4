"""Converters from released checkpoints to uae_gen directories (``uae-gen convert --from LAYOUT SRC DST``).

One module per source layout, as diffusers keeps one converter per layout, plus the I/O they share:

* ``rae-diffusers`` (`rae_diffusers`): a diffusers ``AutoencoderRAE`` directory or hub id (config.json +
  safetensors, e.g. ``nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08``) -> ``AutoencoderUAE`` in RAE mode. It also
  holds the HF DINOv2 encoder and RAE ViT decoder key maps that the UAE checkpoints share.
* ``uae-v1`` / ``uae-v2`` (`uae`): the official UAE v1 (``unified_ae.UnifiedUAE``) and v2 (``src/stage1.UAE``)
  training checkpoints -> the v1-compatible mode / the DCT mode. The two differ only in the frequency module, so
  they share one module.
* ``ditdh`` (`ditdh`): RAE / UAE ``DiTwDDTHead`` -> ``UAEDiT``; the config is read off the weight shapes.
* `checkpoint_io`: reading files (safetensors, or ``torch.load(..., weights_only=True)``: a pickle that needs code
  to unpickle is refused), the key-map helper, config completion, building, and the atomic directory write.

Conventions to know when comparing with the original models:

* Images: ``AutoencoderRAE`` and the official code take and return images in [0, 1]; uae_gen uses [-1, 1].
  So ``uae.encode(2 * x - 1).latent == rae.encode(x).latent`` and ``(uae.decode(z).sample + 1) / 2 ==
  rae.decode(z).sample``.
* Latent statistics: a ``normalization_stats.pt`` / ``stat.pt`` file (``--stats``) holds per-element "mean" and
  "var"; the official code normalises with sqrt(var + 1e-5), which becomes ``latents_std``. ``AutoencoderRAE``
  divides by (its std + 1e-5), so its stats convert to ``latents_std = std + 1e-5`` (also when it has none:
  std 1 then means 1 + 1e-5, as in diffusers).

Config values the weights do not determine (attention head counts of unusual widths, the v1 band cut-offs for
K != 2, the v2 low-pass count) come from ``config_overrides`` (``--set KEY=VALUE``); a missing one is named.
Any problem raises one ValueError (or FileNotFoundError) before anything is written; the output is written to a
temporary directory next to DST and renamed into place at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .checkpoint_io import (
    STATS_EPS,
    read_checkpoint_file,
    read_latent_statistics,
    refuse_existing,
    select_state_dict,
    write_directory,
)
from .ditdh import convert_ditdh_checkpoint, convert_ditdh_state_dict, infer_ditdh_config
from .rae_diffusers import check_decoder_position_table, convert_rae_diffusers, resample_hf_position_table
from .uae import convert_uae_checkpoint

LAYOUTS = ("rae-diffusers", "uae-v1", "uae-v2", "ditdh")

__all__ = [
    "LAYOUTS",
    "STATS_EPS",
    "check_decoder_position_table",
    "convert_checkpoint",
    "convert_ditdh_checkpoint",
    "convert_ditdh_state_dict",
    "convert_rae_diffusers",
    "convert_uae_checkpoint",
    "infer_ditdh_config",
    "read_checkpoint_file",
    "read_latent_statistics",
    "resample_hf_position_table",
    "select_state_dict",
]


def convert_checkpoint(
    layout: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    stats: str | os.PathLike | None = None,
    overwrite: bool = False,
    config_overrides: Optional[dict] = None,
):
    """Convert a released checkpoint of `layout` (one of LAYOUTS) at `src` into a directory `dst` that
    ``AutoencoderUAE.from_pretrained`` / ``UAEDiT.from_pretrained`` loads. `stats` is a latent statistics file
    for the autoencoder layouts. Returns the converted model (eval mode). Nothing is written on error."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    dst = Path(dst)
    refuse_existing(dst, overwrite)
    if stats is not None and layout in ("ditdh", "uae-v1"):
        why = ("the DiT has no latent statistics" if layout == "ditdh" else
               "v1 normalises the fused latent while uae_gen normalises the encoder latent, so v1 statistics do not "
               "apply")
        raise ValueError(f"--stats does not apply to {layout}: {why}")
    if layout == "ditdh":
        model = convert_ditdh_checkpoint(src, config_overrides)
    elif layout == "rae-diffusers":
        model = convert_rae_diffusers(src, config_overrides)
    else:
        model = convert_uae_checkpoint(src, layout.removeprefix("uae-"), config_overrides)
    if stats is not None:
        mean, std = read_latent_statistics(stats)
        model.set_latent_statistics(mean, std)
    write_directory(model, dst, overwrite)
    return model
