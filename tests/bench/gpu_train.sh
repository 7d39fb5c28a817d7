#!/usr/bin/env bash
# One H200: throughput and MFU of neox-train on the pythia-1.4b shape (bf16, seq 2048).
# Budget: <= 8 minutes including start-up. Not run in CI; run by hand on a GPU machine:
#   bash tests/bench/gpu_train.sh            (PEAK_TFLOPS defaults to H200 dense bf16: 989)
# Goal: MFU >= 45 %. Prints one summary line per variant and writes tests/bench/results/train_gpu.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
MICRO="${MICRO:-8}"
STEPS="${STEPS:-25}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
unset DS_ACCELERATOR
python - "$WORK" "$MICRO" "$STEPS" <<'PY'
import sys, numpy as np
from pathlib import Path
from neox_runtime.data.shards import write_shard, write_manifest
work, micro, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(work / "data").mkdir(parents=True)
rng = np.random.default_rng(0)
docs = [np.append(rng.integers(1, 50304, size=2048 * 64, dtype=np.uint16), 0) for _ in range(micro * (steps + 2) // 64 + 2)]
write_manifest(work / "data", [write_shard(work / "data", "shard-00000", docs, np.dtype(np.uint16))],
               vocab_size=50304, eos_token_id=0)
PY
run() {  # name, extra yaml lines
  cat > "$WORK/$1.yaml" <<YAML
architecture: pythia-1.4b
train_data: $WORK/data
checkpoint_dir: $WORK/ckpt-$1
seq_length: 2048
micro_batch_size: $MICRO
train_steps: $STEPS
warmup_steps: 2
lr: 0.0002
min_lr: 0.00002
precision: bf16
zero_stage: 1
checkpoint_interval: 1000000
eval_interval: 1000000
validation_fraction: 0.0
log_interval: 1
peak_tflops: $PEAK_TFLOPS
progress_file: $WORK/$1.jsonl
$2
YAML
  timeout 300 python -m neox_runtime.train.cli --config "$WORK/$1.yaml" > "$WORK/$1.log" 2>&1 || { tail -30 "$WORK/$1.log"; return 1; }
  python - "$WORK/$1.jsonl" "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][3:-1]  # skip warm-up and the final save
tps = statistics.median(r["tokens_per_sec"] for r in rows); mfu = statistics.median(r["mfu"] for r in rows)
line = f"| {sys.argv[2]} | {tps:,.0f} | {100 * mfu:.1f}% |"
print(line); open("tests/bench/results/train_gpu.md", "a").write(line + "\n")
PY
}
printf '# neox-train on one H200, pythia-1.4b, bf16, micro batch %s x 2048\n\n| variant | tokens/s | MFU |\n|---|---|---|\n' "$MICRO" > tests/bench/results/train_gpu.md
run eager ""
run compiled "compile: true"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader || true
