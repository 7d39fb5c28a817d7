"""GPU memory planner: does a NeoXTraining fit before it takes any GPU?

Per-GPU bytes of the busiest rank (the first pipeline stage, which holds the input
embedding and the most in-flight micro batches):

- model states (Rajbhandari et al., "ZeRO", 2020): weights, gradients and Adam states,
  in bytes per parameter by precision, with ZeRO stage 1/2/3 partitioning optimizer
  states / gradients / weights over the data-parallel ranks; parameters are split over
  tensor ranks and pipeline stages;
- activations (Korthikanti et al., "Reducing Activation Recomputation", 2022): per layer
  s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes without recomputation; with activation
  checkpointing only each layer's input (2·s·b·h) is kept, plus one layer's working set
  while it is recomputed; under 1F1B the first stage keeps `pipeline` micro batches;
- the fp32 logits of the last stage, DeepSpeed's gradient buckets, and a fixed allowance
  for the CUDA context, NCCL and allocator fragmentation.

`neox-plan FILE` prints the same estimate as a table.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import yaml

from neox_runtime.api.training import NeoXTrainingSpec

GIB = 1024**3
FRAMEWORK_OVERHEAD = int(2.0 * GIB)  # CUDA context + NCCL + allocator fragmentation
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GRAD_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
OPTIMIZER_BYTES = {"fp32": 8, "fp16": 12, "bf16": 12}  # Adam m, v (+ fp32 master weights)


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU on the busiest rank, by component."""

    parameters_per_gpu: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    buffers: int
    overhead: int
    gpu_memory: int | None

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.logits + self.buffers + self.overhead)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def summary(self) -> str:
        limit = f" of {self.gpu_memory / GIB:.1f} GiB" if self.gpu_memory else ""
        return (f"{self.total / GIB:.1f} GiB per GPU{limit} (weights {self.weights / GIB:.1f}, "
                f"gradients {self.gradients / GIB:.1f}, optimizer {self.optimizer / GIB:.1f}, "
                f"activations {self.activations / GIB:.1f}, logits {self.logits / GIB:.1f}, "
                f"buffers+overhead {(self.buffers + self.overhead) / GIB:.1f})")


def _stage_parameters(spec: NeoXTrainingSpec) -> int:
    """Parameters on one GPU of the first pipeline stage (embedding + its layers), over tensor ranks."""
    arch, par = spec.architecture(), spec.parallelism
    h, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    per_layer = 4 * h + 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h
    layers = math.ceil(arch.num_hidden_layers / par.pipeline)
    embeddings = v * h * (1 if par.pipeline > 1 or arch.tie_word_embeddings else 2)
    return (layers * per_layer + embeddings) // par.tensor


