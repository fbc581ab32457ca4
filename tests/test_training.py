"""uae_gen.training: EMA, LR schedules, crash-safe checkpoints with accelerate, resume data order, image grids,
presets merged into argparse, loss logging, the speed flags' start-up checks (and cache_latents' use of them)."""

import argparse
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from uae_gen.models import attention as attention_module
from uae_gen.training import (
    COMPILE_MODES,
    EMA,
    EpochShuffleSampler,
    LossLogger,
    add_training_arguments,
    check_device_arguments,
    checkpoint_step,
    find_latest_checkpoint,
    get_lr_scheduler,
    loss_summary,
    make_readable,
    parse_args_with_preset,
    read_preset,
    resolve_resume_path,
    resume_position,
    resumed_batches,
    save_checkpoint,
    save_image_grid,
)
from uae_gen.training import checkpointing

from .file_modes import unreadable_entries


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


# --------------------------------------------------------------------------------------------------- EMA


def test_ema_update_matches_formula_and_copies_buffers():
    model = _tiny_model()
    ema = EMA(model, decay=0.9)
    for name, tensor in ema.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])  # starts synced
    assert not any(p.requires_grad for p in ema.model.parameters())

    for _ in range(2):
        previous = {name: p.clone() for name, p in ema.model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 4))  # moves the BatchNorm running statistics
        ema.update(model)
        for name, param in model.named_parameters():
            expected = 0.9 * previous[name] + 0.1 * param
            torch.testing.assert_close(dict(ema.model.named_parameters())[name], expected)
        for name, buffer in model.named_buffers():
            assert torch.equal(dict(ema.model.named_buffers())[name], buffer)
    assert ema.num_updates == 2

    ema.update(model, decay=0.0)  # explicit re-sync
    for name, param in model.named_parameters():
        assert torch.equal(dict(ema.model.named_parameters())[name], param)


def test_ema_state_dict_round_trip_and_copy_to():
    ema = EMA(_tiny_model(0), decay=0.99)
    ema.update(_tiny_model(1))
    restored = EMA(_tiny_model(2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.99 and restored.num_updates == 1
    for name, tensor in ema.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor)

    target = _tiny_model(3)
    restored.copy_to(target)
    for name, tensor in ema.model.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def test_ema_rejects_bad_decay_and_mismatched_model():
    with pytest.raises(ValueError, match="decay"):
        EMA(_tiny_model(), decay=1.5)
    with pytest.raises(ValueError):
        EMA(_tiny_model()).update(nn.Linear(4, 3))


# ----------------------------------------------------------------------------------------------- LR schedule


def _lrs(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def _optimizer(lrs=(2.0,)):
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def test_linear_and_cosine_schedules_follow_formula():
    warmup, total, final = 4, 12, 0.1
    for name in ("linear", "cosine"):
        optimizer = _optimizer((2.0, 0.5))
        values = _lrs(get_lr_scheduler(name, optimizer, warmup, total, final_lr_ratio=final), 16)
        for step, (lr, second_group_lr) in enumerate(values):
            if step < warmup:
                multiplier = step / warmup
            else:
                progress = min(1.0, (step - warmup) / (total - warmup))
                shape = 1 - progress if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
                multiplier = final + (1 - final) * shape
            assert lr == pytest.approx(2.0 * multiplier)
            assert second_group_lr == pytest.approx(0.5 * multiplier)  # groups keep their own peak LR
        assert values[2][0] == pytest.approx(1.0)  # half-way through warmup
        assert values[8][0] == pytest.approx(2.0 * 0.55)  # mid-decay: both shapes are at (1 + final) / 2
        assert values[15][0] == pytest.approx(0.2)  # held at the final LR after the decay


def test_constant_warmup_holds_peak_lr_official_style():
    values = _lrs(get_lr_scheduler("linear", _optimizer(), 3, 7, final_lr_ratio=0.5, warmup_from_zero=False), 8)
    assert [v[0] for v in values] == pytest.approx([2.0, 2.0, 2.0, 2.0, 1.75, 1.5, 1.25, 1.0])


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_schedules_equal_diffusers_get_scheduler(name):
    # Compared up to num_training_steps: past it diffusers' cosine climbs again, ours stays at the final LR.
    ours = [lr for (lr,) in _lrs(get_lr_scheduler(name, _optimizer(), 5, 20), 21)]
    theirs = [lr for (lr,) in _lrs(get_scheduler(name, _optimizer(), num_warmup_steps=5, num_training_steps=20), 21)]
    assert ours == pytest.approx(theirs)


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="unknown lr scheduler"):
        get_lr_scheduler("polynomial", _optimizer())
    with pytest.raises(ValueError, match="num_training_steps"):
        get_lr_scheduler("cosine", _optimizer(), num_warmup_steps=10, num_training_steps=10)
    with pytest.raises(ValueError, match="final_lr_ratio"):
        get_lr_scheduler("linear", _optimizer(), 0, 10, final_lr_ratio=2.0)


# ------------------------------------------------------------------------------------------------ checkpoints


def _train_steps(accelerator, model, optimizer, scheduler, ema, steps):
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.update(model)


def _snapshot(model, ema, optimizer, scheduler):
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": {k: v.clone() for k, v in ema.model.state_dict().items()},
        "exp_avg": [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()],
        "scheduler_step": scheduler.scheduler.last_epoch,
    }


