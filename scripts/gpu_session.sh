#!/usr/bin/env bash
# What to run on the lent GPU, stage by stage or all in one device call (under 10 minutes, the
# device tool's limit). Each stage has a time limit, keeps going after a failure and reports it.
#
#   bash scripts/gpu_session.sh check        # every kernel vs the reference, checks side by side
#   bash scripts/gpu_session.sh bench        # mhc-mlx bench: the target cases, seeds included
#   bash scripts/gpu_session.sh bench-full   # mhc-mlx bench: every case
#   bash scripts/gpu_session.sh check-bench-full  # CHECK_ONLY's checks, then every case
#   bash scripts/gpu_session.sh profile      # ncu: each target case's kernels, their times and DRAM bytes
#   bash scripts/gpu_session.sh profile-params  # ncu and the bench with the kernels' parameter arrays
#                                            # host-made (default) against copied into GPU memory
#   bash scripts/gpu_session.sh experiments  # kernel-level timings (docs/kernel-notes.md)
#   bash scripts/gpu_session.sh all          # check, bench, profile, experiments
#   bash scripts/gpu_session.sh tune         # checks (+ X_UNROLL 2, 4), experiments, ncu, bench, profile
#   bash scripts/gpu_session.sh final        # checks, experiments, the target cases' bench with the seeds
#   bash scripts/gpu_session.sh candidates   # the checks with every candidate on, the new candidates
#                                            # timed off/on, the target cases' bench with them on
#   bash scripts/gpu_session.sh adopt        # the new defaults' checks, B = 1 launch costs, the read
#                                            # step's timings, the target cases' bench (seeds, +step)
#   bash scripts/gpu_session.sh verify       # every check, the B = 1 layer timings, the bench (seeds, +step)
#   bash scripts/gpu_session.sh small-tokens # the one-threadgroup-per-token coefficient kernels: checks, timings
#   bash scripts/gpu_session.sh wide-n       # dynamic coefficients for n > 8 on the kernel path: checks, timings
#   bash scripts/gpu_session.sh narrow-wide  # small-tokens and wide-n in one call: both candidates'
#                                            # checks together, then each one's timings
#   bash scripts/gpu_session.sh close        # the target and n = 16 / 32 cases' bench (seeds, +step), ncu profile
#   bash scripts/gpu_session.sh recheck      # a second sample: the target cases' bench (ours), wide-n timings
#   bash scripts/gpu_session.sh glue         # the glue kernel at 32 threads per group: checks, timings
#   bash scripts/gpu_session.sh glue-packs   # the glue kernel writing gs's fragments (candidate): checks, timings
#   bash scripts/gpu_session.sh pending      # the glue packs and DX's vectorized pre share: checks, timings
#   bash scripts/gpu_session.sh loads        # the tensor-core forward's launch size, DX's row loads: checks, timings
#   bash scripts/gpu_session.sh small        # launch-shape candidates: finish tokens, DX tiles
#   bash scripts/gpu_session.sh jacobian     # the Sinkhorn backward by its Jacobian (default since): checks,
#                                            # timings against the replay, the target cases' bench (ours)
#   bash scripts/gpu_session.sh layer-jacobian  # the layer coefficient backward's and the Sinkhorn op's
#                                            # backward by forward mode (candidates): checks, timings, timeline
#   bash scripts/gpu_session.sh throughput   # the large cases timed as the bench times them, traced:
#                                            # kernels, GPU idle, host CUDA calls; host times at K = 10, 30
#   bash scripts/gpu_session.sh verify9      # every check, pytest -m gpu in four shards beside them
#   bash scripts/gpu_session.sh verify-host  # pytest -m gpu (four shards) beside the layer and read-step checks
#   bash scripts/gpu_session.sh host-bench   # the B = 1 calls' host time; the target bench (seeds), ours again
#   bash scripts/gpu_session.sh one-launch   # the few-token read step in one launch: checks, GPU tests, timings
#   bash scripts/gpu_session.sh one-launch2  # its timings again (traces keyed on every setting), bench with it on
#   bash scripts/gpu_session.sh layer-forms  # B = 1 host time; the layer forward's launch forms
#   bash scripts/gpu_session.sh paired-graphs  # B = 1 with and without CUDA graphs; the target bench
#                                            # (seeds) with B = 1 rows paired with the tiny op
#   bash scripts/gpu_session.sh graphs-ab    # B = 1 with and without CUDA graphs, 3 processes each, pinned
#   bash scripts/gpu_session.sh pinned-bench # the target cases' bench (seeds), pinned to one CPU core
#   bash scripts/gpu_session.sh verify10     # pytest -m gpu (four shards) + read-step checks; B = 1 pinned
#   bash scripts/gpu_session.sh verify-standins  # coefficient, chain and read-step checks (build.standin)
#   bash scripts/gpu_session.sh tile-reuse   # one launch reading a tile once for row sums and output
#   bash scripts/gpu_session.sh clusters     # tile-reuse with the thread-block cluster form; malloc-growth
#   bash scripts/gpu_session.sh epilogue-verify  # coefficient, read-step, chain checks + pytest -m gpu
#   bash scripts/gpu_session.sh final16      # pinned-bench, then pipelined (its runs under pipelined/)
#   bash scripts/gpu_session.sh one-pass-split  # each launch of the split form alone beside today's
#   bash scripts/gpu_session.sh one-pass4    # chain checks with the one pass in $FORM, bench on / off twice
#   bash scripts/gpu_session.sh one-pass-mma # FORM mma: the breakdown, its GPU tests, one-pass4's checks, bench
#   bash scripts/gpu_session.sh verify11     # coefficient and chain checks, the target bench (seeds), pinned
#   bash scripts/gpu_session.sh verify11b    # the dynamic backward's GPU tests (chain, coefficient gradients, one pass)
#   bash scripts/gpu_session.sh vendor       # the coefficient products beside MLX's matmul (cuBLAS), the
#                                            # one pass's GPU tests, then the pipelined stage
#   bash scripts/gpu_session.sh wgmma        # the forward partials by warpgroup MMA: timings, checks
#   bash scripts/gpu_session.sh wgmma2       # dphi by warpgroup MMA (not yet run): timings, checks with both
#   bash scripts/gpu_session.sh wgmma-ab     # the warpgroup-MMA products (defaults) against the MMA kernels, site
#   bash scripts/gpu_session.sh wgmma-verify # both warpgroup-MMA products on: site/layer checks, pytest -m gpu
#   bash scripts/gpu_session.sh static-host  # the static forward's host costs: launches, custom function, +step
#   bash scripts/gpu_session.sh inline-fix   # static-host again, then the layer checks with the single launch
#   bash scripts/gpu_session.sh inline-verify # pytest -m gpu in four shards (the single-launch layer the default)
#   bash scripts/gpu_session.sh verify17     # coefficient, read-step, chain checks + pytest -m gpu (one-launch read step)
#   bash scripts/gpu_session.sh final17      # as final16, on the seventeenth session's defaults
#   bash scripts/gpu_session.sh verify18     # parameter arrays in GPU memory the default: bench (ours), verify17
#   bash scripts/gpu_session.sh final19      # the target cases' bench pinned, seeds then ours
#   bash scripts/gpu_session.sh pipe19       # the dynamic cases traced: one eval against 4 evals back to back
#   bash scripts/gpu_session.sh next19       # the throughput trace; the glue packs in DPHI_WG's
#                                            # order: GPU tests, checks, bench off / on alternated
#   bash scripts/gpu_session.sh b1-ab        # B = 1 dynamic: the one-launch read step against two, pinned processes
#   bash scripts/gpu_session.sh encode       # the host's encoding cost per launch, by kind of launch
#   bash scripts/gpu_session.sh backward-tile  # the one-read backward's memory side: two launches vs a cluster launch
#   bash scripts/gpu_session.sh anatomy-paper  # eval-anatomy at 512 x 4 x 1280, two processes
#   bash scripts/gpu_session.sh anatomy      # a throughput eval's GPU start, span, tail; eager vs compiled steps
#   bash scripts/gpu_session.sh step-trace   # the dynamic fwd+bwd eager against one compiled step, traced
#   bash scripts/gpu_session.sh wg-steps     # the warpgroup kernels' shared loop: checks, GPU tests, timing
#   bash scripts/gpu_session.sh pipelined    # the target cases' bench with --pipelined (ours), then the throughput trace
#   bash scripts/gpu_session.sh anatomy-bench  # where the B = 1 static launch's time goes; the target bench
#   bash scripts/gpu_session.sh gpu-tests    # pytest -m gpu alone
#   bash scripts/gpu_session.sh latency      # LAYER_LATENCY + compiled latency path: checks, timings
#   bash scripts/gpu_session.sh layer-source # the static forward's LAYER now against before the eighth session
#   bash scripts/gpu_session.sh latency4     # the rest of latency3's GPU tests, a further target sample (ours)
#   bash scripts/gpu_session.sh latency3     # the latency paths' GPU tests, B = 1 timings, the target bench
#   bash scripts/gpu_session.sh latency2     # the split read step and the latency paths: checks, B = 1 trace, timings
#   bash scripts/gpu_session.sh b1-trace     # each B = 1 form's kernels traced, the SM clock; B = 1 static forms
#   bash scripts/gpu_session.sh b1-sync      # B = 1 eval against a launch's GPU time; compiled B = 1 forms
#   bash scripts/gpu_session.sh b1-split     # B = 1 graph building and eval apart, both parameter forms
#   bash scripts/gpu_session.sh probe-bench  # the B = 1 layer kernel against an empty launch, the target bench
#   bash scripts/gpu_session.sh flat-logits  # layer and coefficient checks, the static logits unreshaped vs reshaped
#   bash scripts/gpu_session.sh probe-tests  # the B = 1 probe (variants interleaved), then pytest -m gpu
#   bash scripts/gpu_session.sh ours         # the target cases, our kernels only (a further sample)
#   bash scripts/gpu_session.sh params       # the kernels' parameter arrays in GPU memory: checks, timings, bench
#   bash scripts/gpu_session.sh composite-norm  # the layer above MAX_N_FUSED with mx.fast.rms_norm
#   bash scripts/gpu_session.sh inline-wide  # the single-launch layer above MAX_N_FUSED (default since)
#   bash scripts/gpu_session.sh timelines    # the defaults' timelines: one application, then K = 10 as benched
#   bash scripts/gpu_session.sh timeline     # pytest -m gpu alone, then nsys: each target case's kernels
#                                            # in stream order with the gaps (defaults; glue packs + read step)
#   bash scripts/gpu_session.sh op-paths     # checks of the MLX-op forms the one-launch kernels replaced
#   bash scripts/gpu_session.sh mma-vjp      # the tensor-core coefficient backward vs the FP32 kernel
#   bash scripts/gpu_session.sh b1           # the B = 1 layer kernel by Sinkhorn iterations, and ncu
#   bash scripts/gpu_session.sh decide       # every check, the experiments, the target cases' bench
#   bash scripts/gpu_session.sh layer-candidates  # layer checks with its candidates on, then as decide
#   bash scripts/gpu_session.sh headers      # every check, trimmed vs full kernel headers, the bench
#   bash scripts/gpu_session.sh read-step    # fused read step checks, then its timings vs the two ops
#   bash scripts/gpu_session.sh chain        # chained x cotangent + read step checks, then their timings
#   CHECK_ONLY=sinkhorn,layer bash scripts/gpu_session.sh all   # only these check groups
#   CHECK_ARGS="--mma-vjp --mma-x-unroll 2" \
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

