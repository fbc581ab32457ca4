"""``rae-diffusers``: a diffusers ``AutoencoderRAE`` directory or hub id -> ``AutoencoderUAE`` in RAE mode.

RAE mode: one band, no spectral transform (``spectral_transform_channels=0``), RAE's token noise as
``latent_noise_tau``. The HF transformers DINOv2-with-registers encoder maps onto timm's ``vit_*_patch14_reg4_dinov2``:
q/k/v are fused, the class token absorbs its position embedding (timm adds none to prefix tokens), and the 37x37
position table is resampled to the latent grid once, exactly as transformers does at every forward (bicubic,
antialiased, fp32). The RAE ViT decoder keeps its layout. The official UAE checkpoints hold the same encoder and
decoder, so `convert_hf_dinov2` and `convert_rae_decoder` serve the ``uae-v1`` / ``uae-v2`` layouts too.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..models.autoencoder_uae import AutoencoderUAE
from ..models.encoders import IMAGENET_MEAN, IMAGENET_STD
from ..models.pos_embed import sincos_pos_embed_2d
from .checkpoint_io import (
    STATS_EPS,
    SourceWeights,
    build_with_weights,
    complete_config,
    read_state_dict_file,
    stats_shape,
)

# ---------------------------------------------------------------------------------------------------------
# One HF-style ViT layer -> a timm Block (encoder and decoder alike)
# ---------------------------------------------------------------------------------------------------------

# Attention names of one HF ViT-family layer: the (q, k, v) projections and the output projection. The names of
# transformers 4 (DINOv2, ViTMAE), which the official checkpoints use, come first; each part has one newer naming.
_HF_VIT_ATTENTION = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                     "attention.output.dense")
DINOV2_ATTENTION_NAMES = (_HF_VIT_ATTENTION,
                          (("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj"))
DECODER_ATTENTION_NAMES = (_HF_VIT_ATTENTION,  # official ViTMAE names, then diffusers' port of the decoder
                           (("attention.to_q", "attention.to_k", "attention.to_v"), "attention.to_out.0"))
# The rest of a layer: source name -> timm Block name.
DINOV2_LAYER_NAMES = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
DECODER_LAYER_NAMES = {"layernorm_before": "norm1", "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1",
                       "output.dense": "mlp.fc2"}


def convert_hf_vit_layer(weights: SourceWeights, src: str, dst: str, attention_names: tuple,
                         layer_names: dict[str, str]) -> None:
    """One HF ViT-family layer at `src` -> a timm ``Block`` at `dst`: q, k, v fused into ``attn.qkv`` (in
    whichever of `attention_names` the checkpoint uses), the output projection and `layer_names` moved."""
    qkv, proj = next(((q, o) for q, o in attention_names if weights.has(f"{src}{q[0]}.weight")), attention_names[0])
    for kind in ("weight", "bias"):
        weights.fuse(tuple(f"{src}{name}.{kind}" for name in qkv), f"{dst}attn.qkv.{kind}")
    weights.move_all(src, dst, {proj: "attn.proj", **layer_names})


# ---------------------------------------------------------------------------------------------------------
# Encoder: HF Dinov2WithRegistersModel -> timm reg4 DINOv2
# ---------------------------------------------------------------------------------------------------------

# Named timm DINOv2-with-registers models by (width, depth); anything else uses the base name with kwargs.
TIMM_DINOV2_REG = {(384, 12): "vit_small_patch14_reg4_dinov2", (768, 12): "vit_base_patch14_reg4_dinov2",
                   (1024, 24): "vit_large_patch14_reg4_dinov2"}
DINOV2_HEAD_DIM = 64  # every DINOv2 size has 64-wide heads (HF's config does not store the count in the weights)


def resample_hf_position_table(patch_table: torch.Tensor, grid: int) -> torch.Tensor:
    """HF DINOv2's (1, S*S, C) patch position table at a grid x grid input: transformers'
    ``interpolate_pos_encoding`` (bicubic, antialiased, in float32), done once instead of at every forward."""
    tokens, channels = patch_table.shape[1], patch_table.shape[2]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"DINOv2 position table has {tokens} patch positions, not a square grid")
    if side == grid:  # transformers uses the table as it is
        return patch_table.clone()
    table = patch_table.reshape(1, side, side, channels).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return table.permute(0, 2, 3, 1).reshape(1, grid * grid, channels).to(patch_table.dtype)


def convert_hf_dinov2(weights: SourceWeights, prefix: str, grid: int) -> dict:
    """HF ``Dinov2WithRegistersModel`` at `prefix` -> ``encoder.backbone.*`` of a timm reg4 DINOv2. Returns the
    encoder part of the AutoencoderUAE config."""
    e, out = prefix + "embeddings.", "encoder.backbone."
    patch = weights.move(e + "patch_embeddings.projection.weight", out + "patch_embed.proj.weight")
    weights.move(e + "patch_embeddings.projection.bias", out + "patch_embed.proj.bias")
    width, patch_size = patch.shape[0], patch.shape[-1]
    table = weights.take(e + "position_embeddings")
    # HF adds the table's first row to the class token; timm adds no position to prefix tokens, so fold it in.
    weights.put(out + "cls_token", weights.take(e + "cls_token") + table[:, :1], e + "cls_token")
    weights.put(out + "pos_embed", resample_hf_position_table(table[:, 1:], grid), e + "position_embeddings")
    registers = weights.move(e + "register_tokens", out + "reg_token")
    if weights.has(e + "mask_token"):
        weights.take(e + "mask_token")  # masked-image-modelling token: unused by an encoder

    layer_ids = weights.indices(prefix + "encoder.layer.")
    for i in layer_ids:
        src, dst = f"{prefix}encoder.layer.{i}.", f"{out}blocks.{i}."
        convert_hf_vit_layer(weights, src, dst, DINOV2_ATTENTION_NAMES, DINOV2_LAYER_NAMES)
        weights.move(src + "layer_scale1.lambda1", dst + "ls1.gamma")
        weights.move(src + "layer_scale2.lambda1", dst + "ls2.gamma")

    # The official encoder strips the final LayerNorm's affine ("Dinov2withNorm"); if a checkpoint kept it, use it.
    if weights.has(prefix + "layernorm.weight"):
        weights.move_all(prefix, out, {"layernorm": "norm"})
        token_norm = "layernorm"
    else:  # timm's norm parameters exist but are unused by "layernorm_no_affine"
        weights.put(out + "norm.weight", torch.ones(width), "(affine-free final LayerNorm)")
        weights.put(out + "norm.bias", torch.zeros(width), "(affine-free final LayerNorm)")
        token_norm = "layernorm_no_affine"

    depth = len(layer_ids)
    mlp_ratio = weights.tensors[f"{prefix}encoder.layer.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
    num_heads = width // DINOV2_HEAD_DIM if width % DINOV2_HEAD_DIM == 0 else None
    name = TIMM_DINOV2_REG.get((width, depth))
    standard = patch_size == 14 and mlp_ratio == 4.0 and registers.shape[1] == 4 and num_heads is not None
    if name and standard:
        kwargs = {}
    else:
        name = "vit_base_patch14_reg4_dinov2"
        kwargs = dict(embed_dim=width, depth=depth, num_heads=num_heads, patch_size=patch_size)
        kwargs.update({"mlp_ratio": mlp_ratio} if mlp_ratio != 4.0 else {})
        kwargs.update({"reg_tokens": registers.shape[1]} if registers.shape[1] != 4 else {})
    return dict(encoder_name=name, encoder_kwargs=kwargs, encoder_input_size=grid * patch_size,
                encoder_token_norm=token_norm)


# ---------------------------------------------------------------------------------------------------------
# Decoder: the RAE ViT decoder (official ViTMAE names or diffusers' names)
# ---------------------------------------------------------------------------------------------------------

# Decoder heads of the released RAE / UAE decoder configs (ViT-B, ViT-L, ViT-XL); the weights do not show them.
DECODER_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16}


def check_decoder_position_table(table: torch.Tensor, grid: int) -> None:
    """A stored (1, 1 + grid*grid, D) decoder table must be the fixed MAE sin-cos table uae_gen rebuilds."""
    width = table.shape[-1]
    if table.shape[1:] != (grid * grid + 1, width) or not torch.allclose(
            table[0, 1:].float(), sincos_pos_embed_2d(width, grid), atol=1e-5):
        raise ValueError(f"decoder.decoder_pos_embed {tuple(table.shape)} is not MAE's fixed 2-D sin-cos table of a "
                         f"{grid}x{grid} grid")


def convert_rae_decoder(weights: SourceWeights, prefix: str) -> dict:
    """The RAE ViT decoder at `prefix` (official ViTMAE names or diffusers' names) -> ``decoder.*``. Returns the
    decoder part of the AutoencoderUAE config (head count None when the width is not a released one)."""
    out = "decoder."
    embed = weights.move(prefix + "decoder_embed.weight", out + "embed.weight")
    weights.move(prefix + "decoder_embed.bias", out + "embed.bias")
    weights.move(prefix + "trainable_cls_token", out + "cls_token")
    layer_ids = weights.indices(prefix + "decoder_layers.")
    for i in layer_ids:
        convert_hf_vit_layer(weights, f"{prefix}decoder_layers.{i}.", f"{out}blocks.{i}.", DECODER_ATTENTION_NAMES,
                             DECODER_LAYER_NAMES)
    weights.move_all(prefix, out, {"decoder_norm": "norm"})
    pred = weights.move(prefix + "decoder_pred.weight", out + "pred.weight")
    weights.move(prefix + "decoder_pred.bias", out + "pred.bias")
    patch = math.isqrt(pred.shape[0] // 3)
    if 3 * patch * patch != pred.shape[0]:
        raise ValueError(f"{prefix}decoder_pred.weight has {pred.shape[0]} outputs, not 3 * patch**2")
    hidden = embed.shape[0]
    mlp = weights.tensors[f"{prefix}decoder_layers.0.intermediate.dense.weight"].shape[0] if layer_ids else 4 * hidden
    return dict(decoder_hidden_size=hidden, decoder_depth=len(layer_ids),
                decoder_num_heads=DECODER_HEADS_BY_WIDTH.get(hidden), decoder_mlp_dim=mlp, decoder_patch_size=patch)


# ---------------------------------------------------------------------------------------------------------
# The diffusers AutoencoderRAE directory
# ---------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _resolve_directory(src: str | os.PathLike) -> Path:
    """A local directory, or a hub repository id (downloaded, or found in the cache when offline)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or not _HUB_ID.fullmatch(str(src)):
        raise FileNotFoundError(f"AutoencoderRAE directory not found: {src}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:
        raise FileNotFoundError(f"{src!r} is neither a local directory nor a reachable hub repository: {error}"
                                ) from error


def _read_diffusers_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / shard for shard in shards]
    else:
        files = [next((directory / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                       if (directory / n).is_file()), directory / "diffusion_pytorch_model.safetensors")]
    state_dict = {}
    for file in files:
        state_dict.update(read_state_dict_file(file))
    return state_dict


def _read_rae_config(directory: Path) -> tuple[dict, int]:
    """The AutoencoderRAE config.json and its latent grid side, refused unless uae_gen reproduces the model."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a diffusers model directory")
    rae = json.loads(config_file.read_text())
    if rae.get("_class_name") != "AutoencoderRAE":
        raise ValueError(f"{config_file} describes a {rae.get('_class_name')!r}, not a diffusers AutoencoderRAE")
    if rae.get("encoder_type", "dinov2") != "dinov2":
        raise ValueError(f"only the DINOv2 encoder maps onto uae_gen's encoder; this AutoencoderRAE uses "
                         f"{rae['encoder_type']!r}")
    if rae.get("num_channels", 3) != 3 or not rae.get("reshape_to_2d", True):
        raise ValueError("only RGB AutoencoderRAE models with 2-D latents (reshape_to_2d) convert")
    grid = rae.get("encoder_input_size", 224) // rae.get("encoder_patch_size", 14)
    if grid != 16:
        # diffusers builds the decoder table with base_size=16, i.e. positions scaled by 16 / grid elsewhere.
        raise ValueError(f"only AutoencoderRAE models with a 16x16 latent grid convert exactly (this one is {grid}x"
                         f"{grid}; diffusers scales its decoder positions by 16/{grid})")
    return rae, grid


def convert_rae_diffusers(src: str | os.PathLike, config_overrides: Optional[dict] = None) -> AutoencoderUAE:
    """A diffusers ``AutoencoderRAE`` directory (or hub id) -> ``AutoencoderUAE`` in RAE mode."""
    directory = _resolve_directory(src)
    rae, grid = _read_rae_config(directory)
    weights = SourceWeights(_read_diffusers_weights(directory), "rae-diffusers")
    for name, expected in (("encoder_mean", IMAGENET_MEAN), ("encoder_std", IMAGENET_STD)):
        stored = weights.take(name).flatten().float()
        if stored.shape != (3,) or not torch.allclose(stored, torch.tensor(expected), atol=1e-6):
            raise ValueError(f"{name} is {stored.tolist()}; uae_gen's encoder normalises with ImageNet's {expected}")
    config = convert_hf_dinov2(weights, "encoder.", grid)
    decoder = convert_rae_decoder(weights, "decoder.")
    if weights.has("decoder.decoder_pos_embed"):  # older exports kept the fixed table; diffusers ignores it
        check_decoder_position_table(weights.take("decoder.decoder_pos_embed"), grid)
    # AutoencoderRAE divides by (std + 1e-5); with no statistics its buffers are 0 and 1 (so 1 + 1e-5).
    mean = stats_shape(weights.take("_latents_mean").float())
    std = stats_shape(weights.take("_latents_std").float() + STATS_EPS)
    weights.check_all_taken()

    decoder["decoder_num_heads"] = rae.get("decoder_num_attention_heads", 16)  # diffusers' default
    config.update(
        image_size=grid * decoder.pop("decoder_patch_size"), **decoder,
        num_bands=1, band_cutoffs=[], band_noise_sigma=0.0, band_mix_layers=0, spectral_transform_channels=0,
        latent_noise_tau=float(rae.get("noise_tau", 0.0)), scaling_factor=float(rae.get("scaling_factor", 1.0)),
    )
    config = complete_config(config, config_overrides, "rae-diffusers")
    model = build_with_weights(AutoencoderUAE, config, weights.converted, weights.origin, "rae-diffusers")
    channels = model.latent_channels
    model.set_latent_statistics(*(s.reshape(1, 1, 1).expand(channels, 1, 1) if s.numel() == 1 else s
                                  for s in (mean, std)))
    return model
