"""The ``uae-gen`` command: ``demo`` (train, sample and score a tiny UAE + DiT offline), ``generate`` (a sample
grid from a pipeline directory) and ``convert`` (released checkpoints -> uae_gen directories)."""

from __future__ import annotations

import argparse
import sys


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample a grid of class-conditional images from a pipeline dir")
    p.add_argument("--pipeline", required=True, help="directory written by UAEDiTPipeline.save_pretrained")
    p.add_argument("--class-labels", nargs="+", required=True, help="class ids or names (quote names)")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--guidance", choices=["cfg", "autoguidance"], default="cfg")
    p.add_argument("--steps", type=int, default=50, help="solver steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: all in one row)")
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.set_defaults(run=run_generate)


def run_generate(args) -> None:
    import torch

    from uae_gen import UAEDiTPipeline
    from uae_gen.training.image_grid import save_image_grid

    pipe = UAEDiTPipeline.from_pretrained(args.pipeline)
    labels = [int(c) if c.lstrip("-").isdigit() else c for c in args.class_labels]
    images = pipe(
        class_labels=labels, guidance_scale=args.guidance_scale, guidance=args.guidance,
        num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed), output_type="pt",
    ).images
    save_image_grid(images, args.out, nrow=args.nrow or len(images), value_range=(0, 1))
    print(f"wrote {len(images)} images to {args.out}")


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, sample and score a tiny UAE + DiT on built-in data (CPU, offline)")
    p.add_argument("--out", default="uae_gen_demo", help="output directory")
    p.add_argument("--minutes", type=float, default=12.0, help="rough wall-clock budget for all training")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_demo)


def run_demo(args) -> None:
    from uae_gen.demo import run_demo as demo

    demo(out_dir=args.out, minutes=args.minutes, seed=args.seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="uae-gen", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(subparsers)
    add_generate_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"uae-gen {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
