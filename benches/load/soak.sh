#!/usr/bin/env bash
# A soak: one wxgate release binary under mixed traffic with faults for DURATION seconds,
# showing that its memory and file descriptors stay flat once warm and that every request is
# answered.
#
#   bash benches/load/soak.sh                 # 10 minutes after the release build
#   DURATION=120 bash benches/load/soak.sh    # a shorter look
#
# Starts, all on 127.0.0.1 and on free ports below the ephemeral range:
#   - the WeChat stand-in (the wxgate-stand-in binary) answering after LATENCY_MS, with
#     WeChat's quota (CODE_QUOTA calls per (appid, API) and WINDOW-second window), and faults
#     drawn at random for every call throughout (FAULTS: -1, 502, resets, hangs, answers
#     later than wxgate's upstream timeout, answers lost after the call was executed, 45009,
#     45011);
#   - one wxgate in front of it, configured as in production but with short bounds: upstream
#     timeout 1 s, the code cache's lifetime TTL_SECS (60: the cache fills for one lifetime,
#     then stays level), a code-exchange quota that bites in login rushes, a token quota that
#     bites whenever tokens are fetched, quota waits of 1 s, a head deadline of 5 s and an idle
#     deadline of 15 s;
# and drives it for DURATION seconds with
#   - wrk (CONNECTIONS connections, soak.lua): fresh code exchanges, replays of codes still in
#     flight, remembered or forgotten, a shared set of codes, invalid and implausible codes,
#     wrong secrets, third-party platform exchanges, token fetches (some for appids never seen
#     before), stable_token POSTs, other APIs passed through, with a login rush of fresh codes
#     in the first RUSH_FOR seconds of every RUSH_EVERY;
#   - soak_clients.py: clients that leave before their answer (with a FIN or a reset), send
#     their head or body slowly (some bodies stall half way), connect and say nothing,
#     trickle a head that never ends, or go idle after one request.
# Every SAMPLE seconds it records wxgate's RSS (VmRSS) and open file descriptors (/proc) and
# what its /metrics say (requests answered by outcome, connections open, requests in flight,
# remembered answers, quota keys). At the end it prints the machine, the settings, the
# samples, what the load generators sent and got back (every request answered; wrk's
# timeouts counted apart), the answers by kind, what the stand-in injected, and a verdict:
#   - RSS flat: the last third's highest sample at most RSS_TOLERANCE_PCT % (10) above the
#     middle third's highest (the first third is the warm-up: it should outlast the code
#     cache's lifetime, so DURATION should be at least 3 x (TTL_SECS + SAMPLE); the report
#     says when it is not);
#   - fds flat: the last third's highest at most FD_TOLERANCE (16) above the middle third's
#     (connections come and go between samples: wrk's are steady, the misbehaving clients'
#     and the upstream pool's are not);
#   - every request answered: no wrk socket error, no wrk timeout, and of the requests wrk
#     sent (soak.lua counts them: wrk counts neither a connection closed under a request nor
#     the request lost with it) at most CONNECTIONS unanswered, those in flight when wrk
#     stopped at its deadline; every slow client answered, every silent or trickling
#     connection closed by wxgate at its head deadline, every idle one at its idle deadline;
#   - after the load (once idle upstream connections have timed out): no connection open, no
#     request in flight, and the fds back to their count before the load (2 more at most: a
#     connection of the sampler's closing);
#   - WeChat's quota never exceeded (the stand-in's 45011s are exactly its injected ones);
#   - wxgate stops on SIGTERM with exit code 0.
# Exits 1 when the verdict fails. Everything it starts is stopped on exit (Ctrl-C included)
# and its temporary directory removed (KEEP_TMP=1 keeps it: configuration, logs, samples).
#
# Settings (environment): DURATION (s, 600), SAMPLE (s, 10), CONNECTIONS (wrk, 32),
# LATENCY_MS (20), FAULTS (the stand-in's --faults mix), TTL_SECS (60), WINDOW (s, 10),
# CODE_QUOTA (calls per window per (appid, API), 5000), TOKEN_QUOTA (per window, 20),
# RUSH_EVERY (s, 60), RUSH_FOR (s, 10), WRK_TIMEOUT (s, 30), RSS_TOLERANCE_PCT (10),
# FD_TOLERANCE (16), WXGATE_BIN and STAND_IN_BIN (these executables instead of building
# them), KEEP_TMP. Needs wrk, curl, python3 and ss; installs wrk, curl and iproute2 with
# apt-get when missing (as root, or with sudo).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

