"""The local control plane is a real one: scheduler, controllers, GC, kwok nodes."""

from __future__ import annotations

import json

from .kube import Kube, wait_for

JOB = {
    "apiVersion": "batch/v1", "kind": "Job",
    "metadata": {"name": "gpu-probe"},
    "spec": {
        "completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
        "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "probe", "image": "busybox",
                            "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
        }},
    },
}


def _wait_for_running_probe_pods(kube: Kube, namespace: str) -> list[dict]:
    def running():
        pods = [p for p in kube.pods(namespace, "job-name=gpu-probe") if p["status"].get("phase") == "Running"]
        return pods if len(pods) == 2 else None

    return wait_for(running, timeout=60, what="2 running pods")


def test_job_pods_are_scheduled_on_gpu_nodes_and_run(kube: Kube, namespace: str):
    kube.apply(JOB, namespace)
    pods = _wait_for_running_probe_pods(kube, namespace)
    nodes = {p["spec"]["nodeName"] for p in pods}
    # 8 GPUs each: the scheduler must put them on different nodes.
    assert len(nodes) == 2 and all(n.startswith("gpu-node-") for n in nodes)


def test_pod_exit_codes_drive_job_status(kube: Kube, namespace: str):
    kube.apply(JOB, namespace)
    pods = _wait_for_running_probe_pods(kube, namespace)
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    kube.finish_pod(by_index["0"]["metadata"]["name"], namespace, 0)
    kube.finish_pod(by_index["1"]["metadata"]["name"], namespace, 3)

    def failed_condition():
        job = kube.get("job", "gpu-probe", namespace)
        return next((c for c in job["status"].get("conditions", []) if c["type"] == "Failed"
                     and c["status"] == "True"), None)

    wait_for(failed_condition, timeout=60, what="Job Failed")
    failed = kube.get("pod", by_index["1"]["metadata"]["name"], namespace)
    assert failed["status"]["phase"] == "Failed"
    assert failed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_deleting_the_owner_garbage_collects_children(kube: Kube, namespace: str):
    owner = json.loads(kube.kubectl("create", "configmap", "owner", "-n", namespace, "-o", "json").stdout)
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "child", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                              "uid": owner["metadata"]["uid"]}]}}
    kube.apply(child, namespace)
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(lambda: kube.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0,
             timeout=60, what="child garbage-collected")


def test_service_account_tokens_work(kube: Kube, namespace: str):
    wait_for(lambda: kube.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0,
             timeout=30, what="default ServiceAccount")
    token = kube.kubectl("create", "token", "default", "-n", namespace).stdout.strip()
    proc = kube.kubectl("--token", token, "auth", "whoami", "-o", "json")
    assert json.loads(proc.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:default"
    # RBAC is on: the default ServiceAccount may not list pods.
    denied = kube.kubectl("--token", token, "get", "pods", "-n", namespace, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr


def test_node_loss_marks_node_not_ready(kube: Kube):
    node = "gpu-node-2"
    try:
        kube.lose_node(node)
        node_obj = kube.get("node", node, "default")
        ready = next(c for c in node_obj["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "Unknown"
    finally:
        kube.restore_node(node)
    wait_for(lambda: next(c for c in kube.get("node", node, "default")["status"]["conditions"]
                          if c["type"] == "Ready")["status"] == "True", timeout=60, what="node Ready again")
