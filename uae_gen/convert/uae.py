"""``uae-v1`` and ``uae-v2``: the official UAE training checkpoints -> ``AutoencoderUAE``.

Both versions store the same encoder (HF DINOv2 under ``encoder.encoder.``) and RAE ViT decoder (``decoder.*``);
they differ only in the frequency module, so one converter serves both:

* ``uae-v1`` (``unified_ae.UnifiedUAE``) -> the v1-compatible mode: hard FFT rings, K x K band-mixing layers
  ``freq_modulator.band_transform.layers.*`` -> ``modulator.mixing.*``, conv fusion ``freq_modulator.denoiser.{0,2}``
  -> ``modulator.spectral_transform.conv_{in,out}``.
* ``uae-v2`` (``src/stage1.UAE``) -> the DCT mode: the frequency module has no weights; set
  ``dct_lowpass_coefficients`` to the config's ``band_split.count`` to low-pass as it does in eval.

The checkpoints are training dicts (``ep-last.pt``, ``final.pt``) holding "ema" and/or "model": EMA weights are
preferred (`select_state_dict`).
"""

from __future__ import annotations

import math
import os
from typing import Optional

from ..models.autoencoder_uae import UAE_PRESETS, AutoencoderUAE
from .checkpoint_io import SourceWeights, build_with_weights, complete_config, read_state_dict_file
from .rae_diffusers import check_decoder_position_table, convert_hf_dinov2, convert_rae_decoder

PATCH_EMBED_KEY = "encoder.encoder.embeddings.patch_embeddings.projection.weight"


def convert_uae_checkpoint(path: str | os.PathLike, version: str,
                           config_overrides: Optional[dict] = None) -> AutoencoderUAE:
    """An official UAE checkpoint (``version`` "v1": ``unified_ae``; "v2": ``src/stage1``) -> ``AutoencoderUAE``."""
    if version not in ("v1", "v2"):
        raise ValueError(f"UAE version must be 'v1' or 'v2', got {version!r}")
    layout = f"uae-{version}"
    overrides = dict(config_overrides or {})
    weights = SourceWeights(read_state_dict_file(path), layout)
    if not weights.has(PATCH_EMBED_KEY):
        raise ValueError(f"{path} is not a {layout} checkpoint: it has no {PATCH_EMBED_KEY!r} (found e.g. "
                         f"{sorted(weights.tensors)[:4]})")
    channels, patch = weights.tensors[PATCH_EMBED_KEY].shape[0], weights.tensors[PATCH_EMBED_KEY].shape[-1]
    if weights.has("decoder.decoder_pos_embed"):  # the official decoder stores its fixed table: it gives the grid
        table = weights.take("decoder.decoder_pos_embed")
        grid = math.isqrt(table.shape[1] - 1)
        check_decoder_position_table(table, grid)
    else:  # the official configs encode at 224
        grid = overrides.get("encoder_input_size", 224) // patch
    config = dict(UAE_PRESETS[f"imagenet256-dinov2-b-{version}"])
    config.update(convert_hf_dinov2(weights, "encoder.encoder.", grid))
    decoder = convert_rae_decoder(weights, "decoder.")
    config.update(image_size=grid * decoder.pop("decoder_patch_size"), **decoder)
    if version == "v1":
        config.update(_convert_v1_modulator(weights, channels))
    else:  # v2's frequency module is a fixed DCT projection: no learned fusion
        config.update(spectral_transform_channels=0)
    weights.check_all_taken()
    config = complete_config(config, overrides, layout)
    return build_with_weights(AutoencoderUAE, config, weights.converted, weights.origin, layout)


def _convert_v1_modulator(weights: SourceWeights, channels: int) -> dict:
    """v1 ``freq_modulator``: K x K band-mixing layers and the conv fusion ("denoiser") -> ``modulator.*``."""
    src = "freq_modulator."
    mix_ids = weights.indices(src + "band_transform.layers.")
    for i in mix_ids:
        weights.move(f"{src}band_transform.layers.{i}.weight", f"modulator.mixing.{i}.weight")
    weights.move_all(src + "denoiser.", "modulator.spectral_transform.", {"0": "conv_in", "2": "conv_out"})
    conv_in = weights.converted["modulator.spectral_transform.conv_in.weight"]
    num_bands, remainder = divmod(conv_in.shape[1], channels)
    if remainder or num_bands < 1:
        raise ValueError(f"{src}denoiser.0.weight takes {conv_in.shape[1]} channels, not a multiple of the latent's "
                         f"{channels}")
    # The released schedule [0.32, 16] (K=2) puts the band edge at 0.02 r_max; other K need their schedule.
    cutoffs = [0.02] if num_bands == 2 else (None if num_bands > 1 else [])
    return dict(num_bands=num_bands, band_mix_layers=len(mix_ids), spectral_transform_channels=conv_in.shape[0],
                band_cutoffs=cutoffs)