def _assert_same(a, b):
    assert a["scheduler_step"] == b["scheduler_step"]
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for x, y in zip(a["exp_avg"], b["exp_avg"], strict=True):
        assert torch.equal(x, y)


def test_make_readable_gives_safetensors_files_and_mkdtemp_folders_the_modes_of_new_ones(tmp_path):
    """safetensors >= 0.8 writes 0600 files and mkdtemp makes 0700 folders; make_readable follows the umask (here a
    stricter one than usual), for one file or a whole tree, and leaves the target of a symlink alone."""
    from safetensors.torch import save_file

    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o600)
    previous = os.umask(0o027)
    try:
        folder = tempfile.mkdtemp(dir=tmp_path)
        os.makedirs(os.path.join(folder, "sub"))
        for path in (os.path.join(folder, "sub", "a.safetensors"), str(tmp_path / "single.safetensors")):
            save_file({"a": torch.zeros(1)}, path)
        os.symlink(outside, os.path.join(folder, "link"))
        assert os.stat(folder).st_mode & 0o777 == 0o700
        assert os.stat(tmp_path / "single.safetensors").st_mode & 0o777 == 0o600
        make_readable(folder)
        make_readable(str(tmp_path / "single.safetensors"))
    finally:
        os.umask(previous)
    modes = {os.path.relpath(p, tmp_path): os.stat(p).st_mode & 0o777
             for p in [folder, os.path.join(folder, "sub"), os.path.join(folder, "sub", "a.safetensors"),
                       tmp_path / "single.safetensors", outside]}
    name = os.path.basename(folder)
    assert modes == {name: 0o750, f"{name}/sub": 0o750, f"{name}/sub/a.safetensors": 0o640,
                     "single.safetensors": 0o640, "outside.txt": 0o600}


