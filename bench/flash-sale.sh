#!/usr/bin/env bash
# The flash-sale load harness (not a test): ITEMS items of STOCK units each, one per
# user, and USERS distinct users (tens of thousands) hammering `POST /buy`, every
# attempt with an Idempotency-Key of its own (bench/flash-sale.lua). In one run, on
# the same Redis and PostgreSQL (scripts/services.sh: throwaway, fsync off), each
# measured with `wrk -t1 -cCONNS -dDURATION` for ROUNDS rounds on fresh sales:
#
#   service            one flash-sale instance, straight (the layered design)
#   naive              one instance of --design naive (every attempt a database
#                      transaction), straight
#   gateway+trivial    Palisade's gateway (one worker; JWT ES256 with the subject
#                      forwarded as x-user-id, a per-user GCRA limit) in front of a
#                      trivial upstream (nginx answering at once): the gateway's own
#                      requests/s with these policies
#   gateway+service    the same gateway in front of two flash-sale instances
#   gateway+naive      the same gateway in front of the naive instance
#
# Each sale target is measured twice: from the opening (the sell-out, its orders'
# sagas running meanwhile, and the flood after it), then again on the same sales
# sold out (`/sold-out`: the flood alone). Reported: medians of attempts/s, wrk's
# p50 / p99 at that peak, CPU per attempt of the measured processes (PostgreSQL's
# and Redis's not counted), the CPU seconds PostgreSQL and Redis spent in the
# measurement, answers by status, and for the sales: orders placed, and
# the invariants once the sagas settle (orders equal to the units sold, never more
# than the stock, nobody over the limit, the gate agreeing with the inventory after
# reconciliation). Installs wrk, nginx and python3 from Debian if missing; only
# 127.0.0.1 is used.
#
#   bench/flash-sale.sh
#   ROUNDS=5 DURATION=20 USERS=50000 bench/flash-sale.sh
#   bench/flash-sale.sh faults      # the same load with a fault mid-sale (see faults_main)
#   PIN=1 bench/flash-sale.sh       # PostgreSQL and Redis on CPU 1, all else on CPU 0
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
USERS=${USERS:-20000}
ITEMS=${ITEMS:-10}
STOCK=${STOCK:-100}
WARM=${WARM:-10}
FAULT_AT=${FAULT_AT:-1}
PIN=${PIN:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d /tmp/palisade-flash-bench.XXXXXX)
pids=()
stores=()

# shellcheck source=scripts/services.sh
source "$root/scripts/services.sh"

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    stop_services
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=bench/lib.sh
source "$root/bench/lib.sh"

install_missing() {
    local pkgs=()
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || pkgs+=(nginx-light)
    command -v python3 >/dev/null || pkgs+=(python3)
    apt_install "${pkgs[@]}"
}

