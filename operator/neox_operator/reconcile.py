"""The NeoXTraining reconciler as a pure function: observed state in, decision out.

It is driven by what exists now, never by which event fired, so a restarted operator
continues where the killed one stopped. The restart counter in status is the durable
attempt number: a restart is written to status before the old Job is deleted, and the
next Job's name (`<name>-a<attempt>`) is deterministic, so no step can run twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from neox_runtime.api import names
from neox_runtime.api.manifests import spec_errors
from neox_runtime.api.resolved import deepspeed_config
from neox_runtime.api.training import MAX_NAME_LENGTH, NeoXTrainingSpec

from . import planner, render
from .conditions import FALSE, TRUE, UNKNOWN, Cond, find, is_true, merge, parse_time, rfc3339
from .diff import Action, child_actions
from .failures import Failure, detect_failure, job_condition, workers_ready

CONDITION_TYPES = ("Feasible", "Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Ready")
# How long a Job that completed without the runtime's final-step report waits for it: the
# report is written before the ranks exit, but this reconcile may have read the training
# just before it landed.
FINAL_REPORT_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Observed:
    body: dict[str, Any]  # the NeoXTraining
    children: dict[tuple[str, str], dict[str, Any]]  # fixed-name children found, by (kind, name)
    jobs: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    node_ready: dict[str, bool]
    node_labels: list[dict[str, str]]
    now: datetime
    claim_found: bool = True  # spec.checkpoint.existingClaim exists (True when not used)
    missing_apis: tuple[str, ...] = ()  # APIs the spec needs that the cluster does not serve


@dataclass
class Decision:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # operator-owned status keys
    status_first: bool = False  # write status before the actions (a restart is recorded first)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None
    restarted: bool = False


def attempt_of(job: dict[str, Any]) -> int:
    return int(job["metadata"].get("labels", {}).get(names.LABEL_ATTEMPT, "0"))


def backoff(spec: NeoXTrainingSpec, restarts: int) -> float:
    policy = spec.failure_policy
    return float(min(policy.backoff_seconds * 2 ** max(restarts - 1, 0), policy.max_backoff_seconds))


def restart_backoff(spec: NeoXTrainingSpec, restarts: int, preemptions: int) -> float:
    """The wait before the next attempt: it doubles with the failures, not with the preemptions."""
    return backoff(spec, max(1, restarts - preemptions))


def final_step_reported(status: dict[str, Any], spec: NeoXTrainingSpec) -> bool:
    """The runtime reported the last step of spec.training.steps (its `done` report carries it)."""
    return ((status.get("progress") or {}).get("step") or 0) >= spec.training.steps


class _Builder:
    """Collects conditions and status for one reconcile."""

    def __init__(self, obs: Observed):
        self.obs = obs
        self.meta = obs.body["metadata"]
        self.old = obs.body.get("status") or {}
        self.conds: dict[str, Cond] = {}
        self.decision = Decision()
        self.status: dict[str, Any] = {}

    def cond(self, type_: str, status: str, reason: str, message: str = "") -> None:
        self.conds[type_] = Cond(type_, status, reason, message)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.decision.events.append((type_, reason, message))

    def flips(self, type_: str, status: str) -> bool:
        previous = find(self.old.get("conditions"), type_)
        return previous is None or previous.get("status") != status

    def finish(self, phase: str) -> Decision:
        written = [str(a) for a in self.decision.actions
                   if a.verb in ("create", "replace") or (a.verb == "patch" and a.kind != "Job")]
        if written:  # one Event for the children written by this reconcile
            self.event("Normal", "ChildrenApplied", ", ".join(written))
        for type_ in CONDITION_TYPES:
            self.conds.setdefault(type_, Cond(type_, UNKNOWN, "NotEvaluated"))
        ordered = [self.conds[t] for t in CONDITION_TYPES]
        generation = self.meta.get("generation")
        self.status.update(observedGeneration=generation, phase=phase,
                           conditions=merge(self.old.get("conditions"), ordered, self.obs.now, generation))
        self.decision.status = {k: v for k, v in self.status.items() if v is not None}
        return self.decision


def reconcile(obs: Observed) -> Decision:
    b = _Builder(obs)
    # A name the CRD refuses can still be stored (created before the CRD had the rule): its
    # children's names would be refused, so it is marked instead of failing on every create.
    name_problems = names.name_problems(b.meta["name"], MAX_NAME_LENGTH)
    if name_problems:
        return _refused(b, "InvalidName", "; ".join(name_problems))
    try:
        spec = NeoXTrainingSpec.model_validate(obs.body["spec"])
    except ValidationError as error:
        return _refused(b, "InvalidSpec", spec_errors(error)[:1000])
    b.status.update(restarts=b.old.get("restarts", 0), startTime=b.old.get("startTime"),
                    completionTime=b.old.get("completionTime"), workersTotal=spec.parallelism.nodes)
    owner = render.Owner(b.meta["name"], b.meta["namespace"], b.meta["uid"])
    if is_true(b.old.get("conditions"), "Succeeded") or is_true(b.old.get("conditions"), "Failed"):
        return _finished(b, spec, owner)
    if not _feasible(b, spec):
        return b.finish("Infeasible")
    return _active(b, spec, owner)


def _refused(b: _Builder, reason: str, message: str) -> Decision:
    """A resource the operator cannot act on (InvalidSpec, InvalidName): conditions say why, no children."""
    if b.flips("Feasible", FALSE) or find(b.old.get("conditions"), "Feasible").get("reason") != reason:
        b.event("Warning", reason, message)
    b.cond("Feasible", FALSE, reason, message)
    b.cond("Ready", FALSE, reason, message)
    return b.finish("Invalid")


def _feasible(b: _Builder, spec: NeoXTrainingSpec) -> bool:
    """Planner first: a training that cannot fit its GPUs or its pods' memory gets no children."""
    on_gpu = spec.parallelism.gpus_per_node > 0
    memory = planner.gpu_memory_bytes(spec, b.obs.node_labels) if on_gpu else None
    est = planner.estimate(spec, memory, deepspeed_config(spec))
    b.status["estimate"] = est.summary()
    if est.fits is False:
        return _infeasible(b, "InsufficientGPUMemory", f"Does not fit: estimated {est.summary()}")
    host = est.host
    if host.fits is False:
        return _infeasible(b, "InsufficientHostMemory", (
            f"Does not fit in the pod's memory: {host.ranks_per_node} ranks × {host.per_rank / planner.GIB:.1f} GiB "
            f"= {host.per_pod / planner.GIB:.1f} GiB per pod, more than spec.resources.memory "
            f"{spec.resources.memory} ({host.pod_memory / planner.GIB:.1f} GiB); per rank: process "
            f"{host.process / planner.GIB:.1f}, start-up {host.start_up / planner.GIB:.1f}, checkpoint staging "
            f"{host.checkpoint_staging / planner.GIB:.1f}, model on host {host.model_states / planner.GIB:.1f} GiB"))
    if not on_gpu:
        b.cond("Feasible", TRUE, "RunsOnCPU", f"No GPUs requested; estimated {host.summary()}")
    elif est.fits is None:
        b.cond("Feasible", UNKNOWN, "GPUMemoryUnknown",
               f"Estimated {est.summary()}; set spec.resources.gpuMemoryGiB or label nodes nvidia.com/gpu.memory")
    else:
        b.cond("Feasible", TRUE, "FitsInGPUMemory", f"Estimated {est.summary()}")
    return True


