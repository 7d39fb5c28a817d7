"""The per-pod launcher starts every local rank with torchrun-style env, fails as a group,
and reports a preempted pod as preempted; `plan_launch` says who starts the ranks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from neox_runtime.api import contract
from neox_runtime.launch import Rendezvous, launch_local_ranks, plan_launch, pod_exit_code

WRITE_ENV = ("import json, os, sys; json.dump({k: os.environ[k] for k in "
             "('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}, "
             "open(sys.argv[1] + '/rank-' + os.environ['RANK'], 'w'))")
# A rank as neox-train behaves on SIGTERM: it saves (a moment), then exits EXIT_PREEMPTED; while
# it exits, another SIGTERM would kill it (Python has put the default handler back by then).
PREEMPTIBLE_RANK = f"""
import os, signal, sys, time
def stop(*_):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(0.2 + 0.8 * int(os.environ["LOCAL_RANK"]))  # rank 0 is done first, rank 1 still saving
    sys.exit({contract.EXIT_PREEMPTED})
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1] + "/ready-" + os.environ["LOCAL_RANK"], "w").close()
time.sleep(60)
"""
# The pod's main process: neox-train's launcher with two local ranks.
POD = """
import sys
from neox_runtime.launch import Rendezvous, launch_local_ranks
sys.exit(launch_local_ranks([sys.executable, "-c", sys.argv[1], sys.argv[2]], Rendezvous(1, 2, 0, "x", 1)))
"""


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


def test_a_sigterm_to_the_pod_makes_it_exit_preempted_once_every_rank_saved(tmp_path):
    pod = subprocess.Popen([sys.executable, "-c", POD, PREEMPTIBLE_RANK, str(tmp_path)])
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pod.send_signal(signal.SIGTERM)  # to the pod's main process only, as a kubelet does
    assert pod.wait(timeout=30) == contract.EXIT_PREEMPTED  # not 0, and rank 1 was not killed mid-exit (143)


@pytest.mark.parametrize(("codes", "pod"), [
    ([0, 0], 0),
    ([75, 75], 75),
    ([0, 75], 75),       # a rank that finished does not make an unfinished peer a success
    ([75, 1, 75], 1),    # a real failure wins over preemption: the checkpoint may be incomplete
    ([-9, 75], 137),     # killed by SIGKILL, as a shell reports it
    ([3, 7], 3),         # the first failure is the cause
])
def test_pod_exit_code_from_its_ranks(codes, pod):
    assert contract.EXIT_PREEMPTED == 75
    assert pod_exit_code(codes) == pod


def test_torchrun_or_the_launcher_made_this_process_a_rank():
    assert plan_launch({"RANK": "0", "WORLD_SIZE": "2", "NPROC_PER_NODE": "2"}, (1, 2)) is None


def test_in_a_pod_the_operator_env_decides_even_for_one_rank():
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "NODE_RANK": "1", "MASTER_ADDR": "t-a0-0.t-workers.ns.svc",
           "MASTER_PORT": "29500"}
    rendezvous = plan_launch(env, (1, 4))  # the env wins over the manifest: it is what the operator rendered
    assert rendezvous == Rendezvous(2, 1, 1, "t-a0-0.t-workers.ns.svc", 29500)
    assert rendezvous.rank_env(0)["RANK"] == "1" and rendezvous.rank_env(0)["WORLD_SIZE"] == "2"


def test_by_hand_a_manifest_starts_its_ranks_on_this_machine():
    rendezvous = plan_launch({}, (1, 2))
    assert (rendezvous.nnodes, rendezvous.nproc_per_node, rendezvous.master_addr) == (1, 2, "127.0.0.1")
    assert 0 < rendezvous.master_port < 65536
    assert plan_launch({}, (1, 1)) is None  # one rank: this process
    assert plan_launch({}, None) is None  # a plain runtime config: one process, torchrun for more


def test_by_hand_a_manifest_of_several_nodes_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"parallelism.nodes: 2 nodes .*--nnodes 2 --nproc-per-node 4"):
        plan_launch({}, (2, 4))
