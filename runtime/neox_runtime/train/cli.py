"""`neox-train --config FILE`: the entry point every training rank runs (under torchrun or alone).

The config is validated before any process group starts, so a bad field fails fast with
exit code 2 and a message naming it, instead of a hung rendezvous. Where the ranks come
from (`launch.plan_launch`): under torchrun this process is one of them; in a pod the
operator's env says how many to start; run by hand with a NeoXTraining manifest, the
manifest's ranks per node are started on this machine, so its global batch is the one it
declares. The exit code says how the run ended: 0 only when it reached its final step,
`contract.EXIT_PREEMPTED` when it stopped before (SIGTERM) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from neox_runtime.api import contract
from neox_runtime.train.config import load_config

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neox-train", description=__doc__)
    parser.add_argument("--config", default=os.environ.get("NEOX_CONFIG"), required="NEOX_CONFIG" not in os.environ,
                        help="TrainConfig YAML/JSON, a NeoXTraining manifest, its spec, or the operator's resolved "
                             "document (default: $NEOX_CONFIG)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of one device, for MFU (else NEOX_PEAK_TFLOPS; unset: no MFU)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="behave as if preempted at this step: checkpoint and exit "
                             f"{contract.EXIT_PREEMPTED} (drills, tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("NEOX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        if args.peak_tflops is not None:
            cfg.peak_tflops = args.peak_tflops
            cfg.__post_init__()
        from neox_runtime.launch import launch_local_ranks, plan_launch

        rendezvous = plan_launch(manifest_layout=manifest_layout(args.config))
        if rendezvous is not None:
            cfg.validate_world(rendezvous.world_size)
            if rendezvous.nproc_per_node > 1:  # start this pod's (or this machine's) ranks, then wait for them
                return launch_local_ranks([sys.executable, "-m", "neox_runtime.train.cli",
                                           *(sys.argv[1:] if argv is None else argv)], rendezvous)
            os.environ.update(rendezvous.rank_env(0))  # one rank in this pod: this process is it
        from neox_runtime.train.loop import train  # imports torch/deepspeed only for a valid config

        result = train(cfg, stop_at_step=args.stop_at_step)
        # Stopping already: a SIGTERM now (a launcher or kubelet repeating itself) must not kill the
        # exit half-way, after Python has put the default handler back, and turn it into 143.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError as e:
        print(f"neox-train: invalid configuration: {e}", file=sys.stderr)
        return 2
    log.info("Training stopped step=%d of %d preempted=%s", result.last_step, cfg.train_steps, result.preempted)
    # A SIGTERM that lands on the final step still finished the run; any earlier stop did not.
    return 0 if result.last_step >= cfg.train_steps else contract.EXIT_PREEMPTED


def manifest_layout(path: str | Path) -> tuple[int, int] | None:
    """(nodes, ranks per node) when `path` holds a NeoXTraining (manifest, spec or resolved); else None.

    `load_config` has read and validated the file already; this only asks the resolved
    training how many processes it declares, by the same test `load_config` applies.
    """
    from neox_runtime.api.resolved import load_document
    from neox_runtime.train.config import is_custom_resource

    path = Path(path)
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    if not is_custom_resource(data):
        return None
    resolved = load_document(data)
    return resolved.spec.parallelism.nodes, resolved.ranks_per_node


if __name__ == "__main__":
    sys.exit(main())
