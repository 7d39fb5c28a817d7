"""Turn a NeoXTraining spec into the fully resolved config the pods run.

The operator writes this document into the training's ConfigMap; `neox-train --config`
computes the same document from a manifest or a bare spec, so a user runs locally
exactly what the cluster runs. Presets are expanded, published recipe values fill what
the spec leaves open, the data-parallel size is derived, and the DeepSpeed JSON is
built with the user's `deepspeed` overrides merged last.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .architecture import PRESETS, ModelArchitecture, TrainingRecipe
from .deepspeed import build_deepspeed_config
from .training import NeoXTrainingSpec

RESOLVED_KIND = "ResolvedTraining"
API_VERSION = "neox.dev/v1alpha1"


class ResolvedOptimization(BaseModel):
    model_config = ConfigDict(frozen=True)

    lr: float
    min_lr: float
    warmup_steps: int
    decay: str
    betas: tuple[float, float]
    eps: float
    weight_decay: float


class ResolvedTraining(BaseModel):
    """Everything a rank needs besides its rendezvous env."""

    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str | None
    spec: NeoXTrainingSpec
    architecture: ModelArchitecture
    world_size: int
    ranks_per_node: int
    data_parallel: int
    optimization: ResolvedOptimization
    deepspeed: dict[str, Any]

    def to_document(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION, "kind": RESOLVED_KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self.spec.to_wire(),
            "architecture": self.architecture.model_dump(),
            "worldSize": self.world_size, "ranksPerNode": self.ranks_per_node,
            "dataParallel": self.data_parallel,
            "optimization": self.optimization.model_dump(mode="json"),
            "deepspeed": self.deepspeed,
        }


def _recipe(spec: NeoXTrainingSpec) -> TrainingRecipe | None:
    return PRESETS[spec.model.preset].recipe if spec.model.preset else None


def resolve_optimization(spec: NeoXTrainingSpec) -> ResolvedOptimization:
    recipe = _recipe(spec)
    opt, schedule, steps = spec.training.optimizer, spec.training.schedule, spec.training.steps
    lr = opt.lr if opt.lr is not None else (recipe.learning_rate if recipe else 3e-4)
    min_lr = opt.min_lr if opt.min_lr is not None else (
        recipe.min_learning_rate if recipe and opt.lr is None else lr * 0.1)
    warmup_fraction = recipe.warmup_fraction if recipe else 0.01
    warmup = schedule.warmup_steps if schedule.warmup_steps is not None else int(steps * warmup_fraction)
    return ResolvedOptimization(lr=lr, min_lr=min(min_lr, lr), warmup_steps=min(warmup, steps),
                                decay=schedule.decay, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                weight_decay=opt.weight_decay)


def deepspeed_config(spec: NeoXTrainingSpec) -> dict[str, Any]:
    training = spec.training
    return build_deepspeed_config(
        micro_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        data_parallel_size=spec.parallelism.data_parallel, gradient_clipping=training.gradient_clipping,
        zero_stage=training.zero_stage, precision=training.precision,
        activation_checkpointing=training.activation_checkpointing, overrides=spec.deepspeed)


def resolve(spec: NeoXTrainingSpec, name: str = "local", namespace: str | None = None) -> ResolvedTraining:
    optimization = resolve_optimization(spec)
    return ResolvedTraining(
        name=name, namespace=namespace, spec=spec, architecture=spec.architecture(),
        world_size=spec.parallelism.world_size, ranks_per_node=spec.parallelism.ranks_per_node,
        data_parallel=spec.parallelism.data_parallel, optimization=optimization,
        deepspeed=deepspeed_config(spec),
    )


def load_document(document: dict[str, Any]) -> ResolvedTraining:
    """Accept a NeoXTraining manifest, a bare spec, or a resolved document."""
    if document.get("kind") == RESOLVED_KIND:
        meta = document.get("metadata") or {}
        return resolve(NeoXTrainingSpec.model_validate(document["spec"]),
                       meta.get("name", "local"), meta.get("namespace"))
    if document.get("kind") == "NeoXTraining":
        meta = document.get("metadata") or {}
        return resolve(NeoXTrainingSpec.model_validate(document["spec"]),
                       meta.get("name", "local"), meta.get("namespace"))
    return resolve(NeoXTrainingSpec.model_validate(document))


def train_config_fields(resolved: ResolvedTraining, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime's `TrainConfig` fields for a resolved training.

    Paths come from the contract's env vars when the operator set them (in a pod, or under
    the local pod runner); run by hand, they are taken as written in the spec, relative to
    the working directory, and checkpoints go to `./checkpoints/<name>`.
    """
    import os

    from . import contract

    env = dict(os.environ if env is None else env)
    spec, opt = resolved.spec, resolved.optimization
    data_dir = env.get(contract.ENV_DATA_DIR) or spec.data.path
    data_root = env.get(contract.ENV_DATA_DIR, "").removesuffix(spec.data.path).rstrip("/") or "."

    def in_data_volume(path: str | None) -> str | None:
        return None if path is None else os.path.join(data_root, path)

    training = spec.training
    return {
        "architecture": resolved.architecture.model_dump(),
        "seq_length": training.seq_length,
        "micro_batch_size": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_steps": training.steps,
        "lr": opt.lr, "min_lr": opt.min_lr, "warmup_steps": opt.warmup_steps, "lr_decay": opt.decay,
        "weight_decay": opt.weight_decay, "betas": list(opt.betas), "eps": opt.eps,
        "grad_clip": training.gradient_clipping,
        "precision": training.precision,
        "zero_stage": training.zero_stage,
        "tensor_parallel": spec.parallelism.tensor,
        "pipeline_parallel": spec.parallelism.pipeline,
        "activation_checkpointing": training.activation_checkpointing,
        "compile": training.compile,
        "seed": training.seed,
        "train_data": data_dir,
        "validation_fraction": spec.data.validation_fraction,
        "checkpoint_dir": env.get(contract.ENV_CHECKPOINT_DIR) or os.path.join("checkpoints", resolved.name),
        "checkpoint_interval": spec.checkpoint.interval,
        "keep_last": spec.checkpoint.keep_last,
        # resumeFrom picks the start of the first attempt; a restart always continues from latest.
        "resume_from": spec.checkpoint.resume_from if int(env.get(contract.ENV_ATTEMPT, "0")) == 0 else "latest",
        "init_from": in_data_volume(spec.model.init_from),
        "tokenizer_file": in_data_volume(spec.tokenizer.path),
        "eval_interval": training.eval_interval,
        "eval_iters": training.eval_iters,
        "log_interval": training.log_interval,
        "deepspeed": spec.deepspeed or {},
    }
