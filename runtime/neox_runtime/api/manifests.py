"""Validate whole NeoXTraining / NeoXServing manifests the way the API server does.

The spec models carry the field rules; this adds what lives outside `spec` (the name
length the CRDs cap so that child names fit), so that local tools refuse exactly what
`kubectl apply` refuses.
"""

from __future__ import annotations

from typing import Any

from . import serving, training

KINDS = {
    training.KIND: (training.NeoXTrainingSpec, training.MAX_NAME_LENGTH),
    serving.KIND: (serving.NeoXServingSpec, serving.MAX_NAME_LENGTH),
}


def validate_manifest(document: dict[str, Any]):
    """Return the parsed spec of a NeoXTraining or NeoXServing manifest; ValueError if invalid."""
    kind = document.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    spec_model, max_name = KINDS[kind]
    name = (document.get("metadata") or {}).get("name", "")
    if len(name) > max_name:
        raise ValueError(f"metadata.name must be at most {max_name} characters, "
                         "so that every child name fits in 63")
    if "spec" not in document:
        raise ValueError("spec: Required value")
    return spec_model.model_validate(document["spec"])
