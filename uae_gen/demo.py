"""``uae-gen demo``: train, sample and score a tiny UAE tokenizer + DiT on the built-in digits, offline on a CPU.

Every training step runs the package's training scripts with the tiny presets, each as a subprocess of the
command the README shows (printed as it runs; uae_gen.demo_setup): ``accelerate launch -m
uae_gen.scripts.train_tokenizer`` for stages 1-3, ``python -m uae_gen.scripts.cache_latents``, ``accelerate launch
-m uae_gen.scripts.train_dit``. The demo only chooses step counts from the time budget and scores the result:

* a teacher (the tiny preset's DINOv2-architecture ViT, uae_gen.demo_classifiers) is trained as a classifier on
  the train split; its encoder is the tokenizer's initial encoder and the semantic target of stage 2, the role
  DINOv2 plays on ImageNet;
* a judge (timm resnet10t) trained separately on the train split, never seen by the tokenizer or the generator,
  scores held-out real images and generated samples (class accuracy) and gives the feature space of the FID;
* the band-0 linear probe is a logistic regression on 2x2-average-pooled band-0 features of the raw latent
  (1x1 pooling would make band 0 equal to the full latent's channel means), next to the same probe on the
  teacher's features.

``minutes`` is a wall-clock budget for the whole command. The demo first times a few steps of each model on this
machine (uae_gen.demo_setup.measure_rates), then ``plan_demo`` sizes every phase to end within the budget and the
plan is printed. Before the DiT the plan is redone with the time actually left (and the scripts' start-up as
observed), so an early phase that ran long shortens the DiT instead of the promise.

Writes to ``out_dir``: samples.png, bands.png, reconstructions.png, metrics.json and pipeline/.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .data import load_demo_digits
from .demo_classifiers import TEACHER_APPEARANCES, accuracy, classifier_features, predict
from .demo_setup import (
    DIT_MODEL,
    GUIDANCE_INTERVAL,
    GUIDANCE_SCALE,
    SHARED_MIN_STEPS,
    SHARED_STEPS,
    MachineRates,
    PhaseTimer,
    cache_latents,
    check_minutes,
    dit_mixed_precision,
    generate,
    linear_probe_top1,
    measure_rates,
    probe_features,
    raw_latents,
    read_summary,
    reconstruct,
    scaled_step_counts,
    train_dit,
    train_teacher_and_judge,
    train_tokenizer_stage,
)
from .metrics import frechet_distance_from_features, psnr
from .models.autoencoder_uae import UAE_PRESETS, AutoencoderUAE
from .scripts.train_dit import save_pipeline
from .training import read_preset, save_image_grid, write_json

DEFAULT_MINUTES = 12.0
# Step counts at the default budget, chosen on a 2-core AVX-512 machine with native bf16, where a default run planned
# (with the scripts' start-up, ~9 s each, on top) teacher 1946, tokenizer 800 / 400 / 100, DiT 3906 steps and took
# teacher 92 s, judge 12 s, tokenizer 91 s (a stage-3 step with its discriminator costs ~4x a stage-1 step, hence
# fewer steps), DiT-mini 477 s (32 frequency tokens, DIT_FLAGS: 0.102 s/step timed in-process), sampling 10 s,
# scoring 12 s. They are the plan's caps (scaled up linearly above the default budget): the demo never runs more
# steps than these.
FULL_BUDGET_STEPS = {**SHARED_STEPS, "tokenizer_1": 800, "tokenizer_2": 400, "tokenizer_3": 100, "dit": 4500}
# The demo's DiT: dit_tiny's frequency tokens with two zig-zag coefficients per token (32 tokens) instead of four.
# The demo samples at CFG 7, where two per token were the more accurate at equal training time (eval/ablation.py at
# time shift 1 with CFG 7 on all of t, 3 seeds, 2044 vs 2878 steps: judge accuracy 0.928 vs 0.875; at CFG 3 the two
# are level, 0.850 vs 0.858); in the demo under the AVX2 emulation 2955 such steps reached 0.918 where 4939 steps of
# four per token reached 0.871.
DIT_FLAGS = ("--coefficients_per_token", 2)
MIN_STEPS = {**SHARED_MIN_STEPS, "tokenizer_1": 2, "tokenizer_2": 2, "tokenizer_3": 2}

# ---- the plan: what the phases cost on this machine, and how they shrink to fit the budget ------------------

# How a budget too short for the caps is met: level by level, each count moves linearly from its value at the
# end of the previous level (level 0: the cap) to the fraction of its FULL_BUDGET_STEPS given here (None: its
# MIN_STEPS), all counts of a level together; the plan is the lowest level that fits.
# 1. Trim towards the knee of each quality curve. DiT-mini on 32 frequency tokens as the demo trains and samples it
#    (time shift 2, CFG 7 on t in [0.2, 0.85]; the study's latent and 5 judges, 3 seeds): judge accuracy 0.59 / 0.93 /
#    0.95 / 0.97 at 497 / 994 / 1491 / 1988 steps, so 60% of the cap (2700) keeps all of it. The teacher is still
#    learning at the cap (held-out accuracy 0.63 at 1000 steps, 0.93 at 2000) and gives 10%; the number of samples
#    gives half. The tokenizer keeps its steps: its cost is mostly the scripts' start-up (the caps cost ~20 s more
#    than half of them) and the caps buy PSNR (29.4 dB; 27.6 dB at 551 / 276 / 69 steps). The judge is the
#    instrument that reads the result (held-out accuracy 0.50 / 0.92 / 0.97 at 50 / 100 / 150 steps) and keeps its
#    steps, as does the sampler (sampling is cheap next to training).
# 2. The DiT goes below its knee, to 40% of its cap; the tokenizer still keeps its steps: halving them costs 2.4 dB
#    of PSNR (27.0 dB at 513 / 257 / 64 steps) and saves what ~150 DiT steps cost (5% of the DiT's steps).
# 3. The DiT, the teacher and the tokenizer halve (the DiT to a quarter of its cap).
# 4. They go down to their minimum together.
# 5. The judge and the sampling too: the budget is then too short for a result worth reading.
SHRINK_LEVELS = (
    {"teacher": 0.9, "judge": 1.0, "tokenizer": 1.0, "dit": 0.6, "samples_per_class": 0.5, "inference_steps": 1.0},
    {"teacher": 0.9, "judge": 1.0, "tokenizer": 1.0, "dit": 0.4, "samples_per_class": 0.5, "inference_steps": 1.0},
    {"teacher": 0.5, "judge": 1.0, "tokenizer": 0.5, "dit": 0.25, "samples_per_class": 0.5, "inference_steps": 1.0},
    {"teacher": None, "judge": 1.0, "tokenizer": None, "dit": None, "samples_per_class": 0.5,
     "inference_steps": 1.0},
    {"teacher": None, "judge": None, "tokenizer": None, "dit": None, "samples_per_class": None,
     "inference_steps": None},
)
# Phases in the order they run, and the step counts each one uses.
PHASE_STEPS = {"teacher": ("teacher",), "judge": ("judge",), "tokenizer_1": ("tokenizer_1",),
               "tokenizer_2": ("tokenizer_2",), "tokenizer_3": ("tokenizer_3",), "cache": (), "dit": ("dit",),
               "sampling": ("samples_per_class", "inference_steps"), "scoring": ()}

# The cost model. Besides the measured MachineRates it needs the data sizes, the scripts' own work (validation,
# set-up) and these allowances, measured on the machine FULL_BUDGET_STEPS were chosen on and scaled by how much
# slower this machine's teacher step is than REFERENCE_TEACHER_STEP there.
NUM_CLASSES, TRAIN_IMAGES, HELDOUT_IMAGES = 10, 1437, 360  # the demo digits' splits
REFERENCE_TEACHER_STEP = 0.038
TOKENIZER_STAGE_COST = {1: 0.6, 2: 1.0, 3: 2.4}  # a step of each stage in stage-2 steps (frozen encoder; GAN)
LAUNCH_START_FACTOR = 1.15  # accelerate launch starts its own interpreter (torch, accelerate) before the script's
SCRIPT_SETUP_S = 1.0  # a script's set-up inside main(): accelerator, models, data loader; and its saving
PIPELINE_IO_S = 1.0  # loading the DiT's pipeline and saving it to out_dir
DIT_SCRIPT_STEP_FACTOR = 1.15  # a train_dit step (data loading, EMA, logging) over the in-process timed step
TEACHER_PHASE_STEP_FACTOR = 1.15  # a teacher step of the 2000-step phase over the calibration's (1.14-1.15 measured)
SCORING_FIXED_S = 11.0  # scoring besides the forward passes: three logistic-regression probes, two FIDs, grids
PLAN_MARGIN = 0.02  # of the budget left unplanned: a phase's rate varies by a few percent from its calibration
TOKENIZER_PRESET, DIT_PRESET = read_preset("tiny", "tokenizer_"), read_preset("tiny", "dit_")
NUM_BANDS = UAE_PRESETS[TOKENIZER_PRESET["model_preset"]].get("num_bands", 4)  # 4: AutoencoderUAE's default


def step_counts(minutes: float) -> dict[str, int]:
    """The step counts of the phases scaled linearly with `minutes` from FULL_BUDGET_STEPS at the default budget,
    clamped below by MIN_STEPS: the plan's caps (at max(minutes, DEFAULT_MINUTES))."""
    return scaled_step_counts(minutes, FULL_BUDGET_STEPS, MIN_STEPS, DEFAULT_MINUTES)


