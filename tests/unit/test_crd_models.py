"""The pydantic models and the generated CRDs are one source of truth."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from neox_runtime.api import crdgen, names
from neox_runtime.api.manifests import validate_manifest
from neox_runtime.api.schema import CRDModel
from tests.corpus import EXAMPLES, REPO_ROOT, custom_resources, invalid_cases, valid_cases


def test_committed_crds_are_generated_from_the_models():
    for directory in crdgen.CRD_DIRS:
        for name, text in crdgen.rendered().items():
            assert (directory / name).read_text() == text, f"{directory / name} is stale: run crdgen --write"


def test_helm_chart_crds_equal_crds_dir():
    for path in (REPO_ROOT / "crds").glob("*.yaml"):
        assert (REPO_ROOT / "charts" / "neox-operator" / "crds" / path.name).read_text() == path.read_text()


def _walk(schema: dict, path: str):
    yield path, schema
    for key, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if "properties" in schema.get("items", {}):  # scalar items are described by their list
        yield from _walk(schema["items"], f"{path}[]")


@pytest.mark.parametrize("crd", [crdgen.training_crd(), crdgen.serving_crd()], ids=["training", "serving"])
def test_every_spec_and_status_field_has_a_description(crd):
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        for path, node in _walk(root["properties"][part], part):
            assert node.get("description"), f"{path} has no description"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_for_the_models(example):
    for document in custom_resources(example):
        validate_manifest(document)


@pytest.mark.parametrize("name,document,expect", invalid_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_models_refuse_every_invalid_manifest_naming_the_field(name, document, expect):
    """The same words as the API server's (tests/cluster/test_crds.py holds it to `expect` too)."""
    with pytest.raises(ValueError) as refused:
        validate_manifest(document)
    assert expect in str(refused.value)


@pytest.mark.parametrize("name,document", valid_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_models_accept_the_edge_cases(name, document):
    validate_manifest(document)


def _all_models(base=CRDModel):
    for sub in base.__subclasses__():
        yield sub
        yield from _all_models(sub)


def test_every_rule_is_emitted_into_the_crds():
    """Python and CEL halves of each rule ship together: the CEL is in a generated CRD."""
    rendered = [yaml.safe_load(text) for text in crdgen.rendered().values()]
    emitted = set()

    def collect(node):
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                emitted.add((rule["rule"], rule["message"]))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(rendered)
    rules = [r for model in _all_models() for r in model.rules] + list(names.name_rules(40))
    assert rules and {(r.as_crd()["rule"], r.message) for r in rules} <= emitted


def test_api_package_does_not_import_torch():
    code = ("import sys, neox_runtime.api.resolved, neox_runtime.api.crdgen, neox_runtime.api.manifests; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_resume_from_applies_to_the_first_attempt_only():
    from neox_runtime.api.resolved import load_document, train_config_fields
    from tests.corpus import custom_resources

    document = custom_resources(REPO_ROOT / "examples" / "training-tiny-cpu.yaml")[0]
    document["spec"]["checkpoint"]["resumeFrom"] = "step-50"
    resolved = load_document(document)
    assert train_config_fields(resolved, {"NEOX_ATTEMPT": "0"})["resume_from"] == "step-50"
    assert train_config_fields(resolved, {"NEOX_ATTEMPT": "2"})["resume_from"] == "latest"
