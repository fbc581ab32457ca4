"""AutoencoderUAE: the Unified Autoencoder as a diffusers model.

    images [-1, 1] --encoder--> z (B, C, h, w) --split--> bands (B, K, C, h, w)
        --modulator (noise on high bands while training, spectral transform)--> q --ViT decoder--> images [-1, 1]

Conventions (diffusers' ``AutoencoderRAE`` is the template):

* Images are in [-1, 1] (diffusers' convention) for ``encode``, ``decode`` and ``forward``; the ImageNet
  normalisation of the encoder input and of the decoder output happens inside.
* Latent normalisation lives HERE and only here: ``encode`` returns ``(z - latents_mean) / latents_std *
  scaling_factor`` (the latent the DiT sees) and ``decode`` inverts it first. ``latents_mean`` / ``latents_std``
  are persistent buffers saved in the weights file, per channel (C, 1, 1) or per element (C, h, w) as the
  official stats are (``latents_std`` is sqrt(var + 1e-5)). Set them with ``set_latent_statistics``.
* ``split_bands`` / ``merge_bands`` act on whatever latent they are given (they are linear); ``forward`` uses
  the raw latent.
* ``encode`` / ``decode`` check shapes always, but check values (NaN / inf) only with ``check_finite=True``: that
  check reads a tensor reduction on the host, which waits for the device on every call.

Released variants are config options of the same class: v1 (``band_mask_shape="hard_ring"``,
``band_keep_residual=False``, ``band_mix_layers=2``, ``spectral_transform_zero_init=False``), v2
(``band_transform="dct"``, ``dct_lowpass_coefficients``, ``dct_lowpass_train_range``, ``latent_noise_tau``) and
RAE (``num_bands=1``, ``spectral_transform_channels=0``: no modulator); see ``uae_gen.convert``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, EncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook

from .bands import BandProjector, DCTBandTransform
from .encoders import SemanticEncoder
from .modulator import FrequencyBandModulator
from .vit_decoder import ViTDecoder

LATENT_STATS = ("none", "per_channel", "per_element")

# Named configurations (overrides of the defaults, which are the paper's ImageNet-256 model).
UAE_PRESETS = {
    "imagenet256-dinov2-b": {},
    # The released v1 checkpoint layout: K=2 hard rings from the schedule [0.32, 16], corners dropped.
    "imagenet256-dinov2-b-v1": dict(
        num_bands=2, band_mask_shape="hard_ring", band_cutoffs=[0.02], band_keep_residual=False,
        band_mix_layers=2, spectral_transform_zero_init=False,
    ),
    # The released v2 layout: DCT zig-zag low-pass, random k in [32, 256] while training, noise on the tokens.
    "imagenet256-dinov2-b-v2": dict(
        num_bands=2, band_transform="dct", band_cutoffs=[0.25], band_noise_sigma=0.0, latent_noise_tau=0.8,
        dct_lowpass_train_range=[32, 256],
    ),
    # A few-second CPU model of the same classes (32 px, 8x8x64 latent) for tests and the demo.
    "tiny": dict(
        encoder_kwargs=dict(depth=2, embed_dim=64, num_heads=2, patch_size=4), encoder_input_size=32,
        image_size=32, spectral_transform_channels=64, decoder_hidden_size=64, decoder_depth=2,
        decoder_num_heads=2, decoder_mlp_dim=128,
    ),
}


@dataclass
class UAEOutput(BaseOutput):
    """``forward``'s output: the reconstruction, the raw latent and its bands (for the training losses)."""

    sample: torch.Tensor
    latent: torch.Tensor
    bands: torch.Tensor


class AutoencoderUAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""Unified Autoencoder (UAE) with a frequency-band modulator.

    Defaults are the paper's ImageNet-256 model: DINOv2-B/14 with registers at 224 (16x16x768 latent), K=4
    smooth FFT bands with the residual kept, band-limited noise on bands >= 1 while training, a zero-initialised
    spectral transform, and a ViT-XL decoder with patch 16 producing 256 px.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    # Keys of older saved configs that load silently and are dropped: ``check_inputs`` (on by default) gated the
    # NaN checks that ``check_finite`` (off by default) now gates.
    _removed_config_keys = ("check_inputs",)

    @register_to_config
    def __init__(
        self,
        encoder_name: str = "vit_base_patch14_reg4_dinov2",
        encoder_kwargs: Optional[dict] = None,
        encoder_input_size: int = 224,
        encoder_token_norm: str = "layernorm_no_affine",
        image_size: int = 256,
        num_bands: int = 4,
        band_transform: str = "fft",
        band_cutoffs: Optional[Sequence[float]] = None,
        band_mask_shape: str = "smooth",
        band_transition_width: float = 1.0,
        band_keep_residual: bool = True,
        band_noise_sigma: float = 0.8,
        band_noise_prob: float = 1.0,
        band_noise_from: int = 1,
        band_mix_layers: int = 0,
        spectral_transform_channels: Optional[int] = None,
        spectral_transform_zero_init: bool = True,
        latent_noise_tau: float = 0.0,
        dct_lowpass_coefficients: Optional[int] = None,
        dct_lowpass_train_range: Optional[Sequence[int]] = None,
        dct_lowpass_train_prob: float = 0.5,
        decoder_hidden_size: int = 1152,
        decoder_depth: int = 28,
        decoder_num_heads: int = 16,
        decoder_mlp_dim: int = 4096,
        decoder_predicts_imagenet_normalized: bool = True,
        latents_stats: str = "none",
        scaling_factor: float = 1.0,
        check_finite: bool = False,
    ):
        super().__init__()
        if latents_stats not in LATENT_STATS:
            raise ValueError(f"latents_stats must be one of {LATENT_STATS}, got {latents_stats!r}")
        self.encoder = SemanticEncoder(encoder_name, encoder_input_size, encoder_token_norm, encoder_kwargs)
        channels, (h, w) = self.encoder.hidden_size, self.encoder.grid_size
        if image_size % h or image_size % w or image_size // h != image_size // w:
            raise ValueError(f"image_size {image_size} must be a common multiple of the latent grid {h}x{w}")
        self.latent_channels, self.latent_size = channels, (h, w)
        if dct_lowpass_train_range and not 1 <= dct_lowpass_train_range[0] <= dct_lowpass_train_range[1]:
            # Checked here because the per-sample counts drawn from it are not checked on the device (a count
            # above h*w keeps every coefficient, as the released range [32, 256] does on a smaller grid).
            raise ValueError(f"dct_lowpass_train_range must satisfy 1 <= lo <= hi, got {list(dct_lowpass_train_range)}")
        self.band_projector = BandProjector(
            h, w, num_bands, band_transform, band_cutoffs, band_mask_shape, band_transition_width, band_keep_residual
        )
        # The v2 low-pass keeps zig-zag DCT coefficients whatever transform splits the bands.
        self.lowpass_transform = (self.band_projector.band_transform if band_transform == "dct"
                                  else DCTBandTransform(h, w, cutoffs=[]))
        self.modulator = FrequencyBandModulator(
            self.band_projector, channels, spectral_transform_channels, spectral_transform_zero_init, band_mix_layers,
            band_noise_sigma, band_noise_prob, band_noise_from,
        )
        self.decoder = ViTDecoder(
            channels, (h, w), image_size // h, decoder_hidden_size, decoder_depth, decoder_num_heads,
            decoder_mlp_dim, decoder_predicts_imagenet_normalized,
        )
        stats_shape = {"none": (1, 1, 1), "per_channel": (channels, 1, 1), "per_element": (channels, h, w)}
        self.register_buffer("latents_mean", torch.zeros(stats_shape[latents_stats]))
        self.register_buffer("latents_std", torch.ones(stats_shape[latents_stats]))
        self.use_slicing = False

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config -> __init__ kwargs, after dropping ``_removed_config_keys`` of older checkpoints."""
        config_dict = {k: v for k, v in config_dict.items() if k not in cls._removed_config_keys}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AutoencoderUAE":
        """Build a randomly initialised model from ``UAE_PRESETS[name]`` (overrides win)."""
        if name not in UAE_PRESETS:
            raise ValueError(f"unknown AutoencoderUAE preset {name!r}; choose from {sorted(UAE_PRESETS)}")
        return cls(**{**UAE_PRESETS[name], **overrides})

    # ---- input checks ---------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"expected {size}x{size} images (image_size of this autoencoder), got "
                f"{images.shape[-2]}x{images.shape[-1]}"
            )
        if self.config.check_finite and not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")

    def _check_latents(self, z: torch.Tensor) -> None:
        expected = (self.latent_channels, *self.latent_size)
        if z.ndim != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"expected latents of shape (B, {', '.join(map(str, expected))}), got {tuple(z.shape)}")
        if self.config.check_finite and not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or infinite values")

    # ---- bands and normalisation ----------------------------------------------------------------------------
    def split_bands(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, K, C, h, w), lowest frequencies first; ``merge_bands`` is its exact inverse."""
        return self.band_projector.split(z)

    def merge_bands(self, bands: torch.Tensor) -> torch.Tensor:
        return self.band_projector.merge(bands)

    def set_latent_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Install dataset statistics of the raw latent: shape (C, 1, 1) per channel or (C, h, w) per element."""
        c, (h, w) = self.latent_channels, self.latent_size
        kinds = {(c, 1, 1): "per_channel", (c, h, w): "per_element"}
        if tuple(mean.shape) != tuple(std.shape) or tuple(mean.shape) not in kinds:
            raise ValueError(f"latent statistics must both be ({c}, 1, 1) or ({c}, {h}, {w}); got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        if (std <= 0).any():
            raise ValueError("latents_std must be positive")
        device = self.latents_mean.device
        self.latents_mean = mean.detach().float().to(device)
        self.latents_std = std.detach().float().to(device)
        self.register_to_config(latents_stats=kinds[tuple(mean.shape)])

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.latents_mean.to(z), self.latents_std.to(z)
        return (z - mean) / std * self.config.scaling_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.latents_mean.to(z), self.latents_std.to(z)
        return z / self.config.scaling_factor * std + mean

    # ---- encoder side ---------------------------------------------------------------------------------------
    def _dct_lowpass(self, z: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The v2 low-pass: keep the first k zig-zag coefficients (random k while training)."""
        cfg = self.config
        if self.training and cfg.dct_lowpass_train_range:
            lo, hi = cfg.dct_lowpass_train_range
            b = z.shape[0]
            k = torch.randint(lo, hi + 1, (b,), generator=generator, device=z.device)
            apply = torch.rand(b, generator=generator, device=z.device) < cfg.dct_lowpass_train_prob
            k = torch.where(apply, k, torch.full_like(k, math.prod(self.latent_size)))
            return self.lowpass(z, k)
        if cfg.dct_lowpass_coefficients:
            return self.lowpass(z, cfg.dct_lowpass_coefficients)
        return z

    def lowpass(self, z: torch.Tensor, num_coefficients) -> torch.Tensor:
        """Keep the first N zig-zag DCT coefficients of every channel of z (B, C, h, w); N an int or (B,) counts."""
        return self.lowpass_transform.lowpass(z, num_coefficients)

    def encode_raw(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The un-normalised latent the decoder path works on (with training-time latent noise / low-pass)."""
        self._check_images(images)
        z = self.encoder(images)
        if self.training and self.config.latent_noise_tau > 0:
            sigma = torch.rand(z.shape[0], 1, 1, 1, generator=generator, device=z.device, dtype=z.dtype)
            z = z + sigma * self.config.latent_noise_tau * torch.randn(
                z.shape, generator=generator, device=z.device, dtype=z.dtype
            )
        return self._dct_lowpass(z, generator)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True, generator: Optional[torch.Generator] = None):
        """Images (B, 3, H, W) in [-1, 1] -> ``EncoderOutput(latent)``, the NORMALISED latent (B, C, h, w)."""
        if self.use_slicing and x.shape[0] > 1:
            z = torch.cat([self.encode_raw(chunk, generator) for chunk in x.split(1)])
        else:
            z = self.encode_raw(x, generator)
        latent = self.normalize_latents(z)
        return EncoderOutput(latent=latent) if return_dict else (latent,)

    # ---- decoder side ---------------------------------------------------------------------------------------
    def decode_raw(
        self, z: torch.Tensor, inject_noise: bool = False, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised latent -> (image in [-1, 1], bands)."""
        bands = self.split_bands(z)
        q = self.modulator(bands, inject_noise=inject_noise, generator=generator)
        return self.decoder(q), bands

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Optional[torch.Generator] = None):
        """Normalised latent (B, C, h, w) -> ``DecoderOutput(sample)``, images in [-1, 1] (not clamped)."""
        self._check_latents(z)
        chunks = z.split(1) if self.use_slicing and z.shape[0] > 1 else [z]
        image = torch.cat([self.decode_raw(self.denormalize_latents(c), False, generator)[0] for c in chunks])
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(
        self,
        sample: torch.Tensor,
        inject_noise: Optional[bool] = None,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        """Reconstruct images. ``inject_noise`` defaults to ``self.training`` (band noise is a training-time
        augmentation); the output also carries the raw latent and its bands for the training losses."""
        inject_noise = self.training if inject_noise is None else inject_noise
        z = self.encode_raw(sample, generator)
        image, bands = self.decode_raw(z, inject_noise, generator)
        if not return_dict:
            return image, z, bands
        return UAEOutput(sample=image, latent=z, bands=bands)