def test_checkpoints_prune_survive_a_crash_and_reload_exactly(tmp_path, monkeypatch):
    output_dir = str(tmp_path / "run")
    accelerator = Accelerator(cpu=True)
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_lr_scheduler("linear", optimizer, 2, 10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(accelerator.unwrap_model(model), decay=0.5)
    accelerator.register_for_checkpointing(ema)

    for step in (1, 2, 3):
        _train_steps(accelerator, model, optimizer, scheduler, ema, 1)
        path = save_checkpoint(accelerator, output_dir, step, total_limit=2)
        assert path == os.path.join(output_dir, f"checkpoint-{step}")
    at_step_3 = _snapshot(model, ema, optimizer, scheduler)
    assert sorted(os.listdir(output_dir)) == ["checkpoint-2", "checkpoint-3"]
    assert unreadable_entries(output_dir) == []  # safetensors writes 0600; save_checkpoint fixes the modes
    assert find_latest_checkpoint(output_dir) == os.path.join(output_dir, "checkpoint-3")
    assert checkpoint_step(find_latest_checkpoint(output_dir)) == 3

    # Crash between writing and renaming step 4; plus a stray incomplete folder with a higher step.
    _train_steps(accelerator, model, optimizer, scheduler, ema, 1)

    def crash(*args):
        raise OSError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.os, "rename", crash)
        with pytest.raises(OSError, match="simulated crash"):
            save_checkpoint(accelerator, output_dir, 4, total_limit=2)
    assert os.path.isdir(os.path.join(output_dir, ".tmp-checkpoint-4"))
    os.makedirs(os.path.join(output_dir, "checkpoint-9"))
    open(os.path.join(output_dir, "checkpoint-9", "optimizer.bin"), "wb").close()
    resume_path = resolve_resume_path(output_dir, "latest")
    assert resume_path == os.path.join(output_dir, "checkpoint-3")

    _train_steps(accelerator, model, optimizer, scheduler, ema, 2)  # drift away from the saved state
    accelerator.load_state(resume_path)
    _assert_same(_snapshot(model, ema, optimizer, scheduler), at_step_3)

    # The next save clears the crash's leftovers; re-saving an existing step replaces it.
    save_checkpoint(accelerator, output_dir, 5, total_limit=2)
    assert sorted(os.listdir(output_dir)) == ["checkpoint-3", "checkpoint-5", "checkpoint-9"]
    save_checkpoint(accelerator, output_dir, 5, total_limit=2)
    assert sorted(os.listdir(output_dir)) == ["checkpoint-3", "checkpoint-5", "checkpoint-9"]
    assert checkpoint_step(resolve_resume_path(output_dir, "latest")) == 5


def test_resolve_resume_path_cases(tmp_path):
    output_dir = tmp_path / "run"
    assert resolve_resume_path(str(output_dir), None) is None
    assert resolve_resume_path(str(output_dir), "latest") is None  # nothing saved yet: start fresh
    complete = output_dir / "checkpoint-7"
    complete.mkdir(parents=True)
    (complete / checkpointing.CHECKPOINT_MARKER).write_text('{"global_step": 7}')
    (output_dir / "checkpoint-8").mkdir()
    assert resolve_resume_path(str(output_dir), "checkpoint-7") == str(complete)
    assert resolve_resume_path(str(output_dir), str(complete)) == str(complete)
    with pytest.raises(FileNotFoundError, match="checkpoint-5"):
        resolve_resume_path(str(output_dir), "checkpoint-5")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume_path(str(output_dir), "checkpoint-8")
    with pytest.raises(ValueError, match="total_limit"):
        save_checkpoint(None, str(output_dir), 1, total_limit=0)


# ----------------------------------------------------------------------------------------------- data order


def test_resume_position_numbers():
    assert resume_position(0, 10) == (0, 0)
    assert resume_position(23, 10) == (2, 3)
    # 7 batches with accumulation 2 -> 4 optimiser steps per epoch (the last one uses a single batch).
    assert resume_position(5, 7, gradient_accumulation_steps=2) == (1, 2)
    assert resume_position(4, 7, gradient_accumulation_steps=2) == (1, 0)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        resume_position(3, 0)


