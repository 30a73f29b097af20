#!/usr/bin/env bash
# Several wxgate builds against each other, closed loop, interleaved: the before and after of
# a change on the same machine in the same minutes.
#
#   WXGATE_BINS="/tmp/wxgate-before target/release/wxgate" bash benches/load/builds.sh
#
# Per round, per workload (workload.lua: unique, duplicate, mixed), per build: a fresh wxgate
# on CPU 1 (taskset: tokio runs one worker), wrk -t1 on CPU 0 with the nginx upstream of
# compare.sh (one fixed success body), a warm-up, then the measured run. Reported per cell:
# req/s, p50 and p99 (wrk's), and the wxgate process's user and system CPU time per request
# (/proc/PID/stat over the measured run), which a busy machine moves less than req/s; and
# how busy CPU 1 was in all (well above the build's own share: another process ran there).
# The table shows each cell's median round by req/s.
#
# Settings (environment): WXGATE_BINS (required), WORKLOADS ("unique duplicate mixed"),
# ROUNDS (3), DURATION (s, 5), WARMUP (s, 1), CONNECTIONS (64), DUP_CODES (100).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a BINS <<<"${WXGATE_BINS:?set WXGATE_BINS to the wxgate executables to compare}"
read -r -a WORKLOADS <<<"${WORKLOADS:-unique duplicate mixed}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-1}"
CONNECTIONS="${CONNECTIONS:-64}"
DUP_CODES="${DUP_CODES:-100}"
PATH="$PATH:/usr/sbin:/sbin"
for tool in nginx wrk curl taskset; do
    command -v "$tool" >/dev/null 2>&1 || {
        printf 'FAIL: %s is not on PATH (apt-get install nginx wrk curl util-linux)\n' "$tool" >&2
        exit 1
    }
done
for bin in "${BINS[@]}"; do
    [ -x "$bin" ] || { printf 'FAIL: %s is not an executable\n' "$bin" >&2; exit 1; }
done

BODY='{"session_key":"k3Vq9xTw2LmR8yBn5cZp1A==","openid":"oQx7Kd2Lm9Np4Rs6Tu8Vw0Yz1Ab3"}'
CONTENT_TYPE='application/json; encoding=utf-8'
work="$(mktemp -d "${TMPDIR:-/tmp}/wxgate-builds.XXXXXX")"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

ready() {
    local port="$1" pid="$2" i
    for i in $(seq 1 100); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/sns/jscode2session?appid=wx00000000000000a1&secret=s&grant_type=authorization_code&js_code=ready$i" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

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
ready "$upstream_port" "$!" || { printf 'FAIL: the upstream never answered\n' >&2; exit 1; }

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
    taskset -c 0 wrk -t 1 -c "$CONNECTIONS" -d "${seconds}s" --timeout 5s -s "$here/workload.lua" \
        "http://127.0.0.1:$proxy_port" -- "$workload" "$prefix" "$DUP_CODES" | sed -n 's/^RESULT //p'
}
cpu1() {
    awk '$1 == "cpu1" { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}

hz="$(getconf CLK_TCK)"
printf 'wxgate builds, closed loop: wrk -t1 -c%s on CPU 0 with the upstream, wxgate on CPU 1, %ss warm-up, %ss measured, %s rounds interleaved\n' \
    "$CONNECTIONS" "$WARMUP" "$DURATION" "$ROUNDS"
for i in "${!BINS[@]}"; do printf 'build %d: %s\n' "$i" "${BINS[$i]}"; done
declare -A rows rates
for round in $(seq 1 "$ROUNDS"); do
    for workload in "${WORKLOADS[@]}"; do
        for i in "${!BINS[@]}"; do
            RUST_LOG=warn taskset -c 1 "${BINS[$i]}" --config "$work/wxgate.toml" >>"$work/processes.log" 2>&1 &
            pid="$!"
            pids+=("$pid")
            ready "$proxy_port" "$pid" || { printf 'FAIL: build %d never answered\n' "$i" >&2; exit 1; }
            run_wrk "$workload" "w$round" "$WARMUP" >/dev/null
            read -r user_before system_before < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
            read -r busy_before total_before < <(cpu1)
            read -r requests duration_us non2xx errors p50_us p99_us _ <<<"$(run_wrk "$workload" "m$round" "$DURATION")"
            read -r busy_after total_after < <(cpu1)
            read -r user_after system_after < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            row="$(awk -v w="$workload" -v b="$i" -v n="$requests" -v d="$duration_us" -v p50="$p50_us" \
                -v p99="$p99_us" -v u="$((user_after - user_before))" -v s="$((system_after - system_before))" \
                -v hz="$hz" -v busy="$((busy_after - busy_before))" -v total="$((total_after - total_before))" \
                -v bad="$((non2xx + errors))" 'BEGIN {
                    printf "%-10s %5d %8.0f %7.2f %7.2f %9.2f %9.2f %6.0f%% %6.0f%%%s", w, b, n / (d / 1e6),
                        p50 / 1000, p99 / 1000, u * 1e6 / hz / n, s * 1e6 / hz / n,
                        100 * (u + s) / hz / (d / 1e6), 100 * busy / total, bad ? "  " bad " errors!" : ""
                }')"
            printf 'round %d: %s\n' "$round" "$row" >&2
            rows[$workload/$i/$round]="$row"
            rates[$workload/$i/$round]="$(awk -v n="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", n / (d / 1e6) }')"
        done
    done
done
printf '\n%-10s %5s %8s %7s %7s %9s %9s %7s %7s  %s\n' workload build "req/s" "p50 ms" "p99 ms" "user us" "sys us" wxgate CPU1 "(req/s of every round)"
for workload in "${WORKLOADS[@]}"; do
    for i in "${!BINS[@]}"; do
        median="$(for round in $(seq 1 "$ROUNDS"); do echo "${rates[$workload/$i/$round]} $round"; done |
            sort -n | awk '{ r[NR] = $2 } END { print r[int(NR / 2) + 1] }')"
        all="$(for round in $(seq 1 "$ROUNDS"); do printf '%s ' "${rates[$workload/$i/$round]}"; done)"
        printf '%s  (%s)\n' "${rows[$workload/$i/$median]}" "${all% }"
    done
done
printf '\nuser us, sys us: CPU time of the wxgate process per request; wxgate: its CPU time / wall\n'
printf 'time; CPU1: how busy CPU 1 was in all (above wxgate: another process ran there).\n'
