"""Sample a UAEDiTPipeline for evaluation: one PNG per sample, then one ADM npz, on any number of processes.

    accelerate launch --num_processes 8 eval/sample.py --pipeline PIPELINE_DIR --output_dir samples \
        --num_samples 50000 --label_sampling balanced --guidance_scale 1.0 --num_inference_steps 50

The full list of `num_samples` labels comes from `--global_seed` alone (balanced: exactly num_samples /
num_classes per class, shuffled; random: uniform draws as DiT's sample_ddp.py). Sample i uses label[i] and
initial noise from its own CPU generator seeded by (global_seed, i) (the same noise on any device), so the set of
(label, seed) pairs, and hence the images, do not depend on the number of processes; process `rank` of `world`
takes the indices i % world == rank.
Each sample is written as `{i:06d}.png` under `output_dir/RUN_NAME/`; a rerun skips PNGs that exist (resume).
When all are present the main process packs `output_dir/RUN_NAME.npz` (arr_0 uint8 N,H,W,3 in index order,
arr_1 labels), the file ADM's evaluator and eval/evaluate_generation.py read, plus `RUN_NAME.json` with every
setting. RUN_NAME records every sampling setting, so runs with different settings never share PNGs.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm.auto import tqdm

from uae_gen import UAEDiTPipeline
from uae_gen.data import balanced_class_labels, random_class_labels
from uae_gen.metrics import images_to_uint8, save_samples_npz
from uae_gen.training import (
    add_attention_backend_argument,
    add_compile_arguments,
    check_device_arguments,
    compile_module,
    run_device_type,
)

LABEL_SAMPLERS = {"balanced": balanced_class_labels, "random": random_class_labels}
SOLVERS = ("euler", "heun", "rk4")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="UAEDiTPipeline directory (save_pretrained) or hub name.")
    parser.add_argument("--output_dir", required=True, help="Folder for RUN_NAME/ (PNGs), RUN_NAME.npz, RUN_NAME.json.")
    parser.add_argument("--num_samples", type=int, default=50000)
    parser.add_argument("--label_sampling", choices=sorted(LABEL_SAMPLERS), default="balanced")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale (1 = no guidance).")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_LO", "T_HI"),
                        help="Times (1 = noise) where guidance applies.")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--solver", choices=SOLVERS, default=None,
                        help="ODE solver; default: the one in the pipeline's scheduler config.")
    parser.add_argument("--per_proc_batch_size", type=int, default=32)
    parser.add_argument("--global_seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="Model weights dtype (the ODE state stays float32).")
    add_attention_backend_argument(parser)
    add_compile_arguments(parser, "transformer and the autoencoder's decoder")
    args = parser.parse_args(argv)
    # xformers without the package or off CUDA fails here, before the pipeline loads (precision is --dtype's).
    check_device_arguments(args, run_device_type(), mixed_precision="no")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.per_proc_batch_size < 1:
        parser.error(f"--per_proc_batch_size must be at least 1, got {args.per_proc_batch_size}")
    if args.num_inference_steps < 1:
        parser.error(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
    low, high = args.guidance_interval
    if not 0.0 <= low <= high <= 1.0:
        parser.error(f"--guidance_interval must satisfy 0 <= T_LO <= T_HI <= 1, got {low} {high}")
    return args


def run_name(args: argparse.Namespace, solver: str) -> str:
    """Every setting that changes the pixels, e.g. `mypipe-n50000-balanced-cfg1.5-gi0.0-0.7-steps50-euler-seed0`."""
    low, high = args.guidance_interval
    model = Path(args.pipeline.rstrip("/")).name
    return (f"{model}-n{args.num_samples}-{args.label_sampling}-cfg{args.guidance_scale:g}-gi{low:g}-{high:g}"
            f"-steps{args.num_inference_steps}-{solver}-seed{args.global_seed}-{args.dtype}")


def sample_seed(global_seed: int, index: int) -> int:
    """The noise seed of sample `index`: a hash of (global_seed, index), independent of rank and batch."""
    return int(np.random.SeedSequence([global_seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def save_png(image: np.ndarray, path: Path) -> None:
    # Temporary name then rename: an interrupted run never leaves a truncated PNG that resume would keep.
    temporary = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(temporary, format="PNG")
    os.replace(temporary, path)


def main(args: argparse.Namespace) -> dict:
    # PartialState (unlike Accelerator) does not read ACCELERATE_USE_CPU itself; without cpu=True a CPU-only launch
    # would give every rank a world of one.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    dtype = getattr(torch, args.dtype)
    pipe = UAEDiTPipeline.from_pretrained(args.pipeline, torch_dtype=dtype).to(state.device)
    pipe.set_progress_bar_config(disable=True)
    if args.attention_backend is not None:
        pipe.set_attention_backend(args.attention_backend)
    if args.compile:  # in place; the first batch compiles, the rest reuse it (a smaller last batch recompiles)
        compile_module(pipe.transformer, args.compile_mode)
        compile_module(pipe.vae.decoder, args.compile_mode)
    if args.solver is not None:
        pipe.scheduler.register_to_config(solver=args.solver)
    solver = pipe.scheduler.config.solver
    num_classes = pipe.transformer.config.num_classes

    labels = LABEL_SAMPLERS[args.label_sampling](args.num_samples, num_classes, seed=args.global_seed)
    name = run_name(args, solver)
    output_dir = Path(args.output_dir)
    sample_dir = output_dir / name
    sample_dir.mkdir(parents=True, exist_ok=True)

    mine = range(state.process_index, args.num_samples, state.num_processes)
    todo = [i for i in mine if not (sample_dir / f"{i:06d}.png").exists()]
    progress = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sampling {name}", unit="img",
                    disable=not state.is_main_process)
    for start in range(0, len(todo), args.per_proc_batch_size):
        batch = todo[start:start + args.per_proc_batch_size]
        generators = [torch.Generator().manual_seed(sample_seed(args.global_seed, i)) for i in batch]
        images = pipe(class_labels=labels[batch], guidance_scale=args.guidance_scale,
                      guidance_interval=tuple(args.guidance_interval), num_inference_steps=args.num_inference_steps,
                      generator=generators, output_type="pt").images
        for index, image in zip(batch, images_to_uint8(images)):
            save_png(image, sample_dir / f"{index:06d}.png")
        progress.update(len(batch))
    progress.close()
    state.wait_for_everyone()

    npz_path, settings_path = output_dir / f"{name}.npz", output_dir / f"{name}.json"
    settings = {
        "run_name": name,
        "pipeline": args.pipeline,
        "num_samples": args.num_samples,
        "num_classes": num_classes,
        "label_sampling": args.label_sampling,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": list(args.guidance_interval),
        "num_inference_steps": args.num_inference_steps,
        "solver": solver,
        "scheduler": dict(pipe.scheduler.config),
        "global_seed": args.global_seed,
        "noise_seed": "numpy SeedSequence([global_seed, index]), one generator per sample",
        "dtype": args.dtype,
        "attention_backend": args.attention_backend or pipe.transformer.config.attention_backend,
        "compile": args.compile_mode if args.compile else None,
        "num_processes": state.num_processes,
        "per_proc_batch_size": args.per_proc_batch_size,
        "sample_dir": str(sample_dir),
        "npz": str(npz_path),
    }
    if state.is_main_process:
        images = np.stack([np.asarray(Image.open(sample_dir / f"{i:06d}.png").convert("RGB"))
                           for i in tqdm(range(args.num_samples), desc="packing npz", unit="img")])
        save_samples_npz(npz_path, images, labels.numpy())
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
        print(f"wrote {npz_path} {images.shape} and {settings_path}")
    state.wait_for_everyone()
    return settings


if __name__ == "__main__":
    main(parse_args())
