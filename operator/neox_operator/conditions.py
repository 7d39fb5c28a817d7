"""Kubernetes condition semantics, so that status tells the truth without flapping.

A condition is keyed by type; `lastTransitionTime` changes only when `status` flips, so
a reconcile that re-derives the same state writes nothing. Reasons are CamelCase,
messages are for humans.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


@dataclass(frozen=True)
class Cond:
    """What a reconcile concludes about one condition type (without timestamps)."""

    type: str
    status: str
    reason: str
    message: str = ""


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    found = find(conditions, type_)
    return bool(found and found.get("status") == TRUE)


def merge(old: list[dict[str, Any]] | None, new: list[Cond], now: datetime,
          generation: int | None) -> list[dict[str, Any]]:
    """The conditions to write: `new` in order, keeping lastTransitionTime unless status flipped.

    Types present in `old` but not concluded in `new` are kept unchanged.
    """
    merged: list[dict[str, Any]] = []
    for cond in new:
        previous = find(old, cond.type)
        flipped = previous is None or previous.get("status") != cond.status
        merged.append({
            "type": cond.type, "status": cond.status, "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": rfc3339(now) if flipped else previous.get("lastTransitionTime"),
            "observedGeneration": generation,
        })
    concluded = {c.type for c in new}
    merged.extend(c for c in old or [] if c.get("type") not in concluded)
    return merged
