#!/usr/bin/env bash
# Issue #7, fourth round: A/B runs of one build in one device call (env switches and
# kernel options), after the op and model checks of its new paths.
# Usage: scripts/issue7-ab.sh BIN; logs under $OUT, a summary on stdout.
set -uo pipefail
bin=${1:-.gpu}
out=${OUT:-/tmp/issue7-ab}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DSV2_REQUIRE_GPU=1 DSV2_KERNEL_CACHE=/tmp/dsv2-kc
lite="--device cuda --dtype bf16 --random-weights deepseek-v2-lite"
t0=$SECONDS
echo "build of commit $(cat "$bin/COMMIT" 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# 1. The op and model checks: defaults, then the one-launch MoE down projection.
chk() {
  local name=$1; shift
  env "$@" timeout 240 "$bin/$name" --test-threads=1 > "$out/$name.log" 2>&1
  echo "$name $* exit $? ($((SECONDS - t0)) s): $(grep -E 'test result' "$out/$name.log" | tail -1)"
  grep -E "panicked|FAILED" "$out/$name.log" | head -4
}
chk test-ops
chk test-model
mv "$out/test-ops.log" "$out/test-ops-default.log"
chk test-ops DSV2_CUDA_MOE_DOWN_ALL=1
# 2. Decode at batch 1 and 8, context 1K, per variant (two passes).
dec() {
  local name=$1; shift
  env "$@" timeout 90 "$bin/dsv2" bench $lite --prompt-lengths 16 --contexts 1024 --batch-sizes 1,8 \
    --decode-tokens 64 > "$out/cur.txt" 2> /dev/null
  local rc=$?
  { echo "== $name: $* (exit $rc)"; cat "$out/cur.txt"; } >> "$out/ab.log"
  printf "%-22s %s\n" "$name" "$(grep -E '^ +[0-9]+ +1024 ' "$out/cur.txt" | awk '{printf "b%s %s ms %s tok/s | ", $1, $3, $4}')"
}
echo "=== decode A/B ($((SECONDS - t0)) s)"
for pass in 1 2; do
  dec "preload" DSV2_CUDA_VEC_KERNELS=1
  dec "no preload" DSV2_CUDA_KERNEL_OPTIONS=-DDSV2_NO_PRELOAD
  dec "preload + down_all" DSV2_CUDA_MOE_DOWN_ALL=1
done
# 3. Prefill 4 x 512 / 4 x 2048 and batch 256: vectorized row kernels or not.
pre() {
  local name=$1; shift
  env "$@" timeout 150 "$bin/dsv2" bench $lite --prompt-lengths 512,2048 --prefill-batch 4 --prefill-runs 3 \
    --contexts 1024 --batch-sizes 256 --decode-tokens 8 > "$out/cur.txt" 2> /dev/null
  local rc=$?
  { echo "== $name: $* (exit $rc)"; cat "$out/cur.txt"; } >> "$out/ab.log"
  printf "%-22s %s %s\n" "$name" "$(grep -E '^ +[0-9]+ +4 ' "$out/cur.txt" | awk '{printf "4x%s %s tok/s %s | ", $1, $4, $6}')" \
    "$(grep -E '^ +256 +1024 ' "$out/cur.txt" | awk '{printf "b256 %s ms %s tok/s", $3, $4}')"
}
echo "=== prefill A/B ($((SECONDS - t0)) s)"
pre "vec"
pre "scalar" DSV2_CUDA_VEC_KERNELS=0
pre "vec"
echo "done ($((SECONDS - t0)) s)"
rm -f "$out/cur.txt"
