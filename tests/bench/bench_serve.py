"""Serving benchmark on this CPU: neox-serve over HTTP vs transformers `generate`, same weights.

    python tests/bench/bench_serve.py --out tests/bench/results/serve_cpu.md

Builds the pythia-70m shape with random weights (and a 50,304-entry word-level
tokenizer so every token id has text), starts `neox-serve` as a real subprocess on
loopback and drives it with an aiohttp load generator (streaming, usage on; aiohttp
parses a stream at a third of httpx's CPU cost, which matters when the generator shares
the server's 2 cores):
throughput, time to first token, inter-token latency ((e2e - TTFT) / (tokens - 1), vLLM's
TPOT), end-to-end latency p50/p99 at each concurrency. In the same run, transformers
generate on the same weights: (a) one request at a time, (b) one static padded batch of
16 requests, both 64 new tokens greedy. On a shared 2-core machine single measurements
move by 10% between minutes, so (b) and every concurrency level are measured `--repeat`
times, interleaved in time as far as the order allows, and the run with the median
throughput is reported, with the range beside it. The decode roofline is the measured peak matmul
FLOP/s of this machine (the better of MKL's GEMM, which transformers uses, and oneDNN's
GEMM on prepacked weights, which the server uses) divided by the decode FLOPs per token
(2 x matmul parameters, unembedding included, + attention over the mean context).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import torch

PROMPT_LEN, NEW_TOKENS, BASELINE_REQUESTS = 32, 64, 16


def build_model(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from neox_runtime.api.architecture import PRESETS
    from neox_runtime.checkpoint.hf import save_hf_model
    from neox_runtime.model import GPTNeoXForCausalLM

    arch = PRESETS["pythia-70m"].architecture
    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, arch.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    save_hf_model(GPTNeoXForCausalLM(arch), arch, path)
    tok.save(str(path / "tokenizer.json"))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 50000) for _ in range(PROMPT_LEN)] for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ---- transformers baselines
def median_run(runs: list[dict], key: str = "throughput") -> dict:
    """The run with the median `key`, plus the range over all runs."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[len(ordered) // 2], f"{key}_min": ordered[0][key], f"{key}_max": ordered[-1][key]}


