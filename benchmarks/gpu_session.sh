#!/usr/bin/env bash
# One device call per issue: every GPU check and benchmark of that part, each under its own time limit,
# so a slow step cannot starve the rest of the call (10 minutes). Logs go to $OUT/PART.log, results to
# $OUT/*.json (the device returns at most 8 files). Wheels for the optional competitors (FLA, CCE, Liger,
# matplotlib) are installed from .whl/ when it was carried.
#
#   bash benchmarks/gpu_session.sh walks|duv|fixup|fixup_tests|scans|fixes|final|scan_tests|htt|lookup|probe|model|profile|recompute|model_bench|dist|fit
#
# A step stopped at its limit gets SIGINT first, so pytest still prints what passed and failed.
set -u
PART=${1:?usage: gpu_session.sh walks|duv|fixup|fixup_tests|scans|fixes|final|scan_tests|htt|lookup|probe|model|profile|recompute|model_bench|dist|fit}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
LOG="$OUT/$PART.log"

step() {  # step NAME SECONDS CMD...: runs CMD with a time limit, logs it, prints its last lines
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  tail -n 4 "$LOG" | grep -v "^===" || true
}

# `timeout` runs programs, not shell functions: pytest is spelled out through this array.
PYTEST=(python3 -m pytest -q -p no:cacheprovider)

