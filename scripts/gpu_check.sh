#!/usr/bin/env bash
# Everything that needs a GPU, in one command, from a bare GPU machine (Python 3.12 and a CUDA torch
# preinstalled, no network): under 9 minutes on one H100.
#
#   bash scripts/fetch_gpu_wheels.sh      # once, on a machine with PyPI: DeepSpeed + megatron-core -> .whl/
#   bash scripts/gpu_check.sh             # on the GPU machine (the repo with .whl/ beside it)
#   bash scripts/gpu_check.sh --cpu-smoke # any machine: every stage at toy size on the CPU (gloo), results
#                                         # to $RESULTS_DIR (default /tmp/teonspeed_gpu_check_smoke)
#   bash scripts/gpu_check.sh --dry-run   # print the stages and their commands, run nothing
#
# Stages, each under its own time limit (LIMIT_<STAGE>=seconds overrides), so one failure or hang
# cannot eat the others; the outcome of each is recorded either way:
#   kernel_tests    tests/unit/test_kernels.py on CUDA (compiled Triton vs the torch path, bf16 and fp32)
#   kernel_bench    bench/kernel.py: Triton vs torch bf16 vs torch.compile, 4 shapes x batches 1-16,
#                   TFLOP/s and % of the bf16 matmul peak measured in the same run
#   optimizer_step  bench/optimizer_step.py at LLaMA-130M and 1B, bf16 compute: Muon/TEON/HTMuon vs fused
#                   AdamW vs DeepSpeed 0.19.8's shipped Muon (eager and torch.compile), peak memory
#   world1_step     bench/gpu_world1.py: one NCCL world-1 distributed step == the local step
#   pretrain_adamw  launch/pretrain.py, one process, DeepSpeed engine, bf16, ZeRO-1, llama_60m, AdamW
#   pretrain_teon   the same with TEON
# Writes bench/results/{kernels,kernel,optimizer_step,world1,pretrain,gpu_check}_gpu.{json,md} (each names
# the GPU, driver, torch, Triton and CUDA versions); with $OUT set (the device tool) also
# $OUT/gpu_check_results.tar.gz (results + logs) and $OUT/gpu_check_gpu.md. Exit status: the number of
# failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

MODE=gpu
DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu_smoke ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg (use --cpu-smoke, --dry-run or --help)" >&2; exit 2 ;;
  esac
done

if [[ "$MODE" == gpu ]]; then
  PY="${PYTHON:-python3}"
  RES="${RESULTS_DIR:-$REPO/bench/results}"
  SFX=gpu
else
  PY="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
  RES="${RESULTS_DIR:-/tmp/teonspeed_gpu_check_smoke}"
  SFX=cpu_smoke
fi
LOGS="${LOG_DIR:-/tmp/teonspeed_gpu_check_logs}"
RUNS="${RUNS_DIR:-/tmp/teonspeed_gpu_check_runs}"
SITE="${TEONSPEED_SITE:-/tmp/teonspeed-site}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg DS_BUILD_OPS=0
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}"

# Per-stage limits (seconds). GPU defaults sum to 8.9 min with ~30 s of install; the smoke run is small.
if [[ "$MODE" == gpu ]]; then
  : "${LIMIT_KERNEL_TESTS:=50}" "${LIMIT_KERNEL_BENCH:=140}" "${LIMIT_OPTIMIZER_STEP:=150}"
  : "${LIMIT_WORLD1_STEP:=45}" "${LIMIT_PRETRAIN_ADAMW:=60}" "${LIMIT_PRETRAIN_TEON:=60}"
else
  : "${LIMIT_KERNEL_TESTS:=120}" "${LIMIT_KERNEL_BENCH:=120}" "${LIMIT_OPTIMIZER_STEP:=180}"
  : "${LIMIT_WORLD1_STEP:=60}" "${LIMIT_PRETRAIN_ADAMW:=180}" "${LIMIT_PRETRAIN_TEON:=180}"
  # CPU smoke: deterministic dtype choice and one thread per process (shared machines).
  export TEONSPEED_CPU_BF16="${TEONSPEED_CPU_BF16:-0}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TORCHDYNAMO_DISABLE=1
