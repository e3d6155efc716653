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

# The command prefix that runs PostgreSQL's programs: as `postgres` when we are
# root (PostgreSQL refuses to run as root), as ourselves otherwise.
pg_runas() {
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$services_dir" postgres
    echo "runuser -u postgres --"
  fi
}

# Starts the PostgreSQL in $services_dir/$1 whose data directory exists (from
# initdb or pg_basebackup) on a free port, with the server options $2; sets
# `pg_port` and `pg_ctl` (the pg_ctl command line, to which tests append `stop`,
# `start` or `restart`), and registers its stop.
pg_start() {
  local name=$1 opts=$2 dir="$services_dir/$1" bin runas port
  bin=$(postgres_bin)
  runas=$(pg_runas)
  for attempt in 1 2 3; do
    port=$(free_loopback_port)
    pg_ctl="$runas $bin/pg_ctl -D $dir/data -l $dir/server.log -w -t 60 -o \"-p $port -k $dir -c listen_addresses=127.0.0.1 $opts\""
    if eval "$pg_ctl start" >/dev/null; then
      break
    fi
    [ "$attempt" -lt 3 ] || { cat "$dir/server.log" >&2; return 1; }
  done
  pg_port=$port
  services_stop+=("$runas $bin/pg_ctl -D $dir/data -m immediate -w stop")
  echo "PostgreSQL $name on 127.0.0.1:$port ($dir)" >&2
}

# A new data directory in $services_dir/$1 (trust auth: throwaway).
pg_init() {
  local dir="$services_dir/$1" bin runas
  bin=$(postgres_bin)
  runas=$(pg_runas)
  mkdir -p "$dir"
  [ -z "$runas" ] || chown postgres "$dir"
  $runas "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
    $runas "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1
}

# Server options of every throwaway instance: no durability (fsync off).
pg_throwaway_opts="-c fsync=off -c full_page_writes=off -c max_connections=300"

# Starts a PostgreSQL of its own (initdb, trust auth, fsync off: throwaway) and
# exports PALISADE_TEST_POSTGRES_URL (its `postgres` database; tests create their
# own databases on it) and PALISADE_TEST_PG_CTL, with which fault tests stop and
# restart it.
start_postgres() {
  [ -n "$(postgres_bin)" ] || apt_install postgresql
  services_tmp
  pg_init postgres
  pg_start postgres "$pg_throwaway_opts -c synchronous_commit=off"
  export PALISADE_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
  export PALISADE_TEST_PG_CTL="$pg_ctl"
}

# Starts the data layer's servers: a primary with two streaming replicas
# (pg_basebackup -R, each with its own replication slot) and two independent
# instances as shards. Exports PALISADE_TEST_PG_PRIMARY_URL,
# PALISADE_TEST_PG_REPLICA_URLS and PALISADE_TEST_PG_SHARD_URLS (comma-separated),
# and PALISADE_TEST_PG_REPLICA_CTLS and PALISADE_TEST_PG_SHARD_CTLS (pg_ctl command
# lines separated by `;`), with which fault tests stop and restart them.
start_postgres_data() {
  [ -n "$(postgres_bin)" ] || apt_install postgresql
  services_tmp
  local bin runas primary i replicas=() replica_ctls=() shards=() shard_ctls=()
  bin=$(postgres_bin)
  runas=$(pg_runas)
  pg_init primary
  # Commits wait for their WAL to be written (not fsynced: fsync is off), so a
  # replica can follow within a round trip.
  pg_start primary "$pg_throwaway_opts -c wal_level=replica -c max_wal_senders=10 -c max_replication_slots=10"
  primary=$pg_port
  for i in 1 2; do
    mkdir -p "$services_dir/replica$i"
    [ -z "$runas" ] || chown postgres "$services_dir/replica$i"
    $runas "$bin/pg_basebackup" -h 127.0.0.1 -p "$primary" -U postgres -D "$services_dir/replica$i/data" \
      -R -X stream -C -S "replica$i" >"$services_dir/replica$i/basebackup.log" 2>&1 ||
      { cat "$services_dir/replica$i/basebackup.log" >&2; return 1; }
    pg_start "replica$i" "$pg_throwaway_opts -c hot_standby=on -c hot_standby_feedback=on"
    replicas+=("postgres://postgres@127.0.0.1:$pg_port/postgres")
    replica_ctls+=("$pg_ctl")
  done
  for i in 1 2; do
    pg_init "shard$i"
    pg_start "shard$i" "$pg_throwaway_opts -c synchronous_commit=off"
    shards+=("postgres://postgres@127.0.0.1:$pg_port/postgres")
    shard_ctls+=("$pg_ctl")
  done
  export PALISADE_TEST_PG_PRIMARY_URL="postgres://postgres@127.0.0.1:$primary/postgres"
  PALISADE_TEST_PG_REPLICA_URLS=$(IFS=,; echo "${replicas[*]}")
  PALISADE_TEST_PG_SHARD_URLS=$(IFS=,; echo "${shards[*]}")
  PALISADE_TEST_PG_REPLICA_CTLS=$(IFS=';'; echo "${replica_ctls[*]}")
  PALISADE_TEST_PG_SHARD_CTLS=$(IFS=';'; echo "${shard_ctls[*]}")
  export PALISADE_TEST_PG_REPLICA_URLS PALISADE_TEST_PG_SHARD_URLS PALISADE_TEST_PG_REPLICA_CTLS PALISADE_TEST_PG_SHARD_CTLS
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

# The nats-server binary (Debian installs it in /usr/sbin).
nats_bin() {
  command -v nats-server 2>/dev/null || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; }
}

