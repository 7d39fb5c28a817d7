"""Rendered children as data: the expected manifests live in data/*.yaml.

Regenerate after an intended change with `NEOX_REGENERATE=1 pytest tests/operator/test_render.py`
and review the diff like code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from neox_operator import render
from neox_runtime.api import contract
from neox_runtime.api.resolved import resolve
from neox_runtime.api.training import NeoXTrainingSpec

from .helpers import training

DATA = Path(__file__).parent / "data"
OWNER = render.Owner("demo", "ml", "0b7c2a8e-1111-4222-8333-944455556666")
CASES = {
    "basic": training("demo", nodes=2, gpus=8, model={"preset": "pythia-160m"},
                      resources={"cpu": "32", "memory": "256Gi", "sharedMemory": "32Gi"},
                      scheduling={"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                   "effect": "NoSchedule"}],
                                  "priorityClassName": "training"},
                      data={"path": "/data/pile", "volume": {"claimName": "pile"}}),
    "kueue": training("demo", scheduling={"queueName": "team-a"}, checkpoint={"retainPolicy": "Delete"}),
    "volcano": training("demo", scheduling={"gang": {"provider": "volcano"}}),
    "coscheduling": training("demo", scheduling={"gang": {"provider": "coscheduling"}},
                             checkpoint={"existingClaim": "shared-ckpt"}),
}


def rendered(case: str, attempt: int = 0) -> list[dict]:
    spec = NeoXTrainingSpec.model_validate(CASES[case]["spec"])
    return render.children(OWNER, spec, attempt)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_children_match_expected_manifests(case: str):
    path = DATA / f"training-{case}.yaml"
    actual = rendered(case)
    if os.environ.get("NEOX_REGENERATE"):
        path.write_text(yaml.safe_dump_all(actual, sort_keys=False))
    assert actual == list(yaml.safe_load_all(path.read_text()))


def test_rendering_is_deterministic_and_attempt_only_changes_the_job():
    first, again, next_attempt = rendered("basic"), rendered("basic"), rendered("basic", attempt=1)
    assert first == again
    assert first[:-1] == next_attempt[:-1]
    job = next_attempt[-1]
    assert job["metadata"]["name"] == "demo-a1"
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == "demo-a1-0.demo-workers.ml.svc"


def test_config_map_holds_exactly_the_resolved_document():
    spec = NeoXTrainingSpec.model_validate(CASES["basic"]["spec"])
    config = render.config_map(OWNER, spec)
    assert yaml.safe_load(config["data"]["config.yaml"]) == resolve(spec, "demo", "ml").to_document()


def test_job_follows_the_runtime_contract():
    job = rendered("basic")[-1]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == \
        ("Indexed", 2, 2, 0)
    pod = spec["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["MASTER_PORT"]["value"] == str(contract.MASTER_PORT) and env["NPROC_PER_NODE"]["value"] == "8"
    assert pod["subdomain"] == "demo-workers" and pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["terminationGracePeriodSeconds"] >= 300
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {contract.CONFIG_MOUNT, contract.CHECKPOINT_MOUNT, contract.SHM_MOUNT, contract.DATA_MOUNT}


def test_checkpoint_claim_is_owned_only_under_retain_policy_delete():
    basic = {c["kind"]: c for c in rendered("basic")}
    kueue = {c["kind"]: c for c in rendered("kueue")}
    assert "ownerReferences" not in basic["PersistentVolumeClaim"]["metadata"]
    assert kueue["PersistentVolumeClaim"]["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert "PersistentVolumeClaim" not in {c["kind"] for c in rendered("coscheduling")}


def test_runtime_role_grants_only_its_own_training():
    role = next(c for c in rendered("basic") if c["kind"] == "Role")
    assert all(rule["resourceNames"] == ["demo"] for rule in role["rules"])
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "patch"}
