"""Train the class-conditional UAEDiT generator with flow matching on UAE latents, with HF Accelerate.

    accelerate launch train/train_dit.py --config dit_imagenet256 --latent_cache latents/imagenet256 \
        --output_dir runs/dit-dh-xl

Data: a latent cache (train/cache_latents.py; its autoencoder, holding the latent statistics, is the default
--vae) or images encoded on the fly by the frozen autoencoder in eval mode (--train_data_dir, --dataset
demo-digits). --config loads a preset from uae_gen/configs ("_"-keys are comments); command-line flags win.
Loss (method.md 3.3): flow matching on `scheduler.band_schedule`, the schedule the saved pipeline samples with.

Exact resume: EpochShuffleSampler + `resume_position` restore the data position, and every random draw of a
micro-batch (time, noise, label dropout inside the model, flips) comes from the global RNG re-seeded from
(seed, epoch, batch, rank) inside `torch.random.fork_rng`. Checkpoints (atomic, `save_checkpoint`) hold the
optimiser and scheduler plus `transformer/` and `transformer_ema/` as from_pretrained folders (the EMA travels
there, not as a second pickle via `register_for_checkpointing`, as in train_tokenizer.py). At the end:
`output_dir/pipeline` (UAEDiTPipeline: vae + EMA transformer + scheduler + id2label) and training_summary.json.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from uae_gen.pipelines.pipeline_uae_dit import UAEDiTPipeline, imagenet_id2label

from uae_gen.data import ImageFolderDataset, LatentCacheDataset, load_demo_digits
from uae_gen.flow import SOLVERS, TIME_DISTRIBUTIONS, FlowMatchBandScheduler, flow_matching_loss
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import DIT_PRESETS, UAEDiT
from uae_gen.training import (
    EMA,
    LR_SCHEDULES,
    EpochShuffleSampler,
    batch_seed,
    read_preset,
    checkpoint_step,
    get_lr_scheduler,
    resolve_resume_path,
    resume_position,
    retain_freed_memory,
    save_checkpoint,
    write_json,
    save_image_grid,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DATA_SOURCES = ("latent_cache", "train_data_dir", "dataset")
logger = get_logger(__name__)


def time_shift_value(value: str):
    """--time_shift: "auto" (from the latent dimension, method.md 3.3) or a positive number."""
    if value == "auto":
        return value
    shift = float(value)
    if shift <= 0:
        raise argparse.ArgumentTypeError(f"time shift must be positive or 'auto', got {value}")
    return shift


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add, flag = p.add_argument, argparse.BooleanOptionalAction
    add("--config", help="preset JSON in uae_gen/configs (name like 'dit_tiny' / 'dit_imagenet256', or a path)")
    add("--output_dir", default="uae-dit")
    add("--seed", type=int, default=0)
    # data
    add("--latent_cache", help="latent cache folder from train/cache_latents.py")
    add("--train_data_dir", help="ImageFolder root (root/<class>/*.jpg), encoded on the fly")
    add("--dataset", choices=("demo-digits",), help="built-in offline set, encoded on the fly")
    add("--vae", help="AutoencoderUAE folder (default with --latent_cache: the cache's autoencoder)")
    add("--id2label", default="auto", help="class names: 'auto' (from the data), 'imagenet', or a JSON file")
    add("--random_flip", action=flag, default=True, help="horizontal flips (the cache's flipped latents)")
    add("--dataloader_num_workers", type=int, default=0)
    # model and flow matching
    add("--model", choices=sorted(DIT_PRESETS), default="DiT-DH-XL", help="UAEDiT preset")
    add("--class_dropout_prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    add("--num_bands", type=int, help="bands of the schedule (default: the autoencoder's)")
    add("--band_stagger", type=float, default=0.0, help="band-progressive stagger d_0 in [0, 1); 0 = plain")
    add("--time_shift", type=time_shift_value, default="auto", help="'auto' = sqrt(C*h*w / 4096), or a number")
    add("--time_distribution", choices=TIME_DISTRIBUTIONS, default="logit_normal")
    add("--solver", choices=SOLVERS, default="euler", help="sampler saved with the pipeline")
    # optimisation
    add("--train_batch_size", type=int, default=32, help="per device")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--num_train_epochs", type=int, default=1)
    add("--max_train_steps", type=int, help="overrides --num_train_epochs")
    add("--learning_rate", type=float, default=2e-4)
    add("--lr_scheduler", choices=LR_SCHEDULES, default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--lr_warmup_epochs", type=float, help="warmup in epochs (overrides --lr_warmup_steps)")
    add("--lr_warmup_from_zero", action=flag, default=True, help="ramp from 0 (else hold the peak LR)")
    add("--lr_end", type=float, default=0.0, help="LR at the end of a linear / cosine decay")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.95)
    add("--adam_weight_decay", type=float, default=0.0)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0, help="0 = no clipping")
    # EMA, precision, checkpoints, validation, logging
    add("--use_ema", action=flag, default=False)
    add("--ema_decay", type=float, default=0.9995)
    add("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: the accelerate config")
    add("--allow_tf32", action=flag, default=False)
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int)
    add("--resume_from_checkpoint", help="'latest' or a checkpoint path")
    add("--validation_steps", type=int, help="write a sample grid (EMA model) every N steps")
    add("--num_validation_images", type=int, default=16)
    add("--validation_num_inference_steps", type=int, default=25)
    add("--report_to", help="accelerate tracker: tensorboard, wandb, all (default: none)")
    add("--logging_dir", default="logs")
    add("--tracker_project_name", default="uae-dit")
    return p


def load_preset(config: str) -> dict:
    """A preset's flag defaults; keys starting with "_" are comments."""
    return read_preset(config, CONFIG_DIR, "dit_")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        preset = load_preset(args.config)
        if any(getattr(args, key) is not None for key in DATA_SOURCES):  # a source on the command line wins
            preset = {k: v for k, v in preset.items() if k not in DATA_SOURCES}
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(preset) - set(actions) | ({"config"} & set(preset)))
        if unknown:
            raise ValueError(f"config {args.config!r} sets unknown or forbidden keys {unknown}")
        for key, value in preset.items():
            if actions[key].choices and value is not None and value not in actions[key].choices:
                raise ValueError(f"config {args.config!r}: {key}={value!r} is not one of {actions[key].choices}")
        if "time_shift" in preset:
            preset["time_shift"] = time_shift_value(str(preset["time_shift"]))
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)  # command-line flags override the preset
    if sum(getattr(args, key) is not None for key in DATA_SOURCES) != 1:
        raise ValueError("give exactly one data source: --latent_cache, --train_data_dir or --dataset demo-digits")
    if args.vae is None and args.latent_cache is None:
        raise ValueError("--vae (an AutoencoderUAE folder) is needed to encode images on the fly")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_validation_images",
                 "validation_num_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.validation_steps is not None and args.validation_steps < 1:
        raise ValueError(f"--validation_steps must be at least 1, got {args.validation_steps}")
    if not 0.0 <= args.lr_end <= args.learning_rate:
        raise ValueError(f"--lr_end must lie in [0, learning_rate={args.learning_rate}], got {args.lr_end}")
    return args


