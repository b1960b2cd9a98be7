#!/usr/bin/env bash
# What to run on the lent GPU to settle the open kernel candidates, in three device calls of
# under 10 minutes each (the device tool's limit). Each stage prints a short summary last.
#
#   bash scripts/gpu_session.sh check        # every kernel + each candidate vs the reference
#   bash scripts/gpu_session.sh experiments  # kernel-level timings (docs/kernel-notes.md)
#   bash scripts/gpu_session.sh bench        # mhc-mlx bench, seeds included, with every
#                                            # candidate that passed `check` switched on
#
# MLX's CUDA wheel must already be installed (../shared/device/prepare-mlx-cuda, two calls).
# Results stay in runs/gpu_session (the bench stage reads the checks from there) and are
# copied to $OUT when it is set (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0
res=runs/gpu_session
mkdir -p "$res"
failed=()

report() {  # label, exit status: print the log's tail
  local label="$1" rc="$2"
  if [ "$rc" = 0 ]; then echo "   ok ($label)"; tail -n "${TAIL:-25}" "$res/$label.log"
  else echo "   FAILED ($label), exit $rc"; tail -n "${TAIL:-40}" "$res/$label.log"; failed+=("$label"); fi
}

run() {  # seconds, label, then the command; keeps going after a failure and reports it at the end
  local secs="$1" label="$2"; shift 2
  echo "== $label: $*"
  timeout -k 5 "$secs" "$@" > "$res/$label.log" 2>&1
  report "$label" $?
}

case "${1:-}" in
  check)
    # Correctness only, so the checks share the GPU and run side by side (NVRTC builds are
    # CPU-bound); a time limit on each keeps the call inside the device tool's 10 minutes.
    declare -A pids; TAIL=8
    start() { local label="$1"; shift; echo "== $label: $*"
              timeout -k 5 480 "$@" > "$res/$label.log" 2>&1 & pids[$label]=$!; }
    start shipped    python scripts/gpu_check.py --no-bench --out "$res/shipped"
    start mma        python scripts/gpu_check.py --no-bench --only coefficients --dynamic-mma-candidate --out "$res/mma"
    start gemm       python scripts/gpu_check.py --no-bench --only coefficients --dynamic-gemm-candidate --out "$res/gemm"
    start tb8        python scripts/gpu_check.py --no-bench --only coefficients --tb8-candidate --out "$res/tb8"
    start layer_vjp  python scripts/gpu_check.py --no-bench --only layer --layer-vjp-candidate --out "$res/layer_vjp"
    start pytest_gpu python -m pytest -q -m gpu tests -p no:cacheprovider
    for label in shipped mma gemm tb8 layer_vjp pytest_gpu; do
      wait "${pids[$label]}"; rc=$?
      echo "== $label finished"; report "$label" "$rc"
    done
    python scripts/kernel_candidates.py --from "$res"
    ;;
  experiments)
    run 420 experiments python scripts/gpu_experiments.py
    run 60 host python scripts/host_overhead.py
    ;;
  bench)
    run 570 bench python scripts/kernel_candidates.py --from "$res" -- \
      bench --out "$res/bench" --overwrite --seeds .seedpkgs
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh check|experiments|bench" >&2
    exit 2
    ;;
esac
[ -n "${OUT:-}" ] && cp -r "$res" "$OUT/"
if ((${#failed[@]})); then
  echo "== failed: ${failed[*]}"
  exit 1
fi
echo "== all stages passed"