def phase_seconds(steps: dict[str, int], rates: MachineRates) -> dict[str, float]:
    """Expected wall seconds of each phase (PHASE_STEPS order) with these step counts on a machine of `rates`,
    the training scripts' start-up included."""
    slowdown = rates.teacher_step / REFERENCE_TEACHER_STEP
    launch = LAUNCH_START_FACTOR * rates.script_start + SCRIPT_SETUP_S * slowdown
    judge_forward = rates.judge_step / (3 * 64)  # per image: a training step ~ 3 forward passes of its batch
    teacher_forward = rates.teacher_step / (3 * 64)
    # the tokenizer script validates the model and its EMA at step 0 and at the end
    tokenizer_validation = 4 * TOKENIZER_PRESET["num_validation_images"] * (rates.encode + rates.decode)
    dit_validation = DIT_PRESET["num_validation_images"] * (
        2 * DIT_PRESET["validation_num_inference_steps"] * rates.dit_forward + rates.decode)
    samples = NUM_CLASSES * steps["samples_per_class"]
    seconds = {"teacher": (steps["teacher"] * rates.teacher_step * TEACHER_PHASE_STEP_FACTOR
                           + (TEACHER_APPEARANCES - 1) * rates.load_split),
               "judge": steps["judge"] * rates.judge_step}
    for stage, cost in TOKENIZER_STAGE_COST.items():
        seconds[f"tokenizer_{stage}"] = (launch + 2 * rates.load_split + tokenizer_validation
                                         + cost * steps[f"tokenizer_{stage}"] * rates.tokenizer_step)
    seconds["cache"] = (rates.script_start + SCRIPT_SETUP_S * slowdown + rates.load_split
                        + 2 * TRAIN_IMAGES * rates.encode)  # every image and its mirror image
    seconds["dit"] = (launch + steps["dit"] * rates.dit_step * DIT_SCRIPT_STEP_FACTOR + dit_validation
                      + PIPELINE_IO_S * slowdown)
    seconds["sampling"] = (samples * (2 * steps["inference_steps"] * rates.dit_forward + rates.decode)
                           + (NUM_BANDS + 1) * NUM_CLASSES * rates.decode)  # the band previews
    seconds["scoring"] = (SCORING_FIXED_S * slowdown
                          + (2 * (TRAIN_IMAGES + HELDOUT_IMAGES) + HELDOUT_IMAGES) * rates.encode
                          + HELDOUT_IMAGES * rates.decode + (2 * HELDOUT_IMAGES + 3 * samples) * judge_forward
                          + HELDOUT_IMAGES * teacher_forward)
    return seconds


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Step counts for a budget, what each phase is expected to take, and how far the counts were shrunk.

    ``seconds`` holds the expected seconds of the phases still to run; ``elapsed_s`` what was spent before the
    plan was made (start-up, calibration, finished phases). ``level`` 0 means every count at its cap; see
    SHRINK_LEVELS. ``fits`` is False when even the minimum counts are expected to overrun the budget."""

    minutes: float
    steps: dict
    seconds: dict
    elapsed_s: float
    expected_s: float
    level: float
    fits: bool

    def table(self) -> str:
        """The plan as printed before training."""
        s, t = self.steps, self.seconds
        tokenizer = [name for name in ("tokenizer_1", "tokenizer_2", "tokenizer_3") if name in t]
        rows = [("so far", "", self.elapsed_s)]
        rows += [(name, str(s[name]), t[name]) for name in ("teacher", "judge") if name in t]
        if tokenizer:
            rows.append(("tokenizer", " / ".join(str(s[name]) for name in tokenizer), sum(t[n] for n in tokenizer)))
        rows += [(label, "", t[name]) for name, label in (("cache", "latent cache"),) if name in t]
        rows += [(DIT_MODEL, str(s["dit"]), t["dit"])] if "dit" in t else []
        if "sampling" in t:
            rows.append(("sampling", f"{s['samples_per_class']}/class x {s['inference_steps']} steps",
                         t["sampling"]))
        rows.append(("scoring", "", t["scoring"]))
        lines = [f"  {name:<13}{steps:<24}{seconds / 60:5.1f} min" for name, steps, seconds in rows]
        head = (f"plan: {self.expected_s / 60:.1f} of {self.minutes:g} min expected"
                + ("" if self.fits else " (the budget is shorter than the smallest run on this machine)"))
        return "\n".join([head, f"  {'phase':<13}{'steps':<24}expected", *lines])

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
                "elapsed_s": round(self.elapsed_s, 1), "expected_s": round(self.expected_s, 1),
                "level": round(self.level, 3)}


def shrunk_steps(caps: dict[str, int], level: float) -> dict[str, int]:
    """Every count at shrink `level` in [0, len(SHRINK_LEVELS)] (see SHRINK_LEVELS)."""
    counts = {}
    for name, cap in caps.items():
        group = "tokenizer" if name.startswith("tokenizer") else name
        value = previous = float(cap)
        for index, fractions in enumerate(SHRINK_LEVELS):
            fraction = fractions[group]
            target = MIN_STEPS[name] if fraction is None else fraction * FULL_BUDGET_STEPS[name]
            target = max(MIN_STEPS[name], min(previous, target))
            weight = min(max(level - index, 0.0), 1.0)
            value = previous + weight * (target - previous)
            if level <= index + 1:
                break
            previous = target
        counts[name] = max(MIN_STEPS[name], round(value))
    return counts


def plan_demo(minutes: float, rates: MachineRates, elapsed: float = 0.0, finished: tuple = (),
              done_steps: dict[str, int] | None = None) -> DemoPlan:
    """The step counts for a run of `minutes` in all on a machine of `rates`, `elapsed` seconds of it spent.

    Every count starts at its cap (step_counts(max(minutes, DEFAULT_MINUTES))) and the counts shrink together,
    level by level (SHRINK_LEVELS), to the least shrinking whose expected total (phase_seconds) fits the budget
    less PLAN_MARGIN.
    `finished` names the phases (PHASE_STEPS) already run, whose time is in `elapsed`, and `done_steps` their
    counts: only the other phases are planned, so a plan redone later gives the time left to the phases to come."""
    check_minutes(minutes)
    unknown = set(finished) - set(PHASE_STEPS)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; the phases are {list(PHASE_STEPS)}")
    done = {name: (done_steps or {})[name] for phase in finished for name in PHASE_STEPS[phase]}
    caps = step_counts(max(minutes, DEFAULT_MINUTES))

    def plan_at(level: float) -> tuple[dict, dict]:
        steps = {**shrunk_steps(caps, level), **done}
        seconds = {phase: value for phase, value in phase_seconds(steps, rates).items() if phase not in finished}
        return steps, seconds

    available = minutes * 60 * (1 - PLAN_MARGIN) - elapsed
    low, high = 0.0, float(len(SHRINK_LEVELS))
    if sum(plan_at(low)[1].values()) > available:
        for _ in range(40):  # bisection on a monotone total: counts never grow with the level
            middle = (low + high) / 2
            low, high = (low, middle) if sum(plan_at(middle)[1].values()) <= available else (middle, high)
        low = high
    steps, seconds = plan_at(low)
    expected = elapsed + sum(seconds.values())
    return DemoPlan(minutes=minutes, steps=steps, seconds=seconds, elapsed_s=elapsed, expected_s=expected,
                    level=low, fits=expected <= minutes * 60 + 1e-6)


def rates_text(rates: MachineRates) -> str:
    return (f"measured: {DIT_MODEL} {rates.dit_step:.3f} s/step ({dit_mixed_precision()} autocast), teacher "
            f"{rates.teacher_step:.3f}, judge {rates.judge_step:.3f}, tokenizer {rates.tokenizer_step:.3f} s/step, "
            f"script start-up {rates.script_start:.1f} s ({torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads)")


def train_tokenizer(work_dir: Path, steps: dict, seed: int, teacher_file: Path) -> tuple[Path, list[float]]:
    """Tokenizer stages 1 -> 2 -> 3, each from the previous one's (EMA) output; the teacher's encoder is the
    initial encoder and the semantic target throughout. Returns the stage-3 folder and, for each stage, the
    seconds its command took beyond the script's own timing (interpreter start-up, imports, exit)."""
    previous, start_up = None, []
    for stage in (1, 2, 3):
        n, output_dir = steps[f"tokenizer_{stage}"], work_dir / f"tokenizer-stage{stage}"
        flags = [] if previous is None else ["--init_from", previous]
        if stage == 3:  # the GAN schedule scaled to the stage length (preset: D from 20, G from 50 of 200)
            flags += ["--discriminator_start_step", n // 10, "--gan_start_step", n // 4]
        started = time.perf_counter()
        summary = train_tokenizer_stage(stage, n, output_dir, seed, teacher_file, flags)
        start_up.append(time.perf_counter() - started - summary["wall_time_s"])
        previous = output_dir
    return previous, start_up


def band0_probes(teacher_vae, final_vae, train, heldout) -> dict[str, float]:
    """Band-0 probe of the trained tokenizer vs the probes of the teacher encoder (its full latent and its band 0).
    `teacher_vae` is stage 1's output: stage 1 keeps the teacher's encoder frozen."""
    latents = {(name, split.split): raw_latents(vae, split.images)
               for name, vae in (("final", final_vae), ("teacher", teacher_vae)) for split in (train, heldout)}
    views = {"band0_probe_top1": ("final", lambda z: final_vae.split_bands(z)[:, 0]),
             "teacher_probe_top1": ("teacher", lambda z: z),
             "teacher_band0_probe_top1": ("teacher", lambda z: teacher_vae.split_bands(z)[:, 0])}
    return {metric: linear_probe_top1(probe_features(view(latents[name, "train"])), train.labels,
                                      probe_features(view(latents[name, "heldout"])), heldout.labels)
            for metric, (name, view) in views.items()}


def run_demo(out_dir: str = "uae_gen_demo", minutes: float = DEFAULT_MINUTES, seed: int = 0,
             started: float | None = None) -> dict:
    """Measure this machine, plan the phases for `minutes` of wall time in all (counted from `started`, a
    time.time() value: the command's start; default now), train the teacher, the judge, the tokenizer (3 stages),
    the latent cache and the DiT; sample and score. Returns the metrics."""
    check_minutes(minutes)
    started = time.time() if started is None else started
    timer = PhaseTimer(started)
    timer.lap("start_s")
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # ---- measure this machine, plan ------------------------------------------------------------------------
    train = load_demo_digits("train", seed=seed)
    load_started = time.perf_counter()  # the second rendering: the first one also loads the digits and photos
    heldout = load_demo_digits("heldout", seed=seed)
    rates = measure_rates(train, (time.perf_counter() - load_started) * len(train) / len(heldout), seed, DIT_FLAGS)
    timer.lap("calibration_s")
    plan = plan_demo(minutes, rates, time.time() - started)
    print(f"uae-gen demo: {minutes:g} min budget; {rates_text(rates)}\n{plan.table()}", flush=True)
    steps = dict(plan.steps)

    train, heldout, teacher, teacher_file, judge = train_teacher_and_judge(work, steps, seed, timer,
                                                                           splits=(train, heldout))
    # The plan again with the time left: a calibration that read the classifiers slow (a few busy seconds) would
    # otherwise cut the tokenizer for time that the teacher and the judge did not take.
    replans = {"tokenizer": replan(minutes, rates, started, ("teacher", "judge"), steps)}
    steps.update(replans["tokenizer"].steps)
    tokenizer_dir, start_up = train_tokenizer(work, steps, seed, teacher_file)
    timer.lap("tokenizer_s")

    cache_dir = work / "latents"
    cache_latents(tokenizer_dir, cache_dir, seed)
    timer.lap("cache_latents_s")

    # The plan again with the time left, the scripts' start-up as observed: the DiT absorbs whatever the earlier
    # phases took beyond their estimate (or gains what they saved, up to its cap).
    observed = dataclasses.replace(rates, script_start=sum(start_up) / len(start_up) / LAUNCH_START_FACTOR)
    finished = ("teacher", "judge", "tokenizer_1", "tokenizer_2", "tokenizer_3", "cache")
    replans["dit"] = replan(minutes, observed, started, finished, steps)
    steps.update(replans["dit"].steps)
    pipe = train_dit(cache_dir, work / "dit", steps["dit"], seed, DIT_FLAGS)
    save_pipeline(pipe, str(out / "pipeline"))  # temp folder, readable, renamed into place
    timer.lap("dit_s")

    # Sampling keeps the counts planned before the DiT: cutting them after an overrun would make the scores
    # meaningless (a few images at a few steps) for the sake of seconds.
    per_class = steps["samples_per_class"]
    images, labels, previews = generate(pipe, train.num_classes, per_class, steps["inference_steps"], seed)
    timer.lap("sampling_s")

    # ---- scores --------------------------------------------------------------------------------------------
    vae = pipe.vae.eval()
    teacher_vae = AutoencoderUAE.from_pretrained(work / "tokenizer-stage1").eval()
    recon = reconstruct(vae, heldout.images)
    real_features = classifier_features(judge, heldout.images).numpy()
    floor_index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: len(images)]
    metrics = {
        "tokenizer_heldout_psnr": psnr((recon + 1) / 2, (heldout.images + 1) / 2).mean().item(),
        **band0_probes(teacher_vae, vae, train, heldout),
        "teacher_heldout_accuracy": accuracy(predict(teacher, heldout.images), heldout.labels),
        "judge_heldout_accuracy": accuracy(predict(judge, heldout.images), heldout.labels),
        "judge_generated_accuracy": accuracy(predict(judge, images), labels),
        "judge_fid_generated_vs_heldout": frechet_distance_from_features(
            classifier_features(judge, images).numpy(), real_features),
        "judge_fid_train_vs_heldout_floor": frechet_distance_from_features(
            classifier_features(judge, train.images[floor_index]).numpy(), real_features),
        "guidance_scale": GUIDANCE_SCALE, "guidance_interval": list(GUIDANCE_INTERVAL),
        "num_inference_steps": steps["inference_steps"],
        "dit_mixed_precision": dit_mixed_precision(),
        "num_generated": len(images), "steps": steps, "minutes_budget": minutes, "seed": seed,
        "plan": plan.as_dict(), "replans": {phase: p.as_dict() for phase, p in replans.items()},
        "rates": dataclasses.asdict(rates),
        "observed": {"script_start_s": round(observed.script_start, 2),
                     "dit_script_s": read_summary(work / "dit")["seconds"]},
    }
    timer.lap("scoring_s")
    metrics["wall_time"] = timer.finish()

    # ---- pictures ------------------------------------------------------------------------------------------
    names = [train.id2label[k] for k in range(train.num_classes)]
    per_row = min(per_class, 10)
    grid = images.view(train.num_classes, per_class, *images.shape[1:])[:, :per_row].flatten(0, 1)
    save_image_grid(grid, str(out / "samples.png"), nrow=per_row,
                    labels=[name for name in names for _ in range(per_row)])
    num_bands = len(previews) // train.num_classes - 1  # rows: cumulative decodes of bands 0..k, then the sample
    save_image_grid(previews, str(out / "bands.png"), nrow=train.num_classes, value_range=(0, 1),
                    labels=[f"bands 0-{k}" if k < num_bands else "final" for k in range(num_bands + 1) for _ in names])
    shown = torch.cat([heldout.images[:10], recon[:10]])
    save_image_grid(shown, str(out / "reconstructions.png"), nrow=10,
                    labels=["held-out"] * 10 + ["reconstruction"] * 10)
    write_json(str(out / "metrics.json"), metrics)
    print(summary_text(metrics, out))
    return metrics


