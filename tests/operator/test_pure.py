"""The pure parts without a cluster: planner, condition semantics, reconcile decisions,
and that the operator never loads torch."""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from neox_operator import planner
from neox_operator.conditions import Cond, merge
from neox_operator.diff import status_patch
from neox_operator.reconcile import Observed, reconcile
from neox_runtime.api.training import NeoXTrainingSpec

from .helpers import training

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
GIB = 1024**3


def spec_20b(**parallelism) -> NeoXTrainingSpec:
    return NeoXTrainingSpec.model_validate({
        "model": {"preset": "neox-20b"}, "data": {"path": "/d"},
        "parallelism": {"gpusPerNode": 8, **parallelism},
        "training": {"steps": 10, "precision": "fp16", "zeroStage": 1, "microBatchSize": 4,
                     "seqLength": 2048, "activationCheckpointing": True, "gradientAccumulationSteps": 32}})


def test_20b_does_not_fit_one_node_but_fits_the_published_96_gpu_layout():
    alone = planner.estimate(spec_20b(nodes=1), 80 * GIB)
    assert alone.fits is False and alone.weights > 35 * GIB  # 20.6 B fp16 weights on every GPU
    published = planner.estimate(spec_20b(nodes=12, tensor=2, pipeline=4), 40 * GIB)
    assert published.fits is True and 15 * GIB < published.total < 40 * GIB


def test_zero_stages_and_checkpointing_shrink_the_estimate():
    def est(stage: int, ckpt: bool) -> planner.Estimate:
        spec = spec_20b(nodes=12, tensor=2, pipeline=4)
        spec = spec.model_copy(update={"training": spec.training.model_copy(
            update={"zero_stage": stage, "activation_checkpointing": ckpt})})
        return planner.estimate(spec)
    assert est(0, True).optimizer == 12 * est(1, True).optimizer  # data-parallel 12
    assert est(2, True).gradients < est(1, True).gradients and est(3, True).weights < est(2, True).weights
    assert est(1, False).activations > 3 * est(1, True).activations


def test_gpu_memory_from_node_label_respects_node_selector():
    spec = spec_20b(nodes=1)
    labels = [{"nvidia.com/gpu.memory": "40960", "pool": "a"}, {"nvidia.com/gpu.memory": "81559", "pool": "b"}]
    assert planner.gpu_memory_bytes(spec, labels) == 81559 * 1024**2
    pinned = spec.model_copy(update={"scheduling": spec.scheduling.model_copy(update={"node_selector": {"pool": "a"}})})
    assert planner.gpu_memory_bytes(pinned, labels) == 40960 * 1024**2


def test_last_transition_time_changes_only_on_a_flip():
    first = merge(None, [Cond("Running", "False", "Pending")], NOW, 1)
    same = merge(first, [Cond("Running", "False", "StillPending", "msg")], NOW + timedelta(minutes=5), 2)
    flipped = merge(same, [Cond("Running", "True", "AllWorkersRunning")], NOW + timedelta(minutes=9), 2)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] and same[0]["reason"] == "StillPending"
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T12:09:00Z"


def _body(**spec) -> dict:
    body = training("demo", **spec)
    body["metadata"].update(namespace="ml", uid="u-1", generation=1)
    return body


def _observe(body, children=(), jobs=(), pods=(), now=NOW) -> Observed:
    return Observed(body=body, children={(c["kind"], c["metadata"]["name"]): c for c in children},
                    jobs=list(jobs), pods=list(pods), node_ready={"n1": True},
                    node_labels=[{"nvidia.com/gpu.memory": "81559"}], now=now)


def _as_stored(manifests):
    stored = copy.deepcopy(manifests)
    for m in stored:
        m["metadata"]["resourceVersion"] = "1"
    return stored


def test_second_reconcile_with_nothing_changed_plans_no_write():
    body = _body()
    first = reconcile(_observe(body))
    assert {a.verb for a in first.actions} == {"create"} and len(first.actions) == 7
    body["status"] = first.status
    created = _as_stored([a.body for a in first.actions])
    jobs = [c for c in created if c["kind"] == "Job"]
    children = [c for c in created if c["kind"] != "Job"]
    second = reconcile(_observe(body, children, jobs, now=NOW + timedelta(seconds=30)))
    assert second.actions == [] and second.events == []
    assert status_patch(second.status, body["status"]) == {}


def _failed_pod(index: int, code: int) -> dict:
    return {"metadata": {"name": f"demo-a0-{index}-x", "labels": {"neox.dev/attempt": "0"},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
                "exitCode": code, "reason": "Error", "finishedAt": "2026-01-01T11:59:00Z"}}}]}}


