"""The paper's ablation at small scale: RAE-style tokenizer -> + BandProjector -> + encoder tuning -> + noise
injection, a band-count sweep, and uniform vs low-to-high generation, on the demo digits with the demo teacher.

    python eval/ablation.py --out_dir uae_gen_ablation --minutes 25     # CPU, offline: ablation.md / .json / .png
    python eval/ablation.py --preset imagenet256                        # prints the same study at the paper's scale

Every model is trained by the package's training scripts, each run as the subprocess of a printed `accelerate
launch -m uae_gen.scripts.train_tokenizer ...` (or `python -m uae_gen.scripts.cache_latents`, `accelerate launch -m
uae_gen.scripts.train_dit`) command, as `uae-gen demo` runs them (uae_gen.demo_setup, which this study shares with
the demo). One
teacher (the tiny DINOv2-architecture classifier: DINOv2's role, the tokenizers' initial encoder and the semantic
target) and NUM_JUDGES judges (resnet10t from different seeds: class accuracy and the feature space of the
judge-FID, each score a mean over them) are trained once and shared by every row. Tokenizer rows, each with the same
seed and one equal step budget N (`--minutes` scales it):

  a   RAE-style: K=1 (no band split), encoder frozen (stage 1 only), no band noise;
  b   + BandProjector: K=4, otherwise as a;
  c   + encoder tuning: stage 1 for N/2 steps, then stage 2 for N/2 (the encoder trains with L1 + the semantic
      loss on band 0 against the frozen teacher), no band noise;
  d   + noise injection (the full UAE at this scale): as c, with noise on bands >= 1 in stage 2;
  k2, k8   the band-count sweep: d with K=2 and K=8 (K=4 is d).

Rows c and d share their stage-1 run (same seed and configuration). There is no stage 3 (GAN): its discriminator
makes a step about 8x the cost of a stage-1 step on the CPU.

Generation ("gen", on row d's latent or --latent_cache): uniform flow matching against low-to-high generators
(GENERATION_ROWS: compressed or shifted band clocks, the frequency-limited latent and its curriculum, frequency
tokens, and uniform and frequency tokens again at time shift 2), each trained for the same wall-clock time (uniform's
steps x the step-time ratio, timed side by side in this process) for every seed of --generation_seeds, checkpointed
every quarter; each picks its CFG scale and guidance interval on GUIDANCE_GRID, then is scored at every NFE of
NFE_GRID and at every checkpoint (generation.png: the curves). A rerun in the same --out_dir reuses the generators
trained there (work/generation_steps.json keeps their budgets) and scores them anew.

    python eval/ablation.py --rows gen --latent_cache uae_gen_demo/work/latents --generation_seeds 0 1 2 \
        --generation_rows uniform freq64x2 freq64x4

Writes to --out_dir: ablation.md (tables, row notes, the paper's claims checked), ablation.json (every number,
setting and step count), reconstructions.png (held-out originals, then each row's reconstructions), samples.png
(one sample per class per generator), generation.png and work/ (every trained model).
"""

import argparse
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from uae_gen import AutoencoderUAE, BandProjector, UAEDiTPipeline
from uae_gen.data import LatentCacheDataset
from uae_gen.models.dit import UAEDiT
from uae_gen.scripts import train_dit as train_dit_script
from uae_gen.demo_classifiers import Judge, accuracy, classifier_features, predict, train_classifier
from uae_gen import demo_setup as shared  # what the demo and this study share
from uae_gen.metrics import frechet_distance_from_features, psnr, ssim
from uae_gen.training import save_image_grid, write_json

DEFAULT_MINUTES = 25.0
# Steps at the default budget; each scales linearly with --minutes, clamped below by MIN_STEPS. The teacher, judge
# and sampling counts are the demo's. Measured at 1 thread: tokenizer ~0.05 s/step (stage 2 ~0.06), 200 samples
# x 20 CFG steps ~65 s; DiT-mini (bf16 autocast where the CPU has it natively, as in the demo) ~0.2 s/step at
# 2 threads.
FULL_BUDGET_STEPS = {**shared.SHARED_STEPS, "tokenizer": 800, "dit": 1100}
MIN_STEPS = {**shared.SHARED_MIN_STEPS, "tokenizer": 2}
PROGRESSIVE_STAGGER = 0.5
FINAL_FID_RATIO, QUARTER_FID_RATIO = 0.8, 0.6  # "beats uniform": judge-FID at the end / at 1/4 of the budget
SHIFTED_STAGGER = 0.3  # SFD's best offset (FID 3.03 vs 5.24 at 0 and 5.41 at 1.0)
# The dimension rule sqrt(C*h*w / 4096) gives shift 1 on the demo latent (64 x 8 x 8), and the study's rows run at it;
# 2 scored better for both token layouts (3 seeds; 4 worse for frequency tokens on seed 0) and is dit_tiny's shift, so
# the *-shift2 rows compare the layouts at that shift.
TUNED_TIME_SHIFT = 2.0
# Generation scoring: each row's CFG scale and guidance interval (shifted time, 1 = noise) are picked on GUIDANCE_GRID
# at REFERENCE_NFE (lowest judge-FID, mean over seeds), then scored at every NFE and at the checkpoint after each
# quarter of the training budget.
GUIDANCE_SCALES = (3.0, 4.5, 6.0, 8.0)
GUIDANCE_INTERVALS = ((0.0, 1.0), (0.2, 0.85))
GUIDANCE_GRID = tuple(itertools.product(GUIDANCE_SCALES, GUIDANCE_INTERVALS))  # (scale, interval)
# Judge-FID depends on the judge about as much as on the generator (three judges trained from different seeds put one
# uniform DiT's samples at 53.6, 62.3 and 54.4), so accuracy and judge-FID are means over NUM_JUDGES judges, the
# first the demo's.
NUM_JUDGES = 5
NFE_GRID = (10, 25, 50)
REFERENCE_NFE = 25
# FID's small-sample bias dominates at 200 samples (real training images score 34.8 against the held-out ones there,
# 17.7 at 1000), which squeezes every ratio toward 1, so each row's chosen setting is also scored on this many times
# the samples.
LARGE_SAMPLE_FACTOR = 5
CHECKPOINT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
FULL_UAE_BANDS = 4
# Thresholds of the claim checks in ablation.md.
PROBE_TOLERANCE = 0.02  # band 0 "keeps the semantics" when its probe is at most 2 points under the teacher's
STABLE_PSNR_SPREAD_DB = 1.0  # "stable across K": PSNR within 1 dB ...
STABLE_PROBE_SPREAD = 0.05  # ... and band-0 probe within 5 points


@dataclass(frozen=True)
class TokenizerRow:
    """One tokenizer configuration of the study."""

    key: str
    name: str
    num_bands: int
    tune_encoder: bool  # stage 1 (frozen encoder) then stage 2 (encoder + semantic band loss), half the steps each
    band_noise: bool  # noise on bands >= 1 while training stage 2
    note: str