def _infeasible(b: _Builder, reason: str, message: str) -> bool:
    if b.flips("Feasible", FALSE) or find(b.old.get("conditions"), "Feasible").get("reason") != reason:
        b.event("Warning", "Infeasible", message)
    b.cond("Feasible", FALSE, reason, message)
    b.cond("Created", FALSE, "Infeasible", "No children are created for a training that does not fit")
    b.cond("Ready", FALSE, "Infeasible", message)
    return False


def _finished(b: _Builder, spec: NeoXTrainingSpec, owner: render.Owner) -> Decision:
    """Succeeded or Failed: keep the conditions; after the TTL remove the children (claim kept unless Delete)."""
    for type_ in CONDITION_TYPES:
        previous = find(b.old.get("conditions"), type_)
        if previous:
            b.cond(type_, previous["status"], previous.get("reason", ""), previous.get("message", ""))
    phase = "Succeeded" if is_true(b.old.get("conditions"), "Succeeded") else "Failed"
    ttl, done = spec.ttl_seconds_after_finished, parse_time(b.old.get("completionTime"))
    for job in b.obs.jobs:
        if not job["metadata"].get("deletionTimestamp") and job_condition(job, "Complete") is None:
            b.decision.actions.append(Action("delete", "Job", job["metadata"]["name"]))
    if ttl is None or done is None:
        return b.finish(phase)
    remaining = (done - b.obs.now).total_seconds() + ttl
    if remaining > 0:
        b.decision.requeue_after = remaining
        return b.finish(phase)
    doomed = [o for o in list(b.obs.children.values()) + b.obs.jobs
              if not o["metadata"].get("deletionTimestamp")
              and (o["kind"] != "PersistentVolumeClaim" or spec.checkpoint.retain_policy == "Delete")]
    b.decision.actions = [Action("delete", o["kind"], o["metadata"]["name"]) for o in doomed]
    if doomed:
        b.event("Normal", "TTLExpired", f"Deleted {len(doomed)} children {ttl}s after the training finished")
    return b.finish(phase)


