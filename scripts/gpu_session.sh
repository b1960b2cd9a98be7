#!/usr/bin/env bash
# What to run on the lent GPU to settle the open kernel candidates, in three device calls of
# under 10 minutes each (the device tool's limit). Each stage prints a short summary last.
#
#   bash scripts/gpu_session.sh check        # every kernel + each candidate vs the reference
#   bash scripts/gpu_session.sh experiments  # kernel-level timings (docs/kernel-notes.md)
#   bash scripts/gpu_session.sh bench        # mhc-mlx bench with the seed packages
#
# MLX's CUDA wheel must already be installed (../shared/device/prepare-mlx-cuda, two calls).
# Outputs go to $OUT (the device tool brings them back) or runs/gpu_session.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0
out="${OUT:-runs/gpu_session}"
mkdir -p "$out"

run() {  # label, then the command; keeps going after a failure and reports it at the end
  local label="$1"; shift
  echo "== $label: $*"
  if "$@" > "$out/$label.log" 2>&1; then
    echo "   ok ($label)"; tail -n 25 "$out/$label.log"
  else
    echo "   FAILED ($label), exit $?"; tail -n 40 "$out/$label.log"; failed+=("$label")
  fi
}

failed=()
case "${1:-}" in
  check)
    run shipped     python scripts/gpu_check.py --no-bench --out "$out/shipped"
    run mma         python scripts/gpu_check.py --no-bench --only coefficients --dynamic-mma-candidate --out "$out/mma"
    run gemm        python scripts/gpu_check.py --no-bench --only coefficients --dynamic-gemm-candidate --out "$out/gemm"
    run tb8         python scripts/gpu_check.py --no-bench --only coefficients --tb8-candidate --out "$out/tb8"
    run layer_vjp   python scripts/gpu_check.py --no-bench --only layer --layer-vjp-candidate --out "$out/layer_vjp"
    run pytest_gpu  python -m pytest -q -m gpu tests
    ;;
  experiments)
    run experiments python scripts/gpu_experiments.py
    run host        python scripts/host_overhead.py
    ;;
  bench)
    run bench       python -m mhc_mlx.cli.main bench --out "$out/bench" --overwrite --seeds .seedpkgs
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh check|experiments|bench" >&2
    exit 2
    ;;
esac
if ((${#failed[@]})); then
  echo "== failed: ${failed[*]}"
  exit 1
fi
echo "== all stages passed"
