"""Pure functions from a NeoXTraining to the manifests of its children.

Names come from `neox_runtime.api.names`, so the runtime finds its peers by the same
rules; every child carries an owner reference (except a retained checkpoint claim) and
the hash of its rendered form, which is what `kubeio` compares before any write.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from neox_runtime.api import contract, names
from neox_runtime.api.common import Resources
from neox_runtime.api.resolved import resolve
from neox_runtime.api.training import CheckpointVolume, NeoXTrainingSpec

API_VERSION = f"{names.GROUP}/v1alpha1"
HASH_ANNOTATION = f"{names.GROUP}/rendered-hash"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COSCHEDULING_LABEL = "scheduling.x-k8s.io/pod-group"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
RUNTIME_UID = 1000
TERMINATION_GRACE_SECONDS = 600  # long enough to save a checkpoint on SIGTERM


@dataclass(frozen=True)
class Owner:
    """The custom resource (a NeoXTraining unless said otherwise) the children belong to."""

    name: str
    namespace: str
    uid: str
    kind: str = "NeoXTraining"

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": self.kind, "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {names.LABEL_NAME: "neox-training", names.LABEL_INSTANCE: owner.name,
            names.LABEL_COMPONENT: component, names.LABEL_MANAGED_BY: names.MANAGER,
            names.LABEL_TRAINING: owner.name}


def rendered_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "status"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _child(api_version: str, kind: str, name: str, owner: Owner, component: str,
           owned: bool = True, extra_labels: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": owner.namespace,
                                "labels": {**labels(owner, component), **(extra_labels or {})}}
    if owned:
        metadata["ownerReferences"] = [owner.reference()]
    manifest = {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}
    metadata["annotations"] = {HASH_ANNOTATION: rendered_hash(manifest)}
    return manifest


def service(owner: Owner) -> dict[str, Any]:
    return _child("v1", "Service", names.training_service(owner.name), owner, "rendezvous", spec={
        "clusterIP": "None", "publishNotReadyAddresses": True,
        "selector": {names.LABEL_TRAINING: owner.name, names.LABEL_COMPONENT: "worker"},
        "ports": [{"name": "rendezvous", "port": contract.MASTER_PORT, "targetPort": contract.MASTER_PORT}],
    })


def config_map(owner: Owner, spec: NeoXTrainingSpec) -> dict[str, Any]:
    document = resolve(spec, owner.name, owner.namespace).to_document()
    return _child("v1", "ConfigMap", names.training_config(owner.name), owner, "config",
                  data={"config.yaml": yaml.safe_dump(document, sort_keys=True)})


def checkpoint_claim(owner: Owner, spec: NeoXTrainingSpec) -> dict[str, Any] | None:
    """The checkpoint PVC; owned (and so deleted with the training) only under retainPolicy Delete."""
    checkpoint = spec.checkpoint
    if checkpoint.existing_claim:
        return None
    volume = checkpoint.volume or CheckpointVolume()
    claim_spec: dict[str, Any] = {"accessModes": list(volume.access_modes),
                                  "resources": {"requests": {"storage": volume.size}}}
    if volume.storage_class_name:
        claim_spec["storageClassName"] = volume.storage_class_name
    return _child("v1", "PersistentVolumeClaim", names.training_checkpoints(owner.name), owner,
                  "checkpoints", owned=checkpoint.retain_policy == "Delete", spec=claim_spec)


def claim_name(owner: Owner, spec: NeoXTrainingSpec) -> str:
    return spec.checkpoint.existing_claim or names.training_checkpoints(owner.name)


def service_account(owner: Owner) -> dict[str, Any]:
    return _child("v1", "ServiceAccount", names.training_service_account(owner.name), owner, "runtime",
                  automountServiceAccountToken=True)


def role(owner: Owner) -> dict[str, Any]:
    """The runtime may read and patch its own NeoXTraining's status, nothing else."""
    return _child("rbac.authorization.k8s.io/v1", "Role", names.training_service_account(owner.name),
                  owner, "runtime", rules=[
                      {"apiGroups": [names.GROUP], "resources": ["neoxtrainings/status"],
                       "resourceNames": [owner.name], "verbs": ["get", "patch"]},
                      {"apiGroups": [names.GROUP], "resources": ["neoxtrainings"],
                       "resourceNames": [owner.name], "verbs": ["get"]},
                  ])


def role_binding(owner: Owner) -> dict[str, Any]:
    account = names.training_service_account(owner.name)
    return _child("rbac.authorization.k8s.io/v1", "RoleBinding", account, owner, "runtime",
                  roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
                  subjects=[{"kind": "ServiceAccount", "name": account, "namespace": owner.namespace}])


def pod_group(owner: Owner, spec: NeoXTrainingSpec) -> dict[str, Any] | None:
    """scheduler-plugins coscheduling PodGroup: all `nodes` pods or none."""
    gang = spec.scheduling.gang
    if gang is None or gang.provider != "coscheduling":
        return None
    return _child("scheduling.x-k8s.io/v1alpha1", "PodGroup", owner.name, owner, "gang", spec={
        "minMember": spec.parallelism.nodes,
        "scheduleTimeoutSeconds": gang.schedule_timeout_seconds,
    })