def _active(b: _Builder, spec: NeoXTrainingSpec, owner: render.Owner) -> Decision:
    obs, restarts = b.obs, b.status["restarts"]
    attempt = max([restarts] + [attempt_of(j) for j in obs.jobs])
    b.status["restarts"] = attempt
    desired = render.children(owner, spec, attempt=None)
    applied = child_actions(desired, obs.children)
    b.decision.actions.extend(applied)
    for job in obs.jobs:
        if attempt_of(job) < attempt and not job["metadata"].get("deletionTimestamp"):
            b.decision.actions.append(Action("delete", "Job", job["metadata"]["name"]))
    if obs.missing_apis:
        message = f"The cluster does not serve {', '.join(obs.missing_apis)}, needed by spec.scheduling.gang"
        if b.flips("Created", FALSE):
            b.event("Warning", "DependencyMissing", message)
        b.decision.actions = [a for a in b.decision.actions if a.kind != "PodGroup"]
        b.cond("Created", FALSE, "DependencyMissing", message)
        b.decision.requeue_after = 30
        return _waiting(b, spec, "Pending")
    if not obs.claim_found:
        b.cond("Created", FALSE, "ClaimNotFound", f"PersistentVolumeClaim {spec.checkpoint.existing_claim} not found")
        b.decision.requeue_after = 10
        return _waiting(b, spec, "Pending")
    job = next((j for j in obs.jobs if attempt_of(j) == attempt and not j["metadata"].get("deletionTimestamp")), None)
    if job is None:
        return _start_job(b, spec, owner, attempt)
    b.cond("Created", TRUE, "ChildrenCreated", f"Job {job['metadata']['name']} is attempt {attempt}")
    b.cond("Restarting", FALSE, "Restarted" if attempt else "NotRestarting", "")
    pods = [p for p in obs.pods if p["metadata"].get("labels", {}).get(names.LABEL_ATTEMPT) == str(attempt)]
    if job_condition(job, "Complete") == TRUE or job_condition(job, "SuccessCriteriaMet") == TRUE:
        return _succeeded(b, spec) if final_step_reported(b.old, spec) else _completed_early(b, spec, job)
    suspended = bool((job.get("spec") or {}).get("suspend"))
    failure = None if spec.suspend else detect_failure(job, pods, obs.node_ready, b.old, spec, obs.now)
    if failure is not None:
        return _failed_attempt(b, spec, job, failure)
    _sync_job(b, spec, job, suspended)
    return _running_status(b, spec, job, pods)


