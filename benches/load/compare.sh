#!/usr/bin/env bash
# A load comparison anyone can rerun: wxgate against nginx doing the same job, on loopback.
#
#   bash benches/load/compare.sh
#
# From a fresh clone: installs what is missing (Debian's nginx, wrk, curl; the nginx system
# service is kept from starting), builds wxgate in release mode, then measures, with the same
# load generator (wrk + workload.lua), connection count, duration and CPU set for everyone:
#
#   direct       wrk against the upstream itself: an nginx answering every
#                /sns/jscode2session with one fixed success body (the ceiling);
#   wxgate       wxgate in front of that upstream (quota too high to bind, big code cache);
#   nginx        nginx as the equivalent proxy: proxy_pass with upstream keep-alive,
#                limit_req keyed on $arg_appid (too high to bind), proxy_cache keyed on
#                $arg_appid$arg_secret$arg_js_code with proxy_cache_lock, cache on tmpfs;
#   nginx-plain  nginx doing nothing but proxy_pass with upstream keep-alive;
#   wxgate+redis (only when asked for, see CONTENDERS) wxgate with a [cluster] section on a
#                redis-server of its own (fresh for every cell, no persistence): every quota
#                turn is a round trip to Redis, as for replicas sharing the quota. Reported
#                against the wxgate row, with the Redis round trips per request (the deltas
#                of wxgate_redis_duration_seconds_count over the round, divided by the
#                requests) and Redis's CPU time. Redis runs on REDIS_CPU (default: PROXY_CPU,
#                so that the load side is the same as for the other contenders; in production
#                Redis has its own host, so this row's throughput is pessimistic, and its
#                loopback round trips optimistic);
#   wxgate+redis-1ms (only when asked for) the same with Redis at a distance: redis-server
#                behind wxgate-relay (the stand-in crate's delaying relay, built with it),
#                REDIS_DELAY_MS ± REDIS_JITTER_MS each way (default 1 ms ± 0.3 ms), both on
#                REDIS_CPU, in a network namespace of their own joined by a veth pair when
#                run as root (else on loopback). Reported against the wxgate row with the p50
#                it adds, the Redis round trips per request and the round trip measured through
#                the relay (redis-cli --latency, one second before each round);
#
# each under three workloads (workload.lua): unique codes, duplicate codes (a set of 100) and
# mixed (80 % unique, 20 % from the set). Pinning, on a 2-core machine: the proxy under test
# alone on CPU 1 (nginx: worker_processes 1; wxgate: taskset, so tokio sees one core), the
# upstream and wrk on CPU 0. Every proxy is started fresh for every cell, so its peak RSS
# (VmHWM) is that cell's. Only 127.0.0.1 is used. Everything started here is stopped on exit.
#
# Every cell is measured ROUNDS times, the rounds interleaved (round 1 of every cell, then
# round 2, ...), and the table shows each cell's median round: a shared machine's slow
# minutes then move one round of several cells rather than the whole of one cell.
#
# Then the same cells in an open loop: wrk's closed loop (each connection sends its next
# request when the previous one is answered) lets a proxy that stalls slow its load down, so
# the stall hides in few, long requests (coordinated omission). Open loop, every contender is
# offered the same fixed rates, OPEN_RATES per cent (default 25, 50 and 80) of nginx-plain's
# closed-loop req/s on that workload, by oha (`-q RATE --latency-correction`: a request's
# latency counts from when it was due, not from when a free connection sent it), installed
# with `cargo install oha --locked` if missing, on LOAD_CPU with one worker thread; it reports
# p50, p99 and p99.9 per rate, the rate achieved, and whether the contender kept up (achieved
# at least 97 % of the rate). Unique codes are 20 random letters, duplicates the same set of
# DUP_CODES, mixed one of the set in five (oha's --rand-regex-url). Without oha (the install
# failed), wrk paces every connection with workload.lua's delay instead: then the rate is
# approximate and the latencies are not corrected, which the table says. Each open-loop cell
# also gets ROUNDS interleaved rounds, after a WARMUP of closed-loop wrk on a fresh contender;
# the table shows the round with the median p99.
#
# Settings (environment): ROUNDS (default 3), DURATION (s per round, default 5), WARMUP (s,
# default 1), CONNECTIONS (default 64), DUP_CODES (default 100), PROXY_CPU (1), LOAD_CPU (0),
# REDIS_CPU (PROXY_CPU), CONTENDERS (space-separated, default "direct wxgate nginx
# nginx-plain"; add wxgate+redis or wxgate+redis-1ms, e.g. CONTENDERS="wxgate wxgate+redis-1ms"),
# REDIS_DELAY_MS, REDIS_JITTER_MS and RELAY_BIN (a wxgate-relay executable) for
# wxgate+redis-1ms, WORKLOADS
# (space-separated subset, default all), WXGATE_BIN (measure this wxgate executable instead
# of building the repository's), OPEN_RATES (per cent of nginx-plain's closed-loop req/s,
# default "25 50 80"; empty: no open loop; none either without nginx-plain), OPEN_DURATION
# (s per open-loop round, default DURATION), OPEN_CONTENDERS (default: CONTENDERS).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-1}"
CONNECTIONS="${CONNECTIONS:-64}"
DUP_CODES="${DUP_CODES:-100}"
PROXY_CPU="${PROXY_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
REDIS_CPU="${REDIS_CPU:-$PROXY_CPU}"
# One wrk thread: it shares CPU 0 with the upstream, a second thread would only fight it.
WRK_THREADS=1

# A subset can be chosen for a quick look, e.g. CONTENDERS="wxgate nginx" WORKLOADS=unique.
read -r -a CONTENDERS <<<"${CONTENDERS:-direct wxgate nginx nginx-plain}"
read -r -a WORKLOADS <<<"${WORKLOADS:-unique duplicate mixed}"
read -r -a OPEN_RATES <<<"${OPEN_RATES-25 50 80}"
read -r -a OPEN_CONTENDERS <<<"${OPEN_CONTENDERS:-${CONTENDERS[*]}}"
OPEN_DURATION="${OPEN_DURATION:-$DURATION}"
if [ "${#OPEN_RATES[@]}" -gt 0 ] && [[ " ${CONTENDERS[*]} " != *" nginx-plain "* ]]; then
    printf '==> no open loop: its rates are per cent of nginx-plain'"'"'s req/s, and nginx-plain is not a contender\n' >&2
    OPEN_RATES=()
fi
REDIS_DELAY_MS="${REDIS_DELAY_MS:-1}"
REDIS_JITTER_MS="${REDIS_JITTER_MS:-0.3}"
with_redis=0
with_distance=0
for name in "${CONTENDERS[@]}"; do
    case "$name" in
    direct | wxgate | nginx | nginx-plain) ;;
    wxgate+redis) with_redis=1 ;;
    wxgate+redis-1ms) with_redis=1 with_distance=1 ;;
    *)
        printf 'FAIL: unknown contender %s (direct, wxgate, nginx, nginx-plain, wxgate+redis, wxgate+redis-1ms)\n' "$name" >&2
        exit 64
        ;;
    esac
