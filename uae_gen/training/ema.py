"""Exponential moving average of model weights, as DiT / SiT / RAE keep it.

A deep copy of the model is the EMA from the start (equivalent to DiT's sync with decay 0), and every update
uses one fixed decay: ema <- decay * ema + (1 - decay) * param. Buffers are copied, not averaged. (diffusers'
EMAModel instead ramps the decay up over ~10^5 steps and ignores buffers, see ecosystem.md 1.8.)

`EMA` has `state_dict` / `load_state_dict`, so `accelerator.register_for_checkpointing(ema)` puts it into
`save_state` / `load_state`. `ema.model` is an ordinary module (a `ModelMixin` stays one), ready for sampling or
`save_pretrained`.
"""

import copy
from typing import Any, Optional

import torch
from torch import nn


class EMA:
    """Fixed-decay EMA of `model`'s parameters (and a copy of its buffers) in `self.model`.

    Build it from the unwrapped model once that model sits on its training device (after `accelerator.prepare`,
    from `accelerator.unwrap_model(model)`), and call `update(model)` after each optimiser step. If weights are
    loaded into the model after construction, call `update(model, decay=0.0)` to re-sync.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, decay: Optional[float] = None) -> None:
        """ema <- decay * ema + (1 - decay) * param for every parameter; buffers are copied."""
        decay = self.decay if decay is None else decay
        # Pairing by position works for the bare model and for DDP / compiled wrappers around it.
        for ema_param, param in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_param.lerp_(param.detach(), 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s parameters and buffers with the EMA ones."""
        for ema_tensor, tensor in zip(self.model.parameters(), model.parameters(), strict=True):
            tensor.copy_(ema_tensor)
        for ema_tensor, tensor in zip(self.model.buffers(), model.buffers(), strict=True):
            tensor.copy_(ema_tensor)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict["model"])
        self.decay = state_dict["decay"]
        self.num_updates = state_dict["num_updates"]