# nginx on port $1 answering `202 {}` at once.
start_trivial() {
    pids+=("$(run_nginx "$work/trivial" 1 "server { listen 127.0.0.1:$1; location / { return 202 \"{}\"; } }")")
}

# A gateway on port $1 in front of the endpoints $2 (`"host:port", ...`).
start_gateway() {
    local port=$1 endpoints=$2 dir="$work/gateway-$1"
    mkdir -p "$dir"
    cat >"$dir/gateway.toml" <<EOF
[gateway]
listen = "127.0.0.1:$port"
admin = "127.0.0.1:$(free_loopback_port)"
workers = 1
watch_config = false
access_log = false
pool_idle_per_endpoint = 128

[gateway.jwt.bench]
keys_file = "$work/jwt/jwks.json"
issuer = "bench"
audiences = ["bench"]
algorithms = ["ES256"]
cached_tokens = $((USERS * 2))

[[routes]]
name = "buy"
match = { path = "/buy", methods = ["POST"] }
cluster = "sale"
timeout = "2s"
auth = { jwt = "bench", forward_claims = { sub = "x-user-id" } }
rate_limit = { requests = 20, per = "1s", burst = 40, key = "header:x-user-id", max_keys = $((USERS * 2)) }

[clusters.sale]
endpoints = [$endpoints]
lb = "least-request"
connect_timeout = "1s"
EOF
    "$root/target/release/palisade" check --config "$dir/gateway.toml" >/dev/null
    "$root/target/release/palisade" gateway --config "$dir/gateway.toml" >"$dir/out" 2>&1 &
    pids+=($!)
}

# A flash-sale instance on port $1 with the extra flags after it.
start_sale() {
    local port=$1
    shift
    # One runtime thread each (tokio's TOKIO_WORKER_THREADS): on two cores shared
    # with wrk (and the gateway), a second thread costs more in switches than it
    # gives (76.8k against 65.4k attempts/s, one instance alone, sold out).
    TOKIO_WORKER_THREADS=${SALE_THREADS:-1} \
        "$root/target/release/flash-sale" --listen "127.0.0.1:$port" "$@" >"$work/sale-$port.out" 2>&1 &
    pids+=($!)
}

# Opens ITEMS sales named $2<n> through the instance on port $1.
open_sales() {
    local now i
    now=$(python3 -c 'import time; print(int(time.time() * 1000))')
    for i in $(seq 0 $((ITEMS - 1))); do
        local code=
        for _ in 1 2 3 4 5; do
            code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$1/admin/sales" \
                -H 'content-type: application/json' \
                -d "{\"item\":\"$2$i\",\"stock\":$STOCK,\"opens_ms\":$((now - 1000)),\"closes_ms\":$((now + 3600000)),\"per_user\":1}")
            [ "$code" != 201 ] || break
            sleep 0.2
        done
        [ "$code" = 201 ] || { log "the sale $2$i could not be opened ($code)"; return 1; }
    done
}

# wrk on port $1 for $2 seconds, items $3, tokens file $4 (or none): its output.
load() {
    FS_USERS=$USERS FS_ITEMS=$ITEMS FS_PREFIX=$3 FS_TOKENS=${4:-} \
        wrk -t1 -c"$CONNS" -d"$2s" --latency -s "$root/bench/flash-sale.lua" "http://127.0.0.1:$1"
}

# Waits (two minutes at most) for the sales $2<n> at port $1 to settle and prints
# each one's admin view, one JSON per line.
settle() {
    local port=$1 prefix=$2 i view
    for i in $(seq 0 $((ITEMS - 1))); do
        for _ in $(seq 1 1200); do
            view=$(curl -sf "http://127.0.0.1:$port/admin/sales/$prefix$i" || true)
            if [ -n "$view" ] && python3 -c '
import json, sys
v = json.loads(sys.argv[1])
ok = "gate" not in v or (v["invariants"]["settled"] and v["gate"] and v["gate"]["reservations"] == 0 and v["drift"] == 0)
sys.exit(0 if ok else 1)' "$view"; then
                break
            fi
            sleep 0.1
        done
        [ -n "$view" ] || view="{\"missing\": \"$prefix$i\"}"
        echo "$view"
    done
}

# The layered instances' counts (their `/admin/dashboard` counters) on the ports
# $@, summed: `name=value ...`.
layer_counts() {
    local p
    for p in "$@"; do
        curl -sf "http://127.0.0.1:$p/admin/dashboard" || echo '{}'
        echo
    done | python3 -c '
import collections, json, sys
c = collections.Counter()
for line in sys.stdin:
    if line.strip():
        c.update(json.loads(line).get("counters", {}))
print(" ".join(f"{k}={v}" for k, v in sorted(c.items())))'
}

# What the counts $2 (`name=value ...`) gained since $1.
count_delta() {
    python3 -c '
import sys
before, after = (dict(kv.split("=") for kv in a.split()) for a in sys.argv[1:])
print(" ".join(f"{k}={int(v) - int(before.get(k, 0))}" for k, v in after.items()))' "$1" "$2"
}

# One measurement (round $1, row $2): wrk on port $3 for the sales $4 (tokens
# $5), the CPU time of the processes $6, the layer counts of the instances on the
# ports $7 (none: not counted); appended to $out.
measure() {
    local r=$1 name=$2 port=$3 prefix=$4 tok=$5 procs=$6 inst=$7 before res ticks rps hz db_before layers
    hz=$(getconf CLK_TCK)
    # shellcheck disable=SC2086
    [ -z "$inst" ] || layers=$(layer_counts $inst)
    # shellcheck disable=SC2086
    before=$(cpu_ticks $procs)
    db_before=$(cpu_ticks "${stores[@]}")
    res=$(load "$port" "$DURATION" "$prefix" "$tok")
    # shellcheck disable=SC2086
    ticks=$(( $(cpu_ticks $procs) - before ))
    echo "$r $name db_cpu_s $(python3 -c "print(round($(( $(cpu_ticks "${stores[@]}") - db_before )) / $hz, 2))")" >>"$out"
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$res")
    echo "$r $name rps $rps" >>"$out"
    echo "$r $name cpu_us $(python3 -c "print(round($ticks / $hz * 1e6 / ($rps * $DURATION), 2))")" >>"$out"
    awk '/^latency_us/ {print "'"$r $name"' p50 " $3; print "'"$r $name"' p99 " $5}' <<<"$res" >>"$out"
    echo "$r $name statuses $(awk '/^statuses/ {$1=""; print}' <<<"$res")" >>"$out"
    # shellcheck disable=SC2086
    [ -z "$inst" ] || echo "$r $name layers $(count_delta "$layers" "$(layer_counts $inst)")" >>"$out"
    log "  $name: $rps attempts/s"
}

# The binaries, the users' tokens, PostgreSQL (with the databases fs_inventory,
# fs_orders and fs_naive) and Redis; sets `base` (the server's URL without its
# database) and `stores`.
prepare() {
    install_missing
    log "building release binaries"
    (cd "$root" && cargo build --release -q -p palisade-cli -p palisade-flash-sale &&
        cargo build --release -q -p palisade-gateway --example jwt_fixture)
    log "signing $USERS users' tokens"
    "$root/target/release/examples/jwt_fixture" "$work/jwt" "$USERS"
    start_postgres >/dev/null 2>&1
    start_redis >/dev/null 2>&1
    # PostgreSQL's postmaster (its backends are its children) and Redis.
    stores=("$(head -1 "$services_dir/postgres/data/postmaster.pid")" "$(cat "$services_dir/redis/redis.pid")")
    if [ -n "$PIN" ]; then
        # The stores on a core of their own, as on hosts of their own: every
        # thread of theirs (backends forked later inherit it), then this shell
        # and so all it starts (wrk, the gateways, the instances, nginx).
        local p
        for p in $(tree "${stores[@]}"); do taskset -a -p 2 "$p" >/dev/null; done
        taskset -p 1 $$ >/dev/null
        log "PostgreSQL and Redis on CPU 1; wrk, the gateways, the instances and nginx on CPU 0"
    fi
    local pg=$PALISADE_TEST_POSTGRES_URL db
    base=${pg%/*}
    for db in fs_inventory fs_orders fs_naive; do
        "$(postgres_bin)/psql" -q "$pg" -c "CREATE DATABASE $db" >/dev/null
    done
}

# Kills the run's Redis and starts it again, empty, on its port.
restart_redis() {
    local dir="$services_dir/redis" port=${PALISADE_TEST_REDIS_URL##*:}
    kill "$(cat "$dir/redis.pid")"
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
    wait_port "$port"
}

# The fault runs: the gateway in front of two instances, and a worker process
# beside them, on fresh sales for each fault; wrk for DURATION seconds with the
# fault FAULT_AT seconds in, mid-sell-out (the run's Redis killed and started
# empty, PostgreSQL stopped at once and started, an instance killed with SIGKILL and started again,
# the worker killed with SIGKILL and started again); then the sales settle and
# their invariants are checked, as after the load runs.
faults_main() {
    prepare
    local a b w gw fault prefix wrkpid tokens="$work/jwt/users.tokens" views="$work/views"
    a=$(free_loopback_port); b=$(free_loopback_port); w=$(free_loopback_port); gw=$(free_loopback_port)
    local layered=(--redis "$PALISADE_TEST_REDIS_URL" --inventory-db "$base/fs_inventory" --orders-db "$base/fs_orders"
        --reservation-ttl-secs 10 --reconcile-every-secs 1)
    start_sale "$a" "${layered[@]}"
    start_sale "$b" "${layered[@]}"; local bpid=${pids[-1]}
    start_sale "$w" --role worker "${layered[@]}"; local wpid=${pids[-1]}
    start_gateway "$gw" "\"127.0.0.1:$a\", \"127.0.0.1:$b\""
    for p in "$a" "$b" "$gw"; do wait_port "$p"; done
    : >"$views"
    for fault in redis postgres instance worker; do
        prefix="f${fault}i"
        open_sales "$a" "$prefix"
        log "fault: $fault at ${FAULT_AT}s (wrk -t1 -c$CONNS -d${DURATION}s through the gateway)"
        load "$gw" "$DURATION" "$prefix" "$tokens" >"$work/fault-$fault" &
        wrkpid=$!
        sleep "$FAULT_AT"
        case $fault in
            redis) restart_redis ;;
            postgres)
                eval "$PALISADE_TEST_PG_CTL -m immediate stop" >/dev/null
                eval "$PALISADE_TEST_PG_CTL start" >/dev/null ;;
            instance)
                kill -9 "$bpid"
                start_sale "$b" "${layered[@]}"; bpid=${pids[-1]} ;;
            worker)
                kill -9 "$wpid"
                start_sale "$w" --role worker "${layered[@]}"; wpid=${pids[-1]} ;;
        esac
        wait "$wrkpid"
        log "  $(awk '/^statuses/ {$1=""; print}' "$work/fault-$fault")"
        settle "$a" "$prefix" | sed "s/^/fault:$fault /" >>"$views"
    done
    python3 - "$views" "$DURATION" "$CONNS" "$USERS" "$ITEMS" "$STOCK" "$work" "$FAULT_AT" <<'EOF'
import collections, json, sys
views, duration, conns, users, items, stock, work, at = sys.argv[1:]
print(f"wrk -t1 -c{conns} -d{duration}s through the gateway, {users} users, {items} items x {stock} units, one fault {at} s in\n")
print("| fault | answers | sales | units | orders | oversold | users over the limit | drift | every invariant holds |")
print("|---|---|---|---|---|---|---|---|---|")
sales = collections.defaultdict(list)
for line in open(views):
    t, view = line.split(" ", 1)
    sales[t].append(json.loads(view))
for t, vs in sales.items():
    fault = t.split(":", 1)[1]
    answers = next((l.split(None, 1)[1].strip() for l in open(f"{work}/fault-{fault}") if l.startswith("statuses")), "")
    if any("missing" in x for x in vs):
        print(f"| {fault} | {answers} | no view of every sale | | | | | | NO |")
        continue
    orders = sum(x["orders"] for x in vs)
    units = sum(x["inventory"]["initial"] for x in vs)
    oversold = sum(max(0, x["orders"] - x["inventory"]["initial"]) for x in vs)
    over = sum(0 if x["invariants"]["no_user_over_limit"] else 1 for x in vs)
    drift = sum(abs(x["drift"] or 0) for x in vs)
    holds = all(all(x["invariants"].values()) and x["drift"] == 0 for x in vs)
    print(f"| {fault} | {answers} | {len(vs)} | {units} | {orders} | {oversold} | {over} | {drift} | {'yes' if holds else 'NO'} |")
EOF
}

main() {
    prepare
    local a b n up gw gwn gwt
    a=$(free_loopback_port); b=$(free_loopback_port); n=$(free_loopback_port); up=$(free_loopback_port)
    gw=$(free_loopback_port); gwn=$(free_loopback_port); gwt=$(free_loopback_port)
    local layered=(--redis "$PALISADE_TEST_REDIS_URL" --inventory-db "$base/fs_inventory" --orders-db "$base/fs_orders"
        --reservation-ttl-secs 10 --reconcile-every-secs 1)
    start_sale "$a" "${layered[@]}"; local apid=${pids[-1]}
    start_sale "$b" "${layered[@]}"; local bpid=${pids[-1]}
    start_sale "$n" --design naive --inventory-db "$base/fs_naive"; local npid=${pids[-1]}
    start_trivial "$up"; local uppid=${pids[-1]}
    start_gateway "$gw" "\"127.0.0.1:$a\", \"127.0.0.1:$b\""; local gwpid=${pids[-1]}
    start_gateway "$gwn" "\"127.0.0.1:$n\""; local gwnpid=${pids[-1]}
    start_gateway "$gwt" "\"127.0.0.1:$up\""; local gwtpid=${pids[-1]}
    for p in "$a" "$b" "$n" "$up" "$gw" "$gwn" "$gwt"; do wait_port "$p"; done
    # name|port|pids measured|admin port|tokens|layered instances
    local tokens="$work/jwt/users.tokens"
    local -a rows=(
        "service|$a|$apid|$a||$a"
        "naive|$n|$npid|$n||"
        "gateway+trivial|$gwt|$gwtpid $uppid||$tokens|"
        "gateway+service|$gw|$gwpid $apid $bpid|$a|$tokens|$a $b"
        "gateway+naive|$gwn|$gwnpid $npid|$n|$tokens|"
    )
    log "warming the gateways' token caches (${WARM}s each)"
    open_sales "$a" warm; open_sales "$n" warm
    for port in "$gw" "$gwn" "$gwt"; do load "$port" "$WARM" warm "$tokens" >/dev/null; done
    local views="$work/views" row name port procs admin tok inst prefix
    out="$work/results"
    : >"$out"; : >"$views"
    for r in $(seq 1 "$ROUNDS"); do
        log "round $r/$ROUNDS (wrk -t1 -c$CONNS -d${DURATION}s, $USERS users, $ITEMS items x $STOCK units)"
        for row in "${rows[@]}"; do
            IFS='|' read -r name port procs admin tok inst <<<"$row"
            prefix="r${r}${name//[^a-z]/}i"
            [ -z "$admin" ] || open_sales "$admin" "$prefix"
            measure "$r" "$name" "$port" "$prefix" "$tok" "$procs" "$inst"
            # The same sales once sold out: the flood the cheap layers refuse.
            [ -z "$admin" ] || measure "$r" "$name/sold-out" "$port" "$prefix" "$tok" "$procs" "$inst"
            [ -z "$admin" ] || echo "$r $name $prefix $admin" >>"$work/sales"
        done
    done
    log "waiting for the sales to settle"
    while read -r r name prefix admin; do
        settle "$admin" "$prefix" | sed "s/^/$name /" >>"$views"
    done <"$work/sales"
    python3 - "$out" "$views" "$ROUNDS" "$DURATION" "$CONNS" "$USERS" "$ITEMS" "$STOCK" <<'EOF'
import collections, json, statistics, sys
path, views, rounds, duration, conns, users, items, stock = sys.argv[1:]
v = collections.defaultdict(list)
answers = collections.defaultdict(collections.Counter)
layers = collections.defaultdict(collections.Counter)
for line in open(path):
    r, t, k, *x = line.split()
    if k in ("statuses", "layers"):
        for kv in x:
            s, n = kv.split("=")
            (answers if k == "statuses" else layers)[t][s] += int(n)
    else:
        v[(t, k)].append(float(x[0]))
med = lambda t, k: statistics.median(v[(t, k)])
print(f"wrk -t1 -c{conns} -d{duration}s, {users} users, {items} items x {stock} units per sale, one per user; medians of {rounds} rounds\n")
print("| target | attempts/s | vs gateway+trivial | p50 ms | p99 ms | CPU us/attempt | PostgreSQL + Redis CPU s | answers (all rounds) |")
print("|---|---|---|---|---|---|---|---|")
trivial = med("gateway+trivial", "rps")
for t in ("service", "service/sold-out", "naive", "naive/sold-out", "gateway+trivial",
          "gateway+service", "gateway+service/sold-out", "gateway+naive", "gateway+naive/sold-out"):
    a = ", ".join(f"{s}: {n}" for s, n in sorted(answers[t].items()))
    print(f"| {t} | {med(t, 'rps'):.0f} | {med(t, 'rps') / trivial:.3f}x | {med(t, 'p50') / 1e3:.2f} | {med(t, 'p99') / 1e3:.2f} | {med(t, 'cpu_us'):.1f} | {med(t, 'db_cpu_s'):.2f} | {a} |")
print("\nWhere the attempts ended, all rounds (refused at the gateway: answered there, never sent on,")
print("give or take the attempts in flight when wrk stopped):\n")
cols = ("sold_out_local", "at_limit_local", "sold_out", "over_limit", "outside_window", "unavailable", "replayed", "accepted")
print("| target | answered | refused at the gateway | " + " | ".join(cols) + " |")
print("|---|---|---|" + "---|" * len(cols))
for t in ("service", "service/sold-out", "gateway+service", "gateway+service/sold-out"):
    total, l = sum(answers[t].values()), layers[t]
    gateway = max(0, total - l["attempts"]) if t.startswith("gateway") else 0
    print(f"| {t} | {total} | {gateway} | " + " | ".join(str(l[c]) for c in cols) + " |")
print("\n| target | sales | units | orders | oversold | users over the limit | every invariant holds |")
print("|---|---|---|---|---|---|---|")
sales = collections.defaultdict(list)
for line in open(views):
    t, view = line.split(" ", 1)
    sales[t].append(json.loads(view))
for t, vs in sales.items():
    missing = [x["missing"] for x in vs if "missing" in x]
    if missing:
        print(f"| {t} | no view of {', '.join(missing)} | | | | | NO |")
        continue
    orders = sum(x["orders"] for x in vs)
    units = sum(x["inventory"]["initial"] for x in vs)
    oversold = sum(max(0, x["orders"] - x["inventory"]["initial"]) for x in vs)
    over = sum(0 if x["invariants"].get("no_user_over_limit", True) else 1 for x in vs)
    holds = all(all(x["invariants"].values()) and x.get("drift", 0) == 0 for x in vs)
    print(f"| {t} | {len(vs)} | {units} | {orders} | {oversold} | {over} | {'yes' if holds else 'NO'} |")
EOF
}

case "${1:-}" in
    faults) faults_main ;;
    *) main "$@" ;;
esac
