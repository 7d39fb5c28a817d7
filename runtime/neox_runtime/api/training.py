"""The NeoXTraining custom resource: spec and status models (the CRD is generated from these).

Field names are snake_case in Python and camelCase on the wire. Every cross-field rule
is a `Rule` (CEL for the API server, Python for pydantic), so a manifest that
`kubectl apply` refuses is also refused by `neox-train --config` on a laptop.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from .architecture import PRESET_NAMES, PRESETS, HiddenAct, ModelArchitecture
from .common import (
    CONDITIONS_FIELD_EXTRA, DEFAULT_RUNTIME_IMAGE, QUANTITY_PATTERN, Condition,
    Resources, Scheduling, not_both,
)
from .contract import EXIT_PREEMPTED
from .layout import ParallelLayout
from .schema import CRDModel, Rule
from .spec_rules import LAYOUT_RULES, arch_cel, arch_value, camel, unclaimed_problems

# names.py: "<name>-a<attempt>-<index>" (a pod hostname) must stay a 63-character DNS label
MAX_NAME_LENGTH = 40

# The ModelArchitecture fields without a default: a spec without a preset must set them all.
_ARCH_REQUIRED_WITHOUT_PRESET = tuple(n for n, f in ModelArchitecture.model_fields.items() if f.is_required())
_ARCH_REQUIRED_LIST = ", ".join(camel(n) for n in _ARCH_REQUIRED_WITHOUT_PRESET[:-1]) + \
    f" and {camel(_ARCH_REQUIRED_WITHOUT_PRESET[-1])}"


def _override_field(name: str) -> tuple[Any, Any]:
    info = ModelArchitecture.model_fields[name]
    metadata = {k: v for k, v in (info.json_schema_extra or {}).items()}
    annotation = HiddenAct if name == "hidden_act" else info.annotation
    return (annotation | None, Field(None, description=info.description, **metadata,
                                     **_numeric_bounds(info)))


def _numeric_bounds(info: Any) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for key in ("gt", "ge", "lt", "le"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    return bounds


# Every ModelArchitecture field, optional and camelCase: overrides over a preset.
ArchitectureOverrides = create_model(
    "ArchitectureOverrides", __base__=CRDModel,
    **{name: _override_field(name) for name in ModelArchitecture.model_fields},
)
ArchitectureOverrides.__doc__ = "Architecture fields; each one set overrides the preset's value."


_HEADS_KNOWN, _HEADS = arch_cel("self", "num_attention_heads")
_HIDDEN_KNOWN, _HIDDEN = arch_cel("self", "hidden_size")


class ModelSpec(CRDModel):
    preset: Literal[PRESET_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="Named architecture with published hyperparameters: "
        + ", ".join(PRESET_NAMES) + ". Fields in `architecture` override it.")
    architecture: ArchitectureOverrides | None = Field(  # type: ignore[valid-type]
        None, description="Explicit architecture (Hugging Face GPTNeoXConfig fields in camelCase). "
        f"Without a preset, {_ARCH_REQUIRED_LIST} are required.")
    init_from: str | None = Field(
        None, description="Path (inside the data volume) of a Hugging Face format model whose "
        "weights initialise training, for fine-tuning.")

    rules = (
        Rule(
            cel="has(self.preset) || (has(self.architecture) && "
            + " && ".join(f"has(self.architecture.{camel(f)})" for f in _ARCH_REQUIRED_WITHOUT_PRESET) + ")",
            message=f"spec.model: set preset, or architecture with {_ARCH_REQUIRED_LIST}",
            check=lambda m: m.preset is not None or (m.architecture is not None and all(
                getattr(m.architecture, f) is not None for f in _ARCH_REQUIRED_WITHOUT_PRESET)),
        ),
        Rule(
            cel=f"!{_HIDDEN_KNOWN} || !{_HEADS_KNOWN} || {_HIDDEN} % {_HEADS} == 0",
            message="spec.model.architecture.hiddenSize must be divisible by numAttentionHeads",
            check=lambda m: None in (arch_value(m, "hidden_size"), arch_value(m, "num_attention_heads"))
            or arch_value(m, "hidden_size") % arch_value(m, "num_attention_heads") == 0,
        ),
        Rule(cel="self == oldSelf", message="spec.model is immutable",
             check=lambda m: True, transition=True),
    )

    def resolve(self) -> ModelArchitecture:
        base = PRESETS[self.preset].architecture.model_dump() if self.preset else {}
        overrides = self.architecture.model_dump(exclude_none=True) if self.architecture else {}
        return ModelArchitecture(**{**base, **overrides})


class VolumeSource(CRDModel):
    claim_name: str = Field(max_length=253, description="PersistentVolumeClaim holding the data.")
    read_only: bool = Field(True, description="Mount the claim read-only.")


class DataSpec(CRDModel):
    format: Literal["shards", "text", "jsonl"] = Field(
        "shards", description="`shards`: pre-tokenized shards written by neox-data; `text` or "
        "`jsonl`: raw files that a preprocessing step tokenizes first.")
    path: str = Field(description="Directory (inside the data volume) with the shards or raw files.")
    volume: VolumeSource | None = Field(
        None, description="Volume holding the data, mounted at /data. Without it the data is "
        "read from the checkpoint volume.")
    text_key: str = Field("text", description="JSON key holding the text, for `jsonl`.")
    validation_fraction: float = Field(
        0.01, ge=0, lt=1, description="Fraction of documents held out for validation loss.")
    ray_address: str | None = Field(
        None, description="Ray cluster for preprocessing raw data (default: local Ray in the pod).")


class TokenizerSpec(CRDModel):
    path: str | None = Field(
        None, description="tokenizer.json (inside the data volume); default: the one in the shards' directory.")


class ParallelismSpec(CRDModel):
    nodes: int = Field(1, ge=1, le=1024, description="Pods in the group, one per node.")
    gpus_per_node: int = Field(
        8, ge=0, le=16, description="GPUs requested by each pod; 0 runs on CPU.")
    processes_per_node: int | None = Field(
        None, ge=1, le=64, description="Ranks per pod; defaults to gpusPerNode, or 1 on CPU. "
        "Must equal gpusPerNode when GPUs are used.")
    tensor: int = Field(1, ge=1, le=64, description="Tensor-parallel degree (Megatron column/row split).")
    pipeline: int = Field(1, ge=1, le=128, description="Pipeline-parallel stages.")

    rules = (
        Rule(
            cel="self.gpusPerNode == 0 || !has(self.processesPerNode) || "
            "self.processesPerNode == self.gpusPerNode",
            message="spec.parallelism.processesPerNode must equal gpusPerNode when GPUs are used",
            check=lambda p: p.gpus_per_node == 0 or p.processes_per_node in (None, p.gpus_per_node),
        ),
        Rule(
            cel="(self.nodes * (self.gpusPerNode > 0 ? self.gpusPerNode : "
            "(has(self.processesPerNode) ? self.processesPerNode : 1))) "
            "% (self.tensor * self.pipeline) == 0",
            message="spec.parallelism: tensor × pipeline must divide nodes × gpusPerNode",
            check=lambda p: p.world_size % (p.tensor * p.pipeline) == 0,
        ),
        Rule(cel="self == oldSelf", message="spec.parallelism is immutable",
             check=lambda p: True, transition=True),
    )

    @property
    def ranks_per_node(self) -> int:
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.processes_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    def layout(self) -> ParallelLayout:
        return ParallelLayout(world_size=self.world_size, tensor=self.tensor, pipeline=self.pipeline)


PARALLELISM_RANKS_CEL = ("(self.parallelism.nodes * (self.parallelism.gpusPerNode > 0 ? "
                         "self.parallelism.gpusPerNode : (has(self.parallelism.processesPerNode) ? "
                         "self.parallelism.processesPerNode : 1)))")


class OptimizerSpec(CRDModel):
    type: Literal["adamw"] = Field("adamw", description="Optimizer; AdamW as in the published recipes.")
    lr: float | None = Field(None, gt=0, le=1, description="Peak learning rate (default: the preset's).")
    min_lr: float | None = Field(None, ge=0, le=1, description="Floor of the decay (default: the preset's).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="Decoupled weight decay.")

    rules = (Rule(cel="!has(self.lr) || !has(self.minLr) || self.minLr <= self.lr",
                  message="spec.training.optimizer.minLr must not exceed lr",
                  check=lambda o: o.lr is None or o.min_lr is None or o.min_lr <= o.lr),)


class ScheduleSpec(CRDModel):
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warmup steps (default: 1% of steps).")
    decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay from lr to minLr over the remaining steps.")


class TrainingSpec(CRDModel):
    steps: int = Field(ge=1, le=100_000_000, description="Optimizer steps to train for.")
    seq_length: int = Field(2048, ge=8, le=1_048_576, description="Tokens per sample.")
    micro_batch_size: int = Field(1, ge=1, le=4096, description="Samples per rank per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536, description="Micro batches per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer step; when given it must equal "
        "microBatchSize × gradientAccumulationSteps × data-parallel size.")
    precision: Literal["fp32", "fp16", "bf16"] = Field("bf16", description="Training precision.")
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer settings.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    gradient_clipping: float = Field(1.0, ge=0, description="Clip the global gradient norm; 0 disables.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="Run the model and loss under torch.compile (faster steps after a one-off compile).")
    seed: int = Field(1234, ge=0, description="Seed of initialisation and data order.")
    eval_interval: int = Field(1000, ge=1, description="Steps between validation-loss evaluations.")
    eval_iters: int = Field(10, ge=1, description="Batches per validation-loss evaluation.")
    log_interval: int = Field(10, ge=1, description="Steps between progress reports.")


class CheckpointVolume(CRDModel):
    size: str = Field("100Gi", pattern=QUANTITY_PATTERN, description="Size of the checkpoint claim.")
    storage_class_name: str | None = Field(None, description="StorageClass of the claim (default: the cluster's).")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteMany"], min_length=1,
        description="Access modes; multi-node jobs need ReadWriteMany.")


class CheckpointSpec(CRDModel):
    interval: int = Field(1000, ge=1, description="Steps between checkpoints.")
    keep_last: int = Field(3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    volume: CheckpointVolume | None = Field(
        None, description="Claim the operator creates (default when existingClaim is not set).")
    existing_claim: str | None = Field(None, max_length=253, description="Use this PersistentVolumeClaim instead.")
    retain_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="`Retain` keeps the checkpoint claim when the NeoXTraining is "
        "deleted; `Delete` removes it with the training.")
    resume_from: str = Field(
        "latest", pattern=r"^(latest|none|step-[0-9]+)$",
        description="`latest`, `none` (start fresh) or `step-N`.")

    rules = (not_both("volume", "existing_claim", "spec.checkpoint"),)


class FailurePolicy(CRDModel):
    max_restarts: int = Field(3, ge=0, le=1000, description="Group restarts after failures before the training "
                              f"is Failed; restarts after a preemption (a pod that exited {EXIT_PREEMPTED} after checkpointing "
                              "on SIGTERM, or one with the DisruptionTarget condition) do not count.")
    backoff_seconds: int = Field(10, ge=0, le=3600, description="First restart delay; doubles each restart.")
    max_backoff_seconds: int = Field(600, ge=0, le=86400, description="Cap of the restart delay.")
    progress_timeout_seconds: int | None = Field(
        None, ge=30, description="Restart the group when no progress is reported for this long.")


class NeoXTrainingSpec(CRDModel):
    model: ModelSpec = Field(description="Architecture: a preset, explicit fields, or both.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer.")
    data: DataSpec = Field(description="Training data.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="How the job is split over GPUs.")
    training: TrainingSpec = Field(description="Optimisation hyperparameters.")
    deepspeed: dict[str, Any] | None = Field(
        None, description="Free-form DeepSpeed config merged over the generated one, last.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint volume and cadence.")
    image: str = Field(DEFAULT_RUNTIME_IMAGE, description="Runtime container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Image pull policy of the pods.")
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Placement of the pods.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="What happens on failure.")
    suspend: bool = Field(False, description="Suspend: pods checkpoint and stop; resuming continues from the latest checkpoint.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the children this long after the training finished "
        "(never the checkpoint claim, unless retainPolicy is Delete).")

    rules = (
        Rule(
            cel="!has(self.training.globalBatchSize) || self.training.globalBatchSize == "
            "self.training.microBatchSize * self.training.gradientAccumulationSteps * "
            f"({PARALLELISM_RANKS_CEL} / (self.parallelism.tensor * self.parallelism.pipeline))",
            message="spec.training.globalBatchSize must equal microBatchSize × "
            "gradientAccumulationSteps × data-parallel size",
            check=lambda s: s.training.global_batch_size is None or s.training.global_batch_size == (
                s.training.micro_batch_size * s.training.gradient_accumulation_steps
                * s.parallelism.data_parallel),
        ),
        # What ParallelLayout.problems refuses: tensor divides heads, MLP width and vocabulary;
        # pipeline within the layers; ZeRO stage allowed with the layout; seqLength within positions.
        *LAYOUT_RULES,
    )

    @model_validator(mode="after")
    def _layout_can_run(self) -> "NeoXTrainingSpec":
        """What only Python can see is refused here, and so marked by the operator (Feasible=False).

        CEL cannot read inside the free-form `deepspeed` object, and a layout problem newer
        than the CRD's rules has no CEL half yet.
        """
        stage = ((self.deepspeed or {}).get("zero_optimization") or {}).get("stage", self.training.zero_stage)
        if stage != self.training.zero_stage:
            raise ValueError(f"spec.deepspeed.zero_optimization.stage: {stage!r} differs from "
                             f"spec.training.zeroStage ({self.training.zero_stage}); set the stage "
                             "in spec.training.zeroStage, which the layout checks and the planner read")
        problems = unclaimed_problems(self)
        if problems:
            raise ValueError("; ".join(p.named("spec") for p in problems))
        return self

    def architecture(self) -> ModelArchitecture:
        return self.model.resolve()


class ProgressStatus(CRDModel):
    step: int | None = Field(None, description="Last completed optimizer step.")
    total_steps: int | None = Field(None, description="Steps the training runs for.")
    tokens: int | None = Field(None, description="Tokens trained on so far.")
    loss: str | None = Field(None, description="Training loss at the last report (a string, for the printer column).")
    validation_loss: str | None = Field(None, description="Last validation loss.")
    learning_rate: str | None = Field(None, description="Current learning rate.")
    tokens_per_second: str | None = Field(None, description="Throughput over the last interval.")
    mfu: str | None = Field(None, description="Model FLOPs utilisation over the last interval.")
    eta_seconds: int | None = Field(None, description="Estimated seconds until the last step.")
    updated_at: str | None = Field(None, description="When the runtime last reported (RFC 3339).")
    step_display: str | None = Field(None, description="`step/total`, for the printer column.")


class CheckpointStatus(CRDModel):
    step: int | None = Field(None, description="Step of the latest complete checkpoint.")
    time: str | None = Field(None, description="When it was written (RFC 3339).")
    path: str | None = Field(None, description="Its directory on the checkpoint volume.")


class NeoXTrainingStatus(CRDModel):
    observed_generation: int | None = Field(None, description="The .metadata.generation last reconciled.")
    phase: str | None = Field(None, description="One-word summary for `kubectl get`; conditions carry the truth.")
    conditions: list[Condition] | None = Field(None, description="Current state, in Kubernetes condition form.")
    restarts: int | None = Field(None, description="Times the pod group was restarted (after a failure or a "
                                 "preemption); the attempt number of the current pod group.")
    preemptions: int | None = Field(None, description="Restarts a preemption caused; maxRestarts does not count "
                                    "them.")
    workers_ready: int | None = Field(None, description="Pods of the group that are running.")
    workers_total: int | None = Field(None, description="Pods the group has.")
    workers: str | None = Field(None, description="`ready/total`, for the printer column.")
    progress: ProgressStatus | None = Field(None, description="Progress as reported by the runtime.")
    latest_checkpoint: CheckpointStatus | None = Field(None, description="Latest complete checkpoint.")
    start_time: str | None = Field(None, description="When the first pod group was created.")
    completion_time: str | None = Field(None, description="When the training succeeded or failed.")
    estimate: str | None = Field(
        None, description="Estimated memory per rank, on its GPU and on the host, from the planner.")

    field_extra = {"conditions": CONDITIONS_FIELD_EXTRA}


KIND = "NeoXTraining"
PLURAL = "neoxtrainings"
SHORT_NAMES = ["nxt"]


def resolve_train_config(document: dict[str, Any]) -> dict[str, Any]:
    """`TrainConfig` fields for a NeoXTraining manifest, its spec, or a resolved document."""
    from .resolved import load_document, train_config_fields  # resolved imports this module

    return train_config_fields(load_document(document))
