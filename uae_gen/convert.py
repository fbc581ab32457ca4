"""Converters from released checkpoints to uae_gen's layouts.

Each converter is a plain key map (plus any reshape) from the official parameter names to ours. It raises a
ValueError that names missing or unexpected keys, so a wrong checkpoint fails loudly instead of loading half.
"""

import re

import torch

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


def convert_ditdh_state_dict(
    official_state_dict: dict[str, torch.Tensor], trunk_depth: int | None = None
) -> dict[str, torch.Tensor]:
    """Official DiT^DH state dict -> `UAEDiT` state dict (load with `model.load_state_dict(..., strict=True)`).

    `trunk_depth` (the official `depth[0]`) is inferred from the block widths when trunk and head differ in
    width; pass it when they are equal.
    """
    state_dict = dict(official_state_dict)
    block_ids = sorted({int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.fullmatch(key))})
    missing = [key for key in DITDH_REQUIRED_KEYS if key not in state_dict]
    missing += [f"blocks.{i}.{name}" for i in range(max(block_ids, default=-1) + 1) for name in _BLOCK_REQUIRED
                if f"blocks.{i}.{name}" not in state_dict]
    if missing:
        raise ValueError(f"DiT^DH checkpoint is missing keys: {missing}")

    if trunk_depth is None:
        trunk_width = state_dict["s_embedder.proj.weight"].shape[0]
        if state_dict["x_embedder.proj.weight"].shape[0] == trunk_width:
            raise ValueError("trunk and head have the same width, so the trunk depth is ambiguous; pass trunk_depth")
        trunk_depth = sum(state_dict[f"blocks.{i}.attn.proj.weight"].shape[0] == trunk_width for i in block_ids)

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