done

# The upstream's answer: a realistic code2Session success, WeChat's Content-Type.
BODY='{"session_key":"k3Vq9xTw2LmR8yBn5cZp1A==","openid":"oQx7Kd2Lm9Np4Rs6Tu8Vw0Yz1Ab3"}'
CONTENT_TYPE='application/json; encoding=utf-8'

log() { printf '==> %s\n' "$*" >&2; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    if [ -s "${work:-}/processes.log" ]; then
        printf '%s\n' "--- last lines of the processes' output:" >&2
        tail -n 20 "$work/processes.log" >&2
    fi
    exit 1
}
# install_packages, free_port.
# shellcheck source=SCRIPTDIR/../../deploy/lib.sh
. "$here/../../deploy/lib.sh"

# --- cleanup: everything this script starts is in `pids`; temp dirs in `dirs` ----------------
pids=()
dirs=()
distance_ns=""
cleanup() {
    stop_all
    [ -z "$distance_ns" ] || ip netns del "$distance_ns" 2>/dev/null || true
    if [ "${#dirs[@]}" -gt 0 ]; then
        rm -rf "${dirs[@]}"
    fi
    install_packages_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. what is missing gets installed ----------------------------------------------------
PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ "$with_redis" = 1 ]; then
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
fi
[ "${#missing[@]}" = 0 ] || install_packages "${missing[@]}"
for tool in nginx wrk curl taskset; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not on PATH"
done
if [ "$with_redis" = 1 ]; then
    for tool in redis-server redis-cli; do
        command -v "$tool" >/dev/null 2>&1 || fail "$tool is not on PATH (contender wxgate+redis)"
    done
fi
for name in "${OPEN_CONTENDERS[@]}"; do
    [[ " ${CONTENDERS[*]} " == *" $name "* ]] || fail "open-loop contender $name is not one of CONTENDERS"
done
# The open loop's load generator: oha, from crates.io if missing (a few minutes of building).
PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
open_tool=""
if [ "${#OPEN_RATES[@]}" -gt 0 ]; then
    if ! command -v oha >/dev/null 2>&1 && command -v cargo >/dev/null 2>&1; then
        log "installing oha (cargo install oha --locked) for the open-loop measurement"
        cargo install oha --locked >"${TMPDIR:-/tmp}/wxgate-oha-install.log" 2>&1 ||
            log "cargo install oha failed (${TMPDIR:-/tmp}/wxgate-oha-install.log): wrk paces the open loop instead"
    fi
    if command -v oha >/dev/null 2>&1; then
        open_tool=oha
    else
        open_tool=wrk-paced
    fi
fi

cpus="$(nproc)"
if [ "$cpus" -le "$PROXY_CPU" ] || [ "$cpus" -le "$LOAD_CPU" ] || [ "$cpus" -le "$REDIS_CPU" ]; then
    fail "needs CPUs $LOAD_CPU, $PROXY_CPU and $REDIS_CPU; this machine has $cpus"
fi

# Whether contender `name` shares through a Redis of its own.
with_a_redis() { case "$1" in wxgate+redis | wxgate+redis-1ms) return 0 ;; *) return 1 ;; esac; }

# --- 2. wxgate in release mode --------------------------------------------------------------
if [ -n "${WXGATE_BIN:-}" ]; then
    # Another build to compare (e.g. a patched copy of the repository).
    wxgate_bin="$WXGATE_BIN"
else
    log "cargo build --release --bin wxgate"
    wxgate_bin="$(cd "$repo" && cargo build --release --bin wxgate --message-format=json-render-diagnostics |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
fi
[ -x "$wxgate_bin" ] || fail "no wxgate executable (${wxgate_bin:-cargo reported none})"
relay_bin="${RELAY_BIN:-}"
if [ "$with_distance" = 1 ] && [ -z "$relay_bin" ]; then
    log "cargo build --release -p wxgate-stand-in --bin wxgate-relay"
    relay_bin="$(cd "$repo" && cargo build --release -p wxgate-stand-in --bin wxgate-relay \
        --message-format=json-render-diagnostics | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
fi
[ "$with_distance" = 0 ] || [ -x "$relay_bin" ] || fail "no wxgate-relay executable (${relay_bin:-cargo reported none})"

# --- 3. scratch space -------------------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/wxgate-load.XXXXXX")"
dirs+=("$work")
shm="$(mktemp -d /dev/shm/wxgate-load.XXXXXX)"
dirs+=("$shm")
# nginx workers run unprivileged when nginx is started as root; they must reach their temp
# and cache directories.
worker_user=""
if [ "$(id -u)" -eq 0 ]; then
    worker_user="user nobody nogroup;"
    getent group nogroup >/dev/null 2>&1 || worker_user="user nobody;"
    chmod 0711 "$work"
    chmod 0711 "$shm"
fi

free_port
upstream_port="$found_port"
free_port
proxy_port="$found_port"
free_port
admin_port="$found_port"
free_port
redis_port="$found_port"
free_port
relay_port="$found_port"

request_path() {
    printf '/sns/jscode2session?appid=wx00000000000000a1&secret=stand-in-secret-a1&grant_type=authorization_code&js_code=%s' "$1"
}