report() {  # label, exit status: print the log's tail (and refresh $OUT's archive, so a call cut
  local label="$1" rc="$2"  # off at the device tool's limit still brings back what finished)
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_session.tgz" -C runs gpu_session
  if [ "$rc" = 0 ]; then echo "   ok ($label)"; tail -n "${TAIL:-25}" "$res/$label.log"
  else echo "   FAILED ($label), exit $rc"; tail -n "${TAIL:-40}" "$res/$label.log"; failed+=("$label"); fi
}

run() {  # seconds, label, then the command
  local secs="$1" label="$2"; shift 2
  echo "== $label: $*"
  timeout -k 5 "$secs" "$@" > "$res/$label.log" 2>&1
  report "$label" $?
}

pinned_bench() {  # the target cases' bench with the seeds, then ours alone, pinned to one CPU core
  run 300 bench taskset -c 3 python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
  run 200 bench_ours taskset -c 3 python -m mhc_mlx.cli.main bench --out "$res/bench_ours" --overwrite --seeds "" \
    --only "$TARGETS" --impl kernels
}

throughput_trace() {  # the throughput cases traced as the bench times them (kernels, idle, host calls)
  run 200 timeline_throughput bash -c 'python scripts/gpu_timeline.py run --throughput --kineto "$0/tp.json" &&
    python scripts/gpu_timeline.py report --throughput "$0/tp.json"; rc=$?; rm -f "$0/tp.json"; exit $rc' "$res"
}

pipelined_bench() {  # label, output folder: the target cases, ours, one eval and pipelined; then
  # the throughput cases traced as the bench times them
  run 240 "$1" python -m mhc_mlx.cli.main bench --pipelined --out "$2" --overwrite --seeds "" \
    --only "$TARGETS" --impl kernels
  throughput_trace
}

ab_bench() {  # name, module.ATTRIBUTE=value, cases: ours only, pinned to one CPU core, the defaults
  # and then the setting in alternated processes, twice (logs bench_default_N, bench_NAME_N)
  local rep
  for rep in 1 2; do
    run 90 "bench_default_$rep" taskset -c 3 python -m mhc_mlx.cli.main bench --out "$res/default_$rep" \
      --overwrite --seeds "" --impl kernels --only "$3"
    # shellcheck disable=SC2086  # $2 may hold several settings, split at the spaces
    run 90 "bench_$1_$rep" taskset -c 3 python scripts/bench_with.py $2 -- \
      bench --out "$res/$1_$rep" --overwrite --seeds "" --impl kernels --only "$3"
  done
}

timelines() {  # forms (defaults, glue-packs-read-step): each target case's kernels in stream order
  local nsys form flags rc     # with the gaps: Nsight Systems where installed, else PyTorch's profiler
  nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2> /dev/null | head -1)
  for form in "$@"; do
    flags=""; [ $form != defaults ] && flags="--glue-packs --read-step"
    echo "== timeline_$form (${nsys:-kineto})"
    if [ -n "$nsys" ]; then
      timeout -k 5 150 "$nsys" profile --trace cuda --force-overwrite true --output "$res/tl_$form" \
        python scripts/gpu_timeline.py run $flags > "$res/timeline_$form.log" 2>&1 &&
      timeout -k 5 60 "$nsys" stats --force-export true --report cuda_gpu_trace --format csv \
        --output "$res/tl_$form" "$res/tl_$form.nsys-rep" >> "$res/timeline_$form.log" 2>&1 &&
      python scripts/gpu_timeline.py report "$res/tl_${form}_cuda_gpu_trace.csv" > "$res/timeline_${form}_report.log" 2>&1
      rc=$?
    else
      timeout -k 5 150 python scripts/gpu_timeline.py run --kineto "$res/tl_$form.json" $flags > "$res/timeline_$form.log" 2>&1 &&
      python scripts/gpu_timeline.py report "$res/tl_$form.json" > "$res/timeline_${form}_report.log" 2>&1
      rc=$?
    fi
    rm -f "$res/tl_$form.nsys-rep" "$res/tl_$form.sqlite" "$res/tl_$form.json"
    [ $rc != 0 ] && tail -5 "$res/timeline_$form.log"
    TAIL=200 report "timeline_${form}_report" $rc
  done
}