def _start_job(b: _Builder, spec: NeoXTrainingSpec, owner: render.Owner, attempt: int) -> Decision:
    restarting = find(b.old.get("conditions"), "Restarting")
    if restarting and restarting.get("status") == TRUE:
        since = parse_time(restarting.get("lastTransitionTime")) or b.obs.now
        wait = (since - b.obs.now).total_seconds() + restart_backoff(spec, attempt, b.old.get("preemptions", 0))
        if wait > 0:
            b.decision.requeue_after = wait
            b.cond("Restarting", TRUE, restarting.get("reason", "Restarting"), restarting.get("message", ""))
            b.cond("Created", TRUE, "WaitingForBackoff", f"Next attempt {attempt} in {wait:.0f}s")
            return _waiting(b, spec, "Restarting")
    manifest = render.job(owner, spec, attempt)
    b.decision.actions.append(Action("create", "Job", manifest["metadata"]["name"], manifest))
    b.status["startTime"] = b.status.get("startTime") or rfc3339(b.obs.now)
    b.cond("Created", TRUE, "ChildrenCreated", f"Job {manifest['metadata']['name']} is attempt {attempt}")
    b.cond("Restarting", FALSE, "Restarted" if attempt else "NotRestarting", "")
    # The status a Job without ready pods will have, so observing the new Job writes nothing.
    return _running_status(b, spec, manifest, [])


def _waiting(b: _Builder, spec: NeoXTrainingSpec, phase: str) -> Decision:
    b.status.update(workersReady=0, workers=f"0/{spec.parallelism.nodes}")
    b.cond("Running", FALSE, phase, "No pod group is running")
    b.cond("Suspended", TRUE if spec.suspend else FALSE, "Suspended" if spec.suspend else "NotSuspended")
    b.cond("Succeeded", FALSE, "NotFinished")
    b.cond("Failed", FALSE, "NotFinished")
    b.cond("Ready", FALSE, phase, "Waiting for the pod group")
    return b.finish("Suspended" if spec.suspend and phase == "Pending" else phase)


def _succeeded(b: _Builder, spec: NeoXTrainingSpec) -> Decision:
    b.status.update(completionTime=rfc3339(b.obs.now), workersReady=0,
                    workers=f"0/{b.status['workersTotal']}")
    message = f"All workers completed; the runtime reported the final step {spec.training.steps}"
    b.event("Normal", "Succeeded", message)
    for type_, status, reason in (("Running", FALSE, "Succeeded"), ("Suspended", FALSE, "NotSuspended"),
                                  ("Succeeded", TRUE, "FinalStepReached"), ("Failed", FALSE, "Succeeded"),
                                  ("Ready", TRUE, "Succeeded")):
        b.cond(type_, status, reason, message if status == TRUE else "")
    return b.finish("Succeeded")


def _completed_early(b: _Builder, spec: NeoXTrainingSpec, job: dict[str, Any]) -> Decision:
    """The Job completed, but the runtime never reported the final step: not a success.

    After a short grace (the report may be in flight), the attempt counts as failed and
    the group restarts from the latest checkpoint, which reports the final step at once
    if only the report was lost; if it keeps happening, maxRestarts ends it as Failed
    with reason FinalStepNotReported.
    """
    step = (b.old.get("progress") or {}).get("step")
    name = job["metadata"]["name"]
    completed = parse_time((job.get("status") or {}).get("completionTime")) or b.obs.now
    waited = (b.obs.now - completed).total_seconds()
    message = (f"Job {name} completed, but the runtime reported step {step if step is not None else 'none'} "
               f"of {spec.training.steps}, not the final step")
    if waited >= FINAL_REPORT_GRACE_SECONDS:
        return _failed_attempt(b, spec, job, Failure("FinalStepNotReported", message))
    b.decision.requeue_after = FINAL_REPORT_GRACE_SECONDS - waited
    b.status.update(workersReady=0, workers=f"0/{spec.parallelism.nodes}")
    message += f"; waiting up to {FINAL_REPORT_GRACE_SECONDS:.0f}s for the report before restarting"
    for type_, reason in (("Running", "FinalStepNotReported"), ("Suspended", "NotSuspended"),
                          ("Succeeded", "FinalStepNotReported"), ("Failed", "NotFinished"),
                          ("Ready", "FinalStepNotReported")):
        b.cond(type_, FALSE, reason, message if reason == "FinalStepNotReported" else "")
    return b.finish("Completing")