def _batches(stop_at_step=None, resume_step=0, max_train_steps=12):
    """Run a mock loop (26 samples in batches of 4, accumulation 2: 7 batches and 4 optimiser steps per epoch, the
    last step with one batch) and return the sample ids of every batch it consumed."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    dataset = TensorDataset(torch.arange(26))
    loader = DataLoader(dataset, batch_size=4, sampler=EpochShuffleSampler(dataset, seed=7))
    model = nn.Linear(1, 1)
    model, loader = accelerator.prepare(model, loader)
    global_step, seen = resume_step, []
    for _, _, (ids,) in resumed_batches(accelerator, loader, resume_step, max_train_steps):
        with accelerator.accumulate(model):
            seen.append(ids.tolist())
        if accelerator.sync_gradients:
            global_step += 1
            if global_step == stop_at_step:
                return seen
    assert global_step == max_train_steps
    return seen


def test_resumed_run_sees_the_same_batches_as_an_uninterrupted_one():
    uninterrupted = _batches()
    assert len(uninterrupted) == 3 * 7
    epochs = [sorted(sum(uninterrupted[i * 7 : (i + 1) * 7], [])) for i in range(3)]
    assert all(ids == list(range(26)) for ids in epochs)  # each epoch is a permutation ...
    assert uninterrupted[0] != uninterrupted[7]  # ... and a different one per epoch

    for stop_at in (3, 4, 5, 9):  # mid-epoch, epoch boundary, mid-epoch after a boundary
        assert _batches(stop_at_step=stop_at) + _batches(resume_step=stop_at) == uninterrupted, stop_at
    assert _batches(max_train_steps=10) == uninterrupted[:18]  # the run ends mid-epoch: no batch past step 10
    assert _batches(resume_step=12) == []  # resumed at the end: nothing left


# ------------------------------------------------------------------------------------------ presets, logging


def test_preset_keys_become_defaults_and_the_command_line_wins(tmp_path):
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    preset = tmp_path / "run.json"
    preset.write_text(json.dumps({"_comment": "dropped", "learning_rate": 1e-3, "lr_scheduler": "cosine",
                                  "use_ema": True}))

    def parse(*argv):
        return parse_args_with_preset(parser, ["--config", str(preset), *argv], lambda a: read_preset(a.config, "x_"))

    args = parse("--learning_rate", "5e-4")
    assert (args.learning_rate, args.lr_scheduler, args.use_ema) == (5e-4, "cosine", True)
    assert parse("--no-use_ema").use_ema is False
    preset.write_text(json.dumps({"learning_rat": 1.0, "config": "x"}))
    with pytest.raises(ValueError, match="unknown or forbidden keys \\['config', 'learning_rat'\\]"):
        parse()
    preset.write_text(json.dumps({"lr_scheduler": "exponential"}))
    with pytest.raises(ValueError, match="--lr_scheduler: invalid choice: 'exponential'"):
        parse()
    assert read_preset("train/configs/dit_tiny.json", "dit_") == read_preset("tiny", "dit_")  # the old path


def test_loss_logger_averages_between_logging_steps_and_summary():
    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, None

        def update(self, n):
            self.n += n

        def set_postfix(self, **values):
            self.postfix = values

    bar = Bar()
    log = LossLogger(Accelerator(cpu=True), bar, logging_steps=2, max_train_steps=3)
    log.add({"loss": torch.tensor(1.0), "d": torch.tensor(4.0)})
    assert log.step(1, lr=0.1) is None and bar.n == 1  # not a logging step: nothing read
    log.add({"loss": torch.tensor(3.0)})
    assert log.step(2, lr=0.1) == {"d": 4.0, "loss": 2.0, "lr": 0.1} and bar.postfix["loss"] == "2"
    log.add({"loss": torch.tensor(5.0)})
    assert log.step(3, lr=0.05) == {"loss": 5.0, "lr": 0.05}  # the last step always logs
    assert [step for step, _ in log.history] == [2, 3] and log.last_logs["lr"] == 0.05

    points = [(10 * (i + 1), 10.0 - i) for i in range(10)]
    summary = loss_summary(points, max_points=5)
    assert (summary["first"], summary["last"], summary["min"], summary["window"]) == (10.0, 1.0, 1.0, 1)
    assert summary["curve"] == [[20, 9.5], [40, 7.5], [60, 5.5], [80, 3.5], [100, 1.5]]


# ----------------------------------------------------------------------------------------------- image grid


def test_image_grid_pixels_layout_and_range(tmp_path):
    values = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    images = values.view(5, 1, 1, 1).expand(5, 3, 8, 6).clone()
    path = tmp_path / "samples" / "grid.png"
    save_image_grid(images, str(path), nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (6 + 2) + 2, 3)
    for index, value in enumerate(values.tolist()):
        row, column = divmod(index, 3)
        tile = grid[2 + row * 10 : 2 + row * 10 + 8, 2 + column * 8 : 2 + column * 8 + 6]
        assert (tile == round((value + 1) / 2 * 255)).all()
    assert (grid[12:20, 18:24] == 255).all()  # the unused sixth cell stays white
    assert os.listdir(path.parent) == ["grid.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any new file (mkstemp would give 0600)

    grey = torch.full((1, 1, 4, 4), 0.25)
    save_image_grid(grey, str(path), value_range=(0.0, 1.0))
    assert (np.asarray(Image.open(path))[2:6, 2:6] == 64).all()


def test_labelled_grid_adds_captions(tmp_path):
    images = torch.full((2, 3, 8, 8), 1.0)  # white tiles: any dark pixel below them is caption text
    path = tmp_path / "labelled.png"
    save_image_grid(images, str(path), nrow=2, labels=["digit 0", "digit 1"])
    grid = np.asarray(Image.open(path).convert("L"))
    assert grid.shape[0] == 8 + 12 + 4
    assert (grid[2:10] == 255).all()  # tiles row
    assert (grid[10:22] < 128).any()  # captions


def test_image_grid_write_is_atomic_and_validates(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_image_grid(torch.zeros(1, 3, 4, 4), str(path))
    before = path.read_bytes()

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_image_grid(torch.ones(1, 3, 4, 4), str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["grid.png"]
    with pytest.raises(ValueError, match="shape"):
        save_image_grid(torch.zeros(3, 4, 4), str(path))
    with pytest.raises(ValueError, match="labels"):
        save_image_grid(torch.zeros(2, 3, 4, 4), str(path), labels=["one"])


# --------------------------------------------------------------------------------------------------- speed flags

def test_check_device_arguments_cases(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    args = argparse.Namespace(mixed_precision="fp16", attention_backend=None)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        check_device_arguments(args, "cpu")
    check_device_arguments(args, "cuda")  # fp16 with accelerate's GradScaler on a GPU
    args.mixed_precision = None  # falls back to what `accelerate launch --mixed_precision` exports
    check_device_arguments(args, "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        check_device_arguments(args, "cpu")
    check_device_arguments(args, "cpu", mixed_precision="bf16")  # what the Accelerator chose wins
    args = argparse.Namespace(mixed_precision="bf16", attention_backend="xformers")
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    check_device_arguments(args, "cuda")
    with pytest.raises(ValueError, match="CUDA-only kernels but the run is on cpu"):
        check_device_arguments(args, "cpu")
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    with pytest.raises(ImportError, match="optional xformers package"):
        check_device_arguments(args, "cuda")
    assert COMPILE_MODES == ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def test_shared_flags_hold_the_speed_options():
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    args = parser.parse_args([])
    assert (args.compile, args.compile_mode, args.gradient_checkpointing) == (False, "default", False)
    args = parser.parse_args(["--compile", "--compile_mode", "max-autotune", "--gradient_checkpointing"])
    assert (args.compile, args.compile_mode, args.gradient_checkpointing) == (True, "max-autotune", True)


def test_cache_latents_speed_flags(tmp_path, monkeypatch, capsys):
    """cache_latents: fp16 on the CPU and unknown compile modes fail before the autoencoder loads; --compile
    compiles the encoder ViT in place (torch.compile recorded here) and leaves the cache bit for bit the same."""
    from safetensors.torch import load_file

    from uae_gen.models.autoencoder_uae import AutoencoderUAE
    from uae_gen.scripts import cache_latents

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if torch.accelerator.is_available():
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    base = ["--vae", str(tmp_path / "vae"), "--dataset", "demo-digits", "--max_samples", "8", "--batch_size", "4"]
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        cache_latents.parse_args([*base, "--output_dir", str(tmp_path / "a"), "--mixed_precision", "fp16"])
    with pytest.raises(SystemExit):
        cache_latents.parse_args([*base, "--output_dir", str(tmp_path / "a"), "--compile_mode", "warp"])
    assert "--compile_mode: invalid choice: 'warp'" in capsys.readouterr().err

    torch.manual_seed(0)
    AutoencoderUAE.from_preset("tiny").save_pretrained(tmp_path / "vae")
    cache_latents.main(cache_latents.parse_args([*base, "--output_dir", str(tmp_path / "plain")]))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append((fn.__self__, kwargs)) or fn)
    cache_latents.main(cache_latents.parse_args([*base, "--output_dir", str(tmp_path / "compiled"), "--compile"]))
    assert [(type(module).__name__, kwargs) for module, kwargs in compiled] == [
        ("SemanticEncoder", {"fullgraph": True, "mode": "default"})]
    plain, again = (load_file(tmp_path / name / "part-r000-00000.safetensors") for name in ("plain", "compiled"))
    assert plain.keys() == again.keys() and all(torch.equal(plain[k], again[k]) for k in plain)
