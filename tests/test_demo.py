"""The demo end to end at a minimal budget (every output exists and loads; quality is not asserted here), its
planner (a pure function of the budget and the machine's measured rates), and the pieces it shares with
eval/ablation.py (uae_gen.demo_setup): how the training scripts are run, and the DiT's mixed precision."""

import dataclasses
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from uae_gen import UAEDiTPipeline, cli, demo_setup
from uae_gen.data import load_demo_digits
from uae_gen.demo import (
    DIT_SCRIPT_STEP_FACTOR,
    FULL_BUDGET_STEPS,
    HELDOUT_IMAGES,
    MIN_STEPS,
    NUM_CLASSES,
    PLAN_MARGIN,
    SHRINK_LEVELS,
    TRAIN_IMAGES,
    MachineRates,
    phase_seconds,
    plan_demo,
    run_demo,
    shrunk_steps,
    step_counts,
)

# The machine FULL_BUDGET_STEPS were chosen on (2 cores, AVX-512 with native bf16), as the rates `uae-gen demo`
# measured there (metrics.json "rates" of a default run, seed 0), and the phases that run then took with the steps
# it planned (metrics.json "wall_time" and "steps": start-up and calibration 24 s).
FAST = MachineRates(teacher_step=0.0377, judge_step=0.0863, tokenizer_step=0.0464, dit_step=0.1022,
                    dit_forward=0.0013, encode=0.00018, decode=0.00035, load_split=0.771, script_start=8.90)
FAST_RUN_STEPS = {"teacher": 1946, "judge": 150, "samples_per_class": 17, "inference_steps": 20, "tokenizer_1": 800,
                  "tokenizer_2": 400, "tokenizer_3": 100, "dit": 3906}
FAST_RUN_SECONDS = {"teacher": 92.3, "judge": 11.7, "tokenizer": 90.7, "cache": 11.4, "dit": 477.3, "sampling": 10.4,
                    "scoring": 11.9}
SLOW = MachineRates(**{name: 2.2 * value for name, value in dataclasses.asdict(FAST).items()})
FASTER = MachineRates(**{name: value / 2 for name, value in dataclasses.asdict(FAST).items()})
FAST_ELAPSED, SLOW_ELAPSED = 24.0, 48.0  # the command's start-up and the calibration, before the plan


def test_the_cost_model_reproduces_the_measured_phases():
    seconds = phase_seconds(FAST_RUN_STEPS, FAST)
    measured = FAST_RUN_SECONDS
    assert seconds["teacher"] == pytest.approx(measured["teacher"], rel=0.03)
    assert seconds["judge"] == pytest.approx(measured["judge"], abs=1.5)
    assert sum(seconds[f"tokenizer_{k}"] for k in (1, 2, 3)) == pytest.approx(measured["tokenizer"], rel=0.1)
    assert seconds["cache"] == pytest.approx(measured["cache"], abs=3)
    assert seconds["dit"] == pytest.approx(measured["dit"], rel=0.05)
    assert seconds["sampling"] == pytest.approx(measured["sampling"], abs=3)  # seconds, next to minutes of training
    assert seconds["scoring"] == pytest.approx(measured["scoring"], abs=4)


def test_the_demo_data_sizes_the_plan_assumes():
    train, heldout = load_demo_digits("train"), load_demo_digits("heldout")
    assert (len(train), len(heldout), train.num_classes) == (TRAIN_IMAGES, HELDOUT_IMAGES, NUM_CLASSES)


def test_plan_on_the_fast_machine_keeps_the_default_counts_within_its_budget():
    plan = plan_demo(12.0, FAST, FAST_ELAPSED)
    assert plan.fits and plan.expected_s <= 12 * 60 * (1 - PLAN_MARGIN)  # a margin for the rates' variation
    assert plan.expected_s == pytest.approx(FAST_ELAPSED + sum(plan.seconds.values()))
    # the measured machine ran 3906 of the 4500 DiT steps at the default budget (the five scripts' start-ups cost
    # it; PLAN_MARGIN another ~130)
    least = {"teacher": 0.95, "judge": 1.0, "dit": 0.8, "samples_per_class": 0.8, "inference_steps": 1.0,
             "tokenizer_1": 0.8, "tokenizer_2": 0.8, "tokenizer_3": 0.8}
    for name, full in FULL_BUDGET_STEPS.items():
        assert least[name] * full <= plan.steps[name] <= full, name
    # a machine on which today's whole run, start-ups included, fits the budget gets exactly today's counts
    assert plan_demo(12.0, FASTER, FAST_ELAPSED).steps == FULL_BUDGET_STEPS