fi

# --------------------------------------------------------------------------------------- the stages
# launch/pretrain.py's flags (keep in step with its --help); it runs on the CPU unless told --device cuda.
PRETRAIN_GPU=(--device cuda --model-config configs/models/llama_60m.yaml --zero-stage 1 --steps 200 --warmup 20
              --micro-batch 8 --seq 256 --log-every 25 --eval-every 100 --eval-batches 4
              --progress off --no-tensorboard --no-plot --runs-dir "$RUNS")
PRETRAIN_SMOKE=(--zero-stage 1 --steps 6 --warmup 1 --micro-batch 2 --seq 32 --log-every 2 --eval-every 3
                --eval-batches 1 --progress off --no-tensorboard --no-plot --runs-dir "$RUNS")
if [[ "$MODE" == gpu ]]; then
  KERNEL_BENCH=(bench/kernel.py --out-dir "$RES")
  OPT_STEP=(bench/optimizer_step.py --device cuda --sizes 130m,1b --warmup 2 --repeats 5 --timeout 100
            --optimizers adamw,muon,ds_muon,teon,ds_muon_standard,htmuon,ds_muon+compile
            --budget-s $((LIMIT_OPTIMIZER_STEP - 20)) --stem optimizer_step_gpu --out-dir "$RES")
  WORLD1=(bench/gpu_world1.py --results-dir "$RES")
  PRETRAIN=("${PRETRAIN_GPU[@]}")
else
  KERNEL_BENCH=(bench/kernel.py --cpu-smoke --threads 1 --out-dir "$RES")
  OPT_STEP=(bench/optimizer_step.py --device cpu --sizes tiny --warmup 1 --repeats 1 --threads 1 --timeout 120
            --optimizers adamw,muon,ds_muon,teon --stem optimizer_step_cpu_smoke --out-dir "$RES")
  WORLD1=(bench/gpu_world1.py --cpu-smoke --results-dir "$RES")
  PRETRAIN=("${PRETRAIN_SMOKE[@]}")
fi
KERNEL_TESTS=(-m pytest -q -p no:cacheprovider tests/unit/test_kernels.py -k "not test_interpreted"
              --junitxml "$LOGS/kernels_junit.xml")
PRE_ADAMW=(launch/pretrain.py --optimizer adamw --ds-config configs/deepspeed/adamw_zero2_bf16.json
           --name gpu_check_adamw "${PRETRAIN[@]}")
PRE_TEON=(launch/pretrain.py --optimizer teon --ds-config configs/deepspeed/teon_zero2_bf16.json
          --name gpu_check_teon "${PRETRAIN[@]}")

if [[ "$DRY" == 1 ]]; then
  echo "mode $MODE, python $PY, results $RES, logs $LOGS, runs $RUNS"
  [[ "$MODE" == gpu ]] && echo "install: $PY -m pip install --no-index --no-deps --target $SITE .whl/*.whl ." \
    "($(ls .whl/*.whl 2>/dev/null | wc -l) wheels in .whl/)"
  printf 'kernel_tests   (%ss): %s\n' "$LIMIT_KERNEL_TESTS" "$PY ${KERNEL_TESTS[*]}"
  printf 'kernel_bench   (%ss): %s\n' "$LIMIT_KERNEL_BENCH" "$PY ${KERNEL_BENCH[*]}"
  printf 'optimizer_step (%ss): %s\n' "$LIMIT_OPTIMIZER_STEP" "$PY ${OPT_STEP[*]}"
  printf 'world1_step    (%ss): %s\n' "$LIMIT_WORLD1_STEP" "$PY ${WORLD1[*]}"
  printf 'pretrain_adamw (%ss): %s\n' "$LIMIT_PRETRAIN_ADAMW" "$PY ${PRE_ADAMW[*]}"
  printf 'pretrain_teon  (%ss): %s\n' "$LIMIT_PRETRAIN_TEON" "$PY ${PRE_TEON[*]}"
  exit 0
