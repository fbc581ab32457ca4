"""Cost of the band split + merge relative to the encoder it follows (target: <= 3% of a DINOv2-B/14 encode).

Both are timed in the same process on the same inputs: a DINOv2-B/14 (registers) forward at 224, batch 8, fp32,
and split + merge of its (8, 768, 16, 16) latent for each band transform. Prints a Markdown table and writes JSON.

    python bench/bench_bands.py --out bench_bands.json
"""

import argparse
import json
import statistics
import time

import torch

from uae_gen.models.bands import BandProjector
from uae_gen.models.encoders import SemanticEncoder


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_bands", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_bands.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder = SemanticEncoder("vit_base_patch14_reg4_dinov2", input_size=224).eval()
    images = torch.rand(args.batch_size, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        z = encoder(images)
        encode_ms = median_ms(lambda: encoder(images), args.repeats)
        rows = []
        for transform, shape in [("fft", "smooth"), ("fft", "hard_ring"), ("dct", "smooth")]:
            projector = BandProjector(16, 16, args.num_bands, transform, mask_shape=shape)
            ms = median_ms(lambda: projector.merge(projector.split(z)), args.repeats * 4)
            rows.append(dict(transform=transform, mask_shape=shape, split_merge_ms=ms, share_of_encode=ms / encode_ms))

    print(f"DINOv2-B/14 encode at 224, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads: "
          f"{encode_ms:.1f} ms; latent {tuple(z.shape)}, K={args.num_bands}\n")
    print("| transform | masks | split+merge ms | share of encode |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['transform']} | {r['mask_shape']} | {r['split_merge_ms']:.2f} | {100 * r['share_of_encode']:.2f}% |")
    result = dict(encode_ms=encode_ms, batch_size=args.batch_size, num_bands=args.num_bands,
                  latent_shape=list(z.shape), threads=torch.get_num_threads(), rows=rows, target_share=0.03)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
