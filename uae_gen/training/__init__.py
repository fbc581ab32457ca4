"""Accelerate glue shared by the training scripts (uae_gen/scripts): shared flags and presets, Accelerator and
data-loader set-up, speed flags (torch.compile, attention backend) and their start-up checks, checkpoint hooks and
resume, reproducible data order, the optimiser step, EMA, LR schedule, loss logging and sample grids."""

from .accelerator_setup import (
    make_accelerator,
    make_adamw,
    make_lr_scheduler,
    make_train_dataloader,
    register_pretrained_hooks,
    resume_from_checkpoint,
)
from .arguments import add_training_arguments, check_training_arguments
from .checkpointing import (
    CHECKPOINT_MARKER,
    checkpoint_step,
    find_latest_checkpoint,
    make_readable,
    resolve_resume_path,
    save_checkpoint,
    write_json,
)
from .data_order import EpochShuffleSampler, ResumePosition, batch_seed, resume_position, resumed_batches
from .ema import EMA
from .image_grid import save_image_grid
from .loss_log import LossLogger, loss_summary
from .lr_schedule import LR_SCHEDULES, get_lr_scheduler
from .optimizer_step import backward_and_step
from .performance import (
    COMPILE_MODES,
    add_attention_backend_argument,
    add_compile_arguments,
    check_device_arguments,
    compile_module,
    run_device_type,
)
from .presets import CONFIG_DIR, parse_args_with_preset, read_preset

__all__ = [
    "CHECKPOINT_MARKER",
    "COMPILE_MODES",
    "CONFIG_DIR",
    "EMA",
    "EpochShuffleSampler",
    "LR_SCHEDULES",
    "ResumePosition",
    "LossLogger",
    "add_attention_backend_argument",
    "add_compile_arguments",
    "add_training_arguments",
    "backward_and_step",
    "batch_seed",
    "check_device_arguments",
    "check_training_arguments",
    "checkpoint_step",
    "compile_module",
    "find_latest_checkpoint",
    "get_lr_scheduler",
    "loss_summary",
    "make_accelerator",
    "make_adamw",
    "make_lr_scheduler",
    "make_readable",
    "make_train_dataloader",
    "parse_args_with_preset",
    "read_preset",
    "register_pretrained_hooks",
    "resolve_resume_path",
    "resume_from_checkpoint",
    "resume_position",
    "resumed_batches",
    "run_device_type",
    "save_checkpoint",
    "save_image_grid",
    "write_json",
]
