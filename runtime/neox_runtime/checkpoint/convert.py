"""`neox-convert`: DeepSpeed training checkpoints -> Hugging Face directories, and back as init weights.

`to-hf` reads a checkpoint tag (default: `latest`) in whatever layout training wrote:
ZeRO 0 (full module), ZeRO 1/2/3 (fp32 master weights re-assembled from the optimizer
partitions with DeepSpeed's zero_to_fp32), tensor-parallel `mp_rank_XX` shards (merged
per head), or pipeline `layer_XX` files; and writes config.json + safetensors (+
tokenizer.json) that `transformers` and our server load. The architecture comes from
the config the trainer stored in the checkpoint.

The other direction needs no conversion: a TrainConfig's `init_from` names an HF
directory, and `hf-check` verifies one loads (architecture, tensors, a forward pass).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.checkpoint.hf import load_hf_model, save_hf_model
from neox_runtime.train import checkpoints

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


def read_training_state(checkpoint_dir: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(full HF-named fp32 state dict, the trainer's client state) of one checkpoint tag."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or checkpoints.read_latest(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise ValueError(f"checkpoint: no complete checkpoint in {checkpoint_dir} (tag {tag})")
    folder = checkpoint_dir / tag
    # mp_rank_XX_model_states.pt (ZeRO 0-2, one per TP rank) or zero_pp_rank_D_mp_rank_XX_... (ZeRO 3)
    model_files = sorted(folder.glob("mp_rank_*_model_states.pt")) or sorted(folder.glob("*mp_rank_*_model_states.pt"))
    if not model_files:
        raise ValueError(f"checkpoint: {folder} holds no DeepSpeed model states")
    first = _load(model_files[0])
    client = {k: v for k, v in first.items() if k in ("step", "config", "sampler", "data_parallel_size")}
    if "config" not in client:
        raise ValueError(f"checkpoint: {folder} was not written by neox-train (no config in client state)")
    arch = ModelArchitecture(**client["config"]["architecture"])
    layer_files = sorted(folder.glob("layer_*-model_states.pt"))
    if layer_files:
        state = _pipeline_state(layer_files, arch)
    elif first.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) > 0 or first["module"] is None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = _strip(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag))
    elif len(model_files) > 1:
        from neox_runtime.parallel import sharding

        shards = [_strip(_load(f)["module"]) for f in model_files]
        state = {key: sharding.merge(key, [s[key] for s in shards]) for key in shards[0]}
    else:
        state = _strip(first["module"])
    state = {k: v.float() for k, v in state.items() if not k.endswith("inv_freq")}
    return state, client


def _pipeline_state(files: list[Path], arch: ModelArchitecture) -> dict[str, torch.Tensor]:
    from neox_runtime.parallel.pipeline import hf_name

    state = {}
    for f in files:
        layer = int(re.match(r"layer_(\d+)-", f.name).group(1))
        for name, tensor in torch.load(f, map_location="cpu", weights_only=True).items():
            key = hf_name(layer, name, arch.num_hidden_layers)
            if key is not None:
                state.setdefault(key, tensor)
    return state


def deepspeed_to_hf(checkpoint_dir: str | Path, output: str | Path, *, tag: str | None = None,
                    tokenizer_file: str | Path | None = None, dtype: str = "fp32") -> Path:
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype: must be one of {', '.join(_DTYPES)}")
    state, client = read_training_state(checkpoint_dir, tag)
    config = client["config"]
    arch = ModelArchitecture(**config["architecture"])
    if arch.tie_word_embeddings:
        state.setdefault("embed_out.weight", state["gpt_neox.embed_in.weight"])
    tokenizer_file = tokenizer_file or config.get("tokenizer_file") or _tokenizer_of_data(config.get("train_data"))
    return save_hf_model(state, arch, output, tokenizer_file=tokenizer_file, dtype=_DTYPES[dtype])


def _tokenizer_of_data(train_data: str | None) -> str | None:
    manifest = Path(train_data or "") / "manifest.json"
    if not manifest.is_file():
        return None
    tokenizer = json.loads(manifest.read_text()).get("tokenizer")
    return tokenizer if tokenizer and Path(tokenizer).is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neox-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="DeepSpeed checkpoint directory -> Hugging Face directory")
    to_hf.add_argument("checkpoint_dir")
    to_hf.add_argument("output")
    to_hf.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    to_hf.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the training data's)")
    to_hf.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    check = sub.add_parser("hf-check", help="verify an HF directory loads as init weights (init_from)")
    check.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            out = deepspeed_to_hf(args.checkpoint_dir, args.output, tag=args.tag, tokenizer_file=args.tokenizer,
                                  dtype=args.dtype)
            print(f"wrote {out}")
        else:
            model, arch = load_hf_model(args.path)
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.long))
            print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), **arch.model_dump()}))
    except ValueError as e:
        print(f"neox-convert: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