# Waits until `port` answers an exchange with 200, while process `pid` lives; 1 if it never
# does.
wait_ready() {
    local port="$1" pid="$2" i
    for i in $(seq 1 100); do
        if curl -sf -o /dev/null "http://127.0.0.1:$port$(request_path "ready$i")"; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# nginx's settings shared by the upstream and the proxies: own prefix and temp paths, no
# access log, keep-alive connections that are never closed for their request count.
nginx_common() {
    local dir="$1"
    mkdir -p "$dir/tmp"
    [ -z "$worker_user" ] || chown nobody "$dir/tmp"
    cat <<EOF
$worker_user
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
EOF
}

nginx_http_common() {
    local dir="$1"
    cat <<EOF
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
EOF
}

write_upstream_conf() {
    local dir="$work/upstream"
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    server {
        listen 127.0.0.1:$upstream_port backlog=4096;
        location / {
            default_type "$CONTENT_TYPE";
            return 200 '$BODY';
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    echo "$dir/nginx.conf"
}

# The proxy configuration; `cache` = 1 adds limit_req and proxy_cache.
write_proxy_conf() {
    local name="$1" cache="$2"
    local dir="$work/$name"
    rm -rf "${dir:?}" "${shm:?}/${name:?}"
    mkdir -p "$dir" "$shm/$name"
    [ -z "$worker_user" ] || chown nobody "$shm/$name"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    upstream wechat {
        server 127.0.0.1:$upstream_port;
        keepalive 256;
        keepalive_requests 100000000;
    }
EOF
        if [ "$cache" = 1 ]; then
            cat <<EOF
    # wxgate's quota: per appid, never binding here (100,000,000 a minute, like per_window).
    limit_req_zone \$arg_appid zone=per_appid:10m rate=100000000r/m;
    # wxgate's code cache: answers remembered by (appid, secret, js_code), identical
    # requests in flight coalesced (proxy_cache_lock); on tmpfs, so no disk is involved.
    proxy_cache_path $shm/$name levels=1:2 keys_zone=codes:256m max_size=4g inactive=10m use_temp_path=off;
EOF
        fi
        cat <<EOF
    server {
        listen 127.0.0.1:$proxy_port backlog=4096;
        location / {
EOF
        if [ "$cache" = 1 ]; then
            cat <<EOF
            limit_req zone=per_appid burst=1000 nodelay;
            proxy_cache codes;
            proxy_cache_key \$arg_appid\$arg_secret\$arg_js_code;
            proxy_cache_valid 200 5m;
            proxy_cache_lock on;
EOF
        fi
        cat <<EOF
            proxy_pass http://wechat;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    echo "$dir/nginx.conf"
}

write_wxgate_conf() {
    cat >"$work/wxgate.toml" <<EOF
[server]
listen = "127.0.0.1:$proxy_port"
admin_listen = "127.0.0.1:$admin_port"
shutdown_grace_ms = 1000

[upstream]
base_url = "http://127.0.0.1:$upstream_port"

[code_cache]
ttl_secs = 300
# Every code of a run fits: nothing is evicted early.
max_entries = 10000000

[quota]
# Never binds: 100,000,000 calls a minute for the one appid of the workloads.
window_secs = 60
per_window = 100000000
EOF
    echo "$work/wxgate.toml"
}

# wxgate+redis: the same configuration, with the quota shared through the redis-server this
# script starts (as replicas share it); wxgate+redis-1ms: through the relay in front of it
# (`distance_host`:`distance_port`).
write_wxgate_cluster_conf() {
    local name="${1:-wxgate+redis}" redis_addr="127.0.0.1:$redis_port" file="$work/wxgate-cluster.toml"
    if [ "$name" = wxgate+redis-1ms ]; then
        redis_addr="$distance_host:$distance_port"
        file="$work/wxgate-distance.toml"
    fi
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$work/cluster-secret"
    chmod 0600 "$work/cluster-secret"
    {
        cat "$work/wxgate.toml"
        cat <<EOF

[cluster]
redis_url = "redis://$redis_addr/0"
key_prefix = "wxgate-load:"
# The default: an operation slower than this degrades wxgate to counting on its own, which
# the notes column reports (the row is then not a measurement of the shared quota).
timeout_ms = 50
secret_file = "$work/cluster-secret"
EOF
    } >"$file"
    echo "$file"
}

# Starts `cmd...` on CPU `cpu` in the background; its pid is in `started`.
start_on() {
    local cpu="$1"
    shift
    taskset -c "$cpu" "$@" >>"$work/processes.log" 2>&1 &
    started=$!
    pids+=("$started")
}

stop() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# The nginx worker (the process that serves requests) of master `pid`.
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
    fail "no nginx worker under pid $master"
}

# utime + stime of a process, in clock ticks.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# busy and total jiffies of one CPU.
cpu_jiffies() {
    awk -v cpu="cpu$1" '$1 == cpu { busy = $2 + $3 + $4 + $7 + $8 + $9; total = busy + $5 + $6; print busy, total }' /proc/stat
}

# `part` of `whole` in per cent.
percent() {
    awk -v p="$1" -v w="$2" 'BEGIN { if (w > 0) printf "%.0f%%", 100 * p / w; else printf "-" }'
}

peak_rss_mib() {
    awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "-"
}

# Runs wrk for `seconds` against `port` with `workload`; prints its RESULT fields.
run_wrk() {
    local port="$1" workload="$2" prefix="$3" seconds="$4" out
    out="$(taskset -c "$LOAD_CPU" wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "${seconds}s" \
        --timeout 5s -s "$here/workload.lua" "http://127.0.0.1:$port" \
        -- "$workload" "$prefix" "$DUP_CODES" 2>&1)" || fail "wrk failed: $out"
    printf '%s\n' "$out" | sed -n 's/^RESULT //p'
}

# The js_code of each workload as a regular expression for oha's --rand-regex-url: unique,
# 20 random letters (no two alike in practice); duplicate, one of dup0 .. dup<DUP_CODES-1>,
# the set wrk uses; mixed, one of the set in five.
code_regex() {
    local set unique="o[a-z]{20}"
    set="dup($(seq -s '|' 0 $((DUP_CODES - 1))))"
    case "$1" in
    unique) printf '%s' "$unique" ;;
    duplicate) printf '%s' "$set" ;;
    mixed) printf '(%s|%s|%s|%s|%s)' "$unique" "$unique" "$unique" "$unique" "$set" ;;
    esac
}

# Offers `rate` requests/s of `workload` to `port` for `seconds`, open loop; prints
# "<achieved req/s> <p50 us> <p99 us> <p99.9 us> <non-2xx> <errors>". oha: requests are due
# at the rate whatever the answers, and a request's latency counts from when it was due.
# Without oha, wrk with a per-connection delay: roughly the rate, latencies uncorrected.
run_open() {
    local port="$1" workload="$2" rate="$3" seconds="$4" out flat
    if [ "$open_tool" = oha ]; then
        local url="http://127.0.0.1:$port/sns/jscode2session\\?appid=wx00000000000000a1&secret=stand-in-secret-a1&grant_type=authorization_code&js_code=$(code_regex "$workload")"
        out="$(taskset -c "$LOAD_CPU" oha --no-tui --worker-threads 1 -c "$CONNECTIONS" \
            -z "${seconds}s" -q "$rate" --latency-correction --rand-regex-url -t 5s \
            --output-format json "$url" 2>&1)" || fail "oha failed: $out"
        flat="$(printf '%s' "$out" | tr -d ' \n')"
        printf '%s' "$flat" | awk -v seconds="$seconds" '
            function field(section, key,    rest, at) {
                at = index($0, "\"" section "\":{")
                rest = substr($0, at)
                rest = substr(rest, 1, index(rest, "}"))
                at = index(rest, "\"" key "\":")
                if (at == 0) return 0
                rest = substr(rest, at + length(key) + 3)
                return rest + 0
            }
            {
                ok = field("statusCodeDistribution", "200")
                match($0, /"statusCodeDistribution":\{[^}]*\}/)
                codes = substr($0, RSTART + 26, RLENGTH - 27)
                n = split(codes, parts, /,/)
                all = 0
                for (i = 1; i <= n; i++) { sub(/.*:/, "", parts[i]); all += parts[i] + 0 }
                match($0, /"errorDistribution":\{[^}]*\}/)
                errs = substr($0, RSTART + 21, RLENGTH - 22)
                n = split(errs, parts, /,/)
                errors = 0
                for (i = 1; i <= n; i++) {
                    # A request in flight when the run ends is not an error of the contender.
                    if (parts[i] ~ /aborted/) continue
                    sub(/.*:/, "", parts[i]); errors += parts[i] + 0
                }
                printf "%.0f %.0f %.0f %.0f %d %d\n", ok / seconds, \
                    field("latencyPercentiles", "p50") * 1e6, field("latencyPercentiles", "p99") * 1e6, \
                    field("latencyPercentiles", "p99.9") * 1e6, all - ok, errors
            }'
    else
        # Each connection waits CONNECTIONS/rate between its requests (after the answer).
        local delay_ms
        delay_ms="$(awk -v c="$CONNECTIONS" -v r="$rate" 'BEGIN { printf "%.3f", 1000 * c / r }')"
        out="$(taskset -c "$LOAD_CPU" wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "${seconds}s" \
            --timeout 5s -s "$here/workload.lua" "http://127.0.0.1:$port" \
            -- "$workload" "o$RANDOM" "$DUP_CODES" "$delay_ms" 2>&1)" || fail "wrk failed: $out"
        printf '%s\n' "$out" | sed -n 's/^RESULT //p' | awk '{ printf "%.0f %d %d %d %d %d\n", $1 / ($2 / 1e6), $5, $6, $7, $3, $4 }'
    fi
}

