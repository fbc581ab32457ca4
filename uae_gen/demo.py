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

Writes to ``out_dir``: samples.png, bands.png, reconstructions.png, metrics.json and pipeline/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .demo_classifiers import accuracy, classifier_features, predict
from .demo_setup import (
    GUIDANCE_SCALE,
    SHARED_MIN_STEPS,
    SHARED_STEPS,
    PhaseTimer,
    cache_latents,
    dit_mixed_precision,
    generate,
    linear_probe_top1,
    probe_features,
    raw_latents,
    reconstruct,
    scaled_step_counts,
    train_dit,
    train_teacher_and_judge,
    train_tokenizer_stage,
)
from .metrics import frechet_distance_from_features, psnr
from .models.autoencoder_uae import AutoencoderUAE
from .training import save_image_grid, write_json

DEFAULT_MINUTES = 12.0
# Step counts at the default budget; each scales linearly with `minutes` and is clamped below by MIN_STEPS.
# Measured on the idle 2-core machine at this budget: teacher 119 s, judge 15 s, tokenizer 63 s (stage 3 with its
# discriminator costs ~8x a stage-1 step, hence fewer steps), DiT-mini 501 s, sampling 27 s: 12.3 min in all.
FULL_BUDGET_STEPS = {**SHARED_STEPS, "tokenizer_1": 800, "tokenizer_2": 400, "tokenizer_3": 100, "dit": 2500}
MIN_STEPS = {**SHARED_MIN_STEPS, "tokenizer_1": 2, "tokenizer_2": 2, "tokenizer_3": 2}


def step_counts(minutes: float) -> dict[str, int]:
    """Training steps of each phase for a budget of `minutes` (the default budget gives FULL_BUDGET_STEPS)."""
    return scaled_step_counts(minutes, FULL_BUDGET_STEPS, MIN_STEPS, DEFAULT_MINUTES)


def train_tokenizer(work_dir: Path, steps: dict, seed: int, teacher_file: Path) -> Path:
    """Tokenizer stages 1 -> 2 -> 3, each from the previous one's (EMA) output; the teacher's encoder is the
    initial encoder and the semantic target throughout. Returns the stage-3 folder."""
    previous = None
    for stage in (1, 2, 3):
        n, output_dir = steps[f"tokenizer_{stage}"], work_dir / f"tokenizer-stage{stage}"
        flags = [] if previous is None else ["--init_from", previous]
        if stage == 3:  # the GAN schedule scaled to the stage length (preset: D from 20, G from 50 of 200)
            flags += ["--discriminator_start_step", n // 10, "--gan_start_step", n // 4]
        train_tokenizer_stage(stage, n, output_dir, seed, teacher_file, flags)
        previous = output_dir
    return previous


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


def run_demo(out_dir: str = "uae_gen_demo", minutes: float = DEFAULT_MINUTES, seed: int = 0) -> dict:
    """Train the judge, the tokenizer (3 stages), the latent cache and the DiT; sample and score. Returns metrics."""
    steps = step_counts(minutes)
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timer = PhaseTimer()
    train, heldout, teacher, teacher_file, judge = train_teacher_and_judge(work, steps, seed, timer)

    tokenizer_dir = train_tokenizer(work, steps, seed, teacher_file)
    timer.lap("tokenizer_s")

    cache_dir = work / "latents"
    cache_latents(tokenizer_dir, cache_dir, seed)
    timer.lap("cache_latents_s")

    pipe = train_dit(cache_dir, work / "dit", steps["dit"], seed)
    pipe.save_pretrained(out / "pipeline")
    timer.lap("dit_s")

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
        "guidance_scale": GUIDANCE_SCALE, "num_inference_steps": steps["inference_steps"],
        "dit_mixed_precision": dit_mixed_precision(),
        "num_generated": len(images), "steps": steps, "minutes_budget": minutes, "seed": seed,
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


def summary_text(metrics: dict, out: Path) -> str:
    w = metrics["wall_time"]
    lines = [
        "", f"uae-gen demo: done in {w['total_s'] / 60:.1f} min -> {out}",
        "  wall (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in w.items() if k != "total_s"),
        f"  steps: {metrics['steps']}",
        f"  tokenizer held-out PSNR        {metrics['tokenizer_heldout_psnr']:.2f} dB",
        f"  teacher accuracy, held-out     {metrics['teacher_heldout_accuracy']:.3f}",
        f"  band-0 linear probe (top-1)    {metrics['band0_probe_top1']:.3f}   "
        f"(teacher: full latent {metrics['teacher_probe_top1']:.3f}, band 0 {metrics['teacher_band0_probe_top1']:.3f})",
        f"  judge accuracy, held-out real  {metrics['judge_heldout_accuracy']:.3f}",
        f"  judge accuracy, generated      {metrics['judge_generated_accuracy']:.3f}   "
        f"(CFG {metrics['guidance_scale']}, {metrics['num_inference_steps']} steps, {metrics['num_generated']} images)",
        f"  judge-feature FID              {metrics['judge_fid_generated_vs_heldout']:.2f}   "
        f"(train vs held-out floor {metrics['judge_fid_train_vs_heldout_floor']:.2f})",
        "  files: samples.png bands.png reconstructions.png metrics.json pipeline/",
    ]
    return "\n".join(lines)
