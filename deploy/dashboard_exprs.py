#!/usr/bin/env python3
"""Helpers for wxgate's Grafana dashboard, used by check.sh and e2e-prometheus.sh.

  dashboard_exprs.py check DASHBOARD METRICS_SAMPLE [--rules-out FILE]
      Structure checks: panels have PromQL targets, datasources come from a
      variable (no hard-coded UIDs), the template variables exist, variables
      are only used as `label=~"$var"` matchers or as `[$__rate_interval]` /
      `[$__range]` windows, and every wxgate_* metric named exists in the
      metrics sample. With --rules-out, writes every expression (variables
      substituted) as a recording rule so `promtool check rules` parses it.

  dashboard_exprs.py query DASHBOARD --prom URL --start UNIX --end UNIX
                     [--step S] [--rate-interval 15s] [--allow-empty REGEX]
                     [--exposed METRICS_SCRAPE]
      Runs every expression as a range query against Prometheus's HTTP API
      and fails (exit 1) listing each one that returns no data (no series, or
      only NaN). Titles matching --allow-empty are reported but not failed.
      With --exposed (a scrape of the target's /metrics), an expression that
      names a wxgate_* metric the target does not expose at all is skipped
      with the names: metrics registered only with some configuration (the
      cluster row needs [cluster]) cannot have data from a target without it.

  dashboard_exprs.py rules --prom URL
      Fails if any loaded rule's health is not ok; prints alert states.

Standard library only.
"""
import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request

VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
WINDOW_VARS = {"__rate_interval", "__interval", "__range"}


def panels_of(dash):
    """All panels, including those nested in collapsed rows."""
    for p in dash.get("panels", []):
        yield p
        for q in p.get("panels", []) or []:
            yield q


def targets(dash):
    """(panel title, refId, expr) for every PromQL target."""
    for p in panels_of(dash):
        if p.get("type") == "row":
            continue
        for t in p.get("targets", []) or []:
            yield p.get("title", "?"), t.get("refId", "?"), t.get("expr", "")


def substitute(expr, rate_interval="15s", range_="5m"):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name in ("__rate_interval", "__interval"):
            return rate_interval
        if name == "__range":
            return range_
        return ".*"  # template variables: "All"
    return VAR_RE.sub(repl, expr)


def sample_metric_names(path):
    names = set()
    with open(path) as f:
        for line in f:
            m = re.match(r"# TYPE (\S+) (\S+)", line)
            if not m:
                continue
            name, typ = m.groups()
            names.add(name)
            if typ in ("histogram", "summary"):
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def is_var_ref(s):
    return isinstance(s, str) and re.fullmatch(r"\$\{?\w+\}?", s) is not None


def cmd_check(args):
    errors = []
    dash = json.load(open(args.dashboard))
    if dash.get("schemaVersion", 0) < 36:
        errors.append("schemaVersion %r < 36" % dash.get("schemaVersion"))
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    has_ds_var = any(v.get("type") == "datasource" for v in variables.values())
    has_ds_input = any(i.get("type") == "datasource" for i in dash.get("__inputs", []))
    if not (has_ds_var or has_ds_input):
        errors.append("no datasource template variable and no datasource __inputs")
    if "instance" not in variables:
        errors.append("no 'instance' template variable")
    for name, v in variables.items():
        ds = v.get("datasource")
        if isinstance(ds, dict) and ds.get("uid") and not is_var_ref(ds["uid"]):
            errors.append("variable %s: hard-coded datasource uid %r" % (name, ds["uid"]))

    known = sample_metric_names(args.metrics) | {"up"}
    ids = set()
    count = 0
    for p in panels_of(dash):
        title = p.get("title", "?")
        if p.get("id") in ids:
            errors.append("panel %r: duplicate id %r" % (title, p.get("id")))
        ids.add(p.get("id"))
        if "gridPos" not in p:
            errors.append("panel %r: no gridPos" % title)
        if p.get("type") == "row":
            continue
        ts = p.get("targets") or []
        if not ts:
            errors.append("panel %r: no targets" % title)
        for d in [p.get("datasource")] + [t.get("datasource") for t in ts]:
            if isinstance(d, dict) and d.get("uid") and not is_var_ref(d["uid"]):
                errors.append("panel %r: hard-coded datasource uid %r" % (title, d["uid"]))
            elif isinstance(d, str) and not is_var_ref(d):
                errors.append("panel %r: hard-coded datasource %r" % (title, d))
        for t in ts:
            expr = t.get("expr", "")
            where = "panel %r target %s" % (title, t.get("refId"))
            if not expr.strip():
                errors.append(where + ": empty expr")
                continue
            count += 1
            for m in VAR_RE.finditer(expr):
                name = m.group(1) or m.group(2)
                before = expr[: m.start()]
                if name in WINDOW_VARS:
                    if not before.endswith("["):
                        errors.append(where + ": $%s used outside [...]" % name)
                elif name not in variables:
                    errors.append(where + ": unknown variable $%s" % name)
                elif not re.search(r'=~\s*"$', before):
                    errors.append(where + ': $%s must be used as label=~"$%s"' % (name, name))
            for metric in re.findall(r"\b(wxgate_[a-z0-9_]+)", expr):
                if metric not in known:
                    errors.append(where + ": metric %s is not in %s" % (metric, args.metrics))
    if count == 0:
        errors.append("dashboard has no expressions")

    if args.rules_out:
        rules = {"groups": [{"name": "dashboard-expressions", "rules": []}]}
        for i, (title, ref, expr) in enumerate(targets(dash)):
            rules["groups"][0]["rules"].append(
                {"record": "dashboard:expr_%d" % i, "expr": substitute(expr)})
        with open(args.rules_out, "w") as f:
            json.dump(rules, f, indent=1)  # JSON is YAML

    for e in errors:
        print("dashboard: " + e, file=sys.stderr)
    if errors:
        return 1
    print("dashboard: %d panels, %d expressions, all with targets and variable datasources"
          % (len(ids), count))
    return 0


