"""Benchmark on one GPU: the training and sampling speed of the generator and the tokenizer, random weights, no data.

    python bench/bench_gpu.py --out bench_gpu.json          # one GPU, finishes within ~8 minutes on an H100 / H200
    python bench/bench_gpu.py --smoke --device cpu          # tiny sizes, 2 steps: checks the script (tests run it)

What it measures, in bf16 autocast with fp32 weights and TF32 on (the trainers' --mixed_precision bf16
--allow_tf32), in this order (the cheap, most important cases first):
1. DiT train step (flow-matching loss as in train_dit, backward, gradient clipping 1.0, fused AdamW, EMA update):
   DiT-DH-XL and DiT-XL on the 768x16x16 latent (256 tokens) at batch 64 and 128, eager PyTorch with SDPA attention,
   without and with gradient checkpointing: images/s, step time and peak GPU memory;
2. the same step for diffusers' DiTTransformer2DModel in its DiT-XL/2 layout (width 1152, depth 28, 16 heads,
   4x32x32 input, patch 2: also 256 tokens; its first 4 output channels are the velocity; diffusers gives every
   block its own time and class embedding, hence its 750M parameters), reported as the ratio of our DiT-XL's
   images/s to it;
3. sampling: UAEDiTPipeline with DiT-DH-XL and the full AutoencoderUAE (DINOv2-B encoder, ViT-XL decoder), bf16
   weights, 50 Euler steps with classifier-free guidance (scale 1.5: every step runs a doubled batch) and the
   decode, batch 64: images/s;
4. tokenizer stage-3 train step at batch 32 (train_tokenizer's step: AutoencoderUAE with band noise, L1 + LPIPS +
   semantic band loss against the frozen teacher + adaptively weighted GAN loss, AdamW; then the DINO
   discriminator's hinge step on DiffAugment-ed images), every network randomly initialised;
5. the DiT train steps with xformers attention (when xformers is installed);
6. the DiT train steps with torch.compile (fullgraph, static shapes, the trainers' --compile), recompiled for each
   batch size and checkpointing setting; the first step's time (mostly compilation) is reported apart.
The cases run in that order until --time_budget seconds have passed since start-up; a case that would not fit (a
compiled one needs --compile_reserve seconds) is listed as skipped. Prints a Markdown table and writes JSON.
"""

import argparse
import gc
import json
import os
import platform
import resource
import time

import torch
from diffusers import DiTTransformer2DModel

from uae_gen.flow import FlowMatchBandScheduler, flow_matching_loss
from uae_gen.losses import LPIPS, DiffAugment, DinoDiscriminator, adaptive_generator_weight
from uae_gen.losses import hinge_discriminator_loss, hinge_generator_loss, l1_reconstruction_loss
from uae_gen.losses import quantize_to_uint8_grid, semantic_band_loss
from uae_gen.models.attention import xformers_available
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import UAEDiT
from uae_gen.models.encoders import make_teacher
from uae_gen.pipelines.pipeline_uae_dit import UAEDiTPipeline
from uae_gen.training import EMA

SIZES = {
    "full": dict(
        models=("DiT-DH-XL", "DiT-XL"), latent=dict(sample_size=16, in_channels=768), num_classes=1000,
        batch_sizes=(64, 128), diffusers_name="diffusers DiT-XL/2", diffusers=dict(sample_size=32, in_channels=4, out_channels=8, patch_size=2,
                                              num_layers=28, num_attention_heads=16, attention_head_dim=72),
        sample_batch=64, sample_steps=50, tokenizer=dict(preset="imagenet256-dinov2-b", discriminator={}),
        tokenizer_batch=32),
    "smoke": dict(
        models=("DiT-DH-tiny", "DiT-tiny"), latent=dict(sample_size=8, in_channels=64), num_classes=10,
        batch_sizes=(2, 4), diffusers_name="diffusers DiT-tiny", diffusers=dict(sample_size=16, in_channels=4, out_channels=8, patch_size=2,
                                           num_layers=2, num_attention_heads=4, attention_head_dim=16),
        sample_batch=2, sample_steps=2, tokenizer=dict(preset="tiny", discriminator=dict(
            backbone_kwargs=dict(img_size=32, depth=4, embed_dim=64, num_heads=2), tap_blocks=(0, 1, 2, 3))),
        tokenizer_batch=2),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, 1 warm-up + 2 timed steps, errors raise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, help="untimed steps per case (default 3; smoke 1)")
    parser.add_argument("--iters", type=int, help="timed steps per case (default 10; smoke 2)")
    parser.add_argument("--time_budget", type=float, default=420.0, help="seconds from start-up; later cases skip")
    parser.add_argument("--compile_reserve", type=float, default=150.0,
                        help="seconds a compiled case needs left in the budget to start")
    parser.add_argument("--compile_backend", help="torch.compile backend (default inductor; smoke: eager, i.e. "
                        "dynamo's whole-graph capture without code generation)")
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled cases")
    parser.add_argument("--out", default="bench_gpu.json")
    args = parser.parse_args(argv)
    args.size = "smoke" if args.smoke else "full"
    args.warmup = (1 if args.smoke else 3) if args.warmup is None else args.warmup
    args.iters = (2 if args.smoke else 10) if args.iters is None else args.iters
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be at least 1")
    return args


