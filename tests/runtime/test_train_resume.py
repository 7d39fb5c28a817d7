"""Exact resume: stopping at step k and resuming gives the losses of an uninterrupted run.

Real torchrun processes on gloo; ZeRO 1 and 2 on 2 ranks, and a 2 -> 1 rank resume.
"""

import json
import shutil

import pytest

from runtime_helpers import TINY_ARCH, losses, neox_train, write_config
from neox_runtime.api import contract


def _config(tmp_path, name, data, zero_stage, accumulation, steps=6):
    return write_config(
        tmp_path / f"{name}.yaml", architecture=TINY_ARCH, train_data=str(data), seq_length=32,
        micro_batch_size=2, gradient_accumulation_steps=accumulation, train_steps=steps, lr=3e-3, min_lr=3e-4,
        warmup_steps=2, zero_stage=zero_stage, checkpoint_dir=str(tmp_path / f"ckpt-{name}"),
        checkpoint_interval=100, eval_interval=100, progress_file=str(tmp_path / f"{name}.jsonl"), seed=7)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_stop_and_resume_matches_uninterrupted_run(tmp_path, byte_data, zero_stage):
    _ok(neox_train(_config(tmp_path, "full", byte_data, zero_stage, 2), 2))
    resumed = _config(tmp_path, "resumed", byte_data, zero_stage, 2)
    stopped = neox_train(resumed, 2, "--stop-at-step", "3")
    # Stopped before its final step: the ranks exit EXIT_PREEMPTED, which torchrun reports as a failure.
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert f"exitcode  : {contract.EXIT_PREEMPTED}" in stopped.stderr
    assert (tmp_path / "ckpt-resumed" / "latest").read_text().strip() == "global_step3"
    # the same checkpoint, resumed on one rank (same global batch: 2 x 4 instead of 2 x 2 x 2)
    shutil.copytree(tmp_path / "ckpt-resumed", tmp_path / "ckpt-dp1")
    shutil.copy(tmp_path / "resumed.jsonl", tmp_path / "dp1.jsonl")
    _ok(neox_train(resumed, 2))
    _ok(neox_train(_config(tmp_path, "dp1", byte_data, zero_stage, 4), 1))

    full, again, dp1 = (losses(tmp_path / f"{n}.jsonl") for n in ("full", "resumed", "dp1"))
    assert sorted(full) == sorted(again) == sorted(dp1) == list(range(1, 7))
    assert again == full  # bit-exact on the same layout
    for step in range(4, 7):  # another DP size only changes float summation order
        assert abs(dp1[step] - full[step]) < 1e-5, (step, dp1[step], full[step])
    assert full[6] < full[1]


def test_a_finished_run_started_again_reports_its_final_step_and_checkpoint(tmp_path, byte_data):
    """What a re-created NeoXTraining needs: status says done at the last step, the checkpoint named."""
    config = _config(tmp_path, "again", byte_data, 1, 1, steps=3)
    _ok(neox_train(config, 1))
    (tmp_path / "again.jsonl").unlink()
    _ok(neox_train(config, 1))
    records = [json.loads(line) for line in open(tmp_path / "again.jsonl")]
    assert [(r["event"], r["step"], r["latest_checkpoint_step"]) for r in records] == [("done", 3, 3)]
