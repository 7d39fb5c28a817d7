"""The NeoXServing controller: rendering and decisions as data, then the lifecycle against
the real control plane with the operator running: create → Ready with the Service in front
→ `kubectl scale` → a spec change rolls out a new revision next to the old one → delete
(children collected, the model's claim kept)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from neox_operator import serving
from neox_runtime.api import names
from neox_runtime.api.serving import NeoXServingSpec
from tests.cluster.kube import wait_for

from .helpers import condition as _condition, events, status as _status

OWNER = serving.Owner("chat", "ml", "0b7c2a8e-1111-4222-8333-944455556666")


def status(kube, namespace: str, name: str) -> dict:
    return _status(kube, namespace, name, "neoxserving")


def condition(kube, namespace: str, name: str, type_: str) -> dict:
    return _condition(kube, namespace, name, type_, "neoxserving")


def manifest(name: str, **spec) -> dict:
    body = {"model": {"volume": {"claimName": "models", "path": "pythia-70m"}}, "replicas": 2, **spec}
    return {"apiVersion": "neox.dev/v1alpha1", "kind": "NeoXServing", "metadata": {"name": name}, "spec": body}


def spec_of(**spec) -> NeoXServingSpec:
    return NeoXServingSpec.model_validate(manifest("chat", **spec)["spec"])


# ------------------------------------------------------------------ pure
def test_server_command_carries_runtime_and_safety_settings():
    spec = spec_of(runtime={"tensorParallel": 2, "dtype": "float16", "maxNewTokens": 256},
                   auth={"enabled": True, "apiKeysSecret": "keys"}, rateLimit={"requestsPerMinute": 60},
                   safety={"maxPromptTokens": 1000, "moderation": {"enabled": True, "blocklist": ["a,b", "c"]},
                           "watermark": {"enabled": True, "secret": "wm"}})
    cmd = serving.server_command(OWNER, spec)
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "neox-serve" and flags["--model"] == "/model/pythia-70m"
    assert (flags["--tensor-parallel"], flags["--dtype"], flags["--max-tokens-cap"]) == ("2", "float16", "256")
    assert flags["--api-keys-file"] == serving.API_KEYS_MOUNT and flags["--requests-per-minute"] == "60"
    assert flags["--watermark-key-file"] == f"{serving.WATERMARK_MOUNT}/key"
    assert flags["--max-prompt-tokens"] == "1000" and flags["--served-model-name"] == "chat"
    # A term with a comma survives: the blocklist travels as a file, not as a flag.
    assert serving.safety_config(OWNER, spec)["data"]["blocklist.txt"] == "a,b\nc\n"
    template = serving.pod_template(OWNER, spec)
    assert template["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert {v["name"] for v in template["spec"]["volumes"]} == {"model", "shm", "api-keys", "watermark", "safety"}


def test_revision_follows_the_pods_not_the_replica_count():
    base = serving.revision(OWNER, spec_of())
    assert serving.revision(OWNER, spec_of(replicas=5)) == base
    assert serving.revision(OWNER, spec_of(runtime={"maxNewTokens": 64})) != base
    assert serving.revision(OWNER, spec_of(safety={"moderation": {"enabled": True, "blocklist": ["x"]}})) != base


def _observed(spec: dict, deployments: list[dict], old_status: dict | None = None) -> serving.Observed:
    body = {**manifest("chat", **spec), "status": old_status or {}}
    body["metadata"].update(namespace="ml", uid=OWNER.uid, generation=1)
    return serving.Observed(body=body, children={}, deployments=deployments, now=datetime.now(timezone.utc))


def _deployment(spec: dict, ready: int) -> dict:
    s = NeoXServingSpec.model_validate(manifest("chat", **spec)["spec"])
    dep = serving.deployment(OWNER, s, serving.revision(OWNER, s), s.replicas)
    dep["metadata"].update(generation=1, resourceVersion="1")
    dep["status"] = {"observedGeneration": 1, "replicas": s.replicas, "readyReplicas": ready,
                     "updatedReplicas": s.replicas}
    return dep


def test_old_revision_serves_until_the_new_one_is_ready_then_goes():
    old = _deployment({}, ready=2)
    new_spec = {"runtime": {"maxNewTokens": 64}}
    starting = serving.reconcile(_observed(new_spec, [old]))
    assert [str(a) for a in starting.actions if a.kind == "Deployment"] == [
        f"create Deployment/{names.serving_deployment('chat', serving.revision(OWNER, spec_of(**new_spec)))}"]
    assert starting.status["readyReplicas"] == 2 and starting.status["phase"] == "Progressing"
    ready = {c["type"]: c for c in starting.status["conditions"]}["Ready"]
    assert ready["status"] == "True" and ready["reason"] == "RollingOut"

    half = serving.reconcile(_observed(new_spec, [old, _deployment(new_spec, ready=1)]))
    assert not any(a.verb == "delete" for a in half.actions)
    assert sorted(r["trafficPercent"] for r in half.status["revisions"]) == [33, 67]

    done = serving.reconcile(_observed(new_spec, [old, _deployment(new_spec, ready=2)]))
    assert [str(a) for a in done.actions if a.kind == "Deployment"] == [f"delete Deployment/{old['metadata']['name']}"]
    assert done.status["currentRevision"] == serving.revision(OWNER, spec_of(**new_spec))
    assert done.status["phase"] == "Ready" and ("Normal", "RolledOut") == done.events[0][:2]


def test_unimplemented_features_are_reported_not_ignored():
    decision = serving.reconcile(_observed({"autoscaling": {"enabled": True}}, []))
    honored = {c["type"]: c for c in decision.status["conditions"]}["SpecHonored"]
    assert honored["status"] == "False" and "autoscaling is not implemented" in honored["message"]
    trained = serving.reconcile(_observed({"model": {"fromTraining": {"name": "run"}}}, []))
    ready = {c["type"]: c for c in trained.status["conditions"]}["Ready"]
    assert ready["reason"] == "NotImplemented" and not trained.actions


# ------------------------------------------------------------ real cluster
def _deployments(kube, namespace: str, name: str) -> list[dict]:
    out = kube.kubectl("get", "deployments", "-n", namespace, "-l", f"{names.LABEL_SERVING}={name}", "-o", "json")
    return json.loads(out.stdout)["items"]


@pytest.mark.cluster
def test_serving_lifecycle_scale_rollout_and_delete_keeps_the_model_claim(kube, namespace, operator):
    name = "chat"
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}, namespace)
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"},
                "stringData": {"team-a": "sk-a"}}, namespace)
    kube.apply(manifest(name, auth={"enabled": True, "apiKeysSecret": "keys"}), namespace)

    wait_for(lambda: condition(kube, namespace, name, "Ready")["status"] == "True", 90, what="Ready=True")
    st = status(kube, namespace, name)
    first = st["currentRevision"]
    assert (st["phase"], st["replicas"], st["readyReplicas"], st["ready"]) == ("Ready", 2, 2, "2/2")
    assert st["url"] == f"http://{name}.{namespace}.svc:8000/v1" and st["revisions"][0]["trafficPercent"] == 100
    pods = kube.pods(namespace, st["selector"])
    assert len(pods) == 2 and all(p["metadata"]["labels"][names.LABEL_REVISION] == first for p in pods)
    svc = kube.get("service", names.serving_service(name), namespace)
    assert svc["spec"]["selector"] == {names.LABEL_SERVING: name, names.LABEL_COMPONENT: "server"}
    command = _deployments(kube, namespace, name)[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["neox-serve", "--model", "/model/pythia-70m"] and "--api-keys-file" in command

    kube.kubectl("scale", "neoxserving", name, "-n", namespace, "--replicas=3")
    wait_for(lambda: status(kube, namespace, name).get("ready") == "3/3", 60, what="3 ready replicas")
    assert [d["metadata"]["name"] for d in _deployments(kube, namespace, name)] == [
        names.serving_deployment(name, first)]  # scaling is not a new revision

    kube.kubectl("patch", "neoxserving", name, "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"runtime": {"maxNewTokens": 128}}}))
    wait_for(lambda: status(kube, namespace, name).get("currentRevision") not in (None, first), 90,
             what="the new revision to take over")
    wait_for(lambda: len(_deployments(kube, namespace, name)) == 1, 60, what="the old revision deleted")
    st = status(kube, namespace, name)
    assert st["ready"] == "3/3" and condition(kube, namespace, name, "Progressing")["reason"] == "Complete"
    reasons = [e["reason"] for e in events(kube, namespace, "NeoXServing")]
    assert "RollingOut" in reasons and "RolledOut" in reasons

    kube.kubectl("delete", "neoxserving", name, "-n", namespace)
    wait_for(lambda: not _deployments(kube, namespace, name), 60, what="Deployments collected")
    assert kube.kubectl("get", "service", name, "-n", namespace, check=False).returncode != 0
    assert kube.get("pvc", "models", namespace)["metadata"]["name"] == "models"
