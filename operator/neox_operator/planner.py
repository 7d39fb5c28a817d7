"""Memory planner: does a NeoXTraining fit, on its GPUs and in its pods' memory, before it starts?

Where each parameter lives comes from the one layout (api/layout): the pipeline partition
(`ParallelLayout.stage_layers`) and what a rank allocates (`parameters_on_rank`: its stage's
blocks split over tensor ranks, the vocab-parallel embedding on the first stage, the final
norm and the vocab-parallel head on the last). Every stage is estimated and the busiest
one reported: the first holds the embedding and, under 1F1B, the most micro batches in
flight; the last holds the head and the logits.

Per GPU of one stage:
- model states (Rajbhandari et al., "ZeRO", 2020): weights, gradients and Adam states, in
  bytes per parameter by precision, ZeRO stage 1/2/3 partitioning optimizer states /
  gradients / weights over the data-parallel ranks;
- activations (Korthikanti et al., "Reducing Activation Recomputation", 2022): per layer
  s·b·h·(10 + 24/t) bytes without recomputation, plus 4·a·s·b/t for the attention's
  softmax statistics: the paper's 5·a·s²·b/t for scores, softmax and dropout are never
  stored, because the runtime's attention is `scaled_dot_product_attention` (flash or
  memory-efficient kernels, no attention dropout). With activation checkpointing only each
  layer's input (2·s·b·h) is kept, plus one layer's working set while it is recomputed;
  under 1F1B stage p keeps min(pipeline - p, micro batches) in flight;
- the last stage's fp32 logits (its vocabulary slice), DeepSpeed's gradient buckets, and a
  fixed allowance for the CUDA context, NCCL and allocator fragmentation.

Per rank on the host (the pod's memory holds ranks-per-node of them):
- the process itself: Python, torch, DeepSpeed, and on GPU the CUDA context and libraries;
- start-up (parallel/startup): the model is built on the meta device and each parameter
  slice is drawn (or read) and moved to the GPU one at a time, so the host holds about two
  slices in fp32 and one generator chunk; with `init_from`, the rank's whole shard is read
  first (counted in fp32, the worst case);
- checkpoints: torch.save copies each GPU storage to the host one at a time, and the
  largest is ZeRO's flat fp32 partition of the rank's parameters;
- on CPU the model states, activations and logits themselves.

`neox-plan FILE` prints the same estimate as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass

import yaml

from neox_runtime.api import layout
from neox_runtime.api.layout import Coordinates, parameters_on_rank
from neox_runtime.api.training import NeoXTrainingSpec

GIB = 1024**3
FRAMEWORK_OVERHEAD = int(2.0 * GIB)  # CUDA context + NCCL + allocator fragmentation, on the GPU
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GRAD_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
OPTIMIZER_BYTES = {"fp32": 8, "fp16": 12, "bf16": 12}  # Adam m, v (+ fp32 master weights)
# Host memory of a rank's process before any model: Python, torch and DeepSpeed imported
# (0.6 GiB measured on CPU) plus the data loader; on GPU also the CUDA context, cuBLAS and
# NCCL (an allowance, not measured here).
HOST_PROCESS = {"cpu": int(1.0 * GIB), "gpu": int(3.0 * GIB)}
START_UP_CHUNK_BYTES = layout.INIT_CHUNK_ELEMENTS * 4  # fp32 rows drawn together at sharded start-up
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


@dataclass(frozen=True)
class HostEstimate:
    """Bytes of host memory per rank, by component, and what one pod holds."""

    process: int
    start_up: int  # peak while the rank materialises its shard
    checkpoint_staging: int  # peak while a checkpoint is written
    model_states: int  # on CPU: weights, gradients, optimizer, activations, logits (0 on GPU)
    ranks_per_node: int
    pod_memory: int | None  # spec.resources.memory

    @property
    def per_rank(self) -> int:
        return self.process + self.model_states + max(self.start_up, self.checkpoint_staging)

    @property
    def per_pod(self) -> int:
        return self.ranks_per_node * self.per_rank

    @property
    def fits(self) -> bool | None:
        return None if self.pod_memory is None else self.per_pod <= self.pod_memory

    def summary(self) -> str:
        limit = f" of {self.pod_memory / GIB:.1f} GiB (spec.resources.memory)" if self.pod_memory else ""
        return (f"host {self.per_rank / GIB:.1f} GiB per rank × {self.ranks_per_node} ranks = "
                f"{self.per_pod / GIB:.1f} GiB per pod{limit}")


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU on the busiest rank, by component, and the host memory of a rank."""

    stage: int  # pipeline stage of the busiest rank
    stages: int
    parameters_per_gpu: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    buffers: int
    overhead: int
    gpu_memory: int | None
    host: HostEstimate | None = None  # set by `estimate`: the largest of any stage

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.logits + self.buffers + self.overhead)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def summary(self) -> str:
        limit = f" of {self.gpu_memory / GIB:.1f} GiB" if self.gpu_memory else ""
        where = f"pipeline stage {self.stage} of {self.stages}; " if self.stages > 1 else ""
        return (f"{self.total / GIB:.1f} GiB per GPU{limit} ({where}weights {self.weights / GIB:.1f}, "
                f"gradients {self.gradients / GIB:.1f}, optimizer {self.optimizer / GIB:.1f}, "
                f"activations {self.activations / GIB:.1f}, logits {self.logits / GIB:.1f}, "
                f"buffers+overhead {(self.buffers + self.overhead) / GIB:.1f})"
                + (f"; {self.host.summary()}" if self.host else ""))


