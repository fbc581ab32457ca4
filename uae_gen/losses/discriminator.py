"""DINO discriminator shared by UAE and RAE (StyleGAN-T style): a frozen self-supervised ViT gives
token features at several depths, and a small trainable head per feature map turns every token into
one real/fake logit.

Backbone: timm's `vit_small_patch8_224.dino` architecture (DINO ViT-S/8, 384-d, 12 blocks), built with
`pretrained=False`; real weights come from `load_backbone_weights` (local file or hub name). The k-part
of every qkv bias is zeroed, as the official code does (it adds the same score to all keys of a query,
so attention is unchanged). Images in [-1, 1] are resized bilinearly to the backbone's input size and
ImageNet-normalised. Feature maps, in the official head order: the final block output (before the
final LayerNorm), then the outputs of blocks `tap_blocks` (2, 5, 8, 11 by default; with 12 blocks the
last tap repeats the final output, as in the official code).

Head per map (tokens as a 1-D sequence, channels first):
    SN-Conv1d k1 -> LocalBatchNorm -> LeakyReLU(0.2)
    -> residual [SN-Conv1d k (circular) -> LocalBatchNorm -> LeakyReLU(0.2)], sum scaled by 1/sqrt(2)
    -> SN-Conv1d k1 to one logit per token.
"""

import math
import os
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch.nn.utils.parametrizations import spectral_norm

from ..models.encoders import IMAGENET_MEAN, IMAGENET_STD
from .state_dict_file import read_state_dict

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class LocalBatchNorm(nn.Module):
    """Normalises each channel over the tokens of groups of `virtual_batch_size` samples (no running stats).

    With the official virtual batch size of 1 every sample is normalised on its own, so the
    discriminator's output for one image never depends on the rest of the batch.
    """

    def __init__(self, num_features: int, virtual_batch_size: int = 1, eps: float = 1e-6):
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        if batch % self.virtual_batch_size:
            raise ValueError(f"batch {batch} is not a multiple of virtual_batch_size {self.virtual_batch_size}")
        # Statistics in fp32 even under autocast.
        grouped = x.float().view(batch // self.virtual_batch_size, self.virtual_batch_size, channels, length)
        mean = grouped.mean(dim=(1, 3), keepdim=True)
        var = grouped.var(dim=(1, 3), keepdim=True, unbiased=False)
        normalized = ((grouped - mean) / torch.sqrt(var + self.eps)).view(batch, channels, length)
        return (normalized * self.weight[:, None] + self.bias[:, None]).to(x.dtype)


def _conv1d(in_channels: int, out_channels: int, kernel_size: int, use_spectral_norm: bool) -> nn.Module:
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv) if use_spectral_norm else conv