def test_pod_failure_records_restart_before_replacing_the_job_and_waits_for_backoff():
    body = _body(failurePolicy={"backoffSeconds": 10, "maxRestarts": 3})
    first = reconcile(_observe(body))
    body["status"] = first.status
    created = _as_stored([a.body for a in first.actions])
    children = [c for c in created if c["kind"] != "Job"]
    jobs = [c for c in created if c["kind"] == "Job"]
    failed = reconcile(_observe(body, children, jobs, [_failed_pod(1, 137)]))
    assert [str(a) for a in failed.actions] == ["delete Job/demo-a0"]
    assert failed.status_first and failed.status["restarts"] == 1
    restarting = next(c for c in failed.status["conditions"] if c["type"] == "Restarting")
    assert restarting["status"] == "True" and "index 1" in restarting["message"] and "137" in restarting["message"]

    body["status"] = failed.status
    early = reconcile(_observe(body, children, [], now=NOW + timedelta(seconds=4)))
    assert early.actions == [] and 5 < early.requeue_after <= 6
    late = reconcile(_observe(body, children, [], now=NOW + timedelta(seconds=11)))
    assert [str(a) for a in late.actions] == ["create Job/demo-a1"]


def test_invalid_spec_is_a_false_condition_not_an_error():
    body = _body()
    body["spec"]["parallelism"]["tensor"] = 3  # tiny has 4 heads, and 3 does not divide 2 ranks
    decision = reconcile(_observe(body))
    feasible = next(c for c in decision.status["conditions"] if c["type"] == "Feasible")
    assert feasible["status"] == "False" and feasible["reason"] == "InvalidSpec"
    assert decision.actions == [] and decision.status["phase"] == "Invalid"


