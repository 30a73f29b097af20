#!/usr/bin/env bash
# Installs promtool and the prometheus server from Debian's `prometheus`
# package when either is missing, without leaving the packaged service
# running (it would listen on :9090, the default of wxgate's admin listener).
# Unattended: no stdin, CI=true. Used by check.sh and e2e-prometheus.sh.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "prometheus/promtool missing, not root and no sudo"
    sudo=(sudo -n)
fi
command -v apt-get >/dev/null 2>&1 || fail "prometheus/promtool missing and no apt-get: install Prometheus 2.x by hand"

echo "==> installing Debian's prometheus package (promtool + server)"

# Debian's postinst enables and starts the prometheus service. A policy-rc.d
# that exits 101 tells invoke-rc.d / deb-systemd-invoke not to start
# anything. Create one only if there is none, and remove only ours, also when
# this script is interrupted.
policy=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if [ "$created_policy" = 1 ]; then
        "${sudo[@]}" rm -f "$policy"
    fi
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
    created_policy=1
    printf '#!/bin/sh\n# temporary, from wxgate deploy/install-prometheus.sh\nexit 101\n' |
        "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 0755 "$policy"
fi

"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
# --no-install-recommends skips prometheus-node-exporter, another daemon
# (on :9100) that the package only recommends.
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    prometheus </dev/null

# Belt and braces: keep the packaged service from running now or at boot (the
# postinst enables it even when policy-rc.d prevented the start). Whatever
# runs here was started by the install above: the package was missing before.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
else
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        "${sudo[@]}" deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
    fi
    if [ -x /etc/init.d/prometheus ]; then
        "${sudo[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        if command -v update-rc.d >/dev/null 2>&1; then
            "${sudo[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
    fi
fi

command -v promtool >/dev/null 2>&1 || fail "promtool not on PATH after the install"
command -v prometheus >/dev/null 2>&1 || fail "prometheus not on PATH after the install"
