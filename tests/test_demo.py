"""The demo end to end at a minimal budget (every output exists and loads; quality is not asserted here), and the
pieces it shares with eval/ablation.py (uae_gen.demo_setup): how the training scripts are run, and the DiT's mixed
precision."""

import json
import math
import os
import shlex
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from uae_gen import UAEDiTPipeline, cli, demo_setup
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


@pytest.mark.parametrize("capability, flags, expected", [
    ("AVX512", {"avx512f", "avx512_bf16"}, "bf16"), ("AVX512", {"avx512f", "amx_bf16"}, "bf16"),
    ("AVX512", None, "bf16"),  # no flag list to consult (not Linux): the capability decides
    ("AVX512", {"avx512f"}, "no"),  # AVX-512 without native bf16 (Skylake-X .. Ice Lake, Zen 3): emulated, slower
    ("AVX2", {"avx2", "avx512_bf16"}, "no"),  # what ATEN_CPU_CAPABILITY=avx2 makes an AVX-512 CPU report
    ("DEFAULT", None, "no"), ("SVE256", None, "no"),
])
def test_dit_mixed_precision_is_bf16_only_with_native_bf16(monkeypatch, capability, flags, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(demo_setup, "cpu_flags", lambda: flags)
    assert demo_setup.dit_mixed_precision() == expected


def test_scripts_run_as_the_readme_commands(monkeypatch):
    calls = []
    monkeypatch.setattr(demo_setup, "run_command", lambda command, shown: calls.append((command, shown)))
    demo_setup.run_script("train_dit", ["--config", "dit_tiny", "--seed", 3], launch_mixed_precision="bf16")
    demo_setup.run_script("cache_latents", ["--vae", "v"])
    launch = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
              "--quiet"]
    script = ["-m", "uae_gen.scripts.train_dit", "--config", "dit_tiny", "--seed", "3", "--mixed_precision", "bf16"]
    assert calls == [
        ([sys.executable, "-m", "accelerate.commands.launch", *launch, *script],
         shlex.join(["accelerate", "launch", *launch, *script])),
        ([sys.executable, "-m", "uae_gen.scripts.cache_latents", "--vae", "v"],
         "python -m uae_gen.scripts.cache_latents --vae v"),
    ]


def test_script_environment(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # the user's own setting wins
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = demo_setup.script_env()
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 1024 * 1024)
    assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == str(torch.get_num_threads())
    assert env["PATH"] == os.environ["PATH"]


def test_a_failing_script_raises_one_error_with_the_command_and_its_stderr(capsys):
    code = "import sys; print('x' * 20000, file=sys.stderr); print('bad flag --foo', file=sys.stderr); sys.exit(3)"
    with pytest.raises(demo_setup.ScriptFailed) as raised:
        demo_setup.run_command([sys.executable, "-c", code], "python -m uae_gen.scripts.nothing --foo")
    message = str(raised.value)
    assert message.startswith("`python -m uae_gen.scripts.nothing --foo` failed with exit status 3")
    assert message.endswith("bad flag --foo") and len(message) < demo_setup.STDERR_TAIL_BYTES + 200
    assert raised.value.returncode == 3
    printed = capsys.readouterr()
    assert printed.out == "$ python -m uae_gen.scripts.nothing --foo\n"
    assert printed.err.endswith("bad flag --foo\n")  # passed through as it came


def test_uae_gen_demo_reports_a_failed_script_in_one_message(monkeypatch, capsys):
    def failing_demo(**kwargs):
        raise demo_setup.ScriptFailed(1, "accelerate launch -m uae_gen.scripts.train_dit", stderr="ValueError: no")

    monkeypatch.setattr("uae_gen.demo.run_demo", failing_demo)
    with pytest.raises(SystemExit) as raised:
        cli.main(["demo", "--minutes", "1"])
    assert raised.value.code == 2
    assert capsys.readouterr().err == "uae-gen demo: error: `accelerate launch -m uae_gen.scripts.train_dit` failed " \
        "with exit status 1; the end of its stderr:\nValueError: no\n"


def test_minimal_demo_writes_every_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing of the repository checkout is needed
    out = tmp_path / "demo"
    returned = run_demo("demo", minutes=0.05, seed=1)
    printed = capsys.readouterr().out

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
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask

    # The README's commands, printed as they run, and what they trained.
    commands = [line[2:] for line in printed.splitlines() if line.startswith("$ ")]
    assert [shlex.split(c)[:2] for c in commands] == [["accelerate", "launch"]] * 3 + [["python", "-m"]] + \
        [["accelerate", "launch"]]
    assert [c.split(" -m ")[-1].split()[0] for c in commands] == \
        ["uae_gen.scripts.train_tokenizer"] * 3 + ["uae_gen.scripts.cache_latents", "uae_gen.scripts.train_dit"]
    tokenizer = [json.loads((out / "work" / f"tokenizer-stage{k}" / "training_summary.json").read_text())
                 for k in (1, 2, 3)]
    assert [(s["stage"], s["global_step"]) for s in tokenizer] == [(k, metrics["steps"][f"tokenizer_{k}"])
                                                                   for k in (1, 2, 3)]
    dit = json.loads((out / "work" / "dit" / "training_summary.json").read_text())
    assert dit["global_step"] == metrics["steps"]["dit"]
    assert dit["args"]["mixed_precision"] == metrics["dit_mixed_precision"]

    for name in ("samples.png", "bands.png", "reconstructions.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 32 and image.size[1] > 32

    pipe = UAEDiTPipeline.from_pretrained(out / "pipeline")
    images = pipe(class_labels=[0, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
