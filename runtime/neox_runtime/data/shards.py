"""Memory-mapped token shards and the deterministic, resumable sampler that reads them.

On disk a dataset is a directory with `manifest.json` and, per shard, `NAME.bin` (tokens,
uint16 or uint32, documents back to back, each ending in the EOS token) and `NAME.idx`
(uint64 start offsets of the documents, plus the end). Training reads the shards as one
token stream cut into windows of seq_length + 1 tokens at stride seq_length (GPT-NeoX
packing). The last `validation_fraction` of the windows is held out.

The sampler's whole state is one integer, the number of global samples consumed. Global
sample g is window perm_epoch[g mod n] with a permutation seeded by (seed, epoch), so the
sequence never depends on how often the run stopped, nor on the data-parallel size: each
global batch is cut into DP slices, so a run resumed on another DP size goes on with
exactly the next global samples.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_shard(directory: Path, name: str, documents: list[np.ndarray], dtype: np.dtype) -> dict:
    """Write one shard from token arrays (EOS already appended); returns its manifest entry."""
    lengths = np.array([len(d) for d in documents], dtype=np.uint64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64)
    tokens = np.concatenate(documents).astype(dtype) if documents else np.zeros(0, dtype)
    tokens.tofile(directory / f"{name}.bin")
    offsets.tofile(directory / f"{name}.idx")
    return {"name": name, "tokens": int(len(tokens)), "documents": len(documents)}


def write_manifest(directory: Path, shards: list[dict], *, vocab_size: int, eos_token_id: int,
                   tokenizer: str | None = None) -> None:
    manifest = {"format": "neox-shards/v1", "dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size,
                "eos_token_id": eos_token_id, "tokenizer": tokenizer,
                "total_tokens": sum(s["tokens"] for s in shards),
                "shards": sorted(shards, key=lambda s: s["name"])}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)


class TokenShards:
    """All shards of a dataset as one memory-mapped token stream."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"train_data: {directory} has no {MANIFEST} (make shards with neox-data)")
        self.manifest = json.loads(manifest_path.read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.tokens = [np.memmap(self.directory / f"{s['name']}.bin", dtype=dtype, mode="r")
                       for s in self.manifest["shards"] if s["tokens"]]
        self.starts = np.concatenate([[0], np.cumsum([len(t) for t in self.tokens])]).tolist()
        self.total_tokens = self.starts[-1]
        self.vocab_size: int = self.manifest["vocab_size"]

    def documents(self, shard: str) -> np.ndarray:
        return np.fromfile(self.directory / f"{shard}.idx", dtype=np.uint64)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated stream, across shard borders."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        i = bisect.bisect_right(self.starts, start) - 1
        while filled < length:
            local = start + filled - self.starts[i]
            piece = self.tokens[i][local:local + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            i += 1
        return out

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the token unigram distribution: the loss of a model that ignores context."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for t in self.tokens:
            counts += np.bincount(t, minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class Split:
    """A contiguous range of windows [first, first + count) of seq_length + 1 tokens."""

    shards: TokenShards
    seq_length: int
    first: int
    count: int

    def window(self, i: int) -> np.ndarray:
        return self.shards.read((self.first + i) * self.seq_length, self.seq_length + 1)


def train_validation_split(shards: TokenShards, seq_length: int, validation_fraction: float) -> tuple[Split, Split]:
    windows = (shards.total_tokens - 1) // seq_length
    n_val = int(round(windows * validation_fraction))
    if validation_fraction > 0:
        n_val = max(1, n_val)
    if windows - n_val < 1:
        raise ValueError(f"train_data: {shards.total_tokens} tokens make {windows} windows of seq_length "
                         f"{seq_length}; too few for a validation_fraction of {validation_fraction}")
    return Split(shards, seq_length, 0, windows - n_val), Split(shards, seq_length, windows - n_val, n_val)


class ResumableSampler:
    """Global sample g -> window index; state is `consumed` (global samples handed out)."""

    def __init__(self, num_windows: int, seed: int, consumed: int = 0):
        self.num_windows = num_windows
        self.seed = seed
        self.consumed = consumed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def index(self, g: int) -> int:
        epoch, pos = divmod(g, self.num_windows)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._perm[pos])

    def next_batch(self, global_batch: int, dp_rank: int, dp_size: int) -> list[int]:
        """This rank's windows of the next global batch (rank-major contiguous slice); advances."""
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by data-parallel size {dp_size}")
        per_rank = global_batch // dp_size
        start = self.consumed + dp_rank * per_rank
        self.consumed += global_batch
        return [self.index(g) for g in range(start, start + per_rank)]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.num_windows or state["seed"] != self.seed:
            raise ValueError("train_data/seed: the checkpoint was made on a different dataset or seed "
                             f"({state['num_windows']} windows, seed {state['seed']}); refusing to resume")
        self.consumed = state["consumed"]


def batches(split: Split, sampler: ResumableSampler, micro_batch: int, accumulation: int, dp_rank: int,
            dp_size: int) -> Iterator[list[np.ndarray]]:
    """Per optimizer step: this rank's micro-batches, each (micro_batch, seq_length + 1) int64."""
    while True:
        idx = sampler.next_batch(micro_batch * accumulation * dp_size, dp_rank, dp_size)
        windows = np.stack([split.window(i) for i in idx])
        yield [windows[j * micro_batch:(j + 1) * micro_batch] for j in range(accumulation)]
