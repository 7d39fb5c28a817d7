"""neox-data -> neox-train -> neox-convert on a real local corpus (Python's own sources).

The trained model must beat the corpus' unigram entropy on held-out data (it learned
context), and the converted directory must load in transformers with its tokenizer.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from runtime_helpers import CORPUS_DIR, env, losses, neox_train, write_config
from neox_runtime.data.shards import TokenShards, train_validation_split


def _cli(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_corpus_to_trained_transformers_model(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(Path(CORPUS_DIR).glob("*.py"))[:40]:
        (corpus / f.name).write_bytes(f.read_bytes())
    tokenizer = tmp_path / "tokenizer.json"
    _cli("neox_runtime.data.cli", "train-tokenizer", str(corpus), "--vocab-size", "512", "--output", str(tokenizer))
    _cli("neox_runtime.data.cli", "tokenize", str(corpus), "--tokenizer", str(tokenizer), "--output",
         str(tmp_path / "shards"), "--shards", "4", "--no-progress")
    entropy = json.loads(_cli("neox_runtime.data.cli", "stats", str(tmp_path / "shards")))["unigram_entropy"]

    config = write_config(
        tmp_path / "train.yaml", architecture="tiny", train_data=str(tmp_path / "shards"), seq_length=64,
        micro_batch_size=8, train_steps=80, lr=3e-3, min_lr=3e-4, warmup_steps=5, validation_fraction=0.05,
        checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_interval=40, eval_interval=40, eval_iters=8,
        progress_file=str(tmp_path / "progress.jsonl"), seed=1, peak_tflops=0.1)
    proc = neox_train(config, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    val_loss = records[-1]["val_loss"]
    assert records[-1]["event"] == "done" and records[-1]["latest_checkpoint_step"] == 80
    assert all(r["mfu"] > 0 and r["tokens_per_sec"] > 0 and r["eta_seconds"] >= 0 for r in records)
    assert records[-1]["tokens"] == 80 * 8 * 64
    print(f"val_loss {val_loss:.3f} unigram_entropy {entropy:.3f}")
    assert val_loss < entropy, (val_loss, entropy)
    assert losses(tmp_path / "progress.jsonl")[80] < losses(tmp_path / "progress.jsonl")[1]

    _cli("neox_runtime.checkpoint.convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    model = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert hf_tokenizer.decode(hf_tokenizer.encode("def main():")) == "def main():"
    # transformers' own loss on held-out windows agrees with the trainer's validation loss
    shards = TokenShards(tmp_path / "shards")
    _, val = train_validation_split(shards, 64, 0.05)
    windows = torch.from_numpy(np.stack([val.window(i) for i in range(min(16, val.count))]))
    with torch.no_grad():
        hf_loss = model(windows[:, :-1], labels=windows[:, :-1]).loss.item()  # HF shifts labels itself
    print(f"transformers held-out loss {hf_loss:.3f}")
    assert hf_loss < entropy and math.isfinite(hf_loss)
