"""One optimiser step under accelerate, the same for every model the training scripts train."""

import torch
from accelerate import Accelerator


def backward_and_step(accelerator: Accelerator, loss: torch.Tensor, model: torch.nn.Module, optimizer, lr_scheduler,
                      max_grad_norm: float) -> None:
    """accelerator.backward(loss); on gradient-sync micro-batches clip model's gradients to max_grad_norm (0: no
    clipping); then the (prepared, accumulation-aware) optimiser and LR scheduler step and the gradients are freed."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