# The command as given, settings from the environment included, for the report.
command_line=""
for n in DURATION SAMPLE CONNECTIONS LATENCY_MS FAULTS TTL_SECS WINDOW CODE_QUOTA TOKEN_QUOTA \
    RUSH_EVERY RUSH_FOR WRK_TIMEOUT RSS_TOLERANCE_PCT FD_TOLERANCE WXGATE_BIN STAND_IN_BIN; do
    if [ -n "${!n+set}" ]; then
        command_line+="$n=${!n} "
    fi
done
command_line+="bash benches/load/soak.sh"

DURATION="${DURATION:-600}"
SAMPLE="${SAMPLE:-10}"
CONNECTIONS="${CONNECTIONS:-32}"
LATENCY_MS="${LATENCY_MS:-20}"
FAULTS="${FAULTS:-busy=0.02,bad-gateway=0.004,reset=0.004,hang=0.002,delay:1500=0.003,lost-answer=0.002,daily-quota=0.002,minute-quota=0.00003}"
TTL_SECS="${TTL_SECS:-60}"
WINDOW="${WINDOW:-10}"
CODE_QUOTA="${CODE_QUOTA:-5000}"
TOKEN_QUOTA="${TOKEN_QUOTA:-20}"
RUSH_EVERY="${RUSH_EVERY:-60}"
RUSH_FOR="${RUSH_FOR:-10}"
WRK_TIMEOUT="${WRK_TIMEOUT:-30}"
RSS_TOLERANCE_PCT="${RSS_TOLERANCE_PCT:-10}"
FD_TOLERANCE="${FD_TOLERANCE:-16}"
# wxgate's bounds in the soak (milliseconds), short so that each is crossed many times.
UPSTREAM_TIMEOUT_MS=1000
HEAD_TIMEOUT_MS=5000
IDLE_TIMEOUT_MS=15000
BODY_TIMEOUT_MS=4000
MAX_WAIT_MS=1000
POOL_IDLE_MS=4000

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
# shellcheck source=SCRIPTDIR/../../deploy/lib.sh
. "$here/../../deploy/lib.sh"

for n in DURATION SAMPLE CONNECTIONS LATENCY_MS TTL_SECS WINDOW CODE_QUOTA TOKEN_QUOTA \
    RUSH_EVERY RUSH_FOR WRK_TIMEOUT RSS_TOLERANCE_PCT FD_TOLERANCE; do
    case "${!n}" in
        '' | *[!0-9]*) fail "$n must be a whole number, not '${!n}'" ;;
    esac
done
[ "$SAMPLE" -ge 1 ] || fail "SAMPLE must be at least 1"
[ "$DURATION" -ge $((3 * SAMPLE)) ] || fail "DURATION must be at least 3 x SAMPLE"
[ "$CONNECTIONS" -ge 1 ] || fail "CONNECTIONS must be at least 1"
for n in WINDOW CODE_QUOTA TOKEN_QUOTA; do
    [ "${!n}" -ge 1 ] || fail "$n must be at least 1"
done
[ "$RUSH_EVERY" -ge 1 ] || fail "RUSH_EVERY must be at least 1"

