"""`parallelize`: apply a ParallelLayout to a plain GPTNeoXForCausalLM, from outside.

The model comes in built on the meta device (or with full weights); what comes out is
this rank's part of it, ready for `deepspeed.initialize`:

1. tensor parallel (`parallel.tensor`): modules replaced by name, vocab-parallel
   embedding, head and loss; groups from `layout.tensor_groups()`;
2. pipeline parallel (`parallel.pipeline`): the modules as pipeline layers, this rank's
   stage kept (`layout.stage_layers`), one DeepSpeed topology (pipe x data x model, the
   layout's rank order) for the pipeline engine;
3. sharded start-up (`parallel.startup`): only this stage's parameters, and of those only
   this tensor rank's slices, get storage, drawn from the seeded init or read from HF;
4. gradient clipping: each parameter flagged so DeepSpeed's norm counts it exactly once
   across tensor ranks and pipeline stages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from neox_runtime.api.layout import ParallelLayout
from neox_runtime.model import GPTNeoXForCausalLM
from neox_runtime.parallel import sharding
from neox_runtime.parallel.pipeline import hf_name, layer_module, neox_pipeline, pipeline_layers, stage_bounds
from neox_runtime.parallel.startup import ParameterSource, materialize
from neox_runtime.parallel.tensor import TensorSlice, apply_tensor_parallel, loss_function


class CausalLMWithLoss(nn.Module):
    """What DeepSpeed drives without a pipeline: (input_ids, labels) -> mean loss. Keys get `model.`."""

    def __init__(self, model: GPTNeoXForCausalLM, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(input_ids), labels)


@dataclass
class ParallelModel:
    module: nn.Module  # CausalLMWithLoss or the PipelineModule: what DeepSpeed drives
    mpu: Any  # for deepspeed.initialize: DeepSpeed's grid with tensor parallelism, else None
    hf_parameters: list[tuple[str, nn.Parameter]]  # this rank's parameters by HF name, each once
    tensor: TensorSlice


def topology(layout: ParallelLayout):
    """DeepSpeed's process topology for `layout`: axes pipe, data, model, the layout's rank order."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
    for rank in range(layout.world_size):
        coord, ours = topo.get_coord(rank), layout.coordinates(rank)
        assert (coord.pipe, coord.data, coord.model) == (ours.pipe, ours.data, ours.model), rank
    return topo


def tensor_slice(layout: ParallelLayout, rank: int) -> TensorSlice:
    """This rank's tensor-parallel group; every rank creates every group, in the same order."""
    if layout.tensor == 1:
        return TensorSlice(rank=0, size=1)
    mine = None
    for ranks in layout.tensor_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return TensorSlice(rank=layout.coordinates(rank).model, size=layout.tensor, group=mine)


def _flag_for_clipping(parameters: list[tuple[str, nn.Parameter]], tp: TensorSlice,
                       tied_copies: frozenset[int] = frozenset()) -> None:
    # DeepSpeed's gradient norm (clip_grad_norm_ for fp32 ZeRO-0; ZeRO, bf16 and fp16
    # optimizers alike) takes a parameter on a rank if it is flagged model_parallel, or
    # if the rank is model-parallel rank 0, and sums over the pipe x tensor group. So:
    # a sharded slice counts on every tensor rank, a replicated one on tensor rank 0 of
    # its stage only, and the last stage's copy of a tied embedding never (DeepSpeed also
    # marks that copy ds_pipe_replicated, which its optimizers skip).
    for name, p in parameters:
        sharded = tp.size > 1 and sharding.split_dim(name) is not None
        p.model_parallel = (sharded or tp.rank == 0) and id(p) not in tied_copies


def parallelize(model: GPTNeoXForCausalLM, layout: ParallelLayout, *, rank: int, source: ParameterSource,
                device: torch.device, activation_checkpointing: bool = False) -> ParallelModel:
    """This rank's part of `model` under `layout`, its meta parameters filled from `source`."""
    arch = model.arch
    tp = tensor_slice(layout, rank)
    topo = topology(layout)
    apply_tensor_parallel(model, tp)
    loss_fn = loss_function(tp, arch.vocab_size)
    if layout.pipeline == 1:
        materialize([(model, lambda name: name)], source, arch, tp.rank, tp.size, device)
        model.set_activation_checkpointing(activation_checkpointing)
        parameters = list(model.named_parameters())  # a tied head is listed once, as the embedding
        _flag_for_clipping(parameters, tp)
        mpu = None
        if layout.tensor > 1:
            from deepspeed.runtime.pipe.topology import PipelineParallelGrid

            mpu = PipelineParallelGrid(topology=topo)
        return ParallelModel(CausalLMWithLoss(model, loss_fn), mpu, parameters, tp)

    num_layers = arch.num_hidden_layers
    layers = pipeline_layers(model)
    stage = layout.coordinates(rank).pipe
    bounds = stage_bounds(layout, num_layers)
    local = [(i, layer_module(layers[i])) for i in range(bounds[stage], bounds[stage + 1])]
    local = [(i, module) for i, module in local if module is not None]
    materialize([(module, functools.partial(hf_name, i, num_layers=num_layers)) for i, module in local],
                source, arch, tp.rank, tp.size, device)
    parameters = [(hf_name(i, n, num_layers), p) for i, module in local for n, p in module.named_parameters()]
    tied_copies = frozenset(id(p) for i, module in local if arch.tie_word_embeddings and i == num_layers + 2
                            and stage > 0 for p in module.parameters())
    _flag_for_clipping(parameters, tp, tied_copies)
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    pipe = neox_pipeline(layers, layout, num_layers, topology=topo, loss_fn=loss_fn,
                         activation_checkpoint_interval=1 if activation_checkpointing else 0,
                         activation_checkpoint_func=checkpoint, checkpointable_layers=["BlockPipe"])
    return ParallelModel(pipe, None, parameters, tp)
