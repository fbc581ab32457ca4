"""The flags both training scripts share, spelled as in the diffusers example scripts, and their checks."""

import argparse
import warnings

from .lr_schedule import LR_SCHEDULES
from .performance import add_compile_arguments, check_device_arguments


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Preset, data loading, optimiser, LR schedule, EMA, precision, checkpoint and logging flags; each script
    adds its own and sets its defaults with ``parser.set_defaults``."""
    add, flag = parser.add_argument, argparse.BooleanOptionalAction
    add("--config", help="preset in uae_gen/configs (a name such as 'dit_tiny' or 'tiny') or a JSON path; its keys "
        "become flag defaults, flags on the command line win")
    add("--output_dir")
    add("--seed", type=int, default=0)
    add("--dataloader_num_workers", type=int, default=0)
    # optimisation
    add("--train_batch_size", type=int, default=8, help="per device")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--num_train_epochs", type=int, default=1)
    add("--max_train_steps", type=int, help="overrides --num_train_epochs")
    add("--learning_rate", type=float, default=2e-4)
    add("--lr_scheduler", choices=LR_SCHEDULES, default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--lr_warmup_epochs", type=float, help="warmup in epochs (overrides --lr_warmup_steps)")
    add("--lr_warmup_from_zero", action=flag, default=True, help="ramp from 0 (else hold the peak LR)")
    add("--lr_end", type=float, default=0.0, help="LR at the end of a linear / cosine decay (other param groups "
        "end at the same fraction of their own LR)")
    add("--lr_final_ratio", type=float, help=argparse.SUPPRESS)  # deprecated: lr_end = lr_final_ratio * learning_rate
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.95)
    add("--adam_weight_decay", type=float, default=0.0)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0, help="0 = no clipping")
    # EMA, precision, checkpoints, validation, logging
    add("--use_ema", action=flag, default=False)
    add("--ema_decay", type=float, default=0.9999)
    add("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: the accelerate config")
    add("--allow_tf32", action=flag, default=False, help="TF32 matmuls and cuDNN convolutions (Ampere+ GPUs)")
    add("--gradient_checkpointing", action=flag, default=False,
        help="recompute each transformer block in the backward pass: less activation memory, ~1/3 more compute")
    add_compile_arguments(parser, "trained model")
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int)
    add("--resume_from_checkpoint", help="'latest' or a checkpoint path")
    add("--validation_steps", type=int)
    add("--logging_steps", type=int, default=10, help="average, log and record the losses every N steps")
    add("--report_to", help="accelerate tracker: tensorboard, wandb, all (default: none)")
    add("--logging_dir", default="logs")
    add("--tracker_project_name")


def check_training_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError for out-of-range shared flags and for speed / precision flags this machine cannot honour
    (`check_device_arguments`); turn the deprecated --lr_final_ratio into --lr_end."""
    check_device_arguments(args)
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.validation_steps is not None and args.validation_steps < 1:
        raise ValueError(f"--validation_steps must be at least 1, got {args.validation_steps}")
    if args.lr_final_ratio is not None:
        warnings.warn("--lr_final_ratio is deprecated: use --lr_end (the final LR itself)", FutureWarning)
        args.lr_end, args.lr_final_ratio = args.lr_final_ratio * args.learning_rate, None
    if not 0.0 <= args.lr_end <= args.learning_rate:
        raise ValueError(f"--lr_end must lie in [0, learning_rate={args.learning_rate}], got {args.lr_end}")
