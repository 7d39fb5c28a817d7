"""Fixtures for operator tests: the shared control-plane fixtures, plus the operator itself
running as a real `neox-operator` process scoped to the test's namespace."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import cluster, kube, namespace  # noqa: F401

from .helpers import OperatorProcess


@pytest.fixture
def operator(kube, namespace):
    process = OperatorProcess(kube.cluster.kubeconfig, [namespace])
    process.start()
    yield process
    process.stop()
