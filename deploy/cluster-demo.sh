#!/usr/bin/env bash
# Three wxgate replicas sharing one minute quota through one Redis, on one machine.
#
#   bash deploy/cluster-demo.sh                  # ~20 s after the release build
#   bash deploy/cluster-demo.sh --keep-running   # ... then leaves everything up until Ctrl-C
#
# Starts, all on 127.0.0.1 and on free ports below the ephemeral range:
#   - redis-server, without persistence, in a temporary directory;
#   - the WeChat stand-in (the wxgate-stand-in binary) enforcing a quota of QUOTA calls per
#     (appid, API) and WINDOW-second window, as WeChat does per minute, and answering after
#     LATENCY_MS;
#   - three wxgate replicas (release build) with the same quota and a [cluster] section on that
#     Redis, so that they count quota turns together;
#   - nginx as the load balancer in front of them (round robin, keep-alive connections to the
#     replicas);
# waits until every replica counts in Redis and knows the other two, then drives LOAD_SECONDS
# of code exchanges with fresh codes through nginx (wrk, CONNECTIONS connections: far more
# than the quota allows), and prints the calls the stand-in received in each quota window
# against the quota, what the replicas answered, and a verdict: no window over the quota, no
# 45011 from WeChat, and the share of the quota used in the windows fully under load. Exits 1
# when a window held more than the quota or WeChat answered 45011.
#
# Everything it starts is stopped on exit (Ctrl-C included), and its temporary directory
# removed (KEEP_TMP=1 keeps it: configurations and every process's log).
#
# Settings (environment): QUOTA (calls per window, default 40), WINDOW (seconds, 2), BURST
# (default 10 % of QUOTA), LOAD_SECONDS (12), CONNECTIONS (32), LATENCY_MS (20),
# MAX_WAIT_MS (longest wait for a quota turn before wxgate's own 45011, 1000),
# WXGATE_BIN and STAND_IN_BIN (use these executables instead of building them), KEEP_TMP.
# Needs redis-server, redis-cli, nginx, wrk, curl and python3; installs all but python3 with
# apt-get when missing (as root, or with sudo).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

QUOTA="${QUOTA:-40}"
WINDOW="${WINDOW:-2}"
BURST="${BURST:-$(((QUOTA + 9) / 10))}"
LOAD_SECONDS="${LOAD_SECONDS:-12}"
CONNECTIONS="${CONNECTIONS:-32}"
LATENCY_MS="${LATENCY_MS:-20}"
MAX_WAIT_MS="${MAX_WAIT_MS:-1000}"
REPLICAS=3

keep_running=0
case "${1:-}" in
    "") ;;
    --keep-running) keep_running=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) printf 'unknown argument: %s (try --help)\n' "$1" >&2; exit 64 ;;
esac

