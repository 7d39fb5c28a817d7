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

from .helpers import condition as _condition, events, status as _status, training

OWNER = serving.Owner("chat", "ml", "0b7c2a8e-1111-4222-8333-944455556666", serving.KIND)


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
VOLUME = serving.Source("models", "pythia-70m")


def test_server_command_carries_runtime_and_safety_settings():
    spec = spec_of(runtime={"tensorParallel": 2, "dtype": "float16", "maxNewTokens": 256},
                   auth={"enabled": True, "apiKeysSecret": "keys"}, rateLimit={"requestsPerMinute": 60},
                   safety={"maxPromptTokens": 1000, "moderation": {"enabled": True, "blocklist": ["a,b", "c"]},
                           "watermark": {"enabled": True, "secret": "wm"}})
    cmd = serving.server_command(OWNER, spec, VOLUME)
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "neox-serve" and flags["--model"] == "/model/pythia-70m"
    assert (flags["--tensor-parallel"], flags["--dtype"], flags["--max-tokens-cap"]) == ("2", "float16", "256")
    assert flags["--api-keys-file"] == serving.API_KEYS_MOUNT and flags["--requests-per-minute"] == "60"
    assert flags["--watermark-key-file"] == f"{serving.WATERMARK_MOUNT}/key"
    assert flags["--max-prompt-tokens"] == "1000" and flags["--served-model-name"] == "chat"
    # A term with a comma survives: the blocklist travels as a file, not as a flag.
    assert serving.safety_config(OWNER, spec)["data"]["blocklist.txt"] == "a,b\nc\n"
    template = serving.pod_template(OWNER, spec, VOLUME)
    assert template["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert {v["name"] for v in template["spec"]["volumes"]} == {"model", "shm", "api-keys", "watermark", "safety"}


def test_the_rendered_command_is_what_neox_serve_parses(tmp_path):
    """The operator's flags against the server's own argument parser: no drift between the two."""
    from neox_runtime.serve.cli import parse_args

    (tmp_path / "key").write_text("wm-secret")
    (tmp_path / "blocklist.txt").write_text("a,b\nc\n")
    spec = spec_of(runtime={"tensorParallel": 2, "dtype": "float16", "maxBatchSize": 8, "maxNewTokens": 256},
                   auth={"enabled": True, "apiKeysSecret": "keys"}, rateLimit={"tokensPerMinute": 9000},
                   safety={"moderation": {"enabled": True, "blocklist": ["a,b", "c"], "systemPrompt": "Be kind."},
                           "watermark": {"enabled": True, "secret": "wm", "gamma": 0.5}})
    mounted = {f"{serving.WATERMARK_MOUNT}/key": str(tmp_path / "key"),
               f"{serving.SAFETY_MOUNT}/blocklist.txt": str(tmp_path / "blocklist.txt")}
    cfg = parse_args([mounted.get(arg, arg) for arg in serving.server_command(OWNER, spec, VOLUME)[1:]])
    assert (cfg.engine.tensor_parallel, cfg.engine.dtype, cfg.engine.max_num_seqs) == (2, "float16", 8)
    assert (cfg.engine.device, cfg.engine.served_model_name, cfg.port) == ("cuda", "chat", serving.PORT)
    assert cfg.safety.blocklist == ("a,b", "c") and cfg.safety.system_prompt == "Be kind."
    assert (cfg.safety.watermark_key, cfg.safety.watermark_gamma) == ("wm-secret", 0.5)
    assert cfg.safety.tokens_per_minute == 9000 and cfg.safety.max_tokens_cap == 256
    assert str(cfg.safety.api_keys_file) == serving.API_KEYS_MOUNT


def test_cpu_replicas_request_no_gpu():
    spec = spec_of(runtime={"device": "cpu"}, resources={"cpu": "2"})
    container = serving.pod_template(OWNER, spec, VOLUME)["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "2"}}
    assert container["command"][container["command"].index("--device") + 1] == "cpu"


def test_revision_follows_the_pods_not_the_replica_count():
    base = serving.revision(OWNER, spec_of(), VOLUME)
    assert serving.revision(OWNER, spec_of(replicas=5), VOLUME) == base
    assert serving.revision(OWNER, spec_of(runtime={"maxNewTokens": 64}), VOLUME) != base
    assert serving.revision(OWNER, spec_of(safety={"moderation": {"enabled": True, "blocklist": ["x"]}}),
                            VOLUME) != base


def _observed(spec: dict, deployments: list[dict], old_status: dict | None = None,
              training: dict | None = None) -> serving.Observed:
    body = {**manifest("chat", **spec), "status": old_status or {}}
    body["metadata"].update(namespace="ml", uid=OWNER.uid, generation=1)
    return serving.Observed(body=body, children={}, deployments=deployments, now=datetime.now(timezone.utc),
                            training=training)


def _deployment(spec: dict, ready: int, source: serving.Source = VOLUME) -> dict:
    s = NeoXServingSpec.model_validate(manifest("chat", **spec)["spec"])
    dep = serving.deployment(OWNER, s, source, serving.revision(OWNER, s, source), s.replicas)
    dep["metadata"].update(generation=1, resourceVersion="1")
    dep["status"] = {"observedGeneration": 1, "replicas": s.replicas, "readyReplicas": ready,
                     "updatedReplicas": s.replicas}
    return dep


def _conditions(decision) -> dict:
    return {c["type"]: c for c in decision.status["conditions"]}


def test_old_revision_serves_until_the_new_one_is_ready_then_goes():
    old = _deployment({}, ready=2)
    new_spec = {"runtime": {"maxNewTokens": 64}}
    new_rev = serving.revision(OWNER, spec_of(**new_spec), VOLUME)
    starting = serving.reconcile(_observed(new_spec, [old]))
    assert [str(a) for a in starting.actions if a.kind == "Deployment"] == [
        f"create Deployment/{names.serving_deployment('chat', new_rev)}"]
    assert starting.status["readyReplicas"] == 2 and starting.status["phase"] == "Progressing"
    assert (_conditions(starting)["Ready"]["status"], _conditions(starting)["Ready"]["reason"]) == ("True",
                                                                                                  "RollingOut")

    half = serving.reconcile(_observed(new_spec, [old, _deployment(new_spec, ready=1)]))
    assert not any(a.verb == "delete" for a in half.actions)
    assert sorted(r["trafficPercent"] for r in half.status["revisions"]) == [33, 67]

    done = serving.reconcile(_observed(new_spec, [old, _deployment(new_spec, ready=2)]))
    assert [str(a) for a in done.actions if a.kind == "Deployment"] == [f"delete Deployment/{old['metadata']['name']}"]
    assert done.status["currentRevision"] == new_rev
    assert done.status["phase"] == "Ready" and ("Normal", "RolledOut") == done.events[0][:2]


def test_unimplemented_features_are_reported_not_ignored():
    honored = _conditions(serving.reconcile(_observed({"rollout": {"strategy": "Canary", "canarySteps": [
        {"weight": 50}], "analysis": {"maxErrorRate": 0.01}}}, [])))["SpecHonored"]
    assert honored["status"] == "False" and "canary analysis is not implemented" in honored["message"]
    assert _conditions(serving.reconcile(_observed({}, [])))["SpecHonored"]["status"] == "True"


def _dep(spec: dict, replicas: int, ready: int) -> dict:
    dep = _deployment({**spec, "replicas": replicas}, ready)
    dep["spec"]["replicas"] = replicas
    return dep


def test_canary_moves_replicas_in_steps_and_pauses_before_each_next_one():
    from datetime import timedelta

    from neox_operator.conditions import rfc3339

    old_spec = {"replicas": 4}
    spec = {"replicas": 4, "runtime": {"maxNewTokens": 64}, "rollout": {"strategy": "Canary", "canarySteps": [
        {"weight": 25, "pauseSeconds": 60}, {"weight": 50, "pauseSeconds": 0}, {"weight": 100}]}}
    old_rev, rev = (serving.revision(OWNER, spec_of(**s), VOLUME) for s in (old_spec, spec))
    old_name = names.serving_deployment("chat", old_rev)

    def replicas_written(decision) -> dict:
        out = {}
        for a in decision.actions:
            if a.kind == "Deployment" and a.verb in ("create", "replace"):
                out[a.name] = a.body["spec"]["replicas"]
            elif a.kind == "Deployment" and a.verb == "patch":
                out[a.name] = a.body["spec"]["replicas"]
        return out

    start = serving.reconcile(_observed(spec, [_dep(old_spec, 4, 4)], {"currentRevision": old_rev}))
    assert replicas_written(start) == {names.serving_deployment("chat", rev): 1, old_name: 3}
    assert start.status["canary"] == {"revision": rev, "step": 0, "stepStartedAt": None}
    assert _conditions(start)["Progressing"]["reason"] == "Canary"

    status = {"currentRevision": old_rev, "canary": start.status["canary"]}
    paused = serving.reconcile(_observed(spec, [_dep(old_spec, 3, 3), _dep(spec, 1, 1)], status))
    assert replicas_written(paused) == {} and 59 < paused.requeue_after <= 60
    assert paused.status["canary"]["stepStartedAt"] and paused.status["currentRevision"] == old_rev

    long_ago = rfc3339(datetime.now(timezone.utc) - timedelta(seconds=61))
    status["canary"] = {"revision": rev, "step": 0, "stepStartedAt": long_ago}
    step2 = serving.reconcile(_observed(spec, [_dep(old_spec, 3, 3), _dep(spec, 1, 1)], status))
    assert replicas_written(step2) == {names.serving_deployment("chat", rev): 2, old_name: 2}
    assert step2.status["canary"]["step"] == 1 and ("Normal", "CanaryStep") == step2.events[0][:2]

    status["canary"] = step2.status["canary"]
    last = serving.reconcile(_observed(spec, [_dep(old_spec, 2, 2), _dep(spec, 2, 2)], status))
    assert replicas_written(last) == {names.serving_deployment("chat", rev): 4, old_name: 0}
    done = serving.reconcile(_observed(spec, [_dep(old_spec, 0, 0), _dep(spec, 4, 4)], {"canary": last.status["canary"]}))
    assert [str(a) for a in done.actions if a.kind == "Deployment"] == [f"delete Deployment/{old_name}"]
    assert done.status["canary"] is None and done.status["currentRevision"] == rev


def test_autoscaling_is_an_hpa_on_the_servings_scale_subresource():
    auto = {"enabled": True, "minReplicas": 0, "maxReplicas": 6, "targetRunningRequests": 24,
            "scaleDownDelaySeconds": 120}
    decision = serving.reconcile(_observed({"autoscaling": auto}, []))
    hpa = next(a.body for a in decision.actions if a.kind == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "neox.dev/v1alpha1", "kind": "NeoXServing", "name": "chat"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)  # no scale to zero, and it says so
    assert hpa["spec"]["metrics"][0]["pods"] == {"metric": {"name": "vllm_num_requests_running"},
                                                 "target": {"type": "AverageValue", "averageValue": "24"}}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    assert "scaling to zero" in _conditions(decision)["SpecHonored"]["message"]
    key = ("HorizontalPodAutoscaler", names.serving_autoscaler("chat"))
    off = serving.reconcile(serving.Observed(**{**_observed({}, []).__dict__, "children": {key: hpa}}))
    assert [str(a) for a in off.actions if a.kind == "HorizontalPodAutoscaler"] == [f"delete {key[0]}/{key[1]}"]


def _training(step: int | None, **spec) -> dict:
    status = {"latestCheckpoint": {"step": step}} if step is not None else {}
    return {"metadata": {"name": "run"}, "spec": {"data": {"path": "corpus", "volume": {"claimName": "pile"}},
                                                   **spec}, "status": status}


def test_from_training_converts_the_checkpoint_and_follow_rolls_out_each_new_one():
    spec = {"model": {"fromTraining": {"name": "run", "follow": True}}, "runtime": {"dtype": "bfloat16"}}
    assert _conditions(serving.reconcile(_observed(spec, [])))["Ready"]["reason"] == "TrainingNotFound"
    waiting = serving.reconcile(_observed(spec, [], training=_training(None)))
    assert _conditions(waiting)["Ready"]["reason"] == "NoCheckpoint" and not waiting.actions

    first = serving.reconcile(_observed(spec, [], training=_training(40)))
    dep = next(a.body for a in first.actions if a.kind == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["command"] == ["neox-convert", "to-hf", "/checkpoints", "/model/hf", "--tag", "global_step40",
                               "--dtype", "bf16"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"checkpoints": names.training_checkpoints("run"), "data": "pile"}
    assert pod["containers"][0]["command"][1:3] == ["--model", "/model/hf"]
    assert dep["metadata"]["annotations"][serving.CHECKPOINT_ANNOTATION] == "step-40"
    assert first.status["revisions"][0]["checkpoint"] == "step-40"

    source40 = serving.Source(names.training_checkpoints("run"), checkpoint_step=40, data_claim="pile")
    serving40 = _deployment(spec, ready=2, source=source40)
    rev40 = serving.revision(OWNER, spec_of(**spec), source40)
    later = serving.reconcile(_observed(spec, [serving40], {"currentRevision": rev40}, _training(80)))
    created = [a.body for a in later.actions if a.verb == "create" and a.kind == "Deployment"]
    assert [d["metadata"]["annotations"][serving.CHECKPOINT_ANNOTATION] for d in created] == ["step-80"]

    pinned = {**spec, "model": {"fromTraining": {"name": "run"}}}  # follow: false keeps step 40
    serving40 = _deployment(pinned, ready=2, source=source40)
    rev40 = serving.revision(OWNER, spec_of(**pinned), source40)
    stays = serving.reconcile(_observed(pinned, [serving40], {"currentRevision": rev40}, _training(80)))
    assert not [a for a in stays.actions if a.kind == "Deployment"]


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
    # Quiet at rest: several resyncs (every 2 s here) of a Ready serving write nothing.
    reconciles, writes = operator.metric("neox_operator_reconciles_total", kind="NeoXServing"), operator.writes()
    wait_for(lambda: operator.metric("neox_operator_reconciles_total", kind="NeoXServing") >= reconciles + 3, 30,
             what="three more reconciles")
    assert operator.writes() == writes

    kube.kubectl("scale", "neoxserving", name, "-n", namespace, "--replicas=3")
    wait_for(lambda: status(kube, namespace, name).get("ready") == "3/3", 60, what="3 ready replicas")
    assert [d["metadata"]["name"] for d in _deployments(kube, namespace, name)] == [
        names.serving_deployment(name, first)]  # scaling is not a new revision

    # Autoscaling: the controller-manager's HPA controller finds the NeoXServing's scale subresource.
    kube.kubectl("patch", "neoxserving", name, "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 5}}}))

    def hpa_condition(type_: str) -> dict:
        hpa = kube.get("hpa", names.serving_autoscaler(name), namespace)
        return next((c for c in hpa.get("status", {}).get("conditions", []) if c["type"] == type_), {})
    assert wait_for(lambda: hpa_condition("AbleToScale").get("status") == "True", 60, what="HPA able to scale")
    kube.kubectl("patch", "neoxserving", name, "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"autoscaling": {"enabled": False}}}))
    wait_for(lambda: kube.kubectl("get", "hpa", name, "-n", namespace, check=False).returncode != 0, 30,
             what="HPA removed with autoscaling off")

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


@pytest.mark.cluster
def test_serving_follows_a_trainings_checkpoints(kube, namespace, operator):
    kube.apply(training("run", nodes=1), namespace)
    kube.apply(manifest("live", model={"fromTraining": {"name": "run", "follow": True}}, replicas=1), namespace)
    wait_for(lambda: condition(kube, namespace, "live", "Ready").get("reason") == "NoCheckpoint", 60,
             what="waiting for a checkpoint")
    assert not _deployments(kube, namespace, "live")

    def report_checkpoint(step: int) -> None:  # what the runtime does after each save
        kube.kubectl("patch", "neoxtraining", "run", "-n", namespace, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": {"latestCheckpoint": {"step": step}}}))

    def serving_step() -> str | None:
        st = status(kube, namespace, "live")
        current = next((r for r in st.get("revisions", []) if r["name"] == st.get("currentRevision")), {})
        return current.get("checkpoint")

    report_checkpoint(10)
    wait_for(lambda: serving_step() == "step-10", 60, what="step 10 served")
    init = _deployments(kube, namespace, "live")[0]["spec"]["template"]["spec"]["initContainers"][0]
    assert "global_step10" in init["command"]
    report_checkpoint(20)
    wait_for(lambda: serving_step() == "step-20", 60, what="step 20 rolled out")
    wait_for(lambda: len(_deployments(kube, namespace, "live")) == 1, 60, what="step 10's revision deleted")


@pytest.mark.cluster
def test_canary_rollout_holds_half_the_replicas_then_completes(kube, namespace, operator):
    name = "canary"
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}, namespace)
    kube.apply(manifest(name, replicas=2, rollout={"strategy": "Canary", "canarySteps": [
        {"weight": 50, "pauseSeconds": 3}, {"weight": 100}]}), namespace)
    wait_for(lambda: status(kube, namespace, name).get("ready") == "2/2", 60, what="2 ready replicas")
    first = status(kube, namespace, name)["currentRevision"]

    kube.kubectl("patch", "neoxserving", name, "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"runtime": {"maxNewTokens": 128}}}))

    def split() -> dict[str, int]:
        return {d["metadata"]["labels"][names.LABEL_REVISION]: d["spec"]["replicas"]
                for d in _deployments(kube, namespace, name)}
    halves = wait_for(lambda: (lambda s: s if len(s) == 2 and sorted(s.values()) == [1, 1] else None)(split()), 60,
                      what="one replica on each revision")
    assert first in halves and condition(kube, namespace, name, "Progressing")["reason"] == "Canary"
    assert status(kube, namespace, name)["canary"]["step"] == 0
    wait_for(lambda: status(kube, namespace, name).get("currentRevision") not in (None, first), 60,
             what="the canary to complete")
    wait_for(lambda: list(split().values()) == [2], 60, what="all replicas on the new revision")
    assert "canary" not in status(kube, namespace, name)
    assert any(e["reason"] == "CanaryStep" for e in events(kube, namespace, "NeoXServing"))
