"""Train the UAE tokenizer (AutoencoderUAE) in three stages with HF Accelerate.

    accelerate launch train/train_tokenizer.py --config imagenet256 --stage 1 --output_dir runs/uae-s1 ...

Stages (method.md 2.1, the released v1 recipe folded into three runs; each starts from the previous output):
  1. decoder + band modulator train on the frozen pretrained encoder; loss: pixel L1 (+ LPIPS).
  2. + the encoder trains (its own LR, --encoder_lr_ratio); + the semantic band loss: bands k < --num_base_bands of
     the encoder's latent are pulled towards the same bands of a frozen teacher (the initial encoder).
  3. + band-limited noise on the high bands (--band_noise) + GAN: DINO discriminator on DiffAugment-ed images,
     hinge D loss with D updates from --discriminator_start_step, -E[D(x_hat)] G loss scaled by the adaptive weight
     (last decoder layer) from --gan_start_step. The discriminator has its own AdamW and LR schedule.

Flags follow the diffusers example scripts; --config loads a preset JSON from uae_gen/configs (its top-level keys,
then its "stages"/"<N>" keys, are flag defaults; flags given on the command line win).

Where this differs from the official v1 code (method.md section 6): the loss is computed through the
accelerate-wrapped model, so DDP all-reduces the gradients; the output dir holds the EMA weights when --use_ema,
and the next stage's --init_from starts from them (v1 chained the non-EMA weights); warmup ramps the LR from 0;
checkpoints are step-numbered and atomic. Exact resume: the data order comes from EpochShuffleSampler and the
position from `resume_position`; every random draw of a micro-batch (band noise, DiffAugment) comes from two
generators re-seeded from (seed, epoch, batch, rank), so a resumed run makes the same draws. Checkpoints hold the
optimisers, schedulers and the discriminator (accelerate's files), plus the live autoencoder and its EMA as
`from_pretrained` folders `autoencoder/` and `autoencoder_ema/` (safetensors, not a pickle of the EMA).
"""

