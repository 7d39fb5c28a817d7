"""kopf wiring: watch events feed coalescing work queues; workers reconcile by key.

Every event — on a NeoXTraining, one of its Jobs or Pods; on a NeoXServing or one of its
Deployments — only enqueues the resource's key (each kind has its own queue), and the
same reconcile runs for all of them and for the periodic resync, so what
happens depends on the current state alone. Per key, at most one reconcile runs at a
time (a key that changes meanwhile is run again afterwards). kopf timers are not used
for the resync: they put a finalizer on every object (one more write, and deletion
blocked while the operator is down); an in-memory resync does not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kopf
import kubernetes

from neox_runtime.api import names

from . import kubeio, metrics, serving
from .reconcile import reconcile

log = logging.getLogger("neox_operator")
KIND = "NeoXTraining"


@dataclass
class Config:
    resync_seconds: float = 120.0
    workers: int = 8
    error_backoff_seconds: float = 5.0


CONFIG = Config()


@dataclass
class Queue:
    """controller-runtime's workqueue semantics: dedupe, one worker per key, delayed adds."""

    pending: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued: set = field(default_factory=set)
    running: set = field(default_factory=set)
    dirty: set = field(default_factory=set)
    known: set = field(default_factory=set)
    failures: dict = field(default_factory=dict)
    on_node: dict = field(default_factory=dict)  # node -> {pod uid: training key}
    node_ready: dict = field(default_factory=dict)  # node -> last Ready status seen

    def add(self, key: tuple[str, str]) -> None:
        if key in self.running:
            self.dirty.add(key)
        elif key not in self.queued:
            self.queued.add(key)
            self.pending.put_nowait(key)

    def add_after(self, key: tuple[str, str], delay: float) -> None:
        asyncio.get_running_loop().call_later(max(delay, 0.0), self.add, key)


_queue: Queue | None = None
_serving_queue: Queue | None = None
_client: kubeio.Client | None = None
_servings_of_training: dict[tuple[str, str], set[tuple[str, str]]] = {}  # servings with model.fromTraining
_tasks: list[asyncio.Task] = []


def _api_client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = max(CONFIG.workers * 2, 16)
    return kubernetes.client.ApiClient(configuration)


