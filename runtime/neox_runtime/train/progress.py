"""Progress reporting: a plain record, a reporter interface, and reporters that never stop training.

The loop builds a `ProgressReport` every log interval and hands it to a `Reporter`.
Here: a JSON-lines file (what tests and humans tail), a human-readable line with an ETA,
and `SafeReporter`, which fans out to several reporters and swallows their failures
(logged once per reporter and error type) — a broken status sink must never cost a
training run. The operator side plugs in its own reporter (e.g. one that patches the
NeoXTraining status) through the same interface.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

log = logging.getLogger(__name__)


@dataclass
class ProgressReport:
    step: int
    total_steps: int
    tokens: int
    loss: float | None
    lr: float
    tokens_per_sec: float | None
    mfu: float | None
    eta_seconds: float | None
    latest_checkpoint_step: int | None = None
    latest_checkpoint_time: float | None = None  # unix time the checkpoint became `latest`
    val_loss: float | None = None
    checkpoint_seconds: float | None = None  # how long the last save took (all ranks, until `latest` moved)
    event: str = "progress"  # progress | eval | checkpoint | done | preempted

    def to_json(self) -> str:
        return json.dumps({"time": time.time(), **dataclasses.asdict(self)})


class Reporter(Protocol):
    def report(self, progress: ProgressReport) -> None: ...


class JsonLinesReporter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def report(self, progress: ProgressReport) -> None:
        with self.path.open("a") as f:
            f.write(progress.to_json() + "\n")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def format_line(p: ProgressReport) -> str:
    parts = [f"step {p.step}/{p.total_steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.val_loss is not None:
        parts.append(f"val_loss {p.val_loss:.4f}")
    parts.append(f"lr {p.lr:.3g}")
    if p.tokens_per_sec is not None:
        parts.append(f"{p.tokens_per_sec:,.0f} tok/s")
    if p.mfu is not None:
        parts.append(f"MFU {100 * p.mfu:.1f}%")
    parts.append(f"ETA {_duration(p.eta_seconds)}")
    if p.latest_checkpoint_step is not None:
        parts.append(f"ckpt@{p.latest_checkpoint_step}")
    return ("[" + p.event + "] " if p.event != "progress" else "") + " | ".join(parts)


class LineReporter:
    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream

    def report(self, progress: ProgressReport) -> None:
        print(format_line(progress), file=self.stream, flush=True)


class SafeReporter:
    """Fans a report out to every reporter; a failing reporter is logged, never raised."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = list(reporters)
        self._seen: set[tuple[int, type]] = set()
        self.failures = 0

    def report(self, progress: ProgressReport) -> None:
        for i, reporter in enumerate(self.reporters):
            try:
                reporter.report(progress)
            except Exception as e:  # noqa: BLE001 - reporting must not stop training
                self.failures += 1
                if (i, type(e)) not in self._seen:
                    self._seen.add((i, type(e)))
                    log.warning("Progress reporter failed reporter=%s error=%r", type(reporter).__name__, e)
