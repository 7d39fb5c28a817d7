"""The NeoXServing controller's rendering and decisions, as pure functions.

A serving is a Service in front of one Deployment per *revision*. A revision is named by
a hash of everything that changes the pods (model, runtime, safety settings, image,
resources, placement), not by the replica count, so `kubectl scale` resizes the current
revision while a spec change starts a new one. Rollout (strategy Rolling): the new
revision's Deployment is created at the full replica count next to the old ones, which
keep serving; once every new replica is ready the old revisions are deleted. The Service
selects every revision, so traffic moves with ready replicas and nothing is dropped.

The model comes from a claim holding a Hugging Face directory (`model.volume`), or from a
NeoXTraining's checkpoint (`model.fromTraining`): an init container converts that
checkpoint (`neox-convert`) into the pod's own scratch volume, reading the tokenizer
where the training left it. The checkpoint's step is part of the revision, so with
`follow: true` each new checkpoint the training reports rolls out like any other change;
without it the step first served stays pinned across spec changes.

Autoscaling is Kubernetes' own: with `autoscaling.enabled` the operator renders a
HorizontalPodAutoscaler whose target is the NeoXServing's scale subresource and whose
metric is the servers' `vllm:num_requests_running` per pod (served to the HPA by a
metrics adapter as `vllm_num_requests_running`); the HPA sets `spec.replicas`, and the
current revision follows it like any `kubectl scale`.

Rollout strategy Canary moves replicas, and so traffic, in steps: at each step's weight
the new revision gets that share of the replicas (at least one) and the previous revision
the rest; once the step's new replicas are all ready its pause starts, and when the pause
is over the next step begins (state in `status.canary`). Reverting the spec mid-canary
makes the previous revision current again, which ends the canary.

Not implemented yet, and said so in the `SpecHonored` condition rather than ignored:
canary analysis (steps advance after their pause without checking error rate or latency)
and scaling to zero (the HPA keeps at least one replica).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from neox_runtime.api import contract, names
from neox_runtime.api.serving import MAX_NAME_LENGTH, NeoXServingSpec

from .conditions import FALSE, TRUE, Cond, merge, parse_time, rfc3339
from .diff import Action, child_actions
from .reconcile import Decision
from .render import API_VERSION, HASH_ANNOTATION, Owner, pod_resources, rendered_hash, scheduling_fields

KIND = "NeoXServing"
PORT = 8000
MODEL_MOUNT = "/model"
API_KEYS_MOUNT = "/var/run/secrets/neox/api-keys"
WATERMARK_MOUNT = "/var/run/secrets/neox/watermark"
SAFETY_MOUNT = "/etc/neox/safety"
CHECKPOINT_ANNOTATION = f"{names.GROUP}/checkpoint"  # on a revision's Deployment: the step it serves
CONVERT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # neox-convert --dtype
DRAIN_GRACE_SECONDS = 30
LOAD_METRIC = "vllm_num_requests_running"  # the HPA's name for the servers' vllm:num_requests_running


@dataclass(frozen=True)
class Source:
    """Where the pods get the model: a Hugging Face directory on a claim, or a training's checkpoint."""

    claim: str  # the model's claim, or the training's checkpoint claim
    path: str = ""  # model.volume: the directory inside the claim
    checkpoint_step: int | None = None  # model.fromTraining: the step converted at pod start
    data_claim: str | None = None  # model.fromTraining: the training's data volume (its tokenizer)

    @property
    def model_dir(self) -> str:
        if self.checkpoint_step is not None:
            return f"{MODEL_MOUNT}/hf"
        return f"{MODEL_MOUNT}/{self.path.strip('/')}".rstrip("/")


def labels(owner: Owner, component: str, revision: str | None = None) -> dict[str, str]:
    out = {names.LABEL_NAME: "neox-serving", names.LABEL_INSTANCE: owner.name, names.LABEL_COMPONENT: component,
           names.LABEL_MANAGED_BY: names.MANAGER, names.LABEL_SERVING: owner.name}
    if revision:
        out[names.LABEL_REVISION] = revision
    return out


