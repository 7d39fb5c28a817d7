"""The NeoXTraining lifecycle against the real control plane, with the operator running:
create → Running → pod failure → group restart → Succeeded once the final step is reported
→ TTL cleanup (claim kept), maxRestarts → Failed naming the pod, preemption without
spending maxRestarts, node loss, suspend/resume."""

from __future__ import annotations

import json

import pytest

from neox_runtime.api import contract, names
from tests.cluster.kube import wait_for

from .helpers import (OperatorProcess, condition, condition_is, events, pod_index, running_pods, status, training,
                      worker_pods)

pytestmark = pytest.mark.cluster


def _exists(kube, kind: str, name: str, namespace: str) -> bool:
    return kube.kubectl("get", kind, name, "-n", namespace, check=False).returncode == 0


def _report_step(kube, namespace: str, name: str, step: int, total: int) -> None:
    """What the runtime's reporter writes into status (its own field manager)."""
    kube.kubectl("patch", "neoxtraining", name, "-n", namespace, "--subresource", "status", "--type", "merge",
                 "--field-manager", "neox-runtime",
                 "-p", json.dumps({"status": {"progress": {"step": step, "totalSteps": total}}}))


def test_failure_restarts_whole_group_then_succeeds_and_ttl_keeps_claim(kube, namespace, operator):
    name = "life"
    kube.apply(training(name, ttlSecondsAfterFinished=2), namespace)
    pods = wait_for(lambda: running_pods(kube, namespace, name, 0, 2), 60, what="attempt 0 running")
    wait_for(lambda: condition_is(kube, namespace, name, "Running"), 30, what="Running=True")
    st = status(kube, namespace, name)
    assert (st["phase"], st["workers"], st["restarts"]) == ("Running", "2/2", 0)
    assert condition(kube, namespace, name, "Ready")["status"] == "True"
    assert operator.metric("neox_operator_trainings", condition="Running", status="True") == 1
    uid = kube.get("neoxtraining", name, namespace)["metadata"]["uid"]
    for kind, child in (("service", names.training_service(name)), ("configmap", names.training_config(name)),
                        ("job", names.training_job(name, 0)), ("role", names.training_service_account(name))):
        refs = kube.get(kind, child, namespace)["metadata"]["ownerReferences"]
        assert [r["uid"] for r in refs] == [uid]
    assert "ownerReferences" not in kube.get("pvc", names.training_checkpoints(name), namespace)["metadata"]

    failing = next(p for p in pods if pod_index(p) == 1)
    kube.finish_pod(failing["metadata"]["name"], namespace, 1)
    wait_for(lambda: running_pods(kube, namespace, name, 1, 2), 60, what="attempt 1 running")
    wait_for(lambda: not _exists(kube, "job", names.training_job(name, 0), namespace), 30, what="attempt 0 gone")
    wait_for(lambda: condition_is(kube, namespace, name, "Running"), 30)
    assert status(kube, namespace, name)["restarts"] == 1
    assert operator.metric("neox_operator_training_restarts_total") == 1
    restart = next(e for e in events(kube, namespace) if e["reason"] == "Restarting")
    assert failing["metadata"]["name"] in restart["message"] and "exit code 1" in restart["message"]

    # The Job completes before the runtime reported its final step: not (yet) a success.
    _report_step(kube, namespace, name, 60, 100)
    for pod in running_pods(kube, namespace, name, 1, 2):
        kube.finish_pod(pod["metadata"]["name"], namespace, 0)
    completing = wait_for(lambda: status(kube, namespace, name).get("phase") == "Completing"
                          and condition(kube, namespace, name, "Succeeded"), 60, what="Completing")
    assert completing["status"] == "False" and "step 60 of 100" in completing["message"]
    _report_step(kube, namespace, name, 100, 100)
    wait_for(lambda: condition_is(kube, namespace, name, "Succeeded"), 60, what="Succeeded=True")
    st = status(kube, namespace, name)
    assert st["phase"] == "Succeeded" and st["completionTime"] and st["restarts"] == 1
    assert condition(kube, namespace, name, "Ready")["status"] == "True"

    wait_for(lambda: not any(_exists(kube, kind, child, namespace) for kind, child in (
        ("service", names.training_service(name)), ("configmap", names.training_config(name)),
        ("job", names.training_job(name, 1)), ("serviceaccount", names.training_service_account(name)),
        ("role", names.training_service_account(name)), ("rolebinding", names.training_service_account(name)))),
        30, what="TTL cleanup")
    assert _exists(kube, "pvc", names.training_checkpoints(name), namespace)
    assert status(kube, namespace, name)["phase"] == "Succeeded"


