"""Builds the DeepSpeed JSON from a TrainConfig, with the user's overrides deep-merged last.

The learning rate is not DeepSpeed's job here: `lr_at(step)` is a pure function of the
step (linear warmup, cosine to a floor) that the loop sets before every optimizer step,
so resuming at step k gives bit-identical LRs without restoring any scheduler object.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from neox_runtime.train.config import TrainConfig


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge: mappings merge key by key, anything else in `overrides` wins."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR used for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    decay_steps = max(1, cfg.train_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.lr_decay == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_deepspeed_config(cfg: TrainConfig, data_parallel_size: int) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * data_parallel_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 10**9,  # our loop logs
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    }
    if cfg.zero_stage >= 1:
        ds["zero_optimization"].update(reduce_bucket_size=5e7, allgather_bucket_size=5e7,
                                       contiguous_gradients=True, overlap_comm=False)
    if cfg.zero_stage in (1, 2):
        # Elastic ZeRO-1/2 checkpoints reload on another data-parallel size (optimizer state
        # re-partitioned, fp32 master weights restored from the saved fp32 partitions).
        ds["zero_optimization"].update(elastic_checkpoint=True, load_from_fp32_weights=True)
    if cfg.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return deep_merge(ds, cfg.deepspeed)
