#!/usr/bin/env bash
# Builds everything the GPU check needs, on a machine without a GPU or CUDA toolkit, and
# copies it into one folder that can travel to the GPU machine:
#   dsv2 (release, --features cuda), the dsv2-cuda test binaries (nvrtc, ops, model,
#   fixtures), gpu-check.sh and check_fixtures_cli.py.
#
# Usage: scripts/gpu-build.sh [DEST]      (default DEST: .gpu in the repository root)
# Then, on the GPU machine, from a checkout of the repository (with tests/fixtures):
#   DEST/gpu-check.sh DEST
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.gpu}
cd "$root"
mkdir -p "$dest"
cargo build --release --features cuda -p dsv2-cli
target=${CARGO_TARGET_DIR:-$root/target}
cp "$target/release/dsv2" "$dest/dsv2"
# The test executables, found through cargo's JSON messages.
cargo test -p dsv2-cuda --no-run --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$dest/test-$name"; done
cargo build --release -p dsv2-cuda --example lite-bench
cp "$target/release/examples/lite-bench" "$dest/lite-bench"
cp scripts/gpu-check.sh scripts/check_fixtures_cli.py "$dest/"
# Debug info is not needed there and the folder must stay small (the device tool
# carries at most 64 MiB).
for f in "$dest"/dsv2 "$dest"/lite-bench "$dest"/test-*; do strip --strip-debug "$f"; done
du -sh "$dest"; ls -l "$dest"
