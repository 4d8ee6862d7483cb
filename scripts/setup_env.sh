#!/usr/bin/env bash
# Create .venv (if missing) and install teonspeed with the pinned stack. Idempotent: a second run only
# checks a stamp, so it costs about a second. torch is installed first and pinned, so that pip never
# resolves it to a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TEONSPEED_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.teonspeed-installed"
WANT="$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
export DS_BUILD_OPS=0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,launch]"
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
if not torch.cuda.is_available():
    assert "+cpu" in torch.__version__ or torch.version.cuda is None, f"a CUDA torch build on a CPU machine: {torch.__version__}"
PY
echo "$WANT" > "$STAMP"
