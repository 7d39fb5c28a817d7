"""The operator runs under exactly the RBAC the Helm chart grants: its ServiceAccount's
token, not the admin's, reconciling a NeoXTraining and a NeoXServing in both the
all-namespaces and the namespaced install."""

from __future__ import annotations

import pytest
import yaml

from neox_runtime.api import names
from tests.cluster.kube import wait_for
from tests.cluster.test_helm_chart import CHART, _helm

from .helpers import OperatorProcess, training

pytestmark = pytest.mark.cluster


def _service_account_kubeconfig(kube, namespace: str, account: str, path) -> None:
    token = kube.kubectl("create", "token", account, "-n", namespace, "--duration", "1h").stdout.strip()
    config = yaml.safe_load(kube.cluster.kubeconfig.read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("all_namespaces", [False, True], ids=["namespaced", "all-namespaces"])
def test_operator_reconciles_both_kinds_under_the_charts_rbac(kube, namespace, all_namespaces, tmp_path):
    release = "rbac-all" if all_namespaces else "rbac-ns"
    rendered = _helm("template", release, str(CHART), "--namespace", namespace,
                     "--set", f"watchAllNamespaces={str(all_namespaces).lower()}").stdout
    # Everything but the operator's own Deployment: the operator runs here as a process.
    manifests = [m for m in yaml.safe_load_all(rendered) if m and m["kind"] != "Deployment"]
    cluster_scoped = [(m["kind"], m["metadata"]["name"]) for m in manifests if m["kind"].startswith("Cluster")]
    for manifest in manifests:
        kube.apply(manifest, namespace)
    kubeconfig = tmp_path / "operator.kubeconfig"
    _service_account_kubeconfig(kube, namespace, release, kubeconfig)
    operator = OperatorProcess(kubeconfig, [namespace])
    operator.start()
    try:
        kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
                   namespace)
        kube.apply({"apiVersion": "neox.dev/v1alpha1", "kind": "NeoXServing", "metadata": {"name": "chat"},
                    "spec": {"model": {"volume": {"claimName": "models"}},
                             "autoscaling": {"enabled": True, "maxReplicas": 2}}}, namespace)
        kube.apply(training("run", nodes=1), namespace)

        def serving_ready():
            conds = kube.get("nxs", "chat", namespace).get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
        wait_for(serving_ready, 90, what="the NeoXServing Ready under the chart's RBAC")
        wait_for(lambda: kube.kubectl("get", "job", names.training_job("run", 0), "-n", namespace,
                                      check=False).returncode == 0, 90, what="the training's Job")
        assert kube.kubectl("get", "hpa", names.serving_autoscaler("chat"), "-n", namespace,
                            check=False).returncode == 0
    finally:
        operator.stop()
        for kind, name in cluster_scoped:
            kube.kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)
    log = operator.log_path.read_text()
    assert "forbidden" not in log.lower(), log[-3000:]
