"""Prometheus metrics of the operator: how often it reconciles, fails, writes, restarts.

`trainings` is kept incrementally from each reconcile's conditions, so a scrape costs
nothing and the numbers agree with what `kubectl get nxt` shows.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("neox_operator_reconciles_total", "Reconciles run", ["kind"])
ERRORS = Counter("neox_operator_reconcile_errors_total", "Reconciles that raised", ["kind", "error"])
DURATION = Histogram("neox_operator_reconcile_duration_seconds", "Reconcile wall time", ["kind"],
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
API_REQUESTS = Counter("neox_operator_api_requests_total", "Requests to the API server", ["verb", "resource"])
API_WRITES = Counter("neox_operator_api_writes_total", "Write requests to the API server", ["verb", "resource"])
RESTARTS = Counter("neox_operator_training_restarts_total", "Pod-group restarts decided")
TRAININGS = Gauge("neox_operator_trainings", "NeoXTrainings by condition status", ["condition", "status"])

_lock = threading.Lock()
_last: dict[tuple[str, str], dict[str, str]] = {}


def record_conditions(key: tuple[str, str], conditions: list[dict] | None) -> None:
    """Move `key` from its previous condition statuses to the new ones (None: forget it)."""
    new = {c["type"]: c["status"] for c in conditions or []}
    with _lock:
        old = _last.pop(key, {})
        if conditions is not None:
            _last[key] = new
        for type_, status in old.items():
            TRAININGS.labels(condition=type_, status=status).dec()
        for type_, status in (new if conditions is not None else {}).items():
            TRAININGS.labels(condition=type_, status=status).inc()


def serve(port: int) -> None:
    if port:
        start_http_server(port)
