"""What ``uae-gen demo`` (uae_gen.demo) and the small-scale ablation (eval/ablation.py) share: how they run the
training scripts, the teacher and the judge, the step budgets, the phase timer, what the work costs on this
machine (measure_rates, for the demo's plan), and the scoring helpers (latent probes, reconstructions,
class-conditional samples).

Every model except the two classifiers is trained by the package's training scripts, each in a subprocess of the
command a user types (the README's ``accelerate launch train/train_tokenizer.py ...`` with the script as its
installed module, so a pip install without the repository checkout runs it too)::

    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --quiet \\
        -m uae_gen.scripts.train_tokenizer --config tiny --stage 1 ...
    python -m uae_gen.scripts.cache_latents --vae ... --dataset demo-digits ...
    accelerate launch ... --mixed_precision bf16 ... -m uae_gen.scripts.train_dit --config dit_tiny ...

Each command is printed before it runs and what it trained is read back from its ``training_summary.json``.
``accelerate launch`` runs as ``python -m accelerate.commands.launch`` (what the ``accelerate`` console script
calls) with this interpreter. The subprocesses inherit the environment with ``HF_HUB_OFFLINE=1``, this process's
torch thread count as ``OMP_NUM_THREADS`` (accelerate launch would otherwise pin its script to one thread), and
glibc's malloc thresholds raised (``MALLOC_ENV``; a variable already set wins).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .data import load_demo_digits
from .demo_classifiers import TEACHER_APPEARANCES, Judge, build_teacher, train_classifier
from .flow import flow_matching_loss
from .losses import l1_reconstruction_loss, semantic_band_loss
from .models.autoencoder_uae import AutoencoderUAE
from .models.encoders import make_teacher
from .pipelines.pipeline_uae_dit import UAEDiTPipeline
from .scripts import train_dit as train_dit_script
from .training import EMA, make_readable, read_preset

# Steps of the phases every study runs alike, at the demo's default budget (see uae_gen.demo for what they cost);
# the minimum of each (and of the DiT's) when a budget scales them down.
SHARED_STEPS = {"teacher": 2000, "judge": 150, "samples_per_class": 20, "inference_steps": 20}
SHARED_MIN_STEPS = {"teacher": 4, "judge": 4, "dit": 4, "samples_per_class": 2, "inference_steps": 4}
DIT_MODEL = "DiT-mini"
# Judge accuracy of DiT-mini samples vs training steps (CFG 7 on all of t, 20 Euler steps, one latent cache, time
# shift 1): lr 2e-3 (the dit_tiny config) 1000: 0.76, 1500: 0.90, 2000: 0.905, 2500: 0.92; lr 1e-3 500: 0.17,
# 1000: 0.46, 1500: 0.73, 2000: 0.85, 3000: 0.91. CFG 7 beat 4 by 5-7 points at every step count; 10 and a (0.3, 1)
# guidance interval did not help, nor did 40 sampler steps. At dit_tiny's time shift 2 guidance on all of t costs
# the samples' spread, and an interval that leaves out the first and last steps keeps it: the demo's 32-token DiT
# after 1988 steps (the study's latent and 5 judges, 200 samples, mean of seeds 0-2) scores judge accuracy 0.965 and
# judge-FID 74.3 with CFG 7 on all of t, 0.965 and 45.4 on t in [0.2, 0.85] (CFG 4.5 there: 0.948 / 42.5), against
# 0.922 / 53.9 at shift 1 with CFG 7 on all of t.
GUIDANCE_SCALE = 7.0
GUIDANCE_INTERVAL = (0.2, 0.85)  # shifted time, 1 = noise

# glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mmaps and trims freed
# heap tops back to the OS, so a training step that frees and re-allocates the same activations, gradients and
# optimiser temporaries every iteration page-faults and zeroes them again: 10-15% of a DiT-mini CPU step. These
# tunables (glibc's documented environment variables; the same values as mallopt(M_MMAP_THRESHOLD, 32 MiB, its
# 64-bit ceiling) and mallopt(M_TRIM_THRESHOLD, 1 GiB)) keep freed memory in the process, as jemalloc / tcmalloc
# do; other C libraries ignore them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
STDERR_TAIL_BYTES = 8192  # of a failed script's stderr kept for the error ...
STDERR_TAIL_LINES = 30  # ... and the lines of it shown
SCRIPTS = "uae_gen.scripts"


def dit_mixed_precision() -> str:
    """bf16 autocast (fp32 master weights) for the DiT where the CPU has native bf16 dot products: a DiT-mini
    training step takes 153 instead of 225 ms here (AMD EPYC with avx512_bf16; fused AdamW, attention in fp32),
    which buys the demo's DiT steps within its budget. Elsewhere bf16 is emulated and slower than fp32.

    Native means: torch dispatches its AVX-512 kernels (``torch.backends.cpu.get_cpu_capability()``; an AVX2-only
    CPU, or ``ATEN_CPU_CAPABILITY=avx2`` emulating one, reports "AVX2") and, where the kernel lists the CPU's flags
    (/proc/cpuinfo), they include avx512_bf16 or amx_bf16 (AVX-512 CPUs before Cooper Lake / Zen 4 have neither)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return "no"
    flags = cpu_flags()
    return "bf16" if flags is None or flags & {"avx512_bf16", "amx_bf16"} else "no"


