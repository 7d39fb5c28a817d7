"""The operator–runtime contract: env vars and paths a pod reads, and nothing else.

Rendezvous follows torchrun's conventions so the same entry point runs under torchrun,
under the operator, or as a single process on a laptop.
"""

from __future__ import annotations

MASTER_PORT = 29500
CONFIG_MOUNT = "/etc/neox"
CONFIG_FILE = f"{CONFIG_MOUNT}/config.yaml"
CHECKPOINT_MOUNT = "/checkpoints"
DATA_MOUNT = "/data"
SHM_MOUNT = "/dev/shm"

# Rendezvous (torchrun names).
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_NNODES = "NNODES"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_NODE_RANK = "NODE_RANK"  # from the Job completion index
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"

# What the runtime needs to know about itself.
ENV_CONFIG = "NEOX_CONFIG"
ENV_TRAINING_NAME = "NEOX_TRAINING_NAME"
ENV_NAMESPACE = "NEOX_NAMESPACE"
ENV_ATTEMPT = "NEOX_ATTEMPT"
ENV_POD_NAME = "NEOX_POD_NAME"
ENV_CHECKPOINT_DIR = "NEOX_CHECKPOINT_DIR"
ENV_DATA_DIR = "NEOX_DATA_DIR"  # the data directory, inside whichever volume holds it
ENV_PROGRESS = "NEOX_PROGRESS"  # "kubernetes" (patch the CR's status), "file:PATH" or "off"
ENV_DS_ACCELERATOR = "DS_ACCELERATOR"

# Exit status of a rank (and so of its pod) that stopped before its final step because it was
# asked to (SIGTERM: preemption, node drain, eviction) after saving a checkpoint. It is
# sysexits' EX_TEMPFAIL, "try again later": never 0, so an unfinished run is never read as a
# success, and not 128 + a signal, so it is not confused with a rank killed before it saved.
# The operator restarts the group from the latest checkpoint on it, without counting the
# restart against spec.failurePolicy.maxRestarts.
EXIT_PREEMPTED = 75

# Field manager the runtime writes status with (the operator uses its own).
RUNTIME_FIELD_MANAGER = "neox-runtime"


def checkpoint_tag(step: int) -> str:
    """The directory (DeepSpeed's tag) of the checkpoint of `step`, under the checkpoint volume's root."""
    return f"global_step{step}"