# A value of wxgate's /metrics, summed over the series whose labels contain `match`.
wxgate_metric() {
    local name="$1" match="$2"
    curl -sf "http://127.0.0.1:$admin_port/metrics" |
        awk -v name="$name" -v match_="$match" \
            '(index($0, name "{") == 1 || index($0, name " ") == 1) && index($0, match_) { sum += $NF }
             END { printf "%d", sum }'
}

# --- 4. the upstream --------------------------------------------------------------------------
tick_hz="$(getconf CLK_TCK)"
log "upstream: nginx on CPU $LOAD_CPU, 127.0.0.1:$upstream_port"
# A port found free can be taken before nginx binds it: then another port is tried.
for attempt in 1 2 3; do
    upstream_conf="$(write_upstream_conf)"
    start_on "$LOAD_CPU" nginx -p "$work/upstream" -c "$upstream_conf"
    upstream_pid="$started"
    wait_ready "$upstream_port" "$upstream_pid" && break
    stop "$upstream_pid"
    [ "$attempt" -lt 3 ] || fail "the upstream never answered on 127.0.0.1:$upstream_port (see $work/processes.log)"
    free_port
    upstream_port="$found_port"
done
answer="$(curl -sf -D "$work/headers" "http://127.0.0.1:$upstream_port$(request_path probe)")"
[ "$answer" = "$BODY" ] || fail "the upstream answers $answer"
grep -qi "^content-type: $CONTENT_TYPE" "$work/headers" || fail "the upstream's Content-Type is wrong"
wxgate_conf="$(write_wxgate_conf)"
# wxgate+redis-1ms: Redis and its relay in a network namespace of their own, joined to this
# one by a veth pair (a /30 of 10.79.0.0/16 drawn from the pid, so that two runs do not
# collide), when this is root and namespaces can be made; else both on loopback. Sets
# `distance_host`, `distance_port` and `distance_where`; `redis_ns` runs a command on Redis's
# side.
redis_ns=()
if [ "$with_distance" = 1 ]; then
    distance_host=127.0.0.1
    distance_port="$relay_port"
    distance_where="on loopback"
    if [ "$(id -u)" -eq 0 ] && command -v ip >/dev/null 2>&1 && ip netns add "wxload$$" 2>/dev/null; then
        distance_ns="wxload$$"
        net="10.79.$((($$ >> 6) & 255)).$((($$ & 63) * 4))"
        near="${net%.*}.$((${net##*.} + 1))"
        distance_host="${net%.*}.$((${net##*.} + 2))"
        distance_port=6379
        ip link add "wxl$$" type veth peer name eth0 netns "$distance_ns"
        ip addr add "$near/30" dev "wxl$$"
        ip link set "wxl$$" up
        ip -n "$distance_ns" addr add "$distance_host/30" dev eth0
        ip -n "$distance_ns" link set eth0 up
        ip -n "$distance_ns" link set lo up
        redis_ns=(ip netns exec "$distance_ns")
        distance_where="in network namespace $distance_ns ($distance_host, over a veth pair)"
    fi
    log "wxgate+redis-1ms: Redis $distance_where, behind wxgate-relay ($REDIS_DELAY_MS ms ± $REDIS_JITTER_MS ms each way)"
fi
if [ "$with_redis" = 1 ]; then
    wxgate_cluster_conf="$(write_wxgate_cluster_conf)"
fi
if [ "$with_distance" = 1 ]; then
    wxgate_distance_conf="$(write_wxgate_cluster_conf wxgate+redis-1ms)"
fi

