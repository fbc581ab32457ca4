"""Benchmark: UAEDiT vs diffusers' DiTTransformer2DModel at the same size, fp32 on CPU, in one process.

Both models are plain adaLN-Zero DiTs with the same width, depth, heads, tokens and patch (UAEDiT without
SwiGLU / RoPE / RMSNorm, sinusoidal time embedding). Measures the median time of a training step
(forward + backward + fused AdamW, the optimiser train/train_dit.py uses, for both; glibc's allocator set to
keep freed memory, as train_dit.py does on CPU) and a sampling step (forward, no grad), with the two models'
iterations interleaved so machine load hits both alike, in wall time and in process CPU time (which, unlike
wall time, does not count time the process waits while other programs use the cores). Reports parameter
counts, peak RSS and achieved GFLOP/s (analytic forward FLOPs, x3 for a training step) as a share of the best
measured fp32 GEMM rate here (the faster of torch.mm and the oneDNN route UAEDiT's linears take on AVX-512 CPUs).
It also splits each step into its matrix products and the rest: the matmul ops of one step are recorded (layouts,
not values) and replayed alone, right after each timed step, on random operands of the same shapes and strides; the
rest is the step's median minus the replay's (attention kernels, norms, activations, AdamW, framework overhead).
Prints a Markdown table and writes JSON to --out.

    python bench/bench_dit.py --out bench_dit.json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from uae_gen.models.dit import UAEDiT
from uae_gen.models.linear import onednn_linear, use_onednn
from uae_gen.training import retain_freed_memory


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
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
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


def gemm_gflops(args, reps: int = 30) -> dict[str, float]:
    """Best measured fp32 GEMM rate on a matrix product shaped like the MLP's first layer, for each GEMM library the
    models use: torch.mm (MKL) and, where uae_gen's Linear takes it, oneDNN (uae_gen.models.linear)."""
    m = args.batch_size * (args.sample_size // args.patch_size) ** 2
    x, weight = torch.randn(m, args.width), torch.randn(4 * args.width, args.width)
    routes = {"torch.mm": lambda: torch.mm(x, weight.t())}
    if use_onednn(x, weight):
        routes["oneDNN"] = lambda: onednn_linear(x, weight)
    rates = {}
    for name, product in routes.items():
        for _ in range(3):
            product()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        rates[name] = 2 * m * args.width * 4 * args.width / min(times) / 1e9
    return rates


MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the op UAEDiT's linears call on AVX-512 CPUs
    MATMUL_OPS.add(torch.ops.mkldnn._linear_pointwise.default)


class TensorLayout(NamedTuple):
    shape: torch.Size
    stride: tuple[int, ...]

    def random(self) -> torch.Tensor:
        """A tensor of this shape and these strides, with random values."""
        storage = torch.randn(sum((size - 1) * step for size, step in zip(self.shape, self.stride)) + 1)
        return storage.as_strided(self.shape, self.stride)


class MatmulRecorder(TorchDispatchMode):
    """Records each matmul op a step dispatches, with its tensor arguments' shapes and strides (not their values)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMUL_OPS:
            layouts = [TensorLayout(a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, layouts, kwargs or {}))
        return func(*args, **(kwargs or {}))


class Runner:
    """One model, its optimizer, fixed inputs, the two timed steps and the replay of their matmuls."""

    def __init__(self, name, model, timestep_scale, args, generator):
        self.name, self.model, self.timestep_scale = name, model, timestep_scale
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train/train_dit.py
        shape = (args.batch_size, args.in_channels, args.sample_size, args.sample_size)
        self.sample = torch.randn(shape, generator=generator)
        self.target = torch.randn(shape, generator=generator)
        self.timestep = torch.rand(args.batch_size, generator=generator)
        self.labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
        self.times = {"train": [], "sample": [], "train_matmuls": [], "sample_matmuls": []}
        self.cpu_times = {"train": [], "sample": []}
        self.matmul_replays = {}

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

    def record_matmuls(self):
        """Records one step of each kind and prepares its matmuls for replay on random operands, one set per call
        (as in the step, where most operands come from memory rather than cache)."""
        for kind in ("train", "sample"):
            recorder = MatmulRecorder()
            with recorder:
                self.train_step() if kind == "train" else self.sample_step()
            self.matmul_replays[kind] = [
                (func, [a.random() if isinstance(a, TensorLayout) else a for a in layouts], kwargs)
                for func, layouts, kwargs in recorder.calls]
            self.replay_matmuls(kind)  # warms oneDNN's primitive cache for the replay's layouts

    def replay_matmuls(self, kind):
        for func, args, kwargs in self.matmul_replays[kind]:
            func(*args, **kwargs)

    def timed(self, kind):
        start, cpu_start = time.perf_counter(), time.process_time()
        self.train_step() if kind == "train" else self.sample_step()
        self.times[kind].append(time.perf_counter() - start)
        self.cpu_times[kind].append(time.process_time() - cpu_start)
        start = time.perf_counter()  # right after the step, so both see the same load on the machine
        self.replay_matmuls(kind)
        self.times[f"{kind}_matmuls"].append(time.perf_counter() - start)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    args = parse_args()
    retain_freed_memory()  # as train/train_dit.py does on CPU; process-wide, so both models get it
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
            runners[0].train_step() if kind == "train" else runners[0].sample_step()
    rss = [peak_rss_mib()]
    theirs = DiTTransformer2DModel(
        num_attention_heads=args.heads, attention_head_dim=args.width // args.heads, out_channels=args.in_channels,
        num_layers=args.depth, num_embeds_ada_norm=args.num_classes, **size)
    runners.append(Runner("diffusers DiTTransformer2DModel", theirs, 1000.0, args, generator))  # t in [0, 1000)
    for kind in ("train", "sample"):
        for _ in range(args.warmup):
            runners[1].train_step() if kind == "train" else runners[1].sample_step()
    rss.append(peak_rss_mib())
    for runner in runners:
        runner.record_matmuls()

    for kind in ("train", "sample"):  # interleaved, so load changes on the machine affect both alike
        for _ in range(args.iters):
            for runner in runners:
                runner.timed(kind)

    flops = forward_flops(args)
    gemm_rates = gemm_gflops(args)
    gemm_library, gemm = max(gemm_rates.items(), key=lambda item: item[1])
    rows = []
    for runner, peak in zip(runners, rss, strict=True):
        row = {"model": runner.name, "params_M": sum(p.numel() for p in runner.model.parameters()) / 1e6,
               "peak_rss_MiB_after_warmup": peak}
        for kind, flop_factor in (("train", 3), ("sample", 1)):
            median = statistics.median(runner.times[kind])
            gflops = flop_factor * flops / median / 1e9
            matmul_ms = statistics.median(runner.times[f"{kind}_matmuls"]) * 1e3
            row.update({f"{kind}_ms": median * 1e3, f"{kind}_min_ms": min(runner.times[kind]) * 1e3,
                        f"{kind}_cpu_ms": statistics.median(runner.cpu_times[kind]) * 1e3,
                        f"{kind}_gflops": gflops, f"{kind}_gemm_share": gflops / gemm,
                        f"{kind}_matmul_calls": len(runner.matmul_replays[kind]), f"{kind}_matmul_ms": matmul_ms,
                        f"{kind}_rest_ms": median * 1e3 - matmul_ms})
        rows.append(row)
    speedup = {kind: rows[1][f"{kind}_ms"] / rows[0][f"{kind}_ms"] for kind in ("train", "sample")}
    speedup_cpu = {kind: rows[1][f"{kind}_cpu_ms"] / rows[0][f"{kind}_cpu_ms"] for kind in ("train", "sample")}
    speedup_parts = {f"{kind}_{part}": rows[1][f"{kind}_{part}_ms"] / rows[0][f"{kind}_{part}_ms"]
                     for kind in ("train", "sample") for part in ("matmul", "rest")}
    result = {"config": vars(args), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "forward_gflop": flops / 1e9,
              "gemm_gflops": gemm_rates, "models": rows, "speedup_ours_vs_diffusers": speedup,
              "speedup_in_cpu_time": speedup_cpu, "speedup_of_parts": speedup_parts,
              "load_average_1_5_15min": os.getloadavg()}

    tokens = (args.sample_size // args.patch_size) ** 2
    print(f"width {args.width}, depth {args.depth}, heads {args.heads}, {tokens} tokens, batch {args.batch_size}, "
          f"fp32 CPU, {torch.get_num_threads()} threads; forward {flops / 1e9:.2f} GFLOP; "
          f"best fp32 GEMM {gemm:.1f} GFLOP/s ({gemm_library}; "
          + ", ".join(f"{name} {rate:.1f}" for name, rate in gemm_rates.items()) + f"); medians of {args.iters}; load average {os.getloadavg()[0]:.1f}\n")
    print("| model | params (M) | train step ms: wall (CPU) | train GFLOP/s (share of GEMM) "
          "| sample step ms: wall (CPU) | sample GFLOP/s (share of GEMM) | process peak RSS after its warm-up (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['params_M']:.2f} | {row['train_ms']:.1f} ({row['train_cpu_ms']:.1f}) "
              f"| {row['train_gflops']:.1f} ({row['train_gemm_share']:.0%}) "
              f"| {row['sample_ms']:.1f} ({row['sample_cpu_ms']:.1f}) | {row['sample_gflops']:.1f} "
              f"({row['sample_gemm_share']:.0%}) | {row['peak_rss_MiB_after_warmup']:.0f} |")
    print("\n| model | train: matmuls replayed alone ms (calls) | train: rest ms "
          "| sample: matmuls replayed alone ms (calls) | sample: rest ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['train_matmul_ms']:.1f} ({row['train_matmul_calls']}) "
              f"| {row['train_rest_ms']:.1f} | {row['sample_matmul_ms']:.1f} ({row['sample_matmul_calls']}) "
              f"| {row['sample_rest_ms']:.1f} |")
    print(f"\nspeed-up of ours over diffusers, wall (CPU time): train {speedup['train']:.2f}x "
          f"({speedup_cpu['train']:.2f}x), sample {speedup['sample']:.2f}x ({speedup_cpu['sample']:.2f}x); "
          "of the parts: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in speedup_parts.items()))
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
