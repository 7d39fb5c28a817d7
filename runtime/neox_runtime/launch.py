"""Per-pod launcher: start this pod's ranks, the way torchrun would, without SSH.

The operator gives each pod NNODES, NPROC_PER_NODE, NODE_RANK (from the Job completion
index), MASTER_ADDR and MASTER_PORT. When `neox-train` starts without a RANK in its
environment and the pod has more than one rank, it calls `launch_local_ranks`, which
starts one child per local rank with RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE
set, forwards SIGTERM/SIGINT to all of them (so each saves its part of the checkpoint),
and exits with the first failing child's code — the pod fails as a whole, and the
operator restarts the group.
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


def needs_local_launch(env: dict[str, str] | None = None) -> bool:
    """True in a pod that must start its own ranks (no RANK yet, several ranks per pod)."""
    env = dict(os.environ if env is None else env)
    return contract.ENV_RANK not in env and int(env.get(contract.ENV_NPROC_PER_NODE, "1")) > 1


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
    """Wait for every child; when one fails, stop the rest (they would hang in a collective)."""
    first_failure = 0
    while [child.poll() for child in children].count(None):  # poll every child, no short-circuit
        failed = [c.returncode for c in children if c.returncode not in (None, 0)]
        if failed and not first_failure:
            first_failure = failed[0]
            for child in children:
                if child.poll() is None:
                    child.terminate()
        time.sleep(poll_seconds)
    codes = [child.returncode for child in children]
    code = first_failure or next((code for code in codes if code != 0), 0)
    return 128 - code if code < 0 else code  # killed by signal N → 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(launch_local_ranks(sys.argv[1:]))
