"""Train the UAE tokenizer (AutoencoderUAE) in three stages with HF Accelerate.

    accelerate launch -m uae_gen.scripts.train_tokenizer --config imagenet256 --stage 1 --output_dir runs/uae-s1 ...

(`accelerate launch train/train_tokenizer.py ...` in a checkout runs this module too.)

Stages (method.md 2.1, the released v1 recipe folded into three runs; each starts from the previous output):
  1. decoder + band modulator train on the frozen pretrained encoder; loss: pixel L1 (+ LPIPS).
  2. + the encoder trains (its own LR, --encoder_lr_ratio); + the semantic band loss: bands k < --num_base_bands of
     the encoder's latent are pulled towards the same bands of a frozen teacher (the initial encoder).
  3. + band-limited noise on the high bands (--band_noise) + GAN: DINO discriminator on DiffAugment-ed images,
     hinge D loss with D updates from --discriminator_start_step, -E[D(x_hat)] G loss scaled by the adaptive weight
     (last decoder layer) from --gan_start_step. The discriminator has its own AdamW and LR schedule.

Flags follow the diffusers example scripts; --config loads a preset JSON from uae_gen/configs (its top-level
keys, then its "stages"/"<N>" keys, are flag defaults; flags given on the command line win).

Where this differs from the official v1 code (method.md section 6): the loss is computed through the
accelerate-wrapped model, so DDP all-reduces the gradients; the output dir holds the EMA weights when --use_ema,
and the next stage's --init_from starts from them (v1 chained the non-EMA weights); warmup ramps the LR from 0;
checkpoints are step-numbered and atomic. Exact resume: `resumed_batches` restores the data order and position;
every random draw of a micro-batch (band noise, DiffAugment) comes from two
generators re-seeded from (seed, epoch, batch, rank), so a resumed run makes the same draws. Checkpoints hold the
optimisers, schedulers and the discriminator (accelerate's files), plus the live autoencoder and its EMA as
`from_pretrained` folders `autoencoder/` and `autoencoder_ema/` (safetensors, not a pickle of the EMA).
"""

import argparse
import json
import os
import shutil
import time

import torch
from accelerate.logging import get_logger
from torch.utils.data import Subset
from tqdm.auto import tqdm

from uae_gen.data import ImageFolderDataset, load_demo_digits
from uae_gen.losses import LPIPS, DiffAugment, DinoDiscriminator, GANLossSchedule, adaptive_generator_weight
from uae_gen.losses import hinge_discriminator_loss, hinge_generator_loss, l1_reconstruction_loss
from uae_gen.losses import quantize_to_uint8_grid, semantic_band_loss
from uae_gen.metrics import psnr
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.models.encoders import load_encoder_weights, make_teacher
from uae_gen.training import EMA, LossLogger, backward_and_step, batch_seed, resumed_batches
from uae_gen.training import add_training_arguments, check_training_arguments, parse_args_with_preset, read_preset
from uae_gen.training import make_accelerator, make_adamw, make_lr_scheduler, make_train_dataloader
from uae_gen.training import register_pretrained_hooks, resume_from_checkpoint, save_checkpoint
from uae_gen.training import compile_module, make_readable, save_image_grid, write_json

logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add, flag = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", type=int, choices=(1, 2, 3), required=True, help="1 decoder, 2 + encoder/semantic, 3 + noise/GAN")
    add_training_arguments(p)  # preset, optimiser, LR schedule, EMA, precision, checkpoints, logging
    # model
    add("--init_from", help="previous stage's output dir (AutoencoderUAE.from_pretrained)")
    add("--model_preset", default="imagenet256-dinov2-b", help="AutoencoderUAE preset when not --init_from")
    add("--model_config", type=json.loads, default=None, help="JSON dict of AutoencoderUAE overrides (fresh model)")
    add("--pretrained_encoder", help="initial encoder weights (timm hub name or local file) when not --init_from; "
        "when given, also the semantic teacher's weights")
    add("--random_encoder", action=flag, default=False, help="allow a random initial encoder (tests / demo only)")
    add("--encoder_lr_ratio", type=float, default=1.0, help="encoder LR = ratio * learning_rate (stages 2-3)")
    # data
    add("--dataset", choices=("demo-digits",), help="built-in offline set (train / heldout splits)")
    add("--train_data_dir", help="ImageFolder root (root/<class>/*.jpg)")
    add("--validation_data_dir", help="held-out ImageFolder root (default for demo-digits: its heldout split)")
    add("--max_train_samples", type=int, help="use only the first N training images")
    add("--num_validation_images", type=int, default=64, help="held-out images for the validation PSNR")
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
    p.set_defaults(validation_steps=500, tracker_project_name="uae-tokenizer")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    def load_preset(args):
        """Top-level keys, then those of stages[str(stage)]."""
        preset = read_preset(args.config, "tokenizer_")
        values = {**preset, **preset.get("stages", {}).get(str(args.stage), {})}
        return {k: v for k, v in values.items() if k != "stages" and not k.startswith("_")}

    args = parse_args_with_preset(build_parser(), argv, load_preset, forbidden=("stage",))
    check_training_arguments(args)
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
    if args.num_validation_images < 1:
        raise ValueError(f"--num_validation_images must be at least 1, got {args.num_validation_images}")
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