# Starts a NATS server of its own with JetStream (its store in the temporary
# directory) and exports PALISADE_TEST_NATS_URL (tests isolate themselves by
# stream and subject) and PALISADE_TEST_NATS_SERVER, the binary with which fault
# tests start, kill and restart servers of their own.
start_nats() {
  [ -n "$(nats_bin)" ] || apt_install nats-server
  local bin dir port
  bin=$(nats_bin)
  services_tmp
  dir="$services_dir/nats"
  mkdir -p "$dir"
  for attempt in 1 2 3; do
    port=$(free_loopback_port)
    "$bin" -a 127.0.0.1 -p "$port" -js -sd "$dir/store" -P "$dir/nats.pid" -l "$dir/nats.log" >/dev/null 2>&1 &
    if port_ready "$port"; then
      break
    fi
    [ "$attempt" -lt 3 ] || { cat "$dir/nats.log" >&2; return 1; }
  done
  services_stop+=("kill \$(cat $dir/nats.pid)")
  export PALISADE_TEST_NATS_URL="nats://127.0.0.1:$port"
  export PALISADE_TEST_NATS_SERVER="$bin"
  echo "NATS on 127.0.0.1:$port ($dir)" >&2
}

# Starts an etcd of its own (Debian's etcd-server; its data in the temporary
# directory) and exports PALISADE_TEST_ETCD_URL (tests isolate themselves by key
# prefix) and PALISADE_TEST_ETCD_SERVER, the binary with which fault tests start,
# kill and restart members of their own.
start_etcd() {
  command -v etcd >/dev/null 2>&1 || apt_install etcd-server
  local bin dir port peer
  bin=$(command -v etcd)
  services_tmp
  dir="$services_dir/etcd"
  mkdir -p "$dir"
  for attempt in 1 2 3; do
    port=$(free_loopback_port)
    peer=$(free_loopback_port)
    "$bin" --name test --data-dir "$dir/data" \
      --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "test=http://127.0.0.1:$peer" >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    if port_ready "$port"; then
      break
    fi
    kill "$(cat "$dir/etcd.pid")" 2>/dev/null || true
    rm -rf "$dir/data"
    [ "$attempt" -lt 3 ] || { cat "$dir/etcd.log" >&2; return 1; }
  done
  services_stop+=("kill \$(cat $dir/etcd.pid)")
  export PALISADE_TEST_ETCD_URL="http://127.0.0.1:$port"
  export PALISADE_TEST_ETCD_SERVER="$bin"
  echo "etcd on 127.0.0.1:$port ($dir)" >&2
}

# Installs Debian's Chromium when it is missing and exports PALISADE_TEST_CHROMIUM
# for the dashboard's browser test (which starts its own headless instance).
use_chromium() {
  command -v chromium >/dev/null 2>&1 || apt_install chromium
  PALISADE_TEST_CHROMIUM=$(command -v chromium)
  export PALISADE_TEST_CHROMIUM
  echo "Chromium: $PALISADE_TEST_CHROMIUM" >&2
}

# Runs kubernetes-validate (the Kubernetes API's schemas, from PyPI) from a
# virtual environment of its own under the user's cache, made on first use.
kubernetes_validate() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/palisade/kubernetes-validate"
  if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
  fi
  "$venv/bin/kubernetes-validate" "$@"
}

# Waits (up to 10 s) until something accepts connections on 127.0.0.1:$1.
port_ready() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
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