class Bench:
    """Timing, memory, the budget and the results table."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.start = time.perf_counter()
        self.rows, self.skipped = [], []
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def left(self) -> float:
        return self.args.time_budget - (time.perf_counter() - self.start)

    def admits(self, name: str, compiled: bool = False) -> bool:
        needed = self.args.compile_reserve if compiled else 15.0
        if self.args.smoke or self.left() >= needed:
            return True
        self.skipped.append(f"{name} (time budget: {self.left():.0f} s left, {needed:.0f} s needed)")
        return False

    def reset_memory(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gib(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return None

    def measure(self, name: str, step, batch: int, **info) -> dict:
        """First step (compilation, allocation) timed alone, then warm-up, then the mean over --iters steps."""
        self.reset_memory()
        row = {"case": name, "batch": batch, **info}
        try:
            start = time.perf_counter()
            step()
            self.sync()
            row["first_step_s"] = time.perf_counter() - start
            for _ in range(self.args.warmup - 1):
                step()
            self.sync()
            start = time.perf_counter()
            for _ in range(self.args.iters):
                step()
            self.sync()
            seconds = (time.perf_counter() - start) / self.args.iters
            row.update(step_ms=seconds * 1e3, images_per_s=batch / seconds, peak_memory_GiB=self.peak_memory_gib())
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as error:  # a failed case is reported, the next one still runs (smoke: raise)
            if self.args.smoke:
                raise
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        self.rows.append(row)
        status = row.get("error") or f"{row['images_per_s']:.1f} img/s"
        print(f"[{time.perf_counter() - self.start:6.1f} s] {name}: {status}", flush=True)
        return row


# ---- the DiT train step -----------------------------------------------------------------------------------------

class DiTTrainer:
    """One model, its fused AdamW and EMA, random latents; `step` is train_dit's optimiser step."""

    def __init__(self, bench: Bench, model: torch.nn.Module, model_fn, shape, num_classes: int):
        self.bench, self.model, self.model_fn, self.shape, self.num_classes = bench, model, model_fn, shape, num_classes
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
        self.ema = EMA(model, 0.9995)
        # train_dit's plain schedule: logit-normal t, shifted by the latent dimension.
        self.schedule = FlowMatchBandScheduler(latent_dim=shape[0] * shape[1] * shape[2]).band_schedule
        self.batch = None

    def set_batch(self, batch: int):
        device = self.bench.device
        self.latents = torch.randn(batch, *self.shape, device=device)
        self.labels = torch.randint(0, self.num_classes, (batch,), device=device)
        self.batch = batch

    def step(self):
        with self.bench.autocast:
            loss = flow_matching_loss(self.model_fn, self.latents, self.labels, self.schedule).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)


def build_ours(bench: Bench, name: str) -> DiTTrainer:
    size = SIZES[bench.args.size]
    with torch.device(bench.device):
        model = UAEDiT.from_preset(name, num_classes=size["num_classes"], **size["latent"]).train()
    shape = (size["latent"]["in_channels"], size["latent"]["sample_size"], size["latent"]["sample_size"])
    return DiTTrainer(bench, model, lambda x, t, y: model(x, t, y).sample, shape, size["num_classes"])


def build_diffusers(bench: Bench) -> DiTTrainer:
    size = SIZES[bench.args.size]
    config = size["diffusers"]
    with torch.device(bench.device):
        model = DiTTransformer2DModel(num_embeds_ada_norm=size["num_classes"], **config).train()
    channels = config["in_channels"]

    def model_fn(x, t, y):  # diffusers' DiT takes t in [0, 1000); its first 4 channels are the prediction
        return model(x, timestep=t * 1000, class_labels=y).sample[:, :channels]

    shape = (channels, config["sample_size"], config["sample_size"])
    return DiTTrainer(bench, model, model_fn, shape, size["num_classes"])


