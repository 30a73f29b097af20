#!/usr/bin/env bash
# End-to-end check of the dashboard and alerts against a real Prometheus:
#
#   1. builds wxgate (cargo build --release) and starts
#        target/release/wxgate demo --keep-running \
#            --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19090
#      (an in-process WeChat stand-in plus wxgate, ~20 s of load, then idle);
#   2. starts a Prometheus server on loopback (free port, temporary data dir,
#      scrape and rule evaluation every 1 s) scraping the admin listener and
#      loading prometheus/alerts.yml;
#   3. waits until the demo's load has run (client request rate seen above 0,
#      then back at 0);
#   4. runs every PromQL expression of grafana/wxgate-dashboard.json as a range
#      query over the run ($__rate_interval -> 15s, $__range -> the run's
#      length, template variables -> .*) and fails listing every expression
#      that returned no data (no series, or only NaN); expressions on metrics
#      the target does not expose at all (the cluster row: the demo runs one
#      wxgate without [cluster]; --fake serves them) are listed as skipped;
#      checks that every alert rule evaluates without error.
# Everything it started is stopped on exit.
#
# Usage:
#   deploy/e2e-prometheus.sh                 build wxgate and run its demo
#   deploy/e2e-prometheus.sh --fake          no cargo: deploy/testdata/fake_wxgate.py
#                                            serves a sample /metrics instead
#   WXGATE_ADMIN=127.0.0.1:PORT deploy/e2e-prometheus.sh
#                                            use an already-running wxgate (or fake)
#                                            admin listener; no build, no demo
# Environment:
#   WXGATE_ADMIN            see above
#   WXGATE_BIN              binary run as the demo (default target/release/wxgate;
#                           setting it skips the cargo build)
#   WXGATE_DEMO_LISTEN      default 127.0.0.1:18080
#   WXGATE_DEMO_ADMIN       default 127.0.0.1:19090
#   WXGATE_LOAD_TIMEOUT     max seconds to wait for the demo's load to end (default 120)
#   WXGATE_LOAD_SECONDS     with WXGATE_ADMIN / --fake: seconds of scraping before
#                           querying (default 10)
#   WXGATE_E2E_ALLOW_EMPTY  regex of panel titles allowed to have no data (default none)
#   WXGATE_E2E_KEEP=1       keep the temporary directory (logs, TSDB)
#   PROMETHEUS              Prometheus server binary (default: prometheus on PATH;
#                           Debian's package is installed when missing)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

log() { printf '==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
# stop_all.
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

mode=demo
case "${1:-}" in
    "") ;;
    --fake) mode=fake ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown argument: $1 (try --help)" ;;
esac
if [ -n "${WXGATE_ADMIN:-}" ]; then
    mode=external
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/wxgate-e2e.XXXXXX")"
pids=()
status=1

