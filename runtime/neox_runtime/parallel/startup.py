"""Sharded start-up: a rank allocates only its own slice of each parameter it holds.

Modules are built on the meta device (shapes, no storage), the parallel plan cuts them
down to this rank's stage and tensor slice, then `materialize` gives each remaining
parameter real storage, filled from a `ParameterSource`:

- `SeededInit`: the GPT-NeoX init (`model.parameter_init`) drawn from generators seeded by
  (seed, HF name, row chunk). A chunk is a fixed block of rows of the *full* tensor, so
  a value depends only on where it sits in the full tensor, never on the layout: every
  layout starts from the same weights as one rank does, and a rank draws only the chunks
  that overlap its slice (peak host memory: its slice plus one chunk).
- `HFSlices`: an HF directory, of which only this rank's slices are read
  (`checkpoint.hf.read_state_dict_slices`);
- `FullStateDict`: slices of full tensors already in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from neox_runtime.api import layout
from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.model import RotaryEmbedding, parameter_init
from neox_runtime.parallel import sharding

CHUNK_ELEMENTS = layout.INIT_CHUNK_ELEMENTS  # rows drawn together from one generator


class ParameterSource(Protocol):
    def read(self, wanted: dict[str, tuple[tuple[int, ...], tuple[slice, ...]]]) -> Iterator[tuple[str, torch.Tensor]]:
        """For each HF name, given (full shape, this rank's index into it): (name, that slice in fp32)."""


def _generator(seed: int, hf_name: str, chunk: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{hf_name}/{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, step = index.indices(size)
    assert step == 1, index
    return start, stop


def init_slice(hf_name: str, full_shape: Sequence[int], arch: ModelArchitecture, seed: int,
               index: tuple[slice, ...] | None = None, scratch: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`init_parameter(...)[index]`, drawing only the row chunks that overlap the index.

    Chunks are drawn into one reusable buffer (`scratch`, shared across calls): freeing a
    fresh 16 MB block per chunk would raise glibc's mmap threshold, so the parameters
    allocated next would come from the heap, which DeepSpeed's flattening later leaves
    fragmented (measured: +0.6 GB resident per rank on pythia-410m).
    """
    index = index or tuple(slice(None) for _ in full_shape)
    mean, std = parameter_init(hf_name, arch)
    local = tuple(b - a for a, b in (_bounds(i, n) for i, n in zip(index, full_shape)))
    if not std:
        return torch.full(local, mean)
    start, stop = _bounds(index[0], full_shape[0])
    row_elements = math.prod(full_shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row_elements)
    scratch = scratch if scratch is not None else []
    if not scratch or scratch[0].numel() < rows_per_chunk * row_elements:
        scratch[:] = [torch.empty(rows_per_chunk * row_elements)]
    out = torch.empty(local)
    for chunk in range(start // rows_per_chunk, -(-stop // rows_per_chunk)):
        first, last = chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, full_shape[0])
        block = scratch[0][:(last - first) * row_elements].view(last - first, *full_shape[1:])
        block.normal_(mean, std, generator=_generator(seed, hf_name, chunk))
        lo, hi = max(start, first), min(stop, last)
        out[lo - start:hi - start] = block[lo - first:hi - first][(slice(None), *index[1:])]
    return out


def init_parameter(hf_name: str, full_shape: Sequence[int], arch: ModelArchitecture, seed: int) -> torch.Tensor:
    """The full initial value of parameter `hf_name`: the same for every layout and rank."""
    return init_slice(hf_name, full_shape, arch, seed)


class SeededInit:
    def __init__(self, arch: ModelArchitecture, seed: int):
        self.arch, self.seed = arch, seed

    def read(self, wanted):
        scratch: list[torch.Tensor] = []
        for name, (shape, index) in wanted.items():  # one at a time: the caller moves each away first
            yield name, init_slice(name, shape, self.arch, self.seed, index, scratch)


class HFSlices:
    def __init__(self, path: str | os.PathLike):
        self.path = path

    def read(self, wanted):
        from neox_runtime.checkpoint.hf import read_state_dict_slices

        tensors = read_state_dict_slices(self.path, {n: index for n, (_, index) in wanted.items()},
                                         shapes={n: shape for n, (shape, _) in wanted.items()})
        for name in list(tensors):
            yield name, tensors.pop(name).float()


class FullStateDict:
    """Slices of full HF-named tensors already in memory (tests; a gathered checkpoint)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def read(self, wanted):
        for name, (shape, index) in wanted.items():
            full = self.state[name]
            assert tuple(full.shape) == tuple(shape), (name, full.shape, shape)
            yield name, full[index].float().clone()


def materialize(modules: Sequence[tuple[nn.Module, Callable[[str], str]]], source: ParameterSource,
                arch: ModelArchitecture, tensor_rank: int, tensor_size: int, device: torch.device) -> None:
    """Give every meta parameter of `modules` (module, its parameter names -> HF names) this rank's slice.

    A parameter reachable under several names (tied embeddings) is read once, by its first
    name, and stays one Parameter. Rotary tables left on meta are computed again.
    """
    wanted: dict[str, tuple[tuple[int, ...], tuple[slice, ...]]] = {}
    owners: list[tuple[nn.Module, str, str, nn.Parameter]] = []
    first_name: dict[int, str] = {}
    for module, to_hf in modules:
        for name, p in module.named_parameters(remove_duplicate=False):
            if not p.is_meta:
                continue
            hf_name = first_name.setdefault(id(p), to_hf(name))
            full = sharding.full_shape(hf_name, p.shape, tensor_size)
            wanted[hf_name] = (full, sharding.shard_slices(hf_name, full, tensor_rank, tensor_size))
            owner_name, _, attr = name.rpartition(".")
            owners.append((module.get_submodule(owner_name), attr, hf_name, p))
    made: dict[str, nn.Parameter] = {}
    for hf_name, value in source.read(wanted):
        made[hf_name] = nn.Parameter(value.to(device=device))
    for owner, attr, hf_name, meta in owners:
        assert made[hf_name].shape == meta.shape, (hf_name, made[hf_name].shape, meta.shape)
        setattr(owner, attr, made[hf_name])
    for module, _ in modules:
        for name, rotary in list(module.named_modules()):
            if isinstance(rotary, RotaryEmbedding) and rotary.inv_freq.is_meta:
                module.set_submodule(name, RotaryEmbedding(arch).to(device))