def test_max_restarts_reached_fails_naming_index_pod_and_exit_code(kube, namespace, operator):
    name = "doomed"
    kube.apply(training(name, failurePolicy={"maxRestarts": 1}), namespace)
    pods = wait_for(lambda: running_pods(kube, namespace, name, 0, 2), 60)
    kube.finish_pod(next(p for p in pods if pod_index(p) == 1)["metadata"]["name"], namespace, 3)
    pods = wait_for(lambda: running_pods(kube, namespace, name, 1, 2), 60, what="attempt 1 running")
    culprit = next(p for p in pods if pod_index(p) == 0)["metadata"]["name"]
    kube.finish_pod(culprit, namespace, 7)
    failed = wait_for(lambda: condition_is(kube, namespace, name, "Failed"), 60, what="Failed=True")
    assert failed["reason"] == "PodFailed"
    assert "index 0" in failed["message"] and culprit in failed["message"] and "exit code 7" in failed["message"]
    st = status(kube, namespace, name)
    assert (st["phase"], st["restarts"]) == ("Failed", 1)
    assert condition(kube, namespace, name, "Ready")["status"] == "False"
    wait_for(lambda: not worker_pods(kube, namespace, name), 30, what="pods released")
    assert not _exists(kube, "job", names.training_job(name, 2), namespace)


def test_preempted_pods_restart_the_group_without_spending_max_restarts(kube, namespace, operator):
    name = "preempted"
    kube.apply(training(name, failurePolicy={"maxRestarts": 0}), namespace)
    for attempt in (0, 1):  # twice preempted: a budget of zero restarts is not touched
        pods = wait_for(lambda: running_pods(kube, namespace, name, attempt, 2), 60, what=f"attempt {attempt}")
        kube.finish_pod(pods[attempt]["metadata"]["name"], namespace, contract.EXIT_PREEMPTED)  # its peer goes with it
    pods = wait_for(lambda: running_pods(kube, namespace, name, 2, 2), 60, what="attempt 2 running")
    st = status(kube, namespace, name)
    assert (st["restarts"], st["preemptions"], st["phase"]) == (2, 2, "Running")
    restart = next(e for e in events(kube, namespace) if e["reason"] == "Restarting")
    assert "on SIGTERM" in restart["message"] and "not counted against maxRestarts 0" in restart["message"]
    kube.finish_pod(pods[0]["metadata"]["name"], namespace, 1)  # a real failure: the budget of 0 is spent
    failed = wait_for(lambda: condition_is(kube, namespace, name, "Failed"), 60, what="Failed=True")
    assert failed["reason"] == "PodFailed" and "and 2 preemptions" in failed["message"]


@pytest.fixture
def slow_resync_operator(kube, namespace):
    """An operator whose periodic resync never comes during the test: only watches drive it."""
    process = OperatorProcess(kube.cluster.kubeconfig, [namespace], resync=600)
    process.start()
    yield process
    process.stop()


def test_node_loss_restarts_group_elsewhere(kube, namespace, slow_resync_operator):
    name = "nodeloss"
    kube.apply(training(name, failurePolicy={"maxRestarts": 5}), namespace)
    pods = wait_for(lambda: running_pods(kube, namespace, name, 0, 2), 60)
    lost = next(p for p in pods if pod_index(p) == 0)["spec"]["nodeName"]
    kube.lose_node(lost)
    try:
        restarting = wait_for(lambda: condition_is(kube, namespace, name, "Restarting")
                              or (status(kube, namespace, name).get("restarts", 0) >= 1 and
                                  condition(kube, namespace, name, "Restarting")), 60, what="restart")
        first = next(e for e in events(kube, namespace) if e["reason"] == "Restarting")
        assert lost in first["message"] and "not Ready" in first["message"]

        def healthy_elsewhere():
            st = status(kube, namespace, name)
            attempt = st.get("restarts", 0)
            pods = running_pods(kube, namespace, name, attempt, 2) if attempt else None
            return pods and all(p["spec"]["nodeName"] != lost for p in pods) and st["phase"] == "Running"
        wait_for(healthy_elsewhere, 90, what="group running on the remaining nodes")
        assert restarting["type"] == "Restarting"
    finally:
        kube.restore_node(lost)


def test_suspend_stops_pods_and_resume_continues_same_attempt(kube, namespace, operator):
    name = "pausable"
    kube.apply(training(name), namespace)
    wait_for(lambda: running_pods(kube, namespace, name, 0, 2), 60)
    kube.kubectl("patch", "neoxtraining", name, "-n", namespace, "--type", "merge", "-p",
                 json.dumps({"spec": {"suspend": True}}))
    wait_for(lambda: condition_is(kube, namespace, name, "Suspended"), 30, what="Suspended=True")
    assert kube.get("job", names.training_job(name, 0), namespace)["spec"]["suspend"] is True
    wait_for(lambda: not worker_pods(kube, namespace, name), 30, what="pods stopped")
    st = status(kube, namespace, name)
    assert st["phase"] == "Suspended" and condition(kube, namespace, name, "Running")["status"] == "False"

    kube.kubectl("patch", "neoxtraining", name, "-n", namespace, "--type", "merge", "-p",
                 json.dumps({"spec": {"suspend": False}}))
    wait_for(lambda: running_pods(kube, namespace, name, 0, 2), 60, what="resumed pods")
    wait_for(lambda: condition_is(kube, namespace, name, "Running"), 30)
    st = status(kube, namespace, name)
    assert st["restarts"] == 0 and st["phase"] == "Running"
    assert condition(kube, namespace, name, "Suspended")["status"] == "False"
    assert {e["reason"] for e in events(kube, namespace)} >= {"Suspended", "Resumed"}


