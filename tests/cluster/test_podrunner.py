"""The local pod runner turns kwok pods into real processes with the pod's view of the world."""

from __future__ import annotations

import sys

from localcluster.podrunner import PodRunner
from localcluster.provisioner import claim_dir

from .kube import Kube, wait_for

SCRIPT = """
import os, pathlib, sys
index = int(os.environ["INDEX"])
config = pathlib.Path(os.environ["GREETING_FILE"]).read_text()
out = pathlib.Path(os.environ["OUT_DIR"]) / f"rank-{index}.txt"
out.write_text(f"{config} from {os.environ['POD_NAME']} master={os.environ['MASTER_ADDR']}")
sys.exit(0 if index == 0 else 3)
"""


def _manifests() -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo"}, "data": {"greeting": "hello"}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "demo-data"},
         "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "local"}, "spec": {
            "completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
            "template": {"metadata": {"labels": {"run-locally": "yes"}}, "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main", "image": "python", "command": [sys.executable, "-c", SCRIPT],
                    "env": [
                        {"name": "INDEX", "valueFrom": {"fieldRef": {
                            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "MASTER_ADDR", "value": "local-0.workers.svc"},
                        {"name": "OUT_DIR", "value": "/out"},
                        {"name": "GREETING_FILE", "value": "/etc/demo/greeting"},
                    ],
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/demo"},
                                     {"name": "data", "mountPath": "/out"}],
                }],
                "volumes": [{"name": "config", "configMap": {"name": "demo"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "demo-data"}}],
            }},
        }},
    ]


def test_pods_run_locally_and_report_exit_codes(kube: Kube, namespace: str):
    for manifest in _manifests():
        kube.apply(manifest, namespace)
    cluster = kube.cluster
    runner = PodRunner(kubectl=cluster.kubectl, namespace=namespace, selector="run-locally=yes",
                       state_dir=cluster.state_dir / "podrunner", server=cluster.server(),
                       log=lambda message: None).start()
    try:
        def phases():
            pods = kube.pods(namespace, "run-locally=yes")
            done = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
                    for p in pods if p["status"].get("phase") in ("Succeeded", "Failed")}
            return done if len(done) == 2 else None

        pods = wait_for(phases, timeout=90, what="both pods finished")
    finally:
        runner.stop()
    assert pods["0"]["status"]["phase"] == "Succeeded"
    assert pods["1"]["status"]["phase"] == "Failed"
    assert pods["1"]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    # Both wrote into the claim's directory, which the provisioner bound to a real volume.
    data = claim_dir(cluster.volumes_dir, namespace, "demo-data")
    text = (data / "rank-1.txt").read_text()
    assert text.startswith("hello from local-1-") and text.endswith("master=127.0.0.1")
    assert kube.get("pvc", "demo-data", namespace)["status"]["phase"] == "Bound"
