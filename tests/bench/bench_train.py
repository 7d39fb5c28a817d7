"""Training throughput: our path (neox_runtime.train's step runner, DeepSpeed engine) vs a plain transformers loop.

Same shape (default: pythia-70m, batch 8 x 256, fp32), same process, steps interleaved
round by round so that a shared, busy machine slows every path alike; MFU against this
machine's peak measured by a large fp32 matmul in the same rounds.

    DS_ACCELERATOR=cpu python tests/bench/bench_train.py --steps 6 --out tests/bench/results/train_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch

from neox_runtime.api.architecture import preset
from neox_runtime.model import flops_per_token


def measure_peak_flops(n: int = 4096, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def our_runner(arch, batch, seq, workdir: Path, compile_model: bool):
    """The step runner neox-train's loop drives (DeepSpeed engine, ZeRO 0, fp32, fused AdamW)."""
    from neox_runtime.train.config import TrainConfig
    from neox_runtime.train.distributed import init_distributed
    from neox_runtime.train.engine import build_runner

    cfg = TrainConfig(architecture=arch, train_data=str(workdir), checkpoint_dir=str(workdir / "ckpt"),
                      seq_length=seq, micro_batch_size=batch, compile=compile_model)
    runner = build_runner(cfg, init_distributed())
    window = np.random.default_rng(0).integers(0, arch.vocab_size, size=(batch, seq + 1))
    return lambda: runner.train_step([window])


def transformers_step(arch, batch, seq):
    import transformers

    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**arch.to_hf_config())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, arch.vocab_size, (batch, seq))

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="pythia-70m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="also measure our path under torch.compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch = preset(args.preset).architecture
    tokens = args.batch * args.seq
    fpt = flops_per_token(arch, args.seq)
    paths = {"transformers GPTNeoXForCausalLM + torch AdamW": transformers_step(arch, args.batch, args.seq)}
    with tempfile.TemporaryDirectory() as tmp:
        paths["neox-train step (DeepSpeed engine, ZeRO 0, fp32, fused AdamW)"] = our_runner(
            arch, args.batch, args.seq, Path(tmp), compile_model=False)
        if args.compile:
            paths["neox-train step + torch.compile (model + loss)"] = our_runner(
                arch, args.batch, args.seq, Path(tmp), compile_model=True)
        first = {name: timed(step) for name, step in paths.items()}  # warm-up; includes compile
        times = {name: [] for name in paths}
        peaks = []
        for _ in range(args.steps):  # interleaved rounds: a busy machine slows every path alike
            peaks.append(measure_peak_flops(reps=2))
            for name, step in paths.items():
                times[name].append(timed(step))
    peak = max(peaks)
    rows = [(name, {"step_s": statistics.median(t), "first_step_s": first[name]}) for name, t in times.items()]
    ref = rows[0][1]
    lines = [
        "# Training throughput on CPU",
        "",
        "Command: `DS_ACCELERATOR=cpu python tests/bench/bench_train.py "
        + " ".join(a for a in sys.argv[1:] if a != "--out" and a != args.out) + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads. Shape: {args.preset}, batch {args.batch} x {args.seq}, fp32.",
        f"Load average at the end: {os.getloadavg()[0]:.1f}. Steps interleaved over {args.steps} rounds (median).",
        f"Peak measured (4096^3 fp32 matmul, best over the rounds): {peak / 1e9:.1f} GFLOP/s. "
        f"Model FLOPs per token (6N + attention): {fpt / 1e6:.1f} MFLOP -> roofline {peak / fpt:.0f} tok/s.",
        "",
        "| path | step (s) | tokens/s | MFU | vs transformers | first step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        tps = tokens / r["step_s"]
        lines.append(f"| {name} | {r['step_s']:.3f} | {tps:.0f} | {100 * tps * fpt / peak:.1f}% | "
                     f"{ref['step_s'] / r['step_s']:.2f}x | {r['first_step_s']:.1f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