def selector(name: str) -> str:
    """Label selector of every pod of the serving (the scale subresource's `status.selector`)."""
    return f"{names.LABEL_SERVING}={name},{names.LABEL_COMPONENT}=server"


def url(owner: Owner) -> str:
    return f"http://{names.serving_service(owner.name)}.{owner.namespace}.svc:{PORT}/v1"


def _child(api_version: str, kind: str, name: str, owner: Owner, component: str, revision: str | None = None,
           annotations: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": owner.namespace, "labels": labels(owner, component, revision),
                "ownerReferences": [owner.reference()]}
    manifest = {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}
    metadata["annotations"] = {**(annotations or {}), HASH_ANNOTATION: rendered_hash(manifest)}
    return manifest


def safety_config_name(name: str) -> str:
    return f"{name}-safety"


def service(owner: Owner) -> dict[str, Any]:
    return _child("v1", "Service", names.serving_service(owner.name), owner, "api", spec={
        "selector": {names.LABEL_SERVING: owner.name, names.LABEL_COMPONENT: "server"},
        "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
    })


def autoscaler(owner: Owner, spec: NeoXServingSpec) -> dict[str, Any] | None:
    """An HPA on the NeoXServing itself (its scale subresource), so scaling survives new revisions."""
    auto = spec.autoscaling
    if not auto.enabled:
        return None
    name = names.serving_autoscaler(owner.name)
    return _child("autoscaling/v2", "HorizontalPodAutoscaler", name, owner, "autoscaler", spec={
        "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name},
        "minReplicas": max(auto.min_replicas, 1), "maxReplicas": auto.max_replicas,
        "metrics": [{"type": "Pods", "pods": {
            "metric": {"name": LOAD_METRIC},
            "target": {"type": "AverageValue", "averageValue": str(auto.target_running_requests)}}}],
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": auto.scale_down_delay_seconds}},
    })


def safety_config(owner: Owner, spec: NeoXServingSpec) -> dict[str, Any] | None:
    """The blocklist as a file: terms may hold any character, so they do not travel as flags."""
    mod = spec.safety.moderation
    if not (mod.enabled and mod.blocklist):
        return None
    return _child("v1", "ConfigMap", safety_config_name(owner.name), owner, "safety",
                  data={"blocklist.txt": "".join(f"{term}\n" for term in mod.blocklist)})


def server_command(owner: Owner, spec: NeoXServingSpec, source: Source) -> list[str]:
    rt, safety = spec.runtime, spec.safety
    cmd = ["neox-serve", "--model", source.model_dir, "--host", "0.0.0.0", "--port", str(PORT),
           "--served-model-name", spec.model.served_name or owner.name, "--device", rt.device,
           "--tensor-parallel", str(rt.tensor_parallel), "--dtype", rt.dtype,
           "--max-num-seqs", str(rt.max_batch_size), "--max-model-len", str(rt.max_sequence_length),
           "--max-tokens-cap", str(rt.max_new_tokens), "--drain-grace-seconds", str(DRAIN_GRACE_SECONDS),
           "--log-level", "info"]
    if safety.max_prompt_tokens:
        cmd += ["--max-prompt-tokens", str(safety.max_prompt_tokens)]
    if spec.auth.enabled:
        cmd += ["--api-keys-file", API_KEYS_MOUNT]
    if spec.rate_limit.requests_per_minute:
        cmd += ["--requests-per-minute", str(spec.rate_limit.requests_per_minute)]
    if spec.rate_limit.tokens_per_minute:
        cmd += ["--tokens-per-minute", str(spec.rate_limit.tokens_per_minute)]
    if safety.moderation.enabled and safety.moderation.blocklist:
        cmd += ["--blocklist-file", f"{SAFETY_MOUNT}/blocklist.txt"]
    if safety.moderation.enabled and safety.moderation.system_prompt:
        cmd += ["--system-prompt", safety.moderation.system_prompt]
    if safety.watermark.enabled:
        cmd += ["--watermark-key-file", f"{WATERMARK_MOUNT}/key", "--watermark-gamma", str(safety.watermark.gamma),
                "--watermark-delta", str(safety.watermark.delta)]
    return cmd


