"""Tensor-parallel execution: one worker process per rank, rank 0 schedules and broadcasts.

The server process is rank 0: it owns the scheduler and the sampler, and before each
step it broadcasts the `StepPlan` (a few small tensors) to the workers, then every rank
runs its shard of the same forward pass (`ModelRunner` with rank/world: heads and MLP
columns split Megatron-style, one all-reduce per residual branch). Only rank 0 computes
logits. gloo on CPU, NCCL on GPU; rendezvous over TCP on the loopback interface.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neox_runtime.serve.config import EngineConfig
from neox_runtime.launch import free_port
from neox_runtime.serve.engine.runner import ModelRunner, StepPlan
from neox_runtime.serve.loader import LoadedModel, load

log = logging.getLogger(__name__)



def _init(rank: int, world: int, port: int, device: str) -> str:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    return device


def _threads(cfg: EngineConfig) -> int:
    return cfg.threads or max(1, (os.cpu_count() or 1) // cfg.tensor_parallel)


def _worker(rank: int, cfg: EngineConfig, port: int, num_slots: int, max_len: int) -> None:
    torch.set_num_threads(_threads(cfg))
    device = _init(rank, cfg.tensor_parallel, port, cfg.device)
    loaded = load(cfg.model, cfg.dtype, device)
    runner = ModelRunner(loaded.model, loaded.arch, num_slots=num_slots, max_len=max_len,
                         rank=rank, world=cfg.tensor_parallel)
    del loaded
    box: list = [None]
    while True:
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        runner.execute(box[0])
    dist.barrier()  # see close()
    dist.destroy_process_group()


class TensorParallelExecutor:
    def __init__(self, cfg: EngineConfig, loaded: LoadedModel, *, num_slots: int, max_len: int):
        port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker, args=(r, cfg, port, num_slots, max_len), daemon=True)
                      for r in range(1, cfg.tensor_parallel)]
        for p in self.procs:
            p.start()
        torch.set_num_threads(_threads(cfg))
        device = _init(0, cfg.tensor_parallel, port, cfg.device)
        model = loaded.model.to(device)
        self.runner = ModelRunner(model, loaded.arch, num_slots=num_slots, max_len=max_len,
                                  rank=0, world=cfg.tensor_parallel)
        self._closed = False

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        dist.broadcast_object_list([plan], src=0)
        return self.runner.execute(plan)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            dist.broadcast_object_list([None], src=0)
            # Every rank has received the stop before any closes its connections; otherwise a
            # worker still reading the broadcast can lose its peer and abort.
            dist.barrier()
            dist.destroy_process_group()
        finally:
            for p in self.procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
