#!/usr/bin/env bash
# Black-box tests of `dsv2 serve` over real HTTP with the official OpenAI Python client.
#
#   tests/server/run.sh PATH/TO/dsv2 [pytest arguments...]
#
# Builds nothing: give it a built binary (e.g. target/release/dsv2). Creates (or reuses)
# a virtual environment with requirements.txt, makes a servable model from the golden
# fixture `tests/fixtures/lite` (plus a small tokenizer, see make_test_model.py), starts
# the server on a free loopback port, runs pytest against it (tests start extra servers
# of their own for auth, queue limits, timeouts and SIGTERM), and stops it.
#
# Environment: DSV2_TEST_VENV (default: target/server-tests-venv), PYTHON (python3).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 PATH/TO/dsv2 [pytest args...]" >&2
    exit 2
fi
BIN="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
[ -x "$BIN" ] || { echo "error: $BIN is not an executable" >&2; exit 2; }

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${DSV2_TEST_VENV:-$ROOT/target/server-tests-venv}"

# The venv, reinstalled only when requirements.txt changes.
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "== creating the test venv in $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
    echo "$WANT" > "$STAMP"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dsv2-server-tests.XXXXXX")"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

MODEL="$WORK/lite"
"$VENV/bin/python" "$HERE/make_test_model.py" "$ROOT/tests/fixtures/lite" "$MODEL"

PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LOG="$WORK/server.log"
"$BIN" serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype f32 \
    --kv-cache-memory 256MiB > "$LOG" 2>&1 &
SERVER_PID=$!

# Wait (bounded) for /health to answer 200.
for i in $(seq 1 600); do
    if "$VENV/bin/python" - "$PORT" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1)
PY
    if ! kill -0 "$SERVER_PID" 2>/dev/null || [ "$i" = 600 ]; then
        echo "error: the server did not become healthy; its log:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.1
done

set +e
DSV2_BIN="$BIN" DSV2_MODEL="$MODEL" DSV2_URL="http://127.0.0.1:$PORT" \
DSV2_FIXTURES="$ROOT/tests/fixtures" DSV2_WORK="$WORK" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$HERE" "$@"
STATUS=$?
set -e
if [ $STATUS -ne 0 ]; then
    echo "== server log" >&2
    tail -n 50 "$LOG" >&2
fi
exit $STATUS