cleanup() {
    stop_all
    if [ "$status" -ne 0 ]; then
        for f in "$tmp"/*.log; do
            [ -s "$f" ] || continue
            printf -- '--- last lines of %s\n' "$(basename "$f")" >&2
            tail -n 30 "$f" >&2
        done
    fi
    if [ "${WXGATE_E2E_KEEP:-0}" = 1 ]; then
        echo "kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers --------------------------------------------------------------

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.5 s.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
        sleep 0.5
    done
}

# alive PID NAME: fail if a process we started is gone.
alive() {
    kill -0 "$1" 2>/dev/null || fail "$2 exited early (see its log below)"
}

# prom_scalar EXPR: first value of an instant query, or "none".
prom_scalar() {
    curl -fsS --max-time 10 "$prom/api/v1/query" --data-urlencode "query=$1" |
        python3 -c 'import json, sys
r = json.load(sys.stdin)["data"]["result"]
print(r[0]["value"][1] if r else "none")'
}

# --- the target -------------------------------------------------------------

command -v curl >/dev/null 2>&1 || fail "curl is needed"
command -v python3 >/dev/null 2>&1 || fail "python3 is needed"

target_pid=""
case "$mode" in
    external)
        admin="$WXGATE_ADMIN"
        log "using the running admin listener at $admin"
        ;;
    fake)
        admin="127.0.0.1:$(free_port)"
        log "starting the fake wxgate admin listener at $admin"
        python3 "$here/testdata/fake_wxgate.py" --admin-listen "$admin" \
            >"$tmp/fake.log" 2>&1 </dev/null &
        target_pid=$!
        pids+=("$target_pid")
        ;;
    demo)
        admin="${WXGATE_DEMO_ADMIN:-127.0.0.1:19090}"
        listen="${WXGATE_DEMO_LISTEN:-127.0.0.1:18080}"
        bin="${WXGATE_BIN:-}"
        if [ -z "$bin" ]; then
            command -v cargo >/dev/null 2>&1 || fail "cargo is needed to build wxgate"
            log "cargo build --release"
            (cd "$repo" && cargo build --release) </dev/null
            bin="$repo/target/release/wxgate"
        fi
        [ -x "$bin" ] || fail "$bin is not executable"
        if curl -fsS --max-time 2 "http://$admin/metrics" >/dev/null 2>&1; then
            fail "something already answers on $admin: stop it or set WXGATE_DEMO_ADMIN"
        fi
        log "starting $bin demo --keep-running --listen $listen --admin-listen $admin"
        "$bin" demo --keep-running --listen "$listen" --admin-listen "$admin" \
            >"$tmp/demo.log" 2>&1 </dev/null &
        target_pid=$!
        pids+=("$target_pid")
        ;;
esac

target_answers() {
    [ -z "$target_pid" ] || alive "$target_pid" "the wxgate target"
    curl -fsS --max-time 2 "http://$admin/metrics" >/dev/null 2>&1
}
deadline=$((SECONDS + 60))
until target_answers; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for http://$admin/metrics"
    sleep 0.5
done
log "http://$admin/metrics answers"

# --- Prometheus -------------------------------------------------------------

if [ -z "${PROMETHEUS:-}" ]; then
    command -v prometheus >/dev/null 2>&1 || bash "$here/install-prometheus.sh"
    PROMETHEUS="$(command -v prometheus)"
fi
port="$(free_port)"
prom="http://127.0.0.1:$port"
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $here/prometheus/alerts.yml
scrape_configs:
  - job_name: wxgate
    metrics_path: /metrics
    static_configs:
      - targets: ["$admin"]
EOF
log "starting $("$PROMETHEUS" --version 2>&1 | head -n1) on 127.0.0.1:$port"
"$PROMETHEUS" --config.file="$tmp/prometheus.yml" \
    --storage.tsdb.path="$tmp/data" \
    --web.listen-address="127.0.0.1:$port" \
    --log.level=warn >"$tmp/prometheus.log" 2>&1 </dev/null &
prom_pid=$!
pids+=("$prom_pid")
start="$(date +%s)"

wait_for 60 "Prometheus to be ready" curl -fsS --max-time 2 "$prom/-/ready"
alive "$prom_pid" "prometheus"
scraping() { [ "$(prom_scalar 'up{job="wxgate"}')" = 1 ]; }
wait_for 30 "Prometheus to scrape $admin (up == 1)" scraping
log "Prometheus scrapes $admin"

# --- wait for the load --------------------------------------------------------

rate_expr='sum(rate(wxgate_requests_total{job="wxgate"}[5s]))'
if [ "$mode" = demo ]; then
    timeout="${WXGATE_LOAD_TIMEOUT:-120}"
    deadline=$((SECONDS + timeout))
    log "waiting for the demo's load to run (at most ${timeout}s)"
    seen=0 quiet=0
    while :; do
        alive "$target_pid" "wxgate demo"
        r="$(prom_scalar "$rate_expr" || echo none)"
        if [ "$r" != none ] && python3 -c "import sys; sys.exit(0 if float('$r') > 0 else 1)"; then
            seen=1 quiet=0
        elif [ "$seen" = 1 ]; then
            quiet=$((quiet + 1))
            # three seconds without requests: the load is over
            [ "$quiet" -lt 3 ] || break
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            [ "$seen" = 1 ] || fail "no client requests seen in ${timeout}s: did the demo drive load?"
            log "load still running after ${timeout}s: checking what is there"
            break
        fi
        sleep 1
    done
    log "load done; the demo printed:"
    sed 's/^/    /' "$tmp/demo.log" | tail -n 40
else
    wait_s="${WXGATE_LOAD_SECONDS:-10}"
    log "scraping for ${wait_s}s"
    sleep "$wait_s"
fi
sleep 2 # one more scrape and rule evaluation
end="$(date +%s)"

total="$(prom_scalar 'sum(wxgate_requests_total{job="wxgate"})')"
log "client requests counted by wxgate: $total"

# --- the checks -----------------------------------------------------------

rc=0
# What the target exposes at all: panels on metrics it does not register (the cluster row,
# without [cluster]; `wxgate demo` runs a single wxgate) are skipped and listed, not failed.
curl -fsS --max-time 10 "http://$admin/metrics" >"$tmp/exposed.txt" ||
    fail "could not read http://$admin/metrics"
log "dashboard expressions over the last $((end - start))s (step 1s)"
python3 "$here/dashboard_exprs.py" query "$here/grafana/wxgate-dashboard.json" \
    --prom "$prom" --start "$start" --end "$end" --step 1 --rate-interval 15s \
    --allow-empty "${WXGATE_E2E_ALLOW_EMPTY:-}" --exposed "$tmp/exposed.txt" || rc=1

log "alert rules evaluated by Prometheus"
python3 "$here/dashboard_exprs.py" rules --prom "$prom" || rc=1

if [ "$rc" -ne 0 ]; then
    fail "end-to-end check failed (see above)"
fi
status=0
log "end-to-end check passed"