def _failed_attempt(b: _Builder, spec: NeoXTrainingSpec, job: dict[str, Any], failure: Failure) -> Decision:
    """Replace the attempt's Job with the next one, or end as Failed once maxRestarts failures are spent.

    `restarts` counts every restart (it is the durable attempt number), `preemptions` those
    that a preemption caused, which maxRestarts does not count.
    """
    restarts, preemptions = b.status["restarts"], b.old.get("preemptions", 0)
    failures, max_restarts = restarts - preemptions, spec.failure_policy.max_restarts
    b.decision.actions.append(Action("delete", "Job", job["metadata"]["name"]))
    b.decision.status_first = True
    if failure.counted and failures >= max_restarts:
        message = f"{failure.message}; gave up after {failures} restarts (maxRestarts {max_restarts})" + (
            f" and {preemptions} preemptions" if preemptions else "")
        b.status.update(completionTime=rfc3339(b.obs.now), workersReady=0, workers=f"0/{spec.parallelism.nodes}")
        b.event("Warning", "Failed", message)
        for type_, status in (("Running", FALSE), ("Restarting", FALSE), ("Suspended", FALSE),
                              ("Succeeded", FALSE), ("Failed", TRUE), ("Ready", FALSE)):
            b.cond(type_, status, failure.reason, message if status == TRUE or type_ == "Ready" else "")
        return b.finish("Failed")
    if not failure.counted:
        b.status["preemptions"] = preemptions = preemptions + 1
    wait = restart_backoff(spec, restarts + 1, preemptions)
    counted = (f"restart {failures + 1} of at most {max_restarts}" if failure.counted else
               f"a preemption, not counted against maxRestarts {max_restarts}")
    message = f"{failure.message}; restarting the group from the latest checkpoint ({counted}) in {wait:.0f}s"
    b.status["restarts"] = restarts + 1
    b.decision.restarted = True
    b.decision.requeue_after = wait
    b.event("Warning", "Restarting", message)
    b.cond("Restarting", TRUE, failure.reason, message)
    b.cond("Created", TRUE, "WaitingForBackoff", f"Next attempt {restarts + 1} in {wait:.0f}s")
    return _waiting(b, spec, "Restarting")


def _sync_job(b: _Builder, spec: NeoXTrainingSpec, job: dict[str, Any], suspended: bool) -> None:
    """Suspend/resume, and placement changes Kubernetes accepts on a suspended Job."""
    name = job["metadata"]["name"]
    want = spec.suspend or (bool(spec.scheduling.queue_name) and suspended)
    if want != suspended:
        b.decision.actions.append(Action("patch", "Job", name, {"spec": {"suspend": want}}))
        b.event("Normal", "Suspended" if want else "Resumed",
                f"{'Suspended' if want else 'Resumed'} Job {name}" + ("" if want else " from the latest checkpoint"))
    if suspended and want:
        desired = render.scheduling_fields(spec)
        current = job["spec"]["template"]["spec"]
        mutable = ("nodeSelector", "tolerations", "affinity")
        change = {k: desired.get(k) for k in mutable if desired.get(k) != current.get(k)}
        if change:
            b.decision.actions.append(Action("patch", "Job", name, {"spec": {"template": {"spec": change}}}))
            b.event("Normal", "SchedulingUpdated", f"Updated placement of suspended Job {name}: {sorted(change)}")


def _running_status(b: _Builder, spec: NeoXTrainingSpec, job: dict[str, Any], pods: list[dict[str, Any]]) -> Decision:
    nodes = spec.parallelism.nodes
    ready = workers_ready(pods)
    b.status.update(workersReady=ready, workers=f"{ready}/{nodes}")
    running = ready == nodes and not spec.suspend
    b.cond("Running", TRUE if running else FALSE, "AllWorkersRunning" if running else
           ("Suspended" if spec.suspend else "WaitingForWorkers"), f"{ready}/{nodes} workers ready")
    b.cond("Suspended", TRUE if spec.suspend else FALSE, "Suspended" if spec.suspend else "NotSuspended",
           "Pods were asked to checkpoint and stop" if spec.suspend else "")
    b.cond("Succeeded", FALSE, "NotFinished")
    b.cond("Failed", FALSE, "NotFinished")
    b.cond("Ready", TRUE if running else FALSE, "Running" if running else "Progressing",
           f"{ready}/{nodes} workers ready")
    if running and spec.failure_policy.progress_timeout_seconds:
        b.decision.requeue_after = float(spec.failure_policy.progress_timeout_seconds) / 4
    return b.finish("Suspended" if spec.suspend else ("Running" if running else "Pending"))