def parameters_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def dit_cases(bench: Bench, names, attention: str, compiled: bool, variants):
    """The train step of each model for each (checkpointing, batch) variant, with one attention backend, eager or
    compiled; one model (with its optimiser and EMA) on the device at a time."""
    args = bench.args
    for name in names:
        trainer = None
        for checkpointing, batch in variants:
            label = (f"train {name} {attention}{' + compile' if compiled else ''}"
                     f"{' + checkpointing' if checkpointing else ''} b{batch}")
            if not bench.admits(label, compiled):
                continue
            if trainer is None:
                trainer = build_ours(bench, name)
                trainer.model.set_attention_backend(attention)
                if compiled:  # static shapes: a new batch or checkpointing setting recompiles
                    compile_kwargs = {"mode": "default"} if args.compile_backend == "inductor" else {}
                    trainer.model.compile(fullgraph=True, dynamic=False, backend=args.compile_backend,
                                          **compile_kwargs)
            if checkpointing:
                trainer.model.enable_gradient_checkpointing()
            else:
                trainer.model.disable_gradient_checkpointing()
            trainer.set_batch(batch)
            bench.measure(label, trainer.step, batch, kind="train", model=name, attention=attention,
                          compile=args.compile_backend if compiled else None, checkpointing=checkpointing,
                          params_M=parameters_m(trainer.model))
        del trainer
        bench.reset_memory()


def diffusers_cases(bench: Bench):
    trainer, size = None, SIZES[bench.args.size]
    for batch in size["batch_sizes"]:
        label = f"train {size['diffusers_name']} (DiTTransformer2DModel) sdpa b{batch}"
        if not bench.admits(label):
            continue
        trainer = trainer or build_diffusers(bench)
        trainer.set_batch(batch)
        bench.measure(label, trainer.step, batch, kind="train", model=size["diffusers_name"], attention="sdpa",
                      compile=None, checkpointing=False, params_M=parameters_m(trainer.model))
    del trainer
    bench.reset_memory()


# ---- sampling -----------------------------------------------------------------------------------------------------

def sampling_case(bench: Bench):
    size = SIZES[bench.args.size]
    batch, steps = size["sample_batch"], size["sample_steps"]
    label = f"sample {size['models'][0]} euler {steps} steps cfg 1.5 + decode b{batch}"
    if not bench.admits(label):
        return
    with torch.device(bench.device):
        vae = AutoencoderUAE.from_preset(size["tokenizer"]["preset"]).eval()
        transformer = UAEDiT.from_preset(size["models"][0], num_classes=size["num_classes"],
                                         in_channels=vae.latent_channels, sample_size=vae.latent_size[0]).eval()
    scheduler = FlowMatchBandScheduler(latent_dim=vae.latent_channels * vae.latent_size[0] * vae.latent_size[1],
                                       num_bands=vae.config.num_bands, solver="euler")
    pipe = UAEDiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                          id2label={i: str(i) for i in range(size["num_classes"])}).to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % size["num_classes"] for i in range(batch)]
    generator = torch.Generator(bench.device).manual_seed(0)

    def sample():
        with torch.no_grad():
            pipe(class_labels=labels, guidance_scale=1.5, num_inference_steps=steps, generator=generator,
                 output_type="pt")

    # One pipeline call is one "step"; images/s = batch / call time.
    bench.measure(label, sample, batch, kind="sample", model=size["models"][0], attention="sdpa", compile=None,
                  checkpointing=False, params_M=parameters_m(transformer))


# ---- the tokenizer's stage-3 step -----------------------------------------------------------------------------------