def prom_get(base, path, params):
    url = base.rstrip("/") + path + "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def has_number(result):
    for series in result:
        values = series.get("values") or ([series["value"]] if "value" in series else [])
        for _, v in values:
            try:
                if not math.isnan(float(v)):
                    return True
            except ValueError:
                pass
    return False


def cmd_query(args):
    dash = json.load(open(args.dashboard))
    range_s = max(60, int(args.end - args.start))
    exposed = sample_metric_names(args.exposed) if args.exposed else None
    failed, allowed, ok = [], [], 0
    for title, ref, expr in targets(dash):
        q = substitute(expr, args.rate_interval, "%ds" % range_s)
        label = "%s [%s]" % (title, ref)
        if exposed is not None:
            absent = sorted(set(re.findall(r"\b(wxgate_[a-z0-9_]+)", expr)) - exposed)
            if absent:
                line = "%-55s not exposed by the target: %s" % (label, ", ".join(absent))
                allowed.append(line)
                print("skip  " + line)
                continue
        try:
            body = prom_get(args.prom, "/api/v1/query_range",
                            {"query": q, "start": args.start, "end": args.end, "step": args.step})
        except Exception as e:  # HTTP 400 for bad queries lands here too
            detail = getattr(e, "read", lambda: b"")().decode(errors="replace")
            problem = "query error: %s %s" % (e, detail.strip())
        else:
            result = body.get("data", {}).get("result", [])
            if body.get("status") != "success":
                problem = "status %s: %s" % (body.get("status"), body.get("error"))
            elif not result:
                problem = "no data"
            elif not has_number(result):
                problem = "only NaN (%d series)" % len(result)
            else:
                problem = None
                ok += 1
                print("ok    %-55s %d series" % (label, len(result)))
        if problem:
            line = "%-55s %s\n        %s" % (label, problem, q.replace("\n", " "))
            if args.allow_empty and re.search(args.allow_empty, title):
                allowed.append(line)
                print("skip  " + line)
            else:
                failed.append(line)
                print("FAIL  " + line)
    print("%d passed, %d failed" % (ok, len(failed)) + (", %d skipped" % len(allowed) if allowed else ""))
    if failed:
        print("\nexpressions without data:", file=sys.stderr)
        for line in failed:
            print("  " + line, file=sys.stderr)
        return 1
    return 0


def cmd_rules(args):
    body = prom_get(args.prom, "/api/v1/rules", {})
    bad, n = [], 0
    for g in body["data"]["groups"]:
        for r in g["rules"]:
            n += 1
            state = r.get("state", r.get("type"))
            print("rule  %-40s health=%s state=%s" % (r["name"], r.get("health"), state))
            if r.get("health") != "ok":
                bad.append("%s: %s %s" % (r["name"], r.get("health"), r.get("lastError", "")))
    if n == 0:
        bad.append("no rules loaded")
    for b in bad:
        print("rule problem: " + b, file=sys.stderr)
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("dashboard")
    c.add_argument("metrics")
    c.add_argument("--rules-out")
    q = sub.add_parser("query")
    q.add_argument("dashboard")
    q.add_argument("--prom", required=True)
    q.add_argument("--start", type=float, required=True)
    q.add_argument("--end", type=float, required=True)
    q.add_argument("--step", default="1")
    q.add_argument("--rate-interval", default="15s")
    q.add_argument("--allow-empty", default="")
    q.add_argument("--exposed", help="a scrape of the target's /metrics (text format)")
    r = sub.add_parser("rules")
    r.add_argument("--prom", required=True)
    args = ap.parse_args()
    return {"check": cmd_check, "query": cmd_query, "rules": cmd_rules}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
