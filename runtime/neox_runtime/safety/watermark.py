"""Output watermarking (Kirchenbauer et al. 2023, "A Watermark for Large Language Models").

At each step a secret-keyed hash of the previous token splits the vocabulary into a
"green" fraction gamma and the rest; the logits processor adds delta to green tokens.
The detector re-tokenizes a text, counts green tokens (each distinct bigram once) and reports
z = (green - gamma T) / sqrt(T gamma (1 - gamma)); unwatermarked text has z near 0.
The green list is a vectorised integer hash (no per-step RNG), so marking a whole batch
costs a few tensor ops and detection needs only the key and the tokenizer.
With no key configured the processor is not installed, so outputs are bit-identical.

CLI: `neox-watermark detect --key-file K --tokenizer DIR/tokenizer.json [TEXT | -]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

_M32 = 0xFFFFFFFF


def _key_int(secret: str) -> int:
    return int.from_bytes(hashlib.sha256(secret.encode()).digest()[:4], "little")


def _mix(x):
    """A 32-bit avalanche hash in int64 arithmetic (every product stays below 2**63).

    Works on int64 torch tensors (the sampler, on the logits' device) and numpy arrays (the
    detector, which runs on the HTTP thread and must not start a torch thread pool there).
    """
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def green_mask(prev, candidates, key: int, gamma: float):
    """True where candidate token is green after token `prev`; broadcasts prev (M, 1) x candidates (V,), int64."""
    seed = _mix(prev * 0x9E3779B1 + key)
    h = _mix(seed ^ candidates)
    return h < int(gamma * (1 << 32))


class WatermarkProcessor:
    """Logits processor for the engine's sampler; marks rows whose params ask for it."""

    def __init__(self, secret: str, gamma: float = 0.25, delta: float = 2.0):
        if not 0 < gamma < 1:
            raise ValueError("watermark gamma must be in (0, 1)")
        self.key, self.gamma, self.delta = _key_int(secret), gamma, delta

    def __call__(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        rows = [r for r, s in enumerate(seqs) if s.params.watermark]
        if not rows:
            return logits
        prev = torch.tensor([seqs[r].all_ids[-1] for r in rows], device=logits.device)[:, None]
        vocab = torch.arange(logits.shape[1], device=logits.device)
        bonus = green_mask(prev, vocab, self.key, self.gamma).to(logits.dtype) * self.delta
        logits = logits.clone()
        logits[rows] += bonus
        return logits


@dataclass
class Detection:
    z_score: float
    num_tokens: int
    num_green: int
    green_fraction: float
    watermarked: bool


def detect_ids(ids: list[int], secret: str, gamma: float = 0.25, threshold: float = 4.0) -> Detection:
    """Score a token sequence; each token after the first is judged by its predecessor.

    Each distinct (previous, token) pair counts once: repeated bigrams are not
    independent trials and would inflate z on repetitive text (as HF's detector's
    ignore_repeated_ngrams does).
    """
    pairs = sorted(set(zip(ids[:-1], ids[1:])))
    if not pairs:
        return Detection(0.0, 0, 0, 0.0, False)
    t = np.array(pairs, dtype=np.int64)
    green = green_mask(t[:, 0], t[:, 1], _key_int(secret), gamma)
    n, g = len(pairs), int(green.sum())
    z = (g - gamma * n) / math.sqrt(n * gamma * (1 - gamma))
    return Detection(z, n, g, g / n, z >= threshold)


def detect_text(text: str, tokenizer, secret: str, gamma: float = 0.25, threshold: float = 4.0) -> Detection:
    return detect_ids(tokenizer.encode(text).ids, secret, gamma, threshold)


def main(argv: list[str] | None = None) -> int:
    from tokenizers import Tokenizer

    parser = argparse.ArgumentParser(prog="neox-watermark", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("detect", help="score a text for the watermark; prints JSON with z_score")
    d.add_argument("text", nargs="?", default="-", help="text to score, or - for stdin")
    d.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json, or a model directory")
    key = d.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", help="the watermark secret")
    key.add_argument("--key-file", type=Path, help="file holding the watermark secret")
    d.add_argument("--gamma", type=float, default=0.25)
    d.add_argument("--threshold", type=float, default=4.0, help="z-score above which text counts as watermarked")
    args = parser.parse_args(argv)
    tok_path = args.tokenizer / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer
    secret = args.key if args.key is not None else args.key_file.read_text().strip()
    text = sys.stdin.read() if args.text == "-" else args.text
    result = detect_text(text, Tokenizer.from_file(str(tok_path)), secret, args.gamma, args.threshold)
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
