"""``ditdh``: the official RAE / UAE stage-2 ``DiTwDDTHead`` (DiT^DH: a DiT trunk and a wide DDT head) -> ``UAEDiT``.

The config is read off the weight shapes; the key map renames prefixes, splits the official single block list into
trunk ``blocks`` and ``head_blocks``, and drops the fixed tables UAEDiT rebuilds (sin-cos position table, RoPE).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Optional

import torch

from ..models.dit import UAEDiT
from .checkpoint_io import build_with_weights, complete_config, read_state_dict_file

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
    overrides = dict(config_overrides or {})
    state_dict = read_state_dict_file(path)
    config = complete_config(infer_ditdh_config(state_dict, overrides.get("depth")), overrides, "ditdh")
    converted = convert_ditdh_state_dict(state_dict, trunk_depth=config["depth"])
    source_name = {id(tensor): key for key, tensor in state_dict.items()}
    origin = {key: source_name.get(id(tensor), key) for key, tensor in converted.items()}
    return build_with_weights(UAEDiT, config, converted, origin, "ditdh")
