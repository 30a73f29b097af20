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
# ROUNDS (3), DURATION (s, 5), WARMUP (s, 1), CONNECTIONS (64), DUP_CODES (100), CLUSTER (1:
# with a [cluster] section on a redis-server of its own on CPU 0, emptied before each run;
# see harness.sh).
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

. "$here/harness.sh"
harness_start wxgate-builds

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
            fresh_redis
            RUST_LOG=warn taskset -c 1 "${BINS[$i]}" --config "$work/wxgate.toml" >>"$work/processes.log" 2>&1 &
            pid="$!"
            pids+=("$pid")
            wait_ready "$proxy_port" "$pid" || { printf 'FAIL: build %d never answered\n' "$i" >&2; exit 1; }
            run_wrk "$workload" "w$round" "$WARMUP" >/dev/null
            trips_before="$(redis_trips)"
            read -r user_before system_before < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
            read -r busy_before total_before < <(cpu1)
            read -r requests duration_us non2xx errors p50_us p99_us _ <<<"$(run_wrk "$workload" "m$round" "$DURATION")"
            read -r busy_after total_after < <(cpu1)
            read -r user_after system_after < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
            note="$(cluster_note "$requests")"
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            row="$(awk -v w="$workload" -v b="$i" -v n="$requests" -v d="$duration_us" -v p50="$p50_us" \
                -v p99="$p99_us" -v u="$((user_after - user_before))" -v s="$((system_after - system_before))" \
                -v hz="$hz" -v busy="$((busy_after - busy_before))" -v total="$((total_after - total_before))" \
                -v bad="$((non2xx + errors))" -v note="$note" 'BEGIN {
                    printf "%-10s %5d %8.0f %7.2f %7.2f %9.2f %9.2f %6.0f%% %6.0f%%%s%s", w, b, n / (d / 1e6),
                        p50 / 1000, p99 / 1000, u * 1e6 / hz / n, s * 1e6 / hz / n,
                        100 * (u + s) / hz / (d / 1e6), 100 * busy / total, bad ? "  " bad " errors!" : "", note
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