import argparse
import json
import math
import os
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from uae_gen.data import ImageFolderDataset, load_demo_digits
from uae_gen.losses import (
    LPIPS,
    DiffAugment,
    DinoDiscriminator,
    GANLossSchedule,
    adaptive_generator_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    l1_reconstruction_loss,
    quantize_to_uint8_grid,
    semantic_band_loss,
)
from uae_gen.metrics import psnr
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.encoders import load_encoder_weights, make_teacher
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
logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add, flag = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", type=int, choices=(1, 2, 3), required=True, help="1 decoder, 2 + encoder/semantic, 3 + noise/GAN")
    add("--config", help="preset JSON in uae_gen/configs (name like 'tiny' / 'imagenet256', or a path)")
    add("--output_dir", default=None, help="default: uae-tokenizer-stage<N>")
    add("--seed", type=int, default=0)
    # model
    add("--init_from", help="previous stage's output dir (AutoencoderUAE.from_pretrained)")
    add("--model_preset", default="imagenet256-dinov2-b", help="AutoencoderUAE preset when not --init_from")
    add("--model_config", type=json.loads, default=None, help="JSON dict of AutoencoderUAE overrides (fresh model)")
    add("--pretrained_encoder", help="initial encoder weights (timm hub name or local file) when not --init_from; "
        "when given, also the semantic teacher's weights")
    add("--random_encoder", action=flag, default=False, help="allow a random initial encoder (tests / demo only)")
    # data
    add("--dataset", choices=("demo-digits",), help="built-in offline set (train / heldout splits)")
    add("--train_data_dir", help="ImageFolder root (root/<class>/*.jpg)")
    add("--validation_data_dir", help="held-out ImageFolder root (default for demo-digits: its heldout split)")
    add("--max_train_samples", type=int, help="use only the first N training images")
    add("--num_validation_images", type=int, default=64)
    add("--dataloader_num_workers", type=int, default=0)
    # optimisation
    add("--train_batch_size", type=int, default=8, help="per device")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--num_train_epochs", type=int, default=1)
    add("--max_train_steps", type=int, help="overrides --num_train_epochs")
    add("--learning_rate", type=float, default=2e-4)
    add("--encoder_lr_ratio", type=float, default=1.0, help="encoder LR = ratio * learning_rate (stages 2-3)")
    add("--lr_scheduler", choices=LR_SCHEDULES, default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--lr_final_ratio", type=float, default=0.0, help="linear/cosine decay ends at this fraction of the peak")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.95)
    add("--adam_weight_decay", type=float, default=0.0)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    # losses
    add("--l1_weight", type=float, default=1.0)
    add("--lpips_weight", type=float, default=0.0)
    add("--lpips_vgg_weights", help="local torchvision vgg16 state dict (needed when --lpips_weight > 0)")
    add("--lpips_linear_weights", help="LPIPS linear layers (default: the copy in the lpips package)")
    add("--semantic_weight", type=float, default=0.1, help="semantic band loss weight (stages 2-3)")
    add("--num_base_bands", type=int, default=1, help="K_base: bands k < K_base carry the semantic loss")
    add("--band_noise", action=flag, default=None, help="noise on the high bands (default: on in stage 3 only)")
    add("--gan_weight", type=float, default=0.75, help="adversarial weight (stage 3), times the adaptive weight")
    add("--discriminator_weights", help="DINO ViT-S/8 backbone weights: local file or hub name (stage 3)")
    add("--discriminator_random_backbone", action=flag, default=False, help="random D backbone (tests / demo only)")
    add("--discriminator_config", type=json.loads, default=None, help="JSON dict of DinoDiscriminator kwargs")
    add("--discriminator_learning_rate", type=float, default=1e-4)
    add("--discriminator_start_step", type=int, default=0, help="first step with a D update")
    add("--gan_start_step", type=int, default=0, help="first step with the G adversarial term")
    add("--diffaugment_cutout", type=float, default=0.0, help="DiffAugment cutout ratio (v1: 0.2, v2/RAE: 0)")
    # EMA, precision, checkpoints, validation, logging
    add("--use_ema", action=flag, default=False)
    add("--ema_decay", type=float, default=0.9999)
    add("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: the accelerate config")
    add("--allow_tf32", action="store_true")
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int)
    add("--resume_from_checkpoint", help="'latest' or a checkpoint path")
    add("--validation_steps", type=int, default=500)
    add("--report_to", help="accelerate tracker: tensorboard, wandb, all (default: none)")
    add("--logging_dir", default="logs")
    add("--tracker_project_name", default="uae-tokenizer")
    return p


def load_preset(config: str, stage: int) -> dict:
    """A preset's flag defaults for `stage`: top-level keys, then stages[str(stage)]; "_"-keys are comments."""
    preset = read_preset(config, CONFIG_DIR, "tokenizer_")
    values = {**preset, **preset.get("stages", {}).get(str(stage), {})}
    return {k: v for k, v in values.items() if k != "stages" and not k.startswith("_")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        preset = load_preset(args.config, args.stage)
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(preset) - set(actions) | ({"stage", "config"} & set(preset)))
        if unknown:
            raise ValueError(f"config {args.config!r} sets unknown or forbidden keys {unknown}")
        for key, value in preset.items():
            if actions[key].choices and value is not None and value not in actions[key].choices:
                raise ValueError(f"config {args.config!r}: {key}={value!r} is not one of {actions[key].choices}")
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)  # command-line flags override the preset
    args.output_dir = args.output_dir or f"uae-tokenizer-stage{args.stage}"
    args.band_noise = args.stage == 3 if args.band_noise is None else args.band_noise
    if (args.dataset is None) == (args.train_data_dir is None):
        raise ValueError("give exactly one of --dataset demo-digits and --train_data_dir")
    if args.init_from is None and args.pretrained_encoder is None and not args.random_encoder:
        raise ValueError("no initial weights: pass --init_from (previous stage), --pretrained_encoder (DINOv2 hub "
                         "name or file), or --random_encoder (tests / demo only)")
    if args.init_from is not None and not os.path.isdir(args.init_from):
        raise FileNotFoundError(f"--init_from {args.init_from!r} is not a directory")
    if args.lpips_weight > 0 and not args.lpips_vgg_weights:
        raise ValueError("--lpips_weight > 0 needs --lpips_vgg_weights (a local torchvision vgg16 state dict); "
                         "LPIPS never uses random weights in training")
    if args.stage == 3 and not args.discriminator_weights and not args.discriminator_random_backbone:
        raise ValueError("stage 3 needs --discriminator_weights (DINO ViT-S/8 file or hub name); "
                         "--discriminator_random_backbone is for tests only")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "num_validation_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def load_datasets(args, image_size: int):
    """(train set, held-out images tensor or None)."""
    if args.dataset == "demo-digits":
        train, heldout = load_demo_digits("train", image_size, args.seed), load_demo_digits("heldout", image_size)
    else:
        train = ImageFolderDataset(args.train_data_dir, image_size)
        heldout = ImageFolderDataset(args.validation_data_dir, image_size) if args.validation_data_dir else None
    if args.max_train_samples is not None:
        train = Subset(train, range(min(args.max_train_samples, len(train))))
    if heldout is None:
        return train, None
    # Evenly spaced indices reach every class of a sorted ImageFolder.
    indices = torch.linspace(0, len(heldout) - 1, min(args.num_validation_images, len(heldout))).long().tolist()
    return train, torch.stack([heldout[i][0] for i in dict.fromkeys(indices)])


