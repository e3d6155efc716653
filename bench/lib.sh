# What the load harnesses share (sourced, not run): logging, waiting for a port,
# CPU time of processes and their children, and an nginx of their own.

log() { printf '%s\n' "$*" >&2; }

# Waits (30 s at most) until something listens on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "nothing listens on port $1"
    return 1
}

# The pids of the processes $@ and their children (nginx's workers, PostgreSQL's
# backends).
tree() {
    local p
    for p in "$@"; do
        echo "$p"
        pgrep -P "$p" || true
    done
}

# The CPU ticks (user and system) of the processes $@ and their children.
cpu_ticks() {
    local sum=0 p
    for p in $(tree "$@"); do
        [ -r "/proc/$p/stat" ] || continue
        # utime + stime: fields 14 and 15, after the command name in parentheses.
        sum=$((sum + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$sum"
}

# Writes an nginx configuration in `dir` ($1) around `blocks` ($3, its upstream
# and server blocks), starts nginx with `workers` ($2) workers and prints its pid.
# `NGINX_EXTRA` is added to the main context and `LAUNCH` runs before the command
# (both for bench/instructions.sh).
run_nginx() {
    local dir=$1 workers=$2 blocks=$3
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<CONF
worker_processes $workers;${NGINX_EXTRA:-}
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir;
    uwsgi_temp_path $dir; scgi_temp_path $dir;
    keepalive_requests 1000000;
$blocks
}
CONF
    ${LAUNCH:-} nginx -p "$dir" -c "$dir/nginx.conf" >"$dir/out" 2>&1 &
    echo $!
}