# Starts an empty redis-server (no persistence) on REDIS_CPU for contender `name`, and for
# wxgate+redis-1ms its relay; sets `redis_pid` (and `relay_pid`, else empty).
start_redis() {
    local name="$1" attempt ns_side=() port="$redis_port"
    relay_pid=""
    if [ "$name" = wxgate+redis-1ms ] && [ -n "$distance_ns" ]; then
        # A namespace of its own: its loopback's ports are all free.
        ns_side=("${redis_ns[@]}")
        port=6379
    fi
    for attempt in 1 2 3; do
        rm -rf "$work/redis"
        mkdir -p "$work/redis"
        start_on "$REDIS_CPU" "${ns_side[@]}" redis-server --port "$port" --bind 127.0.0.1 --save "" \
            --appendonly no --protected-mode no --dir "$work/redis" --loglevel warning
        redis_pid="$started"
        for _ in $(seq 1 50); do
            if [ "$("${ns_side[@]}" redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
                break 2
            fi
            kill -0 "$redis_pid" 2>/dev/null || break
            sleep 0.1
        done
        stop "$redis_pid"
        [ "$attempt" -lt 3 ] || fail "redis-server never answered on port $port (see $work/processes.log)"
        [ -z "$distance_ns" ] || [ "$name" != wxgate+redis-1ms ] || continue
        # The port was taken meanwhile: another one, in the configuration too.
        free_port
        redis_port="$found_port"
        port="$redis_port"
        wxgate_cluster_conf="$(write_wxgate_cluster_conf)"
    done
    [ "$name" = wxgate+redis-1ms ] || return 0
    start_on "$REDIS_CPU" "${ns_side[@]}" "$relay_bin" --listen "$distance_host:$distance_port" \
        --to "127.0.0.1:$port" --delay-ms "$REDIS_DELAY_MS" --jitter-ms "$REDIS_JITTER_MS"
    relay_pid="$started"
    for _ in $(seq 1 50); do
        [ "$(redis-cli -h "$distance_host" -p "$distance_port" ping 2>/dev/null)" = PONG ] && return 0
        kill -0 "$relay_pid" 2>/dev/null || break
        sleep 0.1
    done
    fail "Redis never answered through the relay on $distance_host:$distance_port (see $work/processes.log)"
}

# The average round trip of a PING through the relay over one second, in ms.
distance_rtt() {
    redis-cli -h "$distance_host" -p "$distance_port" --latency --raw -i 1 2>/dev/null | awk '{ print $3 }' || true
}

# Starts contender `name`; sets `proxy_pid` (the serving process, for RSS and CPU) and
# `stop_pid` (what to stop), and for wxgate+redis and wxgate+redis-1ms `redis_pid` (and
# `relay_pid`).
start_contender() {
    local name="$1" conf
    case "$name" in
    wxgate)
        # RUST_LOG=warn: no per-request access line (nginx's access_log is off likewise).
        start_on "$PROXY_CPU" env RUST_LOG=warn "$wxgate_bin" --config "$wxgate_conf"
        stop_pid="$started"
        proxy_pid="$started"
        ;;
    wxgate+redis | wxgate+redis-1ms)
        start_redis "$name"
        conf="$wxgate_cluster_conf"
        [ "$name" = wxgate+redis ] || conf="$wxgate_distance_conf"
        start_on "$PROXY_CPU" env RUST_LOG=warn "$wxgate_bin" --config "$conf"
        stop_pid="$started"
        proxy_pid="$started"
        ;;
    nginx | nginx-plain)
        conf="$(write_proxy_conf "$name" "$([ "$name" = nginx ] && echo 1 || echo 0)")"
        start_on "$PROXY_CPU" nginx -p "$work/$name" -c "$conf"
        stop_pid="$started"
        proxy_pid="$(nginx_worker "$started")"
        ;;
    esac
    wait_ready "$proxy_port" "$started" || fail "$name never answered on 127.0.0.1:$proxy_port"
    if with_a_redis "$name"; then
        # Counting in Redis (its first heartbeat answered), not on its own.
        local i
        for i in $(seq 1 50); do
            [ "$(wxgate_metric wxgate_cluster_state 'state="shared"')" = 1 ] && break
            [ "$i" -lt 50 ] || fail "$name never counted in Redis (wxgate_cluster_state)"
            sleep 0.1
        done
    fi
    # Every contender passes the upstream's answer through unchanged.
    local got
    got="$(curl -sf -D "$work/headers" "http://127.0.0.1:$proxy_port$(request_path "probe${name//[^a-z]/}")")"
    [ "$got" = "$BODY" ] || fail "$name answers $got"
    grep -qi "^content-type: $CONTENT_TYPE" "$work/headers" || fail "$name changed the Content-Type"
}

# How busy the machine is before anything is measured: other work on these CPUs makes every
# number below worse, and the p99s most of all.
read -r quiet_busy_before quiet_total_before < <(cpu_jiffies "$PROXY_CPU")
read -r quiet_load_before quiet_load_total_before < <(cpu_jiffies "$LOAD_CPU")
sleep 1
read -r quiet_busy_after quiet_total_after < <(cpu_jiffies "$PROXY_CPU")
read -r quiet_load_after quiet_load_total_after < <(cpu_jiffies "$LOAD_CPU")
idle_busy="CPU$PROXY_CPU $(percent "$((quiet_busy_after - quiet_busy_before))" "$((quiet_total_after - quiet_total_before))"), CPU$LOAD_CPU $(percent "$((quiet_load_after - quiet_load_before))" "$((quiet_load_total_after - quiet_load_total_before))")"

# --- 5. the measurements ------------------------------------------------------------------------
printf '\nwxgate load comparison: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
printf 'machine: %s CPUs, %s\n' "$cpus" "$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
printf 'wrk %s: %d thread, %d connections, %ss per round after a %ss warm-up, %d rounds per cell (median shown); %d duplicate codes\n' \
    "$(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')" "$WRK_THREADS" "$CONNECTIONS" "$DURATION" "$WARMUP" "$ROUNDS" "$DUP_CODES"
printf 'pinning: proxy under test alone on CPU %s; upstream nginx and wrk on CPU %s\n' "$PROXY_CPU" "$LOAD_CPU"
printf 'logging: wxgate RUST_LOG=warn (no access line); every nginx access_log off\n'
printf 'busy before the run (other processes): %s; load average %s\n' "$idle_busy" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n' "$(nginx -v 2>&1)"
printf 'wxgate: %s (%s)\n\n' "$wxgate_bin" "$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$repo" && git diff --quiet HEAD 2>/dev/null || echo '+local changes')"