def build_autoencoder(args) -> AutoencoderUAE:
    if args.init_from is not None:
        return AutoencoderUAE.from_pretrained(args.init_from)
    model = AutoencoderUAE.from_preset(args.model_preset, **(args.model_config or {}))
    if args.pretrained_encoder is not None:
        load_encoder_weights(model.encoder, args.pretrained_encoder)
    else:
        logger.warning("training from a RANDOM encoder (--random_encoder): for tests and the demo only")
    return model


@torch.no_grad()
def reconstruct(model: AutoencoderUAE, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    """Eval-mode reconstructions of [-1, 1] images (on the CPU) and their mean PSNR (8-bit levels, as the
    official evaluation)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    recon = torch.cat([model(batch.to(device), inject_noise=False, return_dict=False)[0].float().cpu()
                       for batch in images.split(batch_size)])
    model.train(was_training)
    return recon, psnr((recon + 1) / 2, (images + 1) / 2).mean().item()


def main(args: argparse.Namespace) -> dict:
    start_time = time.time()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=args.report_to, project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # else every CPU step page-faults its activations back in (10-15% of a step)
    set_seed(args.seed)
    device = accelerator.device

    # ---- models: the autoencoder, the frozen semantic teacher, LPIPS, the discriminator ----------------------
    with accelerator.main_process_first():  # a hub download happens once
        model = build_autoencoder(args)
    train_encoder = args.stage >= 2
    model.encoder.requires_grad_(train_encoder)
    if model.config.encoder_token_norm == "layernorm_no_affine":
        model.encoder.backbone.norm.requires_grad_(False)  # its affine weights are unused (no grad, so no DDP sync)
    teacher = None
    if train_encoder and args.semantic_weight > 0:
        # The semantic target is the INITIAL encoder: the pretrained file if given, else the starting weights.
        teacher = make_teacher(model.encoder)
        if args.pretrained_encoder is not None:
            load_encoder_weights(teacher, args.pretrained_encoder)
        teacher.to(device)
    lpips = None
    if args.lpips_weight > 0:
        lpips = LPIPS(args.lpips_vgg_weights, args.lpips_linear_weights).to(device)
    discriminator = None
    if args.stage == 3:
        discriminator = DinoDiscriminator(**(args.discriminator_config or {}))
        if args.discriminator_weights:
            discriminator.load_backbone_weights(args.discriminator_weights)
        else:
            logger.warning("discriminator with a RANDOM backbone (--discriminator_random_backbone): tests only")

    # ---- data ---------------------------------------------------------------------------------------------
    train_dataset, validation_images = load_datasets(args, model.config.image_size)
    if len(train_dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(f"{len(train_dataset)} training images are fewer than one global batch "
                         f"({args.train_batch_size} x {accelerator.num_processes} processes)")
    train_dataloader = accelerator.prepare(DataLoader(
        train_dataset, batch_size=args.train_batch_size, sampler=EpochShuffleSampler(train_dataset, args.seed),
        drop_last=True, num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available()))
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    # ---- optimisers: encoder with its own LR; the prepared scheduler steps once per process ----------------
    def schedule(optimizer, total_steps):
        n = accelerator.num_processes
        return get_lr_scheduler(args.lr_scheduler, optimizer, args.lr_warmup_steps * n, max(total_steps, 1) * n,
                                args.lr_final_ratio)

    betas, groups = (args.adam_beta1, args.adam_beta2), [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")],
         "lr": args.learning_rate}]
    if train_encoder:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad],
                       "lr": args.learning_rate * args.encoder_lr_ratio})
    # fused AdamW: one kernel per step instead of the for-loop's passes with full-size temporaries (see train_dit.py).
    optimizer = torch.optim.AdamW(groups, betas=betas, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  fused=True)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, schedule(optimizer, max_train_steps))
    uae = accelerator.unwrap_model(model)
    trained_models = [model]
    if discriminator is not None:
        d_optimizer = torch.optim.AdamW([p for p in discriminator.parameters() if p.requires_grad],
                                        lr=args.discriminator_learning_rate, betas=betas,
                                        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=True)
        # The D schedule counts D updates, which begin at --discriminator_start_step.
        d_scheduler = schedule(d_optimizer, max_train_steps - args.discriminator_start_step)
        discriminator, d_optimizer, d_scheduler = accelerator.prepare(discriminator, d_optimizer, d_scheduler)
        trained_models.append(discriminator)
        disc = accelerator.unwrap_model(discriminator)
        gan_schedule = GANLossSchedule(args.discriminator_start_step, args.gan_start_step, args.gan_weight)
        diffaugment = DiffAugment(cutout_ratio=args.diffaugment_cutout)
    ema = EMA(uae, args.ema_decay) if args.use_ema else None

    # Every random draw of a training step (band noise on the device, DiffAugment on the CPU) comes from these.
    noise_generator, augment_generator = torch.Generator(device), torch.Generator()

    # ---- checkpoint hooks: the autoencoder and its EMA as from_pretrained folders ---------------------------
    # models[0] is the autoencoder (prepared first); accelerate keeps saving and loading the discriminator itself.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            uae.save_pretrained(os.path.join(output_dir, "autoencoder"))
            if ema is not None:
                ema.model.save_pretrained(os.path.join(output_dir, "autoencoder_ema"))
        if weights:
            weights.pop(0)

    def load_model_hook(models, input_dir):
        models.pop(0)
        uae.load_state_dict(AutoencoderUAE.from_pretrained(os.path.join(input_dir, "autoencoder")).state_dict())
        if ema is not None:
            ema.model.load_state_dict(
                AutoencoderUAE.from_pretrained(os.path.join(input_dir, "autoencoder_ema")).state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    global_step, resume_path = 0, resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        accelerator.load_state(resume_path)
        global_step = checkpoint_step(resume_path)
        logger.info(f"resumed from {resume_path} at step {global_step}")
    if args.report_to:
        accelerator.init_trackers(args.tracker_project_name, config={
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    # ---- validation: reconstructions grid + held-out PSNR -------------------------------------------------
    validation_path = os.path.join(args.output_dir, "validation.json")
    validation_log = []
    if resume_path is not None and os.path.isfile(validation_path):
        with open(validation_path) as file:
            validation_log = [entry for entry in json.load(file) if entry["step"] <= global_step]

    def validate():
        if validation_images is None or not accelerator.is_main_process:
            return
        recon, value = reconstruct(uae, validation_images, args.train_batch_size)
        entry, rows = {"step": global_step, "psnr": value}, [validation_images[:8], recon[:8]]
        if ema is not None:
            recon, entry["psnr_ema"] = reconstruct(ema.model, validation_images, args.train_batch_size)
            rows.append(recon[:8])
        save_image_grid(torch.cat(rows),
                        os.path.join(args.output_dir, "validation", f"step-{global_step:07d}.png"),
                        nrow=min(8, len(validation_images)))
        validation_log.append(entry)
        write_json(validation_path, validation_log)
        accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=global_step)
        logger.info(f"validation at step {global_step}: {entry}")

    # ---- training loop ------------------------------------------------------------------------------------
    weights = {"l1": args.l1_weight, "lpips": args.lpips_weight, "semantic": args.semantic_weight}
    logger.info(f"stage {args.stage}: {len(train_dataset)} images, {steps_per_epoch} steps/epoch, "
                f"{max_train_steps} steps, band noise {args.band_noise}")
    if global_step == 0:
        validate()
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc=f"stage {args.stage}")
    first_epoch, batches_to_skip = resume_position(global_step, len(train_dataloader), args.gradient_accumulation_steps)
    logs = {}
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        train_dataloader.set_epoch(epoch)  # before skip_first_batches: it must reach the shared sampler
        loader, skipped = train_dataloader, 0
        if epoch == first_epoch and batches_to_skip:
            loader, skipped = accelerator.skip_first_batches(train_dataloader, batches_to_skip), batches_to_skip
        for batch_index, (images, _) in enumerate(loader, start=skipped):
            seed = batch_seed(args.seed, epoch, batch_index, accelerator.process_index)
            noise_generator.manual_seed(seed)
            augment_generator.manual_seed(seed)
            with accelerator.accumulate(*trained_models):
                # A tuple: accelerate's mixed-precision output conversion cannot rebuild a UAEOutput.
                reconstruction, _, bands = model(images, args.band_noise, return_dict=False, generator=noise_generator)
                losses = {"l1": l1_reconstruction_loss(reconstruction, images)}
                if lpips is not None:
                    losses["lpips"] = lpips(reconstruction.float(), images)
                if teacher is not None:
                    with torch.no_grad(), accelerator.autocast():
                        teacher_bands = uae.split_bands(teacher(images).float())
                    losses["semantic"] = semantic_band_loss(bands.float(), teacher_bands, args.num_base_bands)
                reconstruction_loss = sum(weights[name] * loss for name, loss in losses.items())
                total_loss = reconstruction_loss
                adversarial_weight = gan_schedule.generator_adversarial_weight(global_step) if discriminator else 0.0
                if adversarial_weight > 0:
                    # D is a fixed function for the G loss: eval mode (no spectral-norm power step), no param grads.
                    disc.eval().requires_grad_(False)
                    with accelerator.autocast():
                        losses["generator"] = hinge_generator_loss(disc(diffaugment(reconstruction, augment_generator)))
                    disc.train().heads.requires_grad_(True)
                    losses["adaptive_weight"] = adaptive_generator_weight(
                        reconstruction_loss, losses["generator"], uae.decoder.pred.weight)
                    total_loss = total_loss + adversarial_weight * losses["adaptive_weight"] * losses["generator"]
                accelerator.backward(total_loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                if discriminator is not None and gan_schedule.update_discriminator(global_step):
                    real, fake = diffaugment.augment_pair(
                        images, quantize_to_uint8_grid(reconstruction.detach()), generator=augment_generator)
                    # One forward over real + fake: DDP expects one forward per backward.
                    logits_real, logits_fake = discriminator(torch.cat([real, fake])).chunk(2)
                    losses["discriminator"] = hinge_discriminator_loss(logits_real, logits_fake)
                    accelerator.backward(losses["discriminator"])
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
                    d_optimizer.step()
                    d_scheduler.step()
                    d_optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                if ema is not None:
                    ema.update(uae)
                global_step += 1
                progress.update(1)
                values = accelerator.reduce(torch.stack([v.detach().float() for v in losses.values()]), "mean")
                logs = {**dict(zip(losses, values.tolist())), "lr": lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                if global_step % args.validation_steps == 0 or global_step == max_train_steps:
                    validate()
                if global_step >= max_train_steps:
                    break
    progress.close()

    # ---- final model: the EMA weights when --use_ema, loadable by AutoencoderUAE.from_pretrained ----------
    accelerator.wait_for_everyone()
    summary = {
        "stage": args.stage, "global_step": global_step, "max_train_steps": max_train_steps,
        "num_processes": accelerator.num_processes, "saved_weights": "ema" if ema is not None else "model",
        "init_from": args.init_from, "resumed_from": resume_path, "band_noise": args.band_noise,
        "trained": ["decoder", "modulator"] + ["encoder"] * train_encoder + ["discriminator"] * (args.stage == 3),
        "losses": sorted(set(logs) - {"lr", "adaptive_weight"}), "last_logs": logs,
        "validation": validation_log, "wall_time_s": round(time.time() - start_time, 1),
    }
    if accelerator.is_main_process:
        (ema.model if ema is not None else uae).save_pretrained(args.output_dir)
        write_json(os.path.join(args.output_dir, "training_summary.json"), summary)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main(parse_args())
