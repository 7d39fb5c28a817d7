# Sourced by hack/test and hack/demo: a Python environment with everything the project
# needs, created once under ~/.cache/neox and reused (torch is several GB).
# Re-installs the project's dependencies only when pyproject.toml changes.
set -euo pipefail
NEOX_CACHE="${NEOX_CACHE:-$HOME/.cache/neox}"
NEOX_VENV="${NEOX_VENV:-$NEOX_CACHE/venv}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NEOX_CACHE DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

if [ ! -x "$NEOX_VENV/bin/python" ]; then
  echo "Creating the Python environment in $NEOX_VENV" >&2
  mkdir -p "$NEOX_CACHE"
  python3.11 -m venv "$NEOX_VENV" 2>/dev/null || python3 -m venv "$NEOX_VENV"
  "$NEOX_VENV/bin/pip" install -q --upgrade pip wheel setuptools
fi
# shellcheck disable=SC1091
. "$NEOX_VENV/bin/activate"

stamp="$NEOX_VENV/.neox-deps-$(sha256sum "$repo_root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Installing dependencies (torch first: DeepSpeed builds against it)" >&2
  python -c "import torch" 2>/dev/null || pip install -q torch
  # DeepSpeed compiles its ops just in time; on CPU none are needed up front.
  python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 pip install -q --no-build-isolation deepspeed
  pip install -q -e "$repo_root[dev]"
  touch "$stamp"
else
  # The checkout may have moved (CI clones afresh): re-point the editable install, cheaply.
  python -c "import neox_runtime, sys; sys.exit(not neox_runtime.__file__.startswith('$repo_root'))" 2>/dev/null \
    || pip install -q --no-deps -e "$repo_root"
fi
export NEOX_PYTHON="$NEOX_VENV/bin/python"
