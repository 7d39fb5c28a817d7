"""Checkpoint directory management: tags, the atomic `latest` pointer, retention.

DeepSpeed writes the tensors (`engine.save_checkpoint(..., save_latest=False)`); this
module owns what makes a checkpoint *usable*: `latest` names a tag only after every rank
finished writing it (the caller barriers first), it is replaced atomically (temp file +
os.replace), so a crash mid-save leaves the previous checkpoint as latest. Retention
never deletes the tag `latest` points to.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from neox_runtime.api import contract

LATEST = "latest"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return contract.checkpoint_tag(step)


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    if not match:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(match.group(1))


def read_latest(directory: str | Path) -> str | None:
    path = Path(directory) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(directory) / tag).is_dir() else None


def resume_tag(directory: str | Path, resume_from: str) -> str | None:
    """The checkpoint to resume from: `latest`, `none` (start fresh) or `step-N`."""
    if resume_from == "none":
        return None
    if resume_from == "latest":
        return read_latest(directory)
    tag = tag_for(int(resume_from.removeprefix("step-")))
    if not (Path(directory) / tag).is_dir():
        raise ValueError(f"resume_from: no checkpoint {tag} in {directory}")
    return tag


def write_latest(directory: str | Path, tag: str) -> None:
    directory = Path(directory)
    tmp = directory / f".{LATEST}.{os.getpid()}.tmp"
    with tmp.open("w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / LATEST)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def list_tags(directory: str | Path) -> list[str]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted(tags, key=step_of)


def prune(directory: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete tags (and never `latest`); returns deleted."""
    latest = read_latest(directory)
    if latest is None:
        return []
    complete = [t for t in list_tags(directory) if step_of(t) <= step_of(latest)]
    doomed = [t for t in complete[:-keep_last] if t != latest] if keep_last > 0 else []
    for tag in doomed:
        shutil.rmtree(Path(directory) / tag, ignore_errors=True)
    return doomed
