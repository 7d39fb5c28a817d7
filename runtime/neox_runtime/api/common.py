"""Spec and status pieces both custom resources share: scheduling, resources, conditions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .schema import CRDModel, Rule

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P|E|Ei)?$"
DEFAULT_RUNTIME_IMAGE = "ghcr.io/neox-k8s/runtime:0.1.0"


class FreeForm(CRDModel):
    """A Kubernetes object passed through unchanged (a toleration, an affinity)."""

    model_config = {**CRDModel.model_config, "extra": "allow"}
    crd_extra = {"x-kubernetes-preserve-unknown-fields": True}


class GangScheduling(CRDModel):
    provider: Literal["coscheduling", "volcano"] = Field(
        "coscheduling",
        description="Which gang scheduler admits the pod group: `coscheduling` creates a "
        "scheduler-plugins PodGroup, `volcano` annotates the pods for Volcano.")
    schedule_timeout_seconds: int = Field(
        300, ge=1, le=86400,
        description="How long the gang scheduler waits for all pods to fit before giving up.")


class Scheduling(CRDModel):
    node_selector: dict[str, str] | None = Field(
        None, description="Node labels every pod must match (as in a Pod's nodeSelector).")
    tolerations: list[FreeForm] | None = Field(
        None, description="Pod tolerations, passed through unchanged.")
    affinity: FreeForm | None = Field(
        None, description="Pod affinity, passed through unchanged.")
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(
        None, max_length=253, description="Scheduler that places the pods (default: the cluster's).")
    queue_name: str | None = Field(
        None, max_length=63,
        description="Kueue LocalQueue: the job is created suspended with the "
        "`kueue.x-k8s.io/queue-name` label so that Kueue admits it whole.")
    gang: GangScheduling | None = Field(
        None, description="Gang scheduling: all pods start together or none does.")


class Resources(CRDModel):
    gpu_memory_gib: float | None = Field(
        None, gt=0, le=4096, alias="gpuMemoryGiB",
        description="Memory of one GPU in GiB, used by the feasibility check. Read from the "
        "`nvidia.com/gpu.memory` node label (MiB) when not set.")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", description="Extended resource name that requests GPUs.")
    cpu: str | None = Field(None, pattern=QUANTITY_PATTERN, description="CPU request of each pod.")
    memory: str | None = Field(None, pattern=QUANTITY_PATTERN, description="Memory request of each pod.")
    shared_memory: str = Field(
        "16Gi", pattern=QUANTITY_PATTERN,
        description="Size of the memory-backed /dev/shm volume (NCCL and data loaders need it).")


class Condition(CRDModel):
    """A Kubernetes condition, as in metav1.Condition."""

    type: str = Field(description="Condition type, CamelCase (e.g. Running, Ready).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable explanation.")
    last_transition_time: str | None = Field(
        None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, description="The .metadata.generation this condition was computed from.")


CONDITIONS_FIELD_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


def not_both(a: str, b: str, path: str) -> Rule:
    """CEL + Python rule: at most one of two optional fields is set."""
    camel_a, camel_b = (_camel(a), _camel(b))
    return Rule(
        cel=f"!(has(self.{camel_a}) && has(self.{camel_b}))",
        message=f"{path}: set only one of {camel_a} and {camel_b}",
        check=lambda m: getattr(m, a) is None or getattr(m, b) is None,
    )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