# --- cleanup: everything started is in `pids` -------------------------------------------------
pids=()
work=""
status=1
cleanup() {
    stop_all
    if [ -n "$work" ]; then
        if [ "${KEEP_TMP:-0}" = 1 ] || [ "$status" -ne 0 ]; then
            printf 'logs, configuration and samples kept in %s\n' "$work" >&2
        else
            rm -rf "$work"
        fi
    fi
    install_packages_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. tools ---------------------------------------------------------------------------------
PATH="$PATH:/usr/sbin:/sbin"
command -v python3 >/dev/null 2>&1 || fail "python3 is needed (the misbehaving clients and the report)"
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
[ "${#missing[@]}" = 0 ] || install_packages "${missing[@]}"
for tool in wrk curl ss; do
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
work="$(mktemp -d "${TMPDIR:-/tmp}/wxgate-soak.XXXXXX")"

now_ms() { date +%s%3N; }

# --- 4. the WeChat stand-in -----------------------------------------------------------------------
free_port
stand_in_port="$found_port"
# No call log: it would grow with every call of a long run; the counters are enough.
start stand-in "$stand_in_bin" --listen "127.0.0.1:$stand_in_port" --no-call-log \
    --quota-per-window "$CODE_QUOTA" --window-secs "$WINDOW" --latency-ms "$LATENCY_MS" \
    --faults "$FAULTS"
stand_in_pid="$started"
stats_url="http://127.0.0.1:$stand_in_port/__stand_in/stats"
wait_until 10 "$stand_in_pid" "the stand-in on 127.0.0.1:$stand_in_port" curl -sf "$stats_url"
log "stand-in for api.weixin.qq.com on 127.0.0.1:$stand_in_port: latency ${LATENCY_MS} ms, faults $FAULTS"

# --- 5. wxgate --------------------------------------------------------------------------------
free_port
proxy_port="$found_port"
free_port
admin_port="$found_port"
cat >"$work/wxgate.toml" <<EOF
[server]
listen = "127.0.0.1:$proxy_port"
admin_listen = "127.0.0.1:$admin_port"
shutdown_grace_ms = 2000
request_head_timeout_ms = $HEAD_TIMEOUT_MS
idle_timeout_ms = $IDLE_TIMEOUT_MS
body_timeout_ms = $BODY_TIMEOUT_MS
max_connections = 1000

[upstream]
base_url = "http://127.0.0.1:$stand_in_port"
connect_timeout_ms = 500
timeout_ms = $UPSTREAM_TIMEOUT_MS
pool_idle_timeout_ms = $POOL_IDLE_MS
max_connections = 64

[code_cache]
# Short, so that the soak sees the cache fill for one lifetime and then stay level.
ttl_secs = $TTL_SECS

[quota]
# WeChat's quota (the stand-in's), over short windows. Code exchanges: bites in login rushes.
window_secs = $WINDOW
per_window = $CODE_QUOTA
max_wait_ms = $MAX_WAIT_MS

[quota.apis."/cgi-bin/token"]
# Far below what the load asks for: token fetches queue and some get wxgate's own 45011.
per_window = $TOKEN_QUOTA

[retry]
max_hold_ms = $((WINDOW * 1000 + 5000))
busy_attempts = 2

[log]
# No line per request; warnings and errors are counted in the report.
level = "info,wxgate::access=off"
EOF
"$wxgate_bin" check-config --config "$work/wxgate.toml" >"$work/check-config.log" 2>&1 ||
    fail "wxgate refuses the soak's configuration: $(cat "$work/check-config.log")"
start wxgate "$wxgate_bin" serve --config "$work/wxgate.toml"
wxgate_pid="$started"
admin="127.0.0.1:$admin_port"
wait_until 30 "$wxgate_pid" "wxgate to be ready (http://$admin/readyz)" curl -sf "http://$admin/readyz"
wxgate_version="$("$wxgate_bin" --version | awk '{ print $NF }') at commit $(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$repo" && git diff --quiet HEAD 2>/dev/null || echo ' with local changes')"
log "wxgate $wxgate_version on 127.0.0.1:$proxy_port (admin $admin), pid $wxgate_pid"

