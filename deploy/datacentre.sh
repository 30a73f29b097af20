#!/usr/bin/env bash
# A small data centre on one machine: three wxgate replicas sharing their quota through a Redis
# a millisecond away, a WeChat tens of milliseconds away, nginx in front, and a load; then a
# partition, a Redis failover and the partition healed, each measured and checked.
#
#   sudo bash deploy/datacentre.sh            # ~6 min after the release build
#   sudo bash deploy/datacentre.sh --quick    # ~2 min: shorter phases (what .ci/run runs)
#
# Every host is a network namespace of its own (ip netns), joined by veth pairs:
#
#              client (wrk) ─┐
#                 lb (nginx) ─┤ "lan": one bridge, 10.76.0.0/24
#   replicas r1, r2, r3 ─────┤
#       wechat (stand-in) ───┘   behind a relay: WECHAT_DELAY_MS ± WECHAT_JITTER_MS each way
#   r1, r2, r3 ── a link each (10.77.N.0/30) ── redis: relays (REDIS_DELAY_MS ±
#       REDIS_JITTER_MS each way) on 10.78.0.0/24 in front of redis-server (and, with Sentinel,
#       a replica and three sentinels), which listen on the redis host's loopback only.
#
# There is no netem here (and no iptables): the distance is wxgate-relay, the stand-in crate's
# delaying TCP relay, in the host of the server it fronts, so that every byte between a
# replica and Redis (or WeChat) crosses one; a partition is the Redis end of a replica's link
# taken down (its packets are dropped, as on a cut cable: timeouts, not refusals).
#
# The stand-in does not enforce WeChat's quota unless said (phase 2b): its windows then hold
# what the replicas sent, so each bound below is wxgate's own, unhelped by WeChat's 45011s.
# Phases, each printed as it ends:
#   1. steady: p50/p99 of unique code exchanges and of replays through nginx at a pace under
#      the quota, the Redis round trips per request, then a load far over the quota: every
#      window at most the quota;
#   2. partition: r3 cut off from Redis while all three serve; each window's upstream calls
#      against the quota: (2a) at most per_window + r3's share (per_window / 3), which
#      docs/replicas.md states; (2b) the same with the stand-in enforcing the quota as WeChat
#      does: what WeChat refuses, and that the replicas' 45011 hold keeps it from callers;
#   3. failover, r3 still cut off: with Sentinel support in this wxgate (probed with
#      `wxgate check-config` on a configuration with `cluster.sentinels` and
#      `cluster.sentinel_master`), the Redis primary is killed under load and the sentinels
#      promote its replica; without it, the standalone primary is killed and restarted empty.
#      Every request answered, windows at most per_window + r3's share, how long each replica
#      was degraded;
#   4. healed: r3's link back up; r3 returns to shared counting, and windows hold at most the
#      quota again.
# A replica that meets a Redis error outside a partition (a timeout on a busy host) counts on
# its own for a moment as a cut-off one does: a phase's bound then gets its share too, and
# the output says so.
# It is also a test: it exits 1 when a check fails (a request unanswered or answered other
# than 2xx, a window over its bound, a replica that does not return to shared counting), and
# 77 without running anything when this machine cannot make network namespaces (not root, or
# `ip netns add` refused: a container without CAP_SYS_ADMIN), saying why.
#
# Everything it makes is removed on exit, Ctrl-C included: processes, namespaces (and their
# veths), the temporary directory (KEEP_TMP=1 keeps it: configurations and every log).
#
# Settings (environment): QUOTA (calls per window, default 200), WINDOW (s, 2), BURST (10 % of
# QUOTA), MAX_WAIT_MS (1000), CONNECTIONS (of the load over the quota, 48), REDIS_DELAY_MS
# (1), REDIS_JITTER_MS (0.3), WECHAT_DELAY_MS (15), WECHAT_JITTER_MS (1), REDIS_TIMEOUT_MS
# (the replicas' cluster.timeout_ms, 500: see below), WXGATE_BIN,
# STAND_IN_BIN and RELAY_BIN (use these executables instead of building release ones),
# KEEP_TMP. Needs root, ip (iproute2), redis-server, redis-cli, nginx, wrk, curl, python3;
# installs the Debian packages that are missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

QUOTA="${QUOTA:-200}"
WINDOW="${WINDOW:-2}"
BURST="${BURST:-$(((QUOTA + 9) / 10))}"
MAX_WAIT_MS="${MAX_WAIT_MS:-1000}"
CONNECTIONS="${CONNECTIONS:-48}"
REDIS_DELAY_MS="${REDIS_DELAY_MS:-1}"
REDIS_JITTER_MS="${REDIS_JITTER_MS:-0.3}"
WECHAT_DELAY_MS="${WECHAT_DELAY_MS:-15}"
WECHAT_JITTER_MS="${WECHAT_JITTER_MS:-1}"
# cluster.timeout_ms of the replicas. Not the default 50: on a host as busy as a shared
# 2-core machine running debug builds, Redis operations a few milliseconds away now and then
# take longer than 50 ms, and every such timeout degrades a replica for a moment, which
# costs what a short partition costs (see the phase bounds below). Set it to 50 to see that.
REDIS_TIMEOUT_MS="${REDIS_TIMEOUT_MS:-500}"
REPLICAS=3
# The replica cut off from Redis in phases 2 and 3.
CUT=3
SENTINEL_MASTER=wxgate
APPID=wx00000000000000a1

