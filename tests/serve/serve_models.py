"""Tiny random GPT-NeoX directories and a locally trained tokenizer for the serving tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on generated text,
the weights are transformers' random init saved with `save_pretrained`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

WORDS = ("the model serves tokens quickly while the cluster scales pods and the operator "
         "reconciles state; a request streams text, counts usage and finishes with a stop. "
         "Kubernetes schedules GPUs, training saves checkpoints, safety filters bad words.").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(n)]


def train_tokenizer(path: Path, vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(path))
    return tok


def make_model_dir(path: Path, tokenizer_file: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                   rotary_pct: float = 0.25, parallel_residual: bool = True, act: str = "gelu",
                   key_style: str = "new", max_pos: int = 256, seed: int = 0) -> Path:
    """save_pretrained of a random transformers model; key_style "old" rewrites config.json in 4.x keys."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neox_runtime.api.architecture import ModelArchitecture

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=rotary_pct,
                        use_parallel_residual=parallel_residual, hidden_act=act,
                        max_position_embeddings=max_pos, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg)
    with torch.no_grad():  # larger than the 0.02 init so greedy argmaxes are well separated
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2 if "embed" in name else 0.08)
    model.save_pretrained(path)
    if key_style == "old":
        arch = ModelArchitecture.from_hf_config(json.loads((path / "config.json").read_text()))
        (path / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    (path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return path