# --- 6. sampling ------------------------------------------------------------------------------
# One line: ms since the load started, then wxgate's RSS (KiB) and fds, values from its
# /metrics, and the stand-in's RSS and fds.
fd_count() {
    { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null || true; } | wc -l
}
sample() {
    local t="$1" rss fds metrics
    rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$wxgate_pid/status" 2>/dev/null || echo 0)"
    fds="$(fd_count "$wxgate_pid")"
    metrics="$(curl -sf --max-time 5 "http://$admin/metrics" || true)"
    printf '%s %s %s %s %s %s\n' "$t" "${rss:-0}" "$fds" "$(printf '%s\n' "$metrics" | awk '
        /^wxgate_requests_total\{/ { requests += $NF }
        /^wxgate_requests_total\{.*outcome="local_limit"/ { local_limit += $NF }
        /^wxgate_requests_total\{api="\/sns\/jscode2session",outcome="local_limit"/ { code_limit += $NF }
        /^wxgate_requests_total\{.*outcome="upstream_error"/ { upstream_error += $NF }
        /^wxgate_connections_open / { open = $NF }
        /^wxgate_inflight_requests / { inflight = $NF }
        /^wxgate_code_cache_entries / { cache = $NF }
        /^wxgate_quota_keys / { keys = $NF }
        /^wxgate_upstream_requests_total\{/ { upstream += $NF }
        END { printf "%d %d %d %d %d %d %d %d %d", requests, open, inflight, cache, keys, local_limit, code_limit, upstream_error, upstream }')" \
        "$(awk '/^VmRSS:/ { print $2 }' "/proc/$stand_in_pid/status" 2>/dev/null || echo 0)" \
        "$(fd_count "$stand_in_pid")"
}
sampler() {
    local k=0 next
    while :; do
        next=$((load_start + k * SAMPLE * 1000))
        [ "$next" -le $((load_start + DURATION * 1000)) ] || break
        sleep "$(awk -v ms="$((next - $(now_ms)))" 'BEGIN { printf "%.3f", (ms > 0 ? ms : 0) / 1000 }')"
        sample "$((k * SAMPLE))" >>"$work/samples"
        k=$((k + 1))
    done
}

# --- 7. the load ------------------------------------------------------------------------------
load_before="$(cut -d ' ' -f 1-3 /proc/loadavg)"
sample before >"$work/before"
log "load: ${DURATION} s of wrk ($CONNECTIONS connections, soak.lua) and the misbehaving clients (soak_clients.py); a sample every ${SAMPLE} s"
load_start="$(now_ms)"
sampler &
sampler_pid=$!
pids+=("$sampler_pid")
python3 "$here/soak_clients.py" --port "$proxy_port" --seconds "$DURATION" \
    --head-timeout-ms "$HEAD_TIMEOUT_MS" --idle-timeout-ms "$IDLE_TIMEOUT_MS" \
    --body-timeout-ms "$BODY_TIMEOUT_MS" --answer-limit-s "$WRK_TIMEOUT" \
    >"$work/clients.json" 2>"$work/clients.log" &
clients_pid=$!
pids+=("$clients_pid")
wrk_status=0
wrk -t 1 -c "$CONNECTIONS" -d "${DURATION}s" --timeout "${WRK_TIMEOUT}s" -s "$here/soak.lua" \
    "http://127.0.0.1:$proxy_port" -- soak "$RUSH_EVERY" "$RUSH_FOR" "$TTL_SECS" \
    >"$work/wrk.out" 2>&1 || wrk_status=$?
[ "$wrk_status" = 0 ] || fail "wrk failed ($wrk_status): $(tail -n 5 "$work/wrk.out")"
wait "$sampler_pid" || true
clients_status=0
wait "$clients_pid" || clients_status=$?
[ "$clients_status" = 0 ] || fail "soak_clients.py failed ($clients_status): $(tail -n 5 "$work/clients.log")"
load_end="$(now_ms)"

# --- 8. after the load ------------------------------------------------------------------------
# Idle upstream connections close after pool_idle_timeout_ms; then wxgate should hold what it
# held before the load (listeners, runtime) and nothing else.
sleep "$(((POOL_IDLE_MS + 2000) / 1000))"
sample after >"$work/after"
curl -sf --max-time 5 "$stats_url" >"$work/stand-in-stats.json" || fail "the stand-in's stats did not answer"
curl -sf --max-time 5 "http://$admin/metrics" >"$work/metrics.txt" || fail "wxgate's /metrics did not answer"
kill -TERM "$wxgate_pid"
stop_started="$(now_ms)"
wxgate_exit=0
wait "$wxgate_pid" || wxgate_exit=$?
stop_ms=$(($(now_ms) - stop_started))

# --- 9. the report ----------------------------------------------------------------------------
verdict=0
cat >"$work/settings" <<EOF
duration=$DURATION
sample_every=$SAMPLE
connections=$CONNECTIONS
ttl=$TTL_SECS
rss_tolerance=$RSS_TOLERANCE_PCT
fd_tolerance=$FD_TOLERANCE
head_timeout_ms=$HEAD_TIMEOUT_MS
idle_timeout_ms=$IDLE_TIMEOUT_MS
body_timeout_ms=$BODY_TIMEOUT_MS
upstream_timeout_ms=$UPSTREAM_TIMEOUT_MS
max_wait_ms=$MAX_WAIT_MS
pool_idle_ms=$POOL_IDLE_MS
wrk_timeout=$WRK_TIMEOUT
wxgate_exit=$wxgate_exit
stop_ms=$stop_ms
load_ms=$((load_end - load_start))
latency_ms=$LATENCY_MS
code_quota=$CODE_QUOTA
token_quota=$TOKEN_QUOTA
window=$WINDOW
rush_every=$RUSH_EVERY
rush_for=$RUSH_FOR
faults=$FAULTS
command=$command_line
load_before=$load_before
wxgate_version=$wxgate_version
wrk_version=$(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')
EOF
python3 - "$work" <<'EOF' || verdict=$?
import json
import os
import re
import sys

work = sys.argv[1]

def read(name):
    with open(os.path.join(work, name)) as f:
        return f.read()

settings = dict(line.split("=", 1) for line in read("settings").splitlines() if "=" in line)
def setting(name):
    return int(settings[name])
duration, sample_every, connections = setting("duration"), setting("sample_every"), setting("connections")
ttl, rss_tolerance, fd_tolerance = setting("ttl"), setting("rss_tolerance"), setting("fd_tolerance")
head_timeout, idle_timeout = setting("head_timeout_ms") / 1000, setting("idle_timeout_ms") / 1000
wrk_timeout, wxgate_exit, stop_ms, load_ms = (setting("wrk_timeout"), setting("wxgate_exit"),
                                             setting("stop_ms"), setting("load_ms"))

FIELDS = ("t", "rss", "fds", "requests", "open", "inflight", "cache", "keys", "local_limit",
          "code_limit", "upstream_error", "upstream", "si_rss", "si_fds")

def parse(line):
    parts = line.split()
    row = dict(zip(FIELDS, parts))
    for key in FIELDS[1:]:
        row[key] = int(row[key])
    return row

samples = [parse(line) for line in read("samples").splitlines() if line.strip()]
for row in samples:
    row["t"] = int(row["t"])
before = parse(read("before"))
after = parse(read("after"))

print()
print("wxgate soak: %s" % os.popen("date -u '+%Y-%m-%d %H:%M:%S UTC'").read().strip())
print("command: %s" % settings["command"])
cpu = "?"
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
mem_kib = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
print("machine: %d CPUs (%s), %.0f GiB; load average before the run %s" % (
    os.cpu_count(), cpu, mem_kib / 2**20, settings["load_before"]))
print("wxgate: %s; wrk %s; python %s" % (settings["wxgate_version"], settings["wrk_version"],
                                         sys.version.split()[0]))
print("duration: %d s of load (%.1f s measured), a sample every %d s" % (duration, load_ms / 1000, sample_every))
print("stand-in: latency %s ms, quota %s per (appid, API) and %s s window, faults %s" % (
    settings["latency_ms"], settings["code_quota"], settings["window"], settings["faults"]))
print("wxgate: upstream timeout %s ms, code cache ttl %s s, quota %s per %s s (tokens %s), quota wait"
      " %s ms, head/idle/body deadlines %s/%s/%s ms" % (
          settings["upstream_timeout_ms"], settings["ttl"], settings["code_quota"], settings["window"],
          settings["token_quota"], settings["max_wait_ms"], settings["head_timeout_ms"],
          settings["idle_timeout_ms"], settings["body_timeout_ms"]))
print("load: wrk %d connections (soak.lua; a rush of fresh codes %s s in every %s s; timeout %d s)"
      " and soak_clients.py" % (connections, settings["rush_for"], settings["rush_every"], wrk_timeout))
print()
print("%6s %8s %5s %6s %8s %10s %6s %9s %10s %8s %8s" % (
    "t s", "RSS MiB", "fds", "conns", "inflight", "remembered", "qkeys", "requests", "local45011",
    "of codes", "upst.err"))
def show(label, row):
    print("%6s %8.1f %5d %6d %8d %10d %6d %9d %10d %8d %8d" % (
        label, row["rss"] / 1024, row["fds"], row["open"], row["inflight"], row["cache"],
        row["keys"], row["requests"], row["local_limit"], row["code_limit"], row["upstream_error"]))
show("before", before)
for row in samples:
    show(row["t"], row)
show("after", after)
print("(t: seconds since the load started; conns: client connections open; remembered: code answers")
print(" kept; qkeys: (appid, API) quota keys; requests: answered so far, wxgate_requests_total;")
print(" local45011: wxgate's own 45011 after a quota wait, 'of codes' for /sns/jscode2session;")
print(" upst.err: wxgate's 502/504;")
print(" 'after': %d s after the load ended)" % (setting("pool_idle_ms") // 1000 + 2))

# --- wrk ---
wrk_out = read("wrk.out")
result = re.search(r"^RESULT (.*)$", wrk_out, re.M)
if result is None:
    print("\nwrk printed no result:\n" + wrk_out)
    sys.exit(1)
sent, responses, e_connect, e_read, e_write, e_timeout, non2xx, p50, p99, max_us = map(int, result.group(1).split())
answers = sorted(((int(n), kind) for kind, n in
                  (m.groups() for m in re.finditer(r"^ANSWER (\S+ \S+) (\d+)$", wrk_out, re.M))),
                 reverse=True)
caches = dict((k, int(n)) for k, n in re.findall(r"^CACHE (\S+) (\d+)$", wrk_out, re.M))
unanswered = sent - responses
print()
print("wrk: %d requests sent, %d answered (%.0f/s), %d unanswered; p50 %.1f ms, p99 %.1f ms, longest %.1f s"
      % (sent, responses, responses / (load_ms / 1000), unanswered, p50 / 1000, p99 / 1000, max_us / 1e6))
print("  socket errors: connect %d, read %d, write %d; timeouts %d (answers slower than %d s); non-2xx %d"
      % (e_connect, e_read, e_write, e_timeout, wrk_timeout, non2xx))
print("  answers by HTTP status and errcode (ok: a body without errcode):")
for n, kind in answers:
    print("    %-12s %9d  %5.1f%%" % (kind, n, 100 * n / max(responses, 1)))
print("  X-Wxgate-Cache: " + ", ".join("%s %d" % (k, v) for k, v in sorted(caches.items())))

# --- misbehaving clients ---
clients = json.loads(read("clients.json"))
print()
print("soak_clients.py (one line per kind of client):")
for kind, tally in clients.items():
    print("  %-9s %s" % (kind, ", ".join("%s: %s" % (k, v) for k, v in tally.items())))

# --- wxgate's own account ---
metrics = read("metrics.txt")
def metric_lines(name):
    for m in re.finditer(r"^%s(\{[^}]*\})? (\S+)$" % re.escape(name), metrics, re.M):
        yield (m.group(1) or ""), float(m.group(2))
def by_label(name, label):
    out = {}
    for labels, v in metric_lines(name):
        m = re.search(r'%s="([^"]*)"' % label, labels)
        key = m.group(1) if m else ""
        out[key] = out.get(key, 0) + v
    return {k: int(v) for k, v in sorted(out.items()) if v}
print()
print("wxgate's /metrics at the end:")
print("  requests by outcome: %s" % by_label("wxgate_requests_total", "outcome"))
print("  upstream answers by errcode: %s" % by_label("wxgate_upstream_requests_total", "errcode"))
print("  upstream transport errors: %s" % by_label("wxgate_upstream_transport_errors_total", "reason"))
print("  retries: %s" % by_label("wxgate_retries_total", "reason"))
print("  connections closed by wxgate: %s" % by_label("wxgate_connections_closed_total", "reason"))
stats = json.loads(read("stand-in-stats.json"))
print("stand-in: %d calls; faults injected %s; answers by errcode %s" % (
    stats["total_calls"], stats.get("faults", {}), stats["answers"]))
log_text = read("wxgate.log")
warn = len(re.findall(r"\bWARN\b", log_text))
error = len(re.findall(r"\bERROR\b", log_text))
print("wxgate's log: %d WARN, %d ERROR lines" % (warn, error))
for line in sorted(set(re.sub(r"^\S+\s+", "", l) for l in log_text.splitlines()
                       if re.search(r"\b(WARN|ERROR)\b", l)))[:8]:
    print("    " + line[:160])
print("stand-in RSS %.1f -> %.1f MiB, fds %d -> %d (before -> after the load)" % (
    before["si_rss"] / 1024, after["si_rss"] / 1024, before["si_fds"], after["si_fds"]))

# --- verdict ---
print()
print("verdict:")
failed = []
def check(ok, text):
    print("  %s: %s" % ("OK" if ok else "FAILED", text))
    if not ok:
        failed.append(text)

third = duration / 3
middle = [r for r in samples if third < r["t"] <= 2 * third]
last = [r for r in samples if r["t"] > 2 * third]
if duration / 3 < ttl + sample_every:
    print("  NOTE: the warm-up (first third, %.0f s) is shorter than the code cache's lifetime (%d s)"
          " + a sample: the middle third still fills the cache" % (third, ttl))
if middle and last:
    m_rss, l_rss = max(r["rss"] for r in middle), max(r["rss"] for r in last)
    check(l_rss <= m_rss * (1 + rss_tolerance / 100),
          "RSS flat after the warm-up: highest %.1f MiB in the last third, %.1f MiB in the middle third"
          " (%+.1f%%, at most +%d%%)" % (l_rss / 1024, m_rss / 1024, 100 * (l_rss - m_rss) / m_rss, rss_tolerance))
    m_fds, l_fds = max(r["fds"] for r in middle), max(r["fds"] for r in last)
    check(l_fds <= m_fds + fd_tolerance,
          "fds flat after the warm-up: highest %d in the last third, %d in the middle third (at most +%d)"
          % (l_fds, m_fds, fd_tolerance))
    # The trend over the two measured thirds, for the record: least squares, per hour.
    pts = middle + last
    def slope(key):
        n = len(pts)
        mx = sum(r["t"] for r in pts) / n
        my = sum(r[key] for r in pts) / n
        den = sum((r["t"] - mx) ** 2 for r in pts)
        return 3600 * sum((r["t"] - mx) * (r[key] - my) for r in pts) / den if den else 0
    print("  trend over the last two thirds (least squares): RSS %+.1f MiB/h, fds %+.1f/h, remembered %+.0f/h"
          % (slope("rss") / 1024, slope("fds"), slope("cache")))
else:
    check(False, "too few samples to compare the middle and last thirds")
check(e_read == 0 and e_write == 0 and e_connect == 0,
      "no wrk socket errors (connect %d, read %d, write %d)" % (e_connect, e_read, e_write))
check(e_timeout == 0, "no wrk request waited longer than %d s (timeouts %d; longest answer %.1f s)"
      % (wrk_timeout, e_timeout, max_us / 1e6))
check(0 <= unanswered - e_read - e_write <= connections,
      "every wrk request answered: %d sent, %d answered; the %d others were in flight when wrk stopped"
      " (at most one per connection, %d)" % (sent, responses, unanswered, connections))
bad = []
for kind, tally in clients.items():
    for what, n in tally.items():
        if what.startswith(("STILL OPEN", "no answer", "connection ended", "connect error", "head sent")):
            bad.append("%s %s: %s" % (kind, what, n))
check(not bad, "every misbehaving client answered or closed by its deadline%s" % (
    "" if not bad else " (" + "; ".join(bad) + ")"))
for kind, limit in (("silent", head_timeout), ("trickle", head_timeout), ("idle", idle_timeout)):
    span = clients.get(kind, {}).get("closed after s (min/max)")
    if span:
        check(span[1] <= limit + 1.5, "%s connections closed %.1f-%.1f s after %s (deadline %.0f s)" % (
            kind, span[0], span[1], "their last answer" if kind == "idle" else "they opened", limit))
check(after["open"] == 0 and after["inflight"] == 0,
      "after the load: %d connections open, %d requests in flight" % (after["open"], after["inflight"]))
check(after["fds"] <= before["fds"] + 2,
      "after the load: %d fds (%d before the load)" % (after["fds"], before["fds"]))
refused = stats["answers"].get("45011", 0)
injected = stats.get("faults", {}).get("minute-quota", 0)
check(refused == injected, "WeChat's quota never exceeded: the stand-in answered 45011 %d times, %d of them"
      " injected faults" % (refused, injected))
check(wxgate_exit == 0, "wxgate stopped on SIGTERM with exit code %d in %.1f s" % (wxgate_exit, stop_ms / 1000))
sys.exit(1 if failed else 0)
EOF
status="$verdict"
[ "$verdict" -eq 0 ]