def replan(minutes: float, rates: MachineRates, started: float, finished: tuple, steps: dict) -> DemoPlan:
    """plan_demo for the phases after `finished` with the time left; prints the counts that changed."""
    plan = plan_demo(minutes, rates, time.time() - started, finished, steps)
    changed = {name: (steps[name], count) for name, count in plan.steps.items() if count != steps[name]}
    if changed:
        print(f"uae-gen demo: plan redone with {(minutes * 60 - plan.elapsed_s) / 60:.1f} min left: "
              + ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
              + f" (expected {plan.expected_s / 60:.1f} of {minutes:g} min)", flush=True)
    return plan


def summary_text(metrics: dict, out: Path) -> str:
    w = metrics["wall_time"]
    lines = [
        "", f"uae-gen demo: done in {w['total_s'] / 60:.1f} min (budget {metrics['minutes_budget']:g}, planned "
        f"{metrics['plan']['expected_s'] / 60:.1f}) -> {out}",
        "  wall (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in w.items() if k != "total_s"),
        f"  steps: {metrics['steps']}",
        f"  tokenizer held-out PSNR        {metrics['tokenizer_heldout_psnr']:.2f} dB",
        f"  teacher accuracy, held-out     {metrics['teacher_heldout_accuracy']:.3f}",
        f"  band-0 linear probe (top-1)    {metrics['band0_probe_top1']:.3f}   "
        f"(teacher: full latent {metrics['teacher_probe_top1']:.3f}, band 0 {metrics['teacher_band0_probe_top1']:.3f})",
        f"  judge accuracy, held-out real  {metrics['judge_heldout_accuracy']:.3f}",
        f"  judge accuracy, generated      {metrics['judge_generated_accuracy']:.3f}   "
        f"(CFG {metrics['guidance_scale']} on t in {metrics['guidance_interval']}, "
        f"{metrics['num_inference_steps']} steps, {metrics['num_generated']} images)",
        f"  judge-feature FID              {metrics['judge_fid_generated_vs_heldout']:.2f}   "
        f"(train vs held-out floor {metrics['judge_fid_train_vs_heldout_floor']:.2f})",
        "  files: samples.png bands.png reconstructions.png metrics.json pipeline/",
    ]
    return "\n".join(lines)
