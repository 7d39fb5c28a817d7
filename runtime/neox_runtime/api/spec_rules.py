"""The NeoXTraining rules that depend on the model's shape, as CEL and as Python.

A spec names its architecture as a preset, explicit fields, or both, so every rule about
shape first needs "the model's numHiddenLayers": the explicit field when set, else the
preset's (a CEL map generated from `PRESETS`), else the field's default. `arch_cel`
writes that in CEL and `arch_value` in Python.

The parallel-layout refusals are not written here a second time: `ParallelLayout.problems`
(api/layout) decides, in Python, for the runtime and for pydantic alike, and `LAYOUT_RULES`
are their CEL halves, generated from the same constants (`MAX_ZERO_STAGE_WITH_*`) and
preset maps, each claiming the problem it refuses. The API server's message is built by a
`messageExpression` that formats the layout's message with the spec's values; tests feed the
shared corpus to both and hold the two messages equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticUndefined

from .architecture import PRESETS, ModelArchitecture
from .layout import FIELD_NAMES, MAX_ZERO_STAGE_WITH_PIPELINE, MAX_ZERO_STAGE_WITH_TENSOR, Problem
from .schema import Rule

STYLE = "spec"  # layout problems are named as the manifest's fields


def cel_map(values: dict[str, Any]) -> str:
    return "{" + ", ".join(f"'{k}': {v}" for k, v in values.items()) + "}"


def preset_cel_map(field: str) -> str:
    """CEL map preset name -> the preset architecture's `field` (snake_case)."""
    return cel_map({name: getattr(p.architecture, field) for name, p in PRESETS.items()})


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def arch_cel(model: str, field: str) -> tuple[str, str]:
    """(is-known, value) CEL of architecture `field` (snake_case) of the ModelSpec at `model`.

    `has(a.b.c)` errors when `a.b` is absent, hence the guard on `architecture` first.
    A field with a default (maxPositionEmbeddings) is always known.
    """
    key = camel(field)
    explicit = f"(has({model}.architecture) && has({model}.architecture.{key}))"
    from_preset = f"{preset_cel_map(field)}[{model}.preset]"
    default = ModelArchitecture.model_fields[field].default
    if default is PydanticUndefined:
        known, fallback = f"(has({model}.preset) || {explicit})", from_preset
    else:
        known, fallback = "true", f"(has({model}.preset) ? {from_preset} : {default})"
    return known, f"({explicit} ? {model}.architecture.{key} : {fallback})"


def arch_value(model: Any, field: str) -> Any:
    """Python twin of `arch_cel`: the value, or None when neither set nor defaulted."""
    explicit = getattr(model.architecture, field, None) if model.architecture is not None else None
    if explicit is not None:
        return explicit
    if model.preset:
        return getattr(PRESETS[model.preset].architecture, field)
    default = ModelArchitecture.model_fields[field].default
    return None if default is PydanticUndefined else default


def layout_problems(spec: Any) -> list[Problem]:
    """What stops the spec's layout from training its model (`ParallelLayout.problems`)."""
    training = spec.training
    return spec.parallelism.layout().problems(spec.architecture(), zero_stage=training.zero_stage,
                                              seq_length=training.seq_length)


def _claims(key: str, marker: str):
    """Selects the layout problem a rule stands for: its key, and words only its message has."""
    return lambda problem: problem.key == key and marker in problem.message


def _layout_rule(key: str, marker: str, cel: str, message: str, expression: list[Any]) -> Rule:
    """A layout refusal: CEL `cel` for the API server, `ParallelLayout.problems` for Python.

    `expression` is the layout's message after the field name, as text and `_Value`s.
    """
    claims = _claims(key, marker)

    def found(spec: Any) -> Problem | None:
        return next((p for p in layout_problems(spec) if claims(p)), None)

    field = FIELD_NAMES[STYLE][key]
    return Rule(cel=cel, message=f"{field} {message}", check=lambda spec: found(spec) is None,
                explain=lambda spec: found(spec).named(STYLE),
                message_expression=_formatted([f"{field}: ", *expression]))


@dataclass(frozen=True)
class _Value:
    """A CEL integer shown in a message."""

    cel: str


