"""Loss logging without a host sync per step: losses are summed on their device and read every --logging_steps."""

import math
from typing import Mapping, Optional

import numpy as np
import torch
from accelerate import Accelerator


class LossLogger:
    """Sums detached losses by name at every micro-batch. `step` advances the progress bar; every `logging_steps`
    optimiser steps, and at the last one, it averages the sums over those steps and all processes (one all-reduce,
    one host sync), shows them on the bar, sends them to the trackers and appends (step, logs) to `history`.
    Every process must add the same names."""

    def __init__(self, accelerator: Accelerator, progress, logging_steps: int, max_train_steps: int):
        self.accelerator, self.progress = accelerator, progress
        self.logging_steps, self.max_train_steps = logging_steps, max_train_steps
        self.sums, self.counts, self.history = {}, {}, []

    def add(self, losses: Mapping[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def step(self, global_step: int, lr: float) -> Optional[dict]:
        """Call after optimiser step `global_step`; the logged values on a logging step, else None."""
        self.progress.update(1)
        if global_step % self.logging_steps and global_step != self.max_train_steps:
            return None
        names, logs = sorted(self.sums), {}
        if names:
            means = torch.stack([self.sums[name] / self.counts[name] for name in names])
            logs = dict(zip(names, self.accelerator.reduce(means, "mean").tolist()))
        logs["lr"] = lr
        self.sums, self.counts = {}, {}
        self.history.append((global_step, logs))
        self.progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
        self.accelerator.log(logs, step=global_step)
        return logs

    @property
    def last_logs(self) -> dict:
        return self.history[-1][1] if self.history else {}


def loss_summary(points: list, max_points: int = 50) -> dict:
    """Of logged (step, loss) points: the means of the first and last tenth of them, the minimum, `window` (points
    per tenth) and a curve of at most max_points (last step, mean loss) chunks."""
    if not points:
        return {}
    steps, losses = [step for step, _ in points], [loss for _, loss in points]
    window, chunk = max(1, len(losses) // 10), math.ceil(len(losses) / max_points)
    curve = [[steps[min(i + chunk, len(steps)) - 1], float(np.mean(losses[i:i + chunk]))]
             for i in range(0, len(losses), chunk)]
    return {"first": float(np.mean(losses[:window])), "last": float(np.mean(losses[-window:])),
            "min": float(np.min(losses)), "window": window, "curve": curve}