TOKENIZER_ROWS = (
    TokenizerRow("a", "RAE-style", 1, False, False,
                 "K=1 (no band split), encoder frozen: stage 1 only, the decoder and the spectral transform train "
                 "(the transform is kept so that a and b differ only in K; RAE proper has none: "
                 "spectral_transform_channels 0)"),
    TokenizerRow("b", "+ BandProjector", 4, False, False,
                 "K=4 bands, otherwise as a; the encoder is frozen, so a semantic band loss could not change "
                 "anything (stage 1 has none)"),
    TokenizerRow("c", "+ encoder tuning", 4, True, False,
                 "stage 1 for half the steps (shared with d), then stage 2: the encoder trains with L1 + 0.1 x the "
                 "semantic loss on band 0 against the frozen teacher"),
    TokenizerRow("d", "+ noise injection (full UAE)", 4, True, True,
                 "as c, with band-limited noise on bands >= 1 in stage 2 (no GAN stage)"),
    TokenizerRow("k2", "full UAE, K=2", 2, True, True, "d with 2 bands (its own stage 1)"),
    TokenizerRow("k8", "full UAE, K=8", 8, True, True, "d with 8 bands (its own stage 1)"),
)
ROWS_BY_KEY = {row.key: row for row in TOKENIZER_ROWS}
ABLATION_TABLE = ("a", "b", "c", "d")
BAND_SWEEP_TABLE = ("k2", "d", "k8")
ROW_CHOICES = tuple(ROWS_BY_KEY) + ("gen",)

# Table columns: (header, JSON key, format). The Markdown cells are format(JSON value, format).
TOKENIZER_COLUMNS = (
    ("PSNR (dB)", "heldout_psnr", ".2f"),
    ("SSIM", "heldout_ssim", ".3f"),
    ("judge-FID", "judge_fid", ".2f"),
    ("judge acc.", "judge_accuracy", ".3f"),
    ("band-0 probe", "band0_probe_top1", ".3f"),
    ("teacher probe", "teacher_probe_top1", ".3f"),
    ("wall (s)", "wall_s", ".1f"),
)
# (header, setting of the row's summary, score, format); cells are "mean ± std" over the seeds.
GENERATION_COLUMNS = (
    ("acc. 1/4", "quarter", "judge_accuracy", ".3f"),
    ("FID 1/4", "quarter", "judge_fid", ".1f"),
    ("acc. NFE 10", "nfe10", "judge_accuracy", ".3f"),
    ("FID NFE 10", "nfe10", "judge_fid", ".1f"),
    ("acc. NFE 25", "nfe25", "judge_accuracy", ".3f"),
    ("FID NFE 25", "nfe25", "judge_fid", ".1f"),
    ("acc. NFE 50", "nfe50", "judge_accuracy", ".3f"),
    ("FID NFE 50", "nfe50", "judge_fid", ".1f"),
    ("ms/sample NFE 25", "nfe25", "ms_per_sample", ".0f"),
    (f"acc. NFE 25, {LARGE_SAMPLE_FACTOR}x samples", "large", "judge_accuracy", ".3f"),
    (f"FID NFE 25, {LARGE_SAMPLE_FACTOR}x samples", "large", "judge_fid", ".1f"),
)


def step_counts(minutes: float) -> dict[str, int]:
    """Steps of each phase for a budget of `minutes` (the default budget gives FULL_BUDGET_STEPS), plus the split of
    the tokenizer budget between stage 1 and stage 2 for the encoder-tuning rows."""
    counts = shared.scaled_step_counts(minutes, FULL_BUDGET_STEPS, MIN_STEPS, DEFAULT_MINUTES)
    counts["tokenizer_stage1"] = counts["tokenizer"] // 2
    counts["tokenizer_stage2"] = counts["tokenizer"] - counts["tokenizer_stage1"]
    return counts


def selected_rows(rows, latent_cache: str | None = None) -> list[str]:
    """The requested rows in table order; generation needs row d (its latent) unless given a latent cache."""
    unknown = sorted(set(rows) - set(ROW_CHOICES))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {list(ROW_CHOICES)}")
    if "gen" in rows and "d" not in rows and latent_cache is None:
        raise ValueError("row 'gen' trains the DiT on row d's latent: add 'd' to --rows (or give --latent_cache)")
    return [key for key in ROW_CHOICES if key in rows]


# ---- training -----------------------------------------------------------------------------------------------


def tokenizer_run(out: Path, output_dir: Path, stage: int, steps: int, seed: int, teacher_file: Path,
                  band_noise: bool, flags: list) -> dict:
    """Train one tokenizer stage; what the row record keeps of it (wall: the run as the script times itself)."""
    flags = ["--band_noise" if band_noise else "--no-band_noise", *flags]
    summary = shared.train_tokenizer_stage(stage, steps, output_dir, seed, teacher_file, flags)
    return {"stage": summary["stage"], "dir": output_dir.relative_to(out).as_posix(), "steps": summary["global_step"],
            "band_noise": summary["band_noise"], "trained": summary["trained"], "wall_s": summary["wall_time_s"]}


def train_row(row: TokenizerRow, out: Path, steps: dict, seed: int, teacher_file: Path,
              stage1_runs: dict) -> list[dict]:
    """Train one tokenizer row; returns its runs in order (the last one's folder holds the row's model).
    `stage1_runs` maps (K, steps) to a finished stage 1, which rows with the same stage 1 (c and d) share."""
    work = out / "work"
    stage1_steps = steps["tokenizer_stage1"] if row.tune_encoder else steps["tokenizer"]
    if (row.num_bands, stage1_steps) not in stage1_runs:
        output_dir = work / (f"stage1-K{row.num_bands}" if row.tune_encoder else row.key)
        stage1_runs[row.num_bands, stage1_steps] = tokenizer_run(
            out, output_dir, 1, stage1_steps, seed, teacher_file, band_noise=False,
            flags=["--model_config", json.dumps({"num_bands": row.num_bands})])
    runs = [stage1_runs[row.num_bands, stage1_steps]]
    if row.tune_encoder:
        runs.append(tokenizer_run(out, work / row.key, 2, steps["tokenizer_stage2"], seed, teacher_file,
                                  row.band_noise, flags=["--init_from", out / runs[0]["dir"]]))
    return runs


# ---- scores -------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_latents(teacher, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The teacher encoder's token grid: the latent every tokenizer row starts from."""
    return torch.cat([teacher.encoder(chunk) for chunk in images.split(batch_size)])


def teacher_scores(teacher, train, heldout) -> dict[str, float]:
    """The teacher's held-out accuracy and the probe on its latent, full and band 0 of the full UAE's K-band split
    (the paper's "band 0 vs DINOv2" comparison)."""
    z_train, z_heldout = teacher_latents(teacher, train.images), teacher_latents(teacher, heldout.images)
    projector = BandProjector(*z_train.shape[-2:], num_bands=FULL_UAE_BANDS)
    band0 = lambda z: shared.probe_features(projector.split(z)[:, 0])  # noqa: E731
    return {
        "heldout_accuracy": accuracy(predict(teacher, heldout.images), heldout.labels),
        "probe_top1": shared.linear_probe_top1(shared.probe_features(z_train), train.labels,
                                               shared.probe_features(z_heldout), heldout.labels),
        "band0_probe_top1": shared.linear_probe_top1(band0(z_train), train.labels, band0(z_heldout), heldout.labels),
    }


