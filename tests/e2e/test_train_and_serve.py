"""End to end on the local control plane: a NeoXTraining trains for real, survives a
crashed pod by restarting from its checkpoint, and a NeoXServing of it answers the OpenAI API.

Everything is real: the API server, controller-manager and scheduler; the operator as a
process; the pod's `neox-train` (two DeepSpeed ranks on gloo) started by the local pod
runner with the pod's env, volumes and ServiceAccount; the serving pod the operator
rendered, its init container's `neox-convert` and its `neox-serve` answering the official
`openai` client.
"""

from __future__ import annotations

import copy
import signal

import openai
import yaml

from localcluster.demo import TRAINING, Demo

from tests.cluster.kube import Kube, wait_for



def _manifest() -> dict:
    manifest = copy.deepcopy(yaml.safe_load(TRAINING.read_text()))
    manifest["metadata"]["name"] = "e2e"
    manifest["spec"]["training"].update(steps=120, evalInterval=40, logInterval=10)
    manifest["spec"]["checkpoint"].update(interval=20, keepLast=2)
    manifest["spec"]["failurePolicy"] = {"maxRestarts": 2, "backoffSeconds": 1}
    return manifest


def test_training_survives_a_crash_and_its_model_is_served(kube: Kube, namespace: str):
    demo = Demo(kube.cluster, namespace)
    demo.prepare_corpus()
    operator = demo.start_operator()
    runner = demo.pod_runner().start()
    try:
        kube.apply(_manifest(), namespace)

        def status():
            return kube.get("nxt", "e2e", namespace).get("status", {})

        wait_for(lambda: (status().get("latestCheckpoint") or {}).get("step", 0) >= 40, timeout=240,
                 what="a checkpoint at step 40 or later")
        crashed = wait_for(lambda: next((p["metadata"]["name"] for p in kube.pods(namespace, "neox.dev/training=e2e")
                                         if runner.kill(p["metadata"]["name"], signal.SIGKILL)), None),
                           timeout=30, what="the running pod to crash")
        final = wait_for(lambda: status() if status().get("phase") in ("Succeeded", "Failed") else None,
                         timeout=300, what="the training to finish")
        assert final["phase"] == "Succeeded", final.get("conditions")
        assert final["restarts"] == 1
        assert final["progress"]["step"] == 120 and final["latestCheckpoint"]["step"] == 120
        # The second attempt resumed from the checkpoint instead of starting over.
        second = kube.cluster.state_dir / f"pods-{namespace}" / "pods"
        logs = "".join(p.read_text() for p in second.glob(f"{namespace}_e2e-a1-0-*/container.log"))
        resumed = [int(line.rsplit("step=", 1)[1]) for line in logs.splitlines() if "Resumed from checkpoint" in line]
        assert resumed and min(resumed) >= 40, logs[-2000:]
        assert crashed.startswith("e2e-a0-")

        # The claim outlives the pods: a NeoXServing converts its latest checkpoint and serves it.
        client = openai.OpenAI(base_url=demo.serve("e2e"), api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list().data] == ["e2e"]
        completion = client.completions.create(model="e2e", prompt="def main(", max_tokens=16, temperature=0)
        assert completion.usage.completion_tokens == 16 or completion.choices[0].finish_reason == "stop"
        assert completion.choices[0].text
        revision = kube.get("nxs", "e2e-chat", namespace)["status"]["revisions"][0]
        assert revision["checkpoint"] == "step-120"
    finally:
        runner.stop()
        operator.terminate()
        operator.wait(timeout=30)
