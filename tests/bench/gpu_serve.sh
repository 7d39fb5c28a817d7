#!/usr/bin/env bash
# Decode throughput of the neox-serve engine on one H200: GPT-NeoX-20B shape, random fp16 weights.
#
#   bash tests/bench/gpu_serve.sh [results.md]        (<= 8 minutes; needs torch with CUDA)
#
# Builds the 20B architecture directly on the GPU (random init, no checkpoint on disk: 40 GB
# would take longer to write than the whole budget), runs the real engine (scheduler, KV
# cache, model runner, sampler) at batch sizes 1..64 with 128-token prompts and 128 new
# tokens, and compares decode tokens/s with the memory-bandwidth roofline: each decode
# step must read every weight once plus the live KV cache, so
#   roofline tok/s = batch / ((weight bytes + KV bytes read) / measured copy bandwidth).
# Smoke test of the script's logic on CPU: NEOX_BENCH_DEVICE=cpu NEOX_BENCH_PRESET=tiny bash tests/bench/gpu_serve.sh /tmp/x.md
set -euo pipefail
OUT="${1:-tests/bench/results/serve_gpu_h200.md}"
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/runtime:${PYTHONPATH:-}"
[ "${NEOX_BENCH_DEVICE:-cuda}" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 480 python - "$OUT" <<'PY'
import os, sys, time, random, torch
from neox_runtime.api.architecture import PRESETS
from neox_runtime.model import GPTNeoXForCausalLM
from neox_runtime.serve.engine.core import LLMEngine
from neox_runtime.serve.engine.runner import ModelRunner
from neox_runtime.serve.engine.sequence import SamplingParams
from tokenizers import Tokenizer, models

out = sys.argv[1]
arch = PRESETS[os.environ.get("NEOX_BENCH_PRESET", "neox-20b")].architecture
dev = os.environ.get("NEOX_BENCH_DEVICE", "cuda")
dtype = torch.float16 if dev == "cuda" else torch.float32
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
t0 = time.time()
with torch.device("meta"):
    model = GPTNeoXForCausalLM(arch)
model = model.to(dtype).to_empty(device=dev)  # cast on meta: no fp32 copy on the GPU
with torch.no_grad():
    for name, p in model.named_parameters():
        p.normal_(0.0, 0.02) if p.dim() == 2 else (p.fill_(1.0) if "norm" in name else p.zero_())
model.gpt_neox.rotary_emb = type(model.gpt_neox.rotary_emb)(arch).to(dev)
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"built 20B shape in {time.time() - t0:.0f}s, {weight_bytes / 1e9:.1f} GB", flush=True)

# Measured HBM bandwidth: a 4 GB device-to-device copy (reads + writes 4 GB each).
a = torch.empty(2 * 1024**3 if dev == "cuda" else 2**24, dtype=torch.float16, device=dev); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
sync(); t = time.perf_counter()
for _ in range(10): b.copy_(a)
sync(); bw = 2 * a.numel() * 2 * 10 / (time.perf_counter() - t)
del a, b
print(f"measured bandwidth {bw / 1e12:.2f} TB/s", flush=True)

SLOTS, MAX_LEN, PROMPT, NEW = (64, 512, 128, 128) if dev == "cuda" else (64, 256, 16, 16)
runner = ModelRunner(model, arch, num_slots=SLOTS, max_len=MAX_LEN)
tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, arch.vocab_size)}},
                                 unk_token="<|endoftext|>"))
engine = LLMEngine(executor=runner, tokenizer=tok, num_slots=SLOTS, max_len=MAX_LEN,
                   max_num_batched_tokens=8192, eos_token_id=None)
kv_per_token = 2 * arch.num_hidden_layers * arch.hidden_size * torch.finfo(dtype).bits // 8
rng = random.Random(0)
rows = []
for batch in (1, 8, 32, 64):
    for i in range(batch):
        engine.add_request(f"{batch}-{i}", [rng.randrange(1, min(50000, arch.vocab_size)) for _ in range(PROMPT)],
                           SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill everything
    sync(); t = time.perf_counter(); n = steps = 0
    while engine.has_work():
        n += len(engine.step()); steps += 1
    sync(); dt = time.perf_counter() - t
    tok_s = n / dt
    kv_read = batch * (PROMPT + NEW / 2) * kv_per_token
    roof = batch / ((weight_bytes + kv_read) / bw)
    rows.append((batch, tok_s, roof, dt / steps * 1e3))
    print(f"batch {batch}: {tok_s:.0f} tok/s, {dt / steps * 1e3:.1f} ms/step, roofline {roof:.0f} tok/s "
          f"({100 * tok_s / roof:.0f}%)", flush=True)

with open(out, "w") as f:
    f.write("# neox-serve engine on one H200: GPT-NeoX-20B shape, random fp16 weights\n\n")
    f.write("Reproduce: `bash tests/bench/gpu_serve.sh`\n\n")
    f.write(f"Weights {weight_bytes / 1e9:.1f} GB; measured copy bandwidth {bw / 1e12:.2f} TB/s; "
            f"prompts {PROMPT}, {NEW} new tokens, greedy.\n\n")
    f.write("| batch | decode tok/s | ms/step | bandwidth roofline tok/s | % of roofline |\n|---|---|---|---|---|\n")
    for batch, tok_s, roof, ms in rows:
        f.write(f"| {batch} | {tok_s:.0f} | {ms:.1f} | {roof:.0f} | {100 * tok_s / roof:.0f}% |\n")
print(open(out).read())
PY