def _source_volumes(source: Source) -> tuple[list[dict], list[dict]]:
    """The model's volumes, and the mounts of whichever container reads the model's source."""
    if source.checkpoint_step is None:
        return ([{"name": "model", "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}}],
                [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}])
    # Mounted where the training's pods had them, so the paths its config recorded resolve.
    volumes = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}},
               {"name": "model", "emptyDir": {}}]
    mounts = [{"name": "checkpoints", "mountPath": contract.CHECKPOINT_MOUNT, "readOnly": True},
              {"name": "model", "mountPath": MODEL_MOUNT}]
    if source.data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": source.data_claim, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": contract.DATA_MOUNT, "readOnly": True})
    return volumes, mounts


def _volumes(owner: Owner, spec: NeoXServingSpec, source: Source) -> tuple[list[dict], list[dict]]:
    volumes, mounts = _source_volumes(source)
    if source.checkpoint_step is not None:  # the server reads only the converted directory
        mounts = [m for m in mounts if m["name"] == "model"]
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}})
    mounts.append({"name": "shm", "mountPath": contract.SHM_MOUNT})
    if spec.auth.enabled:
        volumes.append({"name": "api-keys", "secret": {"secretName": spec.auth.api_keys_secret}})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    if spec.safety.watermark.enabled:
        volumes.append({"name": "watermark", "secret": {"secretName": spec.safety.watermark.secret}})
        mounts.append({"name": "watermark", "mountPath": WATERMARK_MOUNT, "readOnly": True})
    if safety_config(owner, spec) is not None:
        volumes.append({"name": "safety", "configMap": {"name": safety_config_name(owner.name)}})
        mounts.append({"name": "safety", "mountPath": SAFETY_MOUNT, "readOnly": True})
    return volumes, mounts


def pod_template(owner: Owner, spec: NeoXServingSpec, source: Source) -> dict[str, Any]:
    """What the revision hash covers: everything of the pods except the revision label itself."""
    volumes, mounts = _volumes(owner, spec, source)
    gpus = spec.runtime.tensor_parallel if spec.runtime.device == "cuda" else 0
    container = {
        "name": "server", "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "command": server_command(owner, spec, source),
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": pod_resources(spec.resources, gpus), "volumeMounts": mounts,
        # /ready turns 503 while draining; /health fails when tokens stop coming while work is pending.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 6, "initialDelaySeconds": 30},
    }
    safety = safety_config(owner, spec)
    annotations = {f"{names.GROUP}/safety-config": rendered_hash(safety)} if safety else {}
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes,
                           "terminationGracePeriodSeconds": DRAIN_GRACE_SECONDS + 15, **scheduling_fields(spec)}
    if source.checkpoint_step is not None:
        pod["initContainers"] = [{
            "name": "convert", "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
            "command": ["neox-convert", "to-hf", contract.CHECKPOINT_MOUNT, source.model_dir,
                        "--tag", contract.checkpoint_tag(source.checkpoint_step),
                        "--dtype", CONVERT_DTYPES[spec.runtime.dtype]],
            "volumeMounts": _source_volumes(source)[1],
        }]
    return {"metadata": {"labels": labels(owner, "server"), "annotations": annotations}, "spec": pod}


def revision(owner: Owner, spec: NeoXServingSpec, source: Source) -> str:
    return names.revision_hash(json.dumps(pod_template(owner, spec, source), sort_keys=True))