python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$LOG"
case "$PART" in
  walks)
    # The fused walk in one and two levels (and the walk alone by group size), widened vs 16-bit dots,
    # at every mixer length; then the whole mixer benchmark (scan against SDPA and FLA, layer, bandwidth).
    step walks 300 python3 benchmarks/check_semiseparable_gpu.py --parts fused_states \
      --fused-t 1024,2048,8192,16384,65536 --out "$OUT/ssd_walks.json"
    step mixer 250 python3 benchmarks/bench_mixer.py --out "$OUT/mixer.json"
    ;;
  duv)
    # The d cum rework of _chunk_duv_kernel: the GPU test module's tests listed in gpu_ids.txt (one id a
    # line; the rest ran in an earlier call), then the mixer benchmark and the per-kernel profile.
    if [ -f gpu_ids.txt ]; then
      mapfile -t IDS < gpu_ids.txt
      step ssd_tests 230 "${PYTEST[@]}" "${IDS[@]}"
    fi
    step mixer 230 python3 benchmarks/bench_mixer.py --out "$OUT/mixer.json"
    step profile 70 python3 benchmarks/profile_scan.py --out "$OUT/profile_scan.json"
    ;;
  fixup)
    # The two-level walk's fix-up as tiles of chunks and the chunk kernels' head-fastest launch order:
    # one vs two levels by group size at T 8192/16384, the per-kernel profile, the whole mixer benchmark.
    step levels 90 python3 benchmarks/sweep_ssd_levels.py --t 8192,16384 --out "$OUT/ssd_levels.json"
    step profile 90 python3 benchmarks/profile_scan.py --t 1024,4096,8192,16384,65536 --out "$OUT/profile_scan.json"
    step mixer 390 python3 benchmarks/bench_mixer.py --out "$OUT/mixer.json"
    ;;
  fixup_tests)
    # The GPU test module's chunk-kernel and walk tests after the launch-order change.
    step ssd_tests 540 "${PYTEST[@]}" tests/gpu/test_semiseparable_gpu.py -x
    ;;
  scans)
    step fused_check 150 python3 benchmarks/check_semiseparable_gpu.py --parts fused_states --out "$OUT/ssd_fused.json"
    step mixer 200 python3 benchmarks/bench_mixer.py --out "$OUT/mixer.json"
    step prune 60 python3 benchmarks/prune_ranks.py --device cuda --time-shape 64x1024 --out "$OUT/prune_ranks.json"
    step bk_seq_check 90 python3 benchmarks/check_bk_seq_gpu.py --out "$OUT/bk_seq.json"
    ;;
  fixes)
    # The graph pool release with one capture stream, the inference preset's memory by phase, and the
    # mixer with the fused walk and compact states on by default.
    step pool_test 150 "${PYTEST[@]}" tests/gpu/test_graphed_step_gpu.py -k gives_the_pool_back
    step inference_memory 120 python3 benchmarks/probe_inference_memory.py --out "$OUT/inference_memory.json"
    step mixer 200 python3 benchmarks/bench_mixer.py --out "$OUT/mixer.json"
    ;;
  final)
    # fp32 LNS tiles that do not spill (decode memory), the fused walk at long T, pruning on the GPU.
    step inference_memory 100 python3 benchmarks/probe_inference_memory.py --out "$OUT/inference_memory.json"
    step lns_tests 120 "${PYTEST[@]}" tests/gpu/test_lns_linear_gpu.py
    step fused_long 100 python3 benchmarks/check_semiseparable_gpu.py --parts fused_states --fused-t 16384,65536 \
      --out "$OUT/ssd_fused_long.json"
    step prune 170 python3 benchmarks/prune_ranks.py --device cuda --time-shape 64x1024 --out "$OUT/prune_ranks.json"
    ;;
  scan_tests)
    step ssd_tests 240 "${PYTEST[@]}" tests/gpu/test_semiseparable_gpu.py
    step linrec_tests 120 "${PYTEST[@]}" tests/gpu/test_linear_recurrence_gpu.py
    step bk_tests 200 "${PYTEST[@]}" tests/gpu/test_bk_gpu.py tests/gpu/test_bk_seq_gpu.py
    ;;
  htt)
    # Tests first: the lookup's compact-slot backward has run tests 1-15 of test_tt_embedding_gpu.py only.
    step htt_tests 300 "${PYTEST[@]}" tests/gpu/test_tt_embedding_gpu.py tests/gpu/test_tt_head_chunked_gpu.py
    step htt_bench 280 python3 benchmarks/bench_htt.py --out "$OUT/htt.json"
    ;;
  lookup)
    # The TT lookup's counting-sort backward: its GPU tests, then the lookup benchmark with the launch-shape
    # sweep (uniform and Zipf ids) and a kernel profile of one fwd+bwd.
    step lookup_tests 300 "${PYTEST[@]}" tests/gpu/test_tt_embedding_gpu.py
    step lookup_bench 240 python3 benchmarks/bench_htt.py --parts lookup --sweep --segment-grid --profile \
      --out "$OUT/htt_lookup.json"
    ;;
  probe)
    # The causal conv kernels (tests, then against the compiled shifted adds they replace), then where
    # a compiled, graphed MuseLM step's GPU time goes, by kernel (T 1024, the model benchmark's shape).
    step conv_tests 150 "${PYTEST[@]}" tests/gpu/test_causal_conv_gpu.py
    step conv_bench 90 python3 benchmarks/bench_conv.py --out "$OUT/conv.json"
    step profile 300 python3 benchmarks/profile_step.py --compile on --cuda-graph --top 90 --models muse --out "$OUT"
    ;;
  model)
    step graphed_tests 200 "${PYTEST[@]}" tests/gpu/test_graphed_step_gpu.py \
      -k "matches_eager_steps or refuses_a_stepped or gives_the_pool_back"
    step memory 360 python3 benchmarks/validate_memory.py --max-seconds 330 --out "$OUT"
    ;;
  profile)
    step profile 300 python3 benchmarks/profile_step.py --compile on --cuda-graph --top 80 --out "$OUT"
    step profile_t16k 200 python3 benchmarks/profile_step.py --compile on --cuda-graph --top 40 --seq-len 16384 \
      --models muse --out "$OUT/t16k"
    ;;
  recompute)
    # The compiled block's backward recomputation (layers/recompute.py): Inductor against eager and the
    # CPU model of what it keeps, the graphed step, then a compiled, graphed MuseLM step at T 1024 (time
    # and peak memory, beside profile_step.json of earlier commits).
    step recompute_tests 240 "${PYTEST[@]}" tests/gpu/test_recompute_gpu.py tests/gpu/test_graphed_step_gpu.py
    step profile 330 python3 benchmarks/profile_step.py --compile on --cuda-graph --top 60 --models muse --out "$OUT"
    ;;
  model_bench)
    step model 570 python3 -m muse_lm bench --only model --cuda-graph auto --max-seconds 540 --out "$OUT"
    ;;
  dist)
    # Scaling with 1 and with 16 CPU threads per process in the same call (the thread count moved the
    # 1-GPU baseline between sessions), then the fit search, which writes its rows as it goes.
    step threads1 200 env OMP_NUM_THREADS=1 python3 benchmarks/bench_distributed.py --out "$OUT/omp1" \
      --presets 24gb --steps 5 --warmup 2 --fit-budget-s 0 --curve-steps 0
    step threads16 200 env OMP_NUM_THREADS=16 python3 benchmarks/bench_distributed.py --out "$OUT/omp16" \
      --presets 24gb --steps 5 --warmup 2 --fit-budget-s 0 --curve-steps 0
    ;;
  fit)
    step fit 560 python3 benchmarks/bench_distributed.py --out "$OUT" --presets 24gb --steps 3 --warmup 2 \
      --fit-budget-s 110 --curve-steps 0
    ;;
  *) echo "unknown part $PART (walks, duv, scans, fixes, final, scan_tests, htt, probe, model, profile, recompute, model_bench, dist, fit)"; exit 2 ;;
esac
