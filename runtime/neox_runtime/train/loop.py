"""The training loop, top to bottom: DeepSpeed engine, data, LR, eval, checkpoints, signals.

`train(cfg)` is what `neox-train` runs in every rank. It resumes from the checkpoint
directory's `latest` when there is one (model, optimizer, sampler position, RNG; the LR
is a pure function of the step), checkpoints every `checkpoint_interval` steps and when
SIGTERM arrives (the handler only sets a flag; the loop saves at the next step boundary
and returns), evaluates on the held-out split, and reports progress from rank 0.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from neox_runtime.data.shards import ResumableSampler, TokenShards, batches, train_validation_split
from neox_runtime.model import flops_per_token
from neox_runtime.parallel.deepspeed_config import lr_at
from neox_runtime.train import checkpoints
from neox_runtime.train.config import TrainConfig
from neox_runtime.train.distributed import DistEnv, init_distributed
from neox_runtime.train.engine import build_runner
from neox_runtime.train.progress import JsonLinesReporter, LineReporter, ProgressReport, Reporter, SafeReporter

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    first_step: int
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    preempted: bool = False
    checkpoint_seconds: list[float] = field(default_factory=list)


class _StopFlag:
    def __init__(self) -> None:
        self.set = False

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.set = True

        signal.signal(signal.SIGTERM, handler)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, shards: TokenShards, reporters: list[Reporter]):
        self.cfg, self.env = cfg, env
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.runner = build_runner(cfg, env)
        self.engine = self.runner.engine
        self.dp_rank, self.dp_size = self.runner.dp_rank, self.runner.dp_size
        self.train_split, self.val_split = train_validation_split(shards, cfg.seq_length, cfg.validation_fraction)
        self.sampler = ResumableSampler(self.train_split.count, cfg.seed)
        self.global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps * self.dp_size
        self.flops_per_token = flops_per_token(cfg.architecture, cfg.seq_length)
        peak = cfg.peak_tflops or float(os.environ.get("NEOX_PEAK_TFLOPS", 0) or 0) or None
        self.peak_flops = peak * 1e12 * env.world_size if peak else None
        self.reporter = SafeReporter(reporters if env.rank == 0 else [])
        self.latest_step: int | None = None
        self.latest_time: float | None = None
        self.save_seconds: float | None = None

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int) -> float:
        start = time.perf_counter()
        tag = checkpoints.tag_for(step)
        Path(self.cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        client_state = {"step": step, "sampler": self.sampler.state_dict(), "rng": _rng_state(),
                        "data_parallel_size": self.dp_size, "config": self.cfg.to_dict()}
        self.engine.save_checkpoint(self.cfg.checkpoint_dir, tag=tag, client_state=client_state,
                                    save_latest=False)
        dist.barrier()  # every rank's shards are on disk before `latest` moves
        if self.env.rank == 0:
            checkpoints.write_latest(self.cfg.checkpoint_dir, tag)
            checkpoints.prune(self.cfg.checkpoint_dir, self.cfg.keep_last)
        dist.barrier()
        self.latest_step, self.latest_time = step, time.time()
        self.save_seconds = time.perf_counter() - start
        return self.save_seconds

    def resume(self) -> int:
        tag = checkpoints.resume_tag(self.cfg.checkpoint_dir, self.cfg.resume_from)
        if tag is None:
            return 0
        saved_dp = self._saved_dp_size(tag)
        if saved_dp != self.dp_size and self.cfg.zero_stage == 3:
            raise ValueError(f"zero_stage: a ZeRO-3 checkpoint saved with data-parallel size {saved_dp} cannot "
                             f"resume on {self.dp_size}; resume on {saved_dp} ranks or use stage 1/2")
        resized = saved_dp != self.dp_size
        _, client = self.engine.load_checkpoint(self.cfg.checkpoint_dir, tag=tag, load_optimizer_states=not resized,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"checkpoint {tag} in {self.cfg.checkpoint_dir} could not be loaded")
        if resized:
            self._load_resized_zero_optimizer(tag)
            log.info("Resumed on another data-parallel size saved_dp=%d dp=%d", saved_dp, self.dp_size)
        self.sampler.load_state_dict(client["sampler"])
        _set_rng_state(client["rng"])
        self.latest_step, self.latest_time = client["step"], time.time()
        log.info("Resumed from checkpoint tag=%s step=%d", tag, client["step"])
        return client["step"]

    def _load_resized_zero_optimizer(self, tag: str) -> None:
        # DeepSpeed's engine refuses a ZeRO checkpoint from another DP size, but its ZeRO-1/2
        # optimizer re-partitions elastic checkpoints (see deepspeed_config: elastic_checkpoint)
        # from the full list of saved partitions; we hand it that list ourselves.
        engine = self.engine
        states = engine._get_all_zero_checkpoints(self.cfg.checkpoint_dir, tag)
        engine.optimizer.load_state_dict(state_dict_list=states, load_optimizer_states=True,
                                         load_from_fp32_weights=True, checkpoint_folder=None, load_serial=None,
                                         param_shapes=engine._get_zero_param_shapes())

    def _saved_dp_size(self, tag: str) -> int:
        if not self.cfg.zero_stage:
            return self.dp_size  # optimizer state is replicated: any DP size loads it
        files = (Path(self.cfg.checkpoint_dir) / tag).glob("zero_pp_rank_*_optim_states.pt")
        return max(1, len({re.match(r"zero_pp_rank_(\d+)_", f.name).group(1) for f in files}))

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """Mean loss on the first eval_iters x DP micro-batches of the held-out split (fixed)."""
        if self.val_split.count == 0:
            return None
        mb = self.cfg.micro_batch_size
        micro = []
        for i in range(self.cfg.eval_iters):
            first = (i * self.dp_size + self.dp_rank) * mb
            micro.append(np.stack([self.val_split.window(j % self.val_split.count) for j in range(first, first + mb)]))
        return self.runner.eval_loss(micro)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop_at_step: int | None = None) -> TrainResult:
        cfg = self.cfg
        stop = _StopFlag()
        stop.install()
        step = self.resume()
        result = TrainResult(first_step=step, last_step=step)
        if step >= cfg.train_steps:  # a finished run started again (its resource re-created): say where it is
            self._report(step, None, lr_at(step, cfg), None, 0.0, 0.0, "done")
        data = batches(self.train_split, self.sampler, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                       self.dp_rank, self.dp_size)
        window_start, window_steps = time.perf_counter(), 0
        run_start = time.perf_counter()
        while step < cfg.train_steps:
            lr = lr_at(step, cfg)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
                group["step"] = step  # read by DeepSpeed's elastic ZeRO checkpoints; torch AdamW ignores it
            loss = self.runner.train_step(next(data))
            step += 1
            window_steps += 1
            result.losses[step] = loss
            val_loss = None
            if step % cfg.eval_interval == 0 or step == cfg.train_steps:
                val_loss = self.evaluate()
                result.val_losses[step] = val_loss
            preempted = _any_rank(stop.set or step == stop_at_step, self.env.device)
            if step % cfg.checkpoint_interval == 0 or step == cfg.train_steps or preempted:
                seconds = self.save(step)
                result.checkpoint_seconds.append(seconds)
                log.info("Saved checkpoint step=%d seconds=%.2f", step, seconds)
            if step % cfg.log_interval == 0 or val_loss is not None or preempted or step == cfg.train_steps:
                elapsed = time.perf_counter() - window_start
                self._report(step, loss, lr, val_loss, elapsed / window_steps,
                             (time.perf_counter() - run_start) / (step - result.first_step),
                             "preempted" if preempted else "done" if step == cfg.train_steps else "progress")
                window_start, window_steps = time.perf_counter(), 0
            result.last_step = step
            if preempted:
                result.preempted = True
                break
        return result

    def _report(self, step, loss, lr, val_loss, step_seconds, avg_step_seconds, event) -> None:
        tokens_per_step = self.global_batch * self.cfg.seq_length
        tps = tokens_per_step / step_seconds if step_seconds > 0 else None
        mfu = tps * self.flops_per_token / self.peak_flops if tps and self.peak_flops else None
        self.reporter.report(ProgressReport(
            step=step, total_steps=self.cfg.train_steps, tokens=step * tokens_per_step, loss=loss, lr=lr,
            tokens_per_sec=tps, mfu=mfu, eta_seconds=(self.cfg.train_steps - step) * avg_step_seconds,
            latest_checkpoint_step=self.latest_step, latest_checkpoint_time=self.latest_time,
            val_loss=val_loss, checkpoint_seconds=self.save_seconds, event=event))


def default_reporters(cfg: TrainConfig) -> list[Reporter]:
    """Human line always; JSON lines to cfg.progress_file; NEOX_PROGRESS (the operator contract):
    `kubernetes` patches the CR status, `file:PATH` appends JSON lines, `off` adds nothing."""
    reporters: list[Reporter] = [LineReporter()]
    if cfg.progress_file:
        reporters.append(JsonLinesReporter(cfg.progress_file))
    target = os.environ.get("NEOX_PROGRESS", "off")
    if target.startswith("file:"):
        reporters.append(JsonLinesReporter(target.removeprefix("file:")))
    elif target == "kubernetes":
        try:
            from neox_runtime.reporting.kubernetes import KubernetesReporter

            reporter = KubernetesReporter.from_env()
            if reporter is not None:
                reporters.append(reporter)
        except Exception as e:  # noqa: BLE001 - no status reporting is better than no training
            log.warning("Kubernetes progress reporter unavailable error=%r", e)
    return reporters


def open_data(cfg: TrainConfig) -> TokenShards:
    shards = TokenShards(cfg.train_data)
    if shards.vocab_size > cfg.architecture.vocab_size:
        raise ValueError(f"architecture.vocab_size: {cfg.architecture.vocab_size} is smaller than the "
                         f"tokenizer's vocabulary ({shards.vocab_size}) in {cfg.train_data}")
    train_validation_split(shards, cfg.seq_length, cfg.validation_fraction)  # enough tokens?
    return shards


def train(cfg: TrainConfig, reporters: list[Reporter] | None = None, stop_at_step: int | None = None) -> TrainResult:
    cfg.validate_world(int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
    shards = open_data(cfg)
    env = init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    trainer = Trainer(cfg, env, shards, default_reporters(cfg) if reporters is None else reporters)
    return trainer.run(stop_at_step=stop_at_step)