# Per cell and round: requests/s and the row; then per cell: the median round's.
declare -A round_rps round_row round_p50 round_p99 round_redis round_rtt rps p50 p99 redis_trips rtts
rows=()
proxy_pid=""
stop_pid=""
for round in $(seq 1 "$ROUNDS"); do
for workload in "${WORKLOADS[@]}"; do
    for name in "${CONTENDERS[@]}"; do
        log "round $round/$ROUNDS: $workload / $name"
        if [ "$name" = direct ]; then
            port="$upstream_port"
            proxy_pid=""
        else
            start_contender "$name"
            port="$proxy_port"
        fi
        # The codes' prefix: letters only ("+" would read as a space in the query).
        warmup="$(run_wrk "$port" "$workload" "w${name//[^a-z]/}" "$WARMUP")"
        [ -n "$warmup" ] || fail "no result from the warm-up"
        if [ -n "$proxy_pid" ]; then
            ticks_before="$(cpu_ticks "$proxy_pid")"
        fi
        rtt="-"
        [ "$name" != wxgate+redis-1ms ] || rtt="$(distance_rtt)"
        if with_a_redis "$name"; then
            redis_ops_before="$(wxgate_metric wxgate_redis_duration_seconds_count "")"
            redis_errors_before="$(wxgate_metric wxgate_redis_errors_total "")"
            redis_ticks_before="$(cpu_ticks "$redis_pid")"
        fi
        read -r load_busy_before load_total_before < <(cpu_jiffies "$LOAD_CPU")
        read -r proxy_busy_before proxy_total_before < <(cpu_jiffies "$PROXY_CPU")
        result="$(run_wrk "$port" "$workload" "m${name//[^a-z]/}" "$DURATION")"
        read -r requests duration_us non2xx socket_errors p50_us p99_us _ <<<"$result"
        [ -n "$p99_us" ] || fail "no result from wrk: $result"
        read -r load_busy_after load_total_after < <(cpu_jiffies "$LOAD_CPU")
        read -r proxy_busy_after proxy_total_after < <(cpu_jiffies "$PROXY_CPU")
        rate="$(awk -v r="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')"
        load_cpu="$(percent "$((load_busy_after - load_busy_before))" "$((load_total_after - load_total_before))")"
        proxy_cpu_busy="$(percent "$((proxy_busy_after - proxy_busy_before))" "$((proxy_total_after - proxy_total_before))")"
        rss="-" proxy_cpu="-" notes=""
        if [ -n "$proxy_pid" ]; then
            ticks_after="$(cpu_ticks "$proxy_pid")"
            proxy_cpu="$(awk -v t="$((ticks_after - ticks_before))" -v hz="$tick_hz" -v d="$duration_us" \
                'BEGIN { printf "%.0f%%", 100 * (t / hz) / (d / 1e6) }')"
            rss="$(peak_rss_mib "$proxy_pid")"
        fi
        redis_per_request="-"
        if with_a_redis "$name"; then
            redis_ops="$(($(wxgate_metric wxgate_redis_duration_seconds_count "") - redis_ops_before))"
            redis_errors="$(($(wxgate_metric wxgate_redis_errors_total "") - redis_errors_before))"
            redis_per_request="$(awk -v o="$redis_ops" -v r="$requests" 'BEGIN { printf "%.2f", (r > 0) ? o / r : 0 }')"
            redis_cpu="$(awk -v t="$(($(cpu_ticks "$redis_pid") - redis_ticks_before))" -v hz="$tick_hz" \
                -v d="$duration_us" 'BEGIN { printf "%.0f%%", 100 * (t / hz) / (d / 1e6) }')"
            notes="Redis $redis_per_request trips/req, redis-server CPU $redis_cpu"
            [ "$rtt" = - ] || notes="$notes, RTT ${rtt:-?} ms"
            if [ "$redis_errors" != 0 ] || [ "$(wxgate_metric wxgate_cluster_state 'state="shared"')" != 1 ]; then
                notes="$redis_errors Redis errors, degraded: not a shared-quota measurement! $notes"
            fi
        fi
        case "$name" in
        wxgate | wxgate+redis | wxgate+redis-1ms)
            # What wxgate says it did: anything but forwarded/hit/coalesced would be a
            # local answer counted as a success by wrk (e.g. a local 45011 is HTTP 200).
            other=$(($(wxgate_metric wxgate_requests_total 'outcome="local_limit"') +
                $(wxgate_metric wxgate_requests_total 'outcome="rejected"') +
                $(wxgate_metric wxgate_requests_total 'outcome="upstream_error"')))
            [ "$other" = 0 ] || notes="$other local answers! $notes"
            hits="$(wxgate_metric wxgate_requests_total 'outcome="cache_hit"')"
            coalesced="$(wxgate_metric wxgate_requests_total 'outcome="coalesced"')"
            notes="${notes:+$notes, }hit $hits, coalesced $coalesced"
            ;;
        nginx)
            notes="tmpfs cache $(du -sm "$shm/nginx" | awk '{ print $1 }') MiB (not in RSS)"
            ;;
        esac
        if [ -n "$proxy_pid" ]; then
            # CPU time on the proxy's CPU that the proxy did not use: someone else's work.
            own="${proxy_cpu%\%}"
            if with_a_redis "$name" && [ "$REDIS_CPU" = "$PROXY_CPU" ]; then
                own=$((own + ${redis_cpu%\%})) # the contender's Redis shares the CPU by design
            fi
            foreign="$(awk -v busy="${proxy_cpu_busy%\%}" -v own="$own" 'BEGIN { printf "%d", busy - own }')"
            [ "$foreign" -le 10 ] || notes="other load on CPU$PROXY_CPU: ${foreign}%! $notes"
        fi
        [ "$non2xx" = 0 ] || notes="$non2xx non-2xx! $notes"
        [ "$socket_errors" = 0 ] || notes="$socket_errors socket errors! $notes"
        # The machine's 1-minute load average after the round: other work than this run's.
        notes="${notes:+$notes, }load $(cut -d' ' -f1 /proc/loadavg)"
        [ -z "$stop_pid" ] || [ "$name" = direct ] || stop "$stop_pid"
        stop_pid=""
        if with_a_redis "$name"; then
            stop "$redis_pid"
            [ -z "$relay_pid" ] || stop "$relay_pid"
        fi
        cell="$workload/$name"
        round_rps[$cell/$round]="$rate"
        round_p50[$cell/$round]="$p50_us"
        round_rtt[$cell/$round]="$rtt"
        round_p99[$cell/$round]="$p99_us"
        round_redis[$cell/$round]="$redis_per_request"
        round_row[$cell/$round]="$(printf '%-10s %-16s %8s %8.2f %8.2f %8s %6s %6s %6s  %s' \
            "$workload" "$name" "$rate" "$(awk -v u="$p50_us" 'BEGIN { print u / 1000 }')" \
            "$(awk -v u="$p99_us" 'BEGIN { print u / 1000 }')" "$rss" "$proxy_cpu" \
            "$proxy_cpu_busy" "$load_cpu" "$notes")"
    done
done
done
for workload in "${WORKLOADS[@]}"; do
    for name in "${CONTENDERS[@]}"; do
        cell="$workload/$name"
        # The median round by requests/s (the upper one of two), and every round's rate.
        median="$(for round in $(seq 1 "$ROUNDS"); do echo "${round_rps[$cell/$round]} $round"; done |
            sort -n | awk '{ r[NR] = $2 } END { print r[int(NR / 2) + 1] }')"
        all="$(for round in $(seq 1 "$ROUNDS"); do printf '%s ' "${round_rps[$cell/$round]}"; done)"
        rps[$cell]="${round_rps[$cell/$median]}"
        p50[$cell]="${round_p50[$cell/$median]}"
        p99[$cell]="${round_p99[$cell/$median]}"
        rtts[$cell]="${round_rtt[$cell/$median]}"
        redis_trips[$cell]="${round_redis[$cell/$median]}"
        row="${round_row[$cell/$median]}"
        [ "$ROUNDS" = 1 ] || row="$row  (rounds: ${all% })"
        rows+=("$row")
    done
