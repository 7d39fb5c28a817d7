"""`neox-train --config MANIFEST` by hand, without Kubernetes, runs what the manifest declares.

The README's example manifest (`processesPerNode: 2`) starts two real DeepSpeed ranks on
this machine, so its global batch is the 16 it declares, not half of it; a SIGTERM to the
command makes both ranks checkpoint and the command exit EXIT_PREEMPTED, not 0; a manifest
of two nodes is refused, since one machine cannot play them.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runtime_helpers import byte_shards, env
from neox_runtime.api import contract
from neox_runtime.train import checkpoints

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "training-tiny-cpu.yaml"


def _manifest(tmp_path: Path, steps: int, **parallelism) -> Path:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    spec = manifest["spec"]
    spec["training"].update(steps=steps, evalInterval=2, logInterval=1, seqLength=64)
    spec["checkpoint"].update(interval=2)
    spec["parallelism"].update(parallelism)
    if parallelism:
        spec["training"].pop("globalBatchSize")
    byte_shards(tmp_path / spec["data"]["path"])  # run by hand, the data path is relative to the directory
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _neox_train(tmp_path: Path, manifest: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neox_runtime.train.cli", "--config", str(manifest)],
                            cwd=tmp_path, env=env(NEOX_PROGRESS=f"file:{tmp_path / 'progress.jsonl'}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reports(tmp_path: Path) -> list[dict]:
    path = tmp_path / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_the_example_manifest_by_hand_trains_on_its_two_ranks_with_its_global_batch(tmp_path):
    proc = _neox_train(tmp_path, _manifest(tmp_path, steps=4))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    last = _reports(tmp_path)[-1]
    assert (last["step"], last["event"]) == (4, "done")
    assert last["tokens"] == 4 * 16 * 64  # global batch 16 = 8 per micro-batch × 2 data-parallel ranks
    checkpoint = tmp_path / "checkpoints" / "tiny-cpu" / "global_step4"
    assert len(list(checkpoint.glob("*optim_states.pt"))) == 2  # ZeRO-1: one optimizer partition per rank


@pytest.mark.slow
def test_sigterm_by_hand_checkpoints_both_ranks_and_exits_preempted(tmp_path):
    proc = _neox_train(tmp_path, _manifest(tmp_path, steps=10_000))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(_reports(tmp_path)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the command only; it forwards to its ranks, as a pod's would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == contract.EXIT_PREEMPTED, stderr[-3000:]
    last = _reports(tmp_path)[-1]
    assert last["event"] == "preempted" and last["step"] < 10_000
    ckpt = tmp_path / "checkpoints" / "tiny-cpu"
    assert checkpoints.read_latest(ckpt) == contract.checkpoint_tag(last["step"])
    assert len(list((ckpt / contract.checkpoint_tag(last["step"])).glob("*optim_states.pt"))) == 2


def test_a_manifest_of_two_nodes_by_hand_is_refused_naming_the_field(tmp_path):
    proc = _neox_train(tmp_path, _manifest(tmp_path, steps=4, nodes=2))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "parallelism.nodes: 2 nodes cannot be started by hand" in stderr
    assert not (tmp_path / "checkpoints").exists()
