#!/usr/bin/env bash
# The test command: set up the environment (if needed) and run the whole suite on the CPU.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k teon -x
set -euo pipefail
cd "$(dirname "$0")/.."
# The main job's packages plus the test extras (setup.py's "dev": pytest, Triton, transformers, accelerate).
bash scripts/setup_env.sh dev,launch
VENV="${TEONSPEED_VENV:-.venv}"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1
# Lint and format first (ruff.toml: lines <= 110): a second or so, and a failure names the file and line.
LINTED=(plugin launch bench tests examples)
"$VENV/bin/python" -m ruff check -q "${LINTED[@]}"
"$VENV/bin/python" -m ruff format --check -q "${LINTED[@]}"
set +e
"$VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
