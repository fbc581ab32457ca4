"""Converters from released checkpoints to uae_gen directories (``uae-gen convert --from LAYOUT SRC DST``).

Layouts:

* ``rae-diffusers``: a diffusers ``AutoencoderRAE`` directory or hub id (config.json + safetensors, e.g.
  ``nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08``) -> ``AutoencoderUAE`` in RAE mode: one band, no spectral
  transform (``spectral_transform_channels=0``), RAE's token noise as ``latent_noise_tau``. The HF transformers
  DINOv2-with-registers encoder maps onto timm's ``vit_*_patch14_reg4_dinov2``: q/k/v are fused, the class
  token absorbs its position embedding (timm adds none to prefix tokens), and the 37x37 position table is
  resampled to the latent grid once, exactly as transformers does at every forward (bicubic, antialiased, fp32).
* ``uae-v1``: the official UAE v1 (``unified_ae.UnifiedUAE``) checkpoint -> the v1-compatible mode (hard FFT
  rings, K x K band-mixing layers ``freq_modulator.band_transform.layers.*`` -> ``modulator.mixing.*``, conv
  fusion ``freq_modulator.denoiser.{0,2}`` -> ``modulator.spectral_transform.conv_{in,out}``).
* ``uae-v2``: the official UAE v2 (``src/stage1.UAE``) checkpoint -> the DCT mode (the frequency module has no
  weights; set ``dct_lowpass_coefficients`` to the config's ``band_split.count`` to low-pass as it does in eval).
* ``ditdh``: RAE / UAE ``DiTwDDTHead`` -> ``UAEDiT``; the config is read off the weight shapes.

UAE checkpoints are training dicts (``ep-last.pt``, ``final.pt``) holding "ema" and/or "model": EMA weights are
preferred. Both UAE versions use the HF DINOv2 encoder and the RAE ViT decoder (``decoder_layers.*`` in ViTMAE
names), with the transformers-4 (``attention.attention.query``) or -5 (``attention.q_proj``) encoder names.

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

Files are read from safetensors or with ``torch.load(..., weights_only=True)``; a pickle that needs code to
unpickle is refused. Any problem raises one ValueError (or FileNotFoundError) before anything is written; the
output is written to a temporary directory next to DST and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

LAYOUTS = ("rae-diffusers", "uae-v1", "uae-v2", "ditdh")
STATS_EPS = 1e-5  # official latent normalisation: (z - mean) / sqrt(var + 1e-5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------------
# DiT^DH
# ---------------------------------------------------------------------------------------------------------

# Official RAE/UAE `DiTwDDTHead` (src/stage2/models/DDT.py) prefix -> UAEDiT prefix. The official model keeps
# trunk and head blocks in one list `blocks`; ours splits them into `blocks` and `head_blocks` (see below).
DITDH_KEY_MAP = {
    "s_embedder.proj.": "x_embedder.",  # trunk patch embed (timm PatchEmbed's conv)
    "x_embedder.proj.": "head_x_embedder.",  # head re-embeds the noisy input
    "s_projector.": "head_cond_proj.",  # trunk width -> head width (absent when equal)
    "t_embedder.W": "t_embedder.fourier_freqs",
    "t_embedder.mlp.": "t_embedder.mlp.",
    "y_embedder.embedding_table.": "y_embedder.embedding_table.",
    "final_layer.": "final_layer.",
}
# Fixed tables UAEDiT rebuilds from its config instead of storing: sin-cos pos-embed and RoPE cos/sin.
DITDH_DERIVED_PREFIXES = ("pos_embed", "enc_feat_rope.", "dec_feat_rope.")
DITDH_REQUIRED_KEYS = (
    "s_embedder.proj.weight", "x_embedder.proj.weight", "t_embedder.W", "t_embedder.mlp.0.weight",
    "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
    "final_layer.adaLN_modulation.1.weight",
)
_BLOCK_KEY = re.compile(
    r"blocks\.(\d+)\.((norm1|norm2)\.weight|attn\.(qkv|proj|q_norm|k_norm)\.(weight|bias)"
    r"|mlp\.(w12|w3|fc1|fc2)\.(weight|bias)|adaLN_modulation\.1\.(weight|bias))"
)
_BLOCK_REQUIRED = ("attn.qkv.weight", "attn.proj.weight", "adaLN_modulation.1.weight")
# Attention heads of the released sizes, for checkpoints whose weights do not show the head width (no RoPE table,
# no QK-norm): DiT-S/B/L/XL trunks and the 2048-wide DDT head.
DIT_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 2048: 16}


def _ditdh_block_ids(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.fullmatch(key))})


def _ditdh_trunk_depth(state_dict: Mapping[str, torch.Tensor], block_ids: list[int]) -> int:
    trunk_width = state_dict["s_embedder.proj.weight"].shape[0]
    if state_dict["x_embedder.proj.weight"].shape[0] == trunk_width:
        raise ValueError("trunk and head have the same width, so the trunk depth is ambiguous; pass trunk_depth")
    return sum(state_dict[f"blocks.{i}.attn.proj.weight"].shape[0] == trunk_width for i in block_ids)


def _check_ditdh_keys(state_dict: Mapping[str, torch.Tensor], block_ids: list[int]) -> None:
    missing = [key for key in DITDH_REQUIRED_KEYS if key not in state_dict]
    missing += [f"blocks.{i}.{name}" for i in range(max(block_ids, default=-1) + 1) for name in _BLOCK_REQUIRED
                if f"blocks.{i}.{name}" not in state_dict]
    if missing:
        raise ValueError(f"DiT^DH checkpoint is missing keys: {missing}")


def convert_ditdh_state_dict(
    official_state_dict: dict[str, torch.Tensor], trunk_depth: int | None = None
) -> dict[str, torch.Tensor]:
    """Official DiT^DH state dict -> `UAEDiT` state dict (load with `model.load_state_dict(..., strict=True)`).

    `trunk_depth` (the official `depth[0]`) is inferred from the block widths when trunk and head differ in
    width; pass it when they are equal.
    """
    state_dict = dict(official_state_dict)
    block_ids = _ditdh_block_ids(state_dict)
    _check_ditdh_keys(state_dict, block_ids)
    if trunk_depth is None:
        trunk_depth = _ditdh_trunk_depth(state_dict, block_ids)

    converted, unexpected = {}, []
    for key, tensor in state_dict.items():
        if block := _BLOCK_KEY.fullmatch(key):
            index = int(block.group(1))
            target = f"blocks.{index}" if index < trunk_depth else f"head_blocks.{index - trunk_depth}"
            new_key = f"{target}.{block.group(2)}"
        elif key.startswith(DITDH_DERIVED_PREFIXES):
            continue
        elif prefix := next((p for p in DITDH_KEY_MAP if key.startswith(p)), None):
            new_key = DITDH_KEY_MAP[prefix] + key[len(prefix):]
        else:
            unexpected.append(key)
            continue
        # Our adaLN regressors are bare Linears (UAEDiT applies their SiLU once), not Sequential(SiLU, Linear).
        converted[new_key.replace("adaLN_modulation.1.", "adaLN_modulation.")] = tensor
    if unexpected:
        raise ValueError(f"DiT^DH checkpoint has unexpected keys: {unexpected}")
    return converted


def _dit_mlp_ratio(width: int, block: str, state_dict: Mapping[str, torch.Tensor]) -> float:
    """mlp_ratio r such that the block's MLP has the official hidden width: int(2/3 * int(width * r)) for SwiGLU
    (w12 holds two halves), int(width * r) for the GELU MLP."""
    if f"{block}.mlp.w12.weight" in state_dict:
        hidden = state_dict[f"{block}.mlp.w12.weight"].shape[0] // 2
        candidates = (4.0, hidden * 1.5 / width, (hidden + 1) * 1.5 / width)
        matches = [r for r in candidates if int(2 / 3 * int(width * r)) == hidden]
    else:
        hidden = state_dict[f"{block}.mlp.fc1.weight"].shape[0]
        matches = [r for r in (4.0, hidden / width) if int(width * r) == hidden]
    if not matches:
        raise ValueError(f"cannot find an mlp_ratio giving the MLP width {hidden} of {block}")
    return matches[0]


def _dit_heads(width: int, rope_key: str, block: str, state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Head count from the RoPE table or the QK-norm (both head_dim wide), else the released sizes' table."""
    for key in (f"{rope_key}.freqs_cos", f"{block}.attn.q_norm.weight"):
        if key in state_dict:
            return width // state_dict[key].shape[-1]
    return DIT_HEADS_BY_WIDTH.get(width)


