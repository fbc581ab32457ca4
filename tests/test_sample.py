"""eval/sample.py end to end, offline: a tiny saved pipeline sampled by 1 process and by 2 DDP ranks (gloo on
CPU) gives the same npz; classes are balanced; a rerun keeps existing PNGs; eval/evaluate_generation.py scores
the npz with random-weight Inception weights."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState

from uae_gen import UAEDiTPipeline
from uae_gen.metrics import load_samples_npz, save_samples_npz

from .test_evaluate_generation import save_random_inception_weights
from .test_pipeline import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SCRIPT = REPO / "eval" / "sample.py"
EVALUATE_SCRIPT = REPO / "eval" / "evaluate_generation.py"
NUM_SAMPLES, NUM_CLASSES, STEPS, SEED = 20, 10, 2, 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_args(pipeline_dir, output_dir):
    return ["--pipeline", str(pipeline_dir), "--output_dir", str(output_dir), "--num_samples", str(NUM_SAMPLES),
            "--label_sampling", "balanced", "--guidance_scale", "1.5", "--guidance_interval", "0.0", "0.9",
            "--num_inference_steps", str(STEPS), "--per_proc_batch_size", "4", "--global_seed", str(SEED)]


def sample_in_process(pipeline_dir, output_dir):
    """One process, no launcher (saves a Python start-up); the PartialState singleton is reset afterwards."""
    sample = load_script(SAMPLE_SCRIPT)
    try:
        sample.main(sample.parse_args(sample_args(pipeline_dir, output_dir)))
    finally:
        PartialState._reset_state()


def run(command, **env):
    completed = subprocess.run(command, env={**ENV, **env}, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same sampling run by one plain process and by `accelerate launch` with 2 CPU ranks."""
    root = tmp_path_factory.mktemp("sample")
    tiny_pipeline(num_classes=NUM_CLASSES).save_pretrained(root / "pipe")
    one, two = root / "one_process", root / "two_processes"
    sample_in_process(root / "pipe", one)
    # Real 2-rank DDP on CPU (gloo); `accelerate launch --cpu` would silently start one process.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         str(SAMPLE_SCRIPT),
         *sample_args(root / "pipe", two)], ACCELERATE_USE_CPU="1")
    return root


def only_run(output_dir):
    (settings_path,) = output_dir.glob("*.json")
    settings = json.loads(settings_path.read_text())
    return settings, Path(settings["npz"]), Path(settings["sample_dir"])


