"""ViT pixel decoder (MAE-style, as in RAE and UAE): latent tokens -> patches -> image.

Linear(C -> hidden) per token, a learnable class token (zero init), fixed 2-D sin-cos position embeddings
(MAE's table, as the official RAE / UAE decoders; the class slot gets zeros), pre-norm transformer blocks, LayerNorm, Linear(hidden -> p*p*3) per token, class token dropped, unpatchify. Like
the official decoder it predicts pixels in ImageNet-normalised space (x = out * std + mean); we then map to the
[-1, 1] image convention.

Sizes of the official configs (method.md 1.5), with MLP width given explicitly (XL uses 4096, not 4 x 1152):

| preset | hidden | depth | heads | mlp  |
|--------|--------|-------|-------|------|
| B      | 768    | 12    | 12    | 3072 |
| L      | 1024   | 24    | 16    | 4096 |
| XL     | 1152   | 28    | 16    | 4096 |
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .encoders import IMAGENET_MEAN, IMAGENET_STD
from .pos_embed import sincos_pos_embed_2d


class ViTDecoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        grid_size: tuple[int, int],
        patch_size: int = 16,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_dim: int = 4096,
        predicts_imagenet_normalized: bool = True,
    ):
        super().__init__()
        self.grid_size, self.patch_size = tuple(grid_size), patch_size
        self.predicts_imagenet_normalized = predicts_imagenet_normalized
        self.embed = nn.Linear(in_channels, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        pos = torch.cat([torch.zeros(1, hidden_size), sincos_pos_embed_2d(hidden_size, *self.grid_size)])
        self.register_buffer("pos_embed", pos[None], persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-12)  # HF ViTMAE's epsilon, used by the official decoder
        self.blocks = nn.ModuleList(
            [Block(hidden_size, num_heads, mlp_ratio=mlp_dim / hidden_size, qkv_bias=True, norm_layer=norm)
             for _ in range(depth)]
        )
        self.norm = norm(hidden_size)
        self.pred = nn.Linear(hidden_size, patch_size * patch_size * 3)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.gradient_checkpointing = False

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, h*w, p*p*3) -> (B, 3, h*p, w*p)."""
        (h, w), p = self.grid_size, self.patch_size
        x = patches.reshape(-1, h, w, p, p, 3)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(-1, 3, h * p, w * p)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) decoder input -> (B, 3, H, W) image in [-1, 1] (not clamped)."""
        tokens = self.embed(latent.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x)
        image = self.unpatchify(self.pred(self.norm(x))[:, 1:])
        if self.predicts_imagenet_normalized:
            image = image * self.pixel_std + self.pixel_mean  # -> [0, 1]
            return image * 2 - 1
        return image