def stage_parameters(spec: NeoXTrainingSpec) -> list[int]:
    """Parameters on one rank of each pipeline stage (every tensor and data rank of a stage holds as many)."""
    arch, layout = spec.architecture(), spec.parallelism.layout()
    return [parameters_on_rank(arch, layout, Coordinates(pipe=p, data=0, model=0)) for p in range(layout.pipeline)]


def _activations(spec: NeoXTrainingSpec, stage: int) -> int:
    arch, par, tr = spec.architecture(), spec.parallelism, spec.training
    s, b, h, a, t = tr.seq_length, tr.micro_batch_size, arch.hidden_size, arch.num_attention_heads, par.tensor
    full_layer = int(s * b * h * (10 + 24 / t)) + 4 * a * s * b // t
    layers = len(par.layout().stage_layers(arch.num_hidden_layers)[stage])
    in_flight = min(par.pipeline - stage, tr.gradient_accumulation_steps)  # 1F1B; 1 without a pipeline
    if tr.activation_checkpointing:
        return in_flight * layers * 2 * s * b * h + full_layer
    return in_flight * layers * full_layer


def _buffers(spec: NeoXTrainingSpec, params: int, resolved_deepspeed: dict | None) -> int:
    zero = (resolved_deepspeed or {}).get("zero_optimization", {})
    if spec.training.zero_stage == 0 or spec.parallelism.data_parallel == 1:
        return 0
    bucket = int(zero.get("reduce_bucket_size", 500_000_000))
    copies = 2 if zero.get("overlap_comm", True) else 1
    return min(bucket, params) * GRAD_BYTES[spec.training.precision] * copies


def _stage(spec: NeoXTrainingSpec, stage: int, params: int, gpu_memory: int | None,
           deepspeed: dict | None) -> Estimate:
    par, tr = spec.parallelism, spec.training
    dp, zero = par.data_parallel, tr.zero_stage
    last = stage == par.pipeline - 1
    logits = tr.seq_length * tr.micro_batch_size * spec.architecture().vocab_size * 4 // par.tensor if last else 0
    return Estimate(
        stage=stage, stages=par.pipeline, parameters_per_gpu=params,
        weights=params * WEIGHT_BYTES[tr.precision] // (dp if zero >= 3 else 1),
        gradients=params * GRAD_BYTES[tr.precision] // (dp if zero >= 2 else 1),
        optimizer=params * OPTIMIZER_BYTES[tr.precision] // (dp if zero >= 1 else 1),
        activations=_activations(spec, stage), logits=logits, buffers=_buffers(spec, params, deepspeed),
        overhead=FRAMEWORK_OVERHEAD if par.gpus_per_node else 0, gpu_memory=gpu_memory)