one_pass_chain_bench() {  # the chain checks with the one pass on (its FORM by ONE_PASS_CHECK_ARGS),
  # then the dynamic fwd+bwd bench with it on in $FORM and off, each in its own process, twice
  CHECK_ARGS="--one-pass-vjp --mma-vjp ${ONE_PASS_CHECK_ARGS:-}" CHECK_ONLY=chain NO_PYTEST=1 check 200
  local rep
  for rep in 1 2; do
    run 100 "bench_one_pass_$rep" python scripts/bench_with.py kernels.ONE_PASS_VJP=1 "one_pass_vjp.FORM=${FORM:-mma}" -- \
      bench --out "$res/bench_one_pass_$rep" --overwrite --seeds "" --only dynamic/fwd+bwd/4096x4x4096,dynamic/fwd+bwd/512x4x1280 --impl kernels
    run 100 "bench_today_$rep" python -m mhc_mlx.cli.main bench --out "$res/bench_today_$rep" --overwrite --seeds "" \
      --only dynamic/fwd+bwd/4096x4x4096,dynamic/fwd+bwd/512x4x1280 --impl kernels
  done
}

check() {
  # Correctness only, so the checks share the GPU and run side by side (NVRTC builds are
  # CPU-bound), split by group, dtype and n; $1 seconds each at most.
  local secs="$1" labels=() pids=() label
  start() { label="$1"; shift; labels+=("$label")
            timeout -k 5 "$secs" "$@" > "$res/$label.log" 2>&1 & pids+=($!); }
  local groups=",${CHECK_ONLY:-sinkhorn,coefficients,site,layer,read_step,chain},"  # CHECK_ONLY: a comma list
  for dt in f32 bf16 f16; do
    if [[ $groups == *,site,* ]]; then
      start "site_small_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only site --site-n 1,2,3,4 --dtypes $dt --out "$res/site_small_$dt"
      start "site_large_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only site --site-n 8,16,32 --dtypes $dt --out "$res/site_large_$dt"
    fi
    [[ $groups == *,layer,* ]] && start "layer_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only layer --dtypes $dt --out "$res/layer_$dt"
    [[ $groups == *,coefficients,* ]] && start "coefficients_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only coefficients --dtypes $dt --out "$res/coefficients_$dt"
    [[ $groups == *,read_step,* ]] && start "read_step_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only read_step --dtypes $dt --out "$res/read_step_$dt"
    [[ $groups == *,chain,* ]] && start "chain_$dt" python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only chain --dtypes $dt --out "$res/chain_$dt"
  done
  [[ $groups == *,sinkhorn,* ]] && start sinkhorn python scripts/gpu_check.py ${CHECK_ARGS:-} --no-bench --only sinkhorn --out "$res/sinkhorn"
  if [ -n "${CHECK_EXTRA:-}" ]; then  # the tensor-core coefficients at the other X_UNROLL values
    for ku in 1 4; do
      start "coefficients_mma_ku$ku" python scripts/gpu_check.py --no-bench --only coefficients --dynamic-form mma \
        --mma-x-unroll $ku --dtypes bf16,f16 --out "$res/coefficients_mma_ku$ku"
    done
  fi
  if [ -z "${NO_PYTEST:-}" ] && [ -n "${PYTEST_SHARDS:-}" ]; then  # k pytest processes side by side
    for ((i = 0; i < PYTEST_SHARDS; i++)); do
      MHC_TEST_SHARD="$i/$PYTEST_SHARDS" start "pytest_gpu_$i" python -m pytest -q -rs -m gpu tests -p no:cacheprovider --durations 5
    done
  elif [ -z "${NO_PYTEST:-}" ]; then
    start pytest_gpu python -m pytest -q -m gpu tests -p no:cacheprovider
  fi
  for i in "${!labels[@]}"; do
    wait "${pids[$i]}"; TAIL=7 report "${labels[$i]}" $?
  done
}

ncu_mma() {
  # Nsight Compute's memory and stall sections for the tensor-core coefficient kernel at
  # 4096 x 4 x 4096 bf16, once per X_UNROLL (why it reads x slower than pre and post do)
  echo "== ncu-mma: memory and warp-stall sections of the tensor-core coefficient kernel"
  timeout -k 5 "$1" ncu --clock-control none -k regex:dynamic_mma -c 3 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    python -c '
import mlx.core as mx
from mhc_mlx.kernels import coefficients_mma as cm
x = mx.random.normal((4096, 16384)).astype(mx.bfloat16); phi = 0.02 * mx.random.normal((16384, 24)); mx.eval(x, phi)
for ku in (1, 2, 4):
    cm.X_UNROLL = ku; mx.eval(cm.partial_products(x, phi))
' > "$res/ncu_mma.log" 2>&1
  report ncu_mma $?
}

profile() {  # profile LIMIT [NAME [module.ATTRIBUTE=value ...]]: ncu with kernel settings switched first
  local name="${2:-profile}"
  echo "== $name: ncu over scripts/gpu_profile.py run ${*:3}"
  timeout -k 5 "$1" ncu --clock-control none \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv \
    --log-file "$res/$name.csv" python scripts/gpu_profile.py run "${@:3}" > "$res/${name}_run.log" 2>&1
  echo "   ncu exit $?"; tail -n 5 "$res/${name}_run.log"
  python scripts/gpu_profile.py report "$res/$name.csv" > "$res/$name.log" 2>&1
  report "$name" $?
}

