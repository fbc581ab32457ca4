"""The demo end to end at a minimal budget: every output exists and loads; quality is not asserted here."""

import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image

from uae_gen import UAEDiTPipeline
from uae_gen.demo import FULL_BUDGET_STEPS, MIN_STEPS, run_demo, step_counts


def test_step_counts_scale_with_the_budget_and_clamp_below():
    assert step_counts(12.0) == FULL_BUDGET_STEPS
    half = step_counts(6.0)
    assert half["dit"] == FULL_BUDGET_STEPS["dit"] // 2
    assert step_counts(1e-6) == MIN_STEPS
    assert step_counts(48.0)["inference_steps"] == FULL_BUDGET_STEPS["inference_steps"]  # sampling is not prolonged
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="minutes"):
            step_counts(bad)


def test_minimal_demo_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    returned = run_demo(str(out), minutes=0.05, seed=1)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    for key in ("tokenizer_heldout_psnr", "band0_probe_top1", "teacher_probe_top1", "teacher_band0_probe_top1",
                "teacher_heldout_accuracy", "judge_heldout_accuracy", "judge_generated_accuracy",
                "judge_fid_generated_vs_heldout", "judge_fid_train_vs_heldout_floor"):
        assert math.isfinite(metrics[key]), key
    for key in ("band0_probe_top1", "teacher_heldout_accuracy", "judge_heldout_accuracy", "judge_generated_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["steps"] == step_counts(0.05)
    assert metrics["num_generated"] == 10 * MIN_STEPS["samples_per_class"]
    assert metrics["wall_time"]["total_s"] >= sum(v for k, v in metrics["wall_time"].items() if k != "total_s") - 1
    # The demo's scripts leave no accelerate state behind: the DiT's bf16 must not become the next default.
    assert AcceleratorState._shared_state == {} and Accelerator().mixed_precision == "no"
    AcceleratorState._reset_state(True)

    for name in ("samples.png", "bands.png", "reconstructions.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 32 and image.size[1] > 32

    pipe = UAEDiTPipeline.from_pretrained(out / "pipeline")
    images = pipe(class_labels=[0, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