def hf_baselines(path: Path, dtype: str, repeat: int) -> dict:
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ps = prompts(BASELINE_REQUESTS, seed=1)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor([ps[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        t = time.perf_counter()
        for p in ps:
            model.generate(torch.tensor([p]), **kw)
        one_at_a_time = BASELINE_REQUESTS * NEW_TOKENS / (time.perf_counter() - t)
        batch = torch.tensor(ps)
        static = []
        for _ in range(repeat):
            t = time.perf_counter()
            model.generate(batch, attention_mask=torch.ones_like(batch), **kw)
            static.append({"static_batch": BASELINE_REQUESTS * NEW_TOKENS / (time.perf_counter() - t)})
        static_batch = median_run(static, "static_batch")
        x = torch.tensor([ps[0]])
        times = []
        for _ in range(20):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return {"one_at_a_time": one_at_a_time, **static_batch, "forward_prompt": statistics.median(times)}


# ---- roofline
def peak_matmul_flops(dtype: str) -> float:
    """Best FLOP/s over decode- and prefill-shaped GEMMs, with MKL (`a @ b`) and oneDNN (prepacked)."""
    dt = getattr(torch, dtype)
    best = 0.0
    for m, k, n in [(64, 512, 2048), (128, 512, 2048), (64, 512, 50304), (256, 2048, 512), (512, 512, 1536)]:
        a, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)
        kernels = [lambda: a @ w.t()]
        if torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
            kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
        for kernel in kernels:
            for _ in range(3):
                kernel()
            reps = max(3, int(2e9 / (2 * m * k * n)))
            t = time.perf_counter()
            for _ in range(reps):
                kernel()
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def decode_flops_per_token(ctx: float) -> float:
    from neox_runtime.api.architecture import PRESETS

    a = PRESETS["pythia-70m"].architecture
    matmul_params = a.num_hidden_layers * (4 * a.hidden_size**2 + 2 * a.hidden_size * a.intermediate_size) \
        + a.vocab_size * a.hidden_size
    return 2 * matmul_params + 4 * a.num_hidden_layers * a.hidden_size * ctx


# ---- HTTP load generator
async def one_request(session: aiohttp.ClientSession, url: str, ids: list[int]) -> dict:
    body = {"prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "itl": (e2e - ttft) / max(1, tokens - 1)}


async def load(url: str, concurrency: int, n_requests: int) -> dict:
    ps = prompts(n_requests, seed=concurrency)
    queue = list(ps)
    results = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def worker():
            while queue:
                results.append(await one_request(session, url, queue.pop()))
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in results)
    col = {k: [r[k] for r in results] for k in ("ttft", "itl", "e2e")}
    return {"concurrency": concurrency, "requests": n_requests, "tokens": tokens, "throughput": tokens / wall,
            **{f"{k}_p{q}": pct(v, q) for k, v in col.items() for q in (50, 99)}}


def start_server(path: Path, port: int, threads: int | None, dtype: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "neox_runtime.serve.cli", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", dtype, "--max-num-seqs", "64", "--max-model-len", "256", "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def report(hf: dict, runs: list[dict], peak: float, dtype: str, repeat: int) -> str:
    fpt = decode_flops_per_token(PROMPT_LEN + NEW_TOKENS / 2)
    roof = peak / fpt
    at32 = next(r for r in runs if r["concurrency"] == 32)
    at1 = next(r for r in runs if r["concurrency"] == 1)
    best = max(r["throughput"] for r in runs)
    lines = [
        f"## {dtype}: transformers generate, same weights", "",
        "| mode | tok/s |", "|---|---|",
        f"| (a) one request at a time ({BASELINE_REQUESTS} x {NEW_TOKENS}) | {hf['one_at_a_time']:.0f} |",
        f"| (b) one static padded batch ({BASELINE_REQUESTS} x {NEW_TOKENS}), median (range) of {repeat} | "
        f"{hf['static_batch']:.0f} ({hf['static_batch_min']:.0f}-{hf['static_batch_max']:.0f}) |",
        f"| one forward over a {PROMPT_LEN}-token prompt | {hf['forward_prompt'] * 1e3:.1f} ms |", "",
        f"## {dtype}: neox-serve over HTTP", "",
        f"| concurrency | requests | tok/s, median (range) of {repeat} | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
        "| e2e p50 / p99 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['throughput']:.0f} "
                     f"({r['throughput_min']:.0f}-{r['throughput_max']:.0f}) | "
                     f"{r['ttft_p50'] * 1e3:.1f} / {r['ttft_p99'] * 1e3:.1f} | {r['itl_p50'] * 1e3:.1f} / "
                     f"{r['itl_p99'] * 1e3:.1f} | {r['e2e_p50']:.2f} / {r['e2e_p99']:.2f} |")
    ratio = at32["throughput"] / hf["static_batch"]
    lines += [
        "", f"## {dtype}: goals", "",
        f"- Roofline: measured peak {dtype} matmul {peak / 1e9:.0f} GFLOP/s / {fpt / 1e6:.1f} MFLOP per decoded token "
        f"(2 x {(fpt - 4 * 6 * 512 * (PROMPT_LEN + NEW_TOKENS / 2)) / 2 / 1e6:.1f} M matmul params incl. "
        f"unembedding + attention at mean context {PROMPT_LEN + NEW_TOKENS // 2}) = **{roof:.0f} tok/s**.",
        f"- >= 3x (b) at 32 concurrent: {at32['throughput']:.0f} / {hf['static_batch']:.0f} = **{ratio:.2f}x** "
        f"({'met' if ratio >= 3 else 'NOT met'}).",
        f"- >= 30% of roofline: best {best:.0f} tok/s = **{100 * best / roof:.0f}%**, at 32 concurrent "
        f"{100 * at32['throughput'] / roof:.0f}% ({'met' if best / roof >= 0.3 else 'NOT met'}).",
        f"- TTFT p50 at concurrency 1 <= 1.2x one transformers forward over the prompt: "
        f"{at1['ttft_p50'] * 1e3:.1f} ms vs {hf['forward_prompt'] * 1e3:.1f} ms = "
        f"**{at1['ttft_p50'] / hf['forward_prompt']:.2f}x** "
        f"({'met' if at1['ttft_p50'] <= 1.2 * hf['forward_prompt'] else 'NOT met'}).",
    ]
    return "\n".join(lines) + "\n"


def run_dtype(path: Path, dtype: str, args) -> str:
    load_before = os.getloadavg()[0]
    peak = peak_matmul_flops(dtype)
    hf = {"one_at_a_time": 1.0, "static_batch": 1.0, "static_batch_min": 1.0, "static_batch_max": 1.0,
          "forward_prompt": 1.0} if args.skip_baselines else hf_baselines(path, dtype, args.repeat)
    print(json.dumps(hf), flush=True)
    proc = start_server(path, args.port, args.threads, dtype)
    try:
        url = f"http://127.0.0.1:{args.port}"
        asyncio.run(load(url, 4, 8))  # warm-up
        levels = [int(x) for x in args.concurrency.split(",")]
        by_level: dict[int, list[dict]] = {c: [] for c in levels}
        for _ in range(args.repeat):  # rounds over all levels, so slow minutes spread across them
            for c in levels:
                by_level[c].append(asyncio.run(load(url, c, max(8, 2 * c))))
                print(json.dumps(by_level[c][-1]), flush=True)
        runs = [median_run(by_level[c]) for c in levels]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return report(hf, runs, peak, dtype, args.repeat) + (
        f"\nLoad average (1 min) of the machine before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        "(other jobs share these 2 cores; every number here moves with it).\n\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("tests/bench/results/serve_cpu.md"))
    p.add_argument("--port", type=int, default=18555)
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads for both transformers and the server (same budget on both sides)")
    p.add_argument("--skip-baselines", action="store_true", help="server runs only (for tuning)")
    p.add_argument("--repeat", type=int, default=3, help="measurements of (b) and of each concurrency; median reported")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cmd = " ".join(["python tests/bench/bench_serve.py", *sys.argv[1:]])
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pythia-70m-random"
        build_model(path)
        for dtype in args.dtypes.split(","):
            sections.append(run_dtype(path, dtype, args))
    text = "\n".join([
        "# neox-serve on CPU: pythia-70m shape, random weights", "", f"Reproduce: `{cmd}`", "",
        f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch thread(s) for both "
        f"transformers and neox-serve; prompts {PROMPT_LEN} tokens, "
        f"{NEW_TOKENS} new tokens, greedy, streaming over loopback HTTP.", "", *sections])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
