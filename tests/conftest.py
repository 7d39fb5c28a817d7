"""Test-wide setup: make hack/localcluster importable and pin CPU-friendly defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "hack"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
