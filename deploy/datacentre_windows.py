#!/usr/bin/env python3
"""The upstream calls of one phase of deploy/datacentre.sh, window by window, against a bound.

    datacentre_windows.py STATS_JSON APPID PHASE START_MS END_MS QUOTA BOUND [NOTE]

Reads the WeChat stand-in's stats page (saved as STATS_JSON), keeps the code exchanges of
APPID in the aligned windows that start in [START_MS, END_MS), prints one row per window (its
calls, the stand-in's own 45011 answers among them, the quota, the bound the phase is held
to) and exits 1 when a window holds more calls than BOUND. A window of the phase that
received no call is printed as 0: an idle window is a finding too.
"""

import json
import sys

PATH = "/sns/jscode2session"


def main(argv):
    if len(argv) not in (8, 9):
        print(__doc__.strip(), file=sys.stderr)
        return 64
    stats_path, appid, phase = argv[1], argv[2], argv[3]
    start, end, quota, bound = (int(value) for value in argv[4:8])
    note = argv[8] if len(argv) == 9 else ""
    with open(stats_path, encoding="utf-8") as file:
        stats = json.load(file)
    window = stats["window_ms"]
    calls = {
        w["start_unix_ms"]: w
        for w in stats["windows"]
        if w["appid"] == appid and w["path"] == PATH
    }
    print("  %-16s %7s %7s %6s %6s  %s" % ("window", "calls", "45011", "quota", "bound", ""))
    over = []
    most = 0
    at = start
    while at < end:
        entry = calls.get(at, {"calls": 0, "answered_45011": 0})
        span = "%+6.1f..%+.1f s" % ((at - start) / 1000, (at + window - start) / 1000)
        verdict = ""
        if entry["calls"] > bound:
            verdict = "OVER THE BOUND"
            over.append(entry["calls"])
        elif entry["calls"] > quota:
            verdict = "over the quota, within the bound"
        print("  %-16s %7d %7d %6d %6d  %s" % (
            span, entry["calls"], entry["answered_45011"], quota, bound, verdict))
        most = max(most, entry["calls"])
        at += window
    print("  %s: %s: the most calls in one window %d, bound %d%s" % (
        "FAILED" if over else "OK", phase, most, bound, " (" + note + ")" if note else ""))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
