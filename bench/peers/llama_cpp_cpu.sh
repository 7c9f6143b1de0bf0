#!/usr/bin/env bash
# llama.cpp on the CPU as the peer of `dsv2 bench` (issue #5): build it from source, convert
# a HuggingFace DeepSeek-V2 checkpoint folder to GGUF, and time both engines on the same
# weights, one after the other, in one invocation, with one side-by-side table.
#
# Usage:
#   bench/peers/llama_cpp_cpu.sh setup   [TORCH_SITE_PACKAGES]
#       Make the Python environment VENV: cmake and ninja (to build), transformers==4.57.6,
#       sentencepiece, protobuf, numpy, safetensors (to convert). torch: from a site-packages
#       folder that has it (a .pth file points there: no second 5 GB copy; e.g.
#       /work/venvs/fx/lib/python3.11/site-packages), else `pip install torch`.
#   bench/peers/llama_cpp_cpu.sh build   SDIST LLAMA_DIR
#       Unpack the llama-cpp-python sdist SDIST (it vendors llama.cpp in vendor/llama.cpp)
#       into LLAMA_DIR/src and build, CPU only (-DGGML_NATIVE=ON, Release, static, no
#       OpenSSL/curl), the targets llama-bench, llama-quantize and llama-completion into
#       LLAMA_DIR/build/bin. The llama.cpp commit is read from the sdist's CHANGELOG ("update
#       llama.cpp to ggml-org/llama.cpp@HASH": an sdist has no .git) and compiled in, so
#       `llama-bench` reports it; LLAMA_DIR/VERSION records it with the compiler.
#   bench/peers/llama_cpp_cpu.sh convert LLAMA_DIR CKPT GGUF_DIR
#       CKPT (HF folder: config.json, *.safetensors, tokenizer files) -> GGUF_DIR/bf16.gguf
#       (convert_hf_to_gguf.py), then llama-quantize to GGUF_DIR/q8.gguf (Q8_0 everywhere
#       it quantizes) and GGUF_DIR/q4.gguf (dsv2's q4: routed experts `ffn_*_exps` Q4_0 =
#       4-bit blocks of 32 with an f16 scale, every other matrix Q8_0), then deletes the
#       bf16 GGUF (KEEP_BF16=1 keeps it, rewritten with the metadata below, for FORMATS=bf16).
#   bench/peers/llama_cpp_cpu.sh bench   LLAMA_DIR CKPT GGUF_DIR [OUT_DIR]
#       For each format in FORMATS (q8 q4): `llama-bench -t THREADS` (prefill PROMPT tokens;
#       decode N_GEN tokens at each depth in DEPTHS), then `dsv2 bench --model CKPT
#       --quantize FORMAT` on the same grid; then one table. Raw outputs (JSON, logs) go to
#       OUT_DIR (default: GGUF_DIR/results-DATE).
#   bench/peers/llama_cpp_cpu.sh smoke   LLAMA_DIR CKPT GGUF_DIR
#       SMOKE_TOKENS (8) greedy tokens of SMOKE_PROMPT from both engines, each format, on the
#       same checkpoint: both load and run the weights, and the texts are compared (on random
#       weights the logits are near ties, so quantization noise can change a token).
#   bench/peers/llama_cpp_cpu.sh table   OUT_DIR
#       Print the table again from the raw outputs of an earlier `bench`.
#
# Environment (defaults in brackets):
#   DSV2        the dsv2 binary [REPO/target/release/dsv2; build: cargo build --release -p dsv2-cli]
#   PYTHON      the Python of convert_hf_to_gguf.py: torch, numpy and transformers 4.x (llama.cpp
#               pins 4.57.6; transformers 5 loads this tokenizer without its BOS, so the
#               converter does not recognize the DeepSeek pre-tokenizer) [VENV/bin/python]
#   CMAKE       [VENV/bin/cmake if present, else cmake on PATH]
#   VENV        [/work/venvs/peer], made by `setup`
#   VIA         the converter's output type for `convert` [bf16]: bf16 (a bf16 GGUF, then
#               llama-quantize to q8 and q4: peak disk = checkpoint + bf16 GGUF + q8) or q8_0
#               (the converter writes Q8_0, q4 requantizes the routed experts from it: peak
#               disk = checkpoint + 2 × q8, for the full-depth V2-Lite on ~45 GB free)
#   THREADS     threads of both engines [2]   (dsv2 uses RAYON_NUM_THREADS=THREADS)
#   FORMATS     [q8 q4]; bf16 also works when GGUF_DIR/bf16.gguf was kept (KEEP_BF16=1):
#               dsv2 then runs the checkpoint's bf16 weights (f32 activations)
#   PROMPT [512]   DEPTHS [0,1024]   N_GEN [16]
#   REPS        llama-bench repetitions of each test (mean reported), and dsv2's
#               --prefill-runs (median reported) [3]
#   DSV2_EXTRA  extra flags of the `dsv2 bench` runs, recorded in run.txt [none]; e.g.
#               "--activation-terms 1" (llama.cpp's q8_0 activation rounding in q8 products)
#   NICE        niceness of build, convert and smoke [15]
#   BENCH_NICE  niceness of `bench` [0]: the measurement wants the machine to itself
#   JOBS        build jobs [nproc]
#
# The whole measurement on prepared artifacts (see docs/BENCHMARKS.md, "CPU peer"):
#   bench/peers/llama_cpp_cpu.sh bench /work/peer-data/llama.cpp \
#       /work/peer-data/v2-lite-8l /work/peer-data/v2-lite-8l-gguf
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
NICE="${NICE:-15}"
BENCH_NICE="${BENCH_NICE:-0}"
THREADS="${THREADS:-2}"
FORMATS="${FORMATS:-q8 q4}"
PROMPT="${PROMPT:-512}"
DEPTHS="${DEPTHS:-0,1024}"
N_GEN="${N_GEN:-16}"
REPS="${REPS:-3}"
DSV2="${DSV2:-$REPO/target/release/dsv2}"
DSV2_EXTRA="${DSV2_EXTRA:-}"
JOBS="${JOBS:-$(nproc)}"
VIA="${VIA:-bf16}"
[[ "$VIA" == bf16 || "$VIA" == q8_0 ]] || { echo "VIA must be bf16 or q8_0, not $VIA" >&2; exit 2; }
VENV="${VENV:-/work/venvs/peer}"
PYTHON="${PYTHON:-$VENV/bin/python}"
if [[ -z "${CMAKE:-}" ]]; then
    if [[ -x "$VENV/bin/cmake" ]]; then CMAKE="$VENV/bin/cmake"; else CMAKE=cmake; fi