done
# --- 6. the open loop: every contender offered the same fixed rates --------------------------
declare -A open_rate open_p99 open_kept open_round_p99 open_round_row open_round_kept
open_rows=()
if [ "${#OPEN_RATES[@]}" -gt 0 ]; then
    for workload in "${WORKLOADS[@]}"; do
        for percent in "${OPEN_RATES[@]}"; do
            open_rate[$workload/$percent]="$(awk -v r="${rps[$workload/nginx-plain]}" -v p="$percent" \
                'BEGIN { printf "%.0f", r * p / 100 }')"
        done
    done
    for round in $(seq 1 "$ROUNDS"); do
    for workload in "${WORKLOADS[@]}"; do
        for percent in "${OPEN_RATES[@]}"; do
            rate="${open_rate[$workload/$percent]}"
            for name in "${OPEN_CONTENDERS[@]}"; do
                log "open loop, round $round/$ROUNDS: $workload at $rate req/s ($percent %) / $name"
                if [ "$name" = direct ]; then
                    port="$upstream_port"
                    proxy_pid=""
                else
                    start_contender "$name"
                    port="$proxy_port"
                fi
                warmup="$(run_wrk "$port" "$workload" "w${name//[^a-z]/}" "$WARMUP")"
                [ -n "$warmup" ] || fail "no result from the warm-up"
                [ -z "$proxy_pid" ] || ticks_before="$(cpu_ticks "$proxy_pid")"
                read -r load_busy_before load_total_before < <(cpu_jiffies "$LOAD_CPU")
                read -r proxy_busy_before proxy_total_before < <(cpu_jiffies "$PROXY_CPU")
                result="$(run_open "$port" "$workload" "$rate" "$OPEN_DURATION")"
                read -r achieved p50_us p99_us p999_us non2xx errors <<<"$result"
                [ -n "$errors" ] || fail "no result from the open-loop run: $result"
                read -r load_busy_after load_total_after < <(cpu_jiffies "$LOAD_CPU")
                read -r proxy_busy_after proxy_total_after < <(cpu_jiffies "$PROXY_CPU")
                load_cpu="$(percent "$((load_busy_after - load_busy_before))" "$((load_total_after - load_total_before))")"
                proxy_cpu_busy="$(percent "$((proxy_busy_after - proxy_busy_before))" "$((proxy_total_after - proxy_total_before))")"
                proxy_cpu="-"
                if [ -n "$proxy_pid" ]; then
                    proxy_cpu="$(awk -v t="$(($(cpu_ticks "$proxy_pid") - ticks_before))" -v hz="$tick_hz" \
                        -v d="$OPEN_DURATION" 'BEGIN { printf "%.0f%%", 100 * (t / hz) / d }')"
                fi
                [ -z "$stop_pid" ] || [ "$name" = direct ] || stop "$stop_pid"
                stop_pid=""
                if with_a_redis "$name"; then
                    stop "$redis_pid"
                    [ -z "$relay_pid" ] || stop "$relay_pid"
                fi
                kept="$(awk -v a="$achieved" -v r="$rate" 'BEGIN { print (a >= 0.97 * r) ? "yes" : "no" }')"
                notes=""
                [ "$non2xx" = 0 ] || notes="$non2xx non-2xx! "
                [ "$errors" = 0 ] || notes="$notes$errors errors! "
                [ "${load_cpu%\%}" -lt 95 ] || notes="${notes}load side saturated "
                if [ "$proxy_cpu" != - ]; then
                    # CPU time on the proxy's CPU that the proxy did not use: someone else's.
                    foreign="$(awk -v busy="${proxy_cpu_busy%\%}" -v own="${proxy_cpu%\%}" 'BEGIN { printf "%d", busy - own }')"
                    [ "$foreign" -le 10 ] || notes="${notes}other load on CPU$PROXY_CPU: ${foreign}%!"
                fi
                cell="$workload/$percent/$name"
                open_round_p99[$cell/$round]="$p99_us"
                open_round_kept[$cell/$round]="$kept"
                open_round_row[$cell/$round]="$(printf '%-10s %8s %4s%% %-16s %8s %4s %8.2f %8.2f %9.2f %6s %6s %6s  %s' \
                    "$workload" "$rate" "$percent" "$name" "$achieved" "$kept" \
                    "$(awk -v u="$p50_us" 'BEGIN { print u / 1000 }')" \
                    "$(awk -v u="$p99_us" 'BEGIN { print u / 1000 }')" \
                    "$(awk -v u="$p999_us" 'BEGIN { print u / 1000 }')" \
                    "$proxy_cpu" "$proxy_cpu_busy" "$load_cpu" "$notes")"
            done
        done
    done
    done
    for workload in "${WORKLOADS[@]}"; do
        for percent in "${OPEN_RATES[@]}"; do
            for name in "${OPEN_CONTENDERS[@]}"; do
                cell="$workload/$percent/$name"
                # The round with the median p99 (the upper one of two), and every round's p99.
                median="$(for round in $(seq 1 "$ROUNDS"); do echo "${open_round_p99[$cell/$round]} $round"; done |
                    sort -n | awk '{ r[NR] = $2 } END { print r[int(NR / 2) + 1] }')"
                all="$(for round in $(seq 1 "$ROUNDS"); do
                    awk -v u="${open_round_p99[$cell/$round]}" 'BEGIN { printf "%.2f ", u / 1000 }'
                done)"
                open_p99[$cell]="${open_round_p99[$cell/$median]}"
                # Kept up: in every round.
                open_kept[$cell]=yes
                for round in $(seq 1 "$ROUNDS"); do
                    [ "${open_round_kept[$cell/$round]}" = yes ] || open_kept[$cell]=no
                done
                row="${open_round_row[$cell/$median]}"
                [ "$ROUNDS" = 1 ] || row="$row  (p99s: ${all% })"
                open_rows+=("$row")
            done
        done
    done
fi
stop "$upstream_pid"
printf '\nload average at the end: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"

printf '\n%-10s %-16s %8s %8s %8s %8s %6s %6s %6s  %s\n' \
    workload contender "req/s" "p50 ms" "p99 ms" "RSS MiB" proxy "CPU$PROXY_CPU" "CPU$LOAD_CPU" notes
printf '%s\n' "${rows[@]}"
printf '\nRSS MiB: peak RSS (VmHWM) of the proxy process (nginx: its worker). proxy: the proxy\n'
printf 'process'"'"'s CPU time / wall time; CPU%s, CPU%s: how busy each CPU was (all processes),\n' "$PROXY_CPU" "$LOAD_CPU"
printf 'so CPU%s well above proxy means something else ran there, and CPU%s at 100%% means the\n' "$PROXY_CPU" "$LOAD_CPU"
printf 'load side (wrk + upstream), not the proxy, set the pace. Each row is its cell'"'"'s median\n'
printf 'round by req/s; "rounds" lists the req/s of every round.\n\n'

