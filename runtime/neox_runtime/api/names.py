"""Deterministic names and labels of the children of each custom resource.

The operator renders children with these names, the runtime finds its peers by them,
and the CRDs cap `metadata.name` so that every name here stays a valid DNS label.

Kubernetes accepts a custom resource named like any DNS-1123 subdomain (`1abc`,
`a.b`), but the children need more: a Service name is a DNS-1035 label (it starts with
a letter, no dots), and so is the training's headless Service and the serving's;
a pod's hostname (`<job>-<index>`) is a DNS-1123 label (no dots). `name_rules` says
that once, as CEL on the CRDs' root and as Python for local tools and the operator.
"""

from __future__ import annotations

import hashlib
import re

from .schema import Rule

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


# A DNS-1123 label (what the API server itself requires of a pod hostname), and the rest of
# what a DNS-1035 label (a Service name) adds: a letter first.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_WHY = "it names the children's Services and pod hostnames, which are DNS labels"


def name_rules(max_length: int) -> tuple[Rule, ...]:
    """Rules on `metadata.name` (CEL on the CRD's root; `check` takes the name).

    Enforced at creation only: a resource stored before a rule existed (the name cannot
    change) must still take the status that tells its owner why nothing runs.
    """
    return (
        Rule(cel=f"self.metadata.name.size() <= {max_length}", on_create=True,
             message=f"metadata.name must be at most {max_length} characters, so that every child name fits in 63",
             check=lambda name: len(name) <= max_length),
        Rule(cel="self.metadata.name.matches('^[a-z]')", on_create=True,
             message=f"metadata.name must start with a lowercase letter: {_WHY}",
             check=lambda name: name[:1].isascii() and name[:1].islower()),
        Rule(cel="!self.metadata.name.contains('.')", on_create=True,
             message=f"metadata.name must not contain '.': {_WHY}",
             check=lambda name: "." not in name),
    )


def name_problems(name: str, max_length: int) -> list[str]:
    """Why children of a resource called `name` could not be created; empty when they can.

    Beyond `name_rules` this also checks what the API server checks of every object name
    by itself (lowercase letters, digits and '-', alphanumeric at both ends), so a local
    manifest gets the same answer as `kubectl apply`.
    """
    found = [refusal for rule in name_rules(max_length) if (refusal := rule.refusal(name)) is not None]
    if not _DNS_LABEL.fullmatch(name.replace(".", "-")):  # a dot has its own message above
        found.append(f"metadata.name {name!r} must consist of lowercase letters, digits and '-', "
                     "and start and end with a letter or digit")
    return found
