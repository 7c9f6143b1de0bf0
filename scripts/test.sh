#!/usr/bin/env bash
# The project's test command: every Rust test, then the black-box HTTP tests of
# `dsv2 serve` with the official OpenAI Python client (in a venv it creates).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
cargo build -p dsv2-cli
bash tests/server/run.sh target/debug/dsv2