def cpu_flags() -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo (Linux x86), None where there is no such list."""
    try:
        with open("/proc/cpuinfo") as file:
            line = next((line for line in file if line.startswith("flags")), None)
    except OSError:
        return None
    return None if line is None else set(line.partition(":")[2].split())


def check_minutes(minutes: float) -> None:
    """A budget is a finite number of minutes above 0 (ValueError otherwise)."""
    if not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes}")


def scaled_step_counts(minutes: float, full_budget_steps: dict, min_steps: dict, default_minutes: float) -> dict:
    """Training steps of each phase for a budget of `minutes`: `full_budget_steps` (the steps at
    `default_minutes`) scaled linearly and clamped below by `min_steps`; sampler steps are never prolonged."""
    check_minutes(minutes)
    scale = minutes / default_minutes
    counts = {name: max(min_steps[name], round(steps * scale)) for name, steps in full_budget_steps.items()}
    counts["inference_steps"] = min(counts["inference_steps"], full_budget_steps["inference_steps"])
    return counts


class PhaseTimer:
    """Wall time of consecutive phases: ``lap(name)`` records the seconds since the previous lap (or the start:
    `started`, a time.time() value, default now)."""

    def __init__(self, started: float | None = None):
        self.started = self.last = time.time() if started is None else started
        self.wall: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.wall[name] = round(now - self.last, 1)
        self.last = now

    def finish(self) -> dict[str, float]:
        self.wall["total_s"] = round(time.time() - self.started, 1)
        return self.wall


# ---- the training scripts, as subprocesses -------------------------------------------------------------------


class ScriptFailed(subprocess.CalledProcessError):
    """A training script exited with an error: names the command (as printed) and shows the end of its stderr."""

    def __str__(self) -> str:
        return (f"`{self.cmd}` failed with exit status {self.returncode}; the end of its stderr:\n"
                f"{self.stderr}")


def script_env() -> dict[str, str]:
    """The environment of the training subprocesses (see the module docstring)."""
    env = {**MALLOC_ENV, **os.environ, "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def run_command(command: list[str], shown: str) -> None:
    """Print `shown` (the command as a user types it), run `command`, pass its output through; raise ScriptFailed
    with the end of its stderr when it fails."""
    print(f"$ {shown}", flush=True)
    sys.stderr.flush()
    decoder, tail = codecs.getincrementaldecoder("utf-8")("replace"), b""
    with subprocess.Popen(command, env=script_env(), stderr=subprocess.PIPE) as process:
        while chunk := process.stderr.read1(65536):
            tail = (tail + chunk)[-STDERR_TAIL_BYTES:]
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
        returncode = process.wait()
    if returncode != 0:
        lines = [line for line in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines() if line.strip()]
        raise ScriptFailed(returncode, shown, stderr="\n".join(lines[-STDERR_TAIL_LINES:]))


def run_script(name: str, flags: list, launch_mixed_precision: str | None = None) -> None:
    """Run uae_gen.scripts.`name` with `flags` (str() of each): under ``accelerate launch`` (one process, every
    launch setting given so that it warns of no default; --quiet: a failing script's error without the launcher's
    traceback) with `launch_mixed_precision` (also passed as the script's own --mixed_precision), or with plain
    ``python`` when it is None."""
    script = ["-m", f"{SCRIPTS}.{name}", *(str(flag) for flag in flags)]
    if launch_mixed_precision is None:
        runner, shown = [], ["python"]
    else:
        script += ["--mixed_precision", launch_mixed_precision]
        launch = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", launch_mixed_precision,
                  "--dynamo_backend", "no", "--quiet"]
        runner, shown = ["-m", "accelerate.commands.launch", *launch], ["accelerate", "launch", *launch]
    run_command([sys.executable, *runner, *script], shlex.join(shown + script))


def read_summary(output_dir: Path) -> dict:
    with open(Path(output_dir) / "training_summary.json") as file:
        return json.load(file)


def train_tokenizer_stage(stage: int, steps: int, output_dir: Path, seed: int, teacher_file: Path,
                          flags: tuple = ()) -> dict:
    """One stage of the tiny tokenizer on the demo digits, from the teacher's encoder (the semantic target too),
    validated once at the end, no checkpoints; returns its training summary."""
    run_script("train_tokenizer", ["--config", "tiny", "--stage", stage, "--output_dir", output_dir, "--dataset",
                                   "demo-digits", "--max_train_steps", steps, "--checkpointing_steps", steps + 1,
                                   "--validation_steps", steps, "--seed", seed, "--pretrained_encoder",
                                   teacher_file, *flags], launch_mixed_precision="no")
    return read_summary(output_dir)


def cache_latents(vae_dir: Path, output_dir: Path, seed: int) -> None:
    """The latent cache (with its statistics) of the demo digits under the tokenizer in `vae_dir`."""
    run_script("cache_latents", ["--vae", vae_dir, "--output_dir", output_dir, "--dataset", "demo-digits",
                                 "--seed", seed, "--overwrite"])


def train_dit(latent_cache: Path, output_dir: Path, steps: int, seed: int, flags: tuple = (),
              checkpointing_steps: int | None = None) -> UAEDiTPipeline:
    """A DIT_MODEL on `latent_cache` (dit_tiny preset, bf16 autocast where native), validated once at the end,
    checkpointed every `checkpointing_steps` (all kept; None: no checkpoints); returns its pipeline
    (output_dir/pipeline) with the progress bar off."""
    run_script("train_dit", ["--config", "dit_tiny", "--model", DIT_MODEL, "--latent_cache", latent_cache,
                             "--output_dir", output_dir, "--max_train_steps", steps, "--checkpointing_steps",
                             checkpointing_steps or steps + 1, "--checkpoints_total_limit", steps + 1,
                             "--validation_steps", steps, "--seed", seed, *flags],
               launch_mixed_precision=dit_mixed_precision())
    pipe = UAEDiTPipeline.from_pretrained(Path(output_dir) / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the teacher and the judge --------------------------------------------------------------------------------


def train_teacher(train, steps: int, seed: int, path: Path):
    """The teacher classifier, trained on every training digit in TEACHER_APPEARANCES renderings; its encoder's
    weights are saved to `path` (a --pretrained_encoder file)."""
    renderings = [train] + [load_demo_digits("train", seed=seed + k) for k in range(1, TEACHER_APPEARANCES)]
    images = torch.cat([split.images for split in renderings])
    labels = torch.cat([split.labels for split in renderings])
    teacher = train_classifier(build_teacher(train.num_classes), images, labels, steps, seed=seed,
                               description="teacher")
    temp = path.with_name(f".tmp-{path.name}")  # written whole, readable, then renamed into place
    save_file({k: v.contiguous() for k, v in teacher.encoder.backbone.state_dict().items()}, str(temp))
    make_readable(str(temp))
    os.replace(temp, path)
    return teacher


def train_teacher_and_judge(work: Path, steps: dict, seed: int, timer: PhaseTimer, splits: tuple | None = None):
    """The demo data splits (`splits` if the caller loaded them already), the teacher (its encoder saved to
    work/teacher_encoder.safetensors) and the judge: (train, heldout, teacher, teacher_file, judge)."""
    if splits is None:
        splits = load_demo_digits("train", seed=seed), load_demo_digits("heldout", seed=seed)
    train, heldout = splits
    teacher_file = work / "teacher_encoder.safetensors"
    teacher = train_teacher(train, steps["teacher"], seed, teacher_file)
    timer.lap("teacher_s")
    judge = train_classifier(Judge(train.num_classes), train.images, train.labels, steps["judge"], seed=seed,
                             description="judge")
    timer.lap("judge_s")
    return train, heldout, teacher, teacher_file, judge


# ---- what the work costs on this machine --------------------------------------------------------------------

CALIBRATION_STEPS = 8  # timed steps of each model, after one untimed warm-up step
# Latents per timed DiT forward: the sampler runs all samples and their unconditional twins as one batch (100 x 2 at
# half the default sample count), and a latent costs more in a large batch than in a small one.
SAMPLING_BATCH = 128


@dataclass(frozen=True)
class MachineRates:
    """Seconds that one unit of each kind of the demo's work takes on this machine (measure_rates)."""

    teacher_step: float  # the teacher classifier, one training step (batch 64)
    judge_step: float  # the judge, one training step (batch 64)
    tokenizer_step: float  # the tiny tokenizer, one stage-2 step (encoder trained against the teacher)
    dit_step: float  # DIT_MODEL, one training step with the script's batch, precision, clipping and EMA
    dit_forward: float  # DIT_MODEL, one latent through the eval model (a CFG sampler step runs two)
    encode: float  # one image through the tiny tokenizer's encoder, eval
    decode: float  # one latent through the tiny tokenizer's decoder, eval
    load_split: float  # rendering one training split of the demo digits
    script_start: float  # a training script's interpreter start and imports (python -c "import ...")


def median_seconds(step, repeats: int = CALIBRATION_STEPS) -> float:
    """Median wall time of `step()` over `repeats` calls after one untimed warm-up call (first-call allocations,
    kernel selection)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def script_start_seconds(module: str = f"{SCRIPTS}.train_dit") -> float:
    """Wall time of a fresh interpreter importing a training script, in the scripts' environment."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=script_env(), check=True)
    return time.perf_counter() - start


def measure_rates(train, load_split_seconds: float, seed: int, dit_flags: tuple = ()) -> MachineRates:
    """Time a few steps of each model the demo trains, built as the demo and the scripts build them (presets,
    batch sizes, the DiT's mixed precision, fused AdamW, clipping, EMA; `dit_flags`: train_dit flags given on top
    of its preset), and a script's start-up. `train` is the training split, whose rendering took
    `load_split_seconds`. Leaves the global RNG as it found it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rates = {"load_split": load_split_seconds, "script_start": script_start_seconds()}
        for name, model in (("teacher", build_teacher(train.num_classes)), ("judge", Judge(train.num_classes))):
            train_classifier(model, train.images, train.labels, 1, seed=seed, description=f"timing the {name}")
            start = time.perf_counter()
            train_classifier(model, train.images, train.labels, CALIBRATION_STEPS, seed=seed,
                             description=f"timing the {name}")
            rates[f"{name}_step"] = (time.perf_counter() - start) / CALIBRATION_STEPS
        rates.update(tokenizer_rates(train))
        rates.update(dit_rates(train.num_classes, dit_flags))
    return MachineRates(**rates)


def tokenizer_rates(train) -> dict[str, float]:
    """A stage-2 step of the tiny tokenizer (tokenizer_tiny preset: batch, semantic weight, EMA decay), and the
    eval encode / decode of one image."""
    preset = read_preset("tiny", "tokenizer_")
    vae = AutoencoderUAE.from_preset(preset["model_preset"])
    teacher = make_teacher(vae.encoder)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=preset["learning_rate"], fused=True)
    ema = EMA(vae, preset["ema_decay"])
    batch = preset["train_batch_size"]

    def step():
        images = train.images[torch.randint(len(train), (batch,))]
        reconstruction, _, bands = vae(images, False, return_dict=False)
        with torch.no_grad():
            target = vae.split_bands(teacher(images).float())
        loss = l1_reconstruction_loss(reconstruction, images) + preset["semantic_weight"] * semantic_band_loss(
            bands.float(), target, preset["num_base_bands"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        ema.update(vae)

    rates = {"tokenizer_step": median_seconds(step)}
    vae.eval()
    images = train.images[:64]
    with torch.no_grad():
        latents = vae.encode_raw(images)
        rates["encode"] = median_seconds(lambda: vae.encode_raw(images)) / len(images)
        rates["decode"] = median_seconds(lambda: vae.decode_raw(latents)) / len(images)
    return rates


def dit_rates(num_classes: int, flags: tuple = ()) -> dict[str, float]:
    """A training step of DIT_MODEL on the tiny tokenizer's latent as train_dit runs it (the dit_tiny preset's
    transformer, band schedule and noise with `flags` on top, built by the script's own functions; batch, LR,
    betas, clipping, EMA; bf16 autocast where dit_mixed_precision() says so), and one latent through the eval model
    in fp32, as the pipeline samples."""
    args = train_dit_script.parse_args(["--config", "dit_tiny", "--model", DIT_MODEL, "--latent_cache", "unread",
                                        *(str(flag) for flag in flags)])
    vae = AutoencoderUAE.from_preset("tiny")  # the latent's shape and bands
    channels, (height, width) = vae.latent_channels, vae.latent_size
    schedule = train_dit_script.make_flow_scheduler(args, vae).band_schedule
    dit = train_dit_script.make_transformer(args, vae, num_classes, schedule.num_model_times)
    noise_projection = (lambda noise: vae.lowpass(noise, args.latent_lowpass)) if args.frequency_tokens else None
    optimizer = torch.optim.AdamW(dit.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  fused=True)
    ema = EMA(dit, args.ema_decay)
    batch, bf16 = args.train_batch_size, dit_mixed_precision() == "bf16"
    latents, labels = torch.randn(batch, channels, height, width), torch.randint(num_classes, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(lambda x, t, y: dit(x, t, y).sample, latents, labels, schedule,
                                      time_distribution=args.time_distribution,
                                      noise_projection=noise_projection).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), args.max_grad_norm)
        optimizer.step()
        ema.update(dit)

    rates = {"dit_step": median_seconds(step)}
    dit.eval()
    sample = torch.randn(SAMPLING_BATCH, channels, height, width)
    times, sample_labels = torch.rand(SAMPLING_BATCH), torch.randint(num_classes + 1, (SAMPLING_BATCH,))
    with torch.no_grad():
        rates["dit_forward"] = median_seconds(lambda: dit(sample, times, sample_labels), 2) / SAMPLING_BATCH
    return rates


# ---- scoring --------------------------------------------------------------------------------------------------


@torch.no_grad()
def raw_latents(vae: AutoencoderUAE, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([vae.encode_raw(chunk) for chunk in images.split(batch_size)])


def probe_features(z: torch.Tensor) -> np.ndarray:
    """2x2-average-pooled raw latent (or band of it), flattened: (N, C * h/2 * w/2)."""
    return F.avg_pool2d(z, 2).flatten(1).numpy()


def linear_probe_top1(train_features, train_labels, test_features, test_labels) -> float:
    """Held-out top-1 of a standardised multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1))
    probe.fit(train_features, train_labels.numpy())
    return float(probe.score(test_features, test_labels.numpy()))


