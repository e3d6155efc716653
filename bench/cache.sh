#!/usr/bin/env bash
# The cache's benchmarks (not a test), every peer in the same run:
#
#   1. `cargo bench -p palisade-cache --bench cache` against a throwaway Redis
#      (scripts/services.sh): L1 hit against raw quick_cache and moka gets, L2 hit
#      against a hand-written redis-rs GET + decode (one at a time and 100 at once),
#      and the encodings;
#   2. instructions per L1 hit under callgrind (crates/cache/examples/l1_hits.rs):
#      two runs per cache, 200,000 and 100,000 hits, the difference over 100,000;
#      stable on a busy machine, unlike the times.
#
#   bench/cache.sh              # both
#   ONLY=instructions bench/cache.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/services.sh
source scripts/services.sh
trap stop_services EXIT
trap 'exit 130' INT TERM

if [ "${ONLY:-}" != instructions ]; then
    start_redis
    cargo bench -p palisade-cache --bench cache 2>&1 | grep -E '^[a-z0-9_]+/|time:|encoded sizes'
fi

cargo build --release -q -p palisade-cache --example l1_hits
instructions() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/l1_hits "$1" "$2" 2>&1 |
        sed -n 's/.*refs: *//p' | tr -d ,
}
echo "instructions per L1 hit (callgrind):"
for cache in quick_cache quick_cache+ttl moka palisade; do
    hi=$(instructions "$cache" 200000)
    lo=$(instructions "$cache" 100000)
    echo "  $cache $(( (hi - lo) / 100000 ))"
done
