"""Process-group setup from the torchrun rendezvous env (the operator/runtime contract).

MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK as torchrun sets them; when they
are absent the process is a world of one on a free local port. CPU (gloo) unless CUDA is
present and DS_ACCELERATOR is not `cpu`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from neox_runtime.launch import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str



def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed() -> DistEnv:
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    cuda = use_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is settled: it picks its accelerator at import

    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistEnv(rank=torch.distributed.get_rank(), local_rank=local_rank,
                   world_size=torch.distributed.get_world_size(),
                   device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"), backend=backend)
