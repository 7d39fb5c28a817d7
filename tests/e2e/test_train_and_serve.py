"""End to end on the local control plane: a NeoXTraining of 2 pods × 2 ranks trains for
real across pod IPs, is preempted (SIGTERM to one pod) and loses a pod (SIGKILL, as a lost
node would), resumes from its checkpoint each time, succeeds only at its final step, and a
NeoXServing of it answers the OpenAI API.

Everything is real: the API server, controller-manager and scheduler; the operator as a
process; each pod's `neox-train` (two DeepSpeed ranks on gloo) started by the local pod
runner with the pod's env, volumes, ServiceAccount and its own network (pod IP, hostname,
the DNS name of the node-0 pod as MASTER_ADDR); the serving pod the operator rendered,
its init container's `neox-convert` and its `neox-serve` answering the official `openai`
client at its pod IP.
"""

from __future__ import annotations

import copy
import json
import re
import signal

import openai
import yaml

from localcluster import podnet
from localcluster.demo import TRAINING, Demo
from neox_runtime.api import contract

from tests.cluster.kube import Kube, wait_for

STEPS, INTERVAL = 100, 20
# As root (CI) every pod has its own network; elsewhere the runner falls back to loopback.
POD_NETWORKING = podnet.unsupported_reason() is None


def _manifest() -> dict:
    manifest = copy.deepcopy(yaml.safe_load(TRAINING.read_text()))
    manifest["metadata"]["name"] = "e2e"
    spec = manifest["spec"]
    spec["parallelism"].update(nodes=2, processesPerNode=2)  # 4 ranks: data-parallel 4 over two pods
    spec["training"].update(steps=STEPS, seqLength=64, microBatchSize=4, globalBatchSize=16, evalInterval=50,
                            logInterval=5)
    spec["checkpoint"].update(interval=INTERVAL, keepLast=2)
    spec["failurePolicy"] = {"maxRestarts": 1, "backoffSeconds": 1}
    return manifest


def _pod_logs(kube: Kube, namespace: str, attempt: int) -> dict[int, str]:
    pods = kube.cluster.state_dir / f"pods-{namespace}" / "pods"
    return {index: "".join(p.read_text() for p in pods.glob(f"{namespace}_e2e-a{attempt}-{index}-*/container.log"))
            for index in (0, 1)}


def _resumed_at(kube: Kube, namespace: str, attempt: int) -> set[int]:
    """The step every rank of `attempt` resumed from (one per rank, four in all)."""
    logs = "".join(_pod_logs(kube, namespace, attempt).values())
    return {int(step) for step in re.findall(r"Resumed from checkpoint tag=\S+ step=(\d+)", logs)}


def test_two_pod_training_survives_preemption_and_a_lost_pod_and_is_served(kube: Kube, namespace: str, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # four ranks on a small machine
    demo = Demo(kube.cluster, namespace)
    demo.prepare_corpus()
    operator = demo.start_operator()
    runner = demo.pod_runner().start()
    try:
        assert runner.networking == ("pod" if POD_NETWORKING else "host")
        kube.apply(_manifest(), namespace)

        def status():
            return kube.get("nxt", "e2e", namespace).get("status", {})

        def running(attempt: int) -> list[dict]:
            pods = [p for p in kube.pods(namespace, f"neox.dev/training=e2e,neox.dev/attempt={attempt}")
                    if p["status"].get("phase") == "Running"]
            return pods if len(pods) == 2 else []

        # Attempt 0: two pods, each at its own IP, train together; SIGTERM one of them mid-run.
        pods = wait_for(lambda: running(0), timeout=120, what="both pods of attempt 0 running")
        assert len({p["status"]["podIP"] for p in pods}) == 2 or not POD_NETWORKING
        wait_for(lambda: (status().get("progress") or {}).get("step", 0) >= 10, timeout=300, what="step 10")
        assert runner.kill(_pod_name(pods, 1), signal.SIGTERM)
        preempted = wait_for(lambda: status() if status().get("restarts", 0) >= 1 else None, timeout=120,
                             what="the preempted group to restart")
        assert preempted["phase"] != "Succeeded" and preempted.get("preemptions") == 1
        restarting = _restart_events(kube, namespace)[0]
        assert f"exit code {contract.EXIT_PREEMPTED}" in restarting and "not counted against maxRestarts" in restarting
        saved_on_sigterm = {int(s) for s in re.findall(r"\[preempted\] step (\d+)/", _pod_logs(kube, namespace, 0)[0])}
        assert len(saved_on_sigterm) == 1 and 10 <= min(saved_on_sigterm) < STEPS
        preemption_step = saved_on_sigterm.pop()

        # Attempt 1 resumes from the checkpoint written on SIGTERM; then one of its pods is lost (SIGKILL).
        pods = wait_for(lambda: running(1), timeout=120, what="both pods of attempt 1 running")
        wait_for(lambda: _resumed_at(kube, namespace, 1), timeout=300, what="attempt 1 resumed")
        assert _resumed_at(kube, namespace, 1) == {preemption_step}
        def checkpoint_after_preemption() -> int:
            step = (status().get("latestCheckpoint") or {}).get("step", 0)
            return step if step > preemption_step else 0

        checkpoint = wait_for(checkpoint_after_preemption, timeout=300, what="a checkpoint of attempt 1")
        assert runner.kill(_pod_name(pods, 0), signal.SIGKILL)

        final = wait_for(lambda: status() if status().get("phase") in ("Succeeded", "Failed") else None,
                         timeout=600, what="the training to finish")
        assert final["phase"] == "Succeeded", final.get("conditions")
        assert (final["restarts"], final["preemptions"]) == (2, 1)  # the lost pod spent the one allowed restart
        assert "restart 1 of at most 1" in _restart_events(kube, namespace)[1]
        assert final["progress"]["step"] == STEPS and final["latestCheckpoint"]["step"] == STEPS
        assert final["progress"]["tokens"] == STEPS * 16 * 64  # the declared global batch, over four ranks
        resumed = _resumed_at(kube, namespace, 2)
        assert len(resumed) == 1 and min(resumed) >= checkpoint, _pod_logs(kube, namespace, 2)

        # The claim outlives the pods: a NeoXServing converts its latest checkpoint and serves it.
        client = openai.OpenAI(base_url=demo.serve("e2e"), api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list().data] == ["e2e"]
        completion = client.completions.create(model="e2e", prompt="def main(", max_tokens=16, temperature=0)
        assert completion.usage.completion_tokens == 16 or completion.choices[0].finish_reason == "stop"
        assert completion.choices[0].text
        revision = kube.get("nxs", "e2e-chat", namespace)["status"]["revisions"][0]
        assert revision["checkpoint"] == f"step-{STEPS}"
    finally:
        runner.stop()
        operator.terminate()
        operator.wait(timeout=30)


def _restart_events(kube: Kube, namespace: str) -> list[str]:
    events = json.loads(kube.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return [e["message"] for e in sorted(events, key=lambda e: e.get("firstTimestamp") or "")
            if e["involvedObject"]["kind"] == "NeoXTraining" and e["reason"] == "Restarting"]


def _pod_name(pods: list[dict], index: int) -> str:
    return next(p["metadata"]["name"] for p in pods
                if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index))
