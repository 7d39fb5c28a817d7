"""A dynamic volume provisioner for the local cluster: each claim becomes a directory.

The local control plane has no storage driver, and a pod whose PersistentVolumeClaim
stays unbound is never scheduled. This loop plays an external provisioner for the
default StorageClass `standard`: for each pending claim it creates a hostPath
PersistentVolume pointing at `<root>/<namespace>/<claim>` and pre-bound to the claim
(the controller-manager's PV controller completes the binding); when a claim is
deleted, the released volume and its directory are deleted too (reclaim policy Delete).
The pod runner maps claims to the same directories, so data written by one local pod
is seen by the next, as on a real cluster.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

STORAGE_CLASS = "standard"
PROVISIONER = "neox.dev/local-dir"

STORAGE_CLASS_MANIFEST = {
    "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
    "metadata": {"name": STORAGE_CLASS,
                 "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
}


def claim_dir(root: Path, namespace: str, claim: str) -> Path:
    return root / namespace / claim


def bound_path(kubectl, namespace: str, claim: str) -> Path | None:
    """Directory of the volume bound to a claim, or None while it is unbound.

    `kubectl` is a LocalCluster.kubectl-style callable.
    """
    pvc = json.loads(kubectl("get", "pvc", claim, "-n", namespace, "-o", "json").stdout)
    volume = pvc["spec"].get("volumeName")
    if not volume:
        return None
    return Path(json.loads(kubectl("get", "pv", volume, "-o", "json").stdout)["spec"]["hostPath"]["path"])


def _kubectl(kubectl: str, kubeconfig: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl, "--kubeconfig", kubeconfig, *args], text=True,
                          capture_output=True, input=input)


def _volume(claim: dict, root: Path) -> dict:
    meta, spec = claim["metadata"], claim["spec"]
    path = claim_dir(root, meta["namespace"], meta["name"])
    path.mkdir(parents=True, exist_ok=True)
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}",
                     "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                         "name": meta["name"], "uid": meta["uid"]},
        },
    }


def sync(kubectl: str, kubeconfig: str, root: Path) -> None:
    claims = _kubectl(kubectl, kubeconfig, "get", "pvc", "-A", "-o", "json")
    volumes = _kubectl(kubectl, kubeconfig, "get", "pv", "-o", "json")
    if claims.returncode or volumes.returncode:
        return
    existing = {pv["metadata"]["name"]: pv for pv in json.loads(volumes.stdout)["items"]}
    for claim in json.loads(claims.stdout)["items"]:
        wants_us = (claim["spec"].get("storageClassName") or STORAGE_CLASS) == STORAGE_CLASS
        if wants_us and claim.get("status", {}).get("phase") == "Pending" and not claim["spec"].get("volumeName") \
                and f"pvc-{claim['metadata']['uid']}" not in existing:
            _kubectl(kubectl, kubeconfig, "create", "-f", "-", input=json.dumps(_volume(claim, root)))
    for name, pv in existing.items():
        ours = pv["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
        if ours and pv.get("status", {}).get("phase") in ("Released", "Failed"):
            shutil.rmtree(pv["spec"]["hostPath"]["path"], ignore_errors=True)
            _kubectl(kubectl, kubeconfig, "delete", "pv", name, "--wait=false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    _kubectl(args.kubectl, args.kubeconfig, "apply", "-f", "-", input=json.dumps(STORAGE_CLASS_MANIFEST))
    while True:
        sync(args.kubectl, args.kubeconfig, args.root)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
