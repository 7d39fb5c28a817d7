"""Progress into the NeoXTraining's status, written by the runtime itself.

The pod's ServiceAccount may only get/patch its own NeoXTraining's status (the operator
renders that Role), so this reporter merge-patches `status.progress` and
`status.latestCheckpoint` under its own field manager; the operator patches only its
own status keys, so the two writers never clobber each other. It never raises into
training: a failed report is logged (once per error kind) and the next one is tried.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Any

from neox_runtime.api import contract, names

log = logging.getLogger(__name__)
PLURAL = "neoxtrainings"
VERSION = "v1alpha1"


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(value: float | None, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def status_patch(progress: Any, now: datetime | None = None) -> dict[str, Any]:
    """The merge patch for one report (pure); None fields are left out, never cleared."""
    now = now or datetime.now(timezone.utc)
    step, total = progress.step, progress.total_steps
    fields = {
        "step": step, "totalSteps": total, "tokens": progress.tokens,
        "loss": _fmt(progress.loss, ".4f"), "validationLoss": _fmt(getattr(progress, "val_loss", None), ".4f"),
        "learningRate": _fmt(progress.lr, ".3e"), "tokensPerSecond": _fmt(progress.tokens_per_sec, ".1f"),
        "mfu": _fmt(progress.mfu, ".3f"),
        "etaSeconds": None if progress.eta_seconds is None else int(progress.eta_seconds),
        "updatedAt": _rfc3339(now), "stepDisplay": f"{step}/{total}",
    }
    status: dict[str, Any] = {"progress": {k: v for k, v in fields.items() if v is not None}}
    checkpoint_step = getattr(progress, "latest_checkpoint_step", None)
    if checkpoint_step is not None:
        checkpoint_time = getattr(progress, "latest_checkpoint_time", None)
        status["latestCheckpoint"] = {
            "step": checkpoint_step, "path": f"{contract.CHECKPOINT_MOUNT}/{contract.checkpoint_tag(checkpoint_step)}",
            **({"time": _rfc3339(datetime.fromtimestamp(checkpoint_time, timezone.utc))}
               if checkpoint_time is not None else {}),
        }
    return {"status": status}


def _api(kubeconfig: str | None = None) -> Any:
    import kubernetes
    try:
        if kubeconfig is None:
            kubernetes.config.load_incluster_config()
            return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient())
        raise kubernetes.config.ConfigException("explicit kubeconfig")
    except kubernetes.config.ConfigException:
        client = kubernetes.config.new_client_from_config(kubeconfig or os.environ.get("KUBECONFIG"))
        return kubernetes.client.CustomObjectsApi(client)


class KubernetesReporter:
    """`report(progress)` patches status.progress / status.latestCheckpoint of one NeoXTraining."""

    def __init__(self, name: str | None = None, namespace: str | None = None,
                 kubeconfig: str | None = None, api: Any = None):
        self.name = name or os.environ[contract.ENV_TRAINING_NAME]
        self.namespace = namespace or os.environ[contract.ENV_NAMESPACE]
        self._kubeconfig = kubeconfig
        self._api = api
        self._logged: set[str] = set()

    @classmethod
    def from_env(cls) -> "KubernetesReporter | None":
        if os.environ.get(contract.ENV_PROGRESS, "kubernetes") != "kubernetes":
            return None
        if contract.ENV_TRAINING_NAME not in os.environ or contract.ENV_NAMESPACE not in os.environ:
            return None
        return cls()

    def report(self, progress: Any) -> bool:
        """True when the status was patched; never raises."""
        try:
            if self._api is None:
                self._api = _api(self._kubeconfig)
            self._api.patch_namespaced_custom_object_status(
                names.GROUP, VERSION, self.namespace, PLURAL, self.name, status_patch(progress),
                field_manager=contract.RUNTIME_FIELD_MANAGER, _content_type="application/merge-patch+json")
            return True
        except Exception as error:  # noqa: BLE001 - a status sink must never stop training
            kind = f"{type(error).__name__}:{getattr(error, 'status', '')}"
            if kind not in self._logged:
                self._logged.add(kind)
                log.warning("Progress report to the NeoXTraining status failed",
                            extra={"training": self.name, "namespace": self.namespace, "error": str(error)[:300]})
            return False
