#!/usr/bin/env bash
# The one GPU script: on a machine with a CUDA GPU and a CUDA build of torch, in one call
#   1. compile-checks csrc/cuda with nvcc and builds the extension with its CUDA kernels,
#   2. runs the whole test suite with the GPU tests on (they are skipped without a GPU),
#   3. runs every benches/bench_*.py __main__ with GPU shapes (--device cuda),
# and tees everything under $OUT (default ./gpu_results/<date>/): build.log, pytest.log, one <bench>.md per
# benchmark, and summary.md (device, date, exit status of every step). A failing step does not stop the
# others; the script exits non-zero if any failed.
#
#   OUT=/tmp/gpu bash benches/gpu_all.sh              # everything
#   SKIP_TESTS=1 bash benches/gpu_all.sh              # benchmarks only
#   BENCH_ARGS_bench_init_kernels="--blocks 16 --accuracy" bash benches/gpu_all.sh   # per-bench extra args
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results/$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
summary="$OUT/summary.md"
status=0
step() {  # step NAME LOGFILE CMD...: run, tee, record the exit status
  local name=$1 log=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/all.log"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$log" | tee -a "$OUT/all.log"
  local rc=${PIPESTATUS[0]}
  echo "| $name | $rc | $((SECONDS - t0)) s | $(basename "$log") |" >> "$summary"
  (( rc == 0 )) || status=1
}

{
  echo "# GPU run"
  echo
  python - <<'PY'
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
  echo
  echo "| step | exit | time | log |"
  echo "|---|---|---|---|"
} > "$summary"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_all: torch sees no CUDA device; nothing to do on this machine" | tee -a "$summary"; exit 1; }

step nvcc_check "$OUT/nvcc_check.log" bash .ci/nvcc_check.sh
# --no-build-isolation: build against the CUDA torch already installed, never a fresh wheel from PyPI
step build "$OUT/build.log" python -m pip install --no-build-isolation --no-deps -e .
step extension "$OUT/extension.log" python -c "
import slice_kernels._ext as e, torch
m = e.load(); assert m is not None, e.load_error()
print('with_cuda =', m.with_cuda)
ops = ('conflict_stats', 'surgery_', 'cholesky_shifted', 'grad_accumulate_', 'sign_loss_fwd', 'sign_loss_bwd',
       'sign_loss_fwd_bwd', 'magnitude_merge_factors', 'gorp_update')
missing = [op for op in ops if not e.has_kernel(op, 'cuda')]
for op in ops:
    print(op, 'CUDA kernel:', op not in missing)
assert not missing, f'no CUDA kernel for {missing}: the CUDA tests would run another backend or fail'
"
if [[ -z "${SKIP_TESTS:-}" ]]; then
  step pytest "$OUT/pytest.log" python -m pytest -q -rs --durations=20
fi
for b in benches/bench_*.py; do
  name=$(basename "$b" .py)
  extra_var="BENCH_ARGS_${name}"
  # shellcheck disable=SC2086
  step "$name" "$OUT/$name.md" python "$b" --device cuda ${!extra_var:-}
done
cat "$summary"
exit $status
