"""Train the class-conditional UAEDiT generator with flow matching on UAE latents, with HF Accelerate.

    accelerate launch -m uae_gen.scripts.train_dit --config dit_imagenet256 --latent_cache latents/imagenet256 \
        --output_dir runs/dit-dh-xl

(`accelerate launch train/train_dit.py ...` in a checkout runs this module too.) Data: a latent cache
(uae_gen.scripts.cache_latents; its autoencoder, holding the latent statistics, is the default --vae) or images
encoded on the fly by the frozen autoencoder in eval mode (--train_data_dir, --dataset demo-digits). --config
loads a preset from uae_gen/configs ("_"-keys are comments); command-line flags win.
Loss (method.md 3.3): flow matching on `scheduler.band_schedule`, the schedule the saved pipeline samples with.

Exact resume: `resumed_batches` restores the data position, and every random draw of a micro-batch (time, noise,
label dropout inside the model, flips) comes from the global RNG re-seeded from (seed, epoch, batch, rank) inside
`torch.random.fork_rng`. Checkpoints (atomic, `save_checkpoint`) hold the optimiser and scheduler plus
`transformer/` and `transformer_ema/` as from_pretrained folders. The loss is averaged on the device and read
every --logging_steps. At the end: `output_dir/pipeline` (UAEDiTPipeline: vae + EMA transformer + scheduler +
id2label) and training_summary.json.
"""

import argparse
import copy
import hashlib
import json
import os
import shutil
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from uae_gen.pipelines.pipeline_uae_dit import UAEDiTPipeline, imagenet_id2label

from uae_gen.data import ImageFolderDataset, LatentCacheDataset, LatentStatistics, load_demo_digits
from uae_gen.flow import BAND_CLOCKS, SOLVERS, TIME_DISTRIBUTIONS, FlowMatchBandScheduler, flow_matching_loss
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.dit import DIT_PRESETS, PREDICTION_TYPES, UAEDiT
from uae_gen.training import EMA, LossLogger, backward_and_step, batch_seed, loss_summary, resumed_batches
from uae_gen.training import add_training_arguments, check_training_arguments, parse_args_with_preset, read_preset
from uae_gen.training import make_accelerator, make_adamw, make_lr_scheduler, make_train_dataloader
from uae_gen.training import register_pretrained_hooks, resume_from_checkpoint, save_checkpoint
from uae_gen.training import add_attention_backend_argument, compile_module, make_readable, save_image_grid, write_json

