"""The parallel layout of a training: world = pipeline × data × tensor, and what is supported.

One home, torch-free, for the facts every side needs: the CRD's rules, the planner,
`TrainConfig`, the step runners and the checkpoint resharding all ask this module
where a rank sits and whether a layout can run. Rank order follows DeepSpeed's
`PipeModelDataParallelTopology` (axes pipe, data, model; tensor innermost, so a
tensor-parallel group shares a node and its NVLink):

    rank = (pipe * data_size + data) * tensor_size + model

What a layout cannot do is said once, in `problems`, as (key, message) pairs; each
caller names the field the way its user wrote it (`spec.parallelism.pipeline` on the
API server, `pipeline_parallel` in a runtime config) through `FIELD_NAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# DeepSpeed's PipelineEngine refuses ZeRO stages that partition gradients (2) or
# parameters (3): its 1F1B schedule reduces gradients itself, once per step.
MAX_ZERO_STAGE_WITH_PIPELINE = 1
# ZeRO-3 partitions parameters across data-parallel ranks; our tensor-parallel modules
# already hold slices, and DeepSpeed gathers ZeRO-3 parameters only over the data group,
# which is not tested here: refused rather than half supported.
MAX_ZERO_STAGE_WITH_TENSOR = 2

# Sharded start-up draws each parameter's initial values in chunks of this many elements
# (rows of the full tensor drawn together from one generator): 16 MB of fp32. The runtime
# (parallel/startup) draws with it and the planner counts it in host memory.
INIT_CHUNK_ELEMENTS = 1 << 22

# What each problem key is called in the two places a user writes a layout.
FIELD_NAMES: dict[str, dict[str, str]] = {
    "runtime": {"world": "world size", "tensor": "tensor_parallel", "pipeline": "pipeline_parallel",
                "zero_stage": "zero_stage", "seq_length": "seq_length"},
    "spec": {"world": "spec.parallelism", "tensor": "spec.parallelism.tensor",
             "pipeline": "spec.parallelism.pipeline", "zero_stage": "spec.training.zeroStage",
             "seq_length": "spec.training.seqLength"},
}


class Shape(Protocol):
    """The architecture fields a layout depends on (ModelArchitecture has them)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class Coordinates:
    pipe: int  # pipeline stage
    data: int  # data-parallel replica
    model: int  # tensor-parallel rank


