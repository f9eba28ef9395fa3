#!/usr/bin/env bash
# Runs schemathesis (property-based API testing from the served OpenAPI document) against a throw-away daemon
# listening on loopback TCP with a bearer token: no request may end in a server error (5xx).
# Usage: scripts/api-fuzz.sh [max examples per operation, default 25]
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-25}
state=$(mktemp -d /var/tmp/deltabox-fuzz.XXXXXX)
port=$((20000 + RANDOM % 20000))
export DELTABOX_STATE_DIR="$state" DELTABOX_SOCKET="$state/api.sock" DELTABOX_STORE_SIZE=8G
target/release/deltabox daemon --listen "127.0.0.1:$port" --token-file "$state/token" >"$state/daemon.log" 2>&1 &
daemon=$!
cleanup() {
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    umount -l "$state/store" 2>/dev/null || true
    rm -rf "$state"
}
trap cleanup EXIT
for _ in $(seq 300); do
    [ -s "$state/token" ] && curl -sf -o /dev/null -H "Authorization: Bearer $(cat "$state/token")" "http://127.0.0.1:$port/v1/health" && break
    sleep 0.1
done
# A sandbox with a bash session, a file and a process checkpoint: the sandbox-scoped operations get their ids
# (as do diff and pin), so generated requests reach the real work and not just "not found".
export DBX_SANDBOX DBX_SESSION DBX_CHECKPOINT
DBX_SANDBOX=$(target/release/deltabox create)
DBX_SESSION=$(target/release/deltabox session start "$DBX_SANDBOX" bash)
target/release/deltabox exec "$DBX_SANDBOX" -- sh -c 'mkdir -p /work && echo hello > /work/f'
DBX_CHECKPOINT=$(target/release/deltabox checkpoint "$DBX_SANDBOX" --processes)
cat > "$state/schemathesis.toml" <<'TOML'
request-timeout = 60.0
[[operations]]
include-path-regex = "^/v1/sandboxes/\\{id\\}/(files|exec|sessions|checkpoints|rollback)"
parameters = { id = "${DBX_SANDBOX}", sid = "${DBX_SESSION}" }
[[operations]]
include-path-regex = "^/v1/checkpoints/\\{id\\}/(diff|pin)"
parameters = { id = "${DBX_CHECKPOINT}", other = "${DBX_CHECKPOINT}" }
TOML
target/pyenv/bin/schemathesis --config-file "$state/schemathesis.toml" run "http://127.0.0.1:$port/v1/openapi.json" \
    -H "Authorization: Bearer $(cat "$state/token")" \
    --checks not_a_server_error \
    --phases examples,coverage,fuzzing \
    --max-examples "$examples" \
    --workers 1 \
    --suppress-health-check all \
    --no-color