def enable_gradient_checkpointing(model: AutoencoderUAE, train_encoder: bool) -> None:
    """Recompute the ViT decoder's blocks (diffusers' switch) and, when the encoder trains, the encoder's blocks
    (timm's switch, non-reentrant) in the backward pass."""
    model.enable_gradient_checkpointing()
    if train_encoder:
        model.encoder.backbone.set_grad_checkpointing(True)


def build_teacher(args, encoder):
    """The frozen semantic target: the INITIAL encoder (the pretrained file if given, else the starting weights)."""
    teacher = make_teacher(encoder)
    if args.pretrained_encoder is not None:
        load_encoder_weights(teacher, args.pretrained_encoder)
    return teacher


def build_discriminator(args) -> DinoDiscriminator:
    discriminator = DinoDiscriminator(**(args.discriminator_config or {}))
    if args.discriminator_weights:
        discriminator.load_backbone_weights(args.discriminator_weights)
    else:
        logger.warning("discriminator with a RANDOM backbone (--discriminator_random_backbone): tests only")
    return discriminator


def validate(args, accelerator, uae: AutoencoderUAE, ema, images: torch.Tensor, step: int, log: list) -> None:
    """Held-out PSNR of the model (and its EMA) and a grid of originals / reconstructions, on the main process;
    appended to `log`, which is written to output_dir/validation.json."""
    if images is None or not accelerator.is_main_process:
        return
    recon, value = reconstruct(uae, images, args.train_batch_size)
    entry, rows = {"step": step, "psnr": value}, [images[:8], recon[:8]]
    if ema is not None:
        recon, entry["psnr_ema"] = reconstruct(ema.model, images, args.train_batch_size)
        rows.append(recon[:8])
    save_image_grid(torch.cat(rows), os.path.join(args.output_dir, "validation", f"step-{step:07d}.png"),
                    nrow=min(8, len(images)))
    log.append(entry)
    write_json(os.path.join(args.output_dir, "validation.json"), log)
    accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=step)
    logger.info(f"validation at step {step}: {entry}")


def read_validation_log(args, resume_path, global_step: int) -> list:
    """The entries of output_dir/validation.json up to global_step when resuming, else []."""
    path = os.path.join(args.output_dir, "validation.json")
    if resume_path is None or not os.path.isfile(path):
        return []
    with open(path) as file:
        return [entry for entry in json.load(file) if entry["step"] <= global_step]


def save_weights(model: AutoencoderUAE, output_dir: str) -> None:
    """save_pretrained into a temp folder inside output_dir, then move each file into place (one atomic rename
    each), readable like any new file."""
    temp_dir = os.path.join(output_dir, ".tmp-weights")
    shutil.rmtree(temp_dir, ignore_errors=True)
    model.save_pretrained(temp_dir)
    make_readable(temp_dir)
    for name in os.listdir(temp_dir):
        os.replace(os.path.join(temp_dir, name), os.path.join(output_dir, name))
    os.rmdir(temp_dir)


