"""Fixtures for tests against the real local control plane.

One control plane per test session (started by the same code as `hack/cluster up`, or
reused when one is already running in `$NEOX_CLUSTER_DIR`), the CRDs installed once, and
a fresh namespace per test.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from localcluster.cluster import DEFAULT_STATE_DIR, LocalCluster

from .kube import Kube

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    shared = LocalCluster(state_dir=Path(os.environ.get("NEOX_CLUSTER_DIR", DEFAULT_STATE_DIR)))
    if shared.is_running():
        yield shared
        return
    own = LocalCluster(state_dir=tmp_path_factory.mktemp("cluster"))
    own.up()
    try:
        yield own
    finally:
        own.down(wipe=True)


@pytest.fixture(scope="session")
def kube(cluster: LocalCluster) -> Kube:
    kube = Kube(cluster)
    cluster.install_crds(REPO_ROOT / "crds")
    return kube


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest):
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(c for c in name if c.isalnum() or c == "-")
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
