"""The NeoXServing controller's rendering and decisions, as pure functions.

A serving is a Service in front of one Deployment per *revision*. A revision is named by
a hash of everything that changes the pods (model, runtime, safety settings, image,
resources, placement), not by the replica count, so `kubectl scale` resizes the current
revision while a spec change starts a new one. Rollout (strategy Rolling): the new
revision's Deployment is created at the full replica count next to the old ones, which
keep serving; once every new replica is ready the old revisions are deleted. The Service
selects every revision, so traffic moves with ready replicas and nothing is dropped.

Not implemented yet, and said so in the `SpecHonored` condition rather than ignored:
autoscaling (replicas follow `spec.replicas`), Canary steps (run as Rolling) and
`model.fromTraining` (refused with `Ready=False`; serve a converted checkpoint from a
volume instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from neox_runtime.api import names
from neox_runtime.api.serving import NeoXServingSpec

from .conditions import FALSE, TRUE, Cond, merge
from .diff import Action, child_actions
from .reconcile import Decision
from .render import API_VERSION, HASH_ANNOTATION, rendered_hash, scheduling_fields

KIND = "NeoXServing"
PORT = 8000
MODEL_MOUNT = "/model"
API_KEYS_MOUNT = "/var/run/secrets/neox/api-keys"
WATERMARK_MOUNT = "/var/run/secrets/neox/watermark"
SAFETY_MOUNT = "/etc/neox/safety"
DRAIN_GRACE_SECONDS = 30
CONDITION_TYPES = ("Ready", "Progressing", "SpecHonored")


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


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
           **body: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": owner.namespace, "labels": labels(owner, component, revision),
                "ownerReferences": [owner.reference()]}
    manifest = {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}
    metadata["annotations"] = {HASH_ANNOTATION: rendered_hash(manifest)}
    return manifest


def safety_config_name(name: str) -> str:
    return f"{name}-safety"


def service(owner: Owner) -> dict[str, Any]:
    return _child("v1", "Service", names.serving_service(owner.name), owner, "api", spec={
        "selector": {names.LABEL_SERVING: owner.name, names.LABEL_COMPONENT: "server"},
        "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
    })


def safety_config(owner: Owner, spec: NeoXServingSpec) -> dict[str, Any] | None:
    """The blocklist as a file: terms may hold any character, so they do not travel as flags."""
    mod = spec.safety.moderation
    if not (mod.enabled and mod.blocklist):
        return None
    return _child("v1", "ConfigMap", safety_config_name(owner.name), owner, "safety",
                  data={"blocklist.txt": "".join(f"{term}\n" for term in mod.blocklist)})


def server_command(owner: Owner, spec: NeoXServingSpec) -> list[str]:
    rt, safety = spec.runtime, spec.safety
    path = spec.model.volume.path.strip("/") if spec.model.volume else ""
    cmd = ["neox-serve", "--model", f"{MODEL_MOUNT}/{path}".rstrip("/"), "--host", "0.0.0.0", "--port", str(PORT),
           "--served-model-name", spec.model.served_name or owner.name, "--device", "cuda",
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


def _volumes(owner: Owner, spec: NeoXServingSpec) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": spec.model.volume.claim_name,
                                                           "readOnly": True}},
               {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}}]
    mounts = [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True},
              {"name": "shm", "mountPath": "/dev/shm"}]
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


def _resources(spec: NeoXServingSpec) -> dict[str, Any]:
    res, gpus = spec.resources, str(spec.runtime.tensor_parallel)
    requests = {k: v for k, v in (("cpu", res.cpu), ("memory", res.memory)) if v}
    return {"requests": {**requests, res.gpu_resource_name: gpus}, "limits": {res.gpu_resource_name: gpus}}


def pod_template(owner: Owner, spec: NeoXServingSpec) -> dict[str, Any]:
    """What the revision hash covers: everything of the pods except the revision label itself."""
    volumes, mounts = _volumes(owner, spec)
    container = {
        "name": "server", "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "command": server_command(owner, spec),
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": _resources(spec), "volumeMounts": mounts,
        # /ready turns 503 while draining; /health fails when tokens stop coming while work is pending.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 6, "initialDelaySeconds": 30},
    }
    safety = safety_config(owner, spec)
    annotations = {f"{names.GROUP}/safety-config": rendered_hash(safety)} if safety else {}
    return {"metadata": {"labels": labels(owner, "server"), "annotations": annotations},
            "spec": {"containers": [container], "volumes": volumes,
                     "terminationGracePeriodSeconds": DRAIN_GRACE_SECONDS + 15, **scheduling_fields(spec)}}


def revision(owner: Owner, spec: NeoXServingSpec) -> str:
    return names.revision_hash(json.dumps(pod_template(owner, spec), sort_keys=True))


def deployment(owner: Owner, spec: NeoXServingSpec, rev: str, replicas: int) -> dict[str, Any]:
    template = pod_template(owner, spec)
    template["metadata"]["labels"][names.LABEL_REVISION] = rev
    return _child("apps/v1", "Deployment", names.serving_deployment(owner.name, rev), owner, "server", rev, spec={
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
    if spec.autoscaling.enabled:
        notes.append("autoscaling is not implemented yet: replicas follow spec.replicas")
    if spec.rollout.strategy == "Canary":
        notes.append("Canary rollouts are not implemented yet: new revisions roll out as Rolling")
    return notes


def reconcile(obs: Observed) -> Decision:
    meta = obs.body["metadata"]
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    generation = meta.get("generation")
    old_status = obs.body.get("status") or {}
    decision = Decision()

    def finish(conds: list[Cond], phase: str, **fields: Any) -> Decision:
        decision.status = {"observedGeneration": generation, "phase": phase,
                           "conditions": merge(old_status.get("conditions"), conds, obs.now, generation), **fields}
        return decision

    try:
        spec = NeoXServingSpec.model_validate(obs.body.get("spec") or {})
    except ValidationError as error:  # the API server validates too; this catches what only Python checks
        return finish([Cond("Ready", FALSE, "InvalidSpec", str(error)[:1024])], "Failed")
    if spec.model.volume is None:
        return finish([Cond("Ready", FALSE, "NotImplemented",
                            "model.fromTraining is not implemented yet: convert the checkpoint with neox-convert "
                            "and serve it with model.volume")], "Failed")

    desired = [m for m in (service(owner), safety_config(owner, spec)) if m is not None]
    decision.actions += child_actions(desired, obs.children)
    stale_config = ("ConfigMap", safety_config_name(owner.name))
    if safety_config(owner, spec) is None and stale_config in obs.children:
        decision.actions.append(Action("delete", *stale_config))

    want, rev = spec.replicas, revision(owner, spec)
    current = next((d for d in obs.deployments if _revision_of(d) == rev), None)
    older = [d for d in obs.deployments if _revision_of(d) != rev and not d["metadata"].get("deletionTimestamp")]
    decision.actions += child_actions([deployment(owner, spec, rev, want)], {} if current is None else {
        ("Deployment", current["metadata"]["name"]): current})
    done = current is not None and _rolled_out(current, want)
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
    progressing = Cond("Progressing", FALSE, "Complete", f"revision {rev} rolled out") if done else \
        Cond("Progressing", TRUE, "RollingOut", f"revision {rev}: {_ready(current) if current else 0}/{want} ready")
    notes = _unhonored(spec)
    honored = Cond("SpecHonored", FALSE, "NotImplemented", "; ".join(notes)) if notes else \
        Cond("SpecHonored", TRUE, "AllHonored", "")
    phase = "Ready" if done and want else ("ScaledToZero" if done else "Progressing")
    replicas = sum(_replicas(d) for d in live)
    return finish([ready, progressing, honored], phase, url=url(owner), replicas=replicas,
                  readyReplicas=ready_total, ready=f"{ready_total}/{want}", selector=selector(owner.name),
                  currentRevision=serving_revision, revisions=revisions)
