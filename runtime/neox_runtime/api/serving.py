"""The NeoXServing custom resource: spec and status models (the CRD is generated from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import (
    CONDITIONS_FIELD_EXTRA, DEFAULT_RUNTIME_IMAGE, Condition, Resources, Scheduling,
)
from .schema import CRDModel, Rule

MAX_NAME_LENGTH = 40  # "<name>-<10-char revision>-<pod suffix>" stays a valid hostname


class FromTraining(CRDModel):
    name: str = Field(max_length=253, description="NeoXTraining in the same namespace.")
    checkpoint: str = Field(
        "latest", pattern=r"^(latest|step-[0-9]+)$",
        description="`latest` or `step-N`: which checkpoint of that training to serve.")
    follow: bool = Field(
        False, description="Roll out each new checkpoint the training writes (with `checkpoint: latest`).")

    rules = (Rule(cel="!self.follow || self.checkpoint == 'latest'",
                  message="spec.model.fromTraining.follow needs checkpoint: latest",
                  check=lambda f: not f.follow or f.checkpoint == "latest"),)


class FromVolume(CRDModel):
    claim_name: str = Field(max_length=253, description="PersistentVolumeClaim holding the model.")
    path: str = Field("", description="Directory inside the claim with config.json, safetensors and tokenizer.json.")


class ServedModelSpec(CRDModel):
    from_training: FromTraining | None = Field(None, description="Serve a checkpoint of a NeoXTraining.")
    volume: FromVolume | None = Field(None, description="Serve a Hugging Face format model from a volume.")
    served_name: str | None = Field(
        None, max_length=128, description="Model id clients pass as `model` (default: the resource name).")

    rules = (
        Rule(cel="has(self.fromTraining) != has(self.volume)",
             message="spec.model: set exactly one of fromTraining and volume",
             check=lambda m: (m.from_training is None) != (m.volume is None)),
    )


class ServingRuntime(CRDModel):
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="Where each replica computes: `cuda` requests `tensorParallel` GPUs, `cpu` none.")
    tensor_parallel: int = Field(1, ge=1, le=16, description="Ranks each replica shards the model over (GPUs on cuda).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("bfloat16", description="Weight and activation dtype.")
    max_batch_size: int = Field(64, ge=1, le=4096, description="Sequences decoded together.")
    max_sequence_length: int = Field(2048, ge=16, le=1_048_576, description="Prompt plus generated tokens, per sequence.")
    max_new_tokens: int = Field(512, ge=1, le=1_048_576, description="Cap on max_tokens of a request.")

    rules = (Rule(cel="self.maxNewTokens <= self.maxSequenceLength",
                  message="spec.runtime.maxNewTokens must not exceed maxSequenceLength",
                  check=lambda r: r.max_new_tokens <= r.max_sequence_length),)


class Autoscaling(CRDModel):
    enabled: bool = Field(False, description="Let the operator scale replicas on the runtime's load.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(4, ge=1, le=1000, description="Most replicas.")
    target_running_requests: int = Field(
        16, ge=1, le=100000, description="Requests in flight per replica the operator aims for.")
    scale_down_delay_seconds: int = Field(300, ge=0, le=86400, description="Load must stay low this long before scaling down.")

    rules = (Rule(cel="self.minReplicas <= self.maxReplicas",
                  message="spec.autoscaling.minReplicas must not exceed maxReplicas",
                  check=lambda a: a.min_replicas <= a.max_replicas),)


class CanaryStep(CRDModel):
    """One step of a canary: a traffic weight held for a while, then analysed."""

    weight: int = Field(ge=0, le=100, description="Percent of replicas (so of traffic) on the new revision.")
    pause_seconds: int = Field(60, ge=0, le=86400, description="Time at this weight before analysis and the next step.")


class CanaryAnalysis(CRDModel):
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Highest 5xx ratio of the new revision that passes.")
    max_latency_p99_seconds: float | None = Field(None, gt=0, description="Highest end-to-end p99 that passes.")


class Rollout(CRDModel):
    strategy: Literal["Rolling", "Canary"] = Field("Rolling", description="How a new revision replaces the old.")
    canary_steps: list[CanaryStep] | None = Field(
        None, max_length=20, description="Traffic weights of a canary, increasing.")
    analysis: CanaryAnalysis | None = Field(None, description="Checks a canary step must pass.")

    rules = (
        # Indices 1..19 as a literal list: canarySteps has at most 20 items.
        Rule(cel="!has(self.canarySteps) || "
             f"{list(range(1, 20))}.all(i, i >= size(self.canarySteps) || "
             "self.canarySteps[i - 1].weight < self.canarySteps[i].weight)",
             message="spec.rollout.canarySteps weights must be increasing",
             check=lambda r: r.canary_steps is None or all(
                 a.weight < b.weight for a, b in zip(r.canary_steps, r.canary_steps[1:]))),
        Rule(cel="self.strategy != 'Canary' || has(self.canarySteps)",
             message="spec.rollout.canarySteps is required with strategy Canary",
             check=lambda r: r.strategy != "Canary" or r.canary_steps is not None),
    )


class AuthSpec(CRDModel):
    enabled: bool = Field(True, description="Require an API key (Authorization: Bearer).")
    api_keys_secret: str | None = Field(
        None, max_length=253, description="Secret whose values are the accepted API keys, one per key.")

    rules = (Rule(cel="!self.enabled || has(self.apiKeysSecret)",
                  message="spec.auth.apiKeysSecret is required when auth is enabled",
                  check=lambda a: not a.enabled or a.api_keys_secret is not None),)


class RateLimit(CRDModel):
    requests_per_minute: int | None = Field(None, ge=1, description="Per API key.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt plus generated tokens, per API key.")


class Moderation(CRDModel):
    enabled: bool = Field(False, description="Run moderation hooks before and after generation.")
    blocklist: list[str] | None = Field(None, max_length=10000, description="Words refused in prompts and redacted in outputs.")
    system_prompt: str | None = Field(None, max_length=8192, description="Steering prompt prepended to every chat.")


class Watermark(CRDModel):
    enabled: bool = Field(False, description="Watermark outputs with a secret-keyed green list.")
    secret: str | None = Field(None, max_length=253, description="Secret with the `key` that seeds the green list.")
    gamma: float = Field(0.25, gt=0, lt=1, description="Fraction of the vocabulary that is green.")
    delta: float = Field(2.0, gt=0, le=20, description="Logit bias added to green tokens.")

    rules = (Rule(cel="!self.enabled || has(self.secret)",
                  message="spec.safety.watermark.secret is required when watermarking is enabled",
                  check=lambda w: not w.enabled or w.secret is not None),)


class Safety(CRDModel):
    moderation: Moderation = Field(default_factory=Moderation, description="Moderation hooks.")
    watermark: Watermark = Field(default_factory=Watermark, description="Output watermarking.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Refuse longer prompts with a 400.")


class NeoXServingSpec(CRDModel):
    model: ServedModelSpec = Field(description="What to serve.")
    runtime: ServingRuntime = Field(default_factory=ServingRuntime, description="Inference engine settings.")
    replicas: int = Field(1, ge=0, le=1000, description="Replicas (also set by `kubectl scale` and autoscalers).")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Operator-driven autoscaling.")
    rollout: Rollout = Field(default_factory=Rollout, description="How new revisions are rolled out.")
    auth: AuthSpec = Field(default_factory=lambda: AuthSpec(enabled=False), description="API keys.")
    rate_limit: RateLimit = Field(default_factory=RateLimit, description="Per-key rate limits.")
    safety: Safety = Field(default_factory=Safety, description="Moderation and watermarking.")
    image: str = Field(DEFAULT_RUNTIME_IMAGE, description="Runtime container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Image pull policy.")
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Placement of the pods.")


class Revision(CRDModel):
    """A live revision: one Deployment serving one checkpoint and runtime config."""

    name: str = Field(description="Revision id (hash of what changes the pods).")
    checkpoint: str | None = Field(None, description="Checkpoint it serves.")
    replicas: int = Field(0, description="Replicas of this revision.")
    ready_replicas: int = Field(0, description="Ready replicas of this revision.")
    traffic_percent: int = Field(0, description="Share of traffic, by replica ratio.")


class CanaryStatus(CRDModel):
    """Where a Canary rollout stands (written by the operator, cleared when it completes)."""

    revision: str = Field(description="Revision being rolled out.")
    step: int = Field(0, description="Index of the current step in spec.rollout.canarySteps.")
    step_started_at: str | None = Field(
        None, description="When this step's replicas were all ready and its pause began (RFC 3339).")


class NeoXServingStatus(CRDModel):
    observed_generation: int | None = Field(None, description="The .metadata.generation last reconciled.")
    phase: str | None = Field(None, description="One-word summary for `kubectl get`.")
    conditions: list[Condition] | None = Field(None, description="Current state, in Kubernetes condition form.")
    url: str | None = Field(None, description="In-cluster URL of the OpenAI-compatible API.")
    replicas: int | None = Field(None, description="Pods across revisions (scale subresource).")
    ready_replicas: int | None = Field(None, description="Ready pods across revisions.")
    ready: str | None = Field(None, description="`ready/replicas`, for the printer column.")
    selector: str | None = Field(None, description="Label selector of the pods (scale subresource).")
    current_revision: str | None = Field(None, description="Revision taking all traffic when the rollout is done.")
    revisions: list[Revision] | None = Field(None, description="Live revisions and their traffic.")
    canary: CanaryStatus | None = Field(None, description="The Canary rollout in progress, if any.")

    field_extra = {"conditions": CONDITIONS_FIELD_EXTRA}


KIND = "NeoXServing"
PLURAL = "neoxservings"
SHORT_NAMES = ["nxs"]
