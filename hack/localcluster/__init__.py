"""A real single-machine Kubernetes control plane for development and tests.

Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok and
helm from their published Go modules (see `build`), and starts them on loopback with
kwok standing in for GPU nodes (see `cluster`). `hack/cluster` and the pytest fixtures
both use this package, so developers and CI run the same control plane.
"""
