"""Test helpers: a NeoXTraining manifest builder, PVs the claims can bind to, and the
operator as a subprocess (so it can be SIGKILLed) whose write counter is read from its
Prometheus endpoint."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from neox_runtime.api import names
from neox_runtime.launch import free_port

from tests.cluster.kube import Kube, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def training(name: str, nodes: int = 2, gpus: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"preset": "tiny"}, "data": {"path": "/data/tiny"},
        "parallelism": {"nodes": nodes, "gpusPerNode": gpus},
        "training": {"steps": 100, "seqLength": 128},  # tiny has 256 positions; the CRD refuses more
        "failurePolicy": {"backoffSeconds": 0, "maxRestarts": 2},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = copy.deepcopy(value)
    return {"apiVersion": "neox.dev/v1alpha1", "kind": "NeoXTraining", "metadata": {"name": name}, "spec": body}


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespaces: list[str], resync: float = 2.0):
        self.kubeconfig, self.namespaces, self.resync = kubeconfig, namespaces, resync
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"neox-operator-{'-'.join(namespaces)[:60]}.log"

    def start(self, wait: bool = True) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        args = [sys.executable, "-m", "neox_operator", "--metrics-port", str(self.metrics_port),
                "--health-port", str(self.health_port), "--resync-seconds", str(self.resync)]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONWARNINGS": "ignore"}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        if wait:
            wait_for(self.healthy, timeout=30, what="operator liveness endpoint")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful shutdown — as when a node dies under the operator."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def writes(self) -> float:
        return self.metric("neox_operator_api_writes_total")


def status(kube: Kube, namespace: str, name: str, kind: str = "neoxtraining") -> dict[str, Any]:
    return kube.get(kind, name, namespace).get("status") or {}


def condition(kube: Kube, namespace: str, name: str, type_: str, kind: str = "neoxtraining") -> dict[str, Any]:
    return next((c for c in status(kube, namespace, name, kind).get("conditions", []) if c["type"] == type_), {})


def condition_is(kube: Kube, namespace: str, name: str, type_: str, value: str = "True") -> dict | None:
    found = condition(kube, namespace, name, type_)
    return found if found.get("status") == value else None


def worker_pods(kube: Kube, namespace: str, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = f"{names.LABEL_TRAINING}={name}"
    if attempt is not None:
        selector += f",{names.LABEL_ATTEMPT}={attempt}"
    return [p for p in kube.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")]


def running_pods(kube: Kube, namespace: str, name: str, attempt: int, count: int) -> list[dict] | None:
    pods = [p for p in worker_pods(kube, namespace, name, attempt) if p["status"].get("phase") == "Running"]
    return pods if len(pods) == count else None


def pod_index(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def events(kube: Kube, namespace: str, kind: str = "NeoXTraining") -> list[dict[str, Any]]:
    out = kube.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    return [e for e in json.loads(out)["items"] if e["involvedObject"]["kind"] == kind]