fi

T0=$(date +%s)
mkdir -p "$RES" "$LOGS" "$RUNS"
rm -f "$RES/gpu_check_stages.jsonl"
rm -rf "$RUNS/gpu_check_adamw" "$RUNS/gpu_check_teon"

# ----------------------------------------------------------------------------- install (GPU machine)
if [[ "$MODE" == gpu && -z "${SKIP_INSTALL:-}" ]]; then
  echo "== install into $SITE (no index: the wheels in .whl/ and this checkout)"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 100; }
  else
    echo "   no .whl/*.whl: using whatever DeepSpeed / megatron-core $PY already has (run scripts/fetch_gpu_wheels.sh)"
  fi
  # teonspeed itself, without its torch pin (the machine's CUDA torch is the one to test).
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" . \
    || { echo "gpu_check.sh: installing teonspeed failed" >&2; exit 100; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "   installed in $(( $(date +%s) - T0 )) s"
fi
"$PY" bench/gpu_report.py --results-dir "$RES" env | tee "$LOGS/environment.json"

FAILED=0
run_stage() {  # name limit python-args...
  local name="$1" limit="$2"; shift 2
  local log="$LOGS/$name.log" start rc
  echo "== $name (limit ${limit} s): $PY $*"
  start=$(date +%s%N)
  timeout -k 10 "$limit" "$PY" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && FAILED=$((FAILED + 1))
  "$PY" bench/gpu_report.py --results-dir "$RES" stage --name "$name" --rc "$rc" --timeout "$limit" \
    --seconds "$(( ($(date +%s%N) - start) / 1000000 ))e-3" --log "$log"
}

run_stage kernel_tests "$LIMIT_KERNEL_TESTS" "${KERNEL_TESTS[@]}"
[[ -f "$LOGS/kernels_junit.xml" ]] && \
  "$PY" bench/gpu_report.py --results-dir "$RES" junit --xml "$LOGS/kernels_junit.xml" --stem "kernels_$SFX"
run_stage kernel_bench "$LIMIT_KERNEL_BENCH" "${KERNEL_BENCH[@]}"
run_stage optimizer_step "$LIMIT_OPTIMIZER_STEP" "${OPT_STEP[@]}"
run_stage world1_step "$LIMIT_WORLD1_STEP" "${WORLD1[@]}"
run_stage pretrain_adamw "$LIMIT_PRETRAIN_ADAMW" "${PRE_ADAMW[@]}"
run_stage pretrain_teon "$LIMIT_PRETRAIN_TEON" "${PRE_TEON[@]}"
"$PY" bench/gpu_report.py --results-dir "$RES" pretrain --stem "pretrain_$SFX" \
  --run "adamw=$RUNS/gpu_check_adamw" --run "teon=$RUNS/gpu_check_teon" \
  --command-line "launch/pretrain.py --optimizer adamw|teon --ds-config configs/deepspeed/<adamw|teon>_zero2_bf16.json ${PRETRAIN[*]}"

"$PY" bench/gpu_report.py --results-dir "$RES" summary --mode "$MODE"
rm -f "$RES/gpu_check_stages.jsonl"  # its content is in gpu_check_<mode>.json
if [[ -n "${OUT:-}" ]]; then
  cp "$RES/gpu_check_$MODE.md" "$OUT/" 2>/dev/null
  tar czf "$OUT/gpu_check_results.tar.gz" -C "$RES" $(cd "$RES" && ls ./*_"$SFX".* 2>/dev/null) \
    -C "$LOGS" . 2>/dev/null
fi
echo "gpu_check.sh: $FAILED failed stage(s), $(( $(date +%s) - T0 )) s in all; results in $RES"
exit "$FAILED"
