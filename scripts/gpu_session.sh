#!/usr/bin/env bash
# What to run on the lent GPU, stage by stage or all in one device call (under 10 minutes, the
# device tool's limit). Each stage has a time limit, keeps going after a failure and reports it.
#
#   bash scripts/gpu_session.sh check        # every kernel vs the reference, checks side by side
#   bash scripts/gpu_session.sh bench        # mhc-mlx bench: the target cases, seeds included
#   bash scripts/gpu_session.sh bench-full   # mhc-mlx bench: every case
#   bash scripts/gpu_session.sh profile      # ncu: each target case's kernels and their times
#   bash scripts/gpu_session.sh experiments  # kernel-level timings (docs/kernel-notes.md)
#   bash scripts/gpu_session.sh all          # check, bench, profile, experiments
#   bash scripts/gpu_session.sh candidates   # the checks with every candidate on, the target cases'
#                                            # bench with them on, then the experiments (each off/on)
#   CHECK_ONLY=sinkhorn,layer bash scripts/gpu_session.sh all   # only these check groups
#   CHECK_ARGS="--sinkhorn-thread-vjp --mma-prefetch --fused-read-step --mma-vjp" \
#     CHECK_ONLY=sinkhorn,coefficients,layer,read_step \
#     bash scripts/gpu_session.sh check                          # the candidates switched on
#
# MLX's CUDA wheel must already be installed (../shared/device/prepare-mlx-cuda, two calls).
# Results go to runs/gpu_session, packed into $OUT/gpu_session.tgz when $OUT is set (the device
# tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0
res=runs/gpu_session
mkdir -p "$res"
failed=()
TARGETS="static/fwd/1x4x512/bfloat16,dynamic/fwd/1x4x512,static/fwd/4096x4x4096/bfloat16,dynamic/fwd/4096x4x4096"
TARGETS="$TARGETS,fwd+bwd/4096x4x4096,dynamic/fwd/512x4x1280,fwd+bwd/512x4x1280,static/fwd/2560x4x2560"

report() {  # label, exit status: print the log's tail
  local label="$1" rc="$2"
  if [ "$rc" = 0 ]; then echo "   ok ($label)"; tail -n "${TAIL:-25}" "$res/$label.log"
  else echo "   FAILED ($label), exit $rc"; tail -n "${TAIL:-40}" "$res/$label.log"; failed+=("$label"); fi
}

run() {  # seconds, label, then the command
  local secs="$1" label="$2"; shift 2
  echo "== $label: $*"
  timeout -k 5 "$secs" "$@" > "$res/$label.log" 2>&1
  report "$label" $?
}

check() {
  # Correctness only, so the checks share the GPU and run side by side (NVRTC builds are
  # CPU-bound), split by group, dtype and n; $1 seconds each at most.
  local secs="$1" labels=() pids=() label
  start() { label="$1"; shift; labels+=("$label")
            timeout -k 5 "$secs" "$@" > "$res/$label.log" 2>&1 & pids+=($!); }
  local groups=",${CHECK_ONLY:-sinkhorn,coefficients,site,layer,read_step},"  # CHECK_ONLY: a comma list
  for dt in f32 bf16 f16; do
    if [[ $groups == *,site,* ]]; then
      start "site_small_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only site --site-n 1,2,3,4 --dtypes $dt --out "$res/site_small_$dt"
      start "site_large_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only site --site-n 8,16,32 --dtypes $dt --out "$res/site_large_$dt"
    fi
    [[ $groups == *,layer,* ]] && start "layer_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only layer --dtypes $dt --out "$res/layer_$dt"
    [[ $groups == *,coefficients,* ]] && start "coefficients_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only coefficients --dtypes $dt --out "$res/coefficients_$dt"
    [[ $groups == *,read_step,* ]] && start "read_step_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only read_step --dtypes $dt --out "$res/read_step_$dt"
  done
  [[ $groups == *,sinkhorn,* ]] && start sinkhorn python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only sinkhorn --out "$res/sinkhorn"
  start pytest_gpu python -m pytest -q -m gpu tests -p no:cacheprovider
  for i in "${!labels[@]}"; do
    wait "${pids[$i]}"; TAIL=7 report "${labels[$i]}" $?
  done
}

profile() {
  echo "== profile: ncu over scripts/gpu_profile.py run"
  timeout -k 5 "$1" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$res/profile.csv" python scripts/gpu_profile.py run > "$res/profile_run.log" 2>&1
  echo "   ncu exit $?"; tail -n 5 "$res/profile_run.log"
  python scripts/gpu_profile.py report "$res/profile.csv" > "$res/profile.log" 2>&1
  report profile $?
}

case "${1:-}" in
  check) check 420 ;;
  bench) run 300 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS" ;;
  bench-full) run 570 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs ;;
  profile) profile 240 ;;
  candidates)
    CHECK_ARGS="--sinkhorn-thread-vjp --mma-prefetch --fused-read-step --mma-vjp" \
      CHECK_ONLY="${CHECK_ONLY:-sinkhorn,coefficients,layer,read_step}" check 200
    run 140 bench python -m mhc_mlx.cli.main bench --candidates --out "$res/bench_candidates" --overwrite \
      --seeds "" --only "$TARGETS"
    run 230 experiments python scripts/gpu_experiments.py
    ;;
  experiments) run 420 experiments python scripts/gpu_experiments.py ;;
  all)
    check 180
    run 120 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    profile 80
    run 140 experiments python scripts/gpu_experiments.py
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh check|bench|bench-full|profile|experiments|all|candidates" >&2
    exit 2
    ;;
esac
# one archive: the device tool brings back only a few files per call
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_session.tgz" -C runs gpu_session
if ((${#failed[@]})); then
  echo "== failed: ${failed[*]}"
  exit 1
fi
echo "== all stages passed"