@dataclass(frozen=True)
class Problem:
    key: str  # one of FIELD_NAMES' keys
    message: str

    def named(self, style: str = "runtime") -> str:
        return f"{FIELD_NAMES[style][self.key]}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    world_size: int
    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tensor", "pipeline"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, not {value!r}")
        if self.world_size % (self.tensor * self.pipeline):
            raise ValueError(f"tensor_parallel x pipeline_parallel ({self.tensor * self.pipeline}) must divide "
                             f"the world size ({self.world_size})")

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    def __str__(self) -> str:
        return f"pipeline {self.pipeline} x data {self.data} x tensor {self.tensor}"

    # -- where ranks sit --------------------------------------------------------------------
    def coordinates(self, rank: int) -> Coordinates:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        rest, model = divmod(rank, self.tensor)
        pipe, data = divmod(rest, self.data)
        return Coordinates(pipe=pipe, data=data, model=model)

    def rank_of(self, *, pipe: int, data: int, model: int) -> int:
        return (pipe * self.data + data) * self.tensor + model

    def tensor_groups(self) -> list[list[int]]:
        """Ranks that split the same layers' matrices, one list per (pipe, data)."""
        return [[self.rank_of(pipe=p, data=d, model=m) for m in range(self.tensor)]
                for p in range(self.pipeline) for d in range(self.data)]

    def data_groups(self) -> list[list[int]]:
        """Ranks that hold the same shard and average gradients, one list per (pipe, model)."""
        return [[self.rank_of(pipe=p, data=d, model=m) for d in range(self.data)]
                for p in range(self.pipeline) for m in range(self.tensor)]

    def pipe_groups(self) -> list[list[int]]:
        """Ranks that pass activations stage to stage, one list per (data, model)."""
        return [[self.rank_of(pipe=p, data=d, model=m) for p in range(self.pipeline)]
                for d in range(self.data) for m in range(self.tensor)]

    def stage_layers(self, num_layers: int) -> list[range]:
        """Block indices (0-based) of each pipeline stage, exactly as the runtime partitions them.

        As even as possible, the first `num_layers % pipeline` stages one block longer.
        Stage 0 also holds the embedding, the last stage the final norm and the head.
        """
        if not 1 <= self.pipeline <= num_layers:
            raise ValueError(f"pipeline_parallel: {self.pipeline} stages do not fit {num_layers} layers")
        per, extra = divmod(num_layers, self.pipeline)
        bounds = [0]
        for stage in range(self.pipeline):
            bounds.append(bounds[-1] + per + (1 if stage < extra else 0))
        return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]

    # -- what can run -----------------------------------------------------------------------
    def problems(self, arch: Shape, *, zero_stage: int = 0, seq_length: int | None = None) -> list[Problem]:
        """Everything that stops this layout from training `arch`; empty when it can run."""
        out = []
        t, p = self.tensor, self.pipeline
        if arch.num_attention_heads % t:
            out.append(Problem("tensor", f"{t} must divide the number of attention heads "
                                         f"({arch.num_attention_heads})"))
        if arch.intermediate_size % t:
            out.append(Problem("tensor", f"{t} must divide the MLP width intermediate_size "
                                         f"({arch.intermediate_size})"))
        if arch.vocab_size % t:
            out.append(Problem("tensor", f"{t} must divide vocab_size ({arch.vocab_size}): the embedding "
                                         "and the output head are split by vocabulary rows"))
        if p > arch.num_hidden_layers:
            out.append(Problem("pipeline", f"{p} stages is more than the model's {arch.num_hidden_layers} layers"))
        if p > 1 and zero_stage > MAX_ZERO_STAGE_WITH_PIPELINE:
            out.append(Problem("zero_stage", f"ZeRO-{zero_stage} cannot run with pipeline parallelism "
                                             f"(DeepSpeed pipelines allow stage 0 or 1)"))
        if t > 1 and zero_stage > MAX_ZERO_STAGE_WITH_TENSOR:
            out.append(Problem("zero_stage", f"ZeRO-{zero_stage} cannot run with tensor parallelism "
                                             f"(stages 0 to {MAX_ZERO_STAGE_WITH_TENSOR} can)"))
        if seq_length is not None and seq_length > arch.max_position_embeddings:
            out.append(Problem("seq_length", f"{seq_length} is longer than the model's max_position_embeddings "
                                             f"({arch.max_position_embeddings})"))
        return out

    def check(self, arch: Shape, *, zero_stage: int = 0, seq_length: int | None = None,
              style: str = "runtime") -> None:
        """ValueError naming the field of the first problem, if any."""
        found = self.problems(arch, zero_stage=zero_stage, seq_length=seq_length)
        if found:
            raise ValueError(found[0].named(style))


def parameters_on_rank(arch: Shape, layout: ParallelLayout, coords: Coordinates) -> int:
    """Parameter elements the rank at `coords` allocates (for a layout without problems).

    Its stage's blocks with the QKV, dense, h_to_4h and 4h_to_h matrices (and the column-
    parallel biases) split `layout.tensor` ways, LayerNorms and row-parallel biases whole;
    the vocab-parallel embedding on the first stage, the final norm and the vocab-parallel
    head on the last (a tied embedding is held by both the first and the last stage).
    """
    h, f, v, t = arch.hidden_size, arch.intermediate_size, arch.vocab_size, layout.tensor
    per_block = (2 * 2 * h  # input and post-attention LayerNorms
                 + (3 * h * h + 3 * h) // t  # query_key_value, column parallel
                 + h * h // t + h  # attention.dense, row parallel (bias whole)
                 + (f * h + f) // t  # dense_h_to_4h, column parallel
                 + h * f // t + h)  # dense_4h_to_h, row parallel (bias whole)
    stages = layout.stage_layers(arch.num_hidden_layers)
    total = len(stages[coords.pipe]) * per_block
    first, last = coords.pipe == 0, coords.pipe == layout.pipeline - 1
    embedding = v * h // t
    if first:
        total += embedding
    if last:
        total += 2 * h  # final LayerNorm
        if not (arch.tie_word_embeddings and first):  # one stage: the tied head is the embedding itself
            total += embedding  # embed_out, or the last stage's copy of the tied embedding
    return total
