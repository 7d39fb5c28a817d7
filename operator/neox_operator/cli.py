"""`neox-operator`: run the kopf operator cluster-wide or in chosen namespaces."""

from __future__ import annotations

import argparse
import sys
import warnings

import kopf

from . import handlers, logs, metrics


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="neox-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable; globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (default)")
    parser.add_argument("--metrics-port", type=int, default=8000, help="Prometheus port (0: off)")
    parser.add_argument("--health-port", type=int, default=8080, help="liveness endpoint port (0: off)")
    parser.add_argument("--resync-seconds", type=float, default=120.0,
                        help="periodic reconcile of every training (events drive the rest)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent reconciles")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs.configure(args.verbose)
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    handlers.CONFIG.resync_seconds = args.resync_seconds
    handlers.CONFIG.workers = args.workers
    metrics.serve(args.metrics_port)
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    kopf.run(standalone=True, clusterwide=not args.namespace, namespaces=args.namespace or (),
             liveness_endpoint=liveness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
