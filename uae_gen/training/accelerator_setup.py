"""The Accelerate set-up both training scripts share: the Accelerator, the data loader and step counts, AdamW and
its LR schedule, checkpoint hooks that store models as from_pretrained folders, and resuming."""

import argparse
import math
import os
from typing import Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset

from .checkpointing import checkpoint_step, resolve_resume_path
from .data_order import EpochShuffleSampler
from .ema import EMA
from .lr_schedule import get_lr_scheduler
from .performance import check_device_arguments

logger = get_logger(__name__)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's Accelerator (accumulation, precision (fp16 with accelerate's GradScaler), trackers under
    output_dir/logging_dir); refuses precision / attention flags its device cannot honour, applies --allow_tf32,
    creates output_dir, starts the trackers and seeds every RNG with --seed."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=args.report_to, project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    # Checked again with what accelerate chose (precision from its config, the actual device); parse_args checked
    # the flags already, so this only catches a launch configuration the flags did not show.
    check_device_arguments(args, accelerator.device.type, accelerator.mixed_precision)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.report_to:
        accelerator.init_trackers(args.tracker_project_name, config={
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    set_seed(args.seed)
    return accelerator


def make_train_dataloader(accelerator: Accelerator, dataset: Dataset, args: argparse.Namespace):
    """(prepared DataLoader in EpochShuffleSampler order, optimiser steps per epoch, max_train_steps)."""
    if len(dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(f"{len(dataset)} training samples are fewer than one global batch "
                         f"({args.train_batch_size} x {accelerator.num_processes} processes)")
    dataloader = accelerator.prepare(DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=EpochShuffleSampler(dataset, args.seed), drop_last=True,
        num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available()))
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    return dataloader, steps_per_epoch, args.max_train_steps or args.num_train_epochs * steps_per_epoch


def make_adamw(params: Iterable, args: argparse.Namespace, lr: Optional[float] = None) -> torch.optim.AdamW:
    """AdamW with the --adam_* flags. Fused: one kernel per step instead of the for-loop's ~10 passes with
    full-size temporaries per parameter."""
    lr, betas = args.learning_rate if lr is None else lr, (args.adam_beta1, args.adam_beta2)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                             fused=True)


def make_lr_scheduler(optimizer, args: argparse.Namespace, accelerator: Accelerator, num_training_steps: int,
                      steps_per_epoch: int):
    """The --lr_scheduler schedule over num_training_steps optimiser steps, ending at lr_end / learning_rate of
    each group's LR. Step counts are multiplied by num_processes: the prepared scheduler steps once per process."""
    warmup_steps = args.lr_warmup_steps
    if args.lr_warmup_epochs is not None:
        warmup_steps = round(args.lr_warmup_epochs * steps_per_epoch)
    n = accelerator.num_processes
    return get_lr_scheduler(args.lr_scheduler, optimizer, warmup_steps * n, max(num_training_steps, 1) * n,
                            args.lr_end / args.learning_rate, args.lr_warmup_from_zero)


def register_pretrained_hooks(accelerator: Accelerator, model, ema: Optional[EMA], subfolder: str) -> None:
    """Checkpoints hold the unwrapped `model` (a ModelMixin) and its EMA as from_pretrained folders `subfolder/`
    and `subfolder_ema/` instead of in accelerate's model files; other prepared models stay accelerate's."""

    def index_in(models):
        return next(i for i, prepared in enumerate(models) if accelerator.unwrap_model(prepared) is model)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            model.save_pretrained(os.path.join(output_dir, subfolder))
            if ema is not None:
                ema.model.save_pretrained(os.path.join(output_dir, f"{subfolder}_ema"))
        if weights:  # on every rank: accelerate must not write the model's weights as well
            weights.pop(index_in(models))

    def load_hook(models, input_dir):
        models.pop(index_in(models))
        model.load_state_dict(type(model).from_pretrained(os.path.join(input_dir, subfolder)).state_dict())
        if ema is None:
            return
        ema_dir = os.path.join(input_dir, f"{subfolder}_ema")
        if os.path.isdir(ema_dir):
            ema.model.load_state_dict(type(model).from_pretrained(ema_dir).state_dict())
        else:
            logger.warning(f"{input_dir} has no {subfolder}_ema; the EMA restarts from the loaded weights")
            ema.update(model, decay=0.0)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_from_checkpoint(accelerator: Accelerator, args: argparse.Namespace) -> tuple[int, Optional[str]]:
    """Load --resume_from_checkpoint ('latest' or a path) into the prepared objects; (global_step, checkpoint
    path), or (0, None) when there is nothing to resume."""
    path = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        return 0, None
    accelerator.load_state(path)
    global_step = checkpoint_step(path)
    logger.info(f"resumed from {path} at step {global_step}", main_process_only=True)
    return global_step, path
