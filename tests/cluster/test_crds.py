"""The CRDs as the real API server enforces them: schema, CEL, defaults, subresources."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from neox_operator import render, serving
from neox_runtime.api import names
from neox_runtime.api.serving import NeoXServingSpec
from neox_runtime.api.training import NeoXTrainingSpec
from tests.corpus import EXAMPLES, custom_resources, invalid_cases, valid_cases

from .kube import Kube, wait_for


def _create(kube: Kube, namespace: str, document: dict, dry_run: bool = False):
    args = ["create", "-n", namespace, "-f", "-", "-o", "json"]
    if dry_run:
        args.append("--dry-run=server")
    return kube.kubectl(*args, input=yaml.safe_dump(document), check=False)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_with_server_side_defaults(kube: Kube, namespace: str, example):
    for document in custom_resources(example):
        proc = _create(kube, namespace, document)
        assert proc.returncode == 0, proc.stderr
        stored = json.loads(proc.stdout)
        spec = stored["spec"]
        if document["kind"] == "NeoXTraining":
            # Fields the example leaves out come back with the schema's defaults.
            assert spec["checkpoint"]["retainPolicy"] == "Retain"
            assert spec["failurePolicy"]["maxRestarts"] >= 0
            assert spec["training"]["schedule"]["decay"] == "cosine"
            assert spec["suspend"] is False
        else:
            assert spec["rollout"]["strategy"] in ("Rolling", "Canary")
            assert spec["runtime"]["tensorParallel"] >= 1
            assert "enabled" in spec["autoscaling"]


@pytest.mark.parametrize("name,document,expect", invalid_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_invalid_manifest_is_refused_naming_the_field(kube: Kube, namespace: str, name, document, expect):
    proc = _create(kube, namespace, document, dry_run=True)
    assert proc.returncode != 0, f"{name} was accepted"
    assert expect in proc.stderr, proc.stderr


@pytest.mark.parametrize("name,document", valid_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_edge_case_at_a_limit_is_accepted(kube: Kube, namespace: str, name, document):
    proc = _create(kube, namespace, document, dry_run=True)
    assert proc.returncode == 0, f"{name}: {proc.stderr}"


def _children(document: dict, namespace: str) -> list[dict]:
    """What the operator would create for `document` (a late attempt, for the longest Job names)."""
    owner = render.Owner(document["metadata"]["name"], namespace, "0b7c2a8e-1111-4222-8333-944455556666")
    if document["kind"] == "NeoXTraining":
        return render.children(owner, NeoXTrainingSpec.model_validate(document["spec"]), attempt=999)
    spec = NeoXServingSpec.model_validate(document["spec"])
    owner = render.Owner(owner.name, namespace, owner.uid, serving.KIND)
    source = serving.resolve_source(spec, serving.Observed(body=document, children={}, deployments=[], now=None))
    return [serving.service(owner), serving.deployment(owner, spec, source, serving.revision(owner, spec, source), 1)]


@pytest.mark.parametrize("base", ["training-tiny-cpu.yaml", "serving-from-volume.yaml"])
@pytest.mark.parametrize("name", ["x" * 40, "a1-2b", "z"])
def test_every_child_of_a_name_the_crd_accepts_is_accepted(kube: Kube, namespace: str, base, name):
    document = _example(base)
    document["metadata"]["name"] = name
    assert _create(kube, namespace, document, dry_run=True).returncode == 0
    for child in _children(document, namespace):
        proc = _create(kube, namespace, child, dry_run=True)
        assert proc.returncode == 0, f"{child['kind']}/{child['metadata']['name']}: {proc.stderr}"


@pytest.mark.parametrize("base", ["training-tiny-cpu.yaml", "serving-from-volume.yaml"])
@pytest.mark.parametrize("name", ["1abc", "tiny.cpu"])
def test_the_name_rules_are_what_the_children_need(kube: Kube, namespace: str, base, name):
    """Without the CRD's name rules these names were stored, then every Service create failed."""
    document = _example(base)
    document["metadata"]["name"] = name
    service = next(c for c in _children(document, namespace) if c["kind"] == "Service")
    proc = _create(kube, namespace, service, dry_run=True)
    assert proc.returncode != 0 and "metadata.name" in proc.stderr, proc.stderr


def _probe_crd(group: str, rules: list[dict]) -> dict:
    """A throwaway kind (its own group, so no other test sees it) with a status and these root rules."""
    schema = {"type": "object", "properties": {
        "metadata": {"type": "object"},
        "status": {"type": "object", "properties": {"phase": {"type": "string"}}}}}
    if rules:
        schema["x-kubernetes-validations"] = rules
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"probes.{group}"},
            "spec": {"group": group, "scope": "Namespaced", "names": {"kind": "Probe", "plural": "probes"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": schema}}]}}


def test_a_resource_stored_before_the_name_rules_keeps_a_writable_status(kube: Kube, namespace: str):
    """The name rules hold at creation only: the operator must still be able to mark an old
    `1abc` InvalidName (a root rule checked on every write would refuse that status too)."""
    group = f"{namespace}.probe.neox.dev"
    crd = _probe_crd(group, [])
    kube.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(crd))
    try:
        probe = {"apiVersion": f"{group}/v1", "kind": "Probe", "metadata": {"name": "1abc"}}
        wait_for(lambda: _create(kube, namespace, probe).returncode == 0, 30, what="the probe kind to be served")
        crd = _probe_crd(group, [rule.as_crd() for rule in names.name_rules(40)])
        kube.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(crd))
        refused = {**probe, "metadata": {"name": "2abc"}}
        wait_for(lambda: "must start with a lowercase letter" in _create(kube, namespace, refused).stderr, 30,
                 what="the name rules to be enforced")
        patch = kube.kubectl("patch", f"probes.{group}", "1abc", "-n", namespace, "--subresource", "status",
                             "--type", "merge", "-p", json.dumps({"status": {"phase": "Invalid"}}), check=False)
        assert patch.returncode == 0, patch.stderr
    finally:
        kube.cluster.kubectl("delete", "crd", f"probes.{group}", "--wait=false", check=False)