@kopf.on.startup(id="configure")
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _queue, _serving_queue, _client
    settings.posting.enabled = False  # our own Events, one per decision
    settings.watching.server_timeout = 600
    settings.networking.request_timeout = 60
    _queue, _serving_queue, _client = Queue(), Queue(), kubeio.Client(_api_client())
    _tasks.extend(asyncio.create_task(_worker(_queue, _client, reconcile_key, KIND)) for _ in range(CONFIG.workers))
    _tasks.extend(asyncio.create_task(_worker(_serving_queue, _client, reconcile_serving_key, serving.KIND))
                  for _ in range(max(CONFIG.workers // 4, 1)))
    _tasks.append(asyncio.create_task(_resync(_queue)))
    _tasks.append(asyncio.create_task(_resync(_serving_queue)))
    log.info("Operator started", extra={"workers": CONFIG.workers, "resync_seconds": CONFIG.resync_seconds})


@kopf.on.cleanup(id="stop-workers")
async def stop_workers(**_: Any) -> None:
    for task in _tasks:
        task.cancel()


@kopf.on.event(names.GROUP, "v1alpha1", "neoxtrainings", id="training-changed")
async def training_changed(event: kopf.RawEvent, name: str, namespace: str, **_: Any) -> None:
    key = (namespace, name)
    if event["type"] == "DELETED":
        _queue.known.discard(key)
        metrics.record_conditions(key, None)
        return
    _queue.known.add(key)
    _queue.add(key)
    for serving_key in _servings_of_training.get(key, ()):  # a new checkpoint may start a revision
        _serving_queue.add(serving_key)


@kopf.on.event("batch", "v1", "jobs", labels={names.LABEL_TRAINING: kopf.PRESENT}, id="job-changed")
async def job_changed(labels: kopf.Labels, namespace: str, **_: Any) -> None:
    _queue.add((namespace, labels[names.LABEL_TRAINING]))


@kopf.on.event("", "v1", "pods", labels={names.LABEL_TRAINING: kopf.PRESENT}, id="pod-changed")
async def pod_changed(event: kopf.RawEvent, labels: kopf.Labels, namespace: str, uid: str, spec: kopf.Spec,
                      **_: Any) -> None:
    key = (namespace, labels[names.LABEL_TRAINING])
    node = spec.get("nodeName")
    if node and event["type"] == "DELETED":
        _queue.on_node.get(node, {}).pop(uid, None)
    elif node:
        _queue.on_node.setdefault(node, {})[uid] = key
    _queue.add(key)


@kopf.on.event(names.GROUP, "v1alpha1", "neoxservings", id="serving-changed")
async def serving_changed(event: kopf.RawEvent, name: str, namespace: str, spec: kopf.Spec, **_: Any) -> None:
    key = (namespace, name)
    for servings in _servings_of_training.values():
        servings.discard(key)
    if event["type"] == "DELETED":
        _serving_queue.known.discard(key)
        return
    training = ((spec.get("model") or {}).get("fromTraining") or {}).get("name")
    if training:
        _servings_of_training.setdefault((namespace, training), set()).add(key)
    _serving_queue.known.add(key)
    _serving_queue.add(key)


@kopf.on.event("apps", "v1", "deployments", labels={names.LABEL_SERVING: kopf.PRESENT}, id="deployment-changed")
async def deployment_changed(labels: kopf.Labels, namespace: str, **_: Any) -> None:
    _serving_queue.add((namespace, labels[names.LABEL_SERVING]))


@kopf.on.event("", "v1", "nodes", id="node-changed")
async def node_changed(name: str, status: kopf.Status, **_: Any) -> None:
    """A node that stops being Ready is noticed at once, not at the next resync."""
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if _queue.node_ready.get(name) == ready:
        return
    _queue.node_ready[name] = ready
    _client.forget_nodes()
    for key in set(_queue.on_node.get(name, {}).values()):
        _queue.add(key)


async def _resync(queue: Queue) -> None:
    while True:
        await asyncio.sleep(CONFIG.resync_seconds)
        for key in list(queue.known):
            queue.add(key)


async def _worker(queue: Queue, client: kubeio.Client, reconcile_fn, kind: str) -> None:
    while True:
        key = await queue.pending.get()
        queue.queued.discard(key)
        queue.running.add(key)
        try:
            delay = await asyncio.to_thread(reconcile_fn, client, key)
            queue.failures.pop(key, None)
        except kubeio.Retry as retry:
            log.warning("Reconcile will be retried", extra={"kind": kind, "key": key, "reason": str(retry)})
            delay = retry.delay
        except Exception as error:  # noqa: BLE001 - logged, counted and retried with backoff
            failures = queue.failures[key] = queue.failures.get(key, 0) + 1
            delay = min(CONFIG.error_backoff_seconds * 2 ** (failures - 1), 300)
            metrics.ERRORS.labels(kind=kind, error=type(error).__name__).inc()
            log.exception("Reconcile failed", extra={"kind": kind, "key": key, "retry_in": delay})
        finally:
            queue.running.discard(key)
        if key in queue.dirty:
            queue.dirty.discard(key)
            queue.add(key)
        elif delay is not None:
            queue.add_after(key, delay)


def reconcile_key(client: kubeio.Client, key: tuple[str, str]) -> float | None:
    """Read → decide (pure) → write the difference; returns when to look again."""
    namespace, name = key
    started = time.monotonic()
    metrics.RECONCILES.labels(kind=KIND).inc()
    try:
        observed = kubeio.observe(client, namespace, name, datetime.now(timezone.utc))
        if observed is None:
            return None
        decision = reconcile(observed)
        writes = kubeio.apply(client, observed, decision)
    finally:
        metrics.DURATION.labels(kind=KIND).observe(time.monotonic() - started)
    metrics.record_conditions(key, decision.status.get("conditions"))
    if decision.restarted:
        metrics.RESTARTS.inc()
    if writes:
        log.info("Reconciled NeoXTraining", extra={
            "namespace": namespace, "training": name, "writes": writes, "phase": decision.status.get("phase"),
            "actions": [str(a) for a in decision.actions], "requeue_after": decision.requeue_after})
    return decision.requeue_after


def reconcile_serving_key(client: kubeio.Client, key: tuple[str, str]) -> float | None:
    namespace, name = key
    started = time.monotonic()
    metrics.RECONCILES.labels(kind=serving.KIND).inc()
    try:
        observed = kubeio.observe_serving(client, namespace, name, datetime.now(timezone.utc))
        if observed is None:
            return None
        decision = serving.reconcile(observed)
        writes = kubeio.apply(client, observed, decision)
    finally:
        metrics.DURATION.labels(kind=serving.KIND).observe(time.monotonic() - started)
    if writes:
        log.info("Reconciled NeoXServing", extra={
            "namespace": namespace, "serving": name, "writes": writes, "phase": decision.status.get("phase"),
            "actions": [str(a) for a in decision.actions]})
    return decision.requeue_after
