#!/usr/bin/env bash
# Issue #7, fifth round: A/B runs of one build in one device call (env switches and
# kernel options), after the op and model checks of its new paths.
# Usage: scripts/issue7-ab.sh BIN [BUDGET_S]; logs under $OUT, a summary on stdout. Runs
# that would start past BUDGET_S seconds (default 185) are skipped.
set -uo pipefail
bin=${1:-.gpu}
budget=${2:-185}
out=${OUT:-/tmp/issue7-ab}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DSV2_REQUIRE_GPU=1 DSV2_KERNEL_CACHE=/tmp/dsv2-kc
lite="--device cuda --dtype bf16 --random-weights deepseek-v2-lite"
extra="-DDSV2_DEC_PRELOAD -DDSV2_DOWN_IDS_EARLY"
# "all": the batch-1 kernels with every optional variant (mla_decode's first tile and the
# MoE down projection's routed rows before the PDL wait, 64 decode splits).
all=("DSV2_CUDA_KERNEL_OPTIONS=$extra" DSV2_CUDA_DEC_SPLITS=64)
t0=$SECONDS
echo "build of commit $(cat "$bin/COMMIT" 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# 1. The op and model checks: defaults (the batch-1 kernels), then the op tests of the
#    new paths with the optional kernel variants compiled in.
chk() {
  local name=$1 log=$2; shift 2
  timeout 90 env "$@" "$bin/$name" --test-threads=1 > "$out/$log.log" 2>&1
  echo "$log exit $? ($((SECONDS - t0)) s): $(grep -E 'test result' "$out/$log.log" | tail -1)"
  grep -E "panicked|FAILED" "$out/$log.log" | head -4
}
chk test-ops test-ops
chk test-model test-model
chk test-ops test-ops-all "${all[@]}"
# 2. Decode at batch 1, context 1K, per variant, alternating.
dec() {
  local name=$1; shift
  if (( SECONDS - t0 > budget )); then echo "$name: skipped ($((SECONDS - t0)) s)"; return; fi
  timeout 60 env "$@" "$bin/dsv2" bench $lite --prompt-lengths 16 --contexts 1024 --batch-sizes 1 \
    --decode-tokens 64 > "$out/cur.txt" 2> /dev/null
  local rc=$?
  { echo "== $name: $* (exit $rc)"; cat "$out/cur.txt"; } >> "$out/ab.log"
  printf "%-18s %s (%d s)\n" "$name" "$(grep -E '^ +1 +1024 ' "$out/cur.txt" | awk '{printf "%s ms %s tok/s", $3, $4}')" \
    $((SECONDS - t0))
}
echo "=== decode A/B ($((SECONDS - t0)) s)"
for pass in 1 2; do
  dec "8-row kernels" DSV2_CUDA_ROW1=0
  dec "row1" DSV2_CUDA_ROW1=1
  dec "row1 all" "${all[@]}"
  [[ $pass == 1 ]] && dec "row1 no preload" DSV2_CUDA_KERNEL_OPTIONS=-DDSV2_ROW1_NO_PRELOAD
done
dec "row1 splits 64" DSV2_CUDA_DEC_SPLITS=64
dec "row1 dec preload" DSV2_CUDA_KERNEL_OPTIONS=-DDSV2_DEC_PRELOAD
dec "row1 ids early" DSV2_CUDA_KERNEL_OPTIONS=-DDSV2_DOWN_IDS_EARLY
dec "row1 all" "${all[@]}"
dec "row1" DSV2_CUDA_ROW1=1
dec "8-row kernels" DSV2_CUDA_ROW1=0
echo "done ($((SECONDS - t0)) s)"
rm -f "$out/cur.txt"