def load_data(args):
    """(dataset of (normalised latent or image in [-1, 1], label), frozen autoencoder, dataset's id2label)."""
    if args.latent_cache is not None:
        dataset = LatentCacheDataset(args.latent_cache, random_flip=args.random_flip, seed=args.seed)
        vae = AutoencoderUAE.from_pretrained(args.vae or dataset.autoencoder_dir)
        cached = dataset.normalizer
        if not (torch.equal(vae.latents_mean, cached.latents_mean) and torch.equal(vae.latents_std, cached.latents_std)
                and vae.config.scaling_factor == cached.config.scaling_factor):
            raise ValueError(f"--vae {args.vae!r} normalises latents differently from the cache's autoencoder "
                             f"{dataset.autoencoder_dir!r}; the pipeline must decode with the training statistics")
        return dataset, vae, dataset.id2label
    vae = AutoencoderUAE.from_pretrained(args.vae)
    if vae.config.latents_stats == "none":
        logger.warning("the autoencoder has no latent statistics: training on un-normalised latents "
                       "(train/cache_latents.py computes them)", main_process_only=True)
    size = vae.config.image_size
    if args.dataset == "demo-digits":
        dataset = load_demo_digits("train", image_size=size)
    else:  # flips happen in the loop, from the seeded per-batch RNG
        dataset = ImageFolderDataset(args.train_data_dir, size, random_flip=False)
    return dataset, vae, dataset.id2label