def _largest_slice(spec: NeoXTrainingSpec, stage: int) -> int:
    """Elements of the largest parameter slice a rank of `stage` holds (the vocab slice at the ends)."""
    arch, t = spec.architecture(), spec.parallelism.tensor
    h, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    ends = stage in (0, spec.parallelism.pipeline - 1)
    return max(3 * h * h // t, f * h // t, v * h // t if ends else 0)


def _host(spec: NeoXTrainingSpec, stage: int, params: int, device: Estimate | None) -> HostEstimate:
    """Host bytes of one rank of `stage`; `device` is the stage's estimate on CPU (where it lives on the host)."""
    par, tr = spec.parallelism, spec.training
    shard_read = params * 4 if spec.model.init_from else 0
    if device is None:  # GPU: slices pass through the host on their way to the GPU
        start_up = shard_read + 2 * _largest_slice(spec, stage) * 4 + START_UP_CHUNK_BYTES
        staging = params * 4 // (par.data_parallel if tr.zero_stage >= 1 else 1)
        states = 0
    else:  # CPU: the slices are the parameters; torch.save writes host storages in place
        start_up, staging, states = shard_read, 0, device.total
    return HostEstimate(process=HOST_PROCESS["gpu" if par.gpus_per_node else "cpu"], start_up=start_up,
                        checkpoint_staging=staging, model_states=states, ranks_per_node=par.ranks_per_node,
                        pod_memory=quantity_bytes(spec.resources.memory) if spec.resources.memory else None)


def estimate(spec: NeoXTrainingSpec, gpu_memory_bytes: int | None = None,
             deepspeed: dict | None = None) -> Estimate:
    """The busiest stage's per-GPU estimate, with the largest host figure of any stage."""
    on_gpu = spec.parallelism.gpus_per_node > 0
    stages = [_stage(spec, stage, params, gpu_memory_bytes, deepspeed)
              for stage, params in enumerate(stage_parameters(spec))]
    hosts = [_host(spec, s.stage, s.parameters_per_gpu, None if on_gpu else s) for s in stages]
    busiest = max(stages, key=lambda s: s.total)  # the first stage wins a tie
    return dataclasses.replace(busiest, host=max(hosts, key=lambda h: h.per_rank))


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity ("64Gi", "500M", "1.5Gi") in bytes."""
    match = _QUANTITY.match(quantity)
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


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
    host = est.host
    rows = [
        ("model parameters", f"{arch.num_parameters() / 1e9:.2f} B"),
        ("layout", f"{par.nodes} nodes × {par.gpus_per_node} GPUs: tensor {par.tensor}, "
                   f"pipeline {par.pipeline}, data {par.data_parallel}"),
        ("training", f"{tr.precision}, ZeRO-{tr.zero_stage}, micro batch {tr.micro_batch_size}, "
                     f"seq {tr.seq_length}, activation checkpointing "
                     f"{'on' if tr.activation_checkpointing else 'off'}"),
        ("busiest rank", f"pipeline stage {est.stage} of {est.stages}"),
        ("parameters per GPU", f"{est.parameters_per_gpu / 1e9:.3f} B"),
        ("weights", _gib(est.weights)), ("gradients", _gib(est.gradients)),
        ("optimizer states", _gib(est.optimizer)), ("activations", _gib(est.activations)),
        ("logits (fp32)", _gib(est.logits)), ("communication buffers", _gib(est.buffers)),
        ("CUDA/NCCL overhead", _gib(est.overhead)), ("total per GPU", _gib(est.total)),
        ("GPU memory", _gib(est.gpu_memory) if est.gpu_memory else "unknown"),
        ("fits", {True: "yes", False: "NO", None: "unknown"}[est.fits]),
        ("host per rank", f"{_gib(host.per_rank)} (process {host.process / GIB:.1f}, start-up "
                          f"{host.start_up / GIB:.1f}, checkpoint staging {host.checkpoint_staging / GIB:.1f}, "
                          f"model on host {host.model_states / GIB:.1f})"),
        ("host per pod", f"{_gib(host.per_pod)} ({host.ranks_per_node} ranks)"),
        ("pod memory", _gib(host.pod_memory) if host.pod_memory else "unknown (spec.resources.memory)"),
        ("fits in pod memory", {True: "yes", False: "NO", None: "unknown"}[host.fits]),
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
    parser = argparse.ArgumentParser(prog="neox-plan", description="Estimate per-GPU and host memory of a NeoXTraining.")
    parser.add_argument("file", help="NeoXTraining manifest or bare spec (YAML)")
    parser.add_argument("--gpu-memory-gib", type=float, help="GPU memory (default: spec.resources.gpuMemoryGiB)")
    args = parser.parse_args(argv)
    spec = load_spec(args.file)
    memory = args.gpu_memory_gib or spec.resources.gpu_memory_gib
    from neox_runtime.api.resolved import deepspeed_config
    ds = deepspeed_config(spec)
    est = estimate(spec, int(memory * GIB) if memory else None, ds)
    print(table(spec, est))
    return 0 if est.fits is not False and est.host.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