class JudgePanel:
    """Judges (resnet10t classifiers trained from different seeds) that score images by their class accuracy and
    the Frechet distance of their pooled features to the held-out images', each a mean over the judges."""

    def __init__(self, judges: list, heldout):
        self.judges = judges
        self.heldout_features = [classifier_features(judge, heldout.images).numpy() for judge in judges]

    @classmethod
    def train(cls, first_judge, train, heldout, steps: int, seed: int, count: int = NUM_JUDGES) -> "JudgePanel":
        """`first_judge` (the demo's) and count - 1 more, judge j initialised and trained from seed + j."""
        judges = [first_judge]
        for j in range(1, count):
            with torch.random.fork_rng():  # seed the initial weights without reseeding the study's RNG
                torch.manual_seed(seed + j)
                judge = Judge(train.num_classes)
            judges.append(train_classifier(judge, train.images, train.labels, steps, seed=seed + j,
                                           description=f"judge {j + 1}"))
        return cls(judges, heldout)

    def scores(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """judge_accuracy, judge_fid (means over the judges) and judge_fids (each judge's)."""
        fids = [frechet_distance_from_features(classifier_features(judge, images).numpy(), features)
                for judge, features in zip(self.judges, self.heldout_features)]
        return {"judge_accuracy": statistics.fmean(accuracy(predict(judge, images), labels) for judge in self.judges),
                "judge_fid": statistics.fmean(fids), "judge_fids": fids}


def tokenizer_scores(vae: AutoencoderUAE, train, heldout, judges: JudgePanel) -> tuple[dict, torch.Tensor]:
    """Held-out PSNR / SSIM (8-bit levels), judge-FID and judge accuracy of the reconstructions, band-0 probe;
    and the reconstructions."""
    recon = shared.reconstruct(vae, heldout.images)
    x, reference = (recon + 1) / 2, (heldout.images + 1) / 2
    band0 = lambda z: shared.probe_features(vae.split_bands(z)[:, 0])  # noqa: E731
    scores = {
        "heldout_psnr": psnr(x, reference).mean().item(),
        "heldout_ssim": ssim(x, reference).mean().item(),
        **judges.scores(recon, heldout.labels),
        "band0_probe_top1": shared.linear_probe_top1(band0(shared.raw_latents(vae, train.images)), train.labels,
                                                     band0(shared.raw_latents(vae, heldout.images)), heldout.labels),
    }
    return scores, recon


@dataclass(frozen=True)
class GenerationRow:
    """One generator of the study: its train_dit flags on top of the dit_tiny preset, its time shift, and
    optionally a --lowpass_schedule curriculum given as (N, fraction of the step budget at which stage N starts)."""

    key: str
    flags: tuple
    note: str
    curriculum: tuple = ()
    low_to_high: bool = True  # False for the uniform baselines the claim compares against
    time_shift: float | str = "auto"  # the dimension rule (1 on this latent), not dit_tiny's TUNED_TIME_SHIFT

    def train_flags(self, steps: int) -> tuple:
        """The flags for a run of `steps` steps: the time shift, the curriculum's stages at their fraction of it."""
        stages = tuple(f"{count}@{round(fraction * steps)}" for count, fraction in self.curriculum)
        flags = (*self.flags, "--time_shift", self.time_shift)
        return (*flags, "--lowpass_schedule", *stages) if stages else flags


# dit_tiny runs on frequency tokens; the spatial rows turn that off and learn the whole 8x8 latent, one token per cell.
SPATIAL = ("--latent_lowpass", "none", "--no-frequency_tokens", "--coefficients_per_token", 1)
GENERATION_ROWS = (
    GenerationRow("uniform", SPATIAL, "plain flow matching on the spatial latent: one time for the whole latent, "
                  "64 tokens", low_to_high=False),
    GenerationRow("progressive", (*SPATIAL, "--band_stagger", PROGRESSIVE_STAGGER),
                  f"compressed band clocks, stagger {PROGRESSIVE_STAGGER}: band 0 is clean from t = "
                  f"{PROGRESSIVE_STAGGER} on, the highest band only at t = 0"),
    GenerationRow("shifted", (*SPATIAL, "--band_clock", "shifted", "--band_stagger", SHIFTED_STAGGER,
                              "--band0_loss_weight", 2.0),
                  f"SFD's shifted band clocks (band 0 leads by {SHIFTED_STAGGER}, one time embedding per band, "
                  "band 0's loss x2, finished bands' drift masked)"),
    GenerationRow("lowpass32", ("--latent_lowpass", 32, "--frequency_tokens", "--coefficients_per_token", 1),
                  "the UAE v2 frequency-limited latent: the first 32 of the 64 zig-zag DCT coefficients per channel, "
                  "one token each (32 tokens)"),
    GenerationRow("lowpass-curriculum", ("--latent_lowpass", 64, *SPATIAL[2:]),
                  "the UAE v2 curriculum on the spatial DiT: the first 36 zig-zag DCT coefficients per channel for "
                  "the first quarter of the budget, 49 for the second, then all 64 (64 tokens)",
                  curriculum=((36, 0.0), (49, 0.25), (64, 0.5))),
    GenerationRow("freq64x2", ("--latent_lowpass", 64, "--frequency_tokens", "--coefficients_per_token", 2),
                  "the whole DCT spectrum in zig-zag order, two neighbouring coefficients per token: 32 tokens "
                  "ordered from low to high frequency"),
    GenerationRow("freq64x4", ("--latent_lowpass", 64, "--frequency_tokens", "--coefficients_per_token", 4),
                  "as freq64x2 with four coefficients per token: 16 tokens (dit_tiny's layout)"),
    GenerationRow("freq64x4-c2f", ("--latent_lowpass", 64, "--frequency_tokens", "--coefficients_per_token", 4,
                                   "--coarse_tokens", 4, "--coarse_time", 0.5),
                  "as freq64x4, coarse to fine: while t > 0.5 the DiT runs on the first 4 tokens (16 coefficients per "
                  "channel) and the finer coefficients stay noise"),
    GenerationRow("freq64x4-x", ("--latent_lowpass", 64, "--frequency_tokens", "--coefficients_per_token", 4,
                                 "--prediction_type", "sample"),
                  "as freq64x4 with x-prediction (JiT's remedy for tokens wider than the model: 256 values per "
                  "token, DiT-mini is 192 wide): the DiT predicts the clean latent, the loss is on the velocity"),
    GenerationRow("uniform-shift2", SPATIAL,
                  f"as uniform with time shift {TUNED_TIME_SHIFT} instead of the dimension rule's 1: more training and "
                  "sampling at high noise", low_to_high=False, time_shift=TUNED_TIME_SHIFT),
    GenerationRow("freq64x4-shift2", ("--latent_lowpass", 64, "--frequency_tokens", "--coefficients_per_token", 4),
                  f"as freq64x4 with time shift {TUNED_TIME_SHIFT}, dit_tiny's default (compare with uniform-shift2)",
                  time_shift=TUNED_TIME_SHIFT),
    GenerationRow("freq64x2-shift2", ("--latent_lowpass", 64, "--frequency_tokens", "--coefficients_per_token", 2),
                  f"as freq64x2 with time shift {TUNED_TIME_SHIFT}: the demo's layout (compare with uniform-shift2)",
                  time_shift=TUNED_TIME_SHIFT),
    *(GenerationRow(f"freq64x4-shift2-b{batch}", ("--latent_lowpass", 64, "--frequency_tokens",
                                                  "--coefficients_per_token", 4, "--train_batch_size", batch),
                    f"as freq64x4-shift2 with batch {batch} instead of 32: the 16 tokens' cheaper step spent on more "
                    "samples per step rather than more steps", time_shift=TUNED_TIME_SHIFT) for batch in (64, 128)),
)
GENERATION_BY_KEY = {row.key: row for row in GENERATION_ROWS}
DEFAULT_GENERATION_ROWS = ("uniform", "freq64x2", "freq64x4")


def dit_step_seconds(rows: list[GenerationRow], latent_cache: Path, num_classes: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) of each row's transformer, built by
    train_dit's own `make_transformer` from the row's flags, on the cache's latent shape with the row's batch and
    the script's autocast. The rows are timed round-robin in this process, so each sees the same machine load: the
    ratios set the equal-time budgets even on a busy machine."""
    bf16 = shared.dit_mixed_precision() == "bf16"
    models = {}
    for row in rows:
        args = train_dit_script.parse_args(["--config", "dit_tiny", "--model", shared.DIT_MODEL,
                                            "--latent_cache", str(latent_cache), *map(str, row.flags)])
        vae = AutoencoderUAE.from_pretrained(LatentCacheDataset(latent_cache).autoencoder_dir)
        times = train_dit_script.make_flow_scheduler(args, vae).band_schedule.num_model_times
        model = train_dit_script.make_transformer(args, vae, num_classes, times)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        models[row.key] = (model, optimizer, times, vae, args.train_batch_size)
    seconds = {key: [] for key in models}
    for _ in range(shared.CALIBRATION_STEPS + 1):
        for key, (model, optimizer, times, vae, batch) in models.items():
            x = torch.randn(batch, vae.latent_channels, *vae.latent_size)
            t = torch.rand(batch, times).squeeze(1)
            y = torch.randint(num_classes, (batch,))
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = (model(x, t, y).sample.float() - x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[key].append(time.perf_counter() - started)
    return {key: statistics.median(times[1:]) for key, times in seconds.items()}  # the first step warms up


def generation_step_seconds(out: Path, rows: list[GenerationRow], latent_cache: Path,
                            num_classes: int) -> dict[str, float]:
    """Each row's training-step seconds, timed once per study directory and kept in work/generation_steps.json: a
    rerun in the same --out_dir keeps the equal-time budgets, so it reuses the generators trained to them (and
    rescores them with the script's current settings). Rows not timed yet are timed side by side with uniform and
    kept as their ratio to uniform times its stored seconds, so the stored budgets never change."""
    path = out / "work" / "generation_steps.json"
    seconds = json.loads(path.read_text()) if path.is_file() else {}
    missing = [row for row in rows if row.key not in seconds]
    if missing:
        timed = dit_step_seconds([GENERATION_BY_KEY["uniform"], *missing], latent_cache, num_classes)
        anchor = seconds.get("uniform", timed["uniform"])
        seconds.update({"uniform": anchor, **{row.key: timed[row.key] / timed["uniform"] * anchor for row in missing}})
        write_json(str(path), seconds)
    return {row.key: seconds[row.key] for row in rows}


def is_trained(dit_dir: Path, steps: int, seed: int) -> bool:
    """Whether `dit_dir` holds a finished train_dit run of `steps` steps with `seed` (reused by a rerun)."""
    if not (dit_dir / "training_summary.json").is_file():
        return False
    summary = shared.read_summary(dit_dir)
    return summary["global_step"] == steps and summary["args"]["seed"] == seed


def score_samples(pipe, judges: JudgePanel, num_classes: int, per_class: int, nfe: int, guidance: tuple,
                  seed: int) -> tuple[dict, torch.Tensor]:
    """Judge accuracy, judge-FID and sampling ms per image of `pipe`'s samples at guidance (scale, interval), and one
    sample per class."""
    started = time.perf_counter()
    scale, interval = guidance
    images, labels, _ = shared.generate(pipe, num_classes, per_class, nfe, seed, scale, interval, previews=False)
    ms = (time.perf_counter() - started) * 1000 / len(images)
    return {**judges.scores(images, labels), "ms_per_sample": ms}, images[::per_class]


def generation_rows(out: Path, latent_cache: Path, keys: list[str], steps: dict, seeds: list[int], num_classes: int,
                    judges: JudgePanel) -> tuple[list[dict], torch.Tensor]:
    """Train every row's DiT for each seed with an equal training-time budget (uniform's steps x the in-process
    step-time ratio), checkpointed every quarter (a run already in `out` with its budget is reused); score every
    run at NFE 25 over GUIDANCE_GRID, pick each row's guidance (lowest judge-FID, mean over seeds), then score it at
    every NFE of NFE_GRID, at every checkpoint and on LARGE_SAMPLE_FACTOR x the samples. Returns the rows and one
    sample per class of each (first seed, final, NFE 25)."""
    rows = [GENERATION_BY_KEY[key] for key in keys]
    step_seconds = generation_step_seconds(out, rows, latent_cache, num_classes)
    uniform_seconds = step_seconds["uniform"]
    per_class, results, samples = steps["samples_per_class"], [], []
    for row in rows:
        n = max(MIN_STEPS["dit"], round(steps["dit"] * uniform_seconds / step_seconds[row.key]))
        # a whole number of quarters, so that the last checkpoint is the final step
        every = max(1, round(n / len(CHECKPOINT_FRACTIONS)))
        n = every * len(CHECKPOINT_FRACTIONS)
        record = {"key": row.key, "flags": list(row.train_flags(n)), "note": row.note, "dit_steps": n,
                  "checkpoint_steps": [every * (i + 1) for i in range(len(CHECKPOINT_FRACTIONS) - 1)] + [n],
                  "train_step_ms": step_seconds[row.key] * 1000,
                  "train_step_ratio": step_seconds[row.key] / uniform_seconds, "runs": []}
        for seed in seeds:
            dit_dir = out / "work" / f"dit-{row.key}-s{seed}"
            if not is_trained(dit_dir, n, seed):
                shared.train_dit(latent_cache, dit_dir, n, seed, flags=row.train_flags(n), checkpointing_steps=every)
            record["runs"].append({"seed": seed, "dir": dit_dir.relative_to(out).as_posix(),
                                   "wall_s": round(shared.read_summary(dit_dir)["seconds"], 1), "scores": []})
        results.append(record)

    def score(record, run, checkpoint, nfe, guidance, per_class=per_class):
        pipe = UAEDiTPipeline.from_pretrained(out / run["dir"] / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        if checkpoint != record["dit_steps"]:
            pipe.transformer = UAEDiT.from_pretrained(out / run["dir"] / f"checkpoint-{checkpoint}" / "transformer_ema")
        scores, firsts = score_samples(pipe, judges, num_classes, per_class, nfe, guidance, run["seed"])
        scale, interval = guidance
        run["scores"].append({"step": checkpoint, "nfe": nfe, "guidance_scale": scale,
                              "guidance_interval": list(interval), "per_class": per_class, **scores})
        return firsts

    for record in results:
        shown = {}  # guidance -> the first seed's sample of each class
        final, large = record["dit_steps"], LARGE_SAMPLE_FACTOR * per_class
        for run in record["runs"]:
            for guidance in GUIDANCE_GRID:
                shown.setdefault(guidance, score(record, run, final, REFERENCE_NFE, guidance))
        grid = {guidance: mean_score(record, (final, REFERENCE_NFE, guidance, per_class), "judge_fid")[0]
                for guidance in GUIDANCE_GRID}
        guidance = min(grid, key=grid.get)
        record["guidance_scale"], record["guidance_interval"] = guidance[0], list(guidance[1])
        samples.append(shown[guidance])
        for run in record["runs"]:
            for nfe in NFE_GRID:
                if nfe != REFERENCE_NFE:
                    score(record, run, final, nfe, guidance)
            for checkpoint in record["checkpoint_steps"][:-1]:
                score(record, run, checkpoint, REFERENCE_NFE, guidance)
            score(record, run, final, REFERENCE_NFE, guidance, large)
        settings = {f"nfe{nfe}": (final, nfe, guidance, per_class) for nfe in NFE_GRID}
        settings["quarter"] = (record["checkpoint_steps"][0], REFERENCE_NFE, guidance, per_class)
        settings["large"] = (final, REFERENCE_NFE, guidance, large)
        record["summary"] = {name: {key: mean_score(record, setting, key) for key in SCORE_KEYS}
                             for name, setting in settings.items()}
    uniform = results[0]["summary"]["nfe25"]["ms_per_sample"][0]
    for record in results:
        record["sample_ms_ratio"] = record["summary"]["nfe25"]["ms_per_sample"][0] / uniform
    return results, torch.cat(samples)


SCORE_KEYS = ("judge_accuracy", "judge_fid", "ms_per_sample")


@torch.no_grad()
def generation_floors(vae: AutoencoderUAE, train, judges: JudgePanel, count: int, seed: int) -> dict:
    """Judge-FID of `count` real training images (at most all of them) and of the same images encoded and decoded
    by the generators' tokenizer: what a perfect generator would score, in pixels and through the latent."""
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    images = train.images[index]
    return {"samples": len(index), "real": judges.scores(images, train.labels[index])["judge_fid"],
            "decoded": judges.scores(shared.reconstruct(vae, images), train.labels[index])["judge_fid"]}


def guidance_of(record: dict) -> tuple:
    """(CFG scale, guidance interval) of a generation row or of one of its scores."""
    return record["guidance_scale"], tuple(record["guidance_interval"])


def scores_at(record: dict, setting: tuple) -> list[dict]:
    """Every seed's scores of `record` at one setting: (checkpoint step, NFE, guidance, samples per class)."""
    return [s for run in record["runs"] for s in run["scores"]
            if (s["step"], s["nfe"], guidance_of(s), s["per_class"]) == setting]


def mean_score(record: dict, setting: tuple, key: str) -> tuple[float, float]:
    """(mean, standard deviation over seeds) of one score of `record` at one setting."""
    values = [s[key] for s in scores_at(record, setting)]
    return statistics.fmean(values), statistics.pstdev(values)


def per_judge_fids(record: dict, setting: tuple) -> list[float]:
    """Each judge's judge-FID of `record` at one setting, mean over seeds."""
    per_seed = [s["judge_fids"] for s in scores_at(record, setting)]
    return [statistics.fmean(column) for column in zip(*per_seed)]


# ---- the study ----------------------------------------------------------------------------------------------


def run_ablation(out_dir: str = "uae_gen_ablation", minutes: float = DEFAULT_MINUTES, seed: int = 0,
                 rows=ROW_CHOICES, generation_keys=DEFAULT_GENERATION_ROWS, generation_seeds=None,
                 latent_cache: str | None = None) -> dict:
    """Train and score the selected rows; writes ablation.md / .json / reconstructions.png / samples.png /
    generation.png. Generation trains on `latent_cache` when given, else on row d's latent."""
    rows, steps = selected_rows(rows, latent_cache), step_counts(minutes)
    generation_seeds = list(generation_seeds or [seed])
    out = Path(out_dir)
    (out / "work").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timer = shared.PhaseTimer()
    train, heldout, teacher, teacher_file, judge = shared.train_teacher_and_judge(out / "work", steps, seed, timer)

    stage1_runs, tokenizer_rows, reconstructions = {}, {}, {}
    for key in rows:
        if key != "gen":
            runs = train_row(ROWS_BY_KEY[key], out, steps, seed, teacher_file, stage1_runs)
            tokenizer_rows[key] = {"runs": runs, "model_dir": runs[-1]["dir"]}
    timer.lap("tokenizers_s")

    judges = JudgePanel.train(judge, train, heldout, steps["judge"], seed)
    timer.lap("judges_s")
    teacher_result = teacher_scores(teacher, train, heldout)
    for key, record in tokenizer_rows.items():
        row = ROWS_BY_KEY[key]
        vae = AutoencoderUAE.from_pretrained(out / record["model_dir"]).eval()
        scores, reconstructions[key] = tokenizer_scores(vae, train, heldout, judges)
        record.update({
            "key": key, "name": row.name, "num_bands": row.num_bands,
            "encoder": "tuned" if row.tune_encoder else "frozen", "band_noise": row.band_noise, "note": row.note,
            "steps": sum(run["steps"] for run in record["runs"]), **scores,
            "teacher_probe_top1": teacher_result["probe_top1"],
            "wall_s": round(sum(run["wall_s"] for run in record["runs"]), 1),
        })
    timer.lap("tokenizer_scores_s")

    generation, floors, samples = [], [], None
    if "gen" in rows:
        if latent_cache is None:
            latent_cache = out / "work" / "latents-d"
            shared.cache_latents(out / tokenizer_rows["d"]["model_dir"], latent_cache, seed)
        generation, samples = generation_rows(out, Path(latent_cache), list(generation_keys), steps,
                                              generation_seeds, train.num_classes, judges)
        vae = AutoencoderUAE.from_pretrained(LatentCacheDataset(latent_cache).autoencoder_dir).eval()
        floors = [generation_floors(vae, train, judges, train.num_classes * per_class, seed)
                  for per_class in (steps["samples_per_class"], LARGE_SAMPLE_FACTOR * steps["samples_per_class"])]
        timer.lap("generation_s")
        save_generation_curves(generation, steps["samples_per_class"], out / "generation.png")
    wall = timer.finish()

    result = {
        "settings": {"preset": "demo", "dataset": "demo-digits", "seed": seed, "minutes_budget": minutes,
                     "rows": rows, "tokenizer_config": "tiny", "dit_config": "dit_tiny", "dit_model": shared.DIT_MODEL,
                     "generation_rows": list(generation_keys) if "gen" in rows else [],
                     "generation_seeds": generation_seeds, "latent_cache": latent_cache and str(latent_cache),
                     "guidance_scales": list(GUIDANCE_SCALES),
                     "guidance_intervals": [list(interval) for interval in GUIDANCE_INTERVALS],
                     "nfe_grid": list(NFE_GRID), "reference_nfe": REFERENCE_NFE,
                     "num_heldout": len(heldout), "num_train": len(train)},
        "steps": steps,
        "teacher": teacher_result,
        "judge": {"heldout_accuracy": judges.scores(heldout.images, heldout.labels)["judge_accuracy"],
                  "count": len(judges.judges)},
        "tokenizer_rows": list(tokenizer_rows.values()),
        "generation_rows": generation,
        "generation_floors": floors,
        "wall_time": wall,
    }
    result["claims"] = paper_claims(result)
    result["reconstructions_png_rows"] = ["held-out"] + list(reconstructions)

    # One held-out image of each class, then every row's reconstruction of it.
    shown = torch.stack([(heldout.labels == k).nonzero()[0, 0] for k in range(heldout.num_classes)])
    tiles = torch.cat([heldout.images[shown]] + [recon[shown] for recon in reconstructions.values()])
    save_image_grid(tiles, str(out / "reconstructions.png"), nrow=len(shown),
                    labels=[name for name in result["reconstructions_png_rows"] for _ in shown])
    if samples is not None:
        save_image_grid(samples, str(out / "samples.png"), nrow=train.num_classes,
                        labels=[row["key"] for row in generation for _ in range(train.num_classes)])
    write_json(str(out / "ablation.json"), result)
    shared.write_text(out / "ablation.md", markdown_report(result))
    print(f"\nablation: done in {wall['total_s'] / 60:.1f} min -> {out}/ablation.md")
    return result


# ---- report -------------------------------------------------------------------------------------------------


def paper_claims(result: dict) -> list[dict]:
    """The paper's ablation claims checked against this run's numbers (only those whose rows were run)."""
    rows = {row["key"]: row for row in result["tokenizer_rows"]}
    teacher, claims = result["teacher"], []
    if all(key in rows for key in ABLATION_TABLE):
        values = [rows[key]["heldout_psnr"] for key in ABLATION_TABLE]
        claims.append({
            "claim": "each component raises PSNR (a < b < c < d)", "paper": "15.27 -> ... -> 29.65 dB",
            "this_run": " -> ".join(f"{key} {v:.2f}" for key, v in zip(ABLATION_TABLE, values)) + " dB",
            "reproduced": "yes" if all(x < y for x, y in zip(values, values[1:])) else "no",
        })
    if "d" in rows:
        band0, full = rows["d"]["band0_probe_top1"], teacher["probe_top1"]
        claims.append({
            "claim": f"the full UAE's band 0 keeps the teacher's semantics (probe within {PROBE_TOLERANCE:.0%})",
            "paper": "83.0 (DINOv2 83.0)", "this_run": f"{band0:.3f} (teacher {full:.3f})",
            "reproduced": "yes" if band0 >= full - PROBE_TOLERANCE else "no",
        })
    band0, full = teacher["band0_probe_top1"], teacher["probe_top1"]
    claims.append({
        "claim": f"band 0 of the teacher's own latent probes as well as the whole latent (K={FULL_UAE_BANDS})",
        "paper": "83.3 vs 83.0 (DINOv2)", "this_run": f"{band0:.3f} vs {full:.3f}",
        "reproduced": "yes" if band0 >= full - PROBE_TOLERANCE else "no",
    })
    if all(key in rows for key in BAND_SWEEP_TABLE):
        psnrs = [rows[key]["heldout_psnr"] for key in BAND_SWEEP_TABLE]
        probes = [rows[key]["band0_probe_top1"] for key in BAND_SWEEP_TABLE]
        psnr_spread, probe_spread = max(psnrs) - min(psnrs), max(probes) - min(probes)
        claims.append({
            "claim": f"stable across K (PSNR spread <= {STABLE_PSNR_SPREAD_DB} dB, band-0 probe spread <= "
                     f"{STABLE_PROBE_SPREAD:.0%})", "paper": "K = 2..10: PSNR ~29, accuracy 83.0",
            "this_run": "K=2/4/8: PSNR " + "/".join(f"{v:.2f}" for v in psnrs) + f" (spread {psnr_spread:.2f}), "
                        "probe " + "/".join(f"{v:.3f}" for v in probes) + f" (spread {probe_spread:.3f})",
            "reproduced": "yes" if psnr_spread <= STABLE_PSNR_SPREAD_DB and probe_spread <= STABLE_PROBE_SPREAD
            else "no",
        })
    generation = {row["key"]: row for row in result["generation_rows"]}
    low_to_high = [row for key, row in generation.items() if GENERATION_BY_KEY[key].low_to_high]
    baselines = [row for key, row in generation.items() if not GENERATION_BY_KEY[key].low_to_high]
    if low_to_high and baselines:
        final = lambda row, score: row["summary"]["nfe25"][score][0]  # noqa: E731
        quarter = lambda row: row["summary"]["quarter"]["judge_fid"][0]  # noqa: E731
        large = lambda row: row["summary"]["large"]["judge_fid"][0]  # noqa: E731
        # the best of each side: a low-to-high row at one time shift is not measured against uniform at another
        uniform = min(baselines, key=lambda row: final(row, "judge_fid"))
        best = min(low_to_high, key=lambda row: final(row, "judge_fid"))
        checks = [final(best, "judge_accuracy") >= final(uniform, "judge_accuracy"),
                  final(best, "judge_fid") <= FINAL_FID_RATIO * final(uniform, "judge_fid"),
                  quarter(best) <= QUARTER_FID_RATIO * quarter(uniform)]
        claims.append({
            "claim": f"the best low-to-high row beats uniform at equal training time (NFE {REFERENCE_NFE}: accuracy "
                     f">=, judge-FID <= {FINAL_FID_RATIO}x; at 1/4 of the budget judge-FID <= {QUARTER_FID_RATIO}x)",
            "paper": "low-to-high frequency generation: gFID 1.68",
            "this_run": f"{best['key']} vs {uniform['key']}: accuracy {final(best, 'judge_accuracy'):.3f} vs "
                        f"{final(uniform, 'judge_accuracy'):.3f}, judge-FID {final(best, 'judge_fid'):.1f} vs "
                        f"{final(uniform, 'judge_fid'):.1f} ({LARGE_SAMPLE_FACTOR}x samples: {large(best):.1f} vs "
                        f"{large(uniform):.1f}), at 1/4 {quarter(best):.1f} vs {quarter(uniform):.1f}",
            "reproduced": "yes" if all(checks) else ("mixed" if any(checks) else "no"),
        })
    return claims


def _table(header: list, lines: list) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]