case "${1:-}" in
  check) check 420 ;;
  bench) run 300 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS" ;;
  bench-full) run 570 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs ;;
  check-bench-full)  # CHECK_ONLY's checks, then every bench case with the seeds
    CHECK_ONLY="${CHECK_ONLY:-coefficients,read_step}" check 120
    run 400 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs
    ;;
  profile) profile 240 ;;
  profile-params)
    # (eighteenth session of 2026-12-01) the small kernels of the dynamic fwd+bwd took 9-29 µs
    # each under ncu with almost no DRAM traffic: is it their run-time parameter arrays, which
    # MLX keeps in managed memory (build.DEVICE_PARAMS, kernel-notes row 45)? ncu with them host-made
    # (the default), then copied into GPU memory, then the default again
    profile 200 profile_default
    profile 200 profile_device_params build.DEVICE_PARAMS=1
    profile 200 profile_default2
    # and in the bench's own timing: alternated pinned processes, ours only, the cases with the
    # most small launches per byte
    ab_bench device_params build.DEVICE_PARAMS=1 \
      "dynamic/fwd/1x4x512,dynamic/fwd+bwd/4096x4x4096,dynamic/fwd/512x4x1280,dynamic/fwd+bwd/512x4x1280"
    ;;
  candidates)
    # the checks with every candidate on, the four candidates written on 2026-11-29 without a
    # GPU timed against the defaults (alternated), then the target cases' bench with every
    # candidate on (the full experiments are in `decide`)
    CHECK_ARGS="--mma-vjp --fused-read-step --layer-candidates --chain" \
      CHECK_ONLY="${CHECK_ONLY:-sinkhorn,coefficients,layer,read_step,chain}" check 200
    run 90 experiments_chain python scripts/gpu_experiments.py chain
    run 50 experiments_read_step python scripts/gpu_experiments.py read-step
    run 50 experiments_layer python scripts/gpu_experiments.py layer-coefficients
    run 120 bench python -m mhc_mlx.cli.main bench --candidates --out "$res/bench_candidates" --overwrite \
      --seeds "" --only "$TARGETS" --impl kernels,kernels+step
    ;;
  adopt)
    # after candidates became defaults: the checks of the ops they touch, where B = 1 time goes,
    # the read step against the two ops with the new defaults, then the target cases' bench
    # with the seed packages and the compiled-step rows
    CHECK_ONLY="${CHECK_ONLY:-coefficients,layer,read_step,chain}" check 200
    run 90 experiments_launch python scripts/gpu_experiments.py launch
    run 60 experiments_read_step python scripts/gpu_experiments.py read-step
    run 220 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS" \
      --compiled-step
    ;;
  verify)
    # every check, the B = 1 layer kernel's chained timings, then the target cases' bench with
    # the seed packages and the compiled-step rows
    check 200
    run 60 experiments_b1 python scripts/gpu_experiments.py b1
    run 220 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS" \
      --compiled-step
    ;;
  small-tokens)
    # the dynamic coefficients' one-threadgroup-per-token kernels (candidate): their checks
    # (coefficients, read step, chain; B = 1 cases included), then timed against the tiled kernel
    CHECK_ARGS="--small-tokens 16" CHECK_ONLY="${CHECK_ONLY:-coefficients,read_step,chain}" check 200
    run 120 experiments_small_tokens python scripts/gpu_experiments.py small-tokens
    ;;
  wide-n)
    # dynamic coefficients for 8 < n <= 32 on the kernel path (the default since 2026-11-30): the
    # coefficient checks (n = 9, 16, 32 included) and `pytest -m gpu`, then timed against the
    # compiled path
    CHECK_ONLY="${CHECK_ONLY:-coefficients}" check 200
    run 150 experiments_wide_n python scripts/gpu_experiments.py wide-n
    ;;
  narrow-wide)
    # small-tokens and wide-n in one device call (both defaults since 2026-11-30): one round of
    # checks (B = 1 and n = 9, 16, 32 cases included), then each timed against the form it replaced
    CHECK_ARGS="--small-tokens 16" CHECK_ONLY="${CHECK_ONLY:-coefficients,read_step,chain}" check 200
    run 120 experiments_small_tokens python scripts/gpu_experiments.py small-tokens
    run 150 experiments_wide_n python scripts/gpu_experiments.py wide-n
    ;;
  close)
    # a session's last call: the target cases' and the n = 16 / 32 cases' bench with the seed
    # packages and the compiled-step rows, then where each target case's GPU time goes (ncu)
    run 420 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs \
      --only "$TARGETS,x32x,x16x" --compiled-step
    profile 100
    ;;
  recheck)
    # a second sample after `close` (the bench's spread between processes is ~10-20 %): the
    # target cases and the n = 16 fwd+bwd case, our rows only, then the wide-n timings again
    run 200 bench python -m mhc_mlx.cli.main bench --out "$res/bench_recheck" --overwrite --seeds "" \
      --only "$TARGETS,x16x" --impl kernels,kernels+step
    run 150 experiments_wide_n python scripts/gpu_experiments.py wide-n
    ;;
  glue)
    # the dynamic backward's glue kernel at 32 threads per group (ncu: 98 µs at 128 in the
    # 4096-token site backward, 32 groups on 132 SMs): coefficient and chain checks, then the
    # group sizes and the fragment packs timed
    CHECK_ARGS="--glue-threads 32" CHECK_ONLY="${CHECK_ONLY:-coefficients,chain}" check 200
    run 150 experiments_glue python scripts/gpu_experiments.py glue-threads
    ;;
  glue-packs)
    # the glue kernel that also writes gs in the tensor-core backward's fragment orders
    # (candidate, written 2026-11-30 without a GPU run): coefficient, read-step and chain checks
    # with it on and the tensor-core backward at every checked size, then timed against the packs
    CHECK_ARGS="--glue-packs --mma-vjp" CHECK_ONLY="${CHECK_ONLY:-coefficients,read_step,chain}" check 200
    run 120 experiments_glue_packs python scripts/gpu_experiments.py glue-packs
    ;;
  pending)
    # what the second session of 2026-11-30 wrote after its device time ran out, in one call:
    # the checks with the glue packs and the tensor-core backward at every checked size (the
    # read-step checks then take DX's pre share by vectors; `pytest -m gpu` runs the first-use
    # checks' cases with their CPU reference), then the glue packs timed, then the chain
    # experiment, whose "read step everywhere" forms take DX's vectorized pre share at 4096 tokens
    CHECK_ARGS="--glue-packs --mma-vjp" CHECK_ONLY="${CHECK_ONLY:-coefficients,read_step,chain}" check 200
    run 100 experiments_glue_packs python scripts/gpu_experiments.py glue-packs
    run 150 experiments_chain python scripts/gpu_experiments.py chain
    ;;
  loads)
    # the fourth session of 2026-11-30: the tensor-core forward in one wave, DX's rows loaded
    # together (defaults since; the stage as run then also checked and timed two forward load
    # forms that lost, 72ce94e): checks with the tensor-core backward at every size, the timings
    CHECK_ARGS="--mma-vjp" CHECK_ONLY="${CHECK_ONLY:-coefficients,chain}" NO_PYTEST=1 check 200
    run 240 experiments_load_forms python scripts/gpu_experiments.py load-forms
    ;;
  small)
    # launch-shape candidates (finish tokens, DX tiles), timings only
    run 200 experiments_small_forms python scripts/gpu_experiments.py small-forms
    ;;
  jacobian)
    # the fifth session of 2026-11-30: the split-off Sinkhorn backward as its Jacobian's transpose
    # (coefficients.SINKHORN_JACOBIAN, default since; then a candidate switched on by a check flag):
    # coefficient and chain checks with it, its timings against the replaying backward, then the
    # target cases' bench (our rows only; run W had the replay)
    CHECK_ONLY="${CHECK_ONLY:-coefficients,chain}" NO_PYTEST=1 check 170
    run 110 experiments_sinkhorn_jacobian python scripts/gpu_experiments.py sinkhorn-jacobian
    run 150 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds "" \
      --only "$TARGETS" --impl kernels,kernels+step
    ;;
  layer-jacobian)
    # written in the fifth session of 2026-11-30 after its device time ran out: the static layer's
    # coefficient backward (94-97 µs in every timeline) with its Sinkhorn backward as n^2 lanes of
    # forward mode (layer.COEFFICIENTS_JACOBIAN): layer checks with it, its timings, then the
    # default timeline (whose static fwd+bwd shows that kernel's time as it is)
    # and the Sinkhorn op's own backward in the same form (sinkhorn.JACOBIAN_VJP)
    # (both the defaults since the sixth session; these checks now run the replaced one-thread forms)
    CHECK_ARGS="--layer-replay --sinkhorn-thread-vjp" CHECK_ONLY="${CHECK_ONLY:-sinkhorn,coefficients,layer}" \
      NO_PYTEST=1 check 200
    run 120 experiments_layer_jacobian python scripts/gpu_experiments.py layer-jacobian
    run 60 experiments_sinkhorn_forms python scripts/gpu_experiments.py sinkhorn-forms
    timelines defaults
    ;;
  throughput)
    # where a bench row's time goes beyond its kernels (docs/kernel-notes.md row 39; run by hand
    # in the fifth session of 2026-11-30): the 4096-token cases and the copy floor, each as K
    # applications on rotated inputs in one eval, under PyTorch's profiler, then untraced at K = 10, 30
    throughput_trace
    run 200 throughput_host bash -c 'for k in 10 30; do python scripts/gpu_timeline.py run --throughput --k=$k || exit 1; done'
    ;;
  timelines)
    # (sixth session of 2026-11-30) the defaults' single-application timelines, then the large
    # cases as the bench times them (K = 10 in one eval) under PyTorch's profiler
    timelines defaults
    throughput_trace
    ;;
  composite-norm)
    # (sixth session of 2026-11-30) the layer above MAX_N_FUSED with mx.fast.rms_norm: the layer
    # checks (n = 32 among them), its alternated timings, the n = 32 static cases' bench with the seeds
    CHECK_ONLY=layer NO_PYTEST=1 check 150
    run 150 experiments_composite_norm python scripts/gpu_experiments.py composite-norm
    run 150 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs \
      --only static/fwd/1x32x2048,static/fwd/512x32x1280,static/fwd/1x4x512/bfloat16
    ;;
  inline-wide)
    # (sixth session of 2026-11-30) the single-launch layer forward above MAX_N_FUSED:
    # the layer checks with it, then its alternated timings
    # (the default since that session; --layer-composite-wide checks the replaced composite)
    CHECK_ARGS="--layer-composite-wide" CHECK_ONLY=layer NO_PYTEST=1 check 150
    run 120 experiments_inline_wide python scripts/gpu_experiments.py inline-wide
    ;;
  params)
    # (seventh session of 2026-11-30) the kernels' parameter arrays in GPU memory (build.DEVICE_PARAMS):
    # the layer, coefficient, site and read-step checks with it, its alternated timings against the
    # host-made arrays, then the target cases' bench (seeds) with it on
    CHECK_ARGS="--device-params" CHECK_ONLY=layer,coefficients,site,read_step NO_PYTEST=1 check 200
    run 150 experiments_params python scripts/gpu_experiments.py params
    run 240 bench python scripts/bench_with.py build.DEVICE_PARAMS=1 -- bench --out "$res/bench" --overwrite \
      --seeds .seedpkgs --only "$TARGETS"
    ;;
  latency)
    # (eighth session of 2026-11-30) LAYER_LATENCY and the compiled latency path: the layer
    # checks and pytest's layer tests, then their B = 1 timings
    CHECK_ONLY=layer NO_PYTEST=1 check 240
    run 300 gpu_tests_layer python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py -k layer -p no:cacheprovider
    run 120 experiments_b1_latency python scripts/gpu_experiments.py b1-latency
    ;;
  layer-source)
    # (eighth session of 2026-11-30) the static forward's LAYER now against before this session
    run 150 experiments_layer_source python scripts/gpu_experiments.py layer-source
    ;;
  latency4)
    # (eighth session of 2026-11-30) the rest of latency3's GPU tests (its pytest ran past its
    # limit after 24 passed), then a further sample of the target cases, our kernels only
    run 170 gpu_tests_latency_rest python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py \
      -k "dynamic_site or users_compile" -p no:cacheprovider
    run 150 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds "" \
      --only "$TARGETS" --impl kernels
    ;;
  latency3)
    # (eighth session of 2026-11-30) the latency paths' GPU tests (the layer's latency kernel,
    # the dynamic site under its compiled latency path), the B = 1 timings, then the target
    # cases' bench with the seeds
    run 240 gpu_tests_latency python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py -k "latency or dynamic_site" \
      -p no:cacheprovider
    run 60 core_latency_compile python -m pytest -q tests/core/test_core_latency_compile.py -p no:cacheprovider
    run 150 experiments_b1_latency python scripts/gpu_experiments.py b1-latency
    run 300 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    ;;
  latency2)
    # (eighth session of 2026-11-30) the split read step (coefficients.SPLIT_SMALL) with the rest
    # of the latency paths: the coefficient, read-step and layer checks, then the B = 1 trace
    # and timings
    CHECK_ONLY=coefficients,read_step,layer NO_PYTEST=1 check 300
    run 120 experiments_b1_trace python scripts/gpu_experiments.py b1-trace
    run 150 experiments_b1_latency python scripts/gpu_experiments.py b1-latency
    ;;
  b1-trace)
    # (eighth session of 2026-11-30) each B = 1 form's kernels traced as the bench runs it, the
    # SM clock sampled meanwhile; then the B = 1 static forward's forms timed
    (nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw --format=csv -lms 100 > "$res/clocks.csv" 2>&1 &
     echo $! > "$res/clocks.pid")
    run 120 experiments_b1_trace python scripts/gpu_experiments.py b1-trace
    kill "$(cat "$res/clocks.pid")" 2> /dev/null
    awk -F', ' 'NR > 1 {print $2}' "$res/clocks.csv" | sort | uniq -c | sort -rn | head -8
    run 120 experiments_b1_latency python scripts/gpu_experiments.py b1-latency
    ;;
  b1-sync)
    # (eighth session of 2026-11-30) B = 1 eval against a launch's GPU time; the B = 1 forms
    # eager and compiled; the same without CUDA graphs (MLX_USE_CUDA_GRAPHS=0, for scale)
    run 120 experiments_b1_sync python scripts/gpu_experiments.py b1-sync
    MLX_USE_CUDA_GRAPHS=0 run 120 experiments_b1_sync_nographs python scripts/gpu_experiments.py b1-sync
    ;;
  b1-split)
    # (seventh session of 2026-11-30) B = 1 graph building and eval apart, both parameter forms
    run 120 experiments_b1_split python scripts/gpu_experiments.py b1-split
    ;;
  probe-bench)
    # (seventh session of 2026-11-30) the B = 1 layer kernel against the same launch doing
    # nothing, then the target cases' bench with the seeds on the defaults
    run 120 experiments_b1_probe python scripts/gpu_experiments.py b1-probe
    run 300 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    ;;
  flat-logits)
    # (seventh session of 2026-11-30) the layer and coefficient checks on the defaults, then the
    # static layer's logits passed as they are against reshaped, alternated
    CHECK_ONLY=layer,coefficients NO_PYTEST=1 check 150
    run 150 experiments_flat_logits python scripts/gpu_experiments.py flat-logits
    ;;
  probe-tests)
    # (seventh session of 2026-11-30) the B = 1 probe with its variants interleaved, then
    # `pytest -m gpu` on the session's final code
    run 60 experiments_b1_probe python scripts/gpu_experiments.py b1-probe
    run 500 pytest_gpu python -m pytest -q -m gpu tests -p no:cacheprovider -rs --durations 5
    ;;
  vendor)
    # (thirteenth session of 2026-11-30) the tensor-core products beside MLX's own matmul of the
    # same shapes; the one pass's GPU tests (one edited in the twelfth session's review, not run
    # since); then the pipelined stage's target bench, a second sample
    run 240 experiments_vendor_gemm python scripts/gpu_experiments.py vendor-gemm
    run 150 gpu_tests_one_pass python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py -k one_pass \
      -p no:cacheprovider -o faulthandler_timeout=60
    run 240 bench python -m mhc_mlx.cli.main bench --pipelined --out "$res/bench" --overwrite --seeds "" \
      --only "$TARGETS" --impl kernels
    ;;
  wgmma)
    # (thirteenth session of 2026-11-30) the forward partials by warpgroup MMA (candidate): its
    # timings and trace (its descriptor reading against the MMA kernel first), then the
    # coefficient checks with it on
    run 200 experiments_wgmma python scripts/gpu_experiments.py wgmma
    [ -z "${NO_CHECK:-}" ] && CHECK_ONLY=coefficients CHECK_ARGS="--wgmma" NO_PYTEST=1 check 200
    ;;
  wgmma2)
    # (written in the thirteenth session of 2026-11-30 after its device time) dphi by warpgroup
    # MMA: its timings beside DPHI, the fwd+bwd with neither / the forward's / both; then the
    # coefficient (tensor-core backward at every size), chain and read-step checks with both on
    run 200 experiments_wgmma_dphi python scripts/gpu_experiments.py wgmma-dphi
    CHECK_ONLY=coefficients,chain,read_step CHECK_ARGS="--wgmma --dphi-wgmma --mma-vjp" NO_PYTEST=1 check 240
    ;;
  static-host)
    # (fifteenth session of 2026-11-30) the static forward's host costs per launch, custom
    # function output and StopGradient; INLINE_ALWAYS; the bench cases eager against +step
    run 400 experiments_static_host python scripts/gpu_experiments.py static-host
    ;;
  inline-fix)
    # (fifteenth session of 2026-11-30) the layer's inline form without x held across its
    # Sinkhorn (128 registers instead of 144): static-host, then the layer checks with
    # INLINE_ALWAYS on
    run 400 experiments_static_host python scripts/gpu_experiments.py static-host
    CHECK_ONLY=layer CHECK_ARGS="--layer-candidates" NO_PYTEST=1 check 240
    ;;
  verify17)
    # (seventeenth session of 2026-12-01) the few-token read step in one launch the default
    # (coefficients.ONE_LAUNCH_SMALL): the coefficient checks with the tensor-core backward, the
    # read-step and chain checks, and the whole pytest -m gpu in four shards beside them
    CHECK_ONLY=coefficients,read_step,chain CHECK_ARGS="--mma-vjp" CHECK_EXTRA=1 PYTEST_SHARDS=4 check 420
    ;;
  verify18)
    # (eighteenth session of 2026-12-01) the kernels' parameter arrays in GPU memory the default
    # (build.DEVICE_PARAMS, kernel-notes row 93): the target cases' bench (ours, pinned) first, then
    # verify17's checks and the whole pytest -m gpu in four shards
    run 120 bench_ours taskset -c 3 python -m mhc_mlx.cli.main bench --out "$res/bench_ours" --overwrite \
      --seeds "" --only "$TARGETS" --impl kernels
    CHECK_ONLY=coefficients,read_step,chain CHECK_ARGS="--mma-vjp" CHECK_EXTRA=1 PYTEST_SHARDS=4 check 400
    ;;
  next19)
    # (written in the eighteenth session of 2026-12-01 after its device time ran out; run in the
    # nineteenth: kernel-notes row 95)
    # 1. the target cases' kernels traced as the bench times them, with the parameter arrays in GPU
    #    memory the default (kernel-notes row 94): the dynamic fwd+bwd's wall split into GPU span
    #    and host time; 2. the glue kernel writing gs's fragments, now in DPHI_WG's order on Hopper
    #    too (coefficients.GLUE_PACKS, candidate): its GPU tests and checks, then the bench's dynamic
    #    rows with it off / on in alternated processes pinned to one CPU core
    throughput_trace
    run 120 pytest_glue python -m pytest -q -m gpu tests -p no:cacheprovider -rs -k glue_writes
    CHECK_ARGS="--glue-packs --mma-vjp" CHECK_ONLY=coefficients,chain NO_PYTEST=1 check 200
    ab_bench glue_packs coefficients.GLUE_PACKS=1 "dynamic/fwd+bwd/4096x4x4096,dynamic/fwd+bwd/512x4x1280"
    ;;
  pipe19)
    # (nineteenth session of 2026-12-01) why --pipelined does not help the dynamic fwd+bwd: the
    # dynamic cases and the copy traced as one eval of K applications, then as 4 evals handed over
    # back to back (mx.async_eval), in one process each
    for ev in 1 4; do
      run 150 "timeline_dynamic_evals$ev" bash -c 'python scripts/gpu_timeline.py run --throughput --only=dynamic \
        --pipelined=$1 --kineto "$0/tp$1.json" && python scripts/gpu_timeline.py report --throughput "$0/tp$1.json";
        rc=$?; rm -f "$0/tp$1.json"; exit $rc' "$res" "$ev"
    done
    ;;
  final19)
    # (nineteenth session of 2026-12-01) the target cases' bench pinned to one CPU core, with the
    # seeds, then ours alone (the defaults of verify18, unchanged since)
    pinned_bench
    ;;
  final17)
    # (seventeenth session of 2026-12-01) as final16: the target cases' bench pinned (seeds, then
    # ours), then ours unpinned, one eval and pipelined, and the throughput trace
    pinned_bench
    mkdir -p "$res/pipelined"
    pipelined_bench bench_pipelined "$res/pipelined/bench"
    ;;
  b1-ab)
    # (seventeenth session of 2026-12-01) the B = 1 dynamic forward with the read step in one
    # launch (coefficients.ONE_LAUNCH_SMALL, a candidate: one launch fewer to encode, ~6 µs by
    # encode-cost, ~1 µs more on the GPU by row 60) against the default two, in alternating
    # processes pinned to one CPU core, each the bench's B = 1 rows beside the tiny op
    for rep in 1 2 3; do
      run 90 "bench_b1_default_$rep" taskset -c 3 python -m mhc_mlx.cli.main bench --out "$res/b1_default_$rep" \
        --overwrite --seeds "" --impl kernels --only "static/fwd/1x4x512/bfloat16,dynamic/fwd/1x4x512"
      run 90 "bench_b1_one_launch_$rep" taskset -c 3 python scripts/bench_with.py coefficients.ONE_LAUNCH_SMALL=1 -- \
        bench --out "$res/b1_one_launch_$rep" --overwrite --seeds "" --impl kernels \
        --only "static/fwd/1x4x512/bfloat16,dynamic/fwd/1x4x512"
    done
    ;;
  encode)
    # (seventeenth session of 2026-12-01) the host's encoding cost per launch by kind of launch
    # (MLX op, one-line kernels, the layer kernel, the modules, the bench's small applications)
    run 200 experiments_encode_cost python scripts/gpu_experiments.py encode-cost
    run 200 experiments_encode_cost_paper python scripts/gpu_experiments.py encode-cost-paper
    ;;
  anatomy)
    # (seventeenth session of 2026-12-01) a throughput eval's GPU start, span and tail and the
    # host's CUDA calls, eager against the compiled step (constants or inputs); in three
    # processes: MLX's defaults, CUDA graphs off, a CUDA graph committed every 200 M elements
    # of inputs (MLX_MAX_MB_PER_BUFFER counts elements, 1000 by default on sm_90)
    run 200 experiments_eval_anatomy python scripts/gpu_experiments.py eval-anatomy
    run 200 experiments_eval_anatomy_nographs env MLX_USE_CUDA_GRAPHS=0 python scripts/gpu_experiments.py eval-anatomy
    run 200 experiments_eval_anatomy_mb200 env MLX_MAX_MB_PER_BUFFER=200 python scripts/gpu_experiments.py eval-anatomy
    ;;
  backward-tile)
    # (seventeenth session of 2026-12-01) the one-read dynamic backward's memory side
    # (scripts/backward_tile.py): today's two-kernel traffic against one persistent cluster launch
    run 200 experiments_backward_tile python scripts/gpu_experiments.py backward-tile
    ;;
  anatomy-paper)
    # (seventeenth session of 2026-12-01) eval-anatomy at 512 x 4 x 1280, where the host's
    # encoding is about the whole one-eval time (kernel-notes row 87), in two processes
    run 150 experiments_eval_anatomy_paper python scripts/gpu_experiments.py eval-anatomy-paper
    run 150 experiments_eval_anatomy_paper2 python scripts/gpu_experiments.py eval-anatomy-paper
    ;;
  step-trace)
    # (fifteenth session of 2026-11-30) the dynamic fwd+bwd eager and as one compiled step, traced
    run 200 experiments_step_trace python scripts/gpu_experiments.py step-trace
    ;;
  epilogue-verify)
    # (sixteenth session of 2026-11-30) MMA's and MMA_WG's shared epilogue (mhc_partials_row):
    # the coefficient checks with the tensor-core backward (MMA_WG for bfloat16 n = 4, MMA for
    # the rest, and MMA forced at X_UNROLL 1 and 4), the read-step and chain checks, and the whole
    # pytest -m gpu in four shards beside them
    CHECK_ONLY=coefficients,read_step,chain CHECK_ARGS="--mma-vjp" CHECK_EXTRA=1 PYTEST_SHARDS=4 check 420
    ;;
  final16)
    # (sixteenth session of 2026-11-30) the target cases' bench pinned to one CPU core with the
    # seeds and ours alone (as pinned-bench), then ours unpinned, one eval and pipelined, and the
    # throughput cases traced as the bench times them (as pipelined), into pipelined/
    pinned_bench
    mkdir -p "$res/pipelined"
    pipelined_bench bench_pipelined "$res/pipelined/bench"
    ;;
  clusters)
    # (sixteenth session of 2026-11-30) does a compile-time thread-block cluster survive MLX's
    # launch, and does a tile exchanging its sums in the cluster read x once at copy speed
    # (tile_reuse.py's CLUSTER form beside its other forms)? Then does the bench's eval still
    # allocate from CUDA after its warm-up (MLX's held memory per eval)?
    run 150 experiments_tile_reuse python scripts/gpu_experiments.py tile-reuse
    run 90 experiments_malloc_growth python scripts/gpu_experiments.py malloc-growth
    ;;
  wg-steps)
    # (fifteenth session of 2026-11-30) MMA_WG and DPHI_WG with their loop in one helper
    # (mhc_wg_steps): the coefficient checks with the tensor-core backward at every size, the
    # warpgroup GPU tests, then both kernels timed and traced
    CHECK_ONLY=coefficients CHECK_ARGS="--mma-vjp" NO_PYTEST=1 check 150
    run 100 pytest_warpgroup python -m pytest -q -m gpu tests -p no:cacheprovider -k warpgroup -rs
    run 60 experiments_wg_time python scripts/gpu_experiments.py wg-time
    ;;
  inline-verify)
    # (fifteenth session of 2026-11-30) the whole pytest -m gpu in four shards with the static
    # layer's single launch at every token count the default (layer.INLINE_ALWAYS)
    CHECK_ONLY=none PYTEST_SHARDS=4 check 420
    ;;
  wgmma-ab)
    # (fourteenth session of 2026-11-30) the warpgroup-MMA products (the defaults since) against
    # the MMA kernels in the dynamic site, 9 alternated rounds in one process
    run 300 experiments_wgmma_ab python scripts/gpu_experiments.py wgmma-ab
    ;;
  wgmma-verify)
    # (written in the thirteenth session of 2026-11-30 after its device time) with both
    # warpgroup-MMA products on: the site and layer checks and the whole pytest -m gpu in four
    # shards (MHC_TEST_KERNEL_SETTINGS makes them the tests' defaults); run after wgmma2 wins
    MHC_TEST_KERNEL_SETTINGS="coefficients_mma.WGMMA=1 coefficients_mma_vjp.DPHI_WGMMA=1" PYTEST_SHARDS=4 \
      CHECK_ONLY=site,layer CHECK_ARGS="--wgmma --dphi-wgmma" check 420
    ;;
  parts)
    # (thirteenth session of 2026-11-30) is the tensor-core forward (and dphi) bound by its mma
    # count? phi and gs in 3 / 2 / 1 bfloat16 parts, alone and traced
    run 200 experiments_parts python scripts/gpu_experiments.py parts
    ;;
  vendor2)
    # (thirteenth session of 2026-11-30) vendor-gemm again with our partials' packs taken out,
    # dphi's launch sizes and a kernel-level trace (its run also timed the forward at 1 and 4
    # token tiles per warp, since removed: in 7e2909e)
    run 300 experiments_vendor_gemm python scripts/gpu_experiments.py vendor-gemm
    ;;
  pipelined)
    # (twelfth session of 2026-11-30) the target cases, our kernels, one eval and pipelined
    # (several evals handed to MLX back to back), then the throughput cases traced as the bench
    # times them (docs/kernel-notes.md row 69)
    pipelined_bench bench "$res/bench"
    ;;
  ours)
    # the target cases, our kernels only (eager): a quick further sample of the bench's spread
    run 200 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds "" \
      --only "$TARGETS" --impl kernels
    ;;
  verify9)
    # (ninth session of 2026-11-30) every check with pytest -m gpu in four shards beside them
    PYTEST_SHARDS=4 check 420
    ;;
  verify-host)
    # (ninth session of 2026-11-30) after the host trims: pytest -m gpu in four shards beside the
    # layer and read-step checks
    PYTEST_SHARDS=4 CHECK_ONLY=layer,read_step check 330
    ;;
  host-bench)
    # (ninth session of 2026-11-30) the B = 1 calls after the host trims, then the target cases'
    # bench with the seeds, then a further sample of ours alone
    run 90 experiments_b1_host python scripts/gpu_experiments.py b1-host
    run 300 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    run 170 bench_ours python -m mhc_mlx.cli.main bench --out "$res/bench_ours" --overwrite --seeds "" \
      --only "$TARGETS" --impl kernels
    ;;
  one-launch)
    # (ninth session of 2026-11-30) the few-token dynamic read step in one launch (DYNAMIC_ONE):
    # coefficient and read-step checks with it, its GPU test, then its timings against the split
    CHECK_ARGS="--one-launch-small" CHECK_ONLY=coefficients,read_step NO_PYTEST=1 check 240
    run 200 gpu_tests_one python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py \
      -k "one_threadgroup_per_token or dynamic_site" -p no:cacheprovider
    run 150 experiments_one_launch python scripts/gpu_experiments.py one-launch
    ;;
  one-launch2)
    # (ninth session of 2026-11-30) one-launch's timings again, its traces now keyed on every
    # setting (the first run's module path had kept the split's trace), then the target cases'
    # bench with the seeds and DYNAMIC_ONE on
    run 120 experiments_one_launch python scripts/gpu_experiments.py one-launch
    run 300 bench_one python scripts/bench_with.py coefficients.ONE_LAUNCH_SMALL=1 -- bench --out "$res/bench_one" \
      --overwrite --seeds .seedpkgs --only "$TARGETS"
    ;;
  paired-graphs)
    # (tenth session of 2026-11-30) B = 1 without CUDA graphs (MLX_USE_CUDA_GRAPHS=0: each kernel
    # launched directly) against with them, each in its own process: the b1-host timings and the
    # bench's B = 1 rows; then the target cases' bench with the seeds, B = 1 rows paired with the
    # tiny op
    for g in 0 1; do
      MLX_USE_CUDA_GRAPHS=$g run 90 "experiments_b1_host_graphs$g" python scripts/gpu_experiments.py b1-host
      MLX_USE_CUDA_GRAPHS=$g run 90 "bench_b1_graphs$g" python -m mhc_mlx.cli.main bench --out "$res/bench_b1_graphs$g" \
        --overwrite --seeds "" --only static/fwd/1x4x512/bfloat16,dynamic/fwd/1x4x512 --impl kernels
    done
    run 300 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    ;;
  graphs-ab)
    # (tenth session of 2026-11-30) paired-graphs again, three processes of each, alternated and
    # pinned to one CPU core (processes on this host differed by up to 1.7x in host time): the
    # bench's B = 1 rows (kernels), then b1-host once each
    echo "== host: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo)"
    for rep in 1 2 3; do
      for g in 0 1; do
        MLX_USE_CUDA_GRAPHS=$g run 60 "bench_b1_graphs${g}_$rep" taskset -c 3 python -m mhc_mlx.cli.main bench \
          --out "$res/bench_b1_graphs${g}_$rep" --overwrite --seeds "" --only static/fwd/1x4x512/bfloat16,dynamic/fwd/1x4x512 --impl kernels
      done
    done
    for g in 0 1; do
      MLX_USE_CUDA_GRAPHS=$g run 90 "experiments_b1_host_graphs$g" taskset -c 3 python scripts/gpu_experiments.py b1-host
    done
    ;;
  verify10)
    # (tenth session of 2026-11-30) HyperConnection keeping its latency decision: pytest -m gpu in
    # four shards beside the read-step checks, then the bench's B = 1 rows pinned, twice
    PYTEST_SHARDS=4 CHECK_ONLY=read_step check 330
    for rep in 1 2; do
      run 60 "bench_b1_$rep" taskset -c 3 python -m mhc_mlx.cli.main bench --out "$res/bench_b1_$rep" --overwrite \
        --seeds "" --only static/fwd/1x4x512/bfloat16,dynamic/fwd/1x4x512 --impl kernels
    done
    ;;
  tile-reuse)
    # (written in the tenth session of 2026-11-30, after its device time) can one launch read a
    # token tile once for per-row sums and still write what needs them, at copy speed? The
    # question a one-pass dynamic backward hangs on (scripts/tile_reuse.py)
    run 150 experiments_tile_reuse python scripts/gpu_experiments.py tile-reuse
    ;;
  one-pass-split)
    # (eleventh session of 2026-11-30) where the split form's time goes: each launch alone in its
    # settings beside today's steps alone, then the whole forms
    run 200 experiments_one_pass_split python scripts/gpu_experiments.py one-pass-split
    ;;
  one-pass-mma)
    # (eleventh session of 2026-11-30) the "mma" form (the split's partials and glue, then the
    # tensor-core DX adding both shares): the breakdown, its GPU tests, the chain checks with it,
    # then the dynamic fwd+bwd bench with it on and off (one-pass4's)
    run 120 experiments_one_pass_split python scripts/gpu_experiments.py one-pass-split
    run 200 gpu_tests_one_pass python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py -k one_pass \
      -p no:cacheprovider -o faulthandler_timeout=60
    FORM=mma one_pass_chain_bench
    ;;
  verify11)
    # (eleventh session of 2026-11-30) the defaults after DX's new RES flag (two more inputs, off
    # by default): the coefficient and chain checks, then the target cases' bench with the seeds,
    # pinned to one CPU core
    CHECK_ONLY=coefficients,chain NO_PYTEST=1 check 200
    run 330 bench taskset -c 3 python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    ;;
  verify11b)
    # (eleventh session of 2026-11-30) the GPU tests of the dynamic backward after DX's RES flag
    # and the one pass's cleanup: the chained x cotangent, the dynamic coefficient gradients and
    # the one-pass candidate's tests
    run 270 gpu_tests_dynamic python -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py -p no:cacheprovider \
      -o faulthandler_timeout=100 -k "chained_x_cotangent or dynamic_coefficient_gradients or one_pass"
    ;;
  one-pass4)
    # (eleventh session of 2026-11-30) the chain checks with the one pass on in FORM (default
    # mma; FORM=split with ONE_PASS_CHECK_ARGS=--one-pass-split), then the dynamic fwd+bwd bench
    # with it on and off, each in its own process, twice
    one_pass_chain_bench
    ;;
  verify-standins)
    # (tenth session of 2026-11-30) the kernels' unread inputs as cached host-made stand-ins
    # (build.standin): the coefficient (tensor-core backward), chain and read-step checks
    CHECK_ONLY=coefficients,chain,read_step NO_PYTEST=1 check 200
    ;;
  pinned-bench)
    # (tenth session of 2026-11-30) the target cases' bench with the seeds, the process (and the
    # seeds' subprocesses) pinned to one CPU core as graphs-ab's were
    pinned_bench
    ;;
  layer-forms)
    # (ninth session of 2026-11-30) the B = 1 calls' host time, then the layer forward's launch
    # forms alternated (run then with the layer checks and a streamed-load form, since removed)
    run 90 experiments_b1_host python scripts/gpu_experiments.py b1-host
    run 200 experiments_layer_forms python scripts/gpu_experiments.py layer-forms
    ;;
  anatomy-verify)
    # (ninth session of 2026-11-30) the B = 1 anatomy alone, then verify9
    run 150 experiments_b1_anatomy python scripts/gpu_experiments.py b1-anatomy
    PYTEST_SHARDS=4 check 400
    ;;
  anatomy-bench)
    # (ninth session of 2026-11-30) where the B = 1 static launch's time goes, then the target
    # cases' bench with the seeds
    run 150 experiments_b1_anatomy python scripts/gpu_experiments.py b1-anatomy
    run 300 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    ;;
  gpu-tests)
    # `pytest -m gpu` alone (54 tests; beside the checks it ran out of 200 s)
    run 560 pytest_gpu python -m pytest -q -m gpu tests -p no:cacheprovider -rs --durations 15
    ;;
  timeline)
    # the `pytest -m gpu` tests the pending call's run did not reach (PYTEST_K; a stack dump after
    # 100 s in one test), then the target cases' kernels in stream order with the gaps between them:
    # Nsight Systems where installed, else PyTorch's profiler (CUPTI sees MLX's kernels too)
    run 240 pytest_gpu python -m pytest -q -m gpu tests -p no:cacheprovider -rs --durations 10 \
      -o faulthandler_timeout=100 -k "${PYTEST_K:-first_use or glue_writes}"
    timelines defaults glue-packs-read-step
    ;;
  op-paths)
    # the MLX-op forms that one-launch kernels replaced by default (the dynamic backward's glue,
    # the layer backward's coefficient gradients), still taken where the kernels do not apply
    CHECK_ARGS="--vjp-glue-ops --layer-coefficient-ops" CHECK_ONLY="${CHECK_ONLY:-coefficients,layer,chain}" check 200
    ;;
  mma-vjp)
    # the tensor-core coefficient backward (rewritten DX kernel) against the FP32 kernel
    run 150 experiments_mma_vjp python scripts/gpu_experiments.py mma-vjp
    ;;
  b1)
    # the B = 1 layer kernel by Sinkhorn iterations and threads (chained timings), then Nsight
    # Compute's time, instruction count and warp stalls of each variant
    run 60 experiments_b1 python scripts/gpu_experiments.py b1
    echo "== ncu-b1: the B = 1 variants under Nsight Compute"
    timeout -k 5 120 ncu --clock-control none --cache-control none -k regex:"mhc_layer|mhc_coefficients_static" \
      --section SpeedOfLight --section WarpStateStats --section LaunchStats \
      --metrics gpu__time_duration.sum,smsp__inst_executed.sum \
      python scripts/gpu_experiments.py b1 ncu > "$res/ncu_b1.log" 2>&1
    TAIL=20 report ncu_b1 $?
    ;;
  decide)
    # every default's checks, the experiments (which time the candidates against the defaults
    # in one process), then the target cases' bench with the defaults, n = 32 cases included
    check 200
    run 220 experiments python scripts/gpu_experiments.py
    run 150 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds "" --only "$TARGETS,x32x"
    ;;
  headers)
    # every check (the trimmed kernel headers compile on NVRTC and match the reference), the
    # trimmed-vs-full header timings, then the target cases' bench
    check 120
    run 60 experiments python scripts/gpu_experiments.py headers
    run 150 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds "" --only "$TARGETS"
    ;;
  layer-candidates)
    # the layer and coefficient checks with the layer candidate on (single launch at every
    # token count), then with the defaults, the experiments, and the target cases' bench with the
    # defaults and with --candidates
    CHECK_ARGS="--layer-candidates" CHECK_ONLY=layer check 150
    CHECK_ONLY="${CHECK_ONLY:-layer,coefficients}" check 150
    run 200 experiments python scripts/gpu_experiments.py
    run 120 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds "" --only "$TARGETS"
    run 60 bench_candidates python -m mhc_mlx.cli.main bench --candidates --out "$res/bench_candidates" --overwrite \
      --seeds "" --only "static/fwd/4096x4x4096,static/fwd+bwd/4096x4x4096"
    ;;
  experiments) run 420 experiments python scripts/gpu_experiments.py ;;
  chain)
    # the chained x cotangent's checks (whole sites, all dtypes) and the read step's, with the
    # tensor-core backward at every size (its accumulating DX in bf16 and fp16), then each timed
    # against the defaults
    CHECK_ARGS="--mma-vjp" CHECK_ONLY=chain,read_step,coefficients check 240
    run 150 experiments python scripts/gpu_experiments.py chain
    run 100 experiments_read_step python scripts/gpu_experiments.py read-step
    ;;
  read-step)
    # the fused read step's checks (its one-launch forward, coefficients.DYNAMIC_PRE, included),
    # then its alternated timings against the two ops
    CHECK_ARGS="--fused-read-step" CHECK_ONLY=read_step check 200
    run 200 experiments python scripts/gpu_experiments.py read-step
    ;;
  final)
    # the checks of what a session changed (CHECK_ONLY, default below), the experiments, then
    # the target cases' bench with the seed packages
    CHECK_ONLY="${CHECK_ONLY:-sinkhorn,coefficients,layer,read_step}" check 150
    run 200 experiments python scripts/gpu_experiments.py
    run 180 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    ;;
  tune)
    # the defaults' checks plus the tensor-core coefficients at X_UNROLL 2 and 4, then the
    # experiments (launch-shape sweeps), ncu on the tensor-core kernel, the target cases' bench
    # and their kernel profile
    CHECK_EXTRA=1 check 170
    run 170 experiments python scripts/gpu_experiments.py
    TAIL=200 ncu_mma 60
    run 90 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds "" --only "$TARGETS"
    profile 60
    ;;
  all)
    check 180
    run 120 bench python -m mhc_mlx.cli.main bench --out "$res/bench" --overwrite --seeds .seedpkgs --only "$TARGETS"
    profile 80
    run 140 experiments python scripts/gpu_experiments.py
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh check|bench|bench-full|check-bench-full|profile|experiments|all|candidates|adopt|verify|small-tokens|wide-n|narrow-wide|close|recheck|glue|glue-packs|pending|op-paths|mma-vjp|b1|decide|headers|layer-candidates|tune|final" >&2
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
