#!/usr/bin/env bash
# Fill .whl/ with what a bare GPU machine (Python 3.12, x86-64 manylinux, CUDA torch, Triton and the usual
# scientific stack preinstalled, no network) lacks to run scripts/gpu_check.sh: the pinned DeepSpeed and
# megatron-core and the pure-Python (or cp312) packages DeepSpeed needs that such a machine does not have.
# Run it where PyPI is reachable; .whl/ is git-ignored and travels with the checkout (about 8 MiB).
#
#   bash scripts/fetch_gpu_wheels.sh          # then: bash scripts/gpu_check.sh on the GPU machine
#
# DeepSpeed publishes only a source distribution: its wheel is built here, with DS_BUILD_OPS=0 (no CUDA
# ops compiled; DeepSpeed builds what it needs at run time), which makes a py3-none-any wheel that
# installs on any Python 3. Building it imports torch, so it uses the project's .venv (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${WHEEL_DIR:-.whl}"
PY="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# The target: CPython 3.12 on x86-64 manylinux (pip matches each tag exactly, so list the usual ones).
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
        --platform any)

# megatron-core ships cp312 wheels; the rest are what DeepSpeed 0.19.8 requires beyond the GPU image
# (einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo and tqdm are there already): hjson and
# pydantic 2 with its parts. Versions: the ones this project's CPU environment was verified with.
PINNED=(megatron-core==0.16.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0)
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "${PINNED[@]}"

DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8

# One version of each package (two would stop the install there).
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
  echo "fetch_gpu_wheels.sh: more than one wheel of: $dupes" >&2
  exit 1
fi
size_kib=$(du -sk "$DEST" | cut -f1)
ls -l "$DEST"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, ${size_kib} KiB in $DEST (the device tool carries at most 64 MiB in all)"
if (( size_kib > 48 * 1024 )); then
  echo "fetch_gpu_wheels.sh: $DEST is over 48 MiB; the checkout and it must stay under 64 MiB together" >&2
  exit 1
fi