@torch.no_grad()
def reconstruct(vae: AutoencoderUAE, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Eval-mode reconstructions in [-1, 1] (clamped)."""
    return torch.cat([vae.decode_raw(vae.encode_raw(c))[0] for c in images.split(batch_size)]).clamp(-1, 1)


def generate(pipe: UAEDiTPipeline, num_classes: int, per_class: int, inference_steps: int, seed: int,
             guidance_scale: float = GUIDANCE_SCALE, guidance_interval: tuple = GUIDANCE_INTERVAL,
             previews: bool = True):
    """(images in [-1, 1] ordered class by class, their labels, band previews of the first sample of each class, or
    None when `previews` is off)."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    output = pipe(class_labels=labels.tolist(), guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                  num_inference_steps=inference_steps, generator=generator, output_type="pt",
                  return_band_previews=previews)
    if not previews:
        return output.images * 2 - 1, labels, None
    first_of_class = labels.new_tensor([k * per_class for k in range(num_classes)])
    bands = torch.cat([p[first_of_class] for p in output.band_previews] + [output.images[first_of_class]])
    return output.images * 2 - 1, labels, bands


def write_text(path: Path, text: str) -> None:
    """Write `text` through a temp file and an atomic rename (a reader never sees half a file), with the
    permissions of an ordinary new file (0666 less the umask)."""
    temp = Path(f"{path}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
