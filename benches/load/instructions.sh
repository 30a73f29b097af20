#!/usr/bin/env bash
# User-space instructions per request of a wxgate build, counted by valgrind's callgrind:
# deterministic where wall-clock numbers on a shared machine are not, so that two builds can
# be compared on a busy machine.
#
#   bash benches/load/instructions.sh                        # this repository's release build
#   WXGATE_BIN=/path/to/wxgate bash benches/load/instructions.sh   # another build
#
# wxgate runs under `valgrind --tool=callgrind --dump-instr=no` on CPU 1 (taskset: tokio runs
# one worker), in front of an nginx on CPU 0 answering every /sns/jscode2session with one
# fixed success body (as in compare.sh). Per workload (workload.lua: unique, duplicate,
# mixed), on a wxgate started fresh: a wrk warm-up, `callgrind_control -z` (counters zeroed),
# a measured wrk run, `callgrind_control -d` (dump); the result is every thread's total Ir
# over the measured run divided by the requests wrk completed in it.
#
# Settings (environment): WORKLOADS (default "unique duplicate mixed"), CONNECTIONS (16),
# WARMUP (s, 5), DURATION (s, 10), DUP_CODES (100), WXGATE_BIN, KEEP (a directory: the
# callgrind files are kept there, for callgrind_annotate).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
read -r -a WORKLOADS <<<"${WORKLOADS:-unique duplicate mixed}"
CONNECTIONS="${CONNECTIONS:-16}"
WARMUP="${WARMUP:-5}"
DURATION="${DURATION:-10}"
DUP_CODES="${DUP_CODES:-100}"
PATH="$PATH:/usr/sbin:/sbin"
for tool in nginx wrk curl taskset valgrind callgrind_control; do
    command -v "$tool" >/dev/null 2>&1 || {
        printf 'FAIL: %s is not on PATH (apt-get install nginx wrk curl util-linux valgrind)\n' "$tool" >&2
        exit 1
    }
done

BODY='{"session_key":"k3Vq9xTw2LmR8yBn5cZp1A==","openid":"oQx7Kd2Lm9Np4Rs6Tu8Vw0Yz1Ab3"}'
CONTENT_TYPE='application/json; encoding=utf-8'

if [ -n "${WXGATE_BIN:-}" ]; then
    wxgate_bin="$WXGATE_BIN"
else
    wxgate_bin="$(cd "$repo" && cargo build --release --bin wxgate --message-format=json-render-diagnostics |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
fi
[ -x "$wxgate_bin" ] || { printf 'FAIL: no wxgate executable\n' >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/wxgate-instructions.XXXXXX")"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports below the ephemeral range.
read -r ephemeral_low _ </proc/sys/net/ipv4/ip_local_port_range
free_port() {
    local port
    while :; do
        port=$((10000 + RANDOM % (ephemeral_low - 10000)))
        case " ${taken:-} " in *" $port "*) continue ;; esac
        if [ -z "$(ss -Htln "sport = :$port" 2>/dev/null)" ]; then
            taken="${taken:-} $port"
            echo "$port"
            return
        fi
    done
}
upstream_port="$(free_port)"
proxy_port="$(free_port)"
admin_port="$(free_port)"

request_path() {
    printf '/sns/jscode2session?appid=wx00000000000000a1&secret=stand-in-secret-a1&grant_type=authorization_code&js_code=%s' "$1"
}

wait_ready() {
    local port="$1" pid="$2" i
    for i in $(seq 1 600); do
        curl -sf -o /dev/null "http://127.0.0.1:$port$(request_path "ready$i")" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

mkdir -p "$work/upstream/tmp"
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

run_wrk() {
    local workload="$1" prefix="$2" seconds="$3"
    taskset -c 0 wrk -t 1 -c "$CONNECTIONS" -d "${seconds}s" --timeout 10s -s "$here/workload.lua" \
        "http://127.0.0.1:$proxy_port" -- "$workload" "$prefix" "$DUP_CODES" | sed -n 's/^RESULT //p'
}

printf 'wxgate: %s\n' "$wxgate_bin"
printf 'valgrind --tool=callgrind on CPU 1, wrk -t1 -c%s on CPU 0, %ss warm-up, %ss measured\n' \
    "$CONNECTIONS" "$WARMUP" "$DURATION"
printf '%-10s %10s %14s %12s\n' workload requests "Ir" "Ir/request"
for workload in "${WORKLOADS[@]}"; do
    out="$work/callgrind.$workload"
    RUST_LOG=warn taskset -c 1 valgrind --tool=callgrind --dump-instr=no \
        --callgrind-out-file="$out.%p" "$wxgate_bin" --config "$work/wxgate.toml" \
        >>"$work/processes.log" 2>&1 &
    pid="$!"
    pids+=("$pid")
    wait_ready "$proxy_port" "$pid" || { printf 'FAIL: wxgate never answered\n' >&2; tail "$work/processes.log" >&2; exit 1; }
    run_wrk "$workload" "w" "$WARMUP" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    read -r requests _ non2xx errors _ <<<"$(run_wrk "$workload" "m" "$DURATION")"
    callgrind_control -d "$pid" >/dev/null 2>&1
    # The dump written by -d is the newest file with a part number.
    dump="$(ls -t "$out.$pid".* 2>/dev/null | head -n 1)"
    ir="$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ "$non2xx" = 0 ] && [ "$errors" = 0 ] || printf 'note: %s non-2xx, %s socket errors\n' "$non2xx" "$errors"
    printf '%-10s %10s %14s %12.0f\n' "$workload" "$requests" "$ir" "$(awk -v i="$ir" -v r="$requests" 'BEGIN { print i / r }')"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$dump" "$KEEP/callgrind.$workload"
    fi
done
