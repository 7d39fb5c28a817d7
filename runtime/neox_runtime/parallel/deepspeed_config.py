"""The DeepSpeed JSON for a TrainConfig (built by `neox_runtime.api.deepspeed`), and the LR schedule.

The learning rate is not DeepSpeed's job here: `lr_at(step)` is a pure function of the
step (linear warmup, cosine to a floor) that the loop sets before every optimizer step,
so resuming at step k gives bit-identical LRs without restoring any scheduler object.
"""

from __future__ import annotations

import math
from typing import Any

from neox_runtime.api import deepspeed as api_deepspeed
from neox_runtime.train.config import TrainConfig


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
    return api_deepspeed.build_deepspeed_config(
        micro_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        data_parallel_size=data_parallel_size, gradient_clipping=cfg.grad_clip, zero_stage=cfg.zero_stage,
        precision=cfg.precision, activation_checkpointing=cfg.activation_checkpointing, overrides=cfg.deepspeed)
