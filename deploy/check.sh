#!/usr/bin/env bash
# Static checks for wxgate's SRE kit (deploy/):
#   - installs promtool (Debian's `prometheus` package, install-prometheus.sh)
#     when it is missing, without leaving a Prometheus server running on :9090;
#   - promtool check rules / test rules / check config;
#   - promtool check metrics on the sample exposition in testdata/;
#   - the Grafana dashboard: valid JSON, every panel has PromQL targets, no
#     hard-coded datasource UIDs, the template variables are there, every
#     expression parses (via a generated rule file) and only uses wxgate's
#     metric names;
#   - the three-replica examples in cluster/ (compose, Kubernetes): YAML that
#     parses and agrees with cluster/wxgate.toml (check_cluster_examples.py;
#     installs python3-yaml when missing), `kubectl kustomize` when kubectl is
#     there, and `wxgate check-config` on cluster/wxgate.toml when a wxgate
#     binary is (WXGATE_BIN, else target/debug/wxgate, as CI builds it).
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

log "cluster/: compose and Kubernetes examples against cluster/wxgate.toml"
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "PyYAML not found: installing Debian's python3-yaml"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-yaml </dev/null >/dev/null
    else
        echo "FAIL: python3's yaml module is needed (Debian: apt-get install python3-yaml)" >&2
        exit 1
    fi
fi
python3 "$here/check_cluster_examples.py" "$here/cluster"
if command -v kubectl >/dev/null 2>&1; then
    log "kubectl kustomize cluster/ (renders the manifests, ConfigMap included)"
    kubectl kustomize "$here/cluster" >/dev/null
fi
wxgate_bin="${WXGATE_BIN:-$here/../target/debug/wxgate}"
if [ -x "$wxgate_bin" ]; then
    log "wxgate check-config --config cluster/wxgate.toml ($wxgate_bin)"
    # A throwaway secret: the file takes the real one from the environment.
    WXGATE_CLUSTER_SECRET="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" \
        "$wxgate_bin" check-config --config "$here/cluster/wxgate.toml" >/dev/null
else
    log "no wxgate binary ($wxgate_bin): cluster/wxgate.toml not checked by wxgate itself"
fi

if command -v shellcheck >/dev/null 2>&1; then
    log "shellcheck"
    shellcheck "$here"/*.sh
fi

log "all deploy checks passed"
