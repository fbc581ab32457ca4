"""Learning-rate schedule: a warmup, then constant / linear / cosine decay to a final fraction of the peak LR.

Names follow the diffusers example flag `--lr_scheduler` and, with `final_lr_ratio=0`, give the same values as
`diffusers.optimization.get_scheduler`:
- "constant": the peak LR throughout (no warmup, as in diffusers, even if `num_warmup_steps` is set);
- "constant_with_warmup": warmup, then the peak LR;
- "linear": warmup, then linear decay to `final_lr_ratio * peak` at `num_training_steps`;
- "cosine": warmup, then half-cosine decay to `final_lr_ratio * peak` at `num_training_steps`.
After `num_training_steps` the LR stays at its final value.

Warmup ramps linearly from 0 (diffusers, `warmup_from_zero=True`) or holds the peak LR (`warmup_from_zero=False`:
the official UAE / RAE configs call a constant stretch before the decay "warmup").

The multiplier applies to each param group's own LR, so groups with different LRs keep their ratio. Under
accelerate the prepared scheduler steps `num_processes` times per optimiser step: pass step counts multiplied by
`accelerator.num_processes`, as the diffusers scripts do.
"""

import math
from typing import Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def get_lr_scheduler(
    name: str,
    optimizer: Optimizer,
    num_warmup_steps: int = 0,
    num_training_steps: Optional[int] = None,
    final_lr_ratio: float = 0.0,
    warmup_from_zero: bool = True,
) -> LambdaLR:
    """A LambdaLR for schedule `name` (one of LR_SCHEDULES); see the module docstring for the shapes."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr scheduler {name!r}; choose one of {LR_SCHEDULES}")
    if num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps must be non-negative, got {num_warmup_steps}")
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio}")
    decays = name in ("linear", "cosine")
    if decays and (num_training_steps is None or num_training_steps <= num_warmup_steps):
        raise ValueError(
            f"lr scheduler {name!r} needs num_training_steps > num_warmup_steps, got "
            f"num_training_steps={num_training_steps}, num_warmup_steps={num_warmup_steps}"
        )
    if name == "constant":
        num_warmup_steps = 0

    def lr_multiplier(step: int) -> float:
        if step < num_warmup_steps:
            return step / num_warmup_steps if warmup_from_zero else 1.0
        if not decays:
            return 1.0
        progress = min(1.0, (step - num_warmup_steps) / (num_training_steps - num_warmup_steps))
        shape = 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return final_lr_ratio + (1.0 - final_lr_ratio) * shape

    return LambdaLR(optimizer, lr_multiplier)