def infer_ditdh_config(state_dict: Mapping[str, torch.Tensor], trunk_depth: int | None = None) -> dict:
    """The `UAEDiT` config of an official DiT^DH state dict, read off its weight shapes. A value the weights do
    not determine (the head count of an unusual width without RoPE or QK-norm) is None."""
    block_ids = _ditdh_block_ids(state_dict)
    _check_ditdh_keys(state_dict, block_ids)
    trunk_depth = _ditdh_trunk_depth(state_dict, block_ids) if trunk_depth is None else trunk_depth
    if not 0 < trunk_depth < len(block_ids):
        raise ValueError(f"trunk_depth must lie in [1, {len(block_ids) - 1}] for {len(block_ids)} blocks, "
                         f"got {trunk_depth}")
    width, in_channels, patch, _ = state_dict["s_embedder.proj.weight"].shape
    head_width = state_dict["x_embedder.proj.weight"].shape[0]
    head_block = f"blocks.{trunk_depth}"
    if "pos_embed" in state_dict:
        tokens = state_dict["pos_embed"].shape[1]
    elif "enc_feat_rope.freqs_cos" in state_dict:
        tokens = state_dict["enc_feat_rope.freqs_cos"].shape[0]
    else:
        tokens = None
    grid = math.isqrt(tokens) if tokens else None
    if grid is not None and grid * grid != tokens:
        raise ValueError(f"the position table has {tokens} tokens, not a square grid")
    modulation = state_dict["blocks.0.adaLN_modulation.1.weight"].shape[0]
    return dict(
        sample_size=grid * patch if grid else None,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=width,
        depth=trunk_depth,
        num_heads=_dit_heads(width, "enc_feat_rope", "blocks.0", state_dict),
        head_hidden_size=head_width,
        head_depth=len(block_ids) - trunk_depth,
        head_num_heads=_dit_heads(head_width, "dec_feat_rope", head_block, state_dict),
        mlp_ratio=_dit_mlp_ratio(width, "blocks.0", state_dict),
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,  # + the null class
        use_swiglu="blocks.0.mlp.w12.weight" in state_dict,
        use_rmsnorm="blocks.0.norm1.weight" in state_dict,  # LayerNorm without affine stores nothing
        use_rope="enc_feat_rope.freqs_cos" in state_dict,
        use_qknorm="blocks.0.attn.q_norm.weight" in state_dict,
        use_pos_embed="pos_embed" in state_dict,
        wo_shift=modulation == 4 * width,
        time_embedding_type="gaussian_fourier",
    )


