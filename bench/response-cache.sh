#!/usr/bin/env bash
# The gateway's response cache serving hits, against the same gateway without a
# cache (not a test): bench/gateway.sh's upstream and Palisade configuration, once
# as it is and once with `cache = { default_ttl = "60s" }` on the route, measured
# in turns with `wrk -t1 -c64` (ROUNDS rounds of DURATION seconds each).
#
#   bench/response-cache.sh
#   ROUNDS=5 DURATION=20 bench/response-cache.sh
set -euo pipefail
# shellcheck source=bench/gateway.sh
source "$(dirname "${BASH_SOURCE[0]}")/gateway.sh"

install_missing
log "building release binaries"
(cd "$root" && cargo build --release -q -p palisade-cli)
up=$(free_port)
pids+=("$(start_upstream "$up")")
wait_port "$up"
plain=$(free_port)
pids+=("$(start_palisade "$plain" "$up" "$(free_port)")")
wait_port "$plain"
cached=$(free_port)
pids+=("$(ROUTE_EXTRA='cache = { default_ttl = "60s" }' start_palisade "$cached" "$up" "$(free_port)")")
wait_port "$cached"
curl -s -o /dev/null "http://127.0.0.1:$cached/"
curl -sI "http://127.0.0.1:$cached/" | grep -i '^x-palisade-cache: hit' >/dev/null ||
    { log "the cached gateway does not serve hits"; exit 1; }

declare -a a b
for r in $(seq 1 "$ROUNDS"); do
    log "round $r/$ROUNDS"
    a+=("$(peak "$plain")")
    b+=("$(peak "$cached")")
done
python3 - "${a[*]}" "${b[*]}" <<'PY'
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]
b = [float(x) for x in sys.argv[2].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"without cache: {' / '.join(f'{x:.0f}' for x in a)} requests/s (median {ma:.0f})")
print(f"with cache (hits): {' / '.join(f'{x:.0f}' for x in b)} requests/s (median {mb:.0f})")
print(f"ratio: {mb / ma:.2f}x")
PY
