"""The shared corpus of valid and invalid manifests (tests/data/crd_corpus.yaml)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def custom_resources(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d["apiVersion"].startswith("neox.dev/")]


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _delete(document: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = document
    for key in parents:
        node = node[key]
    del node[leaf]


def _cases(section: str) -> list[tuple[str, dict[str, Any], str | None]]:
    corpus = yaml.safe_load((REPO_ROOT / "tests" / "data" / "crd_corpus.yaml").read_text())
    bases = {name: custom_resources(REPO_ROOT / path)[-1] for name, path in corpus["bases"].items()}
    cases = []
    for entry in corpus[section]:
        document = copy.deepcopy(bases[entry["base"]])
        for dotted, value in (entry.get("set") or {}).items():
            _set(document, dotted, value)
        for dotted in entry.get("delete") or []:
            _delete(document, dotted)
        cases.append((entry["name"], document, entry.get("expect")))
    return cases


def invalid_cases() -> list[tuple[str, dict[str, Any], str]]:
    """(name, manifest, fragment of the refusal) for every invalid entry."""
    return _cases("invalid")


def valid_cases() -> list[tuple[str, dict[str, Any]]]:
    """(name, manifest) for the edge cases both the API server and pydantic accept."""
    return [(name, document) for name, document, _ in _cases("valid")]
