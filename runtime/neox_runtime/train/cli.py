"""`neox-train --config FILE`: the entry point every training rank runs (under torchrun or alone).

The config is validated before any process group starts, so a bad field fails fast with
exit code 2 and a message naming it, instead of a hung rendezvous.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from neox_runtime.train.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neox-train", description=__doc__)
    parser.add_argument("--config", default=os.environ.get("NEOX_CONFIG"), required="NEOX_CONFIG" not in os.environ,
                        help="TrainConfig YAML/JSON, a NeoXTraining manifest, its spec, or the operator's resolved "
                             "document (default: $NEOX_CONFIG)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of one device, for MFU (else NEOX_PEAK_TFLOPS; unset: no MFU)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="behave as if preempted at this step: checkpoint and exit 0 (drills, tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("NEOX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        if args.peak_tflops is not None:
            cfg.peak_tflops = args.peak_tflops
            cfg.__post_init__()
        from neox_runtime.launch import Rendezvous, launch_local_ranks, needs_local_launch

        if needs_local_launch():  # a pod with several ranks and no torchrun: start them here
            cfg.validate_world(Rendezvous.from_env().world_size)
            return launch_local_ranks([sys.executable, "-m", "neox_runtime.train.cli",
                                       *(sys.argv[1:] if argv is None else argv)])
        from neox_runtime.train.loop import train  # imports torch/deepspeed only for a valid config

        result = train(cfg, stop_at_step=args.stop_at_step)
    except ValueError as e:
        print(f"neox-train: invalid configuration: {e}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("Training stopped step=%d preempted=%s", result.last_step, result.preempted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