# The nginx comparison, when wxgate and at least one nginx were measured.
if [ -n "${rps[${WORKLOADS[0]}/wxgate]:-}" ] &&
    { [ -n "${rps[${WORKLOADS[0]}/nginx]:-}" ] || [ -n "${rps[${WORKLOADS[0]}/nginx-plain]:-}" ]; }; then
    printf '%-10s %13s %19s %14s %13s\n' workload "wxgate/nginx" "wxgate/nginx-plain" "p99 wxgate ms" "p99 nginx ms"
    for workload in "${WORKLOADS[@]}"; do
        awk -v w="$workload" -v a="${rps[$workload/wxgate]:-0}" -v n="${rps[$workload/nginx]:-0}" \
            -v p="${rps[$workload/nginx-plain]:-0}" -v pa="${p99[$workload/wxgate]:-0}" \
            -v pn="${p99[$workload/nginx]:-0}" '
            function ratio(x, y) { return (x > 0 && y > 0) ? sprintf("%.2fx", x / y) : "-" }
            function ms(u) { return (u > 0) ? sprintf("%.2f", u / 1000) : "-" }
            BEGIN { printf "%-10s %13s %19s %14s %13s\n", w, ratio(a, n), ratio(a, p), ms(pa), ms(pn) }'
    done
fi

if [ "$with_redis" = 1 ]; then
    printf '\nwxgate+redis: the quota shared through a redis-server on CPU %s (wxgate on CPU %s); Redis\n' "$REDIS_CPU" "$PROXY_CPU"
    printf 'trips/req: Redis operations (wxgate_redis_duration_seconds_count) per request of the round\n'
    printf '%-10s %20s %14s %20s %16s\n' workload "wxgate+redis/wxgate" "p99 wxgate ms" "p99 wxgate+redis ms" "Redis trips/req"
    for workload in "${WORKLOADS[@]}"; do
        awk -v w="$workload" -v a="${rps[$workload/wxgate+redis]:-0}" -v b="${rps[$workload/wxgate]:-0}" \
            -v pa="${p99[$workload/wxgate+redis]:-0}" -v pb="${p99[$workload/wxgate]:-0}" \
            -v trips="${redis_trips[$workload/wxgate+redis]:--}" '
            function ratio(x, y) { return (x > 0 && y > 0) ? sprintf("%.2fx", x / y) : "-" }
            function ms(u) { return (u > 0) ? sprintf("%.2f", u / 1000) : "-" }
            BEGIN { printf "%-10s %20s %14s %20s %16s\n", w, ratio(a, b), ms(pb), ms(pa), trips }'
    done
fi

if [ "$with_distance" = 1 ]; then
    printf '\nwxgate+redis-1ms: Redis %s, on CPU %s with its relay (%s ms ± %s ms each way; wxgate on CPU %s).\n' \
        "$distance_where" "$REDIS_CPU" "$REDIS_DELAY_MS" "$REDIS_JITTER_MS" "$PROXY_CPU"
    printf 'added p50: its p50 minus wxgate'"'"'s; RTT: a PING'"'"'s round trip through the relay (redis-cli\n'
    printf -- '--latency, averaged over one second before the round); trips: Redis operations per request.\n'
    printf '%-10s %18s %11s %17s %11s %8s %8s %13s\n' workload "redis-1ms/wxgate" "p50 wxgate" "p50 redis-1ms" "added p50" trips "RTT ms" "trips x RTT"
    for workload in "${WORKLOADS[@]}"; do
        awk -v w="$workload" -v a="${rps[$workload/wxgate+redis-1ms]:-0}" -v b="${rps[$workload/wxgate]:-0}" \
            -v pa="${p50[$workload/wxgate+redis-1ms]:-0}" -v pb="${p50[$workload/wxgate]:-0}" \
            -v trips="${redis_trips[$workload/wxgate+redis-1ms]:--}" -v rtt="${rtts[$workload/wxgate+redis-1ms]:--}" '
            function ratio(x, y) { return (x > 0 && y > 0) ? sprintf("%.2fx", x / y) : "-" }
            function ms(u) { return (u > 0) ? sprintf("%.2f", u / 1000) : "-" }
            BEGIN {
                added = (pa > 0 && pb > 0) ? sprintf("%.2f", (pa - pb) / 1000) : "-"
                cost = (trips != "-" && rtt != "-" && rtt != "") ? sprintf("%.2f", trips * rtt) : "-"
                printf "%-10s %18s %11s %17s %11s %8s %8s %13s\n", w, ratio(a, b), ms(pb), ms(pa), added, trips, rtt, cost
            }'
    done
fi

if [ "${#OPEN_RATES[@]}" -gt 0 ]; then
    if [ "$open_tool" = oha ]; then
        printf '\nOpen loop: oha %s -q RATE --latency-correction, %d connections, %ss per round after a\n' \
            "$(oha --version 2>/dev/null | awk '{ print $2 }')" "$CONNECTIONS" "$OPEN_DURATION"
        printf '%ss closed-loop warm-up; RATE = %s %% of nginx-plain'"'"'s closed-loop req/s above; latencies\n' \
            "$WARMUP" "${OPEN_RATES[*]}"
        printf 'count from when each request was due. The row of each cell is its round with the median p99.\n'
    else
        printf '\nOpen loop, paced by wrk (oha missing): each connection waits CONNECTIONS/RATE before each\n'
        printf 'request; the rate is approximate and the latencies are NOT corrected for coordinated\n'
        printf 'omission. RATE = %s %% of nginx-plain'"'"'s closed-loop req/s above.\n' "${OPEN_RATES[*]}"
    fi
    printf '\n%-10s %8s %5s %-16s %8s %4s %8s %8s %9s %6s %6s %6s  %s\n' \
        workload rate "" contender achieved kept "p50 ms" "p99 ms" "p99.9 ms" proxy "CPU$PROXY_CPU" "CPU$LOAD_CPU" notes
    printf '%s\n' "${open_rows[@]}"
    printf '\nkept: the achieved rate was at least 97 %% of the offered one in every round. proxy, CPU%s,\n' "$PROXY_CPU"
    printf 'CPU%s: as in the closed-loop table.\n' "$LOAD_CPU"
    if [[ " ${OPEN_CONTENDERS[*]} " == *" wxgate "* ]] && [[ " ${OPEN_CONTENDERS[*]} " == *" nginx-plain "* ]]; then
        printf '\n%-10s %8s %14s %19s %20s %s\n' workload rate "p99 wxgate ms" "p99 nginx-plain ms" "nginx-plain kept up" "wxgate <= nginx-plain"
        for workload in "${WORKLOADS[@]}"; do
            for percent in "${OPEN_RATES[@]}"; do
                awk -v w="$workload" -v r="${open_rate[$workload/$percent]}" \
                    -v a="${open_p99[$workload/$percent/wxgate]}" -v n="${open_p99[$workload/$percent/nginx-plain]}" \
                    -v kept="${open_kept[$workload/$percent/nginx-plain]}" '
                    BEGIN {
                        verdict = (kept != "yes") ? "-" : (a <= n) ? "yes" : "no"
                        printf "%-10s %8s %14.2f %19.2f %20s %s\n", w, r, a / 1000, n / 1000, kept, verdict
                    }'
            done
        done
    fi
fi
