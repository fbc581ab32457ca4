"""LPIPS perceptual distance with a VGG16 backbone (Zhang et al. 2018), the variant used by
taming-transformers, RAE and UAE as the perceptual reconstruction loss.

    d(x, y) = sum_l mean_{h,w} w_l . (n(f_l(x)) - n(f_l(y)))^2

f_l are VGG16 features after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the "scaled" input,
n() normalises each feature vector to unit length over channels, and w_l >= 0 are the learned
1x1 "linear" calibration layers. Inputs are images in [-1, 1].

Weights never download. The VGG16 backbone comes from a local file holding torchvision's `vgg16`
state dict (`features.N.weight/bias`; `classifier.*` is ignored), as safetensors or a torch file.
The linear layers come from a local file or, by default, from the `lpips` PyPI package, which ships
them as `lpips/weights/v0.1/vgg.pth` (only that file is read; its model classes are not used).
"""

import importlib.util
import os
import re
from typing import Optional

import torch
import torch.nn as nn

from .state_dict_file import read_state_dict

# torchvision's VGG16 ("D") feature stack; integers are conv widths, "M" is a 2x2 max pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Exclusive end indices in `features` of the five taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_TAP_ENDS = (4, 9, 16, 23, 30)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


def build_vgg16_features() -> nn.Sequential:
    """VGG16 convolutional stack up to relu5_3, index-compatible with torchvision's `vgg16().features`."""
    layers, in_channels = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return nn.Sequential(*layers)


def lpips_package_linear_weights_path() -> str:
    """Path of the LPIPS v0.1 VGG linear-layer weights shipped inside the `lpips` PyPI package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "LPIPS linear-layer weights: the `lpips` package is not installed (`pip install lpips`); "
            "or pass linear_weights_path= a local file"
        )
    return os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")


def _unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # Unit length over channels at every position, as in the reference implementation.
    norm = torch.sqrt(torch.sum(features**2, dim=1, keepdim=True))
    return features / (norm + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG16) distance; gradients flow to the images, never to its own weights.

    Args:
        vgg_weights_path: local torchvision `vgg16` state dict (safetensors or torch file). Required
            unless `random_weights=True`.
        linear_weights_path: local file with the five linear layers (keys `lin{k}.model.1.weight` as in
            the `lpips`/taming files, or `linear_layers.{k}.weight`). Default: the copy inside the `lpips`
            package.
        random_weights: build with random weights (tests only; the distance is then meaningless but
            keeps its properties: zero on identical images, symmetric, non-negative).
    """

    def __init__(
        self,
        vgg_weights_path: Optional[str] = None,
        linear_weights_path: Optional[str] = None,
        random_weights: bool = False,
    ):
        super().__init__()
        # Maps [-1, 1] images to the statistics the LPIPS linear layers were calibrated on.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = build_vgg16_features()
        self.linear_layers = nn.ModuleList(
            nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in VGG16_TAP_CHANNELS
        )

        if random_weights:
            if vgg_weights_path is not None or linear_weights_path is not None:
                raise ValueError("LPIPS: random_weights=True cannot be combined with weight paths")
            # Trained LPIPS linear weights are constrained to be non-negative; keep that property.
            for layer in self.linear_layers:
                nn.init.uniform_(layer.weight, 0.0, 1.0)
        else:
            if vgg_weights_path is None:
                raise ValueError(
                    "LPIPS needs VGG16 backbone weights: pass vgg_weights_path= a local file holding "
                    "torchvision's vgg16 state dict (e.g. saved with safetensors.torch.save_file("
                    "torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.safetensors')); "
                    "random_weights=True is for tests only"
                )
            self.load_vgg_weights(vgg_weights_path)
            self.load_linear_weights(linear_weights_path or lpips_package_linear_weights_path())

        self.requires_grad_(False)
        self.eval()

    def load_vgg_weights(self, path: str) -> None:
        """Load torchvision `vgg16` weights (only `features.*` up to relu5_3 are used)."""
        state_dict = read_state_dict(path, "LPIPS VGG16 backbone")
        own_keys = self.features.state_dict().keys()
        features = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
        features = {k: v for k, v in features.items() if k in own_keys}
        missing = sorted(set(own_keys) - set(features))
        if missing:
            raise ValueError(f"LPIPS VGG16 backbone: {path!r} lacks torchvision vgg16 keys features.{missing}")
        self.features.load_state_dict(features)

    def load_linear_weights(self, path: str) -> None:
        """Load the five 1x1 calibration layers from an `lpips`/taming `vgg.pth`-style file."""
        state_dict = read_state_dict(path, "LPIPS linear layers")
        weights = {}
        for key, value in state_dict.items():
            match = re.fullmatch(r"lin(\d)\.model\.\d\.weight|linear_layers\.(\d)\.weight", key)
            if match:
                weights[f"{match.group(1) or match.group(2)}.weight"] = value
        missing = sorted(set(self.linear_layers.state_dict().keys()) - set(weights))
        if missing:
            raise ValueError(f"LPIPS linear layers: {path!r} lacks weights for layers {missing}")
        self.linear_layers.load_state_dict(weights)

    def train(self, mode: bool = True) -> "LPIPS":
        # A fixed metric: never switch to training behaviour.
        return super().train(False)

    def _tap_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        hidden = (images - self.shift) / self.scale
        taps, start = [], 0
        for end in VGG16_TAP_ENDS:
            hidden = self.features[start:end](hidden)
            taps.append(hidden)
            start = end
        return taps

    def forward(self, input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """LPIPS distance between two batches of [-1, 1] images (B, 3, H, W).

        reduction="mean" averages over the batch (a scalar loss); "none" returns one distance per image (B,).
        """
        if input.shape != target.shape or input.ndim != 4 or input.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) batches of the same shape, got {tuple(input.shape)} "
                f"and {tuple(target.shape)}"
            )
        if reduction not in ("mean", "none"):
            raise ValueError(f"LPIPS reduction must be 'mean' or 'none', got {reduction!r}")
        # One backbone pass over both batches.
        taps = self._tap_features(torch.cat([input, target], dim=0))
        distance = 0.0
        for features, linear in zip(taps, self.linear_layers):
            input_features, target_features = features.chunk(2, dim=0)
            squared_difference = (_unit_normalize(input_features) - _unit_normalize(target_features)) ** 2
            distance = distance + linear(squared_difference).mean(dim=(1, 2, 3))
        return distance.mean() if reduction == "mean" else distance