def _activations(spec: NeoXTrainingSpec) -> int:
    arch, par, tr = spec.architecture(), spec.parallelism, spec.training
    s, b, h, a, t = tr.seq_length, tr.micro_batch_size, arch.hidden_size, arch.num_attention_heads, par.tensor
    full_layer = int(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    layers = math.ceil(arch.num_hidden_layers / par.pipeline)
    in_flight = min(par.pipeline, tr.gradient_accumulation_steps) if par.pipeline > 1 else 1
    if tr.activation_checkpointing:
        return in_flight * layers * 2 * s * b * h + full_layer
    return in_flight * layers * full_layer


def _buffers(spec: NeoXTrainingSpec, resolved_deepspeed: dict | None) -> int:
    zero = (resolved_deepspeed or {}).get("zero_optimization", {})
    if spec.training.zero_stage == 0 or spec.parallelism.data_parallel == 1:
        return 0
    bucket = int(zero.get("reduce_bucket_size", 500_000_000))
    copies = 2 if zero.get("overlap_comm", True) else 1
    return min(bucket, _stage_parameters(spec)) * GRAD_BYTES[spec.training.precision] * copies


def estimate(spec: NeoXTrainingSpec, gpu_memory_bytes: int | None = None,
             deepspeed: dict | None = None) -> Estimate:
    par, tr = spec.parallelism, spec.training
    params = _stage_parameters(spec)
    dp, stage = par.data_parallel, tr.zero_stage
    weights = params * WEIGHT_BYTES[tr.precision] // (dp if stage >= 3 else 1)
    gradients = params * GRAD_BYTES[tr.precision] // (dp if stage >= 2 else 1)
    optimizer = params * OPTIMIZER_BYTES[tr.precision] // (dp if stage >= 1 else 1)
    logits_divisor = par.tensor
    logits = tr.seq_length * tr.micro_batch_size * spec.architecture().vocab_size * 4 // logits_divisor
    return Estimate(parameters_per_gpu=params, weights=weights, gradients=gradients,
                    optimizer=optimizer, activations=_activations(spec), logits=logits,
                    buffers=_buffers(spec, deepspeed), overhead=FRAMEWORK_OVERHEAD,
                    gpu_memory=gpu_memory_bytes)


def gpu_memory_bytes(spec: NeoXTrainingSpec, node_labels: list[dict[str, str]]) -> int | None:
    """GPU memory from the spec, else the largest `nvidia.com/gpu.memory` (MiB) of matching nodes."""
    if spec.resources.gpu_memory_gib is not None:
        return int(spec.resources.gpu_memory_gib * GIB)
    selector = spec.scheduling.node_selector or {}
    sizes = [int(labels["nvidia.com/gpu.memory"]) * 1024**2 for labels in node_labels
             if labels.get("nvidia.com/gpu.memory", "").isdigit()
             and all(labels.get(k) == v for k, v in selector.items())]
    return max(sizes) if sizes else None


def table(spec: NeoXTrainingSpec, est: Estimate) -> str:
    arch, par, tr = spec.architecture(), spec.parallelism, spec.training
    rows = [
        ("model parameters", f"{arch.num_parameters() / 1e9:.2f} B"),
        ("layout", f"{par.nodes} nodes × {par.gpus_per_node} GPUs: tensor {par.tensor}, "
                   f"pipeline {par.pipeline}, data {par.data_parallel}"),
        ("training", f"{tr.precision}, ZeRO-{tr.zero_stage}, micro batch {tr.micro_batch_size}, "
                     f"seq {tr.seq_length}, activation checkpointing "
                     f"{'on' if tr.activation_checkpointing else 'off'}"),
        ("parameters per GPU", f"{est.parameters_per_gpu / 1e9:.3f} B"),
        ("weights", _gib(est.weights)), ("gradients", _gib(est.gradients)),
        ("optimizer states", _gib(est.optimizer)), ("activations", _gib(est.activations)),
        ("logits (fp32)", _gib(est.logits)), ("communication buffers", _gib(est.buffers)),
        ("CUDA/NCCL overhead", _gib(est.overhead)), ("total per GPU", _gib(est.total)),
        ("GPU memory", _gib(est.gpu_memory) if est.gpu_memory else "unknown"),
        ("fits", {True: "yes", False: "NO", None: "unknown"}[est.fits]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f} GiB"


def load_spec(path: str) -> NeoXTrainingSpec:
    with open(path) as f:
        document = yaml.safe_load(f)
    return NeoXTrainingSpec.model_validate(document.get("spec", document))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neox-plan", description="Estimate per-GPU memory of a NeoXTraining.")
    parser.add_argument("file", help="NeoXTraining manifest or bare spec (YAML)")
    parser.add_argument("--gpu-memory-gib", type=float, help="GPU memory (default: spec.resources.gpuMemoryGiB)")
    args = parser.parse_args(argv)
    spec = load_spec(args.file)
    memory = args.gpu_memory_gib or spec.resources.gpu_memory_gib
    from neox_runtime.api.resolved import deepspeed_config
    ds = deepspeed_config(spec)
    est = estimate(spec, int(memory * GIB) if memory else None, ds)
    print(table(spec, est))
    return 0 if est.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
