"""Semantic band loss: keeps the low-frequency ("semantic") bands of the trainable UAE encoder's latent
close to the same bands of a frozen copy of the original semantic encoder (the paper's band regulariser).

    L_sem = 1/K_base * sum_{k < K_base} mean_{b, c, i, j} (f_u^k - f_s^k)^2

f_u^k is band k of the student (UAE) latent and f_s^k band k of the teacher latent, both split by the
same band projector into (B, K, C, h, w). Reduction: the squared difference is averaged over batch,
channels and positions within each band, then over the K_base base bands; as all bands have the same
size this equals `F.mse_loss` on the first K_base bands. The teacher is detached: no gradient ever
reaches it, and bands k >= K_base get exactly zero gradient.
"""

import torch
import torch.nn.functional as F


def semantic_band_loss(
    student_bands: torch.Tensor, teacher_bands: torch.Tensor, num_base_bands: int = 1
) -> torch.Tensor:
    """Mean squared distance between the first `num_base_bands` bands of student and (detached) teacher."""
    if student_bands.ndim != 5 or teacher_bands.ndim != 5:
        raise ValueError(
            f"bands must be (B, K, C, h, w) tensors, got student {tuple(student_bands.shape)} "
            f"and teacher {tuple(teacher_bands.shape)}"
        )
    if student_bands.shape[:1] + student_bands.shape[2:] != teacher_bands.shape[:1] + teacher_bands.shape[2:]:
        raise ValueError(
            f"student and teacher bands differ in batch, channels or size: {tuple(student_bands.shape)} "
            f"vs {tuple(teacher_bands.shape)}"
        )
    num_bands = min(student_bands.shape[1], teacher_bands.shape[1])
    if not 1 <= num_base_bands <= num_bands:
        raise ValueError(f"num_base_bands must be in [1, {num_bands}], got {num_base_bands}")
    return F.mse_loss(student_bands[:, :num_base_bands], teacher_bands[:, :num_base_bands].detach())
