"""The runtime's progress reporter against the real API server, authenticated as the
training's own ServiceAccount under the Role the operator renders: it can patch its own
NeoXTraining's status and nothing else, and the operator's status writes keep its fields."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import yaml

from neox_operator import render
from neox_runtime.api import names
from neox_runtime.reporting.kubernetes import KubernetesReporter
from tests.cluster.kube import wait_for

from .helpers import condition_is, status, training

pytestmark = pytest.mark.cluster


@dataclass
class Progress:
    step: int = 120
    total_steps: int = 1000
    tokens: int = 245760
    loss: float | None = 3.21
    lr: float = 6e-4
    tokens_per_sec: float | None = 4096.5
    mfu: float | None = 0.412
    eta_seconds: float | None = 880.0
    latest_checkpoint_step: int | None = 100
    latest_checkpoint_time: float | None = 1_790_000_000.0
    val_loss: float | None = None


def _runtime_kubeconfig(kube, namespace, account, path) -> str:
    token = kube.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    admin = yaml.safe_load(kube.cluster.kubeconfig.read_text())
    admin["users"] = [{"name": "runtime", "user": {"token": token}}]
    admin["contexts"] = [{"name": "runtime", "context": {"cluster": admin["clusters"][0]["name"], "user": "runtime"}}]
    admin["current-context"] = "runtime"
    path.write_text(yaml.safe_dump(admin))
    return str(path)


def _own_children(kube, namespace, name):
    uid = kube.get("neoxtraining", name, namespace)["metadata"]["uid"]
    owner = render.Owner(name, namespace, uid)
    items = [render.service_account(owner), render.role(owner), render.role_binding(owner)]
    kube.apply({"apiVersion": "v1", "kind": "List", "items": items}, namespace)


def test_reporter_patches_only_its_own_training_status(kube, namespace, tmp_path):
    for name in ("mine", "other"):
        kube.apply(training(name), namespace)
    _own_children(kube, namespace, "mine")
    config = _runtime_kubeconfig(kube, namespace, names.training_service_account("mine"), tmp_path / "kubeconfig")

    assert KubernetesReporter("mine", namespace, kubeconfig=config).report(Progress()) is True
    st = status(kube, namespace, "mine")
    assert st["progress"]["step"] == 120 and st["progress"]["stepDisplay"] == "120/1000"
    assert st["progress"]["loss"] == "3.2100" and st["progress"]["updatedAt"]
    assert st["latestCheckpoint"]["step"] == 100 and st["latestCheckpoint"]["time"].startswith("2026-")
    full = json.loads(kube.kubectl("get", "neoxtraining", "mine", "-n", namespace, "-o", "json",
                                   "--show-managed-fields").stdout)
    managers = {m["manager"] for m in full["metadata"]["managedFields"] if m.get("subresource") == "status"}
    assert "neox-runtime" in managers

    assert KubernetesReporter("other", namespace, kubeconfig=config).report(Progress()) is False
    assert "progress" not in status(kube, namespace, "other")


def test_operator_status_writes_keep_runtime_progress(kube, namespace, operator, tmp_path):
    kube.apply(training("shared", suspend=True), namespace)
    wait_for(lambda: condition_is(kube, namespace, "shared", "Suspended"), 30)
    config = _runtime_kubeconfig(kube, namespace, names.training_service_account("shared"), tmp_path / "kc")
    assert KubernetesReporter("shared", namespace, kubeconfig=config).report(Progress(step=7)) is True
    kube.kubectl("patch", "neoxtraining", "shared", "-n", namespace, "--type", "merge", "-p",
                 json.dumps({"spec": {"suspend": False}}))
    wait_for(lambda: condition_is(kube, namespace, "shared", "Suspended", "False"), 30)
    time.sleep(1)
    st = status(kube, namespace, "shared")
    assert st["progress"]["step"] == 7 and st["latestCheckpoint"]["step"] == 100
    assert st["phase"] != "Suspended"
