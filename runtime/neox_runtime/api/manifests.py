"""Validate whole NeoXTraining / NeoXServing manifests the way the API server does.

The spec models carry the field rules; this adds what lives outside `spec` (the rules on
`metadata.name` that keep every child name a valid DNS label, `names.name_rules`), and
names each refused field from the manifest's root (`spec.training.steps`), as the API
server does, so that local tools refuse exactly what `kubectl apply` refuses, in its words.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from . import names, serving, training

KINDS = {
    training.KIND: (training.NeoXTrainingSpec, training.MAX_NAME_LENGTH),
    serving.KIND: (serving.NeoXServingSpec, serving.MAX_NAME_LENGTH),
}


def validate_manifest(document: dict[str, Any]):
    """Return the parsed spec of a NeoXTraining or NeoXServing manifest; ValueError if invalid."""
    kind = document.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    spec_model, max_name = KINDS[kind]
    problems = names.name_problems((document.get("metadata") or {}).get("name", ""), max_name)
    if problems:
        raise ValueError("; ".join(problems))
    if "spec" not in document:
        raise ValueError("spec: Required value")
    try:
        return spec_model.model_validate(document["spec"])
    except ValidationError as error:
        raise ValueError(spec_errors(error)) from error


def spec_errors(error: ValidationError) -> str:
    """One line per refused field, each named from the manifest's root.

    The models' own rules already name their field (`Rule.message`); pydantic's field
    errors get the path in front.
    """
    return "; ".join(_error_line(e) for e in error.errors())


def _error_line(error: dict[str, Any]) -> str:
    path = field_path(("spec", *error["loc"]))
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f'unknown field "{path}"'  # kubectl's words for a field the schema lacks
    return f"{path}: {error['msg']}"


def field_path(loc: tuple[Any, ...]) -> str:
    """('spec', 'rollout', 'canarySteps', 0, 'weight') -> spec.rollout.canarySteps[0].weight"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
