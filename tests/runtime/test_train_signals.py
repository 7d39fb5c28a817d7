"""Preemption and crash safety: SIGTERM leaves a complete checkpoint and exits EXIT_PREEMPTED;
a failed save never moves `latest`."""

import json
import signal
import subprocess
import sys
import time

import pytest

from runtime_helpers import TINY_ARCH, env, neox_train, write_config
from neox_runtime.api import contract
from neox_runtime.train import checkpoints


def _config(tmp_path, data, **over):
    fields = dict(architecture=TINY_ARCH, train_data=str(data), seq_length=32, micro_batch_size=2,
                  train_steps=100000, warmup_steps=2, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_interval=2,
                  keep_last=2, eval_interval=1000, progress_file=str(tmp_path / "progress.jsonl"))
    fields.update(over)
    return write_config(tmp_path / "cfg.yaml", **fields)


@pytest.mark.slow
def test_sigterm_saves_complete_checkpoint_and_exits_preempted(tmp_path, byte_data):
    config = _config(tmp_path, byte_data, checkpoint_interval=10**6)
    proc = subprocess.Popen([sys.executable, "-m", "neox_runtime.train.cli", "--config", config], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "progress.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.exists() and len(progress.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == contract.EXIT_PREEMPTED, stderr[-2000:]  # stopped early: never 0
    last = json.loads(progress.read_text().splitlines()[-1])
    assert last["event"] == "preempted"
    tag = checkpoints.read_latest(tmp_path / "ckpt")
    assert tag == f"global_step{last['step']}" and last["latest_checkpoint_step"] == last["step"]
    assert (tmp_path / "ckpt" / tag / "mp_rank_00_model_states.pt").stat().st_size > 0
    # the checkpoint is usable: a new run resumes right after it
    resumed = neox_train(_config(tmp_path, byte_data, train_steps=last["step"] + 1, checkpoint_interval=10**6))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in progress.read_text().splitlines()]
    assert steps[-1] == last["step"] + 1 and steps.count(last["step"] + 1) == 1


@pytest.mark.slow
def test_failed_save_keeps_previous_latest_and_prunes_to_keep_last(tmp_path, byte_data):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "global_step8").write_text("a file where the step-8 directory must go")
    proc = neox_train(_config(tmp_path, byte_data, train_steps=10))
    assert proc.returncode != 0
    assert checkpoints.read_latest(tmp_path / "ckpt") == "global_step6"
    assert checkpoints.list_tags(tmp_path / "ckpt") == ["global_step4", "global_step6"]


def test_latest_pointer_is_replaced_atomically_and_ignores_missing_tags(tmp_path):
    (tmp_path / "global_step3").mkdir()
    checkpoints.write_latest(tmp_path, "global_step3")
    assert checkpoints.read_latest(tmp_path) == "global_step3"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    checkpoints.write_latest(tmp_path, "global_step9")  # points at nothing (e.g. a deleted dir)
    assert checkpoints.read_latest(tmp_path) is None


def test_bad_config_fails_fast_naming_the_field(tmp_path, byte_data):
    started = time.time()
    proc = neox_train(_config(tmp_path, byte_data, zero_stage=5))
    assert proc.returncode == 2 and "zero_stage" in proc.stderr
    # a layout that does not fit the world is refused before any rendezvous (no MASTER_ADDR here)
    config = _config(tmp_path, byte_data, tensor_parallel=4)
    proc = subprocess.run([sys.executable, "-m", "neox_runtime.train.cli", "--config", config],
                          env=env(WORLD_SIZE="6", RANK="0", LOCAL_RANK="0"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "tensor_parallel" in proc.stderr
    assert time.time() - started < 30
