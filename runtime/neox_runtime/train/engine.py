"""The DeepSpeed engine for a TrainConfig, in one of three layouts, behind one small interface.

- data parallel (+ ZeRO 0-3): the plain model under DeepSpeedEngine;
- tensor parallel: the same model sharded by `parallel.tensor`, DeepSpeed told about the
  TP/DP groups through an mpu object (gradients reduce over DP only; clipping counts
  sharded parameters once per TP rank and replicated ones once);
- pipeline parallel: the blocks as a DeepSpeed PipelineModule (`parallel.pipeline`).

The loop only sees `StepRunner`: `train_step(micro_batches) -> global mean loss`,
`eval_loss(micro_batches)`, and where this rank sits in the data-parallel dimension.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from neox_runtime.checkpoint.hf import load_hf_model
from neox_runtime.model import GPTNeoXForCausalLM, causal_lm_loss
from neox_runtime.parallel.deepspeed_config import build_deepspeed_config
from neox_runtime.train.config import TrainConfig
from neox_runtime.train.distributed import DistEnv


class CausalLMWithLoss(nn.Module):
    """What DeepSpeed drives: (input_ids, labels) -> mean loss. Checkpoint keys get `model.`."""

    def __init__(self, model: GPTNeoXForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model(input_ids), labels)


def build_model(cfg: TrainConfig, compile_blocks: bool = False) -> GPTNeoXForCausalLM:
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model, arch = load_hf_model(cfg.init_from)
        if arch != cfg.architecture:
            raise ValueError(f"init_from: {cfg.init_from} holds a different architecture than the config's")
    else:
        model = GPTNeoXForCausalLM(cfg.architecture)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if compile_blocks:
        for block in model.gpt_neox.layers:
            block.compile()  # in place: parameter names (and checkpoints) stay the same
    return model


def adamw(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without decay on biases and LayerNorms (as GPT-NeoX); fused kernel where it exists."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # CPU: the fused kernel is measured only on plain fp32 params; CUDA: fused everywhere
    fused = cfg.fused_optimizer and (device.type == "cuda" or (cfg.zero_stage == 0 and cfg.precision == "fp32"))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


class TensorParallelMPU:
    """DeepSpeed's `mpu` protocol for TP x DP on consecutive ranks (TP innermost)."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.dp = tp, world // tp
        self.tp_group = self.dp_group = None
        for i in range(self.dp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(i * tp, (i + 1) * tp)))
            if rank // tp == i:
                self.tp_group = group
        for j in range(tp):
            group = dist.new_group(list(range(j, world, tp)))
            if rank % tp == j:
                self.dp_group = group
        self.tp_rank, self.dp_rank = rank % tp, rank // tp

    def get_model_parallel_rank(self): return self.tp_rank
    def get_model_parallel_group(self): return self.tp_group
    def get_model_parallel_world_size(self): return self.tp
    def get_data_parallel_rank(self): return self.dp_rank
    def get_data_parallel_group(self): return self.dp_group
    def get_data_parallel_world_size(self): return self.dp
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def _tensors(batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(batch).to(device)
    return t[:, :-1], t[:, 1:]  # inputs, shifted labels: (B, T) each


class StepRunner:
    """Data parallel (optionally tensor parallel): forward/backward/step per micro-batch."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        import deepspeed

        self.env = env
        model = build_model(cfg)
        mpu = None
        if cfg.tensor_parallel > 1:
            from neox_runtime.parallel.tensor import apply_tensor_parallel

            mpu = TensorParallelMPU(cfg.tensor_parallel)
            apply_tensor_parallel(model, mpu.tp_group)
            for block in model.gpt_neox.layers:
                for linear in (block.attention.query_key_value, block.attention.dense.weight,
                               block.mlp.dense_h_to_4h, block.mlp.dense_4h_to_h.weight):
                    for p in (linear.parameters() if isinstance(linear, nn.Module) else [linear]):
                        p.tensor_model_parallel = True  # sharded: counted once per TP rank in clipping
        self.dp_rank = mpu.dp_rank if mpu else env.rank
        self.dp_size = mpu.dp if mpu else env.world_size
        config = build_deepspeed_config(cfg, self.dp_size)
        config.setdefault("zero_allow_untested_optimizer", True)
        module = CausalLMWithLoss(model)
        if cfg.compile:
            # the whole forward + loss in one graph (measured ~9% faster than per-block graphs
            # on CPU, at ~90 s compile instead of ~15 s); in place, so names stay the same
            module.compile()
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=adamw(model, cfg, env.device),
                                               config=config, mpu=mpu)

    def train_step(self, micro_batches: list[np.ndarray]) -> float:
        losses = []
        for micro in micro_batches:
            loss = self.engine(*_tensors(micro, self.env.device))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        return _mean_across(losses, self.env.device)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[np.ndarray]) -> float:
        self.engine.eval()
        losses = [self.engine(*_tensors(m, self.env.device)).detach() for m in micro_batches]
        self.engine.train()
        return _mean_across(losses, self.env.device)


class PipelineStepRunner:
    """Pipeline parallel: DeepSpeed's PipelineEngine schedules the micro-batches itself."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        import deepspeed

        from neox_runtime.parallel.pipeline import load_from_full, pipeline_module

        self.env = env
        pipe = pipeline_module(cfg.architecture, cfg.pipeline_parallel,
                               activation_checkpoint_interval=1 if cfg.activation_checkpointing else 0)
        # every rank builds the full model once (seed / init_from), then keeps its stage
        load_from_full(pipe, build_model(cfg).state_dict(), cfg.architecture.num_hidden_layers)
        if cfg.compile:
            for layer in pipe.forward_funcs:
                if isinstance(layer, nn.Module):
                    layer.compile()
        self.dp_size = env.world_size // cfg.pipeline_parallel
        config = build_deepspeed_config(cfg, self.dp_size)
        config.setdefault("zero_allow_untested_optimizer", True)
        self.engine, *_ = deepspeed.initialize(model=pipe, optimizer=adamw(pipe, cfg, env.device), config=config)
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self.micro_batches = cfg.gradient_accumulation_steps

    def _iter(self, micro_batches: list[np.ndarray]):
        return iter([_tensors(m, self.env.device) for m in micro_batches])

    def train_step(self, micro_batches: list[np.ndarray]) -> float:
        return self.engine.train_batch(self._iter(micro_batches)).item()  # mean over micro-batches and DP

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[np.ndarray]) -> float:
        loss = self.engine.eval_batch(self._iter(micro_batches), num_micro_batches=len(micro_batches))
        return loss.item()


def _mean_across(values: list[torch.Tensor], device: torch.device) -> float:
    """Mean over every rank's values; one host sync per call (not one per micro-batch)."""
    t = torch.stack([torch.stack(values).double().sum().to(device),
                     torch.tensor(float(len(values)), dtype=torch.float64, device=device)])
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def build_runner(cfg: TrainConfig, env: DistEnv) -> StepRunner | PipelineStepRunner:
    if cfg.tensor_parallel > 1 and cfg.pipeline_parallel > 1:
        raise ValueError("tensor_parallel/pipeline_parallel: combining both is not supported yet; use one")
    return PipelineStepRunner(cfg, env) if cfg.pipeline_parallel > 1 else StepRunner(cfg, env)
