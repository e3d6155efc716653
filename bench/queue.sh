#!/usr/bin/env bash
# The queue's load harness (not a test): palisade-queue on PostgreSQL and on SQLite,
# and apalis on PostgreSQL (bench/apalis), in the same run against the same
# throwaway PostgreSQL server (scripts/services.sh: a temporary directory, a free
# loopback port, stopped at the end). Each round gives every system a fresh
# database and the same workload (crates/queue/examples/queue_bench.rs):
#
#   throughput  JOBS no-op jobs enqueued in batches of 1000, then run by one worker
#               of concurrency 100: jobs per second from the first fetch to the last
#               completion recorded;
#   latency     one job at a time at RATE per second for 5 s to an idle worker:
#               enqueue call to worker start, p50 and p99.
#
#   bench/queue.sh                    # 3 rounds, 50,000 jobs, 200 jobs/s
#   ROUNDS=5 JOBS=100000 bench/queue.sh
#
# Reported: the median of the rounds for each figure.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
JOBS=${JOBS:-50000}
RATE=${RATE:-200}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/services.sh
source scripts/services.sh
work=$(mktemp -d /tmp/palisade-queue-bench.XXXXXX)
trap 'stop_services; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

log() { printf '%s\n' "$*" >&2; }

log "building (release)"
cargo build --release -q -p palisade-queue --example queue_bench
(cd bench/apalis && cargo build --release -q)
start_postgres
admin=$PALISADE_TEST_POSTGRES_URL
base=${admin%/*}
fresh_pg() {
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null 2>&1 ||
        "$(postgres_bin)/psql" -q "$admin" -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
    echo "$base/$1"
}

out="$work/results"
: >"$out"
args=(--jobs "$JOBS" --batch 1000 --concurrency 100 --rate "$RATE" --seconds 5)
for r in $(seq 1 "$ROUNDS"); do
    log "round $r/$ROUNDS"
    target/release/examples/queue_bench --database "$(fresh_pg bench_palisade_$r)" "${args[@]}" >>"$out"
    rm -f "$work"/jobs.db*
    target/release/examples/queue_bench --database "sqlite:$work/jobs.db" "${args[@]}" >>"$out"
    bench/apalis/target/release/apalis-bench --database "$(fresh_pg bench_apalis_$r)" "${args[@]}" >>"$out"
done

python3 - "$out" "$ROUNDS" "$JOBS" "$RATE" <<'PY'
import re, statistics, sys
path, rounds, jobs, rate = sys.argv[1:]
rows = {}
for line in open(path):
    kv = dict(p.split("=", 1) for p in line.split())
    b = kv.pop("backend")
    for k, v in kv.items():
        if k not in ("jobs", "rate"):
            rows.setdefault(b, {}).setdefault(k, []).append(float(v))
names = {"postgres": "palisade-queue, PostgreSQL", "sqlite": "palisade-queue, SQLite", "apalis-postgres": "apalis 1.0, PostgreSQL"}
print(f"median of {rounds} rounds; {jobs} jobs (batches of 1000, concurrency 100); latency at {rate} jobs/s for 5 s\n")
print("| system | enqueue jobs/s | run jobs/s | enqueue-to-start p50 | p99 |")
print("|---|---|---|---|---|")
for b in ("postgres", "apalis-postgres", "sqlite"):
    m = {k: statistics.median(v) for k, v in rows.get(b, {}).items()}
    if m:
        print(f"| {names[b]} | {m['enqueue_per_s']:,.0f} | {m['run_per_s']:,.0f} | {m['latency_p50_ms']:.2f} ms | {m['latency_p99_ms']:.2f} ms |")
p, a = rows.get("postgres", {}), rows.get("apalis-postgres", {})
if p and a:
    print(f"\nPalisade / apalis on PostgreSQL, run jobs/s: {statistics.median(p['run_per_s']) / statistics.median(a['run_per_s']):.1f}x")
PY
