# Throwaway servers for the tests, sourced by scripts/test (and usable by hand:
# `source scripts/services.sh && start_postgres && echo $PALISADE_TEST_POSTGRES_URL`).
# Each server runs from a temporary directory on a free loopback port and is
# stopped, and its directory removed, by `stop_services` (scripts/test traps it on
# every exit). Servers already running on the machine are never used.

services_dir=
services_stop=()

# A free TCP port on 127.0.0.1 (nothing answers on it).
free_loopback_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  echo "no free port found" >&2
  return 1
}

services_tmp() {
  if [ -z "$services_dir" ]; then
    services_dir=$(mktemp -d /tmp/palisade-services.XXXXXX)
    chmod 755 "$services_dir"
  fi
}

# Installs Debian packages that are missing (`apt-get update` once).
apt_install() {
  [ "$#" -gt 0 ] || return 0
  echo "installing $*" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test: need root (or these packages installed): $*" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The newest installed PostgreSQL's bin directory.
postgres_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

# Starts a PostgreSQL of its own (initdb, trust auth, fsync off: throwaway) and
# exports PALISADE_TEST_POSTGRES_URL (its `postgres` database; tests create their
# own databases on it) and PALISADE_TEST_PG_CTL / PALISADE_TEST_PG_DATA, with which
# fault tests stop and restart it.
start_postgres() {
  [ -n "$(postgres_bin)" ] || apt_install postgresql
  local bin dir port runas=()
  bin=$(postgres_bin)
  services_tmp
  dir="$services_dir/postgres"
  mkdir -p "$dir"
  # PostgreSQL refuses to run as root: its files belong to `postgres`.
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
    chown postgres "$dir"
    runas=(runuser -u postgres --)
  fi
  "${runas[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
    "${runas[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1
  for attempt in 1 2 3; do
    port=$(free_loopback_port)
    if "${runas[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
      >/dev/null; then
      break
    fi
    [ "$attempt" -lt 3 ] || { cat "$dir/server.log" >&2; return 1; }
  done
  services_stop+=("${runas[*]} $bin/pg_ctl -D $dir/data -m immediate -w stop")
  export PALISADE_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  export PALISADE_TEST_PG_CTL="${runas[*]} $bin/pg_ctl -D $dir/data -l $dir/server.log -w -t 60 -o \"-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300\""
  echo "PostgreSQL on 127.0.0.1:$port ($dir)" >&2
}

# Starts a Redis of its own (no persistence) and exports PALISADE_TEST_REDIS_URL
# (tests isolate themselves by key prefix) and PALISADE_TEST_REDIS_SERVER, the
# binary with which fault tests start, kill and restart servers of their own.
start_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  local dir port
  services_tmp
  dir="$services_dir/redis"
  mkdir -p "$dir"
  for attempt in 1 2 3; do
    port=$(free_loopback_port)
    if redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
      --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null &&
      redis_ready "$port"; then
      break
    fi
    [ "$attempt" -lt 3 ] || { cat "$dir/redis.log" >&2; return 1; }
  done
  services_stop+=("kill \$(cat $dir/redis.pid)")
  export PALISADE_TEST_REDIS_URL="redis://127.0.0.1:$port"
  PALISADE_TEST_REDIS_SERVER=$(command -v redis-server)
  export PALISADE_TEST_REDIS_SERVER
  echo "Redis on 127.0.0.1:$port ($dir)" >&2
}

# Waits (up to 10 s) until the Redis on 127.0.0.1:$1 answers PING.
redis_ready() {
  for _ in $(seq 1 100); do
    [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  return 1
}

stop_services() {
  local cmd
  for cmd in "${services_stop[@]}"; do
    eval "$cmd" >/dev/null 2>&1 || true
  done
  services_stop=()
  [ -z "$services_dir" ] || rm -rf "$services_dir"
  services_dir=
}