quick=0
case "${1:-}" in
    "") ;;
    --quick) quick=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) printf 'unknown argument: %s (try --help)\n' "$1" >&2; exit 64 ;;
esac
# Seconds of load per phase (whole windows).
if [ "$quick" = 1 ]; then
    PACED_SECONDS=6 REPLAY_SECONDS=4 OVER_SECONDS=6 PARTITION_SECONDS=8 FAILOVER_SECONDS=12 HEALED_SECONDS=6
else
    PACED_SECONDS=20 REPLAY_SECONDS=12 OVER_SECONDS=16 PARTITION_SECONDS=30 FAILOVER_SECONDS=30 HEALED_SECONDS=20
fi

log() { printf '==> %s\n' "$*" >&2; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    local f
    for f in "${work:-/nonexistent}"/*.log; do
        [ -s "$f" ] || continue
        printf -- '--- last lines of %s\n' "$(basename "$f")" >&2
        tail -n 8 "$f" >&2
    done
    exit 1
}
skip() {
    printf 'SKIPPED: deploy/datacentre.sh: %s\n' "$*" >&2
    exit 77
}
# install_packages, start, stop_all, wait_until.
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

for n in QUOTA WINDOW BURST MAX_WAIT_MS CONNECTIONS REDIS_TIMEOUT_MS; do
    case "${!n}" in '' | *[!0-9]*) fail "$n must be a whole number, not '${!n}'" ;; esac
done
if [ "$QUOTA" -lt 3 ] || [ "$WINDOW" -lt 1 ]; then
    fail "QUOTA must be at least 3 and WINDOW at least 1"
fi
if [ "$BURST" -lt 1 ] || [ "$BURST" -gt "$QUOTA" ]; then
    fail "BURST must be from 1 to QUOTA ($QUOTA)"
fi

# --- 0. can this machine make network namespaces? ----------------------------------------------
PATH="$PATH:/usr/sbin:/sbin"
[ "$(id -u)" -eq 0 ] || skip "needs root to make network namespaces (run it with sudo)"
command -v ip >/dev/null 2>&1 || skip "no ip command (Debian: apt-get install iproute2)"
run="$$"
ns() { printf 'wxdc%s-%s' "$run" "$1"; }
made_ns=()
if ! probe_error="$(ip netns add "$(ns probe)" 2>&1)"; then
    skip "this machine cannot make network namespaces: 'ip netns add' said: $probe_error"
fi
made_ns+=("$(ns probe)")

# --- cleanup: processes in `pids`, namespaces in `made_ns` -------------------------------------
pids=()
work=""
status=1
cleanup() {
    stop_all
    local name
    for name in "${made_ns[@]}"; do
        ip netns del "$name" 2>/dev/null || true
    done
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

# --- 1. tools and binaries ----------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || fail "python3 is needed (it reads the stand-in's windows)"
[ "${#missing[@]}" = 0 ] || install_packages "${missing[@]}"
for tool in redis-server redis-cli nginx wrk curl; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not on PATH"
done
wxgate_bin="${WXGATE_BIN:-}"
stand_in_bin="${STAND_IN_BIN:-}"
relay_bin="${RELAY_BIN:-}"
if [ -z "$wxgate_bin" ] || [ -z "$stand_in_bin" ] || [ -z "$relay_bin" ]; then
    command -v cargo >/dev/null 2>&1 || fail "cargo is needed (or set WXGATE_BIN, STAND_IN_BIN and RELAY_BIN)"
    log "cargo build --release -p wxgate -p wxgate-stand-in"
    built="$(cd "$repo" && cargo build --release -p wxgate -p wxgate-stand-in \
        --message-format=json-render-diagnostics </dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')"
    [ -n "$wxgate_bin" ] || wxgate_bin="$(printf '%s\n' "$built" | grep '/wxgate$' | tail -n 1)"
    [ -n "$stand_in_bin" ] || stand_in_bin="$(printf '%s\n' "$built" | grep '/wxgate-stand-in$' | tail -n 1)"
    [ -n "$relay_bin" ] || relay_bin="$(printf '%s\n' "$built" | grep '/wxgate-relay$' | tail -n 1)"
fi
for bin in "$wxgate_bin" "$stand_in_bin" "$relay_bin"; do
    [ -x "$bin" ] || fail "no executable at '${bin}' (cargo reported none?)"
done

work="$(mktemp -d "${TMPDIR:-/tmp}/wxgate-datacentre.XXXXXX")"
chmod 0711 "$work"
worker_user="user nobody nogroup;"
getent group nogroup >/dev/null 2>&1 || worker_user="user nobody;"

# --- 2. the network -----------------------------------------------------------------------------
LAN_LB=10.76.0.2
LAN_CLIENT=10.76.0.3
LAN_WECHAT=10.76.0.20
lan_replica() { printf '10.76.0.%d' "$((10 + $1))"; }
REDIS_PRIMARY=10.78.0.1
REDIS_REPLICA=10.78.0.2
sentinel_ip() { printf '10.78.0.%d' "$((10 + $1))"; }

in_ns() {
    local host="$1"
    shift
    ip netns exec "$(ns "$host")" "$@"
}
add_host() {
    ip netns add "$(ns "$1")"
    made_ns+=("$(ns "$1")")
    ip -n "$(ns "$1")" link set lo up
}
# A host on the lan bridge, at `addr`.
on_lan() {
    local host="$1" addr="$2"
    ip link add lan netns "$(ns "$host")" type veth peer name "to-$host" netns "$(ns lan)"
    ip -n "$(ns lan)" link set "to-$host" master br0 up
    ip -n "$(ns "$host")" addr add "$addr/24" dev lan
    ip -n "$(ns "$host")" link set lan up
}

log "network namespaces wxdc$run-*: lan, client, lb, wechat, r1..r$REPLICAS, redis"
ip netns del "$(ns probe)"
add_host lan
ip -n "$(ns lan)" link add br0 type bridge
ip -n "$(ns lan)" link set br0 up
for host in client lb wechat redis; do add_host "$host"; done
for i in $(seq 1 "$REPLICAS"); do add_host "r$i"; done
on_lan client "$LAN_CLIENT"
on_lan lb "$LAN_LB"
on_lan wechat "$LAN_WECHAT"
for i in $(seq 1 "$REPLICAS"); do
    on_lan "r$i" "$(lan_replica "$i")"
    # r<i>'s own link to the Redis host: the one a partition cuts.
    ip link add redis netns "$(ns "r$i")" type veth peer name "r$i" netns "$(ns redis)"
    ip -n "$(ns "r$i")" addr add "10.77.$i.2/30" dev redis
    ip -n "$(ns redis)" addr add "10.77.$i.1/30" dev "r$i"
    ip -n "$(ns "r$i")" link set redis up
    ip -n "$(ns redis)" link set "r$i" up
    ip -n "$(ns "r$i")" route add 10.78.0.0/24 via "10.77.$i.1"
done
# The relays' addresses on the Redis host.
for addr in "$REDIS_PRIMARY" "$REDIS_REPLICA" "$(sentinel_ip 1)" "$(sentinel_ip 2)" "$(sentinel_ip 3)"; do
    ip -n "$(ns redis)" addr add "$addr/32" dev lo
done
cut_link() { ip -n "$(ns redis)" link set "r$1" "$2"; }

# --- 3. Redis: a primary (with Sentinel, also a replica and three sentinels), behind relays -------
# A relay in `host` from LISTEN to TARGET, with DELAY ± JITTER each way.
relay() {
    local name="$1" host="$2" listen="$3" target="$4" delay="$5" jitter="$6"
    start "$name" ip netns exec "$(ns "$host")" "$relay_bin" --listen "$listen" --to "$target" \
        --delay-ms "$delay" --jitter-ms "$jitter"
    wait_until 10 "$started" "relay $name on $listen" grep -q '^relaying' "$work/$name.log"
}
redis_relay() { relay "$@" "$REDIS_DELAY_MS" "$REDIS_JITTER_MS"; }
in_redis() { in_ns redis redis-cli "$@"; }

# Sentinel support: does this wxgate accept `cluster.sentinels` and `cluster.sentinel_master`?
secret="$work/cluster-secret"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret"
chmod 0600 "$secret"
cat >"$work/sentinel-probe.toml" <<EOF
[upstream]
base_url = "http://$LAN_WECHAT"

[cluster]
sentinels = ["$(sentinel_ip 1):26379", "$(sentinel_ip 2):26379", "$(sentinel_ip 3):26379"]
sentinel_master = "$SENTINEL_MASTER"
secret_file = "$secret"
EOF
# The same file with a redis_url instead must pass, or the probe itself is wrong.
sed '/^sentinel/d; s/^\[cluster\]$/[cluster]\nredis_url = "redis:\/\/127.0.0.1:6379\/0"/' \
    "$work/sentinel-probe.toml" >"$work/standalone-probe.toml"
control_said="$("$wxgate_bin" check-config --config "$work/standalone-probe.toml" 2>&1)" ||
    fail "wxgate check-config refuses the standalone form of the probe: $control_said"
sentinel=0
if probe_said="$("$wxgate_bin" check-config --config "$work/sentinel-probe.toml" 2>&1)"; then
    sentinel=1
    log "this wxgate accepts cluster.sentinels and cluster.sentinel_master: phase 3 is a Sentinel failover"
else
    log "this wxgate refuses a Sentinel configuration; check-config said:"
    printf '%s\n' "$probe_said" | sed 's/^/    /' >&2
fi

redis_dir="$work/redis"
mkdir -p "$redis_dir/primary" "$redis_dir/replica"
# The primary (port 7001) and the replica (7002) on the Redis host's loopback; each announces
# its relay's address, which every host reaches.
start_primary() {
    start redis-primary ip netns exec "$(ns redis)" redis-server --port 7001 --bind 127.0.0.1 \
        --save "" --appendonly no --protected-mode no --dir "$redis_dir/primary" \
        --replica-announce-ip "$REDIS_PRIMARY" --replica-announce-port 6379 --loglevel notice
    primary_pid="$started"
    wait_until 10 "$primary_pid" "redis-server (primary)" in_redis -p 7001 ping
}
start_primary
redis_relay relay-primary redis "$REDIS_PRIMARY:6379" 127.0.0.1:7001
if [ "$sentinel" = 1 ]; then
    start redis-replica ip netns exec "$(ns redis)" redis-server --port 7002 --bind 127.0.0.1 \
        --save "" --appendonly no --protected-mode no --dir "$redis_dir/replica" \
        --replicaof "$REDIS_PRIMARY" 6379 \
        --replica-announce-ip "$REDIS_REPLICA" --replica-announce-port 6379 --loglevel notice
    wait_until 10 "$started" "redis-server (replica)" in_redis -p 7002 ping
    redis_relay relay-replica redis "$REDIS_REPLICA:6379" 127.0.0.1:7002
    for s in 1 2 3; do
        mkdir -p "$redis_dir/sentinel-$s"
        cat >"$redis_dir/sentinel-$s/sentinel.conf" <<EOF
port $((27000 + s))
bind 127.0.0.1
protected-mode no
dir $redis_dir/sentinel-$s
sentinel announce-ip $(sentinel_ip "$s")
sentinel announce-port 26379
sentinel monitor $SENTINEL_MASTER $REDIS_PRIMARY 6379 2
sentinel down-after-milliseconds $SENTINEL_MASTER 1000
sentinel failover-timeout $SENTINEL_MASTER 10000
sentinel parallel-syncs $SENTINEL_MASTER 1
EOF
        start "sentinel-$s" ip netns exec "$(ns redis)" redis-server \
            "$redis_dir/sentinel-$s/sentinel.conf" --sentinel
        wait_until 10 "$started" "sentinel $s" in_redis -p "$((27000 + s))" ping
        redis_relay "relay-sentinel-$s" redis "$(sentinel_ip "$s"):26379" "127.0.0.1:$((27000 + s))"
    done
    sentinels_ready() {
        local info
        info="$(in_redis -p 27001 sentinel master "$SENTINEL_MASTER" | paste -sd' ')"
        [[ "$info" == *"num-slaves 1 "* ]] && [[ "$info" == *"num-other-sentinels 2 "* ]] &&
            [ "$(in_redis -p 7002 info replication | tr -d '\r' | sed -n 's/^master_link_status://p')" = up ]
    }
    wait_until 30 "$primary_pid" "the sentinels to know the replica and each other" sentinels_ready
    log "Redis: primary $REDIS_PRIMARY:6379, replica $REDIS_REPLICA:6379, sentinels $(sentinel_ip 1)..$(sentinel_ip 3):26379 (master '$SENTINEL_MASTER'), all behind relays"
else
    log "Redis: primary $REDIS_PRIMARY:6379 behind a relay"
fi

# --- 4. WeChat: the stand-in behind its relay ---------------------------------------------------
stats() { in_ns wechat curl -sf --max-time 5 http://127.0.0.1:8081/__stand_in/stats; }
# The stand-in, `enforcing` WeChat's quota (QUOTA per window, 45011 past it) or `open` (no
# quota: its windows then show what the replicas sent, unhelped by WeChat's 45011s, which
# is what their own bound must hold). Restarted when this changes, between loads: the
# replicas' idle connections to it just close.
wechat_pid=""
start_wechat() {
    local quota_args=()
    if [ -n "$wechat_pid" ]; then
        kill -TERM "$wechat_pid" 2>/dev/null || true
        wait "$wechat_pid" 2>/dev/null || true
    fi
    [ "$1" = open ] || quota_args=(--quota-per-window "$QUOTA")
    start stand-in ip netns exec "$(ns wechat)" "$stand_in_bin" --listen 127.0.0.1:8081 \
        --window-secs "$WINDOW" "${quota_args[@]}"
    wechat_pid="$started"
    wait_until 10 "$wechat_pid" "the stand-in" stats
}
start_wechat open
relay relay-wechat wechat "$LAN_WECHAT:80" 127.0.0.1:8081 "$WECHAT_DELAY_MS" "$WECHAT_JITTER_MS"
log "WeChat stand-in behind $LAN_WECHAT:80 (${WINDOW} s windows), $WECHAT_DELAY_MS ms ± $WECHAT_JITTER_MS ms each way"

# --- 5. three replicas --------------------------------------------------------------------------
if [ "$sentinel" = 1 ]; then
    redis_settings="sentinels = [\"$(sentinel_ip 1):26379\", \"$(sentinel_ip 2):26379\", \"$(sentinel_ip 3):26379\"]
sentinel_master = \"$SENTINEL_MASTER\""
else
    redis_settings="redis_url = \"redis://$REDIS_PRIMARY:6379/0\""
fi
replica_pids=()
for i in $(seq 1 "$REPLICAS"); do
    cat >"$work/r$i.toml" <<EOF
[server]
listen = "$(lan_replica "$i"):8080"
admin_listen = "127.0.0.1:9090"
shutdown_grace_ms = 1000

[upstream]
base_url = "http://$LAN_WECHAT"

[quota]
window_secs = $WINDOW
per_window = $QUOTA
burst = $BURST
max_wait_ms = $MAX_WAIT_MS

[cluster]
$redis_settings
key_prefix = "wxgate-dc:"
timeout_ms = $REDIS_TIMEOUT_MS
expected_replicas = $REPLICAS
secret_file = "$secret"
EOF
    start "r$i" ip netns exec "$(ns "r$i")" env RUST_LOG=info,wxgate::access=off \
        "$wxgate_bin" serve --config "$work/r$i.toml"
    replica_pids+=("$started")
done
# A replica that does not answer reads as no metrics at all (every sum 0, state unknown).
replica_metrics() { in_ns "r$1" curl -sf --max-time 3 http://127.0.0.1:9090/metrics || true; }
# The sum of the series of `name` whose labels contain `match` and not `unless`, on replica N.
replica_metric() {
    replica_metrics "$1" | awk -v name="$2" -v match_="${3:-}" -v unless="${4:-}" '
        (index($0, name "{") == 1 || index($0, name " ") == 1) && index($0, match_) &&
            (unless == "" || !index($0, unless)) { sum += $NF }
        END { printf "%d", sum }'
}
state_of() {
    replica_metrics "$1" | awk '
        /^wxgate_cluster_state\{state="shared"\} 1$/ { s = "shared" }
        /^wxgate_cluster_state\{state="degraded"\} 1$/ { s = "degraded" }
        END { print (s == "" ? "unknown" : s) }'
}
together() {
    [ "$(state_of "$1")" = shared ] && [ "$(replica_metric "$1" wxgate_cluster_replicas)" = "$REPLICAS" ]
}
for i in $(seq 1 "$REPLICAS"); do
    wait_until 30 "${replica_pids[i - 1]}" "replica r$i to count in Redis with $REPLICAS replicas" together "$i"
done
log "replicas r1..r$REPLICAS on $(lan_replica 1)..$(lan_replica "$REPLICAS"):8080: shared, $REPLICAS live each"

# --- 6. nginx in front --------------------------------------------------------------------------
mkdir -p "$work/nginx/tmp"
chown nobody "$work/nginx/tmp"
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
    upstream wxgate {
EOF
    for i in $(seq 1 "$REPLICAS"); do printf '        server %s:8080;\n' "$(lan_replica "$i")"; done
    cat <<EOF
        keepalive 64;
    }
    server {
        listen $LAN_LB:80;
        location / {
            proxy_pass http://wxgate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 30s;
        }
    }
}
EOF
} >"$work/nginx/nginx.conf"
start nginx ip netns exec "$(ns lb)" nginx -p "$work/nginx" -c "$work/nginx/nginx.conf"
exchange_url() {
    printf 'http://%s/sns/jscode2session?appid=%s&secret=stand-in-secret-a1&grant_type=authorization_code&js_code=%s' \
        "$LAN_LB" "$APPID" "$1"
}
through_lb() { in_ns client curl -sf --max-time 5 "$(exchange_url "$1")" | grep -q '"openid"'; }
wait_until 10 "$started" "nginx to pass an exchange through from the client host" through_lb warm-up
log "nginx on $LAN_LB:80, round robin over the replicas; the load from $LAN_CLIENT"

# --- 7. what each phase reads -------------------------------------------------------------------
now_ms() { date +%s%3N; }
window_ms=$((WINDOW * 1000))
# Sleeps until the next window boundary at least 300 ms away; its time in `boundary`.
next_boundary() {
    local now
    now="$(now_ms)"
    boundary=$((((now + 300) / window_ms + 1) * window_ms))
    sleep "$(awk -v ms="$((boundary - now))" 'BEGIN { printf "%.3f", ms / 1000 }')"
}
# Runs wrk from the client host: WORKLOAD PREFIX SECONDS CONNECTIONS [DELAY_MS]; prints
# workload.lua's RESULT fields (requests duration_us non2xx socket_errors p50 p99 p99.9).
load() {
    local out
    out="$(in_ns client wrk -t 1 -c "$4" -d "${3}s" --timeout 10s -s "$repo/benches/load/workload.lua" \
        "http://$LAN_LB" -- "$1" "$2" 100 ${5:+"$5"} 2>&1)" || fail "wrk failed: $out"
    printf '%s\n' "$out" | sed -n 's/^RESULT //p'
}
ms() { awk -v u="$1" 'BEGIN { printf "%.1f", u / 1000 }'; }
# Requests, and Redis operations on the request path (every op but the heartbeat's and the
# resume's), summed over the replicas.
counters() {
    local i requests=0 ops=0
    for i in $(seq 1 "$REPLICAS"); do
        requests=$((requests + $(replica_metric "$i" wxgate_requests_total)))
        ops=$((ops + $(replica_metric "$i" wxgate_redis_duration_seconds_count "" 'op="heartbeat"') - \
            $(replica_metric "$i" wxgate_redis_duration_seconds_count 'op="resume"')))
    done
    printf '%s %s' "$requests" "$ops"
}
# Redis operations by op, summed over the replicas: "op count" lines.
redis_ops() {
    local i
    for i in $(seq 1 "$REPLICAS"); do
        replica_metrics "$i" | sed -n 's/^wxgate_redis_duration_seconds_count{op="\([a-z_]*\)"[^}]*} \([0-9]*\)$/\1 \2/p'
    done | awk '{ sum[$1] += $2 } END { for (op in sum) print op, sum[op] }' | sort
}
# The ops of the request path between two `redis_ops` snapshots, per request: "op x.xx, ...".
ops_per_request() {
    awk -v requests="$3" '
        FNR == NR { before[$1] = $2; next }
        $1 != "heartbeat" && $1 != "resume" && $2 > before[$1] {
            printf "%s%s %.2f", sep, $1, ($2 - before[$1]) / requests; sep = ", "
        }' "$1" "$2"
}
# Redis errors of each replica, space-separated.
redis_errors() {
    local i
    for i in $(seq 1 "$REPLICAS"); do printf '%s ' "$(replica_metric "$i" wxgate_redis_errors_total)"; done
}
# The errors since a `redis_errors` snapshot: "r1 +a, r2 +b, ...".
errors_since() {
    local before after i line=""
    read -r -a before <<<"$1"
    read -r -a after <<<"$(redis_errors)"
    for i in $(seq 1 "$REPLICAS"); do
        line+="${line:+, }r$i +$((after[i - 1] - before[i - 1]))"
    done
    printf '%s' "$line"
}
# The bound of a phase's windows, in `phase_bound`, and why, in `bound_why`: per_window, plus
# a share for each replica that counted on its own while others counted in Redis: the
# `cut` replicas cut off (0 or 1), and with `count_errors` 1 any other replica with Redis
# errors since `before` (a timeout degrades a replica as a partition does, and it then admits
# its share in the next window while the others count in Redis without it).
phase_bound() {
    local before after i extra=() cut="$2" count_errors="$3"
    read -r -a before <<<"$1"
    read -r -a after <<<"$(redis_errors)"
    if [ "$count_errors" = 1 ]; then
        for i in $(seq 1 "$REPLICAS"); do
            [ "$cut" = 1 ] && [ "$i" = "$CUT" ] && continue
            [ "${after[i - 1]}" -gt "${before[i - 1]}" ] && extra+=("r$i")
        done
    fi
    phase_bound=$((QUOTA + share * (cut + ${#extra[@]})))
    bound_why="per_window"
    [ "$cut" = 0 ] || bound_why+=" + r$CUT's share (cut off)"
    if [ "${#extra[@]}" -gt 0 ]; then
        bound_why+=" + a share for each of ${extra[*]} (Redis errors: degraded for a moment)"
    fi
}
failures=()
check() {
    local what="$1"
    shift
    if "$@"; then
        printf '  OK: %s\n' "$what"
    else
        printf '  FAILED: %s\n' "$what"
        failures+=("$what")
    fi
}
# Every request of a wrk RESULT answered, and with 2xx (wxgate's own 45011 is a 200 with
# WeChat's body, as WeChat's is).
answered() {
    local requests _ non2xx errors
    read -r requests _ non2xx errors _ <<<"$1"
    [ "$non2xx" = 0 ] && [ "$errors" = 0 ] && [ "$requests" -gt 0 ]
}
load_line() {
    local requests duration non2xx errors p50 p99 _
    read -r requests duration non2xx errors p50 p99 _ <<<"$1"
    printf '%s requests (%s req/s), p50 %s ms, p99 %s ms, %s non-2xx, %s unanswered' "$requests" \
        "$(awk -v r="$requests" -v d="$duration" 'BEGIN { printf "%.0f", r / (d / 1e6) }')" \
        "$(ms "$p50")" "$(ms "$p99")" "$non2xx" "$errors"
}
windows() {
    stats >"$work/stats.json" || fail "the stand-in's stats did not answer"
    python3 "$here/datacentre_windows.py" "$work/stats.json" "$APPID" "$@"
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# Each replica's mode every half second (shared S, degraded D, ? no answer), to the end.
sample_states() {
    local line i
    while :; do
        line="$(now_ms)"
        for i in $(seq 1 "$REPLICAS"); do
            case "$(state_of "$i")" in shared) line+=" S" ;; degraded) line+=" D" ;; *) line+=" ?" ;; esac
        done
        printf '%s\n' "$line" >>"$work/states"
        sleep 0.5
    done
}
sample_states &
pids+=("$!")
# When replica N was degraded between FROM and TO (ms): "degraded +a..+b s (n samples)" or
# "never degraded".
degraded_span() {
    awk -v col="$(($1 + 1))" -v from="$2" -v to="$3" '
        $1 >= from && $1 <= to && $col == "D" { if (!first) first = $1; last = $1; n++ }
        END {
            if (!n) { print "never degraded"; exit }
            printf "degraded from %+.1f s to %+.1f s (seen in %d samples, 0.5 s apart)", (first - from) / 1000, (last - from) / 1000, n
        }' "$work/states"
}
shared_now() { [ "$(state_of "$1")" = shared ]; }

share=$((QUOTA / REPLICAS))
mode_name="$([ "$sentinel" = 1 ] && echo "Sentinel (primary, replica, 3 sentinels)" || echo "one standalone primary")"
printf '\nwxgate data centre: %s replicas, Redis %s, nginx, the stand-in; %s%s\n' "$REPLICAS" \
    "$mode_name" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$([ "$quick" = 1 ] && echo ", --quick")"
printf 'wxgate %s; quota %s per %s s window (burst %s, max_wait_ms %s), expected_replicas %s: a share is %s;\n' \
    "$wxgate_bin" "$QUOTA" "$WINDOW" "$BURST" "$MAX_WAIT_MS" "$REPLICAS" "$share"
printf 'cluster.timeout_ms %s\n' "$REDIS_TIMEOUT_MS"
printf 'Redis %s ms ± %s ms each way from the replicas, WeChat %s ms ± %s ms; load average %s (%s CPUs)\n' \
    "$REDIS_DELAY_MS" "$REDIS_JITTER_MS" "$WECHAT_DELAY_MS" "$WECHAT_JITTER_MS" "$(loadavg)" "$(nproc)"
redis_rtt="$(in_ns r1 redis-cli -h "$REDIS_PRIMARY" -p 6379 --latency --raw -i 2 2>/dev/null | awk '{ print $3 }' || true)"
wechat_rtt="$(for _ in $(seq 1 15); do
    in_ns r1 curl -s -o /dev/null -w '%{time_total}\n' "http://$LAN_WECHAT/__stand_in/stats" || true
done | sort -n | awk '{ t[NR] = $1 } END { printf "%.1f", 1000 * t[int((NR + 1) / 2)] }')"
printf 'measured from r1: Redis PING round trip %s ms on average (redis-cli --latency), WeChat HTTP round trip %s ms (median of 15)\n' \
    "${redis_rtt:-?}" "$wechat_rtt"

# --- phase 1: steady ----------------------------------------------------------------------------
printf '\n== phase 1: steady: all %s replicas shared\n' "$REPLICAS"
# Paced under the quota: 4 connections, each waiting 100 ms between exchanges.
errors_before="$(redis_errors)"
read -r requests_before ops_before <<<"$(counters)"
redis_ops >"$work/ops.before"
unique="$(load unique steady "$PACED_SECONDS" 4 100)"
read -r requests_after ops_after <<<"$(counters)"
redis_ops >"$work/ops.after"
unique_trips="$(awk -v o="$((ops_after - ops_before))" -v r="$((requests_after - requests_before))" \
    'BEGIN { printf "%.2f", (r > 0) ? o / r : 0 }')"
printf 'unique codes, paced (4 connections, 100 ms apart): %s\n' "$(load_line "$unique")"
printf '  Redis round trips per request %s (%s)\n' "$unique_trips" \
    "$(ops_per_request "$work/ops.before" "$work/ops.after" "$((requests_after - requests_before))")"
check "every unique exchange answered with 2xx" answered "$unique"
# Replays: the set of 100 codes exchanged once, then replayed (each replica keeps what it
# found in Redis, so a replay costs a Redis round trip once per replica and code).
prime="$(load duplicate steady 2 4)"
read -r requests_before ops_before <<<"$(counters)"
redis_ops >"$work/ops.before"
replay="$(load duplicate steady "$REPLAY_SECONDS" 4 20)"
read -r requests_after ops_after <<<"$(counters)"
redis_ops >"$work/ops.after"
replay_trips="$(awk -v o="$((ops_after - ops_before))" -v r="$((requests_after - requests_before))" \
    'BEGIN { printf "%.3f", (r > 0) ? o / r : 0 }')"
printf 'replayed codes (100 codes, exchanged once first): %s\n' "$(load_line "$replay")"
printf '  Redis round trips per request %s (%s)\n' "$replay_trips" \
    "$(ops_per_request "$work/ops.before" "$work/ops.after" "$((requests_after - requests_before))")"
check "every first exchange of the replayed codes answered with 2xx" answered "$prime"
check "every replay answered with 2xx" answered "$replay"
# Over the quota: the windows hold at most the quota.
next_boundary
start_ms="$boundary"
over="$(load unique steady-over "$OVER_SECONDS" "$CONNECTIONS")"
printf 'over the quota (%s connections, %s s): %s; load average %s\n' "$CONNECTIONS" "$OVER_SECONDS" \
    "$(load_line "$over")" "$(loadavg)"
check "every request over the quota answered with 2xx" answered "$over"
next_boundary
printf 'Redis errors during the phase: %s\n' "$(errors_since "$errors_before")"
phase_bound "$errors_before" 0 1
check "windows within $bound_why = $phase_bound (WeChat not enforcing its quota)" \
    windows steady "$start_ms" "$boundary" "$QUOTA" "$phase_bound"

# --- phase 2: partition -------------------------------------------------------------------------
printf '\n== phase 2: partition: r%s cut off from Redis, all %s replicas serving\n' "$CUT" "$REPLICAS"
printf -- '-- 2a: WeChat not enforcing its quota: the windows hold what the replicas sent\n'
next_boundary
start_ms="$boundary"
errors_before="$(redis_errors)"
cut_link "$CUT" down
partition_start="$(now_ms)"
over="$(load unique partition "$PARTITION_SECONDS" "$CONNECTIONS")"
printf 'load (%s connections, %s s): %s; load average %s\n' "$CONNECTIONS" "$PARTITION_SECONDS" \
    "$(load_line "$over")" "$(loadavg)"
for i in $(seq 1 "$REPLICAS"); do
    printf '  r%s: %s, %s\n' "$i" "$(state_of "$i")" "$(degraded_span "$i" "$partition_start" "$(now_ms)")"
done
printf '  Redis errors during the phase: %s\n' "$(errors_since "$errors_before")"
check "every request answered with 2xx" answered "$over"
check "r$CUT degraded (it counts on its own)" test "$(state_of "$CUT")" = degraded
for i in $(seq 1 "$REPLICAS"); do
    [ "$i" = "$CUT" ] || check "r$i still shared" shared_now "$i"
done
next_boundary
phase_bound "$errors_before" 1 1
check "windows within $bound_why = $phase_bound" \
    windows partition "$start_ms" "$boundary" "$QUOTA" "$phase_bound" "docs/replicas.md: up to per_window + the cut-off replicas' shares"
printf -- '-- 2b: the same partition, WeChat enforcing its quota (%s per window, 45011 past it)\n' "$QUOTA"
start_wechat enforcing
next_boundary
start_ms="$boundary"
errors_before="$(redis_errors)"
over="$(load unique partition-enforced "$PARTITION_SECONDS" "$CONNECTIONS")"
printf 'load (%s connections, %s s): %s; load average %s\n' "$CONNECTIONS" "$PARTITION_SECONDS" \
    "$(load_line "$over")" "$(loadavg)"
check "every request answered with 2xx (WeChat's 45011s held and retried by the replicas)" answered "$over"
check "r$CUT still degraded" test "$(state_of "$CUT")" = degraded
next_boundary
phase_bound "$errors_before" 1 1
check "windows within $bound_why = $phase_bound, WeChat's refusals included" \
    windows partition-enforced "$start_ms" "$boundary" "$QUOTA" "$phase_bound" "45011: the calls WeChat refused, each held and retried by a replica"
start_wechat open

# --- phase 3: failover --------------------------------------------------------------------------
if [ "$sentinel" = 1 ]; then
    printf '\n== phase 3: the Redis primary fails over (Sentinel), r%s still cut off\n' "$CUT"
else
    printf '\n== phase 3: SKIPPED: this wxgate has no Sentinel support (see check-config above);\n'
    printf '   instead, the standalone Redis primary is killed and restarted empty, r%s still cut off\n' "$CUT"
fi
next_boundary
start_ms="$boundary"
errors_before="$(redis_errors)"
load unique failover "$FAILOVER_SECONDS" "$CONNECTIONS" >"$work/failover.result" &
load_pid=$!
sleep 2
killed_at="$(now_ms)"
kill -KILL "$primary_pid"
wait "$primary_pid" 2>/dev/null || true
if [ "$sentinel" = 1 ]; then
    promoted() {
        [ "$(in_redis -p 27001 sentinel get-master-addr-by-name "$SENTINEL_MASTER" | head -n 1)" = "$REDIS_REPLICA" ]
    }
    wait_until 30 "$load_pid" "the sentinels to promote the replica" promoted
    printf 'primary killed at +%.1f s; the sentinels promoted %s after %.1f s\n' \
        "$(awk -v t="$((killed_at - start_ms))" 'BEGIN { print t / 1000 }')" "$REDIS_REPLICA" \
        "$(awk -v t="$(($(now_ms) - killed_at))" 'BEGIN { print t / 1000 }')"
    # The old primary comes back as a replica of the new one (the sentinels reconfigure it).
    start_primary
else
    sleep 2
    start_primary
    printf 'primary killed at +%.1f s, restarted empty %.1f s later\n' \
        "$(awk -v t="$((killed_at - start_ms))" 'BEGIN { print t / 1000 }')" \
        "$(awk -v t="$(($(now_ms) - killed_at))" 'BEGIN { print t / 1000 }')"
fi
wait "$load_pid" || fail "the load of phase 3 failed"
over="$(cat "$work/failover.result")"
printf 'load (%s connections, %s s): %s; load average %s\n' "$CONNECTIONS" "$FAILOVER_SECONDS" \
    "$(load_line "$over")" "$(loadavg)"
for i in $(seq 1 "$REPLICAS"); do
    [ "$i" = "$CUT" ] && continue
    wait_until 20 "${replica_pids[i - 1]}" "r$i to count in Redis again" shared_now "$i"
    printf '  r%s: %s since the kill\n' "$i" "$(degraded_span "$i" "$killed_at" "$(now_ms)")"
done
printf '  Redis errors during the phase: %s\n' "$(errors_since "$errors_before")"
check "every request answered with 2xx" answered "$over"
next_boundary
# Redis down for both of the others: they degrade and resume together, so only the cut-off
# replica's share is on top (docs/replicas.md: "the shared ones before or the shares after,
# never both").
phase_bound "$errors_before" 1 0
check "windows within $bound_why = $phase_bound" \
    windows failover "$start_ms" "$boundary" "$QUOTA" "$phase_bound" "r$CUT still cut off"

# --- phase 4: healed ----------------------------------------------------------------------------
printf '\n== phase 4: the partition healed: r%s'"'"'s link up again\n' "$CUT"
cut_link "$CUT" up
healed_at="$(now_ms)"
back() { shared_now "$CUT" && [ "$(replica_metric "$CUT" wxgate_cluster_replicas)" = "$REPLICAS" ]; }
deadline=$((SECONDS + 30))
until back; do
    [ "$SECONDS" -lt "$deadline" ] || break
    sleep 0.1
done
if back; then
    printf 'r%s shared again %.1f s after the link came up, counting %s live replicas\n' "$CUT" \
        "$(awk -v t="$(($(now_ms) - healed_at))" 'BEGIN { print t / 1000 }')" "$REPLICAS"
fi
check "r$CUT back to shared counting within 30 s" back
next_boundary
start_ms="$boundary"
errors_before="$(redis_errors)"
over="$(load unique healed "$HEALED_SECONDS" "$CONNECTIONS")"
printf 'load (%s connections, %s s): %s; load average %s\n' "$CONNECTIONS" "$HEALED_SECONDS" \
    "$(load_line "$over")" "$(loadavg)"
check "every request answered with 2xx" answered "$over"
next_boundary
printf 'Redis errors during the phase: %s\n' "$(errors_since "$errors_before")"
phase_bound "$errors_before" 0 1
check "windows within $bound_why = $phase_bound" windows healed "$start_ms" "$boundary" "$QUOTA" "$phase_bound"

# --- verdict ------------------------------------------------------------------------------------
printf '\nper replica (its /metrics at the end):\n'
printf '  %-8s %9s %10s %10s %12s %12s %13s\n' replica requests forwarded "cache hit" "local 45011" "Redis ops" "Redis errors"
for i in $(seq 1 "$REPLICAS"); do
    printf '  %-8s %9s %10s %10s %12s %12s %13s\n' "r$i" \
        "$(replica_metric "$i" wxgate_requests_total)" \
        "$(replica_metric "$i" wxgate_requests_total 'outcome="forwarded"')" \
        "$(replica_metric "$i" wxgate_requests_total 'outcome="cache_hit"')" \
        "$(replica_metric "$i" wxgate_requests_total 'outcome="local_limit"')" \
        "$(replica_metric "$i" wxgate_redis_duration_seconds_count)" \
        "$(replica_metric "$i" wxgate_redis_errors_total)"
done
if [ "${#failures[@]}" -gt 0 ]; then
    printf '\nFAILED: %s check(s):\n' "${#failures[@]}"
    printf '  - %s\n' "${failures[@]}"
    status=1
    exit 1
fi
printf '\nOK: every check passed%s\n' "$([ "$sentinel" = 1 ] || echo " (phase 3 without Sentinel: see above)")"
status=0