def deployment(owner: Owner, spec: NeoXServingSpec, source: Source, rev: str, replicas: int) -> dict[str, Any]:
    template = pod_template(owner, spec, source)
    template["metadata"]["labels"][names.LABEL_REVISION] = rev
    step = source.checkpoint_step
    return _child("apps/v1", "Deployment", names.serving_deployment(owner.name, rev), owner, "server", rev,
                  annotations=None if step is None else {CHECKPOINT_ANNOTATION: f"step-{step}"}, spec={
        "replicas": replicas,
        "selector": {"matchLabels": {names.LABEL_SERVING: owner.name, names.LABEL_REVISION: rev}},
        # Within a revision pods differ by nothing; surge so a deleted pod is replaced before it goes.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": template,
    })


# ---------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Observed:
    body: dict[str, Any]  # the NeoXServing
    children: dict[tuple[str, str], dict[str, Any]]  # Service and ConfigMap found, by (kind, name)
    deployments: list[dict[str, Any]]  # every Deployment labelled as this serving's
    now: datetime
    training: dict[str, Any] | None = None  # the NeoXTraining of model.fromTraining, when it exists


def _checkpoint_of(dep: dict[str, Any]) -> int | None:
    value = (dep["metadata"].get("annotations") or {}).get(CHECKPOINT_ANNOTATION, "")
    return int(value.removeprefix("step-")) if value.startswith("step-") else None


def resolve_source(spec: NeoXServingSpec, obs: Observed) -> Source | Cond:
    """The model source, or why there is none yet (a Ready=False condition)."""
    if spec.model.volume is not None:
        return Source(spec.model.volume.claim_name, spec.model.volume.path)
    ft = spec.model.from_training
    if obs.training is None:
        return Cond("Ready", FALSE, "TrainingNotFound", f"NeoXTraining {ft.name} does not exist in this namespace")
    training_spec = obs.training.get("spec") or {}
    latest = ((obs.training.get("status") or {}).get("latestCheckpoint") or {}).get("step")
    if ft.checkpoint.startswith("step-"):
        step = int(ft.checkpoint.removeprefix("step-"))
    else:
        # Not following: keep serving the step the current revision serves (the latest when it began).
        current = (obs.body.get("status") or {}).get("currentRevision")
        pinned = next((_checkpoint_of(d) for d in obs.deployments if _revision_of(d) == current), None)
        step = latest if ft.follow or pinned is None else pinned
    if step is None:
        return Cond("Ready", FALSE, "NoCheckpoint", f"waiting for NeoXTraining {ft.name} to report a checkpoint")
    claim = (training_spec.get("checkpoint") or {}).get("existingClaim") or names.training_checkpoints(ft.name)
    data_claim = ((training_spec.get("data") or {}).get("volume") or {}).get("claimName")
    return Source(claim, checkpoint_step=int(step), data_claim=data_claim)


def _revision_of(dep: dict[str, Any]) -> str:
    return dep["metadata"].get("labels", {}).get(names.LABEL_REVISION, "")


def _ready(dep: dict[str, Any]) -> int:
    return int((dep.get("status") or {}).get("readyReplicas") or 0)


def _replicas(dep: dict[str, Any]) -> int:
    return int((dep.get("status") or {}).get("replicas") or 0)


def _rolled_out(dep: dict[str, Any], want: int) -> bool:
    """The Deployment controller has seen its latest spec and every wanted replica is ready."""
    st = dep.get("status") or {}
    return st.get("observedGeneration", 0) >= dep["metadata"].get("generation", 1) and _ready(dep) >= want \
        and int(st.get("updatedReplicas") or 0) >= want


def _unhonored(spec: NeoXServingSpec) -> list[str]:
    notes = []
    if spec.autoscaling.enabled and spec.autoscaling.min_replicas == 0:
        notes.append("scaling to zero is not implemented yet: the autoscaler keeps at least 1 replica")
    if spec.rollout.strategy == "Canary" and spec.rollout.analysis is not None:
        notes.append("canary analysis is not implemented yet: steps advance after their pause without checking "
                     "error rate or latency")
    return notes


