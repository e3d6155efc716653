#!/usr/bin/env bash
# The data layer's benchmarks (not a test): `cargo bench -p palisade-data` against
# a throwaway PostgreSQL primary with two streaming replicas (scripts/services.sh
# `start_postgres_data`): the key-to-shard lookup per placement, the router's own
# work per read, `SELECT 1` through the router against raw sqlx on the same
# replicas, and read throughput on the primary alone against two replicas.
#
#   bench/data.sh
#   bench/data.sh read_select_1      # one group (a criterion filter)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/services.sh
source scripts/services.sh
trap stop_services EXIT
trap 'exit 130' INT TERM

start_postgres_data
cargo bench -p palisade-data --bench data -- "$@" 2>&1 | grep -E '^[a-z0-9_]+/|time:'
