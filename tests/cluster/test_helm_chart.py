"""The Helm chart lints, renders, and its manifests are accepted by the API server."""

from __future__ import annotations

import subprocess

import pytest

from localcluster import build
from tests.corpus import REPO_ROOT

from .kube import Kube

CHART = REPO_ROOT / "charts" / "neox-operator"


def _helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(build.binary("helm")), *args], text=True, capture_output=True, check=True)


def test_chart_lints():
    assert "0 chart(s) failed" in _helm("lint", str(CHART)).stdout


@pytest.mark.parametrize("all_namespaces", [True, False])
def test_rendered_chart_is_accepted_by_the_api_server(kube: Kube, namespace: str, all_namespaces: bool):
    rendered = _helm("template", "neox", str(CHART), "--namespace", namespace,
                     "--set", f"watchAllNamespaces={str(all_namespaces).lower()}").stdout
    proc = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
    kinds = {line.split("/")[0] for line in proc.stdout.splitlines()}
    expected_role = "clusterrole.rbac.authorization.k8s.io" if all_namespaces else "role.rbac.authorization.k8s.io"
    assert {"deployment.apps", "serviceaccount", expected_role} <= kinds
    assert ("--all-namespaces" in rendered) is all_namespaces
