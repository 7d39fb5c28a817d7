"""Base class for the custom-resource models, and cross-field rules that exist twice.

A `Rule` pairs a CEL expression (which the API server enforces, emitted into the CRD by
`crdgen`) with the same predicate in Python (which pydantic enforces when the runtime
or operator parses a spec, e.g. `neox-train --config` on a laptop). Both live side by
side in one object, and tests feed a corpus of valid and invalid manifests to both the
API server and pydantic to prove they accept and refuse the same documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, `check` for Python.

    `check` receives the validated model (for a rule on the resource's root, its
    `metadata.name`) and returns True when the object is valid. `message` must name the
    field it is about, the way the API server reports it. A rule whose refusal quotes the
    offending values has both halves of that too: `message_expression` (CEL building the
    string on the API server) and `explain` (the same string in Python); tests hold the
    two equal on the shared corpus, and the API server falls back to `message` when the
    expression cannot be evaluated.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    # Transition rules (oldSelf) only make sense on the API server.
    transition: bool = False
    message_expression: str | None = None
    explain: Callable[[Any], str] | None = None
    # Enforced when the object is created, not on its updates: an object stored before the
    # rule existed must keep a writable status (a rule on an immutable field loses nothing).
    on_create: bool = False

    def as_crd(self) -> dict[str, Any]:
        if self.on_create:
            crd: dict[str, Any] = {"rule": f"oldSelf.hasValue() || {self.cel}", "optionalOldSelf": True}
        else:
            crd = {"rule": self.cel}
        crd["message"] = self.message
        if self.message_expression is not None:
            crd["messageExpression"] = self.message_expression
        return crd

    def refusal(self, value: Any) -> str | None:
        """None when `value` passes; else the message the API server would give."""
        if self.transition or self.check(value):
            return None
        return self.explain(value) if self.explain is not None else self.message


class CRDModel(BaseModel):
    """A node of a CRD schema: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()
    # Schema fragments merged into this node's generated OpenAPI (e.g. preserve-unknown).
    crd_extra: ClassVar[dict[str, Any]] = {}
    # Per-field schema fragments, by Python field name (e.g. list-map keys of conditions).
    field_extra: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="after")
    def _apply_rules(self) -> "CRDModel":
        # Every broken rule at once, as the API server reports them.
        refusals = [refusal for rule in self.rules if (refusal := rule.refusal(self)) is not None]
        if refusals:
            raise ValueError("; ".join(refusals))
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as it is written to the API server (camelCase, no unset fields)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