def test_infeasible_20b_on_one_node_is_refused_without_pods(kube, namespace, operator):
    name = "too-big"
    kube.apply(training(name, nodes=1, gpus=8, model={"preset": "neox-20b"},
                        training={"steps": 10, "precision": "fp16", "seqLength": 2048}), namespace)
    feasible = wait_for(lambda: condition_is(kube, namespace, name, "Feasible", "False"), 30)
    assert feasible["reason"] == "InsufficientGPUMemory"
    assert "GiB per GPU of 79.6 GiB" in feasible["message"]  # from the nvidia.com/gpu.memory label
    assert status(kube, namespace, name)["phase"] == "Infeasible"
    operator_reconciles = operator.metric("neox_operator_reconciles_total")
    wait_for(lambda: operator.metric("neox_operator_reconciles_total") > operator_reconciles + 1, 20)
    assert not worker_pods(kube, namespace, name)
    assert not _exists(kube, "job", names.training_job(name, 0), namespace)
    assert any(e["reason"] == "Infeasible" for e in events(kube, namespace))


def test_no_progress_for_progress_timeout_restarts_as_hang(kube, namespace, operator):
    name = "hung"
    kube.apply(training(name, nodes=1, failurePolicy={"progressTimeoutSeconds": 30}), namespace)
    wait_for(lambda: running_pods(kube, namespace, name, 0, 1), 60)
    restarting = wait_for(lambda: next((e for e in events(kube, namespace) if e["reason"] == "Restarting"), None),
                          60, interval=1, what="hang restart")
    assert "No progress reported" in restarting["message"] and "progressTimeoutSeconds 30" in restarting["message"]
    wait_for(lambda: running_pods(kube, namespace, name, 1, 1), 60, what="attempt 1 running")
    assert status(kube, namespace, name)["restarts"] == 1


def test_placement_of_a_suspended_job_follows_spec_updates(kube, namespace, operator):
    name = "moved"
    kube.apply(training(name, suspend=True), namespace)
    wait_for(lambda: condition_is(kube, namespace, name, "Suspended"), 30)
    selector = {"kubernetes.io/hostname": "gpu-node-2"}
    kube.kubectl("patch", "neoxtraining", name, "-n", namespace, "--type", "merge", "-p",
                 json.dumps({"spec": {"scheduling": {"nodeSelector": selector},
                                      "failurePolicy": {"maxRestarts": 9}}}))
    job = wait_for(lambda: (j := kube.get("job", names.training_job(name, 0), namespace))
                   ["spec"]["template"]["spec"].get("nodeSelector") == selector and j, 30)
    assert job["spec"]["suspend"] is True
    config = kube.get("configmap", names.training_config(name), namespace)["data"]["config.yaml"]
    assert "maxRestarts: 9" in config
    kube.kubectl("patch", "neoxtraining", name, "-n", namespace, "--type", "merge", "-p",
                 json.dumps({"spec": {"suspend": False}}))
    pods = wait_for(lambda: running_pods(kube, namespace, name, 0, 2), 60)
    assert {p["spec"]["nodeName"] for p in pods} == {"gpu-node-2"}
    assert status(kube, namespace, name)["observedGeneration"] == kube.get("neoxtraining", name, namespace)[
        "metadata"]["generation"]


def test_deleting_a_training_keeps_its_claim_unless_retain_policy_is_delete(kube, namespace, operator):
    kube.apply(training("kept", suspend=True), namespace)
    kube.apply(training("dropped", suspend=True, checkpoint={"retainPolicy": "Delete"}), namespace)
    for name in ("kept", "dropped"):
        wait_for(lambda: _exists(kube, "job", names.training_job(name, 0), namespace), 30)
    kube.kubectl("delete", "neoxtraining", "kept", "dropped", "-n", namespace)
    wait_for(lambda: not _exists(kube, "configmap", names.training_config("kept"), namespace)
             and not _exists(kube, "pvc", names.training_checkpoints("dropped"), namespace), 60,
             what="garbage collection of owned children")
    assert _exists(kube, "pvc", names.training_checkpoints("kept"), namespace)
