"""Reproducible data order, so a resumed run sees exactly the batches an uninterrupted run would.

`EpochShuffleSampler` draws epoch e's order from seed + e alone (no hidden RNG state), so every rank agrees on
it and a restarted process can regenerate any epoch. `resume_position` says where in that order a checkpoint
stopped, and `resumed_batches` runs the epochs from there:

    train_dataloader = DataLoader(dataset, batch_size, sampler=EpochShuffleSampler(dataset, seed), drop_last=True)
    train_dataloader = accelerator.prepare(train_dataloader)
    for epoch, batch_index, batch in resumed_batches(accelerator, train_dataloader, global_step, max_train_steps):
        with accelerator.accumulate(model):
            ...
"""

from typing import Any, Iterator, NamedTuple, Sized

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh random permutation of range(len(data_source)) per epoch, seeded with seed + epoch."""

    def __init__(self, data_source: Sized, seed: int = 0):
        self.num_samples = len(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumePosition(NamedTuple):
    epoch: int
    batches_to_skip: int


def resume_position(global_step: int, batches_per_epoch: int, gradient_accumulation_steps: int = 1) -> ResumePosition:
    """Epoch and number of batches already consumed in it after `global_step` optimiser steps.

    batches_per_epoch is `len(prepared_dataloader)` (per process). accelerate ends an accumulation cycle at the
    end of each epoch, so an epoch holds ceil(batches_per_epoch / gradient_accumulation_steps) optimiser steps.
    """
    if global_step < 0:
        raise ValueError(f"global_step must be non-negative, got {global_step}")
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be at least 1, got {batches_per_epoch}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be at least 1, got {gradient_accumulation_steps}")
    steps_per_epoch = -(-batches_per_epoch // gradient_accumulation_steps)
    epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    return ResumePosition(epoch, steps_into_epoch * gradient_accumulation_steps)


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int) -> int:
    """An independent RNG seed per (run seed, epoch, batch within the epoch, process): training draws seeded from
    it do not depend on hidden RNG state, so a resumed run makes exactly the same draws."""
    return int(np.random.SeedSequence([seed, epoch, batch_index, rank]).generate_state(1)[0])


def resumed_batches(accelerator, dataloader, global_step: int, max_train_steps: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batch index within the epoch, batch) of a prepared `dataloader`, from where `global_step` optimiser
    steps stopped up to the last batch of step `max_train_steps`; accumulation is the accelerator's."""
    accumulation, batches_per_epoch = accelerator.gradient_accumulation_steps, len(dataloader)
    steps_per_epoch = -(-batches_per_epoch // accumulation)
    epoch, skip = resume_position(global_step, batches_per_epoch, accumulation)
    while global_step < max_train_steps and epoch * steps_per_epoch < max_train_steps:
        stop = min(batches_per_epoch, (max_train_steps - epoch * steps_per_epoch) * accumulation)
        dataloader.set_epoch(epoch)  # before skip_first_batches: it must reach the shared sampler
        # The skipping loader serves the first resumed epoch only (accelerate#1451).
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch_index, batch in enumerate(loader, start=skip):
            yield epoch, batch_index, batch
            if batch_index + 1 == stop < batches_per_epoch:  # the run ends mid-epoch
                return
        epoch, skip = epoch + 1, 0
