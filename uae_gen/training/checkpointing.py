"""Crash-safe training checkpoints on top of `accelerator.save_state` / `load_state`.

Layout: `output_dir/checkpoint-<global_step>/` holds what `save_state` writes (models, optimiser, scheduler, RNG
states, objects registered with `register_for_checkpointing` such as the EMA) plus `training_state.json`
(`{"global_step": N}`). A checkpoint is written into `output_dir/.tmp-checkpoint-<N>/`, the marker file goes in
last, and the folder is then renamed (atomic on POSIX). A crash therefore leaves either a complete
`checkpoint-<N>` or a temp folder that resuming ignores and the next save deletes; folders without the marker
are never resumed from (nor pruned).

Every process calls `save_checkpoint` (saving is collective under DeepSpeed / FSDP, and each rank writes its own
RNG state); only the main process renames and prunes. `output_dir` must be one file system all ranks share.
"""

import json
import os
import re
import shutil
from typing import Optional

from accelerate import Accelerator

CHECKPOINT_MARKER = "training_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def _complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(global_step, path) of every complete checkpoint in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for entry in os.scandir(output_dir):
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir() and os.path.isfile(os.path.join(entry.path, CHECKPOINT_MARKER)):
            found.append((int(match.group(1)), entry.path))
    return sorted(found)


def _replace_dir(source: str, destination: str) -> None:
    # os.rename cannot overwrite a non-empty folder: move an existing one aside (as a temp name), then drop it.
    if os.path.exists(destination):
        stale = os.path.join(os.path.dirname(destination), ".tmp-replaced-" + os.path.basename(destination))
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(destination, stale)
        os.rename(source, destination)
        shutil.rmtree(stale)
    else:
        os.rename(source, destination)


def make_readable(path: str) -> None:
    """Give the file `path`, or a folder and everything under it, the modes of ordinary new files and folders
    (0666 / 0777 less the umask). Call it before the atomic rename that publishes them."""
    # Why: safetensors >= 0.8 writes every file 0600 and tempfile.mkdtemp makes 0700 folders (other users can't read).
    try:  # the umask, read without changing it (Linux)
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, ValueError, IndexError, StopIteration):  # elsewhere: set and restored at once
        umask = os.umask(0o022)
        os.umask(umask)
    entries = [(path, os.path.isdir(path))]
    for root, folders, files in os.walk(path):
        entries += [(os.path.join(root, name), True) for name in folders]
        entries += [(os.path.join(root, name), False) for name in files]
    for entry, is_folder in entries:
        if not os.path.islink(entry):  # chmod would follow it to a file the writer did not make
            os.chmod(entry, (0o777 if is_folder else 0o666) & ~umask)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, global_step: int, total_limit: Optional[int] = None
) -> str:
    """Save the full training state as `output_dir/checkpoint-<global_step>` and return that path.

    total_limit: keep at most this many checkpoints, deleting the oldest (the new one is never deleted).
    Call on every process.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be at least 1 (or None to keep all), got {total_limit}")
    final_dir = os.path.join(output_dir, f"checkpoint-{global_step}")
    temp_dir = os.path.join(output_dir, f".tmp-checkpoint-{global_step}")

    if accelerator.is_main_process and os.path.isdir(output_dir):
        for entry in os.scandir(output_dir):  # left over by saves that crashed
            if entry.name.startswith(".tmp-") and entry.is_dir():
                shutil.rmtree(entry.path)
    accelerator.wait_for_everyone()
    accelerator.save_state(temp_dir)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        with open(os.path.join(temp_dir, CHECKPOINT_MARKER), "w") as marker:
            json.dump({"global_step": global_step}, marker)
        make_readable(temp_dir)
        _replace_dir(temp_dir, final_dir)
        if total_limit is not None:
            checkpoints = _complete_checkpoints(output_dir)
            for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
                if path != final_dir:
                    shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final_dir


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the complete checkpoint with the highest step in output_dir, or None if there is none."""
    checkpoints = _complete_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def checkpoint_step(checkpoint_dir: str) -> int:
    """The global step a checkpoint was saved at (from its marker file)."""
    marker = os.path.join(checkpoint_dir, CHECKPOINT_MARKER)
    if not os.path.isfile(marker):
        raise ValueError(f"{checkpoint_dir!r} is not a complete checkpoint: it has no {CHECKPOINT_MARKER}")
    with open(marker) as file:
        return int(json.load(file)["global_step"])


def resolve_resume_path(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """Turn the `--resume_from_checkpoint` flag into a checkpoint folder, or None to start from scratch.

    "latest" picks the newest complete checkpoint in output_dir (None if there is none yet). Anything else is a
    path, taken as given or relative to output_dir; it must be a complete checkpoint.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir)
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {resume_from_checkpoint!r} not found (also looked in {output_dir!r})")
    checkpoint_step(path)  # raises if the folder is incomplete
    return path


def write_json(path: str, value) -> None:
    """Write JSON through a temp file and an atomic rename: a reader never sees half a file."""
    with open(path + ".tmp", "w") as file:
        json.dump(value, file, indent=2)
    os.replace(path + ".tmp", path)
