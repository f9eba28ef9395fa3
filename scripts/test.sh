#!/usr/bin/env bash
# Sets everything up, then runs every test: unit and integration (real sandboxes, as root), the Python SDK's, then the demo and
# short benchmarks on a throw-away daemon (their figures are printed, never asserted).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo nextest run --workspace --profile ci
# The Python SDK against a real daemon of its own.
target/pyenv/bin/python -m pytest -q sdk/python/tests
# The API document and its reference are current; schemathesis, fuzzing every operation from the served
# document, finds no server error.
target/release/deltabox openapi | diff -u docs/openapi.json - || { echo "docs/openapi.json is stale: target/release/deltabox openapi > docs/openapi.json" >&2; exit 1; }
target/pyenv/bin/python scripts/api-doc.py docs/openapi.json | diff -u docs/api.md - || { echo "docs/api.md is stale: scripts/api-doc.py docs/openapi.json > docs/api.md" >&2; exit 1; }
scripts/api-fuzz.sh 25

state=$(mktemp -d /var/tmp/deltabox-check.XXXXXX)
export DELTABOX_STATE_DIR="$state" DELTABOX_SOCKET="$state/api.sock" DELTABOX_STORE_SIZE=16G
cleanup() {
    pkill -TERM -f "deltabox --socket $state/api.sock" 2>/dev/null || true
    for _ in $(seq 100); do pgrep -f "deltabox --socket $state/api.sock" >/dev/null || break; sleep 0.1; done
    umount -l "$state/store" 2>/dev/null || true
    rm -rf "$state"
}
trap cleanup EXIT
target/release/deltabox demo
# The SDK's examples (they use the daemon the demo started); figures printed, not asserted.
target/pyenv/bin/python examples/tree_search.py --quick
target/pyenv/bin/python examples/rl_fanout.py --quick
target/pyenv/bin/python examples/gym_env.py --quick
target/release/deltabox bench runtime --iterations 10
target/release/deltabox bench fs --quick
target/release/deltabox bench cr --quick
target/release/deltabox bench durable --quick
