#!/usr/bin/env python3
"""A stand-in for wxgate's admin listener, for testing deploy/ without wxgate.

Serves GET /metrics from a sample exposition (default: metrics.txt beside
this file). Counter and histogram values in the sample are one minute of
traffic: they are served multiplied by (seconds since start / 60), so rates in
Prometheus come out as the sample's values per minute. Gauges are served as
they are. With --load-seconds N the counters stop growing after N seconds, as
when wxgate's demo load is over.

It takes the arguments of `wxgate demo` too, so e2e-prometheus.sh can run it
in place of the wxgate binary (WXGATE_BIN=deploy/testdata/fake_wxgate.py):
  fake_wxgate.py [demo] [--keep-running] [--listen ADDR] --admin-listen HOST:PORT
Port 0 picks a free port; the address is printed as "admin listening on HOST:PORT".
"""
import argparse
import http.server
import os
import re
import sys
import time

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def load(path):
    types, lines = {}, []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            m = re.match(r"# TYPE (\S+) (\S+)", line)
            if m:
                types[m.group(1)] = m.group(2)
            lines.append(line)
    return types, lines


def cumulative(name, types):
    if types.get(name) == "counter":
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) in ("histogram", "summary"):
            return True
    return False


def render(types, lines, factor):
    out = []
    for line in lines:
        if line.startswith("#") and not line.startswith(("# HELP", "# TYPE")):
            continue  # free comments are not for the exposition
        m = SAMPLE_RE.match(line)
        if m and cumulative(m.group(1), types):
            value = float(m.group(3)) * factor
            line = "%s%s %s" % (m.group(1), m.group(2) or "", repr(value))
        out.append(line)
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="demo", help="ignored (wxgate's `demo`)")
    ap.add_argument("--admin-listen", default="127.0.0.1:0")
    ap.add_argument("--listen", default=None, help="ignored")
    ap.add_argument("--keep-running", action="store_true", help="ignored: it always keeps running")
    ap.add_argument("--metrics", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics.txt"))
    ap.add_argument("--load-seconds", type=float, default=0, help="stop the counters after this many seconds (0: never)")
    args = ap.parse_args()

    types, lines = load(args.metrics)
    start = time.monotonic()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            elapsed = time.monotonic() - start
            if args.load_seconds:
                elapsed = min(elapsed, args.load_seconds)
            body = render(types, lines, elapsed / 60.0).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    host, port = args.admin_listen.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    print("admin listening on %s:%d" % server.server_address[:2], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
