#!/usr/bin/env bash
# Where a forwarded request's CPU goes, wxgate beside nginx doing the same forwarding: per
# request, the proxy process's user and system CPU time, its syscalls by name, its context
# switches, and the req/s it got, closed loop on unique codes (every request goes upstream).
#
#   bash benches/load/costs.sh                                    # this repository's build
#   WXGATE_BINS="/tmp/wxgate-before target/release/wxgate" bash benches/load/costs.sh
#
# Contenders (CONTENDERS, default all): every build of WXGATE_BINS (or the repository's
# release build), `nginx-plain` (proxy_pass with upstream keep-alive, as in compare.sh) and
# `nginx-limit` (the same with limit_req keyed on $arg_appid, never binding: what nginx does
# per request to keep a quota, without compare.sh's proxy_cache, which writes a file per
# unique code). Each proxy runs alone on CPU 1 (nginx: one worker), the upstream of
# harness.sh and wrk -t1 on CPU 0. Per round and contender, on a fresh proxy: a warm-up, a
# clean measured run (req/s, p99, user and system CPU from /proc/PID/stat), then a second
# measured run under `perf stat -e 'syscalls:sys_enter_*',context-switches,...` attached to
# the proxy (tracepoints cost a little, so its req/s is not reported). Every run has codes of
# its own: nothing is replayed. The table shows each contender's median round by req/s (of
# the clean run), and the syscalls of the same round.
#
# Settings (environment): WXGATE_BINS, CONTENDERS, WORKLOAD (unique), ROUNDS (3), DURATION
# (s, 5), WARMUP (s, 1), CONNECTIONS (64), DUP_CODES (100), CLUSTER (1: every wxgate with a
# [cluster] section on a redis-server of its own on CPU 0, emptied before each run; see
# harness.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
WORKLOAD="${WORKLOAD:-unique}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-1}"
CONNECTIONS="${CONNECTIONS:-64}"
DUP_CODES="${DUP_CODES:-100}"
PATH="$PATH:/usr/sbin:/sbin"
for tool in nginx wrk curl taskset perf; do
    command -v "$tool" >/dev/null 2>&1 || {
        printf 'FAIL: %s is not on PATH (apt-get install nginx wrk curl util-linux linux-perf)\n' "$tool" >&2
        exit 1
    }
done
if [ -z "${WXGATE_BINS:-}" ]; then
    WXGATE_BINS="$(cd "$repo" && cargo build --release --bin wxgate --message-format=json-render-diagnostics |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
fi
read -r -a BINS <<<"$WXGATE_BINS"
names=()
for i in "${!BINS[@]}"; do
    [ -x "${BINS[$i]}" ] || { printf 'FAIL: %s is not an executable\n' "${BINS[$i]}" >&2; exit 1; }
    names+=("wxgate$i")
done
read -r -a CONTENDERS <<<"${CONTENDERS:-${names[*]} nginx-plain nginx-limit}"

. "$here/harness.sh"
harness_start wxgate-costs

# A proxying nginx on CPU 1 in front of the upstream; `limit` = 1 adds limit_req.
write_nginx_conf() {
    local name="$1" limit="$2" dir="$work/$1"
    mkdir -p "$dir/tmp"
    {
        [ "$(id -u)" -ne 0 ] || echo "user nobody nogroup;"
        cat <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    upstream wechat {
        server 127.0.0.1:$upstream_port;
        keepalive 256;
        keepalive_requests 100000000;
    }
EOF
        [ "$limit" = 0 ] || echo '    limit_req_zone $arg_appid zone=per_appid:10m rate=100000000r/m;'
        cat <<EOF
    server {
        listen 127.0.0.1:$proxy_port backlog=4096;
        location / {
EOF
        [ "$limit" = 0 ] || echo '            limit_req zone=per_appid burst=1000 nodelay;'
        cat <<EOF
            proxy_pass http://wechat;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    [ "$(id -u)" -ne 0 ] || chown -R nobody "$dir/tmp"
    chmod 0755 "$dir"
}

# The worker of nginx master `pid`.
nginx_worker() {
    local master="$1" child i
    for i in $(seq 1 50); do
        for child in $(pgrep -P "$master" 2>/dev/null); do
            if tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null | grep -q 'worker process'; then
                echo "$child"
                return
            fi
        done
        sleep 0.1
    done
    printf 'FAIL: no nginx worker under %s\n' "$master" >&2
    exit 1
}

# Starts contender `name` on CPU 1; sets `stop_pid` and `proxy_pid` (the serving process).
start_contender() {
    local name="$1"
    case "$name" in
    wxgate*)
        fresh_redis
        RUST_LOG=warn taskset -c 1 "${BINS[${name#wxgate}]}" --config "$work/wxgate.toml" >>"$work/processes.log" 2>&1 &
        stop_pid="$!"
        proxy_pid="$!"
        ;;
    nginx-plain | nginx-limit)
        write_nginx_conf "$name" "$([ "$name" = nginx-limit ] && echo 1 || echo 0)"
        taskset -c 1 nginx -p "$work/$name" -c "$work/$name/nginx.conf" >>"$work/processes.log" 2>&1 &
        stop_pid="$!"
        proxy_pid="$(nginx_worker "$stop_pid")"
        ;;
    *)
        printf 'FAIL: unknown contender %s\n' "$name" >&2
        exit 64
        ;;
    esac
    pids+=("$stop_pid")
    wait_ready "$proxy_port" "$stop_pid" || { printf 'FAIL: %s never answered\n' "$name" >&2; exit 1; }
}

