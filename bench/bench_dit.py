"""Benchmark: UAEDiT vs diffusers' DiTTransformer2DModel at the same size, fp32 on CPU, in one process.

Both models are plain adaLN-Zero DiTs with the same width, depth, heads, tokens and patch (UAEDiT without
SwiGLU / RoPE / RMSNorm, sinusoidal time embedding). Measures the median time of a training step
(forward + backward + fused AdamW, the optimiser the DiT trainer uses, for both) and of a sampling step
(forward, no grad). The two models' iterations are interleaved so machine load hits both alike; times are wall and process CPU time (CPU time does not count
waits while other programs use the cores). Reports parameter counts, peak RSS and achieved GFLOP/s (analytic
forward FLOPs, x3 for a training step) as a share of the measured torch.mm fp32 GEMM rate on an MLP-shaped
product. Prints a Markdown table and writes JSON to --out.

    python bench/bench_dit.py --out bench_dit.json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from uae_gen.models.dit import UAEDiT


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--sample-size", type=int, default=16, help="latent height = width")
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_dit.json")
    return parser.parse_args()


def forward_flops(args) -> float:
    """Multiply-add FLOPs (2 per MAC) of one plain-DiT forward pass: the matmuls of both models."""
    d, tokens = args.width, (args.sample_size // args.patch_size) ** 2
    patch_dim = args.in_channels * args.patch_size ** 2
    per_token_block = 2 * (3 * d * d + d * d + 2 * 4 * d * d)  # qkv, out proj, MLP (ratio 4)
    attention = 2 * 2 * tokens * tokens * d  # q k^T and weights @ v
    per_sample = args.depth * (tokens * per_token_block + attention + 2 * d * 6 * d)  # + adaLN
    per_sample += 2 * tokens * patch_dim * d * 2 + 2 * d * 2 * d + 2 * (256 * d + d * d)  # embed, final, time MLP
    return args.batch_size * per_sample


def gemm_gflops(args, reps: int = 30) -> float:
    """Best measured fp32 torch.mm rate on a product shaped like the MLP's first layer."""
    m = args.batch_size * (args.sample_size // args.patch_size) ** 2
    x, weight = torch.randn(m, args.width), torch.randn(4 * args.width, args.width)
    for _ in range(3):
        torch.mm(x, weight.t())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(x, weight.t())
        times.append(time.perf_counter() - start)
    return 2 * m * args.width * 4 * args.width / min(times) / 1e9


class Runner:
    """One model, its optimizer, fixed inputs and the two timed steps."""

    def __init__(self, name, model, timestep_scale, args, generator):
        self.name, self.model, self.timestep_scale = name, model, timestep_scale
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the DiT trainer
        shape = (args.batch_size, args.in_channels, args.sample_size, args.sample_size)
        self.sample = torch.randn(shape, generator=generator)
        self.target = torch.randn(shape, generator=generator)
        self.timestep = torch.rand(args.batch_size, generator=generator)
        self.labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
        self.times = {"train": [], "sample": []}
        self.cpu_times = {"train": [], "sample": []}

    def predict(self):
        return self.model(self.sample, self.timestep * self.timestep_scale, self.labels).sample

    def train_step(self):
        self.model.train()
        loss = F.mse_loss(self.predict(), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sample_step(self):
        self.model.eval()
        with torch.no_grad():
            self.predict()

    def step(self, kind):
        self.train_step() if kind == "train" else self.sample_step()

    def timed(self, kind):
        start, cpu_start = time.perf_counter(), time.process_time()
        self.step(kind)
        self.times[kind].append(time.perf_counter() - start)
        self.cpu_times[kind].append(time.process_time() - cpu_start)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    size = dict(sample_size=args.sample_size, patch_size=args.patch_size, in_channels=args.in_channels)
    ours = UAEDiT(**size, hidden_size=args.width, depth=args.depth, num_heads=args.heads, head_depth=0,
                  num_classes=args.num_classes, use_swiglu=False, use_rmsnorm=False, use_rope=False,
                  use_qknorm=False, use_pos_embed=True, time_embedding_type="sinusoidal")
    runners = [Runner("uae_gen UAEDiT", ours, 1.0, args, generator)]
    for kind in ("train", "sample"):  # warm up ours alone first, so the first RSS figure is ours only
        for _ in range(args.warmup):
            runners[0].step(kind)
    rss = [peak_rss_mib()]
    theirs = DiTTransformer2DModel(
        num_attention_heads=args.heads, attention_head_dim=args.width // args.heads, out_channels=args.in_channels,
        num_layers=args.depth, num_embeds_ada_norm=args.num_classes, **size)
    runners.append(Runner("diffusers DiTTransformer2DModel", theirs, 1000.0, args, generator))  # t in [0, 1000)
    for kind in ("train", "sample"):
        for _ in range(args.warmup):
            runners[1].step(kind)
    rss.append(peak_rss_mib())

    for kind in ("train", "sample"):  # interleaved, so load changes on the machine affect both alike
        for _ in range(args.iters):
            for runner in runners:
                runner.timed(kind)

    flops = forward_flops(args)
    gemm = gemm_gflops(args)
    rows = []
    for runner, peak in zip(runners, rss, strict=True):
        row = {"model": runner.name, "params_M": sum(p.numel() for p in runner.model.parameters()) / 1e6,
               "peak_rss_MiB_after_warmup": peak}
        for kind, flop_factor in (("train", 3), ("sample", 1)):
            median = statistics.median(runner.times[kind])
            gflops = flop_factor * flops / median / 1e9
            row.update({f"{kind}_ms": median * 1e3, f"{kind}_min_ms": min(runner.times[kind]) * 1e3,
                        f"{kind}_cpu_ms": statistics.median(runner.cpu_times[kind]) * 1e3,
                        f"{kind}_gflops": gflops, f"{kind}_gemm_share": gflops / gemm})
        rows.append(row)
    speedup = {kind: rows[1][f"{kind}_ms"] / rows[0][f"{kind}_ms"] for kind in ("train", "sample")}
    speedup_cpu = {kind: rows[1][f"{kind}_cpu_ms"] / rows[0][f"{kind}_cpu_ms"] for kind in ("train", "sample")}
    result = {"config": vars(args), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "forward_gflop": flops / 1e9,
              "gemm_gflops": gemm, "models": rows, "speedup_ours_vs_diffusers": speedup,
              "speedup_in_cpu_time": speedup_cpu, "load_average_1_5_15min": os.getloadavg()}

    tokens = (args.sample_size // args.patch_size) ** 2
    print(f"width {args.width}, depth {args.depth}, heads {args.heads}, {tokens} tokens, batch {args.batch_size}, "
          f"fp32 CPU, {torch.get_num_threads()} threads; forward {flops / 1e9:.2f} GFLOP; "
          f"fp32 torch.mm {gemm:.1f} GFLOP/s; medians of {args.iters}; load average {os.getloadavg()[0]:.1f}\n")
    print("| model | params (M) | train step ms: wall (CPU) | train GFLOP/s (share of GEMM) "
          "| sample step ms: wall (CPU) | sample GFLOP/s (share of GEMM) | process peak RSS after its warm-up (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['params_M']:.2f} | {row['train_ms']:.1f} ({row['train_cpu_ms']:.1f}) "
              f"| {row['train_gflops']:.1f} ({row['train_gemm_share']:.0%}) "
              f"| {row['sample_ms']:.1f} ({row['sample_cpu_ms']:.1f}) | {row['sample_gflops']:.1f} "
              f"({row['sample_gemm_share']:.0%}) | {row['peak_rss_MiB_after_warmup']:.0f} |")
    print(f"\nspeed-up of ours over diffusers, wall (CPU time): train {speedup['train']:.2f}x "
          f"({speedup_cpu['train']:.2f}x), sample {speedup['sample']:.2f}x ({speedup_cpu['sample']:.2f}x)")
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