def convert_ditdh_checkpoint(path: str | os.PathLike, config_overrides: Optional[dict] = None):
    """An official DiT^DH checkpoint file -> `UAEDiT` (config from the weight shapes, then the overrides)."""
    from ..models.dit import UAEDiT

    overrides = dict(config_overrides or {})
    state_dict = select_state_dict(read_checkpoint_file(path), path)
    config = _complete_config(infer_ditdh_config(state_dict, overrides.get("depth")), overrides, "ditdh")
    converted = convert_ditdh_state_dict(state_dict, trunk_depth=config["depth"])
    source_name = {id(tensor): key for key, tensor in state_dict.items()}
    origin = {key: source_name.get(id(tensor), key) for key, tensor in converted.items()}
    return _build_with_weights(UAEDiT, config, converted, origin, "ditdh")


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
    return _stats_shape(mean), _stats_shape(torch.sqrt(var + STATS_EPS))


def _stats_shape(stat: torch.Tensor) -> torch.Tensor:
    while stat.ndim > 3 and stat.shape[0] == 1:
        stat = stat[0]
    return stat.reshape(-1, 1, 1) if stat.ndim == 1 else stat


# ---------------------------------------------------------------------------------------------------------
# Autoencoders: key maps shared by the three layouts
# ---------------------------------------------------------------------------------------------------------


