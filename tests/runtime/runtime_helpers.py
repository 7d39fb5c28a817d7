"""Run neox-train / neox-data / neox-convert as real processes (torchrun for several ranks), or a
function on several gloo ranks (`spawn_ranks`)."""

import json
import os
import subprocess
import sys
import traceback

import yaml
from neox_runtime.launch import free_port  # noqa: F401 - re-exported to the tests

TINY_ARCH = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, rotary_pct=0.25, max_position_embeddings=128)



def env(**extra) -> dict:
    out = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "NEOX_LOG_LEVEL": "WARNING"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    out.update(extra)
    return out


def write_config(path, **fields) -> str:
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def neox_train(config: str, nproc: int = 1, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "neox_runtime.train.cli", "--config", config, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "neox_runtime.train.cli", "--config", config, *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def losses(progress_file) -> dict[int, float]:
    out = {}
    for line in open(progress_file):
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


CORPUS_DIR = os.path.dirname(os.__file__)  # the stdlib: real text that ships with Python


def byte_shards(directory, num_files: int = 30, shards: int = 2):
    """Token shards of stdlib .py files, one byte per token (vocab 256, EOS 0): real text, no tokenizer."""
    import pathlib

    import numpy as np

    from neox_runtime.data.shards import write_manifest, write_shard

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = sorted(pathlib.Path(CORPUS_DIR).glob("*.py"))[:num_files]
    docs = [np.frombuffer(f.read_bytes().replace(b"\0", b""), dtype=np.uint8).astype(np.uint16) for f in files]
    docs = [np.append(d, 0) for d in docs]
    entries = [write_shard(directory, f"shard-{i:05d}", docs[i::shards], np.dtype(np.uint16)) for i in range(shards)]
    write_manifest(directory, entries, vocab_size=256, eos_token_id=0)
    return directory


def spawn_ranks(fn, world: int, *args, timeout: int = 300) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes joined in one gloo group; raise their errors."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank_entry, args=(fn, rank, world, port, errors, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    failures = [errors.get() for _ in range(world) if not errors.empty()]
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _rank_entry(fn, rank, world, port, errors, *args):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
        # No rank closes its gloo connections while a peer may still be in its last send or
        # receive: that peer's gloo thread would throw and abort the process (exit -6).
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
