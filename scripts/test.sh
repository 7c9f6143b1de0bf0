#!/usr/bin/env bash
# The project's test command: every Rust test, then the black-box HTTP tests of
# `dsv2 serve` with the official OpenAI Python client (in a venv it creates).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
# The kernel paths of CPUs without AVX-512 BF16 (Cascade/Ice Lake), without AVX-512
# (Zen 2/3, Haswell-Skylake) and without SIMD, end to end on this machine: the backend's,
# the model's and the engine's tests under each limit (see dsv2_core::isa).
for isa in avx512 avx2 portable; do
    echo "== DSV2_CPU_ISA=$isa"
    DSV2_CPU_ISA=$isa cargo test -p dsv2-cpu -p dsv2-model -p dsv2-engine
done
# Many threads (a 16-core machine's team, oversubscribed here: which thread claims which
# task varies, and a warm step must still allocate nothing), with the paths of Intel's
# AVX-512 BF16 cores: q8 prompt rows in int8 terms and the decode attention over a bf16
# cache in f32, beside the bf16 prefill attention (dsv2_core::isa::bf16_dot_keeps_pace).
echo "== RAYON_NUM_THREADS=16 DSV2_BF16_KEEPS_PACE=0"
RAYON_NUM_THREADS=16 DSV2_BF16_KEEPS_PACE=0 cargo test -p dsv2-cpu -p dsv2-model -p dsv2-engine
cargo build -p dsv2-cli
bash tests/server/run.sh target/debug/dsv2