def resolve_id2label(source: str, data_id2label: dict) -> dict:
    if source == "auto":
        id2label = data_id2label
    elif source == "imagenet":
        id2label = imagenet_id2label()
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"--id2label {source!r}: not 'auto', 'imagenet' or an existing JSON file")
        with open(source) as file:
            id2label = {int(k): str(v) for k, v in json.load(file).items()}
    if sorted(id2label) != list(range(len(data_id2label))):
        raise ValueError(f"--id2label {source!r} must name exactly the data's classes 0..{len(data_id2label) - 1}, "
                         f"got {len(id2label)} names")
    return id2label


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def loss_summary(losses: list, start_step: int, max_points: int = 50) -> dict:
    """First / last tenth means, minimum, and a curve of at most max_points window means (step, loss)."""
    if not losses:
        return {}
    window = max(1, len(losses) // 10)
    chunk = math.ceil(len(losses) / max_points)
    curve = [[start_step + i + len(losses[i:i + chunk]), float(np.mean(losses[i:i + chunk]))]
             for i in range(0, len(losses), chunk)]
    return {"first": float(np.mean(losses[:window])), "last": float(np.mean(losses[-window:])),
            "min": float(np.min(losses)), "window": window, "curve": curve}


def main(args: argparse.Namespace) -> dict:
    start_time = time.time()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=args.report_to, project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # else every CPU step page-faults its activations back in (10-15% of a step)
    set_seed(args.seed)
    device, rank = accelerator.device, accelerator.process_index

    # ---- data, frozen autoencoder, scheduler (its band schedule drives training), transformer ---------------
    dataset, vae, data_id2label = load_data(args)
    vae = vae.eval().requires_grad_(False).to(device)
    id2label = resolve_id2label(args.id2label, data_id2label)
    channels, (height, width) = vae.latent_channels, vae.latent_size
    if height != width:
        raise ValueError(f"UAEDiT needs a square latent grid, the autoencoder gives {height}x{width}")
    auto_shift = args.time_shift == "auto"
    shift_kwargs = {"latent_dim": channels * height * width} if auto_shift else {"shift": args.time_shift}
    scheduler = FlowMatchBandScheduler(solver=args.solver, num_bands=args.num_bands or vae.config.num_bands,
                                       band_stagger=args.band_stagger, **shift_kwargs)
    schedule = scheduler.band_schedule
    split_bands = vae.split_bands if schedule.is_staggered else None
    if schedule.is_staggered and schedule.num_bands != vae.config.num_bands:
        raise ValueError(f"--num_bands {schedule.num_bands} differs from the autoencoder's "
                         f"{vae.config.num_bands} bands")
    transformer = UAEDiT.from_preset(args.model, in_channels=channels, sample_size=height,
                                     num_classes=len(id2label), class_dropout_prob=args.class_dropout_prob)
    encode_on_the_fly = args.latent_cache is None

    if len(dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(f"{len(dataset)} training samples are fewer than one global batch "
                         f"({args.train_batch_size} x {accelerator.num_processes} processes)")
    train_dataloader = accelerator.prepare(DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=EpochShuffleSampler(dataset, args.seed), drop_last=True,
        num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available()))
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup_steps = args.lr_warmup_steps
    if args.lr_warmup_epochs is not None:
        warmup_steps = round(args.lr_warmup_epochs * steps_per_epoch)

    # ---- optimiser and LR schedule (the prepared scheduler steps once per process) ------------------------
    # fused: one kernel per step instead of the for-loop's ~10 passes with fresh full-size temporaries per
    # parameter (plain DiT of bench/bench_dit.py on CPU: 350 -> 333 ms a training step).
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon, fused=True)
    n = accelerator.num_processes
    lr_scheduler = get_lr_scheduler(args.lr_scheduler, optimizer, warmup_steps * n, max_train_steps * n,
                                    args.lr_end / args.learning_rate, args.lr_warmup_from_zero)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(transformer)
    ema = EMA(model, args.ema_decay) if args.use_ema else None

    # ---- checkpoint hooks: the live model and its EMA as from_pretrained folders --------------------------
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            model.save_pretrained(os.path.join(output_dir, "transformer"))
            if ema is not None:
                ema.model.save_pretrained(os.path.join(output_dir, "transformer_ema"))
        weights.clear()  # on every rank: accelerate must not write model.safetensors as well

    def load_model_hook(models, input_dir):
        models.clear()
        model.load_state_dict(UAEDiT.from_pretrained(os.path.join(input_dir, "transformer")).state_dict())
        if ema is not None:
            ema_dir = os.path.join(input_dir, "transformer_ema")
            if os.path.isdir(ema_dir):
                ema.model.load_state_dict(UAEDiT.from_pretrained(ema_dir).state_dict())
            else:
                logger.warning(f"{input_dir} has no transformer_ema; the EMA restarts from the loaded weights")
                ema.update(model, decay=0.0)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    global_step, resume_path = 0, resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        accelerator.load_state(resume_path)
        global_step = checkpoint_step(resume_path)
        logger.info(f"resumed from {resume_path} at step {global_step}", main_process_only=True)
    start_step = global_step
    if args.report_to:
        accelerator.init_trackers(args.tracker_project_name, config={
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    def validate():
        """A sample grid from the EMA model (or the live one), classes in turn, on the main process."""
        sampler_model = ema.model if ema is not None else model
        was_training = sampler_model.training
        pipe = UAEDiTPipeline(transformer=sampler_model.eval(), vae=vae, scheduler=scheduler, id2label=id2label)
        pipe.set_progress_bar_config(disable=True)
        labels = [i % len(id2label) for i in range(args.num_validation_images)]
        images = pipe(class_labels=labels, num_inference_steps=args.validation_num_inference_steps,
                      generator=torch.Generator(device).manual_seed(args.seed), output_type="pt").images
        sampler_model.train(was_training)
        save_image_grid(images, os.path.join(args.output_dir, "samples", f"step-{global_step:07d}.png"),
                        value_range=(0.0, 1.0), labels=[id2label[label] for label in labels])

    # ---- training loop ------------------------------------------------------------------------------------
    logger.info(f"{len(dataset)} samples, {steps_per_epoch} steps/epoch, {max_train_steps} steps, "
                f"{accelerator.num_processes} processes, time shift {schedule.shift:.3f}", main_process_only=True)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="steps")
    first_epoch, batches_to_skip = resume_position(global_step, len(train_dataloader), args.gradient_accumulation_steps)
    losses, micro_losses = [], []
    transformer.train()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        train_dataloader.set_epoch(epoch)  # before skip_first_batches: it must reach the shared sampler
        skip = batches_to_skip if epoch == first_epoch else 0
        epoch_loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_index, (inputs, labels) in enumerate(epoch_loader, start=skip):
            with accelerator.accumulate(transformer), torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(batch_seed(args.seed, epoch, batch_index, rank))
                if encode_on_the_fly:
                    if args.random_flip:
                        flip = torch.rand(inputs.shape[0], device=device) < 0.5
                        inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
                    with torch.no_grad():
                        inputs = vae.encode(inputs).latent
                loss = flow_matching_loss(lambda x, t, y: transformer(x, t, y).sample, inputs, labels, schedule,
                                          split_bands, args.time_distribution).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue

            if ema is not None:
                ema.update(model)
            global_step += 1
            step_loss = accelerator.gather(torch.stack(micro_losses).mean()[None]).mean().item()
            micro_losses.clear()
            losses.append(step_loss)
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
            progress.update(1)
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                validate()
            if global_step >= max_train_steps:
                break
    progress.close()

    # ---- final pipeline (EMA transformer) and summary -----------------------------------------------------
    accelerator.wait_for_everyone()
    hashes = gather_object([{"transformer": weights_sha256(model),
                             "ema": weights_sha256(ema.model) if ema is not None else None}])
    summary = {
        "world_size": accelerator.num_processes, "global_step": global_step, "start_step": start_step,
        "resumed_from": resume_path, "max_train_steps": max_train_steps, "steps_per_epoch": steps_per_epoch,
        "num_samples": len(dataset), "global_batch_size": args.train_batch_size * accelerator.num_processes
        * args.gradient_accumulation_steps, "time_shift": schedule.shift, "seconds": round(time.time() - start_time, 2),
        "loss": loss_summary(losses, start_step), "weights_sha256_per_rank": hashes, "args": vars(args),
    }
    if accelerator.is_main_process:
        final_model = (ema.model if ema is not None else model).eval()
        pipe = UAEDiTPipeline(transformer=final_model, vae=vae, scheduler=scheduler, id2label=id2label)
        pipeline_dir = os.path.join(args.output_dir, "pipeline")
        temp_dir = os.path.join(args.output_dir, ".tmp-pipeline")
        shutil.rmtree(temp_dir, ignore_errors=True)
        pipe.save_pretrained(temp_dir)
        shutil.rmtree(pipeline_dir, ignore_errors=True)
        os.rename(temp_dir, pipeline_dir)
        write_json(os.path.join(args.output_dir, "training_summary.json"), summary)
        logger.info(f"done at step {global_step}: {summary['loss'].get('last')} loss; pipeline in {pipeline_dir}",
                    main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main(parse_args())