def _env(owner: Owner, spec: NeoXTrainingSpec, attempt: int) -> list[dict[str, Any]]:
    par = spec.parallelism
    env = [
        {"name": contract.ENV_MASTER_ADDR, "value": names.training_master_addr(owner.name, attempt, owner.namespace)},
        {"name": contract.ENV_MASTER_PORT, "value": str(contract.MASTER_PORT)},
        {"name": contract.ENV_NNODES, "value": str(par.nodes)},
        {"name": contract.ENV_NPROC_PER_NODE, "value": str(par.ranks_per_node)},
        {"name": contract.ENV_NODE_RANK, "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": contract.ENV_WORLD_SIZE, "value": str(par.world_size)},
        {"name": contract.ENV_CONFIG, "value": contract.CONFIG_FILE},
        {"name": contract.ENV_TRAINING_NAME, "value": owner.name},
        {"name": contract.ENV_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": contract.ENV_ATTEMPT, "value": str(attempt)},
        {"name": contract.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": contract.ENV_CHECKPOINT_DIR, "value": contract.CHECKPOINT_MOUNT},
        {"name": contract.ENV_DATA_DIR, "value": data_dir(spec)},
        {"name": contract.ENV_PROGRESS, "value": "kubernetes"},
    ]
    if par.gpus_per_node == 0:
        env.append({"name": contract.ENV_DS_ACCELERATOR, "value": "cpu"})
    return env


def data_dir(spec: NeoXTrainingSpec) -> str:
    """The data directory inside the pod: on the data volume, or on the checkpoint volume without one."""
    root = contract.DATA_MOUNT if spec.data.volume else contract.CHECKPOINT_MOUNT
    return f"{root}/{spec.data.path.strip('/')}"


def pod_resources(res: Resources, gpus: int) -> dict[str, Any]:
    """A container's requests (CPU, memory, GPUs) and GPU limit, from a spec's `resources`."""
    requests: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = res.memory
    out: dict[str, Any] = {"requests": requests} if requests else {}
    if gpus:
        out.setdefault("requests", {})[res.gpu_resource_name] = str(gpus)
        out["limits"] = {res.gpu_resource_name: str(gpus)}
    return out


def _volumes(owner: Owner, spec: NeoXTrainingSpec) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "config", "configMap": {"name": names.training_config(owner.name)}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim_name(owner, spec)}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
    ]
    mounts = [
        {"name": "config", "mountPath": contract.CONFIG_MOUNT, "readOnly": True},
        {"name": "checkpoints", "mountPath": contract.CHECKPOINT_MOUNT},
        {"name": "shm", "mountPath": contract.SHM_MOUNT},
    ]
    if spec.data.volume:
        volumes.append({"name": "data", "persistentVolumeClaim": {
            "claimName": spec.data.volume.claim_name, "readOnly": spec.data.volume.read_only}})
        mounts.append({"name": "data", "mountPath": contract.DATA_MOUNT, "readOnly": spec.data.volume.read_only})
    return volumes, mounts


def scheduling_fields(spec: NeoXTrainingSpec) -> dict[str, Any]:
    """Pod-spec placement fields; those Kubernetes lets a suspended Job change are marked in kubeio."""
    sched = spec.scheduling
    fields: dict[str, Any] = {}
    if sched.node_selector:
        fields["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        fields["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.affinity:
        fields["affinity"] = sched.affinity.model_dump(by_alias=True, exclude_none=True)
    if sched.priority_class_name:
        fields["priorityClassName"] = sched.priority_class_name
    scheduler = sched.scheduler_name or ("volcano" if sched.gang and sched.gang.provider == "volcano" else None)
    if scheduler:
        fields["schedulerName"] = scheduler
    return fields


def _gang_metadata(owner: Owner, spec: NeoXTrainingSpec) -> tuple[dict[str, str], dict[str, str]]:
    gang = spec.scheduling.gang
    if gang is None:
        return {}, {}
    if gang.provider == "coscheduling":
        return {COSCHEDULING_LABEL: owner.name}, {}
    return {}, {VOLCANO_GROUP_ANNOTATION: owner.name,
                "volcano.sh/job-min-available": str(spec.parallelism.nodes)}


def job(owner: Owner, spec: NeoXTrainingSpec, attempt: int) -> dict[str, Any]:
    """The pod group of one attempt: an Indexed Job, one pod per node, restarted whole by the operator."""
    nodes = spec.parallelism.nodes
    volumes, mounts = _volumes(owner, spec)
    gang_labels, gang_annotations = _gang_metadata(owner, spec)
    pod_labels = {**labels(owner, "worker"), names.LABEL_ATTEMPT: str(attempt), **gang_labels}
    pod_spec = {
        "subdomain": names.training_service(owner.name),
        "serviceAccountName": names.training_service_account(owner.name),
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
                            "fsGroup": RUNTIME_UID},
        "containers": [{
            "name": "trainer", "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
            "command": ["neox-train", "--config", contract.CONFIG_FILE],
            "env": _env(owner, spec, attempt), "volumeMounts": mounts,
            "resources": pod_resources(spec.resources, spec.parallelism.gpus_per_node),
            "ports": [{"name": "rendezvous", "containerPort": contract.MASTER_PORT}],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": volumes,
        **scheduling_fields(spec),
    }
    job_labels = {names.LABEL_ATTEMPT: str(attempt)}
    if spec.scheduling.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
    template_meta: dict[str, Any] = {"labels": pod_labels}
    if gang_annotations:
        template_meta["annotations"] = gang_annotations
    return _child("batch/v1", "Job", names.training_job(owner.name, attempt), owner, "workers",
                  extra_labels=job_labels, spec={
        "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
        "backoffLimit": 0,
        "suspend": bool(spec.suspend or spec.scheduling.queue_name),
        "template": {"metadata": template_meta, "spec": pod_spec},
    })


def children(owner: Owner, spec: NeoXTrainingSpec, attempt: int | None) -> list[dict[str, Any]]:
    """Every child the training should have now; the Job only when `attempt` is given."""
    items = [service(owner), config_map(owner, spec), checkpoint_claim(owner, spec),
             service_account(owner), role(owner), role_binding(owner), pod_group(owner, spec)]
    if attempt is not None:
        items.append(job(owner, spec, attempt))
    return [item for item in items if item is not None]
