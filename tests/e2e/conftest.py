from tests.cluster.conftest import cluster, kube, namespace  # noqa: F401 - shared fixtures
