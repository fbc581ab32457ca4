"""The ``uae-gen`` command: ``demo`` (train, sample and score a tiny UAE + DiT offline), ``generate`` (a sample
grid from a pipeline directory), ``serve`` (a local web playground for a pipeline directory) and ``convert``
(released checkpoints -> uae_gen directories)."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys


def add_generate_parser(subparsers) -> None:
    from uae_gen.flow import SOLVERS

    p = subparsers.add_parser("generate", help="sample a grid of class-conditional images from a pipeline dir")
    p.add_argument("--pipeline", required=True, help="directory written by UAEDiTPipeline.save_pretrained")
    p.add_argument("--class-labels", nargs="+", required=True, help="class ids or names (quote names)")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="times (in the scheduler's shifted time) in which guidance applies")
    p.add_argument("--guidance", choices=["cfg", "autoguidance"], default="cfg")
    p.add_argument("--steps", type=int, default=50, help="solver steps")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="ODE solver (default: the one in the pipeline's scheduler config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: all in one row)")
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.set_defaults(run=run_generate)


def run_generate(args) -> None:
    import torch

    from uae_gen import UAEDiTPipeline
    from uae_gen.training.image_grid import save_image_grid

    pipe = UAEDiTPipeline.from_pretrained(args.pipeline).to(args.device)
    if args.solver is not None:
        pipe.scheduler.register_to_config(solver=args.solver)
    labels = [int(c) if c.lstrip("-").isdigit() else c for c in args.class_labels]
    images = pipe(
        class_labels=labels, guidance_scale=args.guidance_scale, guidance_interval=tuple(args.guidance_interval),
        guidance=args.guidance, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    ).images
    save_image_grid(images, args.out, nrow=args.nrow or len(images), value_range=(0, 1))
    print(f"wrote {len(images)} images to {args.out}")


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="a local web playground for a pipeline dir (needs the [app] extra)")
    p.add_argument("--pipeline", required=True, help="directory written by UAEDiTPipeline.save_pretrained")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves the whole network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-images", type=int, default=8, help="most images one request may ask for")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait; more are turned away with a busy message")
    p.set_defaults(run=run_serve)


def run_serve(args) -> None:
    try:
        import gradio  # noqa: F401  (the optional [app] extra)
    except ImportError as error:
        raise SystemExit('uae-gen serve: error: Gradio is not installed; it comes with the optional "app" extra: '
                         'pip install -e ".[app]"') from error
    from uae_gen.serve import serve

    serve(args.pipeline, host=args.host, port=args.port, device=args.device, max_images=args.max_images,
          max_queue=args.max_queue)


def positive_minutes(value: str) -> float:
    """--minutes: a finite number above 0."""
    try:
        minutes = float(value)
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and minutes > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {value!r}")
    return minutes


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, sample and score a tiny UAE + DiT on built-in data (CPU, offline)")
    p.add_argument("--out", default="uae_gen_demo", help="output directory")
    p.add_argument("--minutes", type=positive_minutes, default=12.0,
                   help="wall-clock budget of the whole command: the demo times this machine first and sizes "
                   "every phase to end within it (the plan is printed before training)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_demo)


def run_demo(args) -> None:
    import psutil  # an accelerate dependency

    from uae_gen.demo import run_demo as demo

    # The budget counts from the command's start: the interpreter and its imports come before this function.
    demo(out_dir=args.out, minutes=args.minutes, seed=args.seed, started=psutil.Process().create_time())


def add_convert_parser(subparsers) -> None:
    from uae_gen.convert import LAYOUTS

    p = subparsers.add_parser(
        "convert", help="released checkpoints (diffusers AutoencoderRAE, UAE v1/v2, RAE/UAE DiT-DH) -> directories "
        "that AutoencoderUAE / UAEDiT .from_pretrained load",
    )
    p.add_argument("--from", dest="layout", required=True, choices=LAYOUTS, help="layout of SRC")
    p.add_argument("src", help="checkpoint file (.pt / .safetensors), or for rae-diffusers a directory or hub id")
    p.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--stats", default=None, help="latent statistics file with 'mean' and 'var' (stat.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config value the weights do not determine, VALUE as JSON (repeatable), e.g. "
                   "dct_lowpass_coefficients=64 or decoder_num_heads=16")
    p.set_defaults(run=run_convert)


def parse_overrides(items: list[str]) -> dict:
    """["KEY=VALUE", ...] -> {KEY: json.loads(VALUE)}; a VALUE that is not JSON stays a string."""
    import json

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_convert(args) -> None:
    from uae_gen.convert import convert_checkpoint

    model = convert_checkpoint(args.layout, args.src, args.dst, stats=args.stats, overwrite=args.overwrite,
                               config_overrides=parse_overrides(args.overrides))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"wrote {type(model).__name__} ({millions:.1f}M parameters) to {args.dst}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="uae-gen", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(subparsers)
    add_generate_parser(subparsers)
    add_serve_parser(subparsers)
    add_convert_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as error:  # the last: a training script
        print(f"uae-gen {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