def test_one_and_two_ranks_give_the_same_balanced_npz(runs):
    settings_one, npz_one, _ = only_run(runs / "one_process")
    settings_two, npz_two, _ = only_run(runs / "two_processes")
    assert settings_one["num_processes"] == 1 and settings_two["num_processes"] == 2
    assert settings_one["run_name"] == settings_two["run_name"]
    for setting in ("cfg1.5", "gi0-0.9", f"steps{STEPS}", "balanced", f"seed{SEED}", f"n{NUM_SAMPLES}", "euler"):
        assert setting in settings_one["run_name"]
    one, two = load_samples_npz(npz_one), load_samples_npz(npz_two)
    assert one.images.dtype == np.uint8 and one.images.shape == (NUM_SAMPLES, 32, 32, 3)
    assert np.array_equal(one.labels, two.labels)
    # Same (label, seed) per index; pixels agree up to float summation order (thread count, batch composition)
    # flipping a rare rounding to the next grey level.
    difference = np.abs(one.images.astype(int) - two.images.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99, (difference.max(), (difference == 0).mean())
    assert np.bincount(one.labels, minlength=NUM_CLASSES).tolist() == [NUM_SAMPLES // NUM_CLASSES] * NUM_CLASSES
    assert len({image.tobytes() for image in one.images}) == NUM_SAMPLES  # every sample has its own noise


def test_sample_i_is_label_i_with_seed_i(runs):
    """The contract that makes the (label, seed) set independent of world size, checked against a direct call."""
    sample = load_script(SAMPLE_SCRIPT)
    _, npz_path, _ = only_run(runs / "one_process")
    stored = load_samples_npz(npz_path)
    pipe = UAEDiTPipeline.from_pretrained(runs / "pipe")
    pipe.set_progress_bar_config(disable=True)
    for index in (0, 7):
        generator = torch.Generator().manual_seed(sample.sample_seed(SEED, index))
        image = pipe(class_labels=[int(stored.labels[index])], guidance_scale=1.5, guidance_interval=(0.0, 0.9),
                     num_inference_steps=STEPS, generator=generator, output_type="np").images
        expected = (image[0] * 255).round().clip(0, 255).astype(np.uint8)
        assert np.abs(expected.astype(int) - stored.images[index].astype(int)).max() <= 1


def test_resume_keeps_existing_pngs_and_fills_the_gaps(runs):
    _, npz_path, sample_dir = only_run(runs / "one_process")
    before = load_samples_npz(npz_path)
    removed = [sample_dir / f"{i:06d}.png" for i in (1, 12)]
    for path in removed:
        path.unlink()
    kept = {path: path.stat().st_mtime_ns for path in sample_dir.glob("*.png")}
    assert len(kept) == NUM_SAMPLES - 2
    sample_in_process(runs / "pipe", runs / "one_process")
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert all(path.exists() for path in removed)
    after = load_samples_npz(npz_path)
    assert np.array_equal(before.images, after.images) and np.array_equal(before.labels, after.labels)


def test_bad_arguments_are_rejected():
    sample = load_script(SAMPLE_SCRIPT)
    with pytest.raises(SystemExit):
        sample.parse_args(["--pipeline", "p", "--output_dir", "o", "--guidance_interval", "0.8", "0.2"])
    with pytest.raises(SystemExit):
        sample.parse_args(["--pipeline", "p", "--output_dir", "o", "--num_samples", "0"])


def test_speed_flags_reach_the_pipeline_and_keep_the_pixels(runs, tmp_path, monkeypatch):
    """--attention_backend auto (SDPA on CPU) and --compile (torch.compile recorded, not run: tests/test_compile.py
    compiles for real) reach the transformer and the decoder and leave every pixel as it was."""
    compiled = []

    def record_compile(fn, **kwargs):
        compiled.append((type(fn.__self__).__name__, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", record_compile)
    sample = load_script(SAMPLE_SCRIPT)
    try:
        settings = sample.main(sample.parse_args([*sample_args(runs / "pipe", tmp_path), "--attention_backend", "auto",
                                                  "--compile", "--compile_mode", "max-autotune"]))
    finally:
        PartialState._reset_state()
    assert compiled == [("UAEDiT", {"fullgraph": True, "mode": "max-autotune"}),
                        ("ViTDecoder", {"fullgraph": True, "mode": "max-autotune"})]
    assert (settings["attention_backend"], settings["compile"]) == ("auto", "max-autotune")
    baseline, _, _ = only_run(runs / "one_process")
    assert baseline["attention_backend"] == "sdpa" and baseline["compile"] is None
    reference = load_samples_npz(Path(baseline["npz"]))
    again = load_samples_npz(Path(settings["npz"]))
    assert np.array_equal(again.images, reference.images) and np.array_equal(again.labels, reference.labels)


def test_speed_flags_fail_before_the_pipeline_loads(monkeypatch, capsys):
    from uae_gen.models import attention as attention_module

    sample = load_script(SAMPLE_SCRIPT)
    base = ["--pipeline", "no-such-pipeline", "--output_dir", "o"]
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    with pytest.raises(ImportError, match="optional xformers package"):
        sample.parse_args([*base, "--attention_backend", "xformers"])
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ValueError, match="CUDA-only kernels but the run is on cpu"):
        sample.parse_args([*base, "--attention_backend", "xformers"])
    with pytest.raises(SystemExit):
        sample.parse_args([*base, "--compile", "--compile_mode", "fast"])
    assert "--compile_mode: invalid choice: 'fast'" in capsys.readouterr().err


def test_evaluate_generation_scores_the_sampled_npz(runs, tmp_path):
    _, npz_path, _ = only_run(runs / "two_processes")
    weights = save_random_inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, size=(8, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2).astype(np.uint8)
    reference_npz = save_samples_npz(tmp_path / "reference.npz", reference)
    out = tmp_path / "metrics.json"
    evaluate = load_script(EVALUATE_SCRIPT)
    evaluate.main(evaluate.parse_args(
        ["--generated", str(npz_path), "--reference", str(reference_npz), "--inception_weights", str(weights),
         "--isc_splits", "2", "--batch_size", "10", "--quiet", "--out", str(out)]))
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["num_generated"] == NUM_SAMPLES and metrics["num_reference"] == 8
    for key in ("fid", "inception_score", "precision", "recall"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid"] > 0 and metrics["inception_score"] > 1.0
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0
