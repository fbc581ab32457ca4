"""The unified encoder: a timm DINOv2 ViT that turns images into a latent grid, and its frozen teacher copy.

Images in [-1, 1] at any size are bicubic-resized to ``input_size`` (224 for DINOv2-B/14, giving a 16x16 grid),
ImageNet-normalised, run through the ViT, and the last block's patch tokens (class token and registers dropped)
are LayerNormed and reshaped to (B, C, h, w). ``token_norm="layernorm_no_affine"`` is the official
"Dinov2withNorm": the final LayerNorm without its affine weights, so every token has zero mean and unit variance.

The network is always built with random weights (``from_pretrained`` must never download). Initial weights come
from ``load_encoder_weights``, which takes a timm hub name or a local file through one code path.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

# ImageNet RGB mean / std: defined here once; the decoder, the discriminator and the converters import them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKEN_NORMS = ("layernorm_no_affine", "layernorm", "none")


class SemanticEncoder(nn.Module):
    """A timm ViT (DINOv2 family by default) returning its patch tokens as a (B, C, h, w) grid."""

    def __init__(
        self,
        model_name: str = "vit_base_patch14_reg4_dinov2",
        input_size: int = 224,
        token_norm: str = "layernorm_no_affine",
        model_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        if token_norm not in TOKEN_NORMS:
            raise ValueError(f"token_norm must be one of {TOKEN_NORMS}, got {token_norm!r}")
        self.model_name, self.input_size, self.token_norm = model_name, input_size, token_norm
        self.model_kwargs = dict(model_kwargs or {})
        self.backbone = timm.create_model(
            model_name, pretrained=False, img_size=input_size, num_classes=0, **self.model_kwargs
        )
        self.hidden_size = self.backbone.embed_dim
        grid = self.backbone.patch_embed.grid_size
        self.grid_size = (int(grid[0]), int(grid[1]))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> ImageNet-normalised input at the encoder's resolution."""
        x = (images + 1) / 2
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        (tokens,) = self.backbone.forward_intermediates(
            x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True
        )  # last block, prefix tokens dropped: (B, h*w, C)
        norm = self.backbone.norm
        if self.token_norm == "layernorm_no_affine":
            tokens = F.layer_norm(tokens, (self.hidden_size,), eps=norm.eps)
        elif self.token_norm == "layernorm":
            tokens = norm(tokens)
        b = tokens.shape[0]
        return tokens.transpose(1, 2).reshape(b, self.hidden_size, *self.grid_size)


def make_teacher(encoder: SemanticEncoder) -> SemanticEncoder:
    """A frozen copy of the encoder: the semantic target of the band loss. Never trains, never changes."""
    teacher = copy.deepcopy(encoder).eval()
    teacher.requires_grad_(False)
    return teacher


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers around a plain state dict
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def resolve_weights_file(source: str) -> str:
    """A local file path stays as it is; a hub name ("timm/<arch>.<tag>" or "<arch>.<tag>") is downloaded
    (or found in the cache) as the repository's model.safetensors."""
    if os.path.isfile(source):
        return source
    if os.path.sep in source.replace("/", "", 1) or source.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise FileNotFoundError(f"encoder weights file not found: {source}")
    from huggingface_hub import hf_hub_download

    repo_id = source if source.startswith("timm/") else f"timm/{source}"
    return hf_hub_download(repo_id, "model.safetensors")


def load_encoder_weights(encoder: SemanticEncoder, source: str) -> SemanticEncoder:
    """Load initial encoder weights from a timm hub name or a local file (safetensors, or a torch checkpoint
    loaded with ``weights_only=True``). Position embeddings are resampled to the encoder's grid by timm's
    checkpoint filter, as timm does for its own pretrained weights."""
    state = _read_state_dict(resolve_weights_file(source))
    state = checkpoint_filter_fn(state, encoder.backbone)
    missing, unexpected = encoder.backbone.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("head")]  # classifier heads are not part of the encoder
    if missing or unexpected:
        raise ValueError(
            f"encoder weights from {source!r} do not fit {encoder.model_name}: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return encoder
