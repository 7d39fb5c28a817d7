"""Pinned versions of every control-plane binary the local cluster builds.

One place to bump a version; the cache directory is keyed by all of them, so a bump
rebuilds exactly the binaries whose version changed.
"""

KUBERNETES = "v1.34.4"
ETCD = "v3.6.16"
KWOK = "v0.7.0"
HELM = "v3.19.5"

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
