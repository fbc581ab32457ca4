"""The frequency-band modulator: noise on the high bands while training, then the spectral transform.

Given bands b (B, K, C, h, w) it returns the decoder input q = Delta + sum_k b_k, where Delta is a residual
predicted by two 3x3 convolutions with SiLU over the channel-concatenated bands. Our last convolution starts at
zero, so at initialisation q == sum_k b_k == z exactly and the decoder first learns on the true latent.

Noise (training only): for each sample, with probability ``noise_prob``, bands >= ``noise_from_band`` receive
band-limited Gaussian noise sigma * split(eps)_k with sigma ~ U(0, noise_sigma). The modulator is built with the
``BandProjector`` that splits the latent and splits the noise with it, so the noise really lives in the high bands
and band 0 (the semantics) is never touched.

Released-v1 compatibility: ``mix_layers`` stacked K x K band-mixing matrices (identity init) before the fusion,
and ``zero_init=False`` for the official default conv initialisation. RAE compatibility: ``hidden_channels=0``
builds no spectral transform, so q == sum_k b_k always (RAE has no modulator).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .bands import BandProjector


class BandMixing(nn.Module):
    """b'_i = sum_j W_ij b_j over whole bands (the released v1 code's spectral layers), identity at init."""

    def __init__(self, num_bands: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(num_bands))

    def forward(self, bands: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bj...->bi...", self.weight.to(bands.dtype), bands)


class SpectralTransform(nn.Module):
    """Conv3x3(K*C -> hidden) -> SiLU -> Conv3x3(hidden -> C): the residual Delta added to the band sum."""

    def __init__(self, num_bands: int, channels: int, hidden_channels: int, zero_init: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(num_bands * channels, hidden_channels, 3, padding=1)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, bands: torch.Tensor) -> torch.Tensor:
        b, k, c, h, w = bands.shape
        return self.conv_out(self.act(self.conv_in(bands.reshape(b, k * c, h, w))))


class FrequencyBandModulator(nn.Module):
    """Bands (B, K, C, h, w) -> decoder input q = Delta + sum_k b_k, with band-limited noise on the high bands.

    ``projector`` is the latent's ``BandProjector`` (shared, it holds no weights): K comes from it and the noise is
    split by it.
    """

    def __init__(
        self,
        projector: BandProjector,
        channels: int,
        hidden_channels: Optional[int] = None,
        zero_init: bool = True,
        mix_layers: int = 0,
        noise_sigma: float = 0.8,
        noise_prob: float = 1.0,
        noise_from_band: int = 1,
    ):
        super().__init__()
        num_bands = projector.num_bands
        if not 0 <= noise_from_band <= num_bands:
            raise ValueError(f"noise_from_band must lie in [0, {num_bands}], got {noise_from_band}")
        hidden_channels = max(2 * channels, 512) if hidden_channels is None else hidden_channels
        self.projector, self.num_bands = projector, num_bands
        self.noise_sigma, self.noise_prob, self.noise_from_band = noise_sigma, noise_prob, noise_from_band
        self.mixing = nn.Sequential(*[BandMixing(num_bands) for _ in range(mix_layers)])
        self.spectral_transform = (
            SpectralTransform(num_bands, channels, hidden_channels, zero_init) if hidden_channels > 0 else None
        )

    def add_band_noise(self, bands: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Band-limited noise on bands >= noise_from_band, per-sample sigma ~ U(0, noise_sigma), applied with
        probability noise_prob per sample."""
        b = bands.shape[0]
        eps = torch.randn(bands[:, 0].shape, generator=generator, device=bands.device, dtype=bands.dtype)
        noise_bands = self.projector.split(eps)
        sigma = torch.rand(b, generator=generator, device=bands.device, dtype=bands.dtype) * self.noise_sigma
        apply = torch.rand(b, generator=generator, device=bands.device) < self.noise_prob
        band_is_noised = torch.arange(self.num_bands, device=bands.device) >= self.noise_from_band
        scale = sigma * apply.to(bands.dtype)
        return bands + scale.view(b, 1, 1, 1, 1) * band_is_noised.view(1, -1, 1, 1, 1).to(bands.dtype) * noise_bands

    def forward(
        self, bands: torch.Tensor, *, inject_noise: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """(B, K, C, h, w) bands -> (B, C, h, w) decoder input q = Delta + sum_k b_k."""
        if inject_noise and self.noise_sigma > 0:
            bands = self.add_band_noise(bands, generator=generator)
        bands = self.mixing(bands)
        if self.spectral_transform is None:
            return bands.sum(dim=1)
        return self.spectral_transform(bands) + bands.sum(dim=1)