hz="$(getconf CLK_TCK)"
# The syscalls of a measured run under perf stat: "name count" lines, and context switches,
# CPU migrations and task-clock (ms).
# sched_wakeup and ipi_send_cpu fire in the waker's context: the tasks the proxy woke (wrk or
# the upstream, on CPU 0) and the inter-processor interrupts it sent to do so (a sleeping CPU
# must be interrupted; in a VM that is an exit to the hypervisor).
perf_events='syscalls:sys_enter_*,raw_syscalls:sys_enter,context-switches,cpu-migrations,task-clock,sched:sched_wakeup,ipi:ipi_send_cpu,ipi:ipi_send_cpumask'

printf 'forwarding costs, closed loop, %s codes: wrk -t1 -c%s on CPU 0 with the upstream, the proxy alone on CPU 1, %ss warm-up, %ss measured, %s rounds interleaved\n' \
    "$WORKLOAD" "$CONNECTIONS" "$WARMUP" "$DURATION" "$ROUNDS"
for i in "${!BINS[@]}"; do printf 'wxgate%d: %s\n' "$i" "${BINS[$i]}"; done
printf 'load average at the start: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
declare -A rates rows sys_rows medians
for round in $(seq 1 "$ROUNDS"); do
    for name in "${CONTENDERS[@]}"; do
        start_contender "$name"
        tag="${name//[^a-z0-9]/}r$round"
        run_wrk "$WORKLOAD" "w$tag" "$WARMUP" >/dev/null
        trips_before="$(redis_trips)"
        read -r user_before system_before < <(awk '{ print $14, $15 }' "/proc/$proxy_pid/stat")
        read -r requests duration_us non2xx errors p50_us p99_us _ <<<"$(run_wrk "$WORKLOAD" "m$tag" "$DURATION")"
        read -r user_after system_after < <(awk '{ print $14, $15 }' "/proc/$proxy_pid/stat")
        note=""
        [[ "$name" != wxgate* ]] || note="$(cluster_note "$requests")"
        perf stat -x, -e "$perf_events" -p "$proxy_pid" -o "$work/perf.$name.$round" 2>/dev/null &
        perf_pid="$!"
        sleep 0.5
        read -r traced _ <<<"$(run_wrk "$WORKLOAD" "t$tag" "$DURATION")"
        kill -INT "$perf_pid"
        wait "$perf_pid" 2>/dev/null || true
        kill -TERM "$stop_pid" 2>/dev/null || true
        wait "$stop_pid" 2>/dev/null || true
        rate="$(awk -v n="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", n / (d / 1e6) }')"
        rates[$name/$round]="$rate"
        rows[$name/$round]="$(awk -v w="$name" -v r="$rate" -v p50="$p50_us" -v p99="$p99_us" -v n="$requests" \
            -v u="$((user_after - user_before))" -v s="$((system_after - system_before))" -v hz="$hz" \
            -v bad="$((non2xx + errors))" -v note="$note" 'BEGIN {
                printf "%-12s %8d %7.2f %7.2f %8.2f %8.2f %8.2f%s%s", w, r, p50 / 1000, p99 / 1000,
                    u * 1e6 / hz / n, s * 1e6 / hz / n, (u + s) * 1e6 / hz / n, bad ? "  " bad " errors!" : "", note
            }')"
        # perf -x, lines: value,unit,event,...; per traced request, the syscalls seen.
        sys_rows[$name/$round]="$(awk -F, -v n="$traced" '
            $3 == "raw_syscalls:sys_enter" { total = $1 / n; next }
            $3 == "context-switches" { cs = $1 / n; next }
            $3 == "sched:sched_wakeup" { wakeups = $1 / n; next }
            $3 ~ /^ipi:/ { ipis += $1 / n; next }
            $3 == "cpu-migrations" { next }
            $3 == "task-clock" { next }
            $3 ~ /^syscalls:sys_enter_/ && $1 + 0 > 0 {
                name = substr($3, 20); per = $1 / n
                if (per >= 0.0005) list = list sprintf(" %s %.3f", name, per)
            }
            END { printf "syscalls %.2f, context switches %.3f, wakeups %.3f, IPIs %.3f;%s", total, cs, wakeups, ipis, list }' "$work/perf.$name.$round")"
        printf 'round %d: %s | %s\n' "$round" "${rows[$name/$round]}" "${sys_rows[$name/$round]}" >&2
    done
done
printf '\n%-12s %8s %7s %7s %8s %8s %8s  %s\n' contender "req/s" "p50 ms" "p99 ms" "user us" "sys us" "cpu us" "(req/s of every round)"
for name in "${CONTENDERS[@]}"; do
    median="$(for round in $(seq 1 "$ROUNDS"); do echo "${rates[$name/$round]} $round"; done |
        sort -n | awk '{ r[NR] = $2 } END { print r[int(NR / 2) + 1] }')"
    all="$(for round in $(seq 1 "$ROUNDS"); do printf '%s ' "${rates[$name/$round]}"; done)"
    printf '%s  (%s)\n' "${rows[$name/$median]}" "${all% }"
    medians[$name]="$median"
done
printf '\nPer request, the same median round under perf stat (syscalls by name, per request):\n'
for name in "${CONTENDERS[@]}"; do
    printf '%-12s %s\n' "$name" "${sys_rows[$name/${medians[$name]}]}"
done
printf '\nuser us, sys us, cpu us: the proxy process'"'"'s CPU time per request (/proc/PID/stat, the clean\n'
printf 'run). syscalls: raw_syscalls:sys_enter per request of the traced run; context switches: the\n'
printf 'proxy'"'"'s; wakeups: tasks the proxy woke (sched_wakeup in its context); IPIs: the\n'
printf 'inter-processor interrupts it sent (ipi_send_cpu/cpumask); all per request.\n'
printf 'load average at the end: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