def test_plan_on_a_slower_machine_fits_and_protects_the_tokenizer_and_the_teacher():
    plan = plan_demo(12.0, SLOW, SLOW_ELAPSED)
    assert plan.fits and plan.expected_s <= 12 * 60
    assert plan.expected_s > 11.5 * 60  # the budget is used, not left over
    assert plan.steps["dit"] >= 0.24 * FULL_BUDGET_STEPS["dit"] and plan.steps["teacher"] >= 900
    assert plan.steps["judge"] == FULL_BUDGET_STEPS["judge"]  # the instrument keeps its steps
    # what gave first: the DiT went down further, relative to its full counts, than the tokenizer and the teacher
    share = {name: plan.steps[name] / FULL_BUDGET_STEPS[name] for name in ("tokenizer_1", "dit", "teacher")}
    assert share["dit"] < share["tokenizer_1"] and share["dit"] < share["teacher"]


@pytest.mark.parametrize("rates, elapsed", [(FAST, FAST_ELAPSED), (SLOW, SLOW_ELAPSED)])
def test_plan_for_five_minutes_fits_five_minutes(rates, elapsed):
    plan = plan_demo(5.0, rates, elapsed)
    assert plan.fits and plan.expected_s <= 5 * 60
    assert plan.steps["dit"] >= MIN_STEPS["dit"]
    assert plan.steps["dit"] < plan_demo(12.0, rates, elapsed).steps["dit"]


def test_plan_grows_with_the_budget_up_to_the_scaled_caps():
    plans = [plan_demo(minutes, SLOW, SLOW_ELAPSED) for minutes in (2, 5, 8, 12, 20, 30, 60, 120)]
    for smaller, larger in zip(plans, plans[1:]):
        assert all(smaller.steps[name] <= larger.steps[name] for name in FULL_BUDGET_STEPS)
    for plan in plans:
        caps = step_counts(max(plan.minutes, 12.0))
        assert all(plan.steps[name] <= caps[name] for name in caps)
    assert plan_demo(60.0, FASTER, FAST_ELAPSED).steps == step_counts(60.0)


def test_a_budget_shorter_than_the_smallest_run_plans_the_minimum_and_says_so():
    plan = plan_demo(0.05, FAST)
    assert not plan.fits and plan.steps == MIN_STEPS
    assert "shorter than the smallest run" in plan.table()


def test_shrink_levels_go_from_the_caps_to_the_minimum():
    caps = step_counts(12.0)
    assert shrunk_steps(caps, 0.0) == caps
    assert shrunk_steps(caps, float(len(SHRINK_LEVELS))) == MIN_STEPS
    knee = round(SHRINK_LEVELS[0]["dit"] * FULL_BUDGET_STEPS["dit"])
    assert shrunk_steps(caps, 1.0)["dit"] == knee and shrunk_steps(caps, 0.5)["dit"] == (caps["dit"] + knee) / 2
    # past the DiT's knee (level 2) the tokenizer still has every step; it halves in level 3
    assert shrunk_steps(caps, 2.0)["dit"] == round(SHRINK_LEVELS[1]["dit"] * FULL_BUDGET_STEPS["dit"])
    assert shrunk_steps(caps, 2.0)["tokenizer_1"] == caps["tokenizer_1"]
    assert shrunk_steps(caps, 3.0)["tokenizer_1"] == round(SHRINK_LEVELS[2]["tokenizer"] * caps["tokenizer_1"])
    previous = caps
    for level in [k / 4 for k in range(1, 4 * len(SHRINK_LEVELS) + 1)]:
        counts = shrunk_steps(caps, level)
        assert all(counts[name] <= previous[name] for name in caps)
        previous = counts


def test_a_plan_redone_later_keeps_finished_phases_and_moves_the_rest():
    plan = plan_demo(12.0, FAST, FAST_ELAPSED)
    finished = ("teacher", "judge", "tokenizer_1", "tokenizer_2", "tokenizer_3", "cache")
    spent = FAST_ELAPSED + sum(plan.seconds[phase] for phase in finished)
    on_time = plan_demo(12.0, FAST, spent, finished, plan.steps)
    assert on_time.steps == plan.steps and set(on_time.seconds) == {"dit", "sampling", "scoring"}
    late = plan_demo(12.0, FAST, spent + 60, finished, plan.steps)  # a minute behind: the DiT gives a minute
    assert late.fits and late.expected_s <= 12 * 60
    assert {name: late.steps[name] for name in ("teacher", "tokenizer_1")} == \
        {name: plan.steps[name] for name in ("teacher", "tokenizer_1")}
    minute = 60 / (FAST.dit_step * DIT_SCRIPT_STEP_FACTOR)  # DiT steps in a minute
    assert plan.steps["dit"] - 1.2 * minute <= late.steps["dit"] <= plan.steps["dit"] - 0.83 * minute
    early = plan_demo(12.0, FAST, spent - 120, finished, plan.steps)  # ahead: up to the cap, no further
    assert early.steps["dit"] == FULL_BUDGET_STEPS["dit"]