class _SourceWeights:
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

    def fuse(self, sources: tuple[str, ...], target: str) -> None:
        """Separate q, k, v projections -> one fused qkv (timm's layout: rows [q; k; v])."""
        self.put(target, torch.cat([self.take(key) for key in sources]), " + ".join(sources))

    def check_all_taken(self) -> None:
        leftover = sorted(set(self.tensors) - self.taken)
        if leftover:
            more = f" and {len(leftover) - 10} more" if len(leftover) > 10 else ""
            raise ValueError(f"{self.layout} checkpoint has unexpected keys: {leftover[:10]}{more}")


# Named timm DINOv2-with-registers models by (width, depth); anything else uses the base name with kwargs.
TIMM_DINOV2_REG = {(384, 12): "vit_small_patch14_reg4_dinov2", (768, 12): "vit_base_patch14_reg4_dinov2",
                   (1024, 24): "vit_large_patch14_reg4_dinov2"}
DINOV2_HEAD_DIM = 64  # every DINOv2 size has 64-wide heads (HF's config does not store the count in the weights)
# transformers 4 (and the official checkpoints) vs transformers 5 names of a DINOv2 layer's attention.
_HF_ATTENTION_NAMES = (
    (("attention.attention.query", "attention.attention.key", "attention.attention.value"), "attention.output.dense"),
    (("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj"),
)


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


def _convert_hf_dinov2(weights: _SourceWeights, prefix: str, grid: int) -> dict:
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
        qkv, proj = next(((q, o) for q, o in _HF_ATTENTION_NAMES if weights.has(src + q[0] + ".weight")),
                         _HF_ATTENTION_NAMES[0])
        for kind in ("weight", "bias"):
            weights.fuse(tuple(f"{src}{name}.{kind}" for name in qkv), f"{dst}attn.qkv.{kind}")
            weights.move(f"{src}{proj}.{kind}", f"{dst}attn.proj.{kind}")
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                weights.move(f"{src}{name}.{kind}", f"{dst}{name}.{kind}")
        weights.move(src + "layer_scale1.lambda1", dst + "ls1.gamma")
        weights.move(src + "layer_scale2.lambda1", dst + "ls2.gamma")

    # The official encoder strips the final LayerNorm's affine ("Dinov2withNorm"); if a checkpoint kept it, use it.
    if weights.has(prefix + "layernorm.weight"):
        weights.move(prefix + "layernorm.weight", out + "norm.weight")
        weights.move(prefix + "layernorm.bias", out + "norm.bias")
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


# Decoder heads of the released RAE / UAE decoder configs (ViT-B, ViT-L, ViT-XL); the weights do not show them.
DECODER_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16}
# The official decoder's attention in HF ViTMAE names, and diffusers' port of it.
_DECODER_ATTENTION_NAMES = (
    (("attention.attention.query", "attention.attention.key", "attention.attention.value"), "attention.output.dense"),
    (("attention.to_q", "attention.to_k", "attention.to_v"), "attention.to_out.0"),
)


def check_decoder_position_table(table: torch.Tensor, grid: int) -> None:
    """A stored (1, 1 + grid*grid, D) decoder table must be the fixed MAE sin-cos table uae_gen rebuilds."""
    from ..models.pos_embed import sincos_pos_embed_2d

    width = table.shape[-1]
    if table.shape[1:] != (grid * grid + 1, width) or not torch.allclose(
            table[0, 1:].float(), sincos_pos_embed_2d(width, grid), atol=1e-5):
        raise ValueError(f"decoder.decoder_pos_embed {tuple(table.shape)} is not MAE's fixed 2-D sin-cos table of a "
                         f"{grid}x{grid} grid")


