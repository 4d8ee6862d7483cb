#!/usr/bin/env bash
# Create .venv (if missing) and install teonspeed with the pinned stack and the extras named by the first
# argument (setup.py's extras_require, comma-separated):
#   bash scripts/setup_env.sh                 # deepspeed,megatron,launch: what the main job needs
#   bash scripts/setup_env.sh dev,launch      # scripts/test.sh: that plus pytest, Triton, transformers
# Idempotent: the stamp records what setup.py and this script looked like and which extras are in .venv, so a
# second run only compares it (about a second); asking for extras not there yet installs them (keeping the
# others). torch is installed first and pinned, so that pip never resolves it to a multi-GB CUDA build on a
# CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-deepspeed,megatron,launch}"
VENV="${TEONSPEED_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.teonspeed-installed"
WANT="$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)"
sorted() { tr ', ' '\n\n' | sed '/^$/d' | sort -u | paste -sd, -; }   # "b,a,b" -> "a,b"

have_hash="" have_extras=""
if [[ -f "$STAMP" ]]; then
  read -r have_hash have_extras < "$STAMP" || true
fi
have_extras="$(sorted <<< "$have_extras")"
all_extras="$(sorted <<< "$have_extras,$EXTRAS")"
if [[ "$have_hash" == "$WANT" && "$all_extras" == "$have_extras" ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
export DS_BUILD_OPS=0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$all_extras]"
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
if not torch.cuda.is_available():
    assert "+cpu" in torch.__version__ or torch.version.cuda is None, f"a CUDA torch build on a CPU machine: {torch.__version__}"
PY
echo "$WANT $all_extras" > "$STAMP"