def test_a_plan_redone_after_the_classifiers_gives_the_tokenizer_back_what_a_slow_calibration_took():
    # An AVX2-emulated run on a 2-core Xeon whose classifier calibration read 4x slow (other processes busy): the
    # teacher and the judge planned at 0.195 / 0.50 s a step ran at 0.047 / 0.16, and the first plan had halved the
    # tokenizer (PSNR 27.3 dB, under the 28 dB target).
    misread = dataclasses.replace(FAST, teacher_step=0.195, judge_step=0.50, dit_step=0.119)
    plan = plan_demo(12.0, misread, 29.4)
    assert plan.steps["tokenizer_1"] < 0.6 * FULL_BUDGET_STEPS["tokenizer_1"]
    spent = 29.4 + plan.steps["teacher"] * 0.047 + plan.steps["judge"] * 0.16  # what the two took
    redone = plan_demo(12.0, misread, spent, ("teacher", "judge"), plan.steps)
    assert redone.fits and {name: redone.steps[name] for name in ("teacher", "judge")} == \
        {name: plan.steps[name] for name in ("teacher", "judge")}
    assert all(redone.steps[f"tokenizer_{k}"] == FULL_BUDGET_STEPS[f"tokenizer_{k}"] for k in (1, 2, 3))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_budget_is_refused_before_any_work(tmp_path, bad):
    with pytest.raises(ValueError, match="minutes must be a positive number"):
        plan_demo(bad, FAST)
    with pytest.raises(ValueError, match="minutes must be a positive number"):
        run_demo(str(tmp_path / "demo"), minutes=bad)
    assert not (tmp_path / "demo").exists()


def test_uae_gen_demo_counts_the_budget_from_the_command_start(monkeypatch):
    calls = []
    monkeypatch.setattr("uae_gen.demo.run_demo", lambda **kwargs: calls.append(kwargs))
    cli.main(["demo", "--minutes", "5", "--out", "d"])
    [call] = calls
    assert (call["out_dir"], call["minutes"], call["seed"]) == ("d", 5.0, 0)
    assert call["started"] <= time.time()  # this process's start, before its imports


@pytest.mark.parametrize("bad", ["0", "-2", "nan", "inf", "ten"])
def test_uae_gen_demo_refuses_a_bad_budget(capsys, bad):
    with pytest.raises(SystemExit) as raised:
        cli.main(["demo", "--minutes", bad])
    assert raised.value.code == 2
    assert f"argument --minutes: must be a positive number of minutes, got {bad!r}" in capsys.readouterr().err


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
    assert metrics["steps"] == MIN_STEPS  # 3 s is shorter than the smallest run: every count at its minimum
    assert metrics["num_generated"] == 10 * MIN_STEPS["samples_per_class"]
    assert metrics["wall_time"]["total_s"] >= sum(v for k, v in metrics["wall_time"].items() if k != "total_s") - 1
    assert metrics["wall_time"]["calibration_s"] > 0

    # The plan, made from this machine's measured rates before training, and printed before the first command.
    rates = metrics["rates"]
    assert set(rates) == {field.name for field in dataclasses.fields(MachineRates)}
    assert all(math.isfinite(value) and value > 0 for value in rates.values())
    plan = metrics["plan"]
    assert plan["minutes"] == 0.05 and plan["steps"] == MIN_STEPS and not plan["fits"]
    assert plan["expected_s"] == pytest.approx(plan["elapsed_s"] + sum(plan["seconds"].values()), abs=0.5)
    assert plan["seconds"]["dit"] > MIN_STEPS["dit"] * rates["dit_step"]
    assert set(metrics["replans"]) == {"tokenizer", "dit"}
    assert set(metrics["replans"]["tokenizer"]["seconds"]) == {"tokenizer_1", "tokenizer_2", "tokenizer_3", "cache",
                                                               "dit", "sampling", "scoring"}
    assert set(metrics["replans"]["dit"]["seconds"]) == {"dit", "sampling", "scoring"}
    assert metrics["observed"]["script_start_s"] > 0 and metrics["observed"]["dit_script_s"] > 0
    assert printed.index("plan: ") < printed.index("\n$ ")
    assert "DiT-mini" in printed[printed.index("plan: "):printed.index("\n$ ")]
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
    assert (dit["args"]["frequency_tokens"], dit["args"]["coefficients_per_token"]) == (True, 2)  # DIT_FLAGS
    assert dit["time_shift"] == 2.0 and metrics["guidance_interval"] == [0.2, 0.85]  # dit_tiny's shift, the demo's CFG

    for name in ("samples.png", "bands.png", "reconstructions.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 32 and image.size[1] > 32

    pipe = UAEDiTPipeline.from_pretrained(out / "pipeline")
    images = pipe(class_labels=[0, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    # the demo's DiT: 32 frequency tokens, two of the 64 zig-zag coefficients per channel each
    assert (pipe.transformer.config.frequency_tokens, pipe.transformer.config.coefficients_per_token) == (64, 2)