DATA_SOURCES = ("latent_cache", "train_data_dir", "dataset")
LOWPASS_STATS_SAMPLES = 10_000
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
    add_training_arguments(p)  # preset, optimiser, LR schedule, EMA, precision, checkpoints, logging
    add, flag = p.add_argument, argparse.BooleanOptionalAction
    # data
    add("--latent_cache", help="latent cache folder from uae_gen.scripts.cache_latents")
    add("--train_data_dir", help="ImageFolder root (root/<class>/*.jpg), encoded on the fly")
    add("--dataset", choices=("demo-digits",), help="built-in offline set, encoded on the fly")
    add("--vae", help="AutoencoderUAE folder (default with --latent_cache: the cache's autoencoder)")
    add("--id2label", default="auto", help="class names: 'auto' (from the data), 'imagenet', or a JSON file")
    add("--random_flip", action=flag, default=True, help="horizontal flips (the cache's flipped latents)")
    # model and flow matching
    add("--model", choices=sorted(DIT_PRESETS), default="DiT-DH-XL", help="UAEDiT preset")
    add("--class_dropout_prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    add("--num_bands", type=int, help="bands of the schedule (default: the autoencoder's)")
    add("--band_stagger", type=float, default=0.0, help="band-progressive stagger d_0 in [0, 1); 0 = plain")
    add("--band_clock", choices=BAND_CLOCKS, default="compressed",
        help="'shifted': band k runs on tau - d_k over [0, 1 + d_0] with its own time embedding (SFD); "
        "'compressed': band k's clock squeezed into [d_k, 1]")
    add("--band0_loss_weight", type=float, default=1.0, help="weight of band 0's share of the loss (SFD: 2)")
    add("--prediction_type", choices=PREDICTION_TYPES, default="velocity",
        help="what the DiT's last layer predicts: the velocity, or the clean latent ('sample', JiT's x-prediction, "
        "for tokens holding more values than the model's width); the loss is on the velocity either way")
    add("--time_shift", type=time_shift_value, default="auto", help="'auto' = sqrt(C*h*w / 4096), or a number")
    add("--time_distribution", choices=TIME_DISTRIBUTIONS, default="logit_normal")
    add("--solver", choices=SOLVERS, default="euler", help="sampler saved with the pipeline")
    add_attention_backend_argument(p)
    # low-to-high: the UAE frequency-limited latent, optionally as fewer tokens
    add("--latent_lowpass", type=coefficient_count, help="learn the first N zig-zag DCT coefficients of each latent "
        "channel (the UAE v2 frequency-limited latent; per-channel statistics recomputed on it); 'none' turns a "
        "preset's value off")
    add("--frequency_tokens", action=flag, default=False,
        help="the DiT runs on those N coefficients as N tokens instead of h*w (needs --latent_lowpass)")
    add("--lowpass_schedule", nargs="+", type=lowpass_stage, metavar="N@STEP",
        help="curriculum for a spatial DiT (UAE v2's progressive band split): from step STEP on, learn the first N "
        "coefficients, e.g. 36@0 49@2000 64@4000; the first stage starts at 0 and the last N is --latent_lowpass")
    add("--coefficients_per_token", type=int, default=1,
        help="with --frequency_tokens: G consecutive zig-zag coefficients per token (N/G tokens)")
    add("--coarse_tokens", type=int, help="with --frequency_tokens: coarse to fine, the DiT runs on the first M tokens "
        "while t > --coarse_time (the finer coefficients stay noise until then)")
    add("--coarse_time", type=float, default=0.5, help="where the coarse stage hands over to all tokens (1 = noise)")
    # validation: a sample grid of the EMA model every --validation_steps
    add("--num_validation_images", type=int, default=16)
    add("--validation_num_inference_steps", type=int, default=25)
    p.set_defaults(output_dir="uae-dit", train_batch_size=32, ema_decay=0.9995, tracker_project_name="uae-dit")
    return p


def coefficient_count(value: str) -> int | None:
    """--latent_lowpass: a count N, or "none" (the whole latent, as when the flag is absent)."""
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latent_lowpass takes a coefficient count or 'none', got {value!r}") \
            from None


def lowpass_stage(value: str) -> tuple[int, int]:
    """--lowpass_schedule entry "N@STEP" -> (STEP, N)."""
    count, sep, step = value.partition("@")
    try:
        return int(step), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a --lowpass_schedule stage is N@STEP, got {value!r}") from None


def check_lowpass_schedule(args) -> None:
    stages = args.lowpass_schedule
    if args.latent_lowpass is None:
        raise ValueError("--lowpass_schedule needs --latent_lowpass N: its last stage, the latent the pipeline samples")
    steps, counts = [step for step, _ in stages], [count for _, count in stages]
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"--lowpass_schedule stages must start at step 0 and grow in step; got {steps}")
    if any(b <= a for a, b in zip(counts, counts[1:])) or counts[0] < 1:
        raise ValueError(f"--lowpass_schedule must grow N from stage to stage (a curriculum never drops "
                         f"coefficients); got {counts}")
    if counts[-1] != args.latent_lowpass:
        raise ValueError(f"--lowpass_schedule ends at N={counts[-1]}: it must end at --latent_lowpass "
                         f"({args.latent_lowpass}), the latent the pipeline samples")
    if args.frequency_tokens:
        raise ValueError("--lowpass_schedule grows the latent a spatial DiT learns; a --frequency_tokens model has "
                         "a fixed number of tokens")


def lowpass_count(schedule: list[tuple[int, int]], step: int) -> int:
    """The coefficient count of the curriculum stage that `step` lies in."""
    return [count for start, count in schedule if start <= step][-1]


def parse_args(argv=None) -> argparse.Namespace:
    def load_preset(args):
        preset = read_preset(args.config, "dit_")
        if any(getattr(args, key) is not None for key in DATA_SOURCES):  # a source on the command line wins
            preset = {k: v for k, v in preset.items() if k not in DATA_SOURCES}
        return preset

    args = parse_args_with_preset(build_parser(), argv, load_preset)
    check_training_arguments(args)
    args.time_shift = time_shift_value(str(args.time_shift))  # a preset may give a number
    if sum(getattr(args, key) is not None for key in DATA_SOURCES) != 1:
        raise ValueError("give exactly one data source: --latent_cache, --train_data_dir or --dataset demo-digits")
    if args.vae is None and args.latent_cache is None:
        raise ValueError("--vae (an AutoencoderUAE folder) is needed to encode images on the fly")
    if args.band0_loss_weight <= 0:
        raise ValueError(f"--band0_loss_weight must be positive, got {args.band0_loss_weight}")
    if args.prediction_type == "sample" and args.band_stagger > 0:
        raise ValueError(f"--prediction_type sample needs one clock for the whole latent; got --band_stagger "
                         f"{args.band_stagger}")
    if args.frequency_tokens and args.latent_lowpass is None:
        raise ValueError("--frequency_tokens runs the DiT on the low-passed latent's coefficients: give --latent_lowpass N")
    if args.lowpass_schedule is not None:
        check_lowpass_schedule(args)
    if args.coefficients_per_token < 1 or (args.coefficients_per_token > 1 and not args.frequency_tokens):
        raise ValueError(f"--coefficients_per_token must be >= 1, and above 1 only with --frequency_tokens; got "
                         f"{args.coefficients_per_token}")
    if args.coarse_tokens is not None and not args.frequency_tokens:
        raise ValueError(f"--coarse_tokens {args.coarse_tokens} runs the DiT on fewer frequency tokens: it needs "
                         "--frequency_tokens")
    if args.coarse_tokens is not None and args.band_stagger > 0:
        raise ValueError(f"--coarse_tokens needs one clock for the whole latent; got --band_stagger "
                         f"{args.band_stagger}")
    for name in ("num_validation_images", "validation_num_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
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
                       "(uae_gen.scripts.cache_latents computes them)", main_process_only=True)
    size = vae.config.image_size
    if args.dataset == "demo-digits":
        dataset = load_demo_digits("train", image_size=size)
    else:  # flips happen in the loop, from the seeded per-batch RNG
        dataset = ImageFolderDataset(args.train_data_dir, size, random_flip=False)
    return dataset, vae, dataset.id2label


@torch.no_grad()
def frequency_limited_autoencoder(vae: AutoencoderUAE, dataset, num_coefficients: int, device) -> AutoencoderUAE:
    """A copy of `vae` whose latent keeps the first N zig-zag DCT coefficients per channel, normalised with the
    per-channel statistics of that low-passed latent (per channel, so normalising keeps it low-passed), measured
    on up to LOWPASS_STATS_SAMPLES training samples."""
    height, width = vae.latent_size
    if not 1 <= num_coefficients <= height * width:
        raise ValueError(f"--latent_lowpass must lie in [1, {height * width}] (the {height}x{width} latent grid), "
                         f"got {num_coefficients}")
    limited = copy.deepcopy(vae)
    limited.register_to_config(dct_lowpass_coefficients=num_coefficients)
    statistics = LatentStatistics(per_channel=True)
    count = min(len(dataset), LOWPASS_STATS_SAMPLES)
    for start in range(0, count, 256):
        indices = range(start, min(start + 256, count))
        if isinstance(dataset, LatentCacheDataset):
            raw = torch.stack([dataset.raw_latent(i) for i in indices]).to(device)
        else:
            raw = vae.encode_raw(torch.stack([dataset[i][0] for i in indices]).to(device))
        statistics.update(limited.lowpass(raw, num_coefficients))
    limited.set_latent_statistics(*statistics.mean_and_std())
    return limited


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


def make_flow_scheduler(args, vae: AutoencoderUAE) -> FlowMatchBandScheduler:
    """The flow-matching scheduler the pipeline samples with; its band schedule drives the training loss."""
    channels, (height, width) = vae.latent_channels, vae.latent_size
    if height != width:
        raise ValueError(f"UAEDiT needs a square latent grid, the autoencoder gives {height}x{width}")
    shift = {"latent_dim": channels * height * width} if args.time_shift == "auto" else {"shift": args.time_shift}
    scheduler = FlowMatchBandScheduler(solver=args.solver, num_bands=args.num_bands or vae.config.num_bands,
                                       band_stagger=args.band_stagger, band_clock=args.band_clock, **shift)
    schedule = scheduler.band_schedule
    if schedule.is_staggered and schedule.num_bands != vae.config.num_bands:
        raise ValueError(f"--num_bands {schedule.num_bands} differs from the autoencoder's "
                         f"{vae.config.num_bands} bands")
    return scheduler


def make_transformer(args, vae: AutoencoderUAE, num_classes: int, num_model_times: int) -> UAEDiT:
    """A fresh `args.model` on `vae`'s latent (frequency tokens on --latent_lowpass N when --frequency_tokens),
    taking `num_model_times` times (the band schedule's)."""
    return UAEDiT.from_preset(args.model, in_channels=vae.latent_channels, sample_size=vae.latent_size[0],
                              num_classes=num_classes, class_dropout_prob=args.class_dropout_prob,
                              frequency_tokens=args.latent_lowpass if args.frequency_tokens else None,
                              coefficients_per_token=args.coefficients_per_token,
                              num_time_embeddings=num_model_times, prediction_type=args.prediction_type,
                              coarse_tokens=args.coarse_tokens, coarse_time=args.coarse_time)


@torch.no_grad()
def encode_images(vae: AutoencoderUAE, images: torch.Tensor, random_flip: bool) -> torch.Tensor:
    """Normalised latents of [-1, 1] images; with random_flip each image is mirrored with probability 1/2, drawn
    from the (per-batch seeded) global RNG."""
    if random_flip:
        flip = torch.rand(images.shape[0], device=images.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return vae.encode(images).latent


def save_sample_grid(args, transformer: UAEDiT, vae, scheduler, id2label: dict, step: int) -> None:
    """A grid of `transformer`'s samples, classes in turn, as output_dir/samples/step-N.png."""
    was_training = transformer.training
    pipe = UAEDiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % len(id2label) for i in range(args.num_validation_images)]
    images = pipe(class_labels=labels, num_inference_steps=args.validation_num_inference_steps,
                  generator=torch.Generator(vae.device).manual_seed(args.seed), output_type="pt").images
    transformer.train(was_training)
    save_image_grid(images, os.path.join(args.output_dir, "samples", f"step-{step:07d}.png"),
                    value_range=(0.0, 1.0), labels=[id2label[label] for label in labels])


def save_pipeline(pipe: UAEDiTPipeline, pipeline_dir: str) -> None:
    """save_pretrained into a temp folder, then replace pipeline_dir with it."""
    temp_dir = os.path.join(os.path.dirname(pipeline_dir), ".tmp-pipeline")
    shutil.rmtree(temp_dir, ignore_errors=True)
    pipe.save_pretrained(temp_dir)
    make_readable(temp_dir)
    shutil.rmtree(pipeline_dir, ignore_errors=True)
    os.rename(temp_dir, pipeline_dir)


def main(args: argparse.Namespace) -> dict:
    start_time = time.time()
    accelerator = make_accelerator(args)
    device, rank = accelerator.device, accelerator.process_index

    # ---- data, frozen autoencoder, scheduler (its band schedule drives training), transformer ---------------
    dataset, vae, data_id2label = load_data(args)
    vae = vae.eval().requires_grad_(False).to(device)
    data_vae = vae  # normalises the data as it comes (the cache's statistics)
    if args.latent_lowpass is not None:
        vae = frequency_limited_autoencoder(vae, dataset, args.latent_lowpass, device)
    id2label = resolve_id2label(args.id2label, data_id2label)
    scheduler = make_flow_scheduler(args, vae)
    schedule = scheduler.band_schedule
    split_bands = vae.split_bands if schedule.is_staggered or args.band0_loss_weight != 1.0 else None
    transformer = make_transformer(args, vae, len(id2label), schedule.num_model_times)
    if args.attention_backend is not None:
        transformer.set_attention_backend(args.attention_backend)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    noise_projection = (lambda noise: vae.lowpass(noise, args.latent_lowpass)) if args.frequency_tokens else None
    train_dataloader, steps_per_epoch, max_train_steps = make_train_dataloader(accelerator, dataset, args)

    # ---- optimiser, LR schedule (the prepared scheduler steps once per process), EMA, resume -----------------
    optimizer = make_adamw(transformer.parameters(), args)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator, max_train_steps, steps_per_epoch)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(transformer)
    ema = EMA(model, args.ema_decay) if args.use_ema else None
    if args.compile:  # in place, after the EMA copy (which stays eager)
        compile_module(model, args.compile_mode)
    register_pretrained_hooks(accelerator, model, ema, "transformer")  # checkpoint-N/transformer{,_ema}/
    global_step, resume_path = resume_from_checkpoint(accelerator, args)
    start_step = global_step

    # ---- training loop ------------------------------------------------------------------------------------
    logger.info(f"{len(dataset)} samples, {steps_per_epoch} steps/epoch, {max_train_steps} steps, "
                f"{accelerator.num_processes} processes, time shift {schedule.shift:.3f}", main_process_only=True)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="steps")
    loss_log = LossLogger(accelerator, progress, args.logging_steps, max_train_steps)
    transformer.train()
    for epoch, batch_index, (inputs, labels) in resumed_batches(accelerator, train_dataloader, global_step,
                                                                 max_train_steps):
        with accelerator.accumulate(transformer), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(batch_seed(args.seed, epoch, batch_index, rank))  # every draw of this batch
            if args.latent_cache is None:
                inputs = encode_images(vae, inputs, args.random_flip)
            elif vae is not data_vae:  # cached latents, frequency-limited and renormalised
                inputs = vae.normalize_latents(vae.lowpass(data_vae.denormalize_latents(inputs), args.latent_lowpass))
            if args.lowpass_schedule is not None:  # per-channel statistics: low-passing commutes with them
                inputs = vae.lowpass(inputs, lowpass_count(args.lowpass_schedule, global_step))
            loss = flow_matching_loss(lambda x, t, y: transformer(x, t, y).sample, inputs, labels, schedule,
                                      split_bands, args.time_distribution, noise_projection=noise_projection,
                                      band0_weight=args.band0_loss_weight).loss
            backward_and_step(accelerator, loss, transformer, optimizer, lr_scheduler, args.max_grad_norm)
            if accelerator.sync_gradients and ema is not None:
                ema.update(model)
        loss_log.add({"loss": loss})
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        loss_log.step(global_step, lr_scheduler.get_last_lr()[0])
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            save_sample_grid(args, ema.model if ema is not None else model, vae, scheduler, id2label, global_step)
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
        "loss": loss_summary([(step, logs["loss"]) for step, logs in loss_log.history]),
        "weights_sha256_per_rank": hashes, "args": vars(args),
    }
    if accelerator.is_main_process:
        final_model = (ema.model if ema is not None else model).eval()
        pipeline_dir = os.path.join(args.output_dir, "pipeline")
        save_pipeline(UAEDiTPipeline(transformer=final_model, vae=vae, scheduler=scheduler, id2label=id2label),
                      pipeline_dir)
        write_json(os.path.join(args.output_dir, "training_summary.json"), summary)
        logger.info(f"done at step {global_step}: {summary['loss'].get('last')} loss; pipeline in {pipeline_dir}",
                    main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main(parse_args())
