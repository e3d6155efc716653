#!/usr/bin/env bash
# The consistency tools' benchmarks (not a test): `cargo bench -p palisade-flow`
# against a throwaway PostgreSQL, Redis and NATS (scripts/services.sh): idempotency-key
# overhead per request on each store beside the store's bare round trip, event
# appends per second to one stream and to many, a projection's rebuild rate, the
# outbox relay's rate to the in-process bus and to NATS JetStream.
#
#   bench/consistency.sh
#   bench/consistency.sh event_append     # one group (a criterion filter)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/services.sh
source scripts/services.sh
trap stop_services EXIT
trap 'exit 130' INT TERM

start_postgres
start_redis
start_nats
cargo bench -p palisade-flow --bench flow -- "$@" 2>&1 | grep -E '^[a-zA-Z0-9_]+/|time:'