def tokenizer_table(rows: list[dict]) -> list[str]:
    header = ["row", "configuration", "K", "encoder", "band noise", "steps"] + [h for h, _, _ in TOKENIZER_COLUMNS]
    lines = [[row["key"], row["name"], row["num_bands"], row["encoder"], "yes" if row["band_noise"] else "no",
              " + ".join(str(run["steps"]) for run in row["runs"])]
             + [format(row[key], spec) for _, key, spec in TOKENIZER_COLUMNS] for row in rows]
    return _table(header, lines)


def guidance_cell(row: dict) -> str:
    """The CFG column: scale, and the interval of (shifted) time it applies in when that is not all of it."""
    scale, (lo, hi) = guidance_of(row)
    return f"{scale:g}" if (lo, hi) == (0.0, 1.0) else f"{scale:g} on [{lo:g}, {hi:g}]"


def generation_table(rows: list[dict]) -> list[str]:
    header = ["generator", "DiT steps", "train ms/step (x uniform)", "CFG"] + [h for h, *_ in GENERATION_COLUMNS]
    header.append("ms/sample x uniform")
    lines = [[row["key"], row["dit_steps"], f"{row['train_step_ms']:.0f} ({row['train_step_ratio']:.2f})",
              guidance_cell(row)]
             + ["{:{spec}} ± {:{spec}}".format(*row["summary"][setting][score], spec=spec)
                for _, setting, score, spec in GENERATION_COLUMNS]
             + [f"{row['sample_ms_ratio']:.2f}"] for row in rows]
    return _table(header, lines)