fi

log() { printf '[llama_cpp_cpu %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# timed WHAT LOGFILE CMD...: run CMD with its output in LOGFILE, and log its wall time.
timed() {
    local what="$1" logfile="$2"; shift 2
    local t0 rc=0; t0=$(date +%s.%N)
    "$@" >"$logfile" 2>&1 || rc=$?
    log "$what: $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s$([[ $rc == 0 ]] || echo ", exit status $rc")"
    return "$rc"
}

cmd_setup() {
    local torch_site="${1:-}"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q cmake ninja "transformers==4.57.6" sentencepiece \
        "protobuf>=4.21,<5" numpy safetensors pyyaml
    if [[ -n "$torch_site" ]]; then
        [[ -d "$torch_site/torch" ]] || die "no torch in $torch_site"
        local site; site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        # appended after the venv's own site-packages: its transformers 4.57.6 wins
        echo "$torch_site" > "$site/zz_torch_from.pth"
    else
        "$VENV/bin/pip" install -q torch
    fi
    "$VENV/bin/python" -c 'import torch, transformers, numpy; print("torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)'
}

cmd_build() {
    local sdist="$1" dir="$2"
    [[ -f "$sdist" ]] || die "no sdist at $sdist"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [[ ! -f "$dir/src/CMakeLists.txt" ]]; then
        log "unpacking $sdist"
        local tmp="$dir/unpack.$$"
        mkdir -p "$tmp"
        tar xzf "$sdist" -C "$tmp"
        local top; top=$(ls "$tmp")
        rm -rf "$dir/src"
        mv "$tmp/$top/vendor/llama.cpp" "$dir/src"
        cp "$tmp/$top/CHANGELOG.md" "$dir/src/SDIST-CHANGELOG.md"
        echo "$top" > "$dir/src/SDIST-NAME"
        rm -rf "$tmp"
    fi
    local commit
    commit=$(grep -m1 -o 'llama.cpp@[0-9a-f]*' "$dir/src/SDIST-CHANGELOG.md" | cut -d@ -f2 || true)
    commit="${commit:-unknown}"
    log "llama.cpp commit $commit (from the sdist's CHANGELOG), $(cat "$dir/src/SDIST-NAME")"
    local gen=()
    if [[ -x "$(dirname "$CMAKE")/ninja" ]]; then
        gen=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(dirname "$CMAKE")/ninja")
    elif command -v ninja >/dev/null; then
        gen=(-G Ninja)
    fi
    timed "configure" "$dir/configure.log" nice -n "$NICE" "$CMAKE" -S "$dir/src" -B "$dir/build" "${gen[@]}" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DGGML_CPU=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
        -DGGML_OPENMP=ON -DGGML_BACKEND_DL=OFF \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_BUILD_COMMIT="$commit" \
        || { tail -30 "$dir/configure.log"; die "cmake configure failed ($dir/configure.log)"; }
    timed "build" "$dir/build.log" nice -n "$NICE" "$CMAKE" --build "$dir/build" -j "$JOBS" \
        --target llama-bench llama-quantize llama-completion \
        || { tail -30 "$dir/build.log"; die "build failed ($dir/build.log)"; }
    {
        echo "llama.cpp commit: $commit (ggml-org/llama.cpp, vendored by $(cat "$dir/src/SDIST-NAME"))"
        echo "sdist sha256: $(sha256sum "$sdist" | cut -d' ' -f1)"
        echo "compiler: $(gcc --version | head -1)"
        echo "cmake: $("$CMAKE" --version | head -1)"
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
        echo "flags: GGML_NATIVE=ON, CPU only, Release, static, OpenMP"
        grep -E 'Adding CPU backend variant|GGML_AVX|x86 detected|Including CPU backend' "$dir/configure.log" | sed 's/^/configure: /' || true
        "$dir/build/bin/llama-bench" --version 2>&1 | sed 's/^/llama-bench --version: /' || true
    } > "$dir/VERSION"
    cat "$dir/VERSION"
}

# gguf-py (vendored) for reading GGUF headers; numpy comes from PYTHON.
gguf_py() { PYTHONPATH="$LLAMA_DIR/src/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$@"; }

cmd_convert() {
    LLAMA_DIR="$(cd "$1" && pwd)"; local ckpt="$2" out="$3"
    local bin="$LLAMA_DIR/build/bin"
    [[ -x "$bin/llama-quantize" ]] || die "no llama-quantize in $bin (run build first)"
    [[ -f "$ckpt/config.json" ]] || die "no config.json in $ckpt"
    mkdir -p "$out"
    # Metadata llama-quantize writes into both GGUFs (--override-kv), read from the checkpoint:
    # - deepseek2.attention.q_lora_rank=0 when config.json has q_lora_rank null (V2-Lite):
    #   this llama.cpp recognizes V2-Lite by its depth (27 or 26 layers) and otherwise
    #   requires the key; with 0 it loads attn_q as it does for V2-Lite (a cut-depth
    #   checkpoint, --layers N, would not load without it).
    # - tokenizer.ggml.add_bos_token=true when tokenizer_config.json says add_bos_token (the
    #   converter writes false because this tokenizer.json's post-processor adds no BOS;
    #   the hub's transformers tokenizer and dsv2 add it). Only text prompts see it.
    local kv=()
    mapfile -t kv < <(python3 - "$ckpt" <<'PY'
import json, sys, os
d = sys.argv[1]
c = json.load(open(os.path.join(d, "config.json")))
if c.get("q_lora_rank") is None:
    print("--override-kv"); print("deepseek2.attention.q_lora_rank=int:0")
t = os.path.join(d, "tokenizer_config.json")
if os.path.exists(t) and json.load(open(t)).get("add_bos_token"):
    print("--override-kv"); print("tokenizer.ggml.add_bos_token=bool:true")
PY
)
    # convert_to OUTTYPE FILE: the converter's GGUF of $ckpt, written whole or not at all.
    convert_to() {
        timed "convert_hf_to_gguf ($1)" "$out/convert.log" nice -n "$NICE" "$PYTHON" \
            "$LLAMA_DIR/src/convert_hf_to_gguf.py" "$ckpt" --outtype "$1" --outfile "$2.part" \
            || { tail -30 "$out/convert.log"; die "conversion failed ($out/convert.log)"; }
        grep -E 'WARNING|tokenizer.ggml.pre|successfully' "$out/convert.log" >&2 || true
        mv "$2.part" "$2"
    }
    if [[ "$VIA" == q8_0 && ( ! -f "$out/q8.gguf" || ! -f "$out/q4.gguf" ) ]]; then
        # Through Q8_0 (half the disk of the bf16 GGUF): the converter writes Q8_0 itself,
        # llama-quantize COPY adds the metadata, and q4 requantizes the routed experts'
        # Q8_0 blocks to Q4_0 (--allow-requantize; the other Q8_0 tensors are copied).
        if [[ ! -f "$out/q8.gguf" ]]; then
            [[ -f "$out/q8-converted.gguf" ]] || convert_to q8_0 "$out/q8-converted.gguf"
            timed "llama-quantize COPY (q8 with the metadata)" "$out/quantize-q8.log" nice -n "$NICE" \
                "$bin/llama-quantize" "${kv[@]}" "$out/q8-converted.gguf" "$out/q8.gguf.part" COPY \
                || { tail -20 "$out/quantize-q8.log"; die "copy q8 failed ($out/quantize-q8.log)"; }
            mv "$out/q8.gguf.part" "$out/q8.gguf"
            rm -f "$out/q8-converted.gguf"
        fi
        if [[ ! -f "$out/q4.gguf" ]]; then
            timed "llama-quantize ffn_*_exps Q8_0 -> Q4_0" "$out/quantize-q4.log" nice -n "$NICE" "$bin/llama-quantize" \
                --allow-requantize --tensor-type 'ffn_(gate|up|down)_exps=q4_0' \
                "$out/q8.gguf" "$out/q4.gguf.part" Q8_0 "$THREADS" \
                || { tail -20 "$out/quantize-q4.log"; die "quantize q4 failed ($out/quantize-q4.log)"; }
            mv "$out/q4.gguf.part" "$out/q4.gguf"
        fi
    fi
    if [[ ! -f "$out/q8.gguf" || ! -f "$out/q4.gguf" ]]; then
        [[ -f "$out/bf16.gguf" ]] || convert_to bf16 "$out/bf16.gguf"
        if [[ ! -f "$out/q8.gguf" ]]; then
            timed "llama-quantize Q8_0" "$out/quantize-q8.log" nice -n "$NICE" "$bin/llama-quantize" "${kv[@]}" \
                "$out/bf16.gguf" "$out/q8.gguf.part" Q8_0 "$THREADS" \
                || { tail -20 "$out/quantize-q8.log"; die "quantize q8 failed ($out/quantize-q8.log)"; }
            mv "$out/q8.gguf.part" "$out/q8.gguf"
        fi
        if [[ ! -f "$out/q4.gguf" ]]; then
            # dsv2 q4: routed experts at 4 bits (blocks of 32, f16 scale = Q4_0), the rest q8.
            # The pattern is a regex searched in the GGUF names blk.N.ffn_{gate,up,down}_exps.weight
            # (the shared experts are ffn_*_shexp and stay Q8_0).
            timed "llama-quantize Q8_0 + ffn_*_exps Q4_0" "$out/quantize-q4.log" nice -n "$NICE" "$bin/llama-quantize" "${kv[@]}" \
                --tensor-type 'ffn_(gate|up|down)_exps=q4_0' \
                "$out/bf16.gguf" "$out/q4.gguf.part" Q8_0 "$THREADS" \
                || { tail -20 "$out/quantize-q4.log"; die "quantize q4 failed ($out/quantize-q4.log)"; }
            mv "$out/q4.gguf.part" "$out/q4.gguf"
        fi
        if [[ "${KEEP_BF16:-0}" != 1 ]]; then
            rm -f "$out/bf16.gguf"
        elif [[ ${#kv[@]} -gt 0 ]]; then
            # the kept bf16 GGUF gets the same metadata (llama-bench has no --override-kv)
            timed "llama-quantize COPY (bf16 with the metadata)" "$out/quantize-bf16.log" \
                nice -n "$NICE" "$bin/llama-quantize" "${kv[@]}" "$out/bf16.gguf" "$out/bf16.gguf.part" COPY \
                || { tail -20 "$out/quantize-bf16.log"; die "copy bf16 failed"; }
            mv "$out/bf16.gguf.part" "$out/bf16.gguf"
        fi
    fi
    gguf_py "$HERE/llama_cpp_cpu_report.py" types "$out"/*.gguf
    du -sh "$out"/*.gguf >&2
}

# dsv2's flag for a format: q8/q4 quantize at load; bf16 runs the checkpoint's bf16 weights.
quant_arg() { [[ "$1" == bf16 ]] || echo "--quantize $1"; }

cmd_bench() {
    LLAMA_DIR="$(cd "$1" && pwd)"; local ckpt="$2" ggufs="$3"
    local out="${4:-$ggufs/results-$(date -u +%Y%m%dT%H%M%SZ)}"
    local bin="$LLAMA_DIR/build/bin"
    [[ -x "$bin/llama-bench" ]] || die "no llama-bench in $bin (run build first)"
    [[ -x "$DSV2" ]] || die "no dsv2 binary at $DSV2 (cargo build --release -p dsv2-cli, or set DSV2)"
    mkdir -p "$out"
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
        echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "checkpoint: $(cd "$ckpt" && pwd) ($(python3 -c "import json;c=json.load(open('$ckpt/config.json'));print(c['num_hidden_layers'],'layers')"))"
        echo "dsv2: $DSV2 ($("$DSV2" --version 2>&1 | head -1); repo commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
        head -1 "$LLAMA_DIR/VERSION"
        echo "grid: threads $THREADS, prefill $PROMPT, decode $N_GEN tokens at depths $DEPTHS, llama-bench reps $REPS"
        echo "dsv2 extra flags: ${DSV2_EXTRA:-none}"
        echo "dsv2 CPU kernels: DSV2_CPU_ISA=${DSV2_CPU_ISA:-native}"
    } > "$out/run.txt"
    log "results in $out"
    for f in $FORMATS; do
        [[ -f "$ggufs/$f.gguf" ]] || die "no $ggufs/$f.gguf (run convert first)"
        log "llama.cpp $f: prefill $PROMPT"
        nice -n "$BENCH_NICE" "$bin/llama-bench" -m "$ggufs/$f.gguf" -t "$THREADS" -r "$REPS" -p "$PROMPT" -n 0 -d 0 -o json \
            >"$out/llama-$f-prefill.json" 2>"$out/llama-$f-prefill.log" \
            || { tail -20 "$out/llama-$f-prefill.log"; die "llama-bench failed"; }
        log "llama.cpp $f: decode $N_GEN at depths $DEPTHS"
        nice -n "$BENCH_NICE" "$bin/llama-bench" -m "$ggufs/$f.gguf" -t "$THREADS" -r "$REPS" -p 0 -n "$N_GEN" -d "$DEPTHS" -o json \
            >"$out/llama-$f-decode.json" 2>"$out/llama-$f-decode.log" \
            || { tail -20 "$out/llama-$f-decode.log"; die "llama-bench failed"; }
        log "dsv2 $f: prefill $PROMPT, decode $N_GEN at contexts $DEPTHS"
        # shellcheck disable=SC2086 # DSV2_EXTRA is a list of flags
        RAYON_NUM_THREADS="$THREADS" nice -n "$BENCH_NICE" "$DSV2" bench --model "$ckpt" $(quant_arg "$f") $DSV2_EXTRA \
            --prompt-lengths "$PROMPT" --prefill-runs "$REPS" --contexts "$DEPTHS" --batch-sizes 1 \
            --decode-tokens "$N_GEN" --json >"$out/dsv2-$f.out" 2>"$out/dsv2-$f.log" \
            || { tail -20 "$out/dsv2-$f.log"; die "dsv2 bench failed"; }
        tail -1 "$out/dsv2-$f.out" >"$out/dsv2-$f.json"
    done
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/run.txt"
    # bytes each llama.cpp decode step reads, from the GGUF headers
    for f in $FORMATS; do
        gguf_py "$HERE/llama_cpp_cpu_report.py" bytes "$ggufs/$f.gguf" >"$out/llama-$f-bytes.json"
    done
    cmd_table "$out"
}

cmd_table() {
    local out="$1"
    python3 "$HERE/llama_cpp_cpu_report.py" table "$out" | tee "$out/table.md"
}

cmd_smoke() {
    LLAMA_DIR="$(cd "$1" && pwd)"; local ckpt="$2" ggufs="$3"
    local bin="$LLAMA_DIR/build/bin" prompt="${SMOKE_PROMPT:-The capital of France is}" n="${SMOKE_TOKENS:-8}"
    [[ -x "$DSV2" ]] || die "no dsv2 binary at $DSV2 (cargo build --release -p dsv2-cli, or set DSV2)"
    local f same=0 total=0
    for f in $FORMATS; do
        log "llama.cpp $f: greedy, $n tokens after \"$prompt\""
        nice -n "$NICE" "$bin/llama-completion" -m "$ggufs/$f.gguf" -t "$THREADS" -no-cnv \
            --temp 0 --top-k 1 -n "$n" --ignore-eos -p "$prompt" --no-warmup -c 256 \
            --verbose-prompt --no-display-prompt </dev/null >"$ggufs/smoke-llama-$f.txt" \
            2>"$ggufs/smoke-llama-$f.log" || { tail -20 "$ggufs/smoke-llama-$f.log"; die "llama-completion failed"; }
        grep -E 'number of tokens in prompt|^[0-9. ]*I +[0-9]+ -> ' "$ggufs/smoke-llama-$f.log" \
            | sed 's/^[0-9.]* I //' | tr '\n' ' ' >&2; echo >&2
        log "dsv2 $f: greedy, $n tokens"
        RAYON_NUM_THREADS="$THREADS" nice -n "$NICE" "$DSV2" generate --model "$ckpt" $(quant_arg "$f") \
            --prompt "$prompt" --max-tokens "$n" --temperature 0 --json \
            >"$ggufs/smoke-dsv2-$f.out" 2>"$ggufs/smoke-dsv2-$f.log" \
            || { tail -20 "$ggufs/smoke-dsv2-$f.log"; die "dsv2 generate failed"; }
        local lt dt
        lt="$(cat "$ggufs/smoke-llama-$f.txt")"
        dt="$(tail -1 "$ggufs/smoke-dsv2-$f.out" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["text"], end="")')"
        printf '%s llama.cpp: "%s"\n%s dsv2:      "%s" (ids %s)\n' "$f" "$lt" "$f" "$dt" \
            "$(tail -1 "$ggufs/smoke-dsv2-$f.out" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["token_ids"])')"
        total=$((total + 1))
        if [[ "$lt" == "$dt" ]]; then same=$((same + 1)); echo "$f: same text"; else echo "$f: texts differ"; fi
    done
    echo "greedy continuations equal in $same of $total formats (random weights: near-tied logits can differ between two correct engines)"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | cut -c3-; }
[[ $# -ge 1 ]] || { usage; exit 2; }
sub="$1"; shift
case "$sub" in
    setup)   [[ $# -le 1 ]] || die "usage: setup [TORCH_SITE_PACKAGES]"; cmd_setup "$@" ;;
    build)   [[ $# -eq 2 ]] || die "usage: build SDIST LLAMA_DIR"; cmd_build "$@" ;;
    convert) [[ $# -eq 3 ]] || die "usage: convert LLAMA_DIR CKPT GGUF_DIR"; cmd_convert "$@" ;;
    bench)   [[ $# -ge 3 ]] || die "usage: bench LLAMA_DIR CKPT GGUF_DIR [OUT_DIR]"; cmd_bench "$@" ;;
    smoke)   [[ $# -eq 3 ]] || die "usage: smoke LLAMA_DIR CKPT GGUF_DIR"; cmd_smoke "$@" ;;
    table)   [[ $# -eq 1 ]] || die "usage: table OUT_DIR"; cmd_table "$@" ;;
    -h|--help|help) usage ;;
    *) die "unknown command $sub (setup, build, convert, bench, smoke, table)" ;;
esac
