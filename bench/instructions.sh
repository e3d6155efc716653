#!/usr/bin/env bash
# User-space instructions per request (libc included) of Palisade, nginx,
# hyper-floor and copy-floor, each proxying to the nginx upstream of
# bench/gateway.sh with the same configuration, counted by valgrind's callgrind.
# Unlike requests/s, the count does not depend on what else the machine is doing,
# so it shows a change of a percent that wall-clock runs on a shared machine hide.
# It says nothing of the kernel's share of a request. One worker each.
#
#   bench/instructions.sh                 # 3000 requests each, after 500 to warm up
#   REQUESTS=10000 bench/instructions.sh
#   ONLY=palisade KEEP=/tmp/cg bench/instructions.sh   # one proxy; keep callgrind's files
#
# Installs valgrind and curl from Debian if missing (and what bench/gateway.sh needs).
set -euo pipefail
# shellcheck source=bench/gateway.sh
source "$(dirname "${BASH_SOURCE[0]}")/gateway.sh"

REQUESTS=${REQUESTS:-3000}
ONLY=${ONLY:-palisade nginx hyper-floor copy-floor}
WORKERS=1

# Counts the process `pid` (started under callgrind with counting off, writing
# $work/callgrind.<name>.*) while it proxies REQUESTS requests on `port`.
count() {
    local name=$1 port=$2 pid=$3 total
    for _ in $(seq 1 300); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && break
        sleep 0.2
    done
    oha -n 500 -c 8 --no-tui "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -i on "$pid" >/dev/null 2>&1
    oha -n "$REQUESTS" -c 8 --no-tui "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -i off "$pid" >/dev/null 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    total=$(cat "$work/callgrind.$name".* | awk '/^totals:/ {s += $2} END {print s}')
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP" && cp "$work/callgrind.$name".* "$KEEP/"
    fi
    echo "| $name | $((total / REQUESTS)) |"
}

wanted() {
    [[ " $ONLY " == *" $1 "* ]]
}

under_callgrind() {
    echo "valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$work/callgrind.$1.%p"
}

measure() {
    install_missing
    local pkgs=()
    command -v valgrind >/dev/null || pkgs+=(valgrind)
    command -v curl >/dev/null || pkgs+=(curl)
    if [ ${#pkgs[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
    log "building release binaries"
    (cd "$root" && cargo build --release -q -p palisade-cli &&
        cargo build --release -q -p palisade-gateway --example bare_proxy --example copy_floor)
    local up port pid
    up=$(free_port)
    pids+=("$(start_upstream "$up")")
    wait_port "$up"
    echo "callgrind: $REQUESTS requests by \`oha -c 8\` after 500 to warm up, one worker each"
    echo
    echo "| proxy | instructions / request |"
    echo "|---|---|"
    if wanted palisade; then
        port=$(free_port)
        pid=$(LAUNCH=$(under_callgrind palisade) start_palisade "$port" "$up" "$(free_port)")
        pids+=("$pid")
        count palisade "$port" "$pid"
    fi
    if wanted nginx; then
        port=$(free_port)
        pid=$(LAUNCH=$(under_callgrind nginx) NGINX_EXTRA=" master_process off;" start_nginx "$port" "$up")
        pids+=("$pid")
        count nginx "$port" "$pid"
    fi
    local floor name example
    for floor in hyper-floor:bare_proxy copy-floor:copy_floor; do
        name=${floor%%:*} example=${floor##*:}
        wanted "$name" || continue
        port=$(free_port)
        $(under_callgrind "$name") "$root/target/release/examples/$example" \
            "127.0.0.1:$port" "127.0.0.1:$up" 1 >"$work/$name.out" 2>&1 &
        pid=$!
        pids+=("$pid")
        count "$name" "$port" "$pid"
    done
}

measure "$@"