def _example(file_name: str) -> dict:
    return copy.deepcopy(custom_resources(next(p for p in EXAMPLES if p.name == file_name))[0])


def _training() -> dict:
    return _example("training-tiny-cpu.yaml")


@pytest.mark.parametrize("field,value,expect", [
    ("model", {"preset": "pythia-70m"}, "spec.model is immutable"),
    ("parallelism", {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1}, "spec.parallelism is immutable"),
])
def test_architecture_and_parallelism_are_immutable(kube: Kube, namespace: str, field, value, expect):
    document = _training()
    assert _create(kube, namespace, document).returncode == 0
    patch = json.dumps({"spec": {field: value}})
    proc = kube.kubectl("patch", "nxt", document["metadata"]["name"], "-n", namespace,
                        "--type", "merge", "-p", patch, check=False)
    assert proc.returncode != 0
    assert expect in proc.stderr
    # Mutable fields still change.
    kube.kubectl("patch", "nxt", document["metadata"]["name"], "-n", namespace, "--type", "merge",
                 "-p", json.dumps({"spec": {"suspend": True, "failurePolicy": {"maxRestarts": 7}}}))
    stored = kube.get("nxt", document["metadata"]["name"], namespace)["spec"]
    assert stored["suspend"] is True and stored["failurePolicy"]["maxRestarts"] == 7


def test_scale_subresource_sets_replicas(kube: Kube, namespace: str):
    serving = _example("serving-from-training.yaml")
    assert _create(kube, namespace, serving).returncode == 0
    kube.kubectl("scale", "nxs", serving["metadata"]["name"], "-n", namespace, "--replicas=3")
    assert kube.get("nxs", serving["metadata"]["name"], namespace)["spec"]["replicas"] == 3
    scale = json.loads(kube.kubectl("get", "--raw",
                                    f"/apis/neox.dev/v1alpha1/namespaces/{namespace}/neoxservings/"
                                    f"{serving['metadata']['name']}/scale").stdout)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3


def test_status_and_spec_are_written_separately(kube: Kube, namespace: str):
    document = _training()
    name = document["metadata"]["name"]
    assert _create(kube, namespace, document).returncode == 0
    # A status write through the subresource ignores spec changes in the same body ...
    kube.kubectl("patch", "nxt", name, "-n", namespace, "--subresource", "status", "--type", "merge",
                 "-p", json.dumps({"spec": {"suspend": True}, "status": {"phase": "Running", "restarts": 2}}))
    stored = kube.get("nxt", name, namespace)
    assert stored["status"] == {"phase": "Running", "restarts": 2}
    assert stored["spec"]["suspend"] is False
    # ... and a write to the main resource ignores status.
    kube.kubectl("patch", "nxt", name, "-n", namespace, "--type", "merge",
                 "-p", json.dumps({"spec": {"suspend": True}, "status": {"phase": "Failed"}}))
    stored = kube.get("nxt", name, namespace)
    assert stored["spec"]["suspend"] is True and stored["status"]["phase"] == "Running"
    generation = stored["metadata"]["generation"]
    kube.kubectl("patch", "nxt", name, "-n", namespace, "--subresource", "status", "--type", "merge",
                 "-p", json.dumps({"status": {"restarts": 3}}))
    assert kube.get("nxt", name, namespace)["metadata"]["generation"] == generation


def test_printer_columns_and_short_names(kube: Kube, namespace: str):
    document = _training()
    assert _create(kube, namespace, document).returncode == 0
    kube.kubectl("patch", "nxt", document["metadata"]["name"], "-n", namespace, "--subresource", "status",
                 "--type", "merge", "-p", json.dumps({"status": {
                     "phase": "Running", "restarts": 1, "progress": {"stepDisplay": "50/200", "loss": "3.21"}}}))
    table = kube.kubectl("get", "nxt", "-n", namespace).stdout
    header, row = table.splitlines()[0].split(), table.splitlines()[1].split()
    assert header[:5] == ["NAME", "PHASE", "STEP", "LOSS", "RESTARTS"]
    assert row[:5] == ["tiny-cpu", "Running", "50/200", "3.21", "1"]
    # The `neox` category lists both kinds.
    assert "neoxtraining.neox.dev/tiny-cpu" in kube.kubectl("get", "neox", "-n", namespace).stdout


def test_kubectl_explain_teaches_the_api(kube: Kube):
    text = kube.kubectl("explain", "neoxtraining.spec.parallelism").stdout
    assert "Tensor-parallel degree" in text and "Pipeline-parallel stages" in text
    assert "Pods in the group, one per node" in text
    serving = kube.kubectl("explain", "nxs.spec.rollout.canarySteps").stdout
    assert "increasing" in serving
