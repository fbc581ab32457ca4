"""When does a UAEDiTPipeline's sampler settle each frequency band? Decodes of the clean latent the model predicts
along the way, and, per band, the distance of that prediction to the final latent at every step.

    python eval/band_settling.py --pipeline uae_gen_demo/pipeline --class_labels 0 3 7 --out_dir band_settling

The sampler runs with Euler steps (one clock for all bands): step i moves x_i at time t_i to x_{i+1} at t_{i+1}
along the velocity v_i, so the clean latent predicted at step i is x_i - t_i v_i (the pipeline's predict_clean, the
latent its step_previews decode); the last step's prediction is the final latent up to t_N v (the grid ends at
t_N = 0.001). Band k of a latent is the autoencoder's split_bands of the raw (denormalised) latent, the split the
pipeline's band previews show. A band has settled once its distance
||band_k(prediction) - band_k(final)|| / ||band_k(final)|| is small; low-to-high generation settles band 0 first.

Writes to --out_dir: band_settling.png (one row per class label: the decoded prediction after each of
--num_shown evenly spaced steps, then the final image), band_settling_curves.png (distance per band against t)
and band_settling.json (every distance, the time grid and the settings).
"""

import argparse
import json
import os
from pathlib import Path

import torch

from uae_gen import FlowMatchBandScheduler, UAEDiTPipeline
from uae_gen.training import save_image_grid, write_json


@torch.no_grad()
def band_settling(pipe: UAEDiTPipeline, class_labels: list, num_inference_steps: int, guidance_scale: float,
                  seed: int) -> dict:
    """Sample `class_labels` with Euler steps; returns the time grid, the predicted clean latents (one per step)
    and the relative distance of each band of each prediction to the final latent (mean over the images)."""
    if pipe.scheduler.band_schedule.is_staggered:
        raise ValueError("band_settling reads one global time per step; this pipeline's bands run on staggered "
                         "clocks")
    pipe.scheduler = FlowMatchBandScheduler.from_config(pipe.scheduler.config, solver="euler")
    generator = torch.Generator().manual_seed(seed)
    start = pipe.prepare_latents(len(class_labels), pipe._execution_device, generator)
    states = [start]
    pipe(class_labels=class_labels, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
         latents=start, output_type="latent",
         callback_on_step_end=lambda p, i, t, tensors: states.append(tensors["latents"].clone()) or {})
    coefficients = pipe.clean_prediction_coefficients(range(num_inference_steps))
    predictions = [pipe.predict_clean(x, x_next, coefficients[i][0])
                   for i, (x, x_next) in enumerate(zip(states, states[1:]))]
    grid = pipe.scheduler.time_grid.cpu()
    vae = pipe.vae

    def bands(z):  # (B, K, C, h, w) of the raw latent
        return vae.split_bands(vae.denormalize_latents(z.to(vae.dtype))).float()

    final = bands(states[-1])
    norms = final.flatten(2).norm(dim=-1)
    distances = [((bands(z) - final).flatten(2).norm(dim=-1) / norms).mean(0).tolist() for z in predictions]
    return {"time_grid": grid.tolist(), "predictions": predictions, "final": states[-1], "band_distances": distances}


def save_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    times = result["time_grid"][:-1]
    for k, distances in enumerate(zip(*result["band_distances"])):
        axis.plot(times, distances, marker=".", label=f"band {k}")
    axis.set_xlabel("t at the step's start (1 = noise)")
    axis.set_ylabel("distance of the prediction to the final band")
    axis.invert_xaxis()
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    temp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temp, dpi=100)
    plt.close(figure)
    os.replace(temp, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a UAEDiTPipeline directory")
    parser.add_argument("--class_labels", nargs="+", required=True, help="class ids or names, one image each")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_shown", type=int, default=6, help="predictions shown per image in the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="band_settling")
    args = parser.parse_args(argv)
    if not 1 <= args.num_shown <= args.num_inference_steps:
        raise ValueError(f"--num_shown must lie in [1, --num_inference_steps={args.num_inference_steps}], "
                         f"got {args.num_shown}")
    args.class_labels = [int(c) if c.isdigit() else c for c in args.class_labels]
    return args


def main(args: argparse.Namespace) -> dict:
    pipe = UAEDiTPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    result = band_settling(pipe, args.class_labels, args.num_inference_steps, args.guidance_scale, args.seed)
    shown = torch.linspace(0, args.num_inference_steps - 1, args.num_shown).round().long().tolist()
    latents = torch.stack([result["predictions"][i] for i in shown] + [result["final"]], dim=1).flatten(0, 1)
    images = pipe.vae.decode(latents.to(pipe.vae.dtype)).sample.clamp(-1, 1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times = result["time_grid"]
    labels = [f"t={times[i]:.2f}" for i in shown] + ["final"]
    save_image_grid(images, str(out / "band_settling.png"), nrow=len(labels), labels=labels * len(args.class_labels))
    save_curves(result, out / "band_settling_curves.png")
    record = {"pipeline": args.pipeline, "class_labels": args.class_labels, "seed": args.seed,
              "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
              "shown_steps": shown, "time_grid": times, "band_distances": result["band_distances"]}
    write_json(str(out / "band_settling.json"), record)
    return record


if __name__ == "__main__":
    main(parse_args())
