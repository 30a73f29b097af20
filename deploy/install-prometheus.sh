#!/usr/bin/env bash
# Installs promtool and the prometheus server from Debian's `prometheus`
# package when either is missing, without leaving the packaged service
# running (it would listen on :9090, the default of wxgate's admin listener).
# Unattended: no stdin, CI=true. Used by check.sh and e2e-prometheus.sh.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf '==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
# install_packages.
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"
trap install_packages_cleanup EXIT

command -v apt-get >/dev/null 2>&1 || fail "prometheus/promtool missing and no apt-get: install Prometheus 2.x by hand"
# promtool and the server; without prometheus-node-exporter, another daemon (on :9100) that the
# package only recommends; the packaged service is left neither running nor enabled (it would
# listen on :9090, the default of wxgate's admin listener).
install_packages prometheus

command -v promtool >/dev/null 2>&1 || fail "promtool not on PATH after the install"
command -v prometheus >/dev/null 2>&1 || fail "prometheus not on PATH after the install"