def _formatted(pieces: list[str | _Value]) -> str:
    """CEL that builds the message from text and values: one `format` call.

    Not `"…" + string(x)`: the API server cannot bound the length of `string(int)`, so a
    concatenation with it is estimated past the CRD's whole cost budget; `format` is not.
    """
    template = "".join(p.replace("%", "%%") if isinstance(p, str) else "%d" for p in pieces)
    values = ", ".join(p.cel for p in pieces if isinstance(p, _Value))
    assert '"' not in template and "\\" not in template
    return f'"{template}".format([{values}])'


def claiming_rules(problem: Problem) -> list[Rule]:
    """The rules of `LAYOUT_RULES` that refuse `problem` on the API server (one, or none yet)."""
    return [rule for rule, claims in zip(LAYOUT_RULES, _CLAIMS) if claims(problem)]


_TENSOR = "self.parallelism.tensor"
_PIPELINE = "self.parallelism.pipeline"
_ZERO = "self.training.zeroStage"
_SEQ = "self.training.seqLength"
_HEADS_KNOWN, _HEADS = arch_cel("self.model", "num_attention_heads")
_WIDTH_KNOWN, _WIDTH = arch_cel("self.model", "intermediate_size")
_VOCAB_KNOWN, _VOCAB = arch_cel("self.model", "vocab_size")
_LAYERS_KNOWN, _LAYERS = arch_cel("self.model", "num_hidden_layers")
_, _POSITIONS = arch_cel("self.model", "max_position_embeddings")
_PIPELINE_STAGES = " or ".join(str(s) for s in range(MAX_ZERO_STAGE_WITH_PIPELINE + 1))

# (problem key, marker, CEL, static message, the layout's message after the field name)
_LAYOUT = [
    ("tensor", "attention heads", f"!{_HEADS_KNOWN} || {_HEADS} % {_TENSOR} == 0",
     "must divide the number of attention heads",
     [_Value(_TENSOR), " must divide the number of attention heads (", _Value(_HEADS), ")"]),
    ("tensor", "intermediate_size", f"!{_WIDTH_KNOWN} || {_WIDTH} % {_TENSOR} == 0",
     "must divide the MLP width intermediate_size",
     [_Value(_TENSOR), " must divide the MLP width intermediate_size (", _Value(_WIDTH), ")"]),
    ("tensor", "vocab_size", f"!{_VOCAB_KNOWN} || {_VOCAB} % {_TENSOR} == 0",
     "must divide vocab_size: the embedding and the output head are split by vocabulary rows",
     [_Value(_TENSOR), " must divide vocab_size (", _Value(_VOCAB),
      "): the embedding and the output head are split by vocabulary rows"]),
    ("pipeline", "layers", f"!{_LAYERS_KNOWN} || {_PIPELINE} <= {_LAYERS}",
     "must not exceed the model's numHiddenLayers",
     [_Value(_PIPELINE), " stages is more than the model's ", _Value(_LAYERS), " layers"]),
    ("zero_stage", "pipeline parallelism", f"{_PIPELINE} == 1 || {_ZERO} <= {MAX_ZERO_STAGE_WITH_PIPELINE}",
     f"must be at most {MAX_ZERO_STAGE_WITH_PIPELINE} with pipeline parallelism",
     ["ZeRO-", _Value(_ZERO), " cannot run with pipeline parallelism "
      f"(DeepSpeed pipelines allow stage {_PIPELINE_STAGES})"]),
    ("zero_stage", "tensor parallelism", f"{_TENSOR} == 1 || {_ZERO} <= {MAX_ZERO_STAGE_WITH_TENSOR}",
     f"must be at most {MAX_ZERO_STAGE_WITH_TENSOR} with tensor parallelism",
     ["ZeRO-", _Value(_ZERO), f" cannot run with tensor parallelism (stages 0 to {MAX_ZERO_STAGE_WITH_TENSOR} can)"]),
    ("seq_length", "max_position_embeddings", f"{_SEQ} <= {_POSITIONS}",  # positions always have a value
     "must not exceed the model's maxPositionEmbeddings",
     [_Value(_SEQ), " is longer than the model's max_position_embeddings (", _Value(_POSITIONS), ")"]),
]
_CLAIMS = [_claims(key, marker) for key, marker, *_ in _LAYOUT]
LAYOUT_RULES: tuple[Rule, ...] = tuple(_layout_rule(*entry) for entry in _LAYOUT)


def unclaimed_problems(spec: Any) -> list[Problem]:
    """Layout problems no CEL rule refuses (a check newer than the CRD): pydantic still refuses them."""
    return [p for p in layout_problems(spec) if not claiming_rules(p)]
