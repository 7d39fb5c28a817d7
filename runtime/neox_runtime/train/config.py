"""The training runtime's one typed config, validated at the edge before any process group starts.

`TrainConfig` is plain on purpose: the operator resolves a NeoXTraining spec into it (or
into the file `load_config` reads), and a user runs locally exactly what the cluster
runs. Every user mistake is a ValueError that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from neox_runtime.api.architecture import ModelArchitecture, preset
from neox_runtime.api.layout import ParallelLayout

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(kw_only=True)
class TrainConfig:
    architecture: ModelArchitecture
    # batch and schedule
    seq_length: int = 128
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    train_steps: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Precision = "fp32"
    zero_stage: int = 0
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    activation_checkpointing: bool = False
    fused_optimizer: bool = True
    compile: bool = False  # torch.compile the model + loss (the first step pays the compile time)
    seed: int = 1234
    # data
    train_data: str = ""
    validation_fraction: float = 0.01
    # checkpoints
    checkpoint_dir: str = ""
    checkpoint_interval: int = 100
    keep_last: int = 2
    init_from: str | None = None
    resume_from: str = "latest"  # `latest`, `none` or `step-N`
    tokenizer_file: str | None = None
    # evaluation and progress
    eval_interval: int = 50
    eval_iters: int = 4
    log_interval: int = 1
    progress_file: str | None = None
    peak_tflops: float | None = None
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.architecture, str):
            self.architecture = preset(self.architecture).architecture
        elif isinstance(self.architecture, dict):
            self.architecture = _architecture_from_dict(self.architecture)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        for name in ("seq_length", "micro_batch_size", "gradient_accumulation_steps", "train_steps",
                     "tensor_parallel", "pipeline_parallel", "checkpoint_interval", "keep_last",
                     "eval_interval", "eval_iters", "log_interval"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        _require(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        _require(self.lr > 0, "lr", "> 0")
        _require(0 <= self.min_lr <= self.lr, "min_lr", f"between 0 and lr ({self.lr})")
        _require(self.lr_decay in ("cosine", "linear", "constant"), "lr_decay", "cosine, linear or constant")
        _require(self.weight_decay >= 0, "weight_decay", ">= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        _require(self.eps > 0, "eps", "> 0")
        _require(self.grad_clip >= 0, "grad_clip", ">= 0 (0 disables clipping)")
        _require(self.precision in ("fp32", "bf16", "fp16"), "precision", "one of fp32, bf16, fp16")
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3")
        _require(0 <= self.validation_fraction < 1, "validation_fraction", "in [0, 1)")
        _require(bool(self.train_data), "train_data", "a directory of token shards (made by neox-data)")
        _require(bool(self.checkpoint_dir), "checkpoint_dir", "a directory")
        _require(re.fullmatch(r"latest|none|step-[0-9]+", self.resume_from) is not None, "resume_from",
                 "latest, none or step-N")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "> 0")
        _require(isinstance(self.deepspeed, dict), "deepspeed", "a mapping of DeepSpeed config overrides")
        # what the layout can run does not depend on the data-parallel size: check one replica
        self.layout(self.tensor_parallel * self.pipeline_parallel).check(
            self.architecture, zero_stage=self.zero_stage, seq_length=self.seq_length, style="runtime")

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.seq_length

    def layout(self, world_size: int) -> ParallelLayout:
        """The parallel layout on `world_size` ranks; ValueError if tensor x pipeline does not divide it."""
        return ParallelLayout(world_size=world_size, tensor=self.tensor_parallel, pipeline=self.pipeline_parallel)

    def validate_world(self, world_size: int) -> int:
        """Data-parallel size for this world; ValueError if the parallel layout does not divide it."""
        return self.layout(world_size).data

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["architecture"] = self.architecture.model_dump()
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        if "architecture" not in data:
            raise ValueError("architecture: required (a preset name or HF GPTNeoXConfig fields)")
        try:
            return cls(**data)
        except TypeError as e:  # wrong types that slipped through comparisons
            raise ValueError(str(e)) from None


def _require(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{name}: must be {what}")


def _architecture_from_dict(data: dict[str, Any]) -> ModelArchitecture:
    data = dict(data)
    base = data.pop("preset", None)
    try:
        base_fields = preset(base).architecture.model_dump() if base is not None else {}
        return ModelArchitecture(**{**base_fields, **data})
    except ValueError as e:
        raise ValueError(f"architecture: {e}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML or JSON TrainConfig file (or a NeoXTraining manifest / spec, resolved by the API)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {path}")
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping")
    if is_custom_resource(data):
        return _from_custom_resource(data)
    return TrainConfig.from_dict(data)


def is_custom_resource(data: dict[str, Any]) -> bool:
    """A NeoXTraining manifest, its bare spec, or the operator's resolved document (not a TrainConfig)."""
    return data.get("kind") in ("NeoXTraining", "ResolvedTraining") or bool({"spec", "model", "training"} & set(data))


def _from_custom_resource(data: dict[str, Any]) -> TrainConfig:
    """A NeoXTraining manifest, its bare spec, or the operator's resolved document."""
    from neox_runtime.api.resolved import load_document, train_config_fields

    try:
        resolved = load_document(data)
    except ValueError as e:  # pydantic's ValidationError names the camelCase field path
        raise ValueError(f"--config: not a valid NeoXTraining spec: {e}") from None
    return TrainConfig.from_dict(train_config_fields(resolved))
