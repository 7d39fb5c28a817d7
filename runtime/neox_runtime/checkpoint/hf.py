"""Hugging Face format directories: load any GPT-NeoX/Pythia checkpoint, save ones transformers loads.

A directory holds config.json (published 4.x keys `rotary_pct`/`rotary_emb_base` or the
newer `partial_rotary_factor`/`rope_theta`/`rope_parameters`, both read by
`ModelArchitecture.from_hf_config`) and weights as model.safetensors, sharded
model-0000i-of-0000n.safetensors with model.safetensors.index.json, or pytorch_model.bin.
The serving engine and `neox-convert` both go through here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from collections.abc import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.model import GPTNeoXForCausalLM

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def read_architecture(path: str | os.PathLike) -> ModelArchitecture:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model path {path}: no config.json")
    return ModelArchitecture.from_hf_config(json.loads(config_file.read_text()))


def _normalize_key(key: str) -> str:
    # transformers >= 5 may write the head as lm_head; published files say embed_out.
    return "embed_out." + key[len("lm_head."):] if key.startswith("lm_head.") else key


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, whichever of the three weight layouts it uses."""
    path = Path(path)
    if (path / SAFETENSORS_INDEX).is_file():
        index = json.loads((path / SAFETENSORS_INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(path / name))
    elif (path / "model.safetensors").is_file():
        state = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"model path {path}: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin")
    # Old checkpoints carry attention masks / rotary tables as buffers; we compute them.
    return {_normalize_key(k): v for k, v in state.items()
            if not k.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"))}


def read_state_dict_slices(path: str | os.PathLike, wanted: Mapping[str, tuple[slice, ...]],
                           shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Only the tensors named in `wanted`, and of each only the slice `wanted[name]` (a rank's shard).

    Safetensors files are read lazily (`get_slice`), so a rank never holds more than its
    slices; pytorch_model.bin is memory-mapped. `shapes`, when given, are the full shapes
    the caller expects; a stored tensor of another shape is a ValueError naming it.
    """
    path = Path(path)
    out: dict[str, torch.Tensor] = {}

    def take(name: str, stored_shape: Sequence[int], read) -> None:
        if shapes is not None and tuple(stored_shape) != tuple(shapes[name]):
            raise ValueError(f"model path {path}: {name} has shape {tuple(stored_shape)}, "
                             f"the architecture needs {tuple(shapes[name])}")
        out[name] = read(wanted[name])

    if (path / SAFETENSORS_INDEX).is_file():
        files = [path / f for f in sorted(set(json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"].values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        for key, tensor in state.items():
            if _normalize_key(key) in wanted:
                take(_normalize_key(key), tensor.shape, lambda index, t=tensor: t[index].clone())
        files = []
    else:
        raise ValueError(f"model path {path}: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = _normalize_key(key)
                if name in wanted and name not in out:
                    lazy = f.get_slice(key)
                    take(name, lazy.get_shape(), lambda index, lazy=lazy: lazy[index])
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise ValueError(f"model path {path}: no tensor {', '.join(missing[:5])}")
    return out


def load_hf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[GPTNeoXForCausalLM, ModelArchitecture]:
    """Build our model from an HF directory; returns (model in eval mode, architecture)."""
    arch = read_architecture(path)
    state = read_state_dict(path)
    if arch.tie_word_embeddings:
        state.pop("embed_out.weight", None)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(arch)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (arch.tie_word_embeddings and k == "embed_out.weight")]
    if missing or unexpected:
        raise ValueError(f"model path {path}: weights do not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if arch.tie_word_embeddings:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    model.gpt_neox.rotary_emb = type(model.gpt_neox.rotary_emb)(arch)  # meta buffer -> real
    return model.to(device=device, dtype=dtype).eval(), arch


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_hf_model(model_or_state_dict: torch.nn.Module | dict[str, torch.Tensor], arch: ModelArchitecture,
                  path: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_bytes) (+ tokenizer.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) \
        else dict(model_or_state_dict)
    if arch.tie_word_embeddings:
        state.pop("embed_out.weight", None)  # safetensors refuses shared storage; HF re-ties on load
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state.items()}
    config = arch.to_hf_config()
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = _shards(state, max_shard_bytes)
    for stale in [*path.glob("model*.safetensors"), path / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path