def _convert_rae_decoder(weights: _SourceWeights, prefix: str) -> dict:
    """The RAE ViT decoder at `prefix` (official ViTMAE names or diffusers' names) -> ``decoder.*``. Returns the
    decoder part of the AutoencoderUAE config (head count None when the width is not a released one)."""
    out = "decoder."
    embed = weights.move(prefix + "decoder_embed.weight", out + "embed.weight")
    weights.move(prefix + "decoder_embed.bias", out + "embed.bias")
    weights.move(prefix + "trainable_cls_token", out + "cls_token")
    layer_ids = weights.indices(prefix + "decoder_layers.")
    for i in layer_ids:
        src, dst = f"{prefix}decoder_layers.{i}.", f"{out}blocks.{i}."
        qkv, proj = next(((q, o) for q, o in _DECODER_ATTENTION_NAMES if weights.has(src + q[0] + ".weight")),
                         _DECODER_ATTENTION_NAMES[0])
        for kind in ("weight", "bias"):
            weights.fuse(tuple(f"{src}{name}.{kind}" for name in qkv), f"{dst}attn.qkv.{kind}")
            weights.move(f"{src}{proj}.{kind}", f"{dst}attn.proj.{kind}")
            weights.move(f"{src}layernorm_before.{kind}", f"{dst}norm1.{kind}")
            weights.move(f"{src}layernorm_after.{kind}", f"{dst}norm2.{kind}")
            weights.move(f"{src}intermediate.dense.{kind}", f"{dst}mlp.fc1.{kind}")
            weights.move(f"{src}output.dense.{kind}", f"{dst}mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        weights.move(f"{prefix}decoder_norm.{kind}", f"{out}norm.{kind}")
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
# Autoencoder layouts
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
        state_dict.update(select_state_dict(read_checkpoint_file(file), file))
    return state_dict


def convert_rae_diffusers(src: str | os.PathLike, config_overrides: Optional[dict] = None):
    """A diffusers ``AutoencoderRAE`` directory (or hub id) -> ``AutoencoderUAE`` in RAE mode."""
    from ..models.autoencoder_uae import AutoencoderUAE

    directory = _resolve_directory(src)
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

    weights = _SourceWeights(_read_diffusers_weights(directory), "rae-diffusers")
    for name, expected in (("encoder_mean", IMAGENET_MEAN), ("encoder_std", IMAGENET_STD)):
        stored = weights.take(name).flatten().float()
        if stored.shape != (3,) or not torch.allclose(stored, torch.tensor(expected), atol=1e-6):
            raise ValueError(f"{name} is {stored.tolist()}; uae_gen's encoder normalises with ImageNet's {expected}")
    config = _convert_hf_dinov2(weights, "encoder.", grid)
    decoder = _convert_rae_decoder(weights, "decoder.")
    if weights.has("decoder.decoder_pos_embed"):  # older exports kept the fixed table; diffusers ignores it
        check_decoder_position_table(weights.take("decoder.decoder_pos_embed"), grid)
    # AutoencoderRAE divides by (std + 1e-5); with no statistics its buffers are 0 and 1 (so 1 + 1e-5).
    mean = _stats_shape(weights.take("_latents_mean").float())
    std = _stats_shape(weights.take("_latents_std").float() + STATS_EPS)
    weights.check_all_taken()

    decoder["decoder_num_heads"] = rae.get("decoder_num_attention_heads", 16)  # diffusers' default
    config.update(
        image_size=grid * decoder.pop("decoder_patch_size"), **decoder,
        num_bands=1, band_cutoffs=[], band_noise_sigma=0.0, band_mix_layers=0, spectral_transform_channels=0,
        latent_noise_tau=float(rae.get("noise_tau", 0.0)), scaling_factor=float(rae.get("scaling_factor", 1.0)),
    )
    config = _complete_config(config, config_overrides, "rae-diffusers")
    model = _build_with_weights(AutoencoderUAE, config, weights.converted, weights.origin, "rae-diffusers")
    channels = model.latent_channels
    model.set_latent_statistics(*(s.reshape(1, 1, 1).expand(channels, 1, 1) if s.numel() == 1 else s
                                  for s in (mean, std)))
    return model


def convert_uae_checkpoint(path: str | os.PathLike, version: str, config_overrides: Optional[dict] = None):
    """An official UAE checkpoint (``version`` "v1": ``unified_ae``; "v2": ``src/stage1``) -> ``AutoencoderUAE``."""
    from ..models.autoencoder_uae import UAE_PRESETS, AutoencoderUAE

    if version not in ("v1", "v2"):
        raise ValueError(f"UAE version must be 'v1' or 'v2', got {version!r}")
    layout = f"uae-{version}"
    overrides = dict(config_overrides or {})
    weights = _SourceWeights(select_state_dict(read_checkpoint_file(path), path), layout)
    patch_key = "encoder.encoder.embeddings.patch_embeddings.projection.weight"
    if not weights.has(patch_key):
        raise ValueError(f"{path} is not a {layout} checkpoint: it has no {patch_key!r} (found e.g. "
                         f"{sorted(weights.tensors)[:4]})")
    channels, patch = weights.tensors[patch_key].shape[0], weights.tensors[patch_key].shape[-1]
    if weights.has("decoder.decoder_pos_embed"):  # the official decoder stores its fixed table: it gives the grid
        table = weights.take("decoder.decoder_pos_embed")
        grid = math.isqrt(table.shape[1] - 1)
        check_decoder_position_table(table, grid)
    else:  # the official configs encode at 224
        grid = overrides.get("encoder_input_size", 224) // patch
    config = dict(UAE_PRESETS[f"imagenet256-dinov2-b-{version}"])
    config.update(_convert_hf_dinov2(weights, "encoder.encoder.", grid))
    decoder = _convert_rae_decoder(weights, "decoder.")
    config.update(image_size=grid * decoder.pop("decoder_patch_size"), **decoder)
    if version == "v1":
        config.update(_convert_v1_modulator(weights, channels))
    else:  # v2's frequency module is a fixed DCT projection: no learned fusion
        config.update(spectral_transform_channels=0)
    weights.check_all_taken()
    config = _complete_config(config, overrides, layout)
    return _build_with_weights(AutoencoderUAE, config, weights.converted, weights.origin, layout)


def _convert_v1_modulator(weights: _SourceWeights, channels: int) -> dict:
    """v1 ``freq_modulator``: K x K band-mixing layers and the conv fusion ("denoiser") -> ``modulator.*``."""
    src = "freq_modulator."
    mix_ids = weights.indices(src + "band_transform.layers.")
    for i in mix_ids:
        weights.move(f"{src}band_transform.layers.{i}.weight", f"modulator.mixing.{i}.weight")
    conv_in = weights.move(src + "denoiser.0.weight", "modulator.spectral_transform.conv_in.weight")
    weights.move(src + "denoiser.0.bias", "modulator.spectral_transform.conv_in.bias")
    weights.move(src + "denoiser.2.weight", "modulator.spectral_transform.conv_out.weight")
    weights.move(src + "denoiser.2.bias", "modulator.spectral_transform.conv_out.bias")
    num_bands, remainder = divmod(conv_in.shape[1], channels)
    if remainder or num_bands < 1:
        raise ValueError(f"{src}denoiser.0.weight takes {conv_in.shape[1]} channels, not a multiple of the latent's "
                         f"{channels}")
    # The released schedule [0.32, 16] (K=2) puts the band edge at 0.02 r_max; other K need their schedule.
    cutoffs = [0.02] if num_bands == 2 else (None if num_bands > 1 else [])
    return dict(num_bands=num_bands, band_mix_layers=len(mix_ids), spectral_transform_channels=conv_in.shape[0],
                band_cutoffs=cutoffs)


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


def _complete_config(config: dict, overrides: Optional[Mapping], layout: str) -> dict:
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


def _build_with_weights(model_class, config: dict, state_dict: dict, origin: dict, layout: str):
    """Build ``model_class(**config)`` without initialising weights, check the converted tensors against it key by
    key and shape by shape (naming the source key), and load them."""
    from accelerate import init_empty_weights

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


def _refuse_existing(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} already exists and is not empty; choose a new directory or pass --overwrite "
                         "(overwrite=True)")


def _write_directory(model, dst: Path, overwrite: bool) -> None:
    """save_pretrained into a temporary directory beside DST, then rename it into place."""
    _refuse_existing(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    _refuse_existing(dst, overwrite)
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
    _write_directory(model, dst, overwrite)
    return model