class DiscriminatorHead(nn.Module):
    """Maps one (B, C, L) token-feature map to (B, L) logits."""

    def __init__(self, channels: int, kernel_size: int, norm_eps: float, use_spectral_norm: bool):
        super().__init__()
        self.input_block = nn.Sequential(
            _conv1d(channels, channels, 1, use_spectral_norm),
            LocalBatchNorm(channels, eps=norm_eps),
            nn.LeakyReLU(0.2),
        )
        self.residual_block = nn.Sequential(
            _conv1d(channels, channels, kernel_size, use_spectral_norm),
            LocalBatchNorm(channels, eps=norm_eps),
            nn.LeakyReLU(0.2),
        )
        self.to_logit = _conv1d(channels, 1, 1, use_spectral_norm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.input_block(features)
        hidden = (self.residual_block(hidden) + hidden) / math.sqrt(2.0)
        return self.to_logit(hidden).squeeze(1)


class DinoDiscriminator(ModelMixin, ConfigMixin):
    """Frozen DINO ViT features + trainable spectral-norm heads -> logits (B, num_maps, num_tokens).

    Args:
        backbone_name: timm architecture name; built with pretrained=False (no download).
        backbone_kwargs: extra `timm.create_model` kwargs, e.g. a tiny test variant
            `dict(img_size=32, depth=4, embed_dim=64, num_heads=2)`.
        tap_blocks: indices of the blocks whose outputs feed a head (besides the final output).
        head_kernel_size: odd kernel size of the residual head convolution (official config: 9).
        norm_eps: eps of the heads' LocalBatchNorm.
        use_spectral_norm: spectral normalisation on every head convolution.
    """

    @register_to_config
    def __init__(
        self,
        backbone_name: str = "vit_small_patch8_224.dino",
        backbone_kwargs: Optional[dict] = None,
        tap_blocks: Sequence[int] = (2, 5, 8, 11),
        head_kernel_size: int = 9,
        norm_eps: float = 1e-6,
        use_spectral_norm: bool = True,
    ):
        super().__init__()
        if head_kernel_size % 2 != 1:
            raise ValueError(f"head_kernel_size must be odd to keep the token count, got {head_kernel_size}")
        self.backbone = timm.create_model(backbone_name, pretrained=False, num_classes=0, **(backbone_kwargs or {}))
        depth = len(self.backbone.blocks)
        if not tap_blocks or any(not 0 <= block < depth for block in tap_blocks):
            raise ValueError(f"tap_blocks must be non-empty block indices in [0, {depth}), got {list(tap_blocks)}")
        self.tap_blocks = [int(block) for block in tap_blocks]
        self._zero_key_bias()
        self.backbone.requires_grad_(False)
        self.backbone.eval()

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(
            DiscriminatorHead(self.backbone.embed_dim, head_kernel_size, norm_eps, use_spectral_norm)
            for _ in range(len(self.tap_blocks) + 1)
        )

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.img_size)

    @torch.no_grad()
    def _zero_key_bias(self) -> None:
        for block in self.backbone.blocks:
            bias = block.attn.qkv.bias
            if bias is not None:
                width = bias.numel() // 3
                bias[width : 2 * width].zero_()

    def load_backbone_weights(self, source: str) -> None:
        """Load DINO backbone weights from a local file or a timm / Hugging Face hub name.

        A local file (safetensors, or a torch file read with weights_only=True) holds a timm/DINO ViT
        state dict (`cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`, `norm.*`; `module.`/`backbone.`
        prefixes and `head.*` keys are ignored), e.g. the official `dino_deitsmall8_pretrain.pth`.
        Anything else is a hub name given to `timm.create_model(source, pretrained=True)`, such as
        "vit_small_patch8_224.dino"; that needs network access or the hub cache.
        """
        if os.path.exists(source) or source.endswith(WEIGHT_FILE_SUFFIXES) or os.sep in source:
            state_dict = read_state_dict(source, "DINO discriminator backbone")
        else:
            try:
                pretrained = timm.create_model(source, pretrained=True, num_classes=0)
            except Exception as error:
                raise OSError(
                    f"DINO discriminator backbone: could not fetch {source!r} from the hub ({error}); "
                    "pass a local weights file instead"
                ) from error
            state_dict = pretrained.state_dict()
        for prefix in ("module.", "backbone."):
            state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        missing, unexpected = self.backbone.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"DINO discriminator backbone: weights from {source!r} do not match the "
                f"{self.config.backbone_name} architecture (missing {missing}, unexpected {unexpected})"
            )
        self._zero_key_bias()

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        # Only the heads ever train; the backbone stays a fixed feature extractor.
        super().train(mode)
        self.backbone.eval()
        return self

    def _feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[-2:] != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)
        images = ((images + 1.0) / 2.0 - self.pixel_mean) / self.pixel_std
        final_block = len(self.backbone.blocks) - 1
        indices = sorted(set(self.tap_blocks) | {final_block})
        outputs = self.backbone.forward_intermediates(
            images, indices=indices, norm=False, output_fmt="NLC", intermediates_only=True
        )
        by_block = dict(zip(indices, outputs))
        maps = [by_block[final_block]] + [by_block[block] for block in self.tap_blocks]
        return [tokens.transpose(1, 2) for tokens in maps]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, len(tap_blocks) + 1, num_tokens) for images (B, 3, H, W) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DinoDiscriminator expects (B, 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        maps = self._feature_maps(images.to(self.pixel_mean.dtype))
        return torch.stack([head(features) for head, features in zip(self.heads, maps)], dim=1)