def save_generation_curves(rows: list[dict], per_class: int, path: Path) -> None:
    """generation.png: judge accuracy and judge-FID (mean and std over seeds, NFE 25, each row's CFG scale) at
    each checkpoint against the fraction of the equal training-time budget."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for row in rows:
        scores = [mean_score(row, (step, REFERENCE_NFE, guidance_of(row), per_class), key)
                  for key in ("judge_accuracy", "judge_fid") for step in row["checkpoint_steps"]]
        half = len(row["checkpoint_steps"])
        for axis, points in zip(axes, (scores[:half], scores[half:])):
            axis.errorbar(CHECKPOINT_FRACTIONS, [m for m, _ in points], yerr=[sd for _, sd in points],
                          marker="o", capsize=3, label=row["key"])
    for axis, label in zip(axes, ("judge accuracy", "judge-FID")):
        axis.set_xlabel("fraction of the DiT training-time budget")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")  # outside: rows cross
    figure.tight_layout()
    temp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temp, dpi=100, bbox_inches="tight")  # keeps the legend
    plt.close(figure)
    os.replace(temp, path)


def markdown_report(result: dict) -> str:
    s, steps = result["settings"], result["steps"]
    rows = {row["key"]: row for row in result["tokenizer_rows"]}
    lines = [
        "# UAE ablation at small scale (demo digits, CPU)", "",
        f"Seed {s['seed']} for every row; budget --minutes {s['minutes_budget']:g}, "
        f"{result['wall_time']['total_s'] / 60:.1f} min wall. Steps: teacher {steps['teacher']}, judge "
        f"{steps['judge']}, tokenizer {steps['tokenizer']} per row "
        f"(encoder-tuning rows: {steps['tokenizer_stage1']} stage 1 + {steps['tokenizer_stage2']} stage 2), "
        f"{s['dit_model']}: the time of {steps['dit']} uniform steps per generator and seed, "
        f"{steps['samples_per_class']} samples per class, NFE {s['nfe_grid']}, CFG scales {s['guidance_scales']} x "
        f"intervals {s['guidance_intervals']}.",
        f"Teacher: held-out accuracy {result['teacher']['heldout_accuracy']:.3f}; probe on its latent "
        f"{result['teacher']['probe_top1']:.3f}, on band 0 of its K={FULL_UAE_BANDS} split "
        f"{result['teacher']['band0_probe_top1']:.3f}. Judges: {result['judge']['count']}, held-out accuracy "
        f"{result['judge']['heldout_accuracy']:.3f} (mean).", "",
    ]
    ablation = [rows[key] for key in ABLATION_TABLE if key in rows]
    if ablation:
        lines += ["## Tokenizer ablation (paper, ImageNet: PSNR 15.27 -> ... -> 29.65 dB)", ""]
        lines += tokenizer_table(ablation) + [""]
    sweep = [rows[key] for key in BAND_SWEEP_TABLE if key in rows]
    if sweep:
        lines += ["## Band-count sweep (full UAE; paper: stable from 2 to 10 bands)", ""]
        lines += tokenizer_table(sweep) + [""]
    if result["generation_rows"]:
        source = s["latent_cache"] or "row d's latent"
        lines += [f"## Generation on {source} (equal DiT training time, seeds {s['generation_seeds']})", ""]
        lines += generation_table(result["generation_rows"])
        lines += ["", "Judge-FID floors (as many real training images vs held-out; the same images through the "
                      "tokenizer, the best any generator on its latent can score): " + "; ".join(
                          f"{floor['samples']} images {floor['real']:.2f} real, {floor['decoded']:.2f} decoded"
                          for floor in result["generation_floors"]) +
                  ". generation.png: accuracy and judge-FID at each quarter of the budget.", ""]
        per_class = steps["samples_per_class"]
        lines += [f"Judge-FID at NFE {REFERENCE_NFE} by judge (mean over seeds; the table's cell is their mean): " +
                  "; ".join(f"{row['key']} " + " / ".join(f"{fid:.1f}" for fid in per_judge_fids(
                      row, (row["dit_steps"], REFERENCE_NFE, guidance_of(row), per_class)))
                      for row in result["generation_rows"]) + ".", ""]
    lines += ["## What each row is", ""]
    lines += [f"- **{row['key']}** ({row['name']}): {row['note']}." for row in result["tokenizer_rows"]]
    lines += [
        "- K=8 works on the tiny preset's 8x8 latent grid: every band carries energy, but band 0 (cut-off 0.5 "
        "frequency bins) is the DC bin alone, i.e. the channel means, which limits its probe.",
        "- No row runs stage 3 (GAN): its discriminator makes a step about 8x the cost of a stage-1 step on the CPU.",
        "- Metrics on the held-out split: PSNR / SSIM on 8-bit levels; judge-FID = Frechet distance of the "
        "reconstructions (or samples) to the held-out images in a judge's (resnet10t) pooled features; judge acc. "
        "= a judge's class accuracy on them; both are means over the judges (trained from different seeds); "
        "probes = logistic regression on the 2x2-pooled raw latent (band 0, or the teacher's whole latent), trained "
        "on the train split. Wall = the row's training runs as each script times itself (process start-up "
        "excluded; a shared stage 1 counts in each row that uses it), scoring excluded.",
        *[f"- Generator **{row['key']}**: {row['note']} (train_dit flags: "
          f"{' '.join(map(str, row['flags'])) or 'none'})."
          for row in result["generation_rows"]],
        "- Generation budget: each generator trains for uniform's steps x (uniform's step time / its step time), "
        "the step times measured round-robin in one process (the 'train ms/step' column). Each samples with the "
        f"scheduler saved in its pipeline; its CFG scale and guidance interval (in the sampler's shifted time, 1 = "
        f"noise) are the pair of {list(GUIDANCE_SCALES)} x {[list(i) for i in GUIDANCE_INTERVALS]} with the lowest "
        f"mean judge-FID at NFE {REFERENCE_NFE}. Cells: mean ± std over the seeds; 1/4 = the checkpoint after a "
        "quarter of the budget, at NFE 25; ms/sample = the whole pipeline call (sampling and decoding) per image.",
        "- reconstructions.png: top row held-out originals (one per class), then one row per tokenizer row in the "
        "order " + ", ".join(result["reconstructions_png_rows"][1:]) + "; samples.png: one sample per class per "
        "generator (first seed, NFE 25).", "",
        "## The paper's claims at this scale", "",
    ]
    lines += _table(["claim", "paper", "this run", "reproduced"],
                    [[c["claim"], c["paper"], c["this_run"], c["reproduced"]] for c in result["claims"]])
    return "\n".join(lines) + "\n"


# ---- the full-scale study (printed) -------------------------------------------------------------------------

IMAGENET_VARIABLES = {  # shell variable: (placeholder, what it is)
    "IMAGENET": ("/path/to/imagenet", "ImageNet-1k with train/ and val/ class folders"),
    "DINOV2": ("timm/vit_base_patch14_reg4_dinov2.lvd142m", "the teacher (tokenizer_imagenet256.json's encoder)"),
    "VGG16": ("/path/to/vgg16.safetensors", "torchvision vgg16 weights for LPIPS (stage 2, reconstruction eval)"),
    "INCEPTION": ("/path/to/weights-inception-2015-12-05-6726825d.pth", "torch-fidelity Inception weights"),
    "ADM_REF": ("/path/to/VIRTUAL_imagenet256_labeled.npz", "ADM reference batch"),
    "NGPU": ("8", "GPUs per training / sampling run"),
    "RUNS": ("ablation-imagenet256", "output root"),
}
IMAGENET_STAGE_EPOCHS = 10  # the released v1 recipe: 10 epochs of stage 1, then 10 of stage 2
IMAGENET_DIT_EPOCHS = 80  # the paper's early comparison point; the preset's full run is 800


def imagenet256_commands(rows, seed: int = 0, generation_keys=DEFAULT_GENERATION_ROWS) -> str:
    """The same study with the paper's settings, as a shell script (one GPU node; nothing is run)."""
    rows = selected_rows(rows)
    launch = "accelerate launch --num_processes $NGPU"
    tokenizer = f"{launch} train/train_tokenizer.py --config train/configs/tokenizer_imagenet256.json"
    data = "--train_data_dir $IMAGENET/train --validation_data_dir $IMAGENET/val"
    lines = ["#!/usr/bin/env bash", "# UAE ablation at the paper's scale (ImageNet 256, DINOv2-B teacher, ViT-XL "
             "decoder): eval/ablation.py --preset imagenet256", "set -euo pipefail"]
    lines += [f"{name}=${{{name}:-{value}}}  # {what}" for name, (value, what) in IMAGENET_VARIABLES.items()]
    lines += ["", f"# Equal budget per tokenizer row: {2 * IMAGENET_STAGE_EPOCHS} epochs (frozen-encoder rows: all "
              f"stage 1; encoder-tuning rows: {IMAGENET_STAGE_EPOCHS} stage 1 + {IMAGENET_STAGE_EPOCHS} stage 2), "
              f"seed {seed}. Stage 2 adds LPIPS (the released recipe; the tiny CPU study has none). No GAN stage, "
              "as in the small-scale study."]
    stage1_done = set()
    for key in rows:
        if key == "gen":
            continue
        row = ROWS_BY_KEY[key]
        lines += ["", f"# ({row.key}) {row.name}: {row.note}"]
        stage1_dir = f"$RUNS/stage1-K{row.num_bands}" if row.tune_encoder else f"$RUNS/{row.key}"
        if stage1_dir not in stage1_done:
            epochs = IMAGENET_STAGE_EPOCHS * (1 if row.tune_encoder else 2)
            lines.append(f"{tokenizer} --stage 1 {data} --model_config '{{\"num_bands\": {row.num_bands}}}' "
                         f"--num_train_epochs {epochs} --no-band_noise --seed {seed} --output_dir {stage1_dir}")
            stage1_done.add(stage1_dir)
        if row.tune_encoder:
            noise = "--band_noise" if row.band_noise else "--no-band_noise"
            lines.append(f"{tokenizer} --stage 2 {data} --init_from {stage1_dir} --num_train_epochs "
                         f"{IMAGENET_STAGE_EPOCHS} --lpips_vgg_weights $VGG16 {noise} --seed {seed} "
                         f"--output_dir $RUNS/{row.key}")
        lines.append(f"python eval/evaluate_reconstruction.py --autoencoder $RUNS/{row.key} --data_dir $IMAGENET/val "
                     f"--out_dir $RUNS/{row.key}/eval-reconstruction --inception_weights $INCEPTION "
                     f"--lpips_vgg_weights $VGG16")
        lines.append(f"python eval/linear_probe.py --autoencoder $RUNS/{row.key} --train_data_dir $IMAGENET/train "
                     f"--val_data_dir $IMAGENET/val --features band0 latent teacher --teacher_encoder $DINOV2 "
                     f"--out $RUNS/{row.key}/linear_probe.json")
        if row.key == "d":
            lines.append(f"# the paper's final UAE also runs stage 3 (band noise + GAN) from d: {tokenizer} "
                         f"--stage 3 {data} --init_from $RUNS/d --lpips_vgg_weights $VGG16 --seed {seed} "
                         "--output_dir $RUNS/d-gan")
    if "gen" in rows:
        lines += ["", f"# Generation on d's latent: DiT-DH-XL, {IMAGENET_DIT_EPOCHS} epochs per generator (drop "
                  "--num_train_epochs for the preset's 800); 50k samples each, 50 steps. On the 16x16 latent "
                  "--latent_lowpass 64 keeps 64 of the 256 coefficients (the official v2 recipe); for equal GPU "
                  "time, scale a cheaper generator's epochs by its step-time ratio (the small study's column).",
                  f"{launch} train/cache_latents.py --vae $RUNS/d --train_data_dir $IMAGENET/train "
                  "--output_dir $RUNS/latents-d --batch_size 256"]
        for key in generation_keys:
            flags = " ".join(map(str, GENERATION_BY_KEY[key].flags))
            lines += [
                f"# {key}: {GENERATION_BY_KEY[key].note}",
                f"{launch} train/train_dit.py --config train/configs/dit_imagenet256.json --latent_cache "
                f"$RUNS/latents-d {flags} --num_train_epochs {IMAGENET_DIT_EPOCHS} --seed {seed} "
                f"--output_dir $RUNS/dit-{key}".replace("  ", " "),
                f"{launch} eval/sample.py --pipeline $RUNS/dit-{key}/pipeline --output_dir $RUNS/samples-{key} "
                f"--num_samples 50000 --label_sampling balanced --guidance_scale 1.0 --num_inference_steps 50 "
                f"--global_seed {seed}",
                f"python eval/evaluate_generation.py --generated $RUNS/samples-{key}/*.npz --reference $ADM_REF "
                f"--inception_weights $INCEPTION --out $RUNS/samples-{key}/metrics.json",
            ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="uae_gen_ablation")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="total budget; every step count scales with it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", default=list(ROW_CHOICES), metavar="ROW",
                        help=f"subset of {list(ROW_CHOICES)} ('gen' needs 'd' or --latent_cache)")
    parser.add_argument("--generation_rows", nargs="+", default=list(DEFAULT_GENERATION_ROWS), metavar="GENERATOR",
                        help=f"generators of row 'gen': uniform (the baseline of the equal-time budget and the "
                        f"ratios) first, then any of {list(GENERATION_BY_KEY)[1:]}")
    parser.add_argument("--generation_seeds", nargs="+", type=int, metavar="SEED",
                        help="seeds of every generator's DiT (default: --seed)")
    parser.add_argument("--latent_cache", help="train the generators on this latent cache (e.g. the demo's "
                        "uae_gen_demo/work/latents) instead of row d's latent")
    parser.add_argument("--preset", choices=("demo", "imagenet256"), default="demo",
                        help="demo: train and score on this machine; imagenet256: print the full-scale commands")
    args = parser.parse_args(argv)
    args.rows = selected_rows(args.rows, args.latent_cache)
    unknown = sorted(set(args.generation_rows) - set(GENERATION_BY_KEY))
    if unknown or len(set(args.generation_rows)) != len(args.generation_rows) or args.generation_rows[0] != "uniform":
        raise ValueError(f"--generation_rows must be 'uniform' then distinct generators of "
                         f"{list(GENERATION_BY_KEY)[1:]}; got {args.generation_rows}")
    staged = [key for key in args.generation_rows if GENERATION_BY_KEY[key].curriculum]
    if args.preset == "imagenet256" and staged:
        raise ValueError(f"--generation_rows {staged} have no ImageNet command: their curriculum stages are fractions "
                         "of this study's step budget, and the ImageNet runs are counted in epochs")
    fixed_shift = [key for key in args.generation_rows if GENERATION_BY_KEY[key].time_shift != "auto"]
    if args.preset == "imagenet256" and fixed_shift:
        raise ValueError(f"--generation_rows {fixed_shift} have no ImageNet command: their time shift is tuned for "
                         "this study's latent, and the ImageNet latent's shift follows its dimension")
    if args.latent_cache is not None and not os.path.isfile(os.path.join(args.latent_cache, "cache_info.json")):
        raise FileNotFoundError(f"--latent_cache {args.latent_cache!r} holds no latent cache (cache_info.json)")
    step_counts(args.minutes)  # a bad budget fails here, before any training
    return args


def main(args: argparse.Namespace):
    if args.preset == "imagenet256":
        commands = imagenet256_commands(args.rows, args.seed, args.generation_rows)
        print(commands, end="")
        return commands
    return run_ablation(args.out_dir, args.minutes, args.seed, args.rows, args.generation_rows,
                        args.generation_seeds, args.latent_cache)


if __name__ == "__main__":
    main(parse_args())
