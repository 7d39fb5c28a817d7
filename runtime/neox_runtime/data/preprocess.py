"""Raw text / JSONL -> token shards, on Ray Data; and a small BPE tokenizer trainer.

Inputs are split into shard-sized groups of files; each group is one Ray task that reads,
tokenizes (Hugging Face `tokenizers`, batch encode) and writes `shard-NNNNN.bin/.idx`
straight to the output directory (a shared volume on a cluster). The driver only
collects the manifest entries, shows a progress bar and a tokens/s figure, and writes
`manifest.json` last, so a half-finished run is never mistaken for a dataset.

A `.jsonl` input holds one document per line under `text_key`; any other file is one
document. Every document ends with the tokenizer's end-of-text token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from neox_runtime.data.shards import token_dtype, write_manifest, write_shard

EOS_TOKEN = "<|endoftext|>"


def list_inputs(paths: Iterable[str | Path], glob: str = "**/*") -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.glob(glob) if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"input: no such file or directory {p}")
    if not files:
        raise ValueError("input: no files to read")
    return files


def read_documents(path: Path, text_key: str = "text") -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            if text_key not in record:
                raise ValueError(f"--text-key: line {n} of {path} has no {text_key!r} field")
            docs.append(str(record[text_key]))
    return docs


def train_tokenizer(inputs: Iterable[str | Path], vocab_size: int, output: str | Path,
                    glob: str = "**/*", text_key: str = "text") -> Path:
    """Byte-level BPE like GPT-NeoX's, id 0 = <|endoftext|>; for tests and small corpora."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError("--vocab-size: must be >= 300 (256 bytes + merges + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = list_inputs(inputs, glob)
    tokenizer.train_from_iterator((d for f in files for d in read_documents(f, text_key)), trainer=trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output))
    return output


def _tokenize_group(item: dict) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(item["tokenizer"])
    eos = tokenizer.token_to_id(EOS_TOKEN)
    dtype = token_dtype(tokenizer.get_vocab_size())
    docs = [d for f in item["files"] for d in read_documents(Path(f), item["text_key"])]
    encoded = [np.array(e.ids + [eos], dtype=dtype) for e in tokenizer.encode_batch(docs)] if docs else []
    entry = write_shard(Path(item["output"]), item["name"], encoded, dtype)
    return {"entry": json.dumps(entry)}


@dataclass
class PreprocessResult:
    output: Path
    shards: int
    documents: int
    tokens: int
    seconds: float

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def preprocess(inputs: Iterable[str | Path], tokenizer_file: str | Path, output: str | Path, *,
               num_shards: int = 8, text_key: str = "text", glob: str = "**/*", address: str | None = None,
               num_cpus: int = 2, progress: bool = True) -> PreprocessResult:
    import ray
    from tqdm import tqdm

    tokenizer_json = Path(tokenizer_file).read_text()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"--tokenizer: {tokenizer_file} has no {EOS_TOKEN} token")
    files = list_inputs(inputs, glob)
    if num_shards < 1:
        raise ValueError("--shards: must be >= 1")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    groups = [files[i::num_shards] for i in range(min(num_shards, len(files)))]
    items = [{"name": f"shard-{i:05d}", "files": [str(f) for f in g], "tokenizer": tokenizer_json,
              "text_key": text_key, "output": str(output)} for i, g in enumerate(groups)]

    started = time.perf_counter()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(_tokenize_group)
    entries, tokens = [], 0
    with tqdm(total=len(items), unit="shard", disable=not progress) as bar:
        for row in dataset.iter_rows():
            entry = json.loads(row["entry"])
            entries.append(entry)
            tokens += entry["tokens"]
            bar.update(1)
            bar.set_postfix(tokens=tokens, tok_per_s=f"{tokens / (time.perf_counter() - started):,.0f}")
    write_manifest(output, entries, vocab_size=tokenizer.get_vocab_size(), eos_token_id=eos,
                   tokenizer=str(Path(tokenizer_file).resolve()))
    seconds = time.perf_counter() - started
    return PreprocessResult(output, len(entries), sum(e["documents"] for e in entries), tokens, seconds)
