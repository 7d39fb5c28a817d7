"""The DeepSpeed JSON, built in one place for both sides.

The operator writes it into the training's ConfigMap (so `kubectl get cm` shows what the
pods run) and the runtime builds the same JSON from its config when it starts the
engine. The user's `deepspeed` overrides are deep-merged last. No optimizer or
scheduler section: the runtime passes its own AdamW and sets the learning rate itself
each step (warmup, then decay to a floor, which DeepSpeed's schedulers cannot express).
"""

from __future__ import annotations

import copy
from typing import Any


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge: mappings merge key by key, anything else in `overrides` wins."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(*, micro_batch_size: int, gradient_accumulation_steps: int,
                           data_parallel_size: int, gradient_clipping: float, zero_stage: int,
                           precision: str, activation_checkpointing: bool,
                           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * data_parallel_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 10**9,  # the runtime logs progress itself
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    }
    if zero_stage >= 1:
        ds["zero_optimization"].update(reduce_bucket_size=5e7, allgather_bucket_size=5e7,
                                       contiguous_gradients=True, overlap_comm=False)
    if zero_stage in (1, 2):
        # Elastic ZeRO-1/2 checkpoints reload on another data-parallel size (optimizer state
        # re-partitioned, fp32 master weights restored from the saved fp32 partitions).
        ds["zero_optimization"].update(elastic_checkpoint=True, load_from_fp32_weights=True)
    if activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return deep_merge(ds, overrides or {})