def tokenizer_case(bench: Bench):
    size = SIZES[bench.args.size]
    batch = size["tokenizer_batch"]
    label = f"train tokenizer stage 3 ({size['tokenizer']['preset']}) b{batch}"
    if not bench.admits(label):
        return
    device = bench.device
    with torch.device(device):
        model = AutoencoderUAE.from_preset(size["tokenizer"]["preset"]).train()
        teacher = make_teacher(model.encoder)
        lpips = LPIPS(random_weights=True)
        discriminator = DinoDiscriminator(**size["tokenizer"]["discriminator"]).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, betas=(0.5, 0.9),
                                  fused=True)
    d_optimizer = torch.optim.AdamW([p for p in discriminator.parameters() if p.requires_grad], lr=1e-4,
                                    betas=(0.5, 0.9), fused=True)
    ema = EMA(model, 0.999)
    diffaugment = DiffAugment(cutout_ratio=0.2)
    image_size = model.config.image_size
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    noise_generator, augment_generator = torch.Generator(device).manual_seed(0), torch.Generator().manual_seed(0)

    def step():  # train_tokenizer's loop body for stage 3 after gan_start_step (weights of the imagenet256 preset)
        with bench.autocast:
            reconstruction, _, bands = model(images, True, return_dict=False, generator=noise_generator)
        reconstruction = reconstruction.float()
        losses = {"l1": l1_reconstruction_loss(reconstruction, images), "lpips": lpips(reconstruction, images)}
        with torch.no_grad(), bench.autocast:
            teacher_bands = model.split_bands(teacher(images).float())
        losses["semantic"] = semantic_band_loss(bands.float(), teacher_bands, 1)
        reconstruction_loss = losses["l1"] + losses["lpips"] + 0.1 * losses["semantic"]
        discriminator.eval().requires_grad_(False)
        with bench.autocast:
            generator_loss = hinge_generator_loss(discriminator(diffaugment(reconstruction, augment_generator)))
        discriminator.train().heads.requires_grad_(True)
        weight = adaptive_generator_weight(reconstruction_loss, generator_loss, model.decoder.pred.weight)
        (reconstruction_loss + 0.75 * weight * generator_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        real, fake = diffaugment.augment_pair(images, quantize_to_uint8_grid(reconstruction.detach()),
                                              generator=augment_generator)
        with bench.autocast:
            logits_real, logits_fake = discriminator(torch.cat([real, fake])).chunk(2)
        hinge_discriminator_loss(logits_real.float(), logits_fake.float()).backward()
        torch.nn.utils.clip_grad_norm_(discriminator.parameters(), 1.0)
        d_optimizer.step()
        d_optimizer.zero_grad(set_to_none=True)

    bench.measure(label, step, batch, kind="train", model=f"AutoencoderUAE {size['tokenizer']['preset']}",
                  attention="sdpa", compile=None, checkpointing=False, params_M=parameters_m(model))


# ---- report -----------------------------------------------------------------------------------------------------------

def ratios(rows, size: dict) -> dict:
    """Our plain DiT's eager SDPA train images/s over diffusers' DiT's (same width, depth, tokens), per batch size."""
    ours_name, theirs_name = size["models"][1], size["diffusers_name"]
    result = {}
    for row in rows:
        if row["model"] != theirs_name or "images_per_s" not in row:
            continue
        ours = [r for r in rows if r["model"] == ours_name and r["attention"] == "sdpa" and r["compile"] is None
                and not r["checkpointing"] and r["batch"] == row["batch"] and "images_per_s" in r]
        if ours:
            result[f"{ours_name} / {theirs_name}, b{row['batch']}"] = ours[0]["images_per_s"] / row["images_per_s"]
    return result


def report(bench: Bench, args) -> dict:
    device_name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor()
    result = {"config": vars(args), "device": device_name or bench.device.type, "torch": torch.__version__,
              "xformers": xformers_available(), "rows": bench.rows, "skipped": bench.skipped,
              "ratios": ratios(bench.rows, SIZES[args.size]), "wall_s": time.perf_counter() - bench.start,
              "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"\n{result['device']}, torch {torch.__version__}, bf16 autocast, TF32; means of {args.iters} steps after "
          f"{args.warmup} warm-up steps; {result['wall_s']:.0f} s in all\n")
    print("| case | params (M) | images/s | step (ms) | peak memory (GiB) | first step (s) |")
    print("|---|---|---|---|---|---|")
    for row in bench.rows:
        if "error" in row:
            print(f"| {row['case']} | {row['params_M']:.4g} | {row['error']} | | | |")
            continue
        memory = "n/a" if row["peak_memory_GiB"] is None else f"{row['peak_memory_GiB']:.1f}"
        print(f"| {row['case']} | {row['params_M']:.4g} | {row['images_per_s']:.1f} | {row['step_ms']:.1f} "
              f"| {memory} | {row['first_step_s']:.1f} |")
    print()
    for name, value in result["ratios"].items():
        print(f"train speed ratio {name}: {value:.2f}x")
    for name in bench.skipped:
        print(f"skipped: {name}")
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"\nwrote {args.out}")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    bench = Bench(args)
    models = SIZES[args.size]["models"]
    batches = SIZES[args.size]["batch_sizes"]
    every = [(checkpointing, batch) for checkpointing in (False, True) for batch in batches]
    dit_cases(bench, models, "sdpa", False, every)
    diffusers_cases(bench)
    sampling_case(bench)
    tokenizer_case(bench)
    if xformers_available() and bench.device.type == "cuda":
        dit_cases(bench, models, "xformers", False, every)
    else:
        bench.skipped.append("xformers cases (xformers not installed or not on CUDA)")
    if args.no_compile:
        bench.skipped.append("compiled cases (--no_compile)")
    else:  # each compilation is expensive: the largest batch without checkpointing of every model first
        first = (False, max(batches))
        dit_cases(bench, models, "sdpa", True, [first])
        dit_cases(bench, models, "sdpa", True, [variant for variant in every if variant != first])
    return report(bench, args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing to download
    main()
