# shellcheck shell=bash
# shellcheck disable=SC2154 # `here` is set by the sourcing script
# The harness shared by builds.sh and instructions.sh (sourced, not run): a work folder
# removed at exit with every process started, free loopback ports below the ephemeral range,
# an nginx upstream on CPU 0 answering every /sns/jscode2session with one fixed success body
# (as compare.sh's), a wxgate configuration in front of it, and wrk on CPU 0.
#
# The script that sources it sets CONNECTIONS and DUP_CODES, and may set WRK_TIMEOUT (s,
# default 5); `harness_start NAME` then sets `work`, `pids`, `upstream_port`, `proxy_port`
# and `admin_port`, starts the upstream and writes "$work/wxgate.toml".
#
# With CLUSTER=1, wxgate.toml has a [cluster] section too, on a redis-server (no persistence)
# started on REDIS_CPU (default 0, beside the load, so that wxgate keeps CPU 1 to itself);
# CLUSTER_TIMEOUT_MS sets cluster.timeout_ms (default 50, wxgate's; under valgrind a round
# trip takes longer). The script calls `fresh_redis` before each wxgate start, which empties
# Redis so that no code is remembered from an earlier run, and `cluster_note REQUESTS` after
# a run (with `trips_before` from `redis_trips` before it): Redis round trips per request,
# and whether wxgate counted in Redis all along.

BODY='{"session_key":"k3Vq9xTw2LmR8yBn5cZp1A==","openid":"oQx7Kd2Lm9Np4Rs6Tu8Vw0Yz1Ab3"}'
CONTENT_TYPE='application/json; encoding=utf-8'
pids=()
# free_port.
# shellcheck source=SCRIPTDIR/../../deploy/lib.sh
. "$here/../../deploy/lib.sh"

cleanup() {
    stop_all
    rm -rf "$work"
}

# Empties Redis (with CLUSTER=1): every run starts with no code remembered.
fresh_redis() {
    [ "${CLUSTER:-0}" = 1 ] || return 0
    redis-cli -p "$redis_port" flushall >/dev/null
}

# A value of wxgate's /metrics on `admin_port`, summed over the series whose labels contain
# `match`.
wxgate_metric() {
    local name="$1" match="$2"
    curl -sf "http://127.0.0.1:$admin_port/metrics" |
        awk -v name="$name" -v match_="$match" \
            '(index($0, name "{") == 1 || index($0, name " ") == 1) && index($0, match_) { sum += $NF }
             END { printf "%d", sum }'
}

# Redis round trips wxgate made so far (0 without CLUSTER=1).
redis_trips() {
    if [ "${CLUSTER:-0}" = 1 ]; then wxgate_metric wxgate_redis_duration_seconds_count ""; else echo 0; fi
}

# Redis round trips since `trips_before`, per request of REQUESTS, and a warning when wxgate
# left the shared mode (the run then did not measure Redis). Prints nothing without CLUSTER=1.
cluster_note() {
    [ "${CLUSTER:-0}" = 1 ] || return 0
    local requests="$1" trips
    trips="$(($(redis_trips) - trips_before))"
    awk -v t="$trips" -v n="$requests" 'BEGIN { printf "  Redis %.2f trips/req", t / n }'
    [ "$(wxgate_metric wxgate_cluster_state 'state="shared"')" = 1 ] || printf ' DEGRADED: not a Redis measurement!'
}

request_path() {
    printf '/sns/jscode2session?appid=wx00000000000000a1&secret=stand-in-secret-a1&grant_type=authorization_code&js_code=%s' "$1"
}

# Waits (up to a minute: wxgate under valgrind starts slowly) until PORT answers, or its
# process PID is gone.
wait_ready() {
    local port="$1" pid="$2" i
    for i in $(seq 1 600); do
        curl -sf -o /dev/null "http://127.0.0.1:$port$(request_path "ready$i")" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

harness_start() {
    work="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    free_port
    upstream_port="$found_port"
    free_port
    proxy_port="$found_port"
    free_port
    admin_port="$found_port"
    mkdir -p "$work/upstream/tmp"
    chmod 0711 "$work"
    cat >"$work/upstream/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $work/upstream/nginx.pid;
error_log $work/upstream/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path $work/upstream/tmp/body;
    proxy_temp_path $work/upstream/tmp/proxy;
    fastcgi_temp_path $work/upstream/tmp/fastcgi;
    uwsgi_temp_path $work/upstream/tmp/uwsgi;
    scgi_temp_path $work/upstream/tmp/scgi;
    server {
        listen 127.0.0.1:$upstream_port backlog=4096;
        location / {
            default_type "$CONTENT_TYPE";
            return 200 '$BODY';
        }
    }
}
EOF
    [ "$(id -u)" -ne 0 ] || sed -i '1i user nobody nogroup;' "$work/upstream/nginx.conf"
    taskset -c 0 nginx -p "$work/upstream" -c "$work/upstream/nginx.conf" >>"$work/processes.log" 2>&1 &
    pids+=("$!")
    wait_ready "$upstream_port" "$!" || { printf 'FAIL: the upstream never answered\n' >&2; exit 1; }

    cat >"$work/wxgate.toml" <<EOF
[server]
listen = "127.0.0.1:$proxy_port"
admin_listen = "127.0.0.1:$admin_port"
shutdown_grace_ms = 1000

[upstream]
base_url = "http://127.0.0.1:$upstream_port"

[code_cache]
ttl_secs = 300
max_entries = 10000000

[quota]
window_secs = 60
per_window = 100000000
EOF
    if [ "${CLUSTER:-0}" = 1 ]; then
        free_port
        redis_port="$found_port"
        mkdir -p "$work/redis"
        taskset -c "${REDIS_CPU:-0}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" \
            --appendonly no --protected-mode no --dir "$work/redis" --loglevel warning \
            >>"$work/processes.log" 2>&1 &
        pids+=("$!")
        local i
        for i in $(seq 1 50); do
            [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
            [ "$i" -lt 50 ] || { printf 'FAIL: redis-server never answered\n' >&2; exit 1; }
            sleep 0.1
        done
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$work/cluster-secret"
        chmod 0600 "$work/cluster-secret"
        cat >>"$work/wxgate.toml" <<EOF

[cluster]
redis_url = "redis://127.0.0.1:$redis_port/0"
key_prefix = "wxgate-load:"
timeout_ms = ${CLUSTER_TIMEOUT_MS:-50}
secret_file = "$work/cluster-secret"
EOF
    fi
}

# One wrk run against wxgate: workload.lua's RESULT line (requests, duration, errors, latencies).
run_wrk() {
    local workload="$1" prefix="$2" seconds="$3"
    taskset -c 0 wrk -t 1 -c "$CONNECTIONS" -d "${seconds}s" --timeout "${WRK_TIMEOUT:-5}s" -s "$here/workload.lua" \
        "http://127.0.0.1:$proxy_port" -- "$workload" "$prefix" "$DUP_CODES" | sed -n 's/^RESULT //p'
}
