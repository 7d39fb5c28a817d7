"""Start-up host memory per rank: sharded start-up (meta device, own slice only) vs the full model.

Starts `--layout` ranks on gloo (each a real process, as under torchrun) and records each
rank's peak RSS (ru_maxrss) after the imports, after building the model on the meta
device, after `parallelize` (the rank's stage and tensor slice materialised) and after
`deepspeed.initialize` (ZeRO-1 buffers included). "Full model" is what each rank used to allocate first: the fp32
GPTNeoXForCausalLM built whole in one process.

    DS_ACCELERATOR=cpu python tests/bench/bench_startup.py --preset pythia-410m --tensor 2 --pipeline 2 \\
        --out tests/bench/results/startup_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.multiprocessing as mp

from neox_runtime.api.architecture import preset
from neox_runtime.api.layout import parameters_on_rank


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rank(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed

    from neox_runtime.model import GPTNeoXForCausalLM
    from neox_runtime.parallel.deepspeed_config import build_deepspeed_config
    from neox_runtime.parallel.parallelize import parallelize
    from neox_runtime.train.config import TrainConfig
    from neox_runtime.train.distributed import init_distributed
    from neox_runtime.train.engine import adamw, parameter_source

    work = Path(tempfile.mkdtemp())
    cfg = TrainConfig(architecture=args.preset, train_data=str(work), checkpoint_dir=str(work / "ckpt"),
                      tensor_parallel=args.tensor, pipeline_parallel=args.pipeline, zero_stage=1,
                      micro_batch_size=1, gradient_accumulation_steps=args.pipeline, seq_length=128)
    env = init_distributed()
    layout = cfg.layout(world)
    imported = _peak_mib()
    with torch.device("meta"):  # the first meta module imports torch's meta kernels (sympy & co.) once
        model = GPTNeoXForCausalLM(cfg.architecture)
    on_meta = _peak_mib()
    parallel = parallelize(model, layout, rank=rank, source=parameter_source(cfg), device=env.device)
    built = _peak_mib()
    config = build_deepspeed_config(cfg, layout.data) | {"zero_allow_untested_optimizer": True}
    deepspeed.initialize(model=parallel.module, optimizer=adamw(parallel.module, cfg, env.device), config=config,
                         mpu=parallel.mpu)
    results.put((rank, imported, on_meta, built, _peak_mib(),
                 parameters_on_rank(cfg.architecture, layout, layout.coordinates(rank))))
    torch.distributed.barrier()


def _full_model(name: str, results) -> None:
    from neox_runtime.model import GPTNeoXForCausalLM

    before = _peak_mib()
    GPTNeoXForCausalLM(preset(name).architecture)
    results.put(_peak_mib() - before)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="pythia-410m")
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--pipeline", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from neox_runtime.launch import free_port

    world = args.tensor * args.pipeline
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    full = ctx.Process(target=_full_model, args=(args.preset, results))
    full.start()
    full.join()
    full_mib = results.get()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("a rank failed", [p.exitcode for p in procs], file=sys.stderr)
        return 1
    rows = sorted(results.get() for _ in range(world))
    arch = preset(args.preset).architecture
    lines = [f"# Start-up host memory per rank: {args.preset} ({arch.num_parameters() / 1e6:.0f}M parameters), "
             f"tensor {args.tensor} x pipeline {args.pipeline}, ZeRO-1, fp32, CPU",
             "", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared and loaded "
             "(peak RSS does not depend on load).", "",
             f"Building the full fp32 model in one process (what every rank did before): **{full_mib:,.0f} MiB**.", "",
             "| rank | its parameters (fp32) | peak RSS: imports | + model on meta | + parallelize (growth) "
             "| + deepspeed.initialize |",
             "|---|---|---|---|---|---|"]
    for rank, imported, on_meta, built, initialized, params in rows:
        lines.append(f"| {rank} | {params * 4 / 2**20:,.0f} MiB | {imported:,.0f} MiB | {on_meta:,.0f} MiB "
                     f"| {built:,.0f} MiB (+{built - on_meta:,.0f}) | {initialized:,.0f} MiB |")
    lines += ["", "`parallelize` grows a rank by its own slice plus a drawing chunk (16 MiB) and process-group "
              "buffers; the first meta module costs a one-time import of torch's meta kernels; "
              "`deepspeed.initialize` adds DeepSpeed's ZeRO-1 flat buffers, as it did before."]
    lines += ["", "Command: `DS_ACCELERATOR=cpu python tests/bench/bench_startup.py " + " ".join(sys.argv[1:]) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
