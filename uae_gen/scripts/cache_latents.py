"""Encode a data set once with a frozen AutoencoderUAE into a latent cache for train_dit.py.

    accelerate launch -m uae_gen.scripts.cache_latents --vae path/to/uae --train_data_dir imagenet/train \
        --output_dir latents/imagenet256

(`accelerate launch train/cache_latents.py ...` in a checkout runs this module too.)

Each rank encodes a contiguous share of the data set (eval mode: no noise; the autoencoder's low-pass, if
any, applied) together with the mirrored images, and writes safetensors parts. The ranks' latent statistics
(per element by default, like the official ones) are merged, stored into the autoencoder, and the autoencoder is
saved inside the cache; `cache_info.json` is written last. Layout and estimators: uae_gen/data/latent_cache.py.
On GPUs, `--mixed_precision bf16` encodes under autocast and `--compile` compiles the encoder ViT.
"""

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from uae_gen.data import (
    ImageFolderDataset,
    LatentCacheWriter,
    LatentStatistics,
    finalize_latent_cache,
    load_demo_digits,
    remove_cache_files,
)
from uae_gen.data.latent_cache import CACHE_INFO, STATS_ESTIMATORS, STORAGE_DTYPES
from uae_gen.models.autoencoder_uae import AutoencoderUAE
from uae_gen.training import add_compile_arguments, check_device_arguments, compile_module


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", required=True, help="AutoencoderUAE directory (from_pretrained).")
    parser.add_argument("--output_dir", required=True, help="Cache folder to write.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", help="ImageNet-layout folder root/<class>/<image>.")
    source.add_argument("--dataset", choices=["demo-digits"], help="A built-in offline data set.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per encoder batch (per process).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--shard_size", type=int, default=4096, help="Samples per safetensors part.")
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float32", help="Storage dtype.")
    parser.add_argument("--latents_stats", choices=["per_element", "per_channel"], default="per_element")
    parser.add_argument("--stats_estimator", choices=STATS_ESTIMATORS, default="exact",
                        help="exact: whole-set mean/var; running: the official momentum-0.1 estimator.")
    parser.add_argument("--max_samples", type=int, default=None, help="Cache only the first N samples.")
    parser.add_argument("--seed", type=int, default=0, help="Appearance seed of --dataset demo-digits.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing cache in --output_dir.")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="Encode under autocast (default: the accelerate config); statistics stay float64.")
    add_compile_arguments(parser, "encoder ViT")
    args = parser.parse_args(argv)
    check_device_arguments(args)  # fp16 on the CPU: an error now, not a silent fp32 run
    if args.batch_size < 1 or args.shard_size < 1:
        parser.error("--batch_size and --shard_size must be positive")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max_samples must be positive")
    return args


def build_dataset(args, image_size: int):
    """(dataset of (image in [-1, 1], label), id2label) for the chosen source, un-flipped and centre-cropped."""
    if args.dataset == "demo-digits":
        dataset = load_demo_digits("train", image_size=image_size, seed=args.seed)
    else:
        dataset = ImageFolderDataset(args.train_data_dir, image_size, random_flip=False)
    id2label = dataset.id2label
    if args.max_samples is not None:
        dataset = Subset(dataset, range(min(args.max_samples, len(dataset))))
    return dataset, id2label


def main(args: argparse.Namespace) -> dict:
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    check_device_arguments(args, accelerator.device.type, accelerator.mixed_precision)
    started = time.time()
    if accelerator.is_main_process:
        if os.path.isfile(os.path.join(args.output_dir, CACHE_INFO)) and not args.overwrite:
            raise ValueError(f"{args.output_dir!r} already holds a latent cache; pass --overwrite to replace it")
        remove_cache_files(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    vae = AutoencoderUAE.from_pretrained(args.vae).eval().requires_grad_(False).to(accelerator.device)
    if args.compile:
        compile_module(vae.encoder, args.compile_mode)
    dataset, id2label = build_dataset(args, vae.config.image_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    share = Subset(dataset, range(rank * len(dataset) // world, (rank + 1) * len(dataset) // world))
    loader = DataLoader(share, batch_size=args.batch_size, shuffle=False, num_workers=args.dataloader_num_workers)

    writer = LatentCacheWriter(args.output_dir, rank, args.shard_size, args.dtype)
    statistics = LatentStatistics(args.latents_stats == "per_channel", args.stats_estimator)
    for images, labels in tqdm(loader, desc="encoding", disable=not accelerator.is_local_main_process):
        images = images.to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            latents = vae.encode_raw(torch.cat([images, images.flip(-1)]))
        latents, latents_flipped = latents.float().chunk(2)  # autocast may return bf16 / fp16
        statistics.update(latents)
        writer.add(latents, latents_flipped, labels)

    parts = gather_object(writer.close())  # every rank's list, concatenated in rank order = data-set order
    statistics.merge(gather_object([statistics.state()]))
    mean, std = statistics.mean_and_std()
    summary = {"num_samples": sum(p["num_samples"] for p in parts), "num_parts": len(parts), "world_size": world,
               "seconds": round(time.time() - started, 2), "cache_dir": args.output_dir}
    if accelerator.is_main_process:
        finalize_latent_cache(args.output_dir, parts, vae.to("cpu"), mean, std, id2label, args.stats_estimator,
                              args.dtype)
        print(json.dumps(summary))
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main(parse_args())