@dataclass(frozen=True)
class CanaryPlan:
    replicas: int  # of the new revision at this step
    state: dict[str, Any] | None  # status.canary to write; None once every step is done
    wait: float | None = None  # seconds left in this step's pause
    advanced_to: int | None = None  # weight of the step just entered, for the event


def _step_replicas(weight: int, want: int) -> int:
    return want if weight >= 100 else min(want, max(1, math.ceil(want * weight / 100)))


def plan_canary(spec: NeoXServingSpec, rev: str, current: dict[str, Any] | None, previous: dict | None,
                now: datetime, want: int) -> CanaryPlan:
    """The new revision's replica count at this point of a Canary rollout, and the state to record."""
    steps = spec.rollout.canary_steps or []
    state = dict(previous) if previous and previous.get("revision") == rev else {"revision": rev, "step": 0}
    index = state["step"]
    if index >= len(steps):
        return CanaryPlan(want, None)
    replicas = _step_replicas(steps[index].weight, want)
    if current is None or not _rolled_out(current, replicas):
        return CanaryPlan(replicas, {**state, "stepStartedAt": None})
    started = parse_time(state.get("stepStartedAt")) or now
    state["stepStartedAt"] = rfc3339(started)
    left = steps[index].pause_seconds - (now - started).total_seconds()
    if left > 0 and replicas < want:
        return CanaryPlan(replicas, state, wait=left)
    if index + 1 >= len(steps) or replicas >= want:
        return CanaryPlan(want, None)
    nxt = steps[index + 1].weight
    return CanaryPlan(_step_replicas(nxt, want), {"revision": rev, "step": index + 1, "stepStartedAt": None},
                      advanced_to=nxt)


