"""Load what the server needs from a Hugging Face directory: model, tokenizer, EOS id.

Weights go through `neox_runtime.checkpoint.hf`, the same loader training uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.checkpoint.hf import load_hf_model
from neox_runtime.model import GPTNeoXForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: GPTNeoXForCausalLM
    arch: ModelArchitecture
    tokenizer: Tokenizer
    eos_token_id: int | None


def read_tokenizer(path: Path) -> tuple[Tokenizer, int | None]:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"model path {path}: no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tok_file))
    eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        eos = tokenizer.token_to_id("<|endoftext|>")
    return tokenizer, eos


def load(path: Path, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    model, arch = load_hf_model(path, dtype=DTYPES[dtype], device=device)
    tokenizer, eos = read_tokenizer(Path(path))
    return LoadedModel(model, arch, tokenizer, eos)
