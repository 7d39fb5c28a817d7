"""Which writes turn the observed children into the desired ones (pure).

Children carry the hash of their rendered form; a child whose hash matches is left
alone, so a reconcile with nothing to change plans no write at all. Jobs are not diffed
here: which attempt should exist is the reconciler's decision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from .render import HASH_ANNOTATION

Verb = Literal["create", "replace", "patch", "delete"]


@dataclass(frozen=True)
class Action:
    """One write: `body` is the manifest (create/replace) or the merge patch (patch)."""

    verb: Verb
    kind: str
    name: str
    body: dict[str, Any] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.verb} {self.kind}/{self.name}"


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _hash(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)


def child_actions(desired: list[dict[str, Any]],
                  observed: dict[tuple[str, str], dict[str, Any]]) -> list[Action]:
    actions: list[Action] = []
    for manifest in desired:
        kind, name = key(manifest)
        current = observed.get((kind, name))
        if current is None:
            actions.append(Action("create", kind, name, manifest))
        elif kind == "PersistentVolumeClaim":
            actions.extend(_claim_actions(manifest, current))
        elif _hash(current) != _hash(manifest) and not current["metadata"].get("deletionTimestamp"):
            replacement = copy.deepcopy(manifest)
            replacement["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            actions.append(Action("replace", kind, name, replacement))
    return actions


def _claim_actions(manifest: dict[str, Any], current: dict[str, Any]) -> list[Action]:
    """A claim's spec is immutable; only its ownership follows retainPolicy."""
    want = manifest["metadata"].get("ownerReferences") or []
    have = current["metadata"].get("ownerReferences") or []
    if [r.get("uid") for r in want] == [r.get("uid") for r in have]:
        return []
    patch = {"metadata": {"ownerReferences": want or None}}
    return [Action("patch", manifest["kind"], manifest["metadata"]["name"], patch)]


def status_patch(desired: dict[str, Any], observed: dict[str, Any]) -> dict[str, Any]:
    """The operator-owned status keys whose value differs; runtime-owned keys are never included."""
    return {k: v for k, v in desired.items() if observed.get(k) != v}