log() { printf '==> %s\n' "$*" >&2; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    local f
    for f in "${work:-/nonexistent}"/*.log; do
        [ -s "$f" ] || continue
        printf -- '--- last lines of %s\n' "$(basename "$f")" >&2
        tail -n 15 "$f" >&2
    done
    exit 1
}
# install_packages, free_port, start, wait_until.
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

for n in QUOTA WINDOW BURST LOAD_SECONDS CONNECTIONS LATENCY_MS MAX_WAIT_MS; do
    case "${!n}" in
        '' | *[!0-9]*) fail "$n must be a whole number, not '${!n}'" ;;
    esac
done
if [ "$QUOTA" -lt 1 ] || [ "$WINDOW" -lt 1 ]; then
    fail "QUOTA and WINDOW must be at least 1"
fi
if [ "$BURST" -lt 1 ] || [ "$BURST" -gt "$QUOTA" ]; then
    fail "BURST must be from 1 to QUOTA ($QUOTA)"
fi

# --- cleanup: everything started is in `pids` -----------------------------------------------
pids=()
work=""
status=1
cleanup() {
    stop_all
    if [ -n "$work" ]; then
        if [ "${KEEP_TMP:-0}" = 1 ] || [ "$status" -ne 0 ]; then
            printf 'logs and configurations kept in %s\n' "$work" >&2
        else
            rm -rf "$work"
        fi
    fi
    install_packages_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. tools -----------------------------------------------------------------------------------
PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || fail "python3 is needed (it reads the stand-in's stats and prints the table)"
[ "${#missing[@]}" = 0 ] || install_packages "${missing[@]}"
for tool in redis-server redis-cli nginx wrk curl; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not on PATH"
done

# --- 2. the binaries ----------------------------------------------------------------------------
wxgate_bin="${WXGATE_BIN:-}"
stand_in_bin="${STAND_IN_BIN:-}"
if [ -z "$wxgate_bin" ] || [ -z "$stand_in_bin" ]; then
    command -v cargo >/dev/null 2>&1 || fail "cargo is needed to build wxgate (or set WXGATE_BIN and STAND_IN_BIN)"
    log "cargo build --release (wxgate and wxgate-stand-in)"
    built="$(cd "$repo" && cargo build --release -p wxgate -p wxgate-stand-in \
        --bin wxgate --bin wxgate-stand-in --message-format=json-render-diagnostics </dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')"
    [ -n "$wxgate_bin" ] || wxgate_bin="$(printf '%s\n' "$built" | grep '/wxgate$' | tail -n 1)"
    [ -n "$stand_in_bin" ] || stand_in_bin="$(printf '%s\n' "$built" | grep '/wxgate-stand-in$' | tail -n 1)"
fi
[ -x "$wxgate_bin" ] || fail "no wxgate executable (${wxgate_bin:-cargo reported none})"
[ -x "$stand_in_bin" ] || fail "no wxgate-stand-in executable (${stand_in_bin:-cargo reported none})"

# --- 3. scratch space and ports ---------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/wxgate-cluster-demo.XXXXXX")"
# nginx workers run as nobody when nginx is started as root: they must reach their temp paths.
worker_user=""
if [ "$(id -u)" -eq 0 ]; then
    worker_user="user nobody nogroup;"
    getent group nogroup >/dev/null 2>&1 || worker_user="user nobody;"
    chmod 0711 "$work"
fi

# A value of one replica's /metrics: the sum over the series of `name` whose labels contain
# `match` (empty: all).
replica_metric() {
    local admin="$1" name="$2" match="${3:-}"
    curl -sf --max-time 5 "http://$admin/metrics" |
        awk -v name="$name" -v match_="$match" '
            (index($0, name "{") == 1 || index($0, name " ") == 1) && index($0, match_) { sum += $NF }
            END { printf "%d", sum }'
}

now_ms() { date +%s%3N; }

# --- 4. Redis -----------------------------------------------------------------------------------
free_port
redis_port="$found_port"
mkdir -p "$work/redis"
start redis redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no --dir "$work/redis" --loglevel warning
redis_pid="$started"
redis_ping() { [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping)" = PONG ]; }
wait_until 10 "$redis_pid" "redis-server on 127.0.0.1:$redis_port" redis_ping
log "redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$redis_port (no persistence)"

# --- 5. the WeChat stand-in ---------------------------------------------------------------------
free_port
stand_in_port="$found_port"
start stand-in "$stand_in_bin" --listen "127.0.0.1:$stand_in_port" \
    --quota-per-window "$QUOTA" --window-secs "$WINDOW" --latency-ms "$LATENCY_MS"
stand_in_pid="$started"
stats_url="http://127.0.0.1:$stand_in_port/__stand_in/stats"
wait_until 10 "$stand_in_pid" "the stand-in on 127.0.0.1:$stand_in_port" curl -sf "$stats_url"
log "stand-in for api.weixin.qq.com on 127.0.0.1:$stand_in_port: quota $QUOTA per (appid, API) and ${WINDOW} s window, latency ${LATENCY_MS} ms"

# --- 6. three wxgate replicas -------------------------------------------------------------------
# The secret the replicas share (at least 32 bytes): fingerprints of the Redis keys.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/cluster-secret"
chmod 0600 "$work/cluster-secret"
listen=()
admin=()
replica_pids=()
for i in $(seq 1 "$REPLICAS"); do
    free_port
    listen+=("127.0.0.1:$found_port")
    free_port
    admin+=("127.0.0.1:$found_port")
    cat >"$work/replica-$i.toml" <<EOF
[server]
listen = "${listen[i - 1]}"
admin_listen = "${admin[i - 1]}"
shutdown_grace_ms = 1000

[upstream]
base_url = "http://127.0.0.1:$stand_in_port"

[quota]
# The stand-in's quota: the replicas together must never send more in a window.
window_secs = $WINDOW
per_window = $QUOTA
burst = $BURST
max_wait_ms = $MAX_WAIT_MS

[cluster]
redis_url = "redis://127.0.0.1:$redis_port/0"
key_prefix = "wxgate-demo:"
timeout_ms = 50
secret_file = "$work/cluster-secret"
EOF
    # No access line per request (wrk sends thousands); mode changes are logged at info.
    start "replica-$i" env RUST_LOG=info,wxgate::access=off "$wxgate_bin" serve --config "$work/replica-$i.toml"
    replica_pids+=("$started")
done
ready() { curl -sf --max-time 2 "http://$1/readyz"; }
# Shared (counting in Redis) and knowing every replica: the heartbeat runs every second.
together() {
    [ "$(replica_metric "$1" wxgate_cluster_state 'state="shared"')" = 1 ] &&
        [ "$(replica_metric "$1" wxgate_cluster_replicas)" = "$REPLICAS" ]
}
for i in $(seq 1 "$REPLICAS"); do
    a="${admin[i - 1]}"
    wait_until 30 "${replica_pids[i - 1]}" "replica $i to be ready (http://$a/readyz)" ready "$a"
done
for i in $(seq 1 "$REPLICAS"); do
    a="${admin[i - 1]}"
    wait_until 20 "${replica_pids[i - 1]}" "replica $i to count in Redis with $REPLICAS replicas" together "$a"
done
log "$REPLICAS wxgate replicas on ${listen[*]} (admin ${admin[*]}): shared mode, $REPLICAS live replicas each"

# --- 7. nginx in front ------------------------------------------------------------------------
free_port
lb_port="$found_port"
mkdir -p "$work/nginx/tmp"
[ -z "$worker_user" ] || chown nobody "$work/nginx/tmp"
{
    cat <<EOF
$worker_user
worker_processes 1;
daemon off;
master_process on;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/nginx/tmp/body;
    proxy_temp_path $work/nginx/tmp/proxy;
    fastcgi_temp_path $work/nginx/tmp/fastcgi;
    uwsgi_temp_path $work/nginx/tmp/uwsgi;
    scgi_temp_path $work/nginx/tmp/scgi;
    # Round robin (nginx's default) over the replicas, with idle keep-alive connections kept
    # open to them (HTTP/1.1, no "Connection: close").
    upstream wxgate {
EOF
    for l in "${listen[@]}"; do
        printf '        server %s;\n' "$l"
    done
    cat <<EOF
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$lb_port;
        location / {
            proxy_pass http://wxgate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$work/nginx/nginx.conf"
start nginx nginx -p "$work/nginx" -c "$work/nginx/nginx.conf"
nginx_pid="$started"
appid=wx00000000000000a1
exchange_path() {
    printf '/sns/jscode2session?appid=%s&secret=stand-in-secret-a1&grant_type=authorization_code&js_code=%s' "$appid" "$1"
}
through_nginx() { curl -sf --max-time 5 "http://127.0.0.1:$lb_port$(exchange_path "$1")" | grep -q '"openid"'; }
wait_until 10 "$nginx_pid" "nginx on 127.0.0.1:$lb_port to pass an exchange through" through_nginx "warm-up"
log "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') on 127.0.0.1:$lb_port, round robin over the replicas"

# --- 8. the load ------------------------------------------------------------------------------
# Start at a window boundary, so that every window but the last is either idle or fully under
# load.
window_ms=$((WINDOW * 1000))
now="$(now_ms)"
load_start=$(((now / window_ms + 1) * window_ms))
log "load: wrk, $CONNECTIONS connections for ${LOAD_SECONDS} s, a fresh code per request, through nginx"
sleep "$(awk -v ms="$((load_start - now))" 'BEGIN { printf "%.3f", ms / 1000 }')"
wrk_out="$(wrk -t 1 -c "$CONNECTIONS" -d "${LOAD_SECONDS}s" --timeout 10s \
    -s "$repo/benches/load/workload.lua" "http://127.0.0.1:$lb_port" -- unique "demo" 100 2>&1)" ||
    fail "wrk failed: $wrk_out"
load_end="$(now_ms)"
read -r wrk_requests _ wrk_non2xx wrk_errors wrk_p50 wrk_p99 <<<"$(printf '%s\n' "$wrk_out" | sed -n 's/^RESULT //p')"
[ -n "${wrk_p99:-}" ] || fail "no result from wrk: $wrk_out"
# Calls still held or in flight finish (or give up) within the longest wait.
sleep "$(awk -v ms="$MAX_WAIT_MS" -v l="$LATENCY_MS" 'BEGIN { printf "%.3f", (ms + l + 200) / 1000 }')"

# --- 9. what happened -------------------------------------------------------------------------
curl -sf --max-time 5 "$stats_url" >"$work/stats.json" || fail "the stand-in's stats did not answer"
replica_rows=""
for i in $(seq 1 "$REPLICAS"); do
    a="${admin[i - 1]}"
    replica_rows+="$(printf '%s %s %s %s %s %s %s %s' "$i" \
        "$(replica_metric "$a" wxgate_requests_total)" \
        "$(replica_metric "$a" wxgate_requests_total 'outcome="forwarded"')" \
        "$(replica_metric "$a" wxgate_requests_total 'outcome="local_limit"')" \
        "$(replica_metric "$a" wxgate_redis_duration_seconds_count 'op="quota"')" \
        "$(replica_metric "$a" wxgate_redis_errors_total)" \
        "$(replica_metric "$a" wxgate_cluster_state 'state="shared"')" \
        "$(replica_metric "$a" wxgate_cluster_replicas)")"$'\n'
done

printf '\nwxgate cluster demo: %s replicas, one Redis, nginx in front; %s\n' "$REPLICAS" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
printf 'quota: %s calls per (appid, API) and %s s window at the stand-in and in every replica (burst %s)\n' "$QUOTA" "$WINDOW" "$BURST"
printf 'load: wrk, %s connections, %s s: %s requests, p50 %s ms, p99 %s ms, %s non-2xx, %s socket errors\n' \
    "$CONNECTIONS" "$LOAD_SECONDS" "$wrk_requests" \
    "$(awk -v u="$wrk_p50" 'BEGIN { printf "%.0f", u / 1000 }')" \
    "$(awk -v u="$wrk_p99" 'BEGIN { printf "%.0f", u / 1000 }')" "$wrk_non2xx" "$wrk_errors"

verdict=0
python3 - "$work/stats.json" "$load_start" "$load_end" "$QUOTA" "$BURST" "$appid" "$replica_rows" <<'EOF' || verdict=$?
import json
import sys

stats_path, load_start, load_end, quota, burst, appid, replica_rows = sys.argv[1:]
load_start, load_end, quota, burst = int(load_start), int(load_end), int(quota), int(burst)
stats = json.load(open(stats_path))
window = stats["window_ms"]
windows = [w for w in stats["windows"] if w["appid"] == appid and w["path"] == "/sns/jscode2session"]
others = [w for w in stats["windows"] if w not in windows]

print("\nupstream calls per quota window (what the stand-in, standing in for WeChat, received):")
print("%-16s %9s %6s %6s %6s  %s" % ("window", "calls", "quota", "used", "45011", ""))
busy = []
for w in windows:
    start = w["start_unix_ms"]
    under_load = start >= load_start and start + window <= load_end
    if under_load:
        busy.append(w)
    note = "under load" if under_load else ("partly under load" if start < load_end and start + window > load_start else "")
    if w["calls"] > quota:
        note = "OVER THE QUOTA " + note
    span = "%+6.1f..%+.1f s" % ((start - load_start) / 1000, (start + window - load_start) / 1000)
    print("%-16s %9d %6d %5.0f%% %6d  %s" % (span, w["calls"], quota, 100 * w["calls"] / quota, w["answered_45011"], note))

print("\nper replica (from its /metrics; requests include the warm-up):")
print("%-8s %9s %10s %12s %12s %12s %7s %9s" % ("replica", "requests", "forwarded", "local 45011", "Redis quota", "Redis errors", "mode", "replicas"))
for row in replica_rows.strip().splitlines():
    i, requests, forwarded, local, quota_ops, errors, shared, replicas = row.split()
    print("%-8s %9s %10s %12s %12s %12s %7s %9s" % (i, requests, forwarded, local, quota_ops, errors,
                                                    "shared" if shared == "1" else "degraded", replicas))

over = [w for w in windows if w["calls"] > quota]
refused = sum(w["answered_45011"] for w in stats["windows"])
most = max((w["calls"] for w in windows), default=0)
print("\nverdict:")
print("  %s: the most calls in one window was %d, the quota %d" % (
    "OK" if not over else "FAILED", most, quota))
print("  %s: WeChat (the stand-in) answered 45011 %d times" % ("OK" if refused == 0 else "FAILED", refused))
if busy:
    used = sum(w["calls"] for w in busy) / (len(busy) * quota)
    # GCRA with burst b over a window admits per_window - b + 1 under sustained overload.
    bound = (quota - burst + 1) / quota
    print("  the %d windows fully under load used %.0f%% of the quota (%s calls);"
          % (len(busy), 100 * used, "+".join(str(w["calls"]) for w in busy)))
    print("  one wxgate admits %d of %d a window under sustained overload with burst %d (%.0f%%),"
          % (quota - burst + 1, quota, burst, 100 * bound))
    print("  and the burst on top in the first")
else:
    print("  no window was fully under load: raise LOAD_SECONDS")
for w in others:
    print("  other calls: %d to %s for %s" % (w["calls"], w["path"], w["appid"]))
sys.exit(1 if over or refused else 0)
EOF

if [ "$keep_running" = 1 ]; then
    printf '\nStill running (Ctrl-C stops everything):\n'
    printf '  through nginx:   curl "http://127.0.0.1:%s%s"\n' "$lb_port" "$(exchange_path "my-code-1")"
    for i in $(seq 1 "$REPLICAS"); do
        printf '  replica %s:       proxy http://%s, metrics http://%s/metrics\n' "$i" "${listen[i - 1]}" "${admin[i - 1]}"
    done
    printf '  stand-in stats:  curl %s\n' "$stats_url"
    printf '  redis:           redis-cli -p %s --scan --pattern "wxgate-demo:*"\n' "$redis_port"
    printf '  logs:            %s (removed on exit unless KEEP_TMP=1)\n' "$work"
    status="$verdict"
    while kill -0 "$nginx_pid" 2>/dev/null; do
        sleep 1
    done
    fail "nginx stopped"
fi
status="$verdict"
# The script's exit status: 1 when the verdict failed.
[ "$verdict" -eq 0 ]