def test_importing_the_operator_does_not_load_torch():
    code = ("import sys, neox_operator.handlers, neox_operator.cli, neox_operator.planner; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _ready_pod(index: int) -> dict:
    return {"metadata": {"name": f"demo-a0-{index}-x", "labels": {"neox.dev/attempt": "0"},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def test_silence_longer_than_progress_timeout_restarts_as_a_hang():
    body = _body(failurePolicy={"progressTimeoutSeconds": 60})
    first = reconcile(_observe(body))
    created = _as_stored([a.body for a in first.actions])
    children = [c for c in created if c["kind"] != "Job"]
    jobs = [c for c in created if c["kind"] == "Job"]
    jobs[0]["metadata"]["creationTimestamp"] = "2026-01-01T12:00:00Z"
    body["status"] = first.status
    pods = [_ready_pod(0), _ready_pod(1)]
    body["status"]["progress"] = {"updatedAt": "2026-01-01T12:01:30Z", "step": 5}
    talking = reconcile(_observe(body, children, jobs, pods, now=NOW + timedelta(seconds=120)))
    assert talking.actions == [] and talking.status["phase"] == "Running"
    silent = reconcile(_observe(body, children, jobs, pods, now=NOW + timedelta(seconds=151)))
    assert [str(a) for a in silent.actions] == ["delete Job/demo-a0"]
    restarting = next(c for c in silent.status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == "ProgressTimeout" and "No progress reported for 61s" in restarting["message"]


def test_neox_plan_prints_a_table_and_fails_when_it_does_not_fit(tmp_path):
    manifest = tmp_path / "20b.yaml"
    manifest.write_text(
        "apiVersion: neox.dev/v1alpha1\nkind: NeoXTraining\nmetadata: {name: big}\nspec:\n"
        "  model: {preset: neox-20b}\n  data: {path: /d}\n  parallelism: {nodes: 1, gpusPerNode: 8}\n"
        "  training: {steps: 10, precision: fp16}\n  resources: {gpuMemoryGiB: 80}\n")
    out = subprocess.run([sys.executable, "-m", "neox_operator.planner", str(manifest)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "optimizer states" in out.stdout and "fits" in out.stdout and "NO" in out.stdout
    assert "20.56 B" in out.stdout or "20.55 B" in out.stdout


def test_cli_scopes_kopf_to_namespaces_or_the_whole_cluster(monkeypatch):
    import kopf

    from neox_operator import cli
    calls = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cli.logs, "configure", lambda verbose: None)  # keep pytest's log capture
    cli.main(["-A", "--metrics-port", "0", "--health-port", "0"])
    cli.main(["-n", "team-a", "-n", "team-b", "--metrics-port", "0", "--health-port", "9090"])
    assert calls[0]["clusterwide"] is True and list(calls[0]["namespaces"]) == []  # kopf iterates it
    assert calls[0]["standalone"] is True and calls[0]["liveness_endpoint"] is None
    assert calls[1]["clusterwide"] is False and calls[1]["namespaces"] == ["team-a", "team-b"]
    assert calls[1]["liveness_endpoint"] == "http://0.0.0.0:9090/healthz"


def _running_attempt(**spec):
    """A training whose attempt-0 Job exists, as stored, with the status the operator wrote for it."""
    body = _body(**spec)
    first = reconcile(_observe(body))
    body["status"] = first.status
    created = _as_stored([a.body for a in first.actions])
    return body, [c for c in created if c["kind"] != "Job"], [c for c in created if c["kind"] == "Job"]


def _complete(job: dict, at: str = "2026-01-01T12:00:00Z") -> dict:
    job["status"] = {"completionTime": at, "conditions": [{"type": "Complete", "status": "True"}]}
    return job


def _condition(decision, type_: str) -> dict:
    return next(c for c in decision.status["conditions"] if c["type"] == type_)


def test_a_job_complete_without_the_final_step_reported_is_not_succeeded_then_restarts():
    body, children, jobs = _running_attempt(training={"steps": 200}, failurePolicy={"maxRestarts": 1})
    body["status"]["progress"] = {"step": 50, "totalSteps": 200}
    _complete(jobs[0])
    early = reconcile(_observe(body, children, jobs, now=NOW + timedelta(seconds=5)))
    assert early.status["phase"] == "Completing" and early.actions == []
    succeeded = _condition(early, "Succeeded")
    assert succeeded["status"] == "False" and "step 50 of 200" in succeeded["message"]
    assert 24 < early.requeue_after <= 25  # the final report may still be in flight

    late = reconcile(_observe(body, children, jobs, now=NOW + timedelta(seconds=31)))
    assert [str(a) for a in late.actions] == ["delete Job/demo-a0"] and late.status["restarts"] == 1
    restarting = _condition(late, "Restarting")
    assert restarting["reason"] == "FinalStepNotReported" and "restart 1 of at most 1" in restarting["message"]
    assert _condition(late, "Succeeded")["status"] == "False" and "preemptions" not in late.status

    # It keeps happening: maxRestarts ends it as Failed with a reason that says why.
    body["status"] = late.status
    again = _complete(render_job(body, attempt=1))
    final = reconcile(_observe(body, children, [again], now=NOW + timedelta(seconds=90)))
    failed = _condition(final, "Failed")
    assert final.status["phase"] == "Failed" and failed["reason"] == "FinalStepNotReported"
    assert "gave up after 1 restarts" in failed["message"]


def test_a_job_complete_with_the_final_step_reported_succeeds():
    body, children, jobs = _running_attempt(training={"steps": 200})
    body["status"]["progress"] = {"step": 200, "totalSteps": 200}
    done = reconcile(_observe(body, children, [_complete(jobs[0])]))
    assert done.status["phase"] == "Succeeded" and _condition(done, "Succeeded")["reason"] == "FinalStepReached"


def test_a_preempted_group_restarts_without_spending_max_restarts():
    body, children, jobs = _running_attempt(failurePolicy={"maxRestarts": 0, "backoffSeconds": 10})
    preempted = [_failed_pod(0, 75), _failed_pod(1, 75)]
    first = reconcile(_observe(body, children, jobs, preempted))
    assert [str(a) for a in first.actions] == ["delete Job/demo-a0"]
    assert (first.status["restarts"], first.status["preemptions"]) == (1, 1)
    restarting = _condition(first, "Restarting")
    assert restarting["reason"] == "Preempted" and "not counted against maxRestarts 0" in restarting["message"]
    assert "exit code 75" in restarting["message"] and first.requeue_after == 10

    # The next attempt starts after the first backoff (a preemption does not double it) ...
    body["status"] = first.status
    assert [str(a) for a in reconcile(_observe(body, children, [], now=NOW + timedelta(seconds=11))).actions] \
        == ["create Job/demo-a1"]
    # ... and a real failure of it, with maxRestarts 0, ends the training.
    attempt1 = render_job(body, attempt=1)
    crashed = _failed_pod(1, 137)
    crashed["metadata"]["labels"]["neox.dev/attempt"] = "1"
    final = reconcile(_observe(body, children, [attempt1], [crashed], now=NOW + timedelta(seconds=20)))
    assert final.status["phase"] == "Failed"
    assert "gave up after 0 restarts (maxRestarts 0) and 1 preemptions" in _condition(final, "Failed")["message"]


def test_a_pod_kubernetes_disrupted_does_not_count_whatever_it_exited_with():
    body, children, jobs = _running_attempt(failurePolicy={"maxRestarts": 0})
    evicted = _failed_pod(1, 137)  # killed at the end of its grace period, say
    evicted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                        "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]
    decision = reconcile(_observe(body, children, jobs, [evicted]))
    assert decision.status["phase"] == "Restarting" and decision.status["preemptions"] == 1
    restarting = _condition(decision, "Restarting")
    assert restarting["reason"] == "PodDisrupted" and "EvictionByEvictionAPI" in restarting["message"]
    assert "exited with code 137" in restarting["message"]


def test_a_real_failure_among_preempted_pods_counts():
    body, children, jobs = _running_attempt(failurePolicy={"maxRestarts": 0})
    final = reconcile(_observe(body, children, jobs, [_failed_pod(0, 75), _failed_pod(1, 1)]))
    assert final.status["phase"] == "Failed" and _condition(final, "Failed")["reason"] == "PodFailed"


def render_job(body: dict, attempt: int) -> dict:
    from neox_operator import render

    owner = render.Owner(body["metadata"]["name"], body["metadata"]["namespace"], body["metadata"]["uid"])
    job = render.job(owner, NeoXTrainingSpec.model_validate(body["spec"]), attempt)
    return _as_stored([job])[0]
