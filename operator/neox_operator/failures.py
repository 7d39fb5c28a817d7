"""What ends an attempt early: a failed pod, a preempted pod, a pod on a lost node, a hang (pure).

Any of these restarts the whole group, because one missing rank stalls every other
rank's collectives. The first failure (by time, then completion index) is the one
named in status, so the message points at the cause rather than at the collateral.

A preemption is not a failure of the training: a pod that exited with
`contract.EXIT_PREEMPTED` (its ranks saved a checkpoint on SIGTERM and stopped), or one
Kubernetes marked with the `DisruptionTarget` condition (scheduler preemption, eviction,
node drain), restarts the group without counting against `maxRestarts` — the same split a
Job's podFailurePolicy makes with `Ignore` for those pods. When any pod of the attempt
failed for another reason, that failure is the one reported, and it counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from neox_runtime.api import contract

from .conditions import find, parse_time
from .render import COMPLETION_INDEX_ANNOTATION


@dataclass(frozen=True)
class Failure:
    # CamelCase: PodFailed, Preempted, NodeLost, PodDisrupted, ProgressTimeout, JobFailed, FinalStepNotReported
    reason: str
    message: str
    index: int | None = None
    pod: str | None = None
    exit_code: int | None = None
    counted: bool = True  # counts against spec.failurePolicy.maxRestarts; a preemption does not


def job_condition(job: dict[str, Any], type_: str) -> str | None:
    found = find((job.get("status") or {}).get("conditions"), type_)
    return found.get("status") if found else None


def _index(pod: dict[str, Any]) -> int:
    return int((pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "-1"))


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return terminated
    return {}


def _pod_failure(pod: dict[str, Any], node_ready: dict[str, bool]) -> Failure | None:
    name, index = pod["metadata"]["name"], _index(pod)
    status = pod.get("status") or {}
    where = f"index {index} (pod {name})"
    disrupted = find(status.get("conditions"), "DisruptionTarget")
    disrupted = disrupted if disrupted and disrupted.get("status") == "True" else None
    if status.get("phase") == "Failed":
        code = _terminated(pod).get("exitCode")
        if disrupted is not None:  # evicted or preempted by Kubernetes, whatever it exited with
            return Failure("PodDisrupted", f"{where} was disrupted ({disrupted.get('reason', '')}: "
                           f"{disrupted.get('message', '')}) and exited with code {code}", index, name, code,
                           counted=False)
        if code == contract.EXIT_PREEMPTED:
            return Failure("Preempted", f"{where} stopped before its final step on SIGTERM and saved a checkpoint "
                           f"(exit code {code})", index, name, code, counted=False)
        reason = status.get("reason") or _terminated(pod).get("reason") or "Error"
        return Failure("PodFailed", f"{where} failed with exit code {code} ({reason})", index, name, code)
    node = (pod.get("spec") or {}).get("nodeName")
    if node and status.get("phase") in ("Running", "Pending") and node_ready.get(node) is False:
        return Failure("NodeLost", f"{where} is on node {node}, which is not Ready", index, name)
    if disrupted is not None:
        return Failure("PodDisrupted", f"{where} was disrupted: {disrupted.get('message', '')}", index, name,
                       counted=False)
    return None


def _sort_key(pair: tuple[dict[str, Any], Failure]) -> tuple[str, int]:
    pod, failure = pair
    return _terminated(pod).get("finishedAt") or "~", failure.index if failure.index is not None else 1 << 30


def detect_failure(job: dict[str, Any], pods: list[dict[str, Any]], node_ready: dict[str, bool],
                   status: dict[str, Any], spec: Any, now: datetime) -> Failure | None:
    found = [(pod, f) for pod in pods if (f := _pod_failure(pod, node_ready)) is not None]
    failures = [f for _, f in sorted(found, key=_sort_key)]
    if failures:
        return next((f for f in failures if f.counted), failures[0])
    if job_condition(job, "Failed") == "True":
        cond = find(job["status"]["conditions"], "Failed") or {}
        return Failure("JobFailed", f"Job {job['metadata']['name']} failed: {cond.get('reason')}: "
                       f"{cond.get('message', '')}")
    return _hang(job, pods, status, spec, now)


def _hang(job: dict[str, Any], pods: list[dict[str, Any]], status: dict[str, Any], spec: Any,
          now: datetime) -> Failure | None:
    timeout = spec.failure_policy.progress_timeout_seconds
    if not timeout or spec.suspend or workers_ready(pods) < spec.parallelism.nodes:
        return None
    running = find(status.get("conditions"), "Running")
    candidates = [parse_time(((status.get("progress") or {}).get("updatedAt"))),
                  parse_time(job["metadata"].get("creationTimestamp")),
                  parse_time(running.get("lastTransitionTime")) if running and running.get("status") == "True" else None]
    last = max(c for c in candidates if c is not None)
    silent = (now - last).total_seconds()
    if silent < timeout:
        return None
    return Failure("ProgressTimeout", f"No progress reported for {silent:.0f}s "
                   f"(failurePolicy.progressTimeoutSeconds {timeout}); treating the group as hung")


def workers_ready(pods: list[dict[str, Any]]) -> int:
    def ready(pod: dict[str, Any]) -> bool:
        status = pod.get("status") or {}
        cond = find(status.get("conditions"), "Ready")
        return (status.get("phase") == "Running" and bool(cond) and cond.get("status") == "True"
                and not pod["metadata"].get("deletionTimestamp"))
    return sum(ready(p) for p in pods)
