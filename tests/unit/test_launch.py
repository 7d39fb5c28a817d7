"""The per-pod launcher starts every local rank with torchrun-style env, and fails as a group."""

from __future__ import annotations

import json
import sys
import time

from neox_runtime.launch import Rendezvous, launch_local_ranks, needs_local_launch

WRITE_ENV = ("import json, os, sys; json.dump({k: os.environ[k] for k in "
             "('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}, "
             "open(sys.argv[1] + '/rank-' + os.environ['RANK'], 'w'))")


def test_each_local_rank_gets_its_global_rank(tmp_path):
    rendezvous = Rendezvous(nnodes=3, nproc_per_node=2, node_rank=1, master_addr="node0", master_port=1234)
    assert launch_local_ranks([sys.executable, "-c", WRITE_ENV, str(tmp_path)], rendezvous) == 0
    ranks = {json.load(open(p))["RANK"]: json.load(open(p)) for p in tmp_path.iterdir()}
    assert sorted(ranks) == ["2", "3"]
    assert ranks["3"] == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "6",
                          "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}


def test_one_failing_rank_stops_the_others_and_fails_the_pod():
    rendezvous = Rendezvous(nnodes=1, nproc_per_node=2, node_rank=0, master_addr="x", master_port=1)
    script = "import os, sys, time; sys.exit(7) if os.environ['LOCAL_RANK'] == '1' else time.sleep(60)"
    started = time.monotonic()
    assert launch_local_ranks([sys.executable, "-c", script], rendezvous) == 7
    assert time.monotonic() - started < 30


def test_launch_is_needed_only_without_rank_and_with_several_ranks():
    assert needs_local_launch({"NPROC_PER_NODE": "2"})
    assert not needs_local_launch({"NPROC_PER_NODE": "2", "RANK": "0"})
    assert not needs_local_launch({"NPROC_PER_NODE": "1"})
