"""Deterministic names and labels of the children of each custom resource.

The operator renders children with these names, the runtime finds its peers by them,
and the CRDs cap `metadata.name` so that every name here stays a valid DNS label.
"""

from __future__ import annotations

import hashlib

GROUP = "neox.dev"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TRAINING = f"{GROUP}/training"
LABEL_SERVING = f"{GROUP}/serving"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_REVISION = f"{GROUP}/revision"
MANAGER = "neox-operator"


def training_service(name: str) -> str:
    """Headless Service giving each worker pod a stable DNS name."""
    return f"{name}-workers"


def training_config(name: str) -> str:
    return f"{name}-config"


def training_checkpoints(name: str) -> str:
    return f"{name}-checkpoints"


def training_service_account(name: str) -> str:
    return f"{name}-runtime"


def training_job(name: str, attempt: int) -> str:
    """The pod group of one attempt; a restart replaces the Job with the next attempt's."""
    return f"{name}-a{attempt}"


def training_pod_hostname(name: str, attempt: int, index: int) -> str:
    """Hostname Kubernetes gives the pod of completion index `index` of an Indexed Job."""
    return f"{training_job(name, attempt)}-{index}"


def training_master_addr(name: str, attempt: int, namespace: str) -> str:
    """DNS name of the node-0 pod: `<hostname>.<subdomain>.<namespace>.svc`."""
    return f"{training_pod_hostname(name, attempt, 0)}.{training_service(name)}.{namespace}.svc"


def serving_service(name: str) -> str:
    return name


def serving_deployment(name: str, revision: str) -> str:
    return f"{name}-{revision}"


def serving_autoscaler(name: str) -> str:
    """HorizontalPodAutoscaler whose target is the NeoXServing's scale subresource."""
    return name


def serving_pdb(name: str) -> str:
    return f"{name}-pdb"


def revision_hash(material: str) -> str:
    """10 hex characters naming a serving revision (a hash of what changes the pods)."""
    return hashlib.sha256(material.encode()).hexdigest()[:10]
