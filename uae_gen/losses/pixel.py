"""Pixel reconstruction losses (L1 and L2) between a decoded image and its target.

Both are means over every element (batch, channels, pixels), as in the official training loops
(`F.l1_loss(recon, images)`). Unlike `torch.nn.functional`, mismatched shapes are an error instead of
a silent broadcast.
"""

import torch
import torch.nn.functional as F


def _check_same_shape(reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction and target must have the same shape, got {tuple(reconstruction.shape)} "
            f"and {tuple(target.shape)}"
        )


def l1_reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements."""
    _check_same_shape(reconstruction, target)
    return F.l1_loss(reconstruction, target)


def l2_reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    _check_same_shape(reconstruction, target)
    return F.mse_loss(reconstruction, target)
