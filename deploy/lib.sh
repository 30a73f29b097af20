# shellcheck shell=bash
# shellcheck disable=SC2154 # `work` belongs to the script that sources this
# Shell helpers shared by wxgate's scripts (deploy/cluster-demo.sh, deploy/install-prometheus.sh,
# benches/load/*.sh): sourced, not run. The script that sources it defines `log MESSAGE` and
# `fail MESSAGE` (which exits); `start` also needs its `work` folder, `start` and `stop_all`
# its `pids` array.

# install_packages PACKAGE...: installs Debian packages with apt-get (as root, or with
# `sudo -n`), without leaving the services some of them bring (nginx on :80, redis-server on
# :6379, prometheus on :9090) running now or at boot. A policy-rc.d that exits 101 tells
# invoke-rc.d / deb-systemd-invoke to start nothing during the install; it is made only if
# there is none, and removed again, also when the install fails (and by
# `install_packages_cleanup`, which the script's exit trap calls, when it is interrupted).
install_packages() {
    log "installing $* (Debian packages)"
    install_sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "$* missing, not root and no sudo: install them"
        install_sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 || fail "$* missing and no apt-get: install them"
    local policy=/usr/sbin/policy-rc.d status=0 package
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# temporary, from a wxgate script installing packages\nexit 101\n' |
            "${install_sudo[@]}" tee "$policy" >/dev/null
        "${install_sudo[@]}" chmod 0755 "$policy"
        install_created_policy=1
    fi
    "${install_sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null &&
        "${install_sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "$@" </dev/null >/dev/null || status=$?
    install_packages_cleanup
    [ "$status" = 0 ] || fail "apt-get install $* failed ($status)"
    # Belt and braces: a package enables its service even when policy-rc.d kept it from
    # starting. Whatever runs now was started by this install: the package was missing.
    for package in "$@"; do
        case "$package" in nginx | redis-server | prometheus) ;; *) continue ;; esac
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
            "${install_sudo[@]}" systemctl disable --now "$package.service" >/dev/null 2>&1 || true
            continue
        fi
        if command -v deb-systemd-helper >/dev/null 2>&1; then
            "${install_sudo[@]}" deb-systemd-helper disable "$package.service" >/dev/null 2>&1 || true
        fi
        if [ -x "/etc/init.d/$package" ]; then
            "${install_sudo[@]}" "/etc/init.d/$package" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            "${install_sudo[@]}" update-rc.d "$package" disable >/dev/null 2>&1 || true
        fi
    done
}

# Removes the policy-rc.d that `install_packages` made, if it made one and it is still there.
install_packages_cleanup() {
    if [ "${install_created_policy:-0}" = 1 ]; then
        "${install_sudo[@]}" rm -f /usr/sbin/policy-rc.d
        install_created_policy=0
    fi
}

# free_port: a free loopback port (nothing listens on it now) in `found_port`, never one an
# earlier call found. Below the ephemeral range: a port from it can be taken meanwhile as the
# source port of one of the many connections a load generator and the proxies open.
free_port() {
    local ephemeral_low span
    read -r ephemeral_low _ </proc/sys/net/ipv4/ip_local_port_range
    span=$((ephemeral_low - 10000))
    [ "$span" -ge 1000 ] || span=1000
    while :; do
        found_port=$((10000 + RANDOM % span))
        case " ${used_ports:-} " in *" $found_port "*) continue ;; esac
        if [ -z "$(ss -Htln "sport = :$found_port" 2>/dev/null)" ]; then
            used_ports="${used_ports:-} $found_port"
            return
        fi
    done
}

# start NAME CMD...: runs CMD in the background, its output in $work/NAME.log; its pid in
# `started` and in `pids`.
start() {
    local name="$1"
    shift
    "$@" >"$work/$name.log" 2>&1 </dev/null &
    started=$!
    pids+=("$started")
}

# stop_all: asks every process in `pids` to stop (SIGTERM), gives each a few seconds (wxgate
# drains for its shutdown grace), then insists (SIGKILL).
stop_all() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# wait_until SECONDS PID WHAT CMD...: retries CMD every 0.1 s while PID lives.
wait_until() {
    local deadline=$((SECONDS + $1)) pid="$2" what="$3"
    shift 3
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || fail "$what: the process exited (its log is below)"
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
        sleep 0.1
    done
}
