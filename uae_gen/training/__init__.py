"""Accelerate glue shared by train/train_tokenizer.py and train/train_dit.py: EMA, LR schedule, crash-safe
checkpoints, reproducible data order for resuming, sample grids, and the CPU allocator setting."""

from .cpu_memory import retain_freed_memory
from .checkpointing import (
    CHECKPOINT_MARKER,
    checkpoint_step,
    find_latest_checkpoint,
    resolve_resume_path,
    save_checkpoint,
    write_json,
)
from .data_order import EpochShuffleSampler, batch_seed, ResumePosition, resume_position
from .ema import EMA
from .image_grid import save_image_grid
from .presets import read_preset
from .lr_schedule import LR_SCHEDULES, get_lr_scheduler

__all__ = [
    "CHECKPOINT_MARKER",
    "EMA",
    "EpochShuffleSampler",
    "LR_SCHEDULES",
    "ResumePosition",
    "checkpoint_step",
    "find_latest_checkpoint",
    "get_lr_scheduler",
    "resolve_resume_path",
    "resume_position",
    "retain_freed_memory",
    "save_checkpoint",
    "save_image_grid",
    "write_json",
    "batch_seed",
    "read_preset",
]
