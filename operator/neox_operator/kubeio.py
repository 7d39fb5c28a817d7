"""Reads the observed state of a NeoXTraining and writes only the difference.

One small REST layer over the Kubernetes client: every request goes through
`Client.request`, which is where writes are counted (`neox_operator_api_writes_total`),
so "a reconcile with nothing to change makes zero writes" is measured, not assumed.
Creates are idempotent (409 means someone — maybe our previous, killed self — already
did it), deletes use Background propagation, status is a merge patch of the
operator's own keys only, so the runtime's progress fields are never clobbered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from neox_runtime.api import names

from . import metrics, serving
from .diff import Action, status_patch
from .reconcile import Decision, Observed

log = logging.getLogger("neox_operator")
FIELD_MANAGER = names.MANAGER
RESOURCES: dict[str, tuple[str, str]] = {
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "PodGroup": ("/apis/scheduling.x-k8s.io/v1alpha1", "podgroups"),
    "NeoXTraining": (f"/apis/{names.GROUP}/v1alpha1", "neoxtrainings"),
    "NeoXServing": (f"/apis/{names.GROUP}/v1alpha1", "neoxservings"),
}
NODE_CACHE_SECONDS = 3.0


class Retry(Exception):
    """A dependency is missing or a write conflicted: reconcile again after `delay` seconds."""

    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


class Client:
    """Raw JSON in and out; counts every request by verb and resource."""

    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api = api_client
        self._nodes: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._nodes_lock = threading.Lock()
        self._apis: dict[str, tuple[float, set[str]]] = {}

    def request(self, method: str, path: str, query: list[tuple[str, str]] | None = None,
                body: Any = None, content_type: str = "application/json") -> dict[str, Any] | None:
        resource = path.rstrip("/").split("/")[-1] if method == "GET" else _resource_of(path)
        metrics.API_REQUESTS.labels(verb=method, resource=resource).inc()
        if method != "GET":
            metrics.API_WRITES.labels(verb=method, resource=resource).inc()
        method_, url, headers, payload, _ = self.api.param_serialize(
            method, path, query_params=query or [], body=body,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"])
        response = self.api.call_api(method_, url, header_params=headers, body=payload)
        response.read()
        if response.status >= 400:
            if response.status == 404 and method in ("GET", "DELETE"):
                return None
            error = ApiException(status=response.status, reason=response.reason)
            error.body = response.data
            raise error
        return json.loads(response.data) if response.data else None

    # ------------------------------------------------------------------ reads
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.request("GET", _path(kind, namespace, name))
        if obj is not None:
            obj.setdefault("kind", kind)
        return obj

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = self.request("GET", _path(kind, namespace), query=[("labelSelector", selector)]) or {}
        items = result.get("items", [])
        for item in items:
            item.setdefault("kind", kind)
        return items

    def nodes(self) -> list[dict[str, Any]]:
        with self._nodes_lock:
            fetched, items = self._nodes
            if time.monotonic() - fetched > NODE_CACHE_SECONDS:
                items = (self.request("GET", "/api/v1/nodes") or {}).get("items", [])
                self._nodes = (time.monotonic(), items)
            return items

    def forget_nodes(self) -> None:
        with self._nodes_lock:
            self._nodes = (0.0, [])

    def serves(self, api: str) -> bool:
        """Whether `group/version/plural` is served (discovery, cached like nodes)."""
        group_version, plural = api.rsplit("/", 1)
        with self._nodes_lock:
            fetched, served = self._apis.get(group_version, (0.0, set()))
            if time.monotonic() - fetched > 30:
                found = self.request("GET", f"/apis/{group_version}") or {}
                served = {r["name"] for r in found.get("resources", [])}
                self._apis[group_version] = (time.monotonic(), served)
        return plural in served

    # ----------------------------------------------------------------- writes
    def write(self, namespace: str, action: Action) -> None:
        path = _path(action.kind, namespace)
        try:
            if action.verb == "create":
                self.request("POST", path, [("fieldManager", FIELD_MANAGER)], action.body)
            elif action.verb == "replace":
                self.request("PUT", f"{path}/{action.name}", [("fieldManager", FIELD_MANAGER)], action.body)
            elif action.verb == "patch":
                self.request("PATCH", f"{path}/{action.name}", [("fieldManager", FIELD_MANAGER)],
                             action.body, "application/merge-patch+json")
            else:
                self.request("DELETE", f"{path}/{action.name}", body={"propagationPolicy": "Background"})
        except ApiException as error:
            if error.status == 409 and action.verb == "create":
                return  # already there: deterministic names make creates idempotent
            if error.status == 404 and action.verb == "create":
                raise Retry(f"Cannot create {action}: its API is not installed ({error.reason})", 30) from error
            if error.status == 409:
                raise Retry(f"Conflict on {action}", 1) from error
            raise

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], kind: str = "NeoXTraining") -> None:
        self.request("PATCH", f"{_path(kind, namespace)}/{name}/status",
                     [("fieldManager", FIELD_MANAGER)], {"status": patch}, "application/merge-patch+json")

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str, now: datetime) -> None:
        meta = body["metadata"]
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.request("POST", _path("Event", meta["namespace"]), body={
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024], "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": names.MANAGER}, "reportingComponent": names.MANAGER,
        })


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _resource_of(path: str) -> str:
    parts = path.split("/")
    if parts[-1] == "status":
        return f"{parts[-3]}/status"
    return next((p for p in reversed(parts) if p in {r for _, r in RESOURCES.values()}), parts[-1])


def _fixed_children(name: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    account = names.training_service_account(name)
    kinds = [("Service", names.training_service(name)), ("ConfigMap", names.training_config(name)),
             ("ServiceAccount", account), ("Role", account), ("RoleBinding", account)]
    if not (spec.get("checkpoint") or {}).get("existingClaim"):
        kinds.append(("PersistentVolumeClaim", names.training_checkpoints(name)))
    gang = (spec.get("scheduling") or {}).get("gang")
    if gang is not None and gang.get("provider", "coscheduling") == "coscheduling":
        kinds.append(("PodGroup", name))
    return kinds


def observe(client: Client, namespace: str, name: str, now: datetime) -> Observed | None:
    body = client.get("NeoXTraining", namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    spec = body.get("spec") or {}
    children = {}
    for kind, child in _fixed_children(name, spec):
        obj = _get_optional(client, kind, namespace, child)
        if obj is not None:
            children[(kind, child)] = obj
    existing = (spec.get("checkpoint") or {}).get("existingClaim")
    claim_found = existing is None or client.get("PersistentVolumeClaim", namespace, existing) is not None
    selector = f"{names.LABEL_TRAINING}={name}"
    jobs = client.list("Job", namespace, selector)
    pods = client.list("Pod", namespace, selector) if jobs else []
    nodes = client.nodes()
    missing = tuple(api for api in _needed_apis(spec) if not client.serves(api))
    return Observed(body=body, children=children, jobs=jobs, pods=pods,
                    node_ready={n["metadata"]["name"]: _ready(n) for n in nodes},
                    node_labels=[n["metadata"].get("labels") or {} for n in nodes],
                    now=now, claim_found=claim_found, missing_apis=missing)


def _needed_apis(spec: dict[str, Any]) -> list[str]:
    gang = (spec.get("scheduling") or {}).get("gang")
    if gang is not None and gang.get("provider", "coscheduling") == "coscheduling":
        return ["scheduling.x-k8s.io/v1alpha1/podgroups"]
    return []


def _get_optional(client: Client, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return client.get(kind, namespace, name)
    except ApiException as error:
        if kind == "PodGroup" and error.status in (403, 404):
            return None
        raise


def _ready(node: dict[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def observe_serving(client: Client, namespace: str, name: str, now: datetime) -> serving.Observed | None:
    body = client.get("NeoXServing", namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    children = {}
    for kind, child in (("Service", names.serving_service(name)), ("ConfigMap", serving.safety_config_name(name)),
                        ("HorizontalPodAutoscaler", names.serving_autoscaler(name))):
        obj = client.get(kind, namespace, child)
        if obj is not None:
            children[(kind, child)] = obj
    deployments = client.list("Deployment", namespace, f"{names.LABEL_SERVING}={name}")
    source = ((body.get("spec") or {}).get("model") or {}).get("fromTraining") or {}
    training = client.get("NeoXTraining", namespace, source["name"]) if source.get("name") else None
    return serving.Observed(body=body, children=children, deployments=deployments, now=now, training=training)


def apply(client: Client, observed: Observed | serving.Observed, decision: Decision) -> int:
    """Perform the decision's writes; returns how many were made."""
    meta = observed.body["metadata"]
    namespace, name, kind = meta["namespace"], meta["name"], observed.body.get("kind", "NeoXTraining")
    patch = status_patch(decision.status, observed.body.get("status") or {})
    writes = 0
    if patch and decision.status_first:
        client.patch_status(namespace, name, patch, kind)
        writes += 1
    for action in decision.actions:
        client.write(namespace, action)
        writes += 1
    if patch and not decision.status_first:
        client.patch_status(namespace, name, patch, kind)
        writes += 1
    for type_, reason, message in decision.events:
        try:  # Events are a record, not state: losing one must not fail the reconcile
            client.event(observed.body, type_, reason, message, observed.now)
            writes += 1
        except ApiException as error:
            log.warning("Event not recorded", extra={"namespace": namespace, "training": name,
                                                     "reason": reason, "status": error.status})
    return writes
