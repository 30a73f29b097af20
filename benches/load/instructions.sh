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
# callgrind files are kept there, for callgrind_annotate), CLUSTER (1: with a [cluster]
# section on a redis-server of its own, emptied before each run; see harness.sh; its
# cluster.timeout_ms is 1000 here, as wxgate answers slowly under valgrind).
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

if [ -n "${WXGATE_BIN:-}" ]; then
    wxgate_bin="$WXGATE_BIN"
else
    wxgate_bin="$(cd "$repo" && cargo build --release --bin wxgate --message-format=json-render-diagnostics |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
fi
[ -x "$wxgate_bin" ] || { printf 'FAIL: no wxgate executable\n' >&2; exit 1; }

# wxgate under valgrind answers slowly.
WRK_TIMEOUT=10
CLUSTER_TIMEOUT_MS="${CLUSTER_TIMEOUT_MS:-1000}"
if [ "${CLUSTER:-0}" = 1 ]; then
    for tool in redis-server redis-cli; do
        command -v "$tool" >/dev/null 2>&1 || { printf 'FAIL: %s is not on PATH (CLUSTER=1)\n' "$tool" >&2; exit 1; }
    done
fi
. "$here/harness.sh"
harness_start wxgate-instructions

printf 'wxgate: %s\n' "$wxgate_bin"
printf 'valgrind --tool=callgrind on CPU 1, wrk -t1 -c%s on CPU 0, %ss warm-up, %ss measured\n' \
    "$CONNECTIONS" "$WARMUP" "$DURATION"
printf '%-10s %10s %14s %12s\n' workload requests "Ir" "Ir/request"
for workload in "${WORKLOADS[@]}"; do
    out="$work/callgrind.$workload"
    fresh_redis
    RUST_LOG=warn taskset -c 1 valgrind --tool=callgrind --dump-instr=no \
        --callgrind-out-file="$out.%p" "$wxgate_bin" --config "$work/wxgate.toml" \
        >>"$work/processes.log" 2>&1 &
    pid="$!"
    pids+=("$pid")
    wait_ready "$proxy_port" "$pid" || { printf 'FAIL: wxgate never answered\n' >&2; tail "$work/processes.log" >&2; exit 1; }
    run_wrk "$workload" "w" "$WARMUP" >/dev/null
    trips_before="$(redis_trips)"
    callgrind_control -z "$pid" >/dev/null 2>&1
    read -r requests _ non2xx errors _ <<<"$(run_wrk "$workload" "m" "$DURATION")"
    callgrind_control -d "$pid" >/dev/null 2>&1
    note="$(cluster_note "$requests")"
    # The dump written by -d is the newest file with a part number.
    dump="$(ls -t "$out.$pid".* 2>/dev/null | head -n 1)"
    ir="$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ "$non2xx" = 0 ] && [ "$errors" = 0 ] || printf 'note: %s non-2xx, %s socket errors\n' "$non2xx" "$errors"
    printf '%-10s %10s %14s %12.0f%s\n' "$workload" "$requests" "$ir" "$(awk -v i="$ir" -v r="$requests" 'BEGIN { print i / r }')" "$note"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$dump" "$KEEP/callgrind.$workload"
    fi
done
