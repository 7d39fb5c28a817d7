"""Operator benchmark against the local control plane (not a timed test).

    . ~/.cache/neox/venv/bin/activate && eval $(hack/cluster env)
    python -m tests.bench.bench_operator --count 100 --big 1000 --idle 60

1. `count` NeoXTrainings (1 node, gpusPerNode 0: the 3 kwok nodes cannot hold 100 GPU
   gangs) applied at once: seconds from the apply until each training's 7 children exist
   (Service, ConfigMap, PVC, ServiceAccount, Role, RoleBinding, Job), write requests per
   training (the operator's own counter: creates, status patches, Events) until the
   children exist and until the training is Running (its pod placed by kwok), operator RSS.
2. `idle` seconds once all are Running (two periodic resyncs at 30 s): writes (goal 0).
3. Up to `big` trainings (the extra ones suspended, so no pods) and the operator's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))

from localcluster.cluster import DEFAULT_STATE_DIR, LocalCluster  # noqa: E402

from neox_runtime.api import names  # noqa: E402
from tests.cluster.kube import Kube, wait_for  # noqa: E402
from tests.operator.helpers import OperatorProcess, training  # noqa: E402

CHILD_KINDS = ["Service", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "Job"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children_by_training(kube: Kube, namespace: str) -> dict[str, set[str]]:
    out = kube.kubectl("get", "services,configmaps,pvc,serviceaccounts,roles,rolebindings,jobs", "-n", namespace,
                       "-l", names.LABEL_TRAINING, "-o", "json").stdout
    found: dict[str, set[str]] = {}
    for item in json.loads(out)["items"]:
        found.setdefault(item["metadata"]["labels"][names.LABEL_TRAINING], set()).add(item["kind"])
    return found


def apply_many(kube: Kube, namespace: str, names_: list[str], **spec) -> None:
    for start in range(0, len(names_), 200):
        items = [training(n, nodes=1, gpus=0, **spec) for n in names_[start:start + 200]]
        kube.apply({"apiVersion": "v1", "kind": "List", "items": items}, namespace)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--big", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60)
    args = parser.parse_args()
    cluster = LocalCluster(state_dir=Path(os.environ.get("NEOX_CLUSTER_DIR", DEFAULT_STATE_DIR)))
    kube = Kube(cluster)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", namespace)
    op = OperatorProcess(cluster.kubeconfig, [namespace], resync=30)
    op.start()
    results: dict[str, object] = {}
    try:
        time.sleep(1)
        writes0 = op.writes()
        wanted = [f"b{i:04d}" for i in range(args.count)]
        started, wall_started = time.monotonic(), time.time()
        apply_many(kube, namespace, wanted)
        applied = time.monotonic() - started
        done: dict[str, float] = {}
        while len(done) < len(wanted) and time.monotonic() - started < 300:
            found = children_by_training(kube, namespace)
            now = time.monotonic() - started
            for name in wanted:
                if name not in done and found.get(name, set()) >= set(CHILD_KINDS):
                    done[name] = now
            time.sleep(0.25)
        latencies = list(done.values())
        created = {i["metadata"]["name"]: i["metadata"]["creationTimestamp"] for i in json.loads(
            kube.kubectl("get", "nxt", "-n", namespace, "-o", "json").stdout)["items"]}
        from_create = [wall_started + t - datetime.fromisoformat(created[n].replace("Z", "+00:00")).timestamp()
                       for n, t in done.items()]
        results.update(from_create_p50=round(statistics.median(from_create), 2),
                       from_create_p99=round(percentile(from_create, 0.99), 2),
                       from_create_max=round(max(from_create), 2))
        time.sleep(5)  # let status writes and Events of the last ones land
        writes = op.writes() - writes0
        results.update(count=args.count, apply_seconds=round(applied, 2), complete=len(done),
                       p50=round(statistics.median(latencies), 2), p99=round(percentile(latencies, 0.99), 2),
                       max=round(max(latencies), 2), writes_per_training=round(writes / args.count, 2),
                       rss_mib_at_count=round(rss_mib(op.proc.pid), 1))
        print(json.dumps(results), flush=True)

        def phases() -> dict[str, int]:
            out = json.loads(kube.kubectl("get", "nxt", "-n", namespace, "-o", "json").stdout)["items"]
            counts: dict[str, int] = {}
            for item in out:
                phase = (item.get("status") or {}).get("phase", "")
                counts[phase] = counts.get(phase, 0) + 1
            return counts
        wait_for(lambda: phases().get("Running") == args.count, 300, interval=2, what="all Running")
        results.update(writes_per_training_until_running=round((op.writes() - writes0) / args.count, 2))
        time.sleep(5)
        idle_start = op.writes()
        reconciles = op.metric("neox_operator_reconciles_total")
        time.sleep(args.idle)
        results.update(idle_seconds=args.idle, idle_writes=op.writes() - idle_start,
                       idle_reconciles=op.metric("neox_operator_reconciles_total") - reconciles)
        print(json.dumps(results), flush=True)

        if args.big > args.count:
            extra = [f"s{i:04d}" for i in range(args.big - args.count)]
            big_start = time.monotonic()
            apply_many(kube, namespace, extra, suspend=True)
            wait_for(lambda: len(children_by_training(kube, namespace)) >= args.big
                     and all(v >= set(CHILD_KINDS) for v in children_by_training(kube, namespace).values()),
                     900, interval=5, what=f"{args.big} trainings' children")
            results.update(big=args.big, big_children_seconds=round(time.monotonic() - big_start, 1))
            time.sleep(35)  # one full resync of all of them
            results.update(rss_mib_at_big=round(rss_mib(op.proc.pid), 1))
        print(json.dumps(results), flush=True)
    finally:
        op.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