def main(args: argparse.Namespace) -> dict:
    start_time = time.time()
    accelerator = make_accelerator(args)
    device = accelerator.device

    # ---- models: the autoencoder, the frozen semantic teacher, LPIPS, the discriminator ----------------------
    with accelerator.main_process_first():  # a hub download happens once
        model = build_autoencoder(args)
    train_encoder = args.stage >= 2
    model.encoder.requires_grad_(train_encoder)
    if model.config.encoder_token_norm == "layernorm_no_affine":
        model.encoder.backbone.norm.requires_grad_(False)  # its affine weights are unused (no grad, so no DDP sync)
    teacher = build_teacher(args, model.encoder).to(device) if train_encoder and args.semantic_weight > 0 else None
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model, train_encoder)
    lpips = LPIPS(args.lpips_vgg_weights, args.lpips_linear_weights).to(device) if args.lpips_weight > 0 else None
    discriminator = build_discriminator(args) if args.stage == 3 else None

    # ---- data ---------------------------------------------------------------------------------------------
    train_dataset, validation_images = load_datasets(args, model.config.image_size)
    train_dataloader, steps_per_epoch, max_train_steps = make_train_dataloader(accelerator, train_dataset, args)

    # ---- optimisers: encoder with its own LR; the discriminator with its own AdamW and schedule -------------
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")],
               "lr": args.learning_rate}]
    if train_encoder:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad],
                       "lr": args.learning_rate * args.encoder_lr_ratio})
    optimizer = make_adamw(groups, args)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator, max_train_steps, steps_per_epoch)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    uae = accelerator.unwrap_model(model)
    trained_models = [model]
    if discriminator is not None:
        d_optimizer = make_adamw([p for p in discriminator.parameters() if p.requires_grad], args,
                                 args.discriminator_learning_rate)
        # The D schedule counts D updates, which begin at --discriminator_start_step.
        d_scheduler = make_lr_scheduler(d_optimizer, args, accelerator,
                                        max_train_steps - args.discriminator_start_step, steps_per_epoch)
        discriminator, d_optimizer, d_scheduler = accelerator.prepare(discriminator, d_optimizer, d_scheduler)
        trained_models.append(discriminator)
        disc = accelerator.unwrap_model(discriminator)
        gan_schedule = GANLossSchedule(args.discriminator_start_step, args.gan_start_step, args.gan_weight)
        diffaugment = DiffAugment(cutout_ratio=args.diffaugment_cutout)
    ema = EMA(uae, args.ema_decay) if args.use_ema else None
    if args.compile:
        # The encoder and decoder ViTs, in place and after the EMA copy (which stays eager); the band split and
        # modulator between them take a torch.Generator, which dynamo cannot trace, so they stay eager too.
        for module in [uae.encoder, uae.decoder] + ([teacher] if teacher is not None else []):
            compile_module(module, args.compile_mode)
    # Every random draw of a training step (band noise on the device, DiffAugment on the CPU) comes from these.
    noise_generator, augment_generator = torch.Generator(device), torch.Generator()
    register_pretrained_hooks(accelerator, uae, ema, "autoencoder")  # checkpoint-N/autoencoder{,_ema}/
    global_step, resume_path = resume_from_checkpoint(accelerator, args)
    validation_log = read_validation_log(args, resume_path, global_step)

    # ---- training loop ------------------------------------------------------------------------------------
    weights = {"l1": args.l1_weight, "lpips": args.lpips_weight, "semantic": args.semantic_weight}
    logger.info(f"stage {args.stage}: {len(train_dataset)} images, {steps_per_epoch} steps/epoch, "
                f"{max_train_steps} steps, band noise {args.band_noise}")
    if global_step == 0:
        validate(args, accelerator, uae, ema, validation_images, global_step, validation_log)
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc=f"stage {args.stage}")
    loss_log = LossLogger(accelerator, progress, args.logging_steps, max_train_steps)
    for epoch, batch_index, (images, _) in resumed_batches(accelerator, train_dataloader, global_step,
                                                           max_train_steps):
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
            backward_and_step(accelerator, total_loss, model, optimizer, lr_scheduler, args.max_grad_norm)
            if accelerator.sync_gradients and ema is not None:
                ema.update(uae)

            if discriminator is not None and gan_schedule.update_discriminator(global_step):
                real, fake = diffaugment.augment_pair(
                    images, quantize_to_uint8_grid(reconstruction.detach()), generator=augment_generator)
                # One forward over real + fake: DDP expects one forward per backward.
                logits_real, logits_fake = discriminator(torch.cat([real, fake])).chunk(2)
                losses["discriminator"] = hinge_discriminator_loss(logits_real, logits_fake)
                backward_and_step(accelerator, losses["discriminator"], discriminator, d_optimizer, d_scheduler,
                                  args.max_grad_norm)
        loss_log.add(losses)
        if accelerator.sync_gradients:
            global_step += 1
            loss_log.step(global_step, lr_scheduler.get_last_lr()[0])
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if global_step % args.validation_steps == 0 or global_step == max_train_steps:
                validate(args, accelerator, uae, ema, validation_images, global_step, validation_log)
    progress.close()

    # ---- final model: the EMA weights when --use_ema, loadable by AutoencoderUAE.from_pretrained ----------
    accelerator.wait_for_everyone()
    summary = {
        "stage": args.stage, "global_step": global_step, "max_train_steps": max_train_steps,
        "num_processes": accelerator.num_processes, "saved_weights": "ema" if ema is not None else "model",
        "init_from": args.init_from, "resumed_from": resume_path, "band_noise": args.band_noise,
        "trained": ["decoder", "modulator"] + ["encoder"] * train_encoder + ["discriminator"] * (args.stage == 3),
        "losses": sorted(set(loss_log.last_logs) - {"lr", "adaptive_weight"}), "last_logs": loss_log.last_logs,
        "validation": validation_log, "wall_time_s": round(time.time() - start_time, 1),
    }
    if accelerator.is_main_process:
        save_weights(ema.model if ema is not None else uae, args.output_dir)
        write_json(os.path.join(args.output_dir, "training_summary.json"), summary)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main(parse_args())
