#!/usr/bin/env bash
# Issue #7 device runs: the op and model checks of the new kernels, a per-op profile of
# decode steps, and the dsv2 bench grid. Usage: scripts/issue7-run.sh BIN MODE
#   MODE: check (test-ops + test-model), profile, bench, peer, all (check, bench, peer),
#   final (the whole gpu-check.sh without its lite-bench, then bench and peer),
#   final-nopeer (the same without the peer; its figures do not depend on dsv2).
# PEER: the folder holding hf_transformers.py (default bench/peers); PEER_DEADLINE (s) and
# PEER_SETTINGS (its --decode-settings) for the peer.
set -uo pipefail
bin=${1:-.gpu}
mode=${2:-all}
out=${OUT:-/tmp/issue7}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DSV2_REQUIRE_GPU=1 DSV2_KERNEL_CACHE=$out/kernel-cache
lite="--device cuda --dtype bf16 --random-weights deepseek-v2-lite"
[ -f "$bin/COMMIT" ] && echo "build of commit $(cat "$bin/COMMIT")"
if [[ $mode == final || $mode == final-nopeer ]]; then
  echo "=== gpu-check.sh (LITE_BENCH=0)"
  LITE_BENCH=0 OUT=$out/gpu-check timeout 900 "$bin/gpu-check.sh" "$bin" > "$out/gpu-check.log" 2>&1
  echo "exit $?"
  grep -E "^RESULT|FAIL|test result|^===|GPU CHECK" "$out/gpu-check.log" | tail -45
  [[ $mode == final ]] && mode=final-rest || mode=final-rest-nopeer
fi
if [[ $mode == check || $mode == all ]]; then
  for t in ops model; do
    echo "=== test-$t"
    timeout 300 "$bin/test-$t" --test-threads=1 --nocapture > "$out/$t.log" 2>&1
    echo "exit $?"
    grep -E "test result|panicked|decode attention|moe .*Bf16|mla_attention .*h16" "$out/$t.log" | head -40
  done
fi
if [[ $mode == profile ]]; then
  echo "=== profile (no graphs): prefill 4 x 2048, decode batch 1 and 256 at context 1024"
  DSV2_CUDA_PROFILE=1 timeout 300 "$bin/dsv2" bench $lite --prompt-lengths 2048 --prefill-batch 4 \
    --contexts 1024 --batch-sizes 1,256 --decode-tokens 8 > "$out/profile.txt" 2> "$out/profile.log"
  echo "exit $?"
  cat "$out/profile.txt"
  grep -A25 "profile: steps of 1 tokens" "$out/profile.log"
  grep -A25 "profile: steps of 256 tokens" "$out/profile.log"
  grep -A25 "profile: steps of 8192 tokens" "$out/profile.log"
fi
if [[ $mode == bench || $mode == all || $mode == final-rest || $mode == final-rest-nopeer ]]; then
  echo "=== dsv2 bench grid"
  timeout 400 "$bin/dsv2" bench $lite --prompt-lengths 512,2048 --prefill-batch 4 --prefill-runs 3 --contexts 1024 \
    --batch-sizes 1,8,32,128,256 --decode-tokens 16 --json > "$out/bench.txt" 2> "$out/bench.log"
  echo "exit $?"
  head -n -1 "$out/bench.txt"
  tail -n 1 "$out/bench.txt" > "$out/bench.json"
fi
if [[ $mode == peer || $mode == all || $mode == final-rest ]]; then
  echo "=== HF transformers peer"
  deadline=${PEER_DEADLINE:-300}
  PYTHONUNBUFFERED=1 timeout $((deadline + 30)) python3 "${PEER:-bench/peers}/hf_transformers.py" --prompt-lengths 512,2048 \
    --prefill-batch 4 --batch-sizes 1,8,32,128,256 --context 1024 --decode-tokens 16 --deadline-s "$deadline" \
    --decode-settings "${PEER_SETTINGS:-dynamic,static,compile}" --json "$out/peer.json" > "$out/peer.txt" 2> "$out/peer.log"
  echo "exit $?"
  head -n -1 "$out/peer.txt"
  tail -5 "$out/peer.log"
fi
