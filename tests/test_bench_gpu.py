"""bench/bench_gpu.py stays runnable: its --smoke mode (tiny models, 2 timed steps, on the CPU) runs every case of the
GPU benchmark (the compiled ones with dynamo's whole-graph capture only), the script run as `python
bench/bench_gpu.py` runs it (as __main__, with its command line), in this process on one thread (what the
OMP_NUM_THREADS=1 subprocess it replaced had, without another ~8 s of imports)."""

import importlib.util
import json
import runpy
import sys
import time
from pathlib import Path

import torch._dynamo

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_measures_every_case(tmp_path, monkeypatch, capsys, one_torch_thread):
    out = tmp_path / "bench_gpu.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--smoke", "--device", "cpu", "--out", str(out)])
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        runpy.run_path(str(BENCH), run_name="__main__")  # the script's `if __name__ == "__main__"` path
    finally:
        torch._dynamo.reset()  # the compiled cases' code stays behind otherwise
    seconds = time.perf_counter() - start
    assert seconds < 120, f"--smoke took {seconds:.0f} s"
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert all("error" not in row and row["images_per_s"] > 0 and row["step_ms"] > 0 for row in rows)

    train = [row for row in rows if row["kind"] == "train" and row["model"] in ("DiT-DH-tiny", "DiT-tiny")]
    # 2 models x 2 batch sizes x with / without checkpointing, eager and compiled; no xformers on the CPU.
    variants = {(r["model"], r["batch"], r["checkpointing"], r["compile"]) for r in train}
    assert variants == {(model, batch, checkpointing, compile_backend)
                        for model in ("DiT-DH-tiny", "DiT-tiny") for batch in (2, 4)
                        for checkpointing in (False, True) for compile_backend in (None, "eager")}
    assert len(train) == 16 and {r["attention"] for r in train} == {"sdpa"}
    assert [r["batch"] for r in rows if r["model"] == "diffusers DiT-tiny"] == [2, 4]
    assert [r["case"] for r in rows if r["kind"] == "sample"] == [
        "sample DiT-DH-tiny euler 2 steps cfg 1.5 + decode b2"]
    assert [r["case"] for r in rows if r["model"].startswith("AutoencoderUAE")] == [
        "train tokenizer stage 3 (tiny) b2"]
    assert set(result["ratios"]) == {"DiT-tiny / diffusers DiT-tiny, b2", "DiT-tiny / diffusers DiT-tiny, b4"}
    assert all(value > 0 for value in result["ratios"].values())
    assert result["skipped"] == ["xformers cases (xformers not installed or not on CUDA)"]
    table = capsys.readouterr().out
    assert "| case | params (M) | images/s |" in table and "train speed ratio DiT-tiny / diffusers DiT-tiny" in table


def test_time_budget_skips_what_does_not_fit():
    bench_gpu = load_bench()
    bench = bench_gpu.Bench(bench_gpu.parse_args(["--time_budget", "100", "--compile_reserve", "150",
                                                  "--device", "cpu"]))
    assert bench.admits("eager case") and not bench.admits("compiled case", compiled=True)
    assert len(bench.skipped) == 1 and bench.skipped[0].startswith("compiled case (time budget:")
    args = bench_gpu.parse_args(["--device", "cpu"])
    assert (args.warmup, args.iters, args.compile_backend, args.size) == (3, 10, "inductor", "full")
    assert bench_gpu.SIZES["full"]["batch_sizes"] == (64, 128) and bench_gpu.SIZES["full"]["tokenizer_batch"] == 32
