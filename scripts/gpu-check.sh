#!/usr/bin/env bash
# The whole GPU check of the CUDA backend, on a machine with an NVIDIA GPU, from binaries
# built elsewhere by scripts/gpu-build.sh. Run from the repository root (for
# tests/fixtures):
#
#   BIN/gpu-check.sh BIN        (BIN: the folder gpu-build.sh filled; default .gpu)
#
# LITE_BENCH=0 skips the V2-Lite-shaped memory and speed run (about 90 s).
# Logs go to $OUT (default /tmp/dsv2-gpu-check), compiled kernels to $OUT/kernel-cache.
# Each step has a time limit. Exit status: 0 when every check passed.
set -uo pipefail
bin=$(cd "${1:-.gpu}" && pwd)
out=${OUT:-/tmp/dsv2-gpu-check}
mkdir -p "$out"
# The CUDA libraries: the toolkit's, else those of the nvidia-* Python wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
pylibs=$(python3 -c 'import glob, site; print(":".join(sorted(set(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib")))))' 2>/dev/null || true)
[ -n "$pylibs" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$pylibs"
export DSV2_REQUIRE_GPU=1
export DSV2_KERNEL_CACHE="$out/kernel-cache"
fail=0
step() { echo; echo "=== $*"; }
step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee "$out/device.log"
step "kernels compile with NVRTC (sm_90, sm_80; f32 and bf16)"
timeout 300 "$bin/test-nvrtc" --nocapture 2>&1 | tee "$out/nvrtc.log" || fail=1
step "kernel cache: first start compiles with NVRTC, the second loads cubins"
for run in cold warm; do
  start=$(date +%s%N)
  timeout 120 "$bin/dsv2" generate --device cuda --dtype bf16 --token-ids 1,2,3 --max-tokens 1 > /dev/null 2>&1 || fail=1
  echo "RESULT kernel cache $run start: $(( ($(date +%s%N) - start) / 1000000 )) ms (dsv2 generate, 1 token)"
done
ls "$DSV2_KERNEL_CACHE"
for t in ops model fixtures; do
  step "test-$t"
  start=$(date +%s%N)
  timeout 300 "$bin/test-$t" --test-threads=1 --nocapture 2>&1 | tee "$out/$t.log" || fail=1
  echo "test-$t: $(( ($(date +%s%N) - start) / 1000000 )) ms"
done
step "dsv2 logits --device cuda on every fixture, bf16 and f32"
timeout 300 python3 "$bin/check_fixtures_cli.py" "$bin/dsv2" tests/fixtures 2>&1 | tee "$out/cli.log" || fail=1
step "clear errors: a device that does not exist, quantized weights"
if "$bin/dsv2" logits --device cuda:7 --token-ids 1,2 --output "$out/none.safetensors" 2> "$out/err.log"; then
  echo "FAIL: --device cuda:7 succeeded"; fail=1
else
  cat "$out/err.log"
fi
if "$bin/dsv2" logits --device cuda --quantize q8 --token-ids 1,2 --output "$out/none.safetensors" 2> "$out/err.log"; then
  echo "FAIL: --quantize q8 on cuda succeeded"; fail=1
else
  cat "$out/err.log"
fi
if [ -x "$bin/lite-bench" ] && [ "${LITE_BENCH:-1}" != 0 ]; then
  step "V2-Lite shapes, random bf16 weights: memory and decode speed"
  timeout 400 "$bin/lite-bench" 2>&1 | tee "$out/lite-bench.log" || fail=1
fi
step "timing: dsv2 generate on the built-in model"
timeout 120 "$bin/dsv2" generate --device cuda --dtype bf16 --token-ids 1,2,3,4,5,6,7,8 --max-tokens 200 2>&1 | tail -2 | tee "$out/generate.log"
echo
grep -h "^RESULT" "$out"/*.log | sort | uniq
if [ "$fail" = 0 ]; then echo "GPU CHECK PASSED"; else echo "GPU CHECK FAILED"; fi
exit "$fail"
