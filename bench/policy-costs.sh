#!/usr/bin/env bash
# What each route and cluster policy costs per request when it is switched on:
# bench/instructions.sh's count for Palisade alone (callgrind, one worker), first
# with the load harness's configuration (retry, breaker and outlier detection on,
# everything else off), then with one more policy at a time, none of which refuses
# or delays a request of the workload. Not a test: some ten minutes.
#
#   bench/policy-costs.sh
#   REQUESTS=10000 bench/policy-costs.sh
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")

# name | route lines | cluster lines
policies=(
    "none (retry, breaker, outlier)||"
    "rate_limit gcra, global|rate_limit = { requests = 100000000, per = \"1s\" }|"
    "rate_limit gcra, per client-ip|rate_limit = { requests = 100000000, per = \"1s\", key = \"client-ip\" }|"
    "rate_limit sliding-window|rate_limit = { requests = 1000000, per = \"1s\", algorithm = \"sliding-window\" }|"
    "adaptive_timeout|adaptive_timeout = {}|"
    "deadline|deadline = { header = \"x-request-timeout-ms\" }|"
    "fault (rates 0)|fault = { delay = \"1ms\", delay_rate = 0.0, abort_rate = 0.0 }|"
    "hedge (never fires)|hedge = { delay = \"900ms\" }|"
    "shed (adaptive_concurrency, critical)|shed = { priority = \"critical\" }|adaptive_concurrency = { initial = 500, min = 100 }"
    "max_concurrent (bulkhead)||max_concurrent = 1000"
    "failure_headers||failure_headers = [\"x-overloaded\"]"
)

echo "| policy switched on | instructions / request | over none |"
echo "|---|---|---|"
base=
for p in "${policies[@]}"; do
    IFS='|' read -r name route cluster <<<"$p"
    n=$(ROUTE_EXTRA=$route CLUSTER_EXTRA=$cluster ONLY=palisade "$here/instructions.sh" 2>/dev/null |
        awk -F'|' '/^\| palisade \|/ {gsub(/ /, "", $3); print $3}')
    base=${base:-$n}
    echo "| $name | $n | $((n - base)) |"
done
