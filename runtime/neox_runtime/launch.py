"""Per-pod launcher: start this pod's ranks, the way torchrun would, without SSH.

The operator gives each pod NNODES, NPROC_PER_NODE, NODE_RANK (from the Job completion
index), MASTER_ADDR and MASTER_PORT. When `neox-train` starts without a RANK in its
environment, `plan_launch` says where this process stands: in a pod, the operator's env
decides; run by hand with a NeoXTraining manifest, the manifest's ranks per node are
started on this machine (a free loopback port for the rendezvous), and a manifest of
several nodes is refused, since one machine cannot play them. `launch_local_ranks` starts
one child per local rank with RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE set,
forwards SIGTERM/SIGINT to all of them (so each saves its part of the checkpoint), and
exits with the pod's code (`pod_exit_code`): a failing rank fails the pod as a whole and
the operator restarts the group; ranks that stopped early on SIGTERM make it exit
`contract.EXIT_PREEMPTED`, never 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from .api import contract


@dataclass(frozen=True)
class Rendezvous:
    """Where this process sits in the job, from the contract's env vars."""

    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Rendezvous":
        env = dict(os.environ if env is None else env)
        try:
            return cls(
                nnodes=int(env.get(contract.ENV_NNODES, "1")),
                nproc_per_node=int(env.get(contract.ENV_NPROC_PER_NODE, "1")),
                node_rank=int(env.get(contract.ENV_NODE_RANK, "0")),
                master_addr=env.get(contract.ENV_MASTER_ADDR, "127.0.0.1"),
                master_port=int(env.get(contract.ENV_MASTER_PORT, str(contract.MASTER_PORT))),
            )
        except ValueError as error:
            raise ValueError(f"invalid rendezvous environment: {error}") from None

    @classmethod
    def on_this_machine(cls, nproc_per_node: int) -> "Rendezvous":
        """One node of `nproc_per_node` ranks meeting on a free loopback port (a run by hand)."""
        return cls(nnodes=1, nproc_per_node=nproc_per_node, node_rank=0, master_addr="127.0.0.1",
                   master_port=free_port())

    def rank_env(self, local_rank: int) -> dict[str, str]:
        return {
            contract.ENV_RANK: str(self.node_rank * self.nproc_per_node + local_rank),
            contract.ENV_LOCAL_RANK: str(local_rank),
            contract.ENV_WORLD_SIZE: str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.nproc_per_node),
            contract.ENV_MASTER_ADDR: self.master_addr,
            contract.ENV_MASTER_PORT: str(self.master_port),
        }


def free_port() -> int:
    """A TCP port free on loopback right now (for single-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plan_launch(env: dict[str, str] | None = None, manifest_layout: tuple[int, int] | None = None
                ) -> Rendezvous | None:
    """Where this `neox-train` process stands; None when it is already the one rank it runs as.

    `manifest_layout` is (nodes, ranks per node) of the NeoXTraining the config came from,
    None for a plain runtime config. A Rendezvous means: this process is a pod (or a run by
    hand) whose local ranks must be started, `nproc_per_node` of them (1: this process is
    that rank once its env is set).
    """
    env = dict(os.environ if env is None else env)
    if contract.ENV_RANK in env:  # torchrun, or our own launcher, made this process a rank
        return None
    if contract.ENV_NPROC_PER_NODE in env:  # a pod: the operator's env says who we are
        return Rendezvous.from_env(env)
    if manifest_layout is None:  # a plain runtime config: one process (torchrun for more)
        return None
    nodes, ranks_per_node = manifest_layout
    if nodes > 1:
        raise ValueError(
            f"parallelism.nodes: {nodes} nodes cannot be started by hand on one machine; apply the manifest "
            f"to a cluster (the operator starts one pod per node), or start it under torchrun on each machine "
            f"(--nnodes {nodes} --nproc-per-node {ranks_per_node})")
    return Rendezvous.on_this_machine(ranks_per_node) if ranks_per_node > 1 else None


def launch_local_ranks(argv: list[str], rendezvous: Rendezvous | None = None) -> int:
    """Run `argv` once per local rank; return the pod's exit code."""
    rendezvous = rendezvous or Rendezvous.from_env()
    children = [
        subprocess.Popen(argv, env={**os.environ, **rendezvous.rank_env(local_rank)})
        for local_rank in range(rendezvous.nproc_per_node)
    ]

    def forward(signum: int, _frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait_all(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_all(children: list[subprocess.Popen], poll_seconds: float = 0.2) -> int:
    """Wait for every child; when one stops early, stop the rest (they would hang in a collective)."""
    exited: list[int] = []  # exit codes in the order the children ended
    running = list(children)
    while running:
        for child in [c for c in running if c.poll() is not None]:
            running.remove(child)
            exited.append(child.returncode)
            # A failed rank leaves its peers hanging in a collective: stop them (SIGTERM, so a rank
            # that still can saves first). A preempted one does not: its peers agreed to stop with
            # it and are saving and exiting already; a signal now could kill one mid-exit.
            if child.returncode not in (0, contract.EXIT_PREEMPTED):
                for other in running:
                    other.terminate()
        time.sleep(poll_seconds if running else 0)
    return pod_exit_code(exited)


def pod_exit_code(codes: list[int]) -> int:
    """The pod's exit code from its ranks' (in the order they ended).

    A real failure wins (the first one), because the checkpoint may be incomplete; else
    `EXIT_PREEMPTED` if any rank stopped early on SIGTERM (its peers followed it); else 0.
    A rank killed by signal N counts as 128 + N, as a shell reports it.
    """
    codes = [128 - code if code < 0 else code for code in codes]
    failures = [code for code in codes if code not in (0, contract.EXIT_PREEMPTED)]
    if failures:
        return failures[0]
    return contract.EXIT_PREEMPTED if contract.EXIT_PREEMPTED in codes else 0


if __name__ == "__main__":
    sys.exit(launch_local_ranks(sys.argv[1:]))
