"""The planner on the one layout: per-stage parameters, the busiest stage, host memory, feasibility.

Published-recipe figures (GPT-NeoX-20B: pipeline 4 × tensor 2 × data 12 on 40 GiB GPUs,
fp16, ZeRO-1, micro batch 4, activation checkpointing), and why they moved:
- before: 24.6 GiB per GPU. It added the last stage's fp32 logits (0.77 GiB) to the first
  stage's model states and activations, and counted the attention scores, softmax and
  dropout of the recomputed layer (5·a·s²·b/t, 2.5 GiB) that the runtime's
  scaled_dot_product_attention never stores.
- now: each stage on its own; the first (embedding, 4 micro batches in flight) is the busiest
  at 19.6 GiB; the last (head, logits, 1 in flight) 19.0 GiB. Sharding the embedding and head
  by vocabulary leaves the first stage's parameters at 2.647 B: the old planner already
  divided the embedding by the tensor degree; it now also keeps LayerNorms and row-parallel
  biases whole on every tensor rank, as the runtime does (+0.4 M).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from neox_operator import planner
from neox_operator.reconcile import Observed, reconcile
from neox_runtime.api.layout import Coordinates, parameters_on_rank
from neox_runtime.api.resolved import deepspeed_config
from neox_runtime.api.training import NeoXTrainingSpec

GIB = 1024**3
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def spec_of(preset: str = "neox-20b", parallelism: dict | None = None, training: dict | None = None,
            **extra) -> NeoXTrainingSpec:
    return NeoXTrainingSpec.model_validate({
        "model": {"preset": preset}, "data": {"path": "/d"},
        "parallelism": {"gpusPerNode": 8, **(parallelism or {})},
        "training": {"steps": 10, "precision": "fp16", "zeroStage": 1, "microBatchSize": 4, "seqLength": 2048,
                     "activationCheckpointing": True, "gradientAccumulationSteps": 32, **(training or {})},
        **extra})


def published_20b(**extra) -> NeoXTrainingSpec:
    return spec_of(parallelism={"nodes": 12, "tensor": 2, "pipeline": 4}, **extra)


@pytest.mark.parametrize("preset,parallelism", [
    ("neox-20b", {"nodes": 12, "tensor": 2, "pipeline": 4}),
    ("pythia-1b", {"nodes": 1, "tensor": 2, "pipeline": 4}),
    ("pythia-160m", {"nodes": 2, "tensor": 4, "pipeline": 1}),
    ("pythia-70m", {"nodes": 1, "tensor": 1, "pipeline": 4}),  # 6 layers: stages of 2, 2, 1, 1
    ("pythia-410m", {"nodes": 3, "gpusPerNode": 4, "tensor": 2, "pipeline": 3}),
    ("tiny", {"nodes": 1, "gpusPerNode": 1}),
])
def test_planner_parameters_per_rank_are_the_layouts(preset, parallelism):
    """Every rank of a stage holds what `parameters_on_rank` says (the runtime's allocation is held
    against that function in the runtime's tests), one replica holds the model once, and the
    estimate's figure is its busiest stage's."""
    spec = spec_of(preset, parallelism, training={"seqLength": 256 if preset == "tiny" else 2048})
    arch, layout = spec.architecture(), spec.parallelism.layout()
    per_stage = planner.stage_parameters(spec)
    for rank in range(layout.world_size):
        coords = layout.coordinates(rank)
        assert parameters_on_rank(arch, layout, coords) == per_stage[coords.pipe], coords
    replicated = (layout.tensor - 1) * (6 * arch.hidden_size * arch.num_hidden_layers + 2 * arch.hidden_size)
    assert sum(per_stage) * layout.tensor == arch.num_parameters() + replicated
    est = planner.estimate(spec)
    assert est.parameters_per_gpu == per_stage[est.stage]
    assert est.weights == per_stage[est.stage] * 2  # fp16, ZeRO-1 keeps the weights whole


def test_published_20b_layout_fits_40_gib_on_its_first_stage():
    est = planner.estimate(published_20b(), 40 * GIB, deepspeed_config(published_20b()))
    assert est.fits and (est.stage, est.stages) == (0, 4)
    assert est.total / GIB == pytest.approx(19.6, abs=0.05)
    assert est.parameters_per_gpu == 11 * 226_550_784 + 50432 * 6144 // 2  # 11 half blocks + half the embedding
    assert est.logits == 0  # the logits live on the last stage
    assert "pipeline stage 0 of 4" in est.summary() and "GiB per GPU of 40.0 GiB" in est.summary()


def test_each_end_stage_holds_its_vocabulary_half_and_the_last_the_logits():
    spec = published_20b()
    params = planner.stage_parameters(spec)
    assert params[0] == params[3] - 2 * 6144  # embedding slice vs head slice + final LayerNorm
    last = planner._stage(spec, 3, params[3], None, None)
    assert last.logits == 2048 * 4 * 50432 // 2 * 4  # (s, b, v / t) fp32 on the last stage only
    assert last.total / GIB == pytest.approx(19.0, abs=0.05)
    first = planner._stage(spec, 0, params[0], None, None)
    # 1F1B: 4 micro batches in flight on stage 0, 1 on the last, each keeping 11 layer inputs (2·s·b·h)
    assert first.activations - last.activations == 3 * 11 * 2 * 2048 * 4 * 6144


def test_a_large_vocabulary_makes_the_last_stage_the_busiest():
    """pythia-14m's 50304 × 128 head and its logits outweigh three small blocks and the embedding."""
    spec = spec_of("pythia-14m", {"nodes": 1, "gpusPerNode": 2, "pipeline": 2},
                   training={"microBatchSize": 16, "gradientAccumulationSteps": 2, "activationCheckpointing": False})
    est = planner.estimate(spec)
    assert est.stage == 1 and est.logits == 2048 * 16 * 50304 * 4


def test_host_memory_of_a_20b_rank_is_a_fraction_of_the_model():
    """Sharded start-up: slices pass through the host one at a time (was ~82 GB: the whole fp32 model)."""
    host = planner.estimate(published_20b()).host
    assert host.model_states == 0 and host.ranks_per_node == 8
    # two fp32 embedding slices (50432/2 × 6144) and one generator chunk
    assert host.start_up == 2 * 25216 * 6144 * 4 + planner.START_UP_CHUNK_BYTES
    assert host.checkpoint_staging == planner.stage_parameters(published_20b())[0] * 4 // 12  # flat ZeRO-1 partition
    assert 3.5 * GIB < host.per_rank < 5 * GIB
    fine_tuned = planner.estimate(published_20b(model={"preset": "neox-20b", "initFrom": "hf/20b"})).host
    # the whole shard read first, in fp32 (the last stage's, one final LayerNorm larger)
    assert fine_tuned.start_up - host.start_up == max(planner.stage_parameters(published_20b())) * 4


def test_on_cpu_the_model_lives_in_host_memory():
    spec = spec_of("pythia-70m", {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2},
                   training={"precision": "fp32", "zeroStage": 0, "microBatchSize": 1, "seqLength": 512,
                             "gradientAccumulationSteps": 1, "activationCheckpointing": False})
    est = planner.estimate(spec)
    assert est.overhead == 0 and est.fits is None
    assert est.host.model_states == est.total and est.host.per_rank == planner.HOST_PROCESS["cpu"] + est.total
    assert est.weights == 70_426_624 * 4  # pythia-70m in fp32


@pytest.mark.parametrize("text,expected", [("64Gi", 64 * GIB), ("1.5Gi", int(1.5 * GIB)), ("500M", 500 * 10**6),
                                           ("4096", 4096), ("2Ti", 2 * 1024**4), ("100k", 100_000)])
def test_quantities(text, expected):
    assert planner.quantity_bytes(text) == expected


def _observed(spec: NeoXTrainingSpec, status: dict | None = None) -> Observed:
    body = {"apiVersion": "neox.dev/v1alpha1", "kind": "NeoXTraining",
            "metadata": {"name": "big", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": spec.to_wire(), **({"status": status} if status else {})}
    return Observed(body=body, children={}, jobs=[], pods=[], node_ready={}, node_labels=[], now=NOW)


def _feasible(decision) -> dict:
    return next(c for c in decision.status["conditions"] if c["type"] == "Feasible")


def test_pods_too_small_for_their_ranks_are_infeasible_with_the_figures():
    spec = published_20b(resources={"gpuMemoryGiB": 40, "memory": "24Gi"})
    decision = reconcile(_observed(spec))
    feasible = _feasible(decision)
    assert (feasible["status"], feasible["reason"]) == ("False", "InsufficientHostMemory")
    assert decision.actions == [] and decision.status["phase"] == "Infeasible"
    assert "8 ranks × 4.2 GiB = 33.4 GiB per pod, more than spec.resources.memory 24Gi (24.0 GiB)" in feasible["message"]
    assert [e[1] for e in decision.events] == ["Infeasible"]
    again = reconcile(_observed(spec, decision.status))  # at rest: no event, no new status
    assert again.events == [] and again.status == decision.status


def test_pods_with_enough_memory_are_feasible():
    decision = reconcile(_observed(published_20b(resources={"gpuMemoryGiB": 40, "memory": "40Gi"})))
    feasible = _feasible(decision)
    assert (feasible["status"], feasible["reason"]) == ("True", "FitsInGPUMemory")
    assert "host 4.2 GiB per rank × 8 ranks = 33.4 GiB per pod of 40.0 GiB" in feasible["message"]


def test_a_cpu_training_whose_pod_memory_is_too_small_is_infeasible():
    spec = spec_of("pythia-160m", {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2},
                   training={"precision": "fp32", "zeroStage": 0, "microBatchSize": 1,
                             "gradientAccumulationSteps": 1, "activationCheckpointing": False},
                   resources={"memory": "4Gi"})
    feasible = _feasible(reconcile(_observed(spec)))
    assert (feasible["status"], feasible["reason"]) == ("False", "InsufficientHostMemory")
    roomy = spec.model_copy(update={"resources": spec.resources.model_copy(update={"memory": "32Gi"})})
    assert _feasible(reconcile(_observed(roomy)))["reason"] == "RunsOnCPU"