def reconcile(obs: Observed) -> Decision:
    meta = obs.body["metadata"]
    owner = Owner(meta["name"], meta["namespace"], meta["uid"], KIND)
    generation = meta.get("generation")
    old_status = obs.body.get("status") or {}
    decision = Decision()

    def finish(conds: list[Cond], phase: str, **fields: Any) -> Decision:
        decision.status = {"observedGeneration": generation, "phase": phase,
                           "conditions": merge(old_status.get("conditions"), conds, obs.now, generation), **fields}
        return decision

    name_problems = names.name_problems(owner.name, MAX_NAME_LENGTH)  # stored before the CRD refused it
    if name_problems:
        return finish([Cond("Ready", FALSE, "InvalidName", "; ".join(name_problems))], "Failed")
    try:
        spec = NeoXServingSpec.model_validate(obs.body.get("spec") or {})
    except ValidationError as error:  # the API server validates too; this catches what only Python checks
        return finish([Cond("Ready", FALSE, "InvalidSpec", str(error)[:1024])], "Failed")
    source = resolve_source(spec, obs)
    if isinstance(source, Cond):  # nothing to run yet; revisions already running are left as they are
        return finish([source], "Pending", url=url(owner), selector=selector(owner.name))

    optional = {("ConfigMap", safety_config_name(owner.name)): safety_config(owner, spec),
                ("HorizontalPodAutoscaler", names.serving_autoscaler(owner.name)): autoscaler(owner, spec)}
    desired = [service(owner)] + [m for m in optional.values() if m is not None]
    decision.actions += child_actions(desired, obs.children)
    decision.actions += [Action("delete", *key) for key, m in optional.items() if m is None and key in obs.children]

    want, rev = spec.replicas, revision(owner, spec, source)
    current = next((d for d in obs.deployments if _revision_of(d) == rev), None)
    older = [d for d in obs.deployments if _revision_of(d) != rev and not d["metadata"].get("deletionTimestamp")]
    canary = plan_canary(spec, rev, current, old_status.get("canary"), obs.now, want) \
        if spec.rollout.strategy == "Canary" and older and want > 0 else CanaryPlan(want, None)
    decision.actions += child_actions([deployment(owner, spec, source, rev, canary.replicas)],
                                      {} if current is None else {("Deployment", current["metadata"]["name"]): current})
    if canary.state is not None:  # the previous revision keeps the replicas the canary does not have
        previous = old_status.get("currentRevision")
        keeper = next((d for d in older if _revision_of(d) == previous), older[0])
        for dep in older:
            keep = want - canary.replicas if dep is keeper else 0
            if (dep.get("spec") or {}).get("replicas") != keep:
                decision.actions.append(Action("patch", "Deployment", dep["metadata"]["name"],
                                               {"spec": {"replicas": keep}}))
        decision.requeue_after = canary.wait
    if canary.advanced_to is not None:
        decision.events.append(("Normal", "CanaryStep", f"Revision {rev} moves to {canary.advanced_to}% of replicas"))
    done = current is not None and canary.replicas == want and _rolled_out(current, want)
    if done:
        for dep in older:
            decision.actions.append(Action("delete", "Deployment", dep["metadata"]["name"]))
        if older:
            decision.events.append(("Normal", "RolledOut", f"Revision {rev} serves all traffic; deleted "
                                    f"{', '.join(_revision_of(d) for d in older)}"))
    elif current is None and not older:
        decision.events.append(("Normal", "Created", f"Revision {rev} with {want} replicas"))
    elif current is None:
        decision.events.append(("Normal", "RollingOut", f"Revision {rev} started next to "
                                f"{', '.join(_revision_of(d) for d in older)}"))

    live = ([current] if current is not None else []) + ([] if done else older)
    ready_total = sum(_ready(d) for d in live)
    revisions = [{"name": _revision_of(d), "replicas": _replicas(d), "readyReplicas": _ready(d),
                  "trafficPercent": round(100 * _ready(d) / ready_total) if ready_total else 0} for d in live]
    if current is None:
        revisions.insert(0, {"name": rev, "replicas": 0, "readyReplicas": 0, "trafficPercent": 0})
    steps = {_revision_of(d): _checkpoint_of(d) for d in live} | {rev: source.checkpoint_step}
    for entry in revisions:
        if steps.get(entry["name"]) is not None:
            entry["checkpoint"] = f"step-{steps[entry['name']]}"
    previous = old_status.get("currentRevision")
    serving_revision = rev if done else (previous if any(_revision_of(d) == previous for d in older) else None)

    if want == 0:
        ready = Cond("Ready", TRUE if done else FALSE, "ScaledToZero", "spec.replicas is 0")
    elif done:
        ready = Cond("Ready", TRUE, "Available", f"{_ready(current)}/{want} replicas of revision {rev} ready")
    elif ready_total:
        ready = Cond("Ready", TRUE, "RollingOut", f"{ready_total} ready replicas serve while revision {rev} "
                     "starts")
    else:
        ready = Cond("Ready", FALSE, "NoReadyReplicas", f"waiting for revision {rev}: "
                     f"{_ready(current) if current else 0}/{want} replicas ready")
    if done:
        progressing = Cond("Progressing", FALSE, "Complete", f"revision {rev} rolled out")
    elif canary.state is not None:
        weight = (spec.rollout.canary_steps or [])[canary.state["step"]].weight
        progressing = Cond("Progressing", TRUE, "Canary", f"revision {rev} at step {canary.state['step'] + 1} "
                           f"({weight}%): {_ready(current) if current else 0}/{canary.replicas} replicas ready")
    else:
        progressing = Cond("Progressing", TRUE, "RollingOut",
                           f"revision {rev}: {_ready(current) if current else 0}/{want} ready")
    notes = _unhonored(spec)
    honored = Cond("SpecHonored", FALSE, "NotImplemented", "; ".join(notes)) if notes else \
        Cond("SpecHonored", TRUE, "AllHonored", "")
    phase = "Ready" if done and want else ("ScaledToZero" if done else "Progressing")
    replicas = sum(_replicas(d) for d in live)
    return finish([ready, progressing, honored], phase, url=url(owner), replicas=replicas,
                  readyReplicas=ready_total, ready=f"{ready_total}/{want}", selector=selector(owner.name),
                  currentRevision=serving_revision, revisions=revisions, canary=canary.state)
