"""`hack/cluster {build,up,down,env,status}`: the local control plane from the shell."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import build
from .cluster import DEFAULT_STATE_DIR, LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster", description=__doc__)
    parser.add_argument("command", choices=["build", "up", "down", "env", "status"])
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("NEOX_CLUSTER_DIR", DEFAULT_STATE_DIR)),
                        help="where certificates, etcd data, logs and the kubeconfig live")
    parser.add_argument("--nodes", type=int, default=3, help="fake 8-GPU nodes to register")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cluster = LocalCluster(state_dir=args.state_dir, gpu_nodes=args.nodes, log=log)
    if args.command == "build":
        print(build.ensure_built(log=log))
    elif args.command == "up":
        print(cluster.up())
    elif args.command == "down":
        cluster.down(wipe=True)
        log(f"Stopped the local cluster and removed {args.state_dir}")
    elif args.command == "env":
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export PATH={build.bin_dir()}:$PATH")
    elif args.command == "status":
        running = cluster.is_running()
        print("running" if running else "stopped")
        return 0 if running else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
