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
}

# One wrk run against wxgate: workload.lua's RESULT line (requests, duration, errors, latencies).
run_wrk() {
    local workload="$1" prefix="$2" seconds="$3"
    taskset -c 0 wrk -t 1 -c "$CONNECTIONS" -d "${seconds}s" --timeout "${WRK_TIMEOUT:-5}s" -s "$here/workload.lua" \
        "http://127.0.0.1:$proxy_port" -- "$workload" "$prefix" "$DUP_CODES" | sed -n 's/^RESULT //p'
}
