"""Build an `LLMEngine` from the config: size the KV cache, start TP workers if asked."""

from __future__ import annotations

import torch

from neox_runtime.serve.config import EngineConfig
from neox_runtime.serve.engine.core import LLMEngine
from neox_runtime.serve.engine.kv_cache import KVCache, kv_cache_dtype
from neox_runtime.serve.engine.runner import ModelRunner
from neox_runtime.serve.engine.sampler import LogitsProcessor
from neox_runtime.serve.loader import DTYPES, LoadedModel, load
from neox_runtime.serve.metrics import ServerMetrics


def cache_shape(cfg: EngineConfig, loaded: LoadedModel) -> tuple[int, int]:
    """(slots, max_len): max_num_seqs slots of max_model_len, fewer if kv_cache_bytes says so."""
    arch = loaded.arch
    max_len = min(cfg.max_model_len or min(arch.max_position_embeddings, 2048), arch.max_position_embeddings)
    slots = cfg.max_num_seqs
    if cfg.kv_cache_bytes is not None:
        per_slot = KVCache.bytes_per_slot(num_layers=arch.num_hidden_layers,
                                          num_heads=arch.num_attention_heads // cfg.tensor_parallel,
                                          max_len=max_len, head_dim=arch.head_dim,
                                          dtype=kv_cache_dtype(DTYPES[cfg.dtype], cfg.device))
        slots = min(slots, cfg.kv_cache_bytes // per_slot)
        if slots < 1:
            raise ValueError(f"kv_cache_bytes={cfg.kv_cache_bytes} holds no sequence of {max_len} tokens "
                             f"({per_slot} bytes each)")
    return slots, max_len


def build_engine(cfg: EngineConfig, *, loaded: LoadedModel | None = None,
                 processors: list[LogitsProcessor] | None = None,
                 metrics: ServerMetrics | None = None) -> tuple[LLMEngine, LoadedModel]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = loaded or load(cfg.model, cfg.dtype, cfg.device)
    slots, max_len = cache_shape(cfg, loaded)
    if cfg.tensor_parallel > 1:
        from neox_runtime.serve.engine.tp import TensorParallelExecutor
        executor = TensorParallelExecutor(cfg, loaded, num_slots=slots, max_len=max_len)
    else:
        executor = ModelRunner(loaded.model, loaded.arch, num_slots=slots, max_len=max_len)
    engine = LLMEngine(executor=executor, tokenizer=loaded.tokenizer, num_slots=slots, max_len=max_len,
                       max_num_batched_tokens=cfg.max_num_batched_tokens,
                       eos_token_id=loaded.eos_token_id, processors=processors, metrics=metrics)
    return engine, loaded
