#!/usr/bin/env bash
# Static checks for wxgate's SRE kit (deploy/):
#   - installs promtool (Debian's `prometheus` package, install-prometheus.sh)
#     when it is missing, without leaving a Prometheus server running on :9090;
#   - promtool check rules / test rules / check config;
#   - promtool check metrics on the sample exposition in testdata/;
#   - the Grafana dashboard: valid JSON, every panel has PromQL targets, no
#     hard-coded datasource UIDs, the template variables are there, every
#     expression parses (via a generated rule file) and only uses wxgate's
#     metric names.
#
# Runs unattended (no stdin, CI=true). Usage: deploy/check.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '==> %s\n' "$*"; }

if ! command -v promtool >/dev/null 2>&1; then
    log "promtool not found: installing Debian's prometheus package"
    bash "$here/install-prometheus.sh"
fi
log "$(promtool --version 2>&1 | head -n1)"

cd "$here/prometheus"

log "promtool check rules alerts.yml"
promtool check rules alerts.yml

log "promtool test rules alerts_test.yml"
promtool test rules alerts_test.yml

log "promtool check config prometheus.yml"
promtool check config prometheus.yml

log "promtool check metrics < testdata/metrics.txt"
promtool check metrics <"$here/testdata/metrics.txt"

dash="$here/grafana/wxgate-dashboard.json"
log "python3 -m json.tool $dash"
python3 -m json.tool "$dash" >/dev/null

log "dashboard structure (panels, targets, datasource, variables)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 "$here/dashboard_exprs.py" check "$dash" "$here/testdata/metrics.txt" \
    --rules-out "$tmp/dashboard_rules.yml"

log "promtool check rules on the dashboard's expressions (PromQL syntax)"
promtool check rules "$tmp/dashboard_rules.yml" >/dev/null

if command -v shellcheck >/dev/null 2>&1; then
    log "shellcheck"
    shellcheck "$here"/*.sh
fi

log "all deploy checks passed"
