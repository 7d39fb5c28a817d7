"""A small test client for the local cluster: kubectl for the CLI paths, the Python client for the rest."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import kubernetes
import yaml

from localcluster.cluster import LocalCluster
from localcluster import nodes


class Kube:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.api_client = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        self.batch = kubernetes.client.BatchV1Api(self.api_client)
        self.apps = kubernetes.client.AppsV1Api(self.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None):
        return self.cluster.kubectl(*args, check=check, input=input)

    def apply(self, manifest: dict[str, Any] | str, namespace: str, check: bool = True):
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.kubectl("apply", "-n", namespace, "-f", "-", input=text, check=check)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)

    # ---------------------------------------------------------------- pod lifecycle
    def finish_pod(self, name: str, namespace: str, exit_code: int) -> None:
        """Make kwok end the pod's container with `exit_code`, as a kubelet would report it."""
        self.kubectl("annotate", "pod", name, "-n", namespace, "--overwrite",
                     f"{nodes.EXIT_CODE_ANNOTATION}={exit_code}")

    def lose_node(self, node: str) -> None:
        """Simulate a node that stops reporting: kwok lets go of it, its Ready turns Unknown."""
        self.kubectl("label", "node", node, "--overwrite", f"{nodes.KWOK_LABEL}=lost")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        patch = {"status": {"conditions": [{
            "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
            "message": "Kubelet stopped posting node status.", "lastHeartbeatTime": now,
            "lastTransitionTime": now}]}}
        self.kubectl("patch", "node", node, "--subresource", "status", "--type", "strategic",
                     "-p", json.dumps(patch))

    def restore_node(self, node: str) -> None:
        self.kubectl("label", "node", node, "--overwrite", f"{nodes.KWOK_LABEL}={nodes.KWOK_LABEL_VALUE}")

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        args = ["get", "pods", "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args).stdout)["items"]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.3,
             what: str = "condition") -> Any:
    """Poll until `predicate()` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - reported on timeout
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" +
                       (f"; last error: {last_error}" if last_error else ""))
