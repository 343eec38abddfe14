#!/usr/bin/env python3
"""Profiles a cached-token answer under load (BENCHMARKS.md, "Profiling"): what the figures in
BENCHMARKS.md's profile section come from. Needs root and perf (apt-get install linux-perf).

  cargo build --profile profiling --bin tokend --example baseline   # release code, with symbols
  python3 scripts/profile.py allocs     # heap allocations and CPU per request, tokend vs the baseline
  python3 scripts/profile.py record     # perf record -g of tokend under wrk -> target/bench/perf.data
"""

import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

bench.TOKEND = os.path.join(bench.ROOT, "target/profiling/tokend")
BASELINE = os.path.join(bench.ROOT, "target/profiling/examples/baseline")
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def servers():
    idp = bench.Idp()
    tokend = bench.Tokend(idp, [bench.RESOURCE])
    tokend.wait_ready()
    os.makedirs(os.path.join(bench.ROOT, "target/bench"), exist_ok=True)
    body_file = os.path.join(bench.ROOT, "target/bench/body.json")
    with open(body_file, "wb") as f:
        f.write(bench.get(tokend.url(bench.Q), {"Metadata": "true"})[1])
    port = bench.free_port()
    base = subprocess.Popen([BASELINE, f"127.0.0.1:{port}", body_file], stdout=subprocess.DEVNULL)
    bench.wait_http(f"http://127.0.0.1:{port}/healthz", "the baseline")
    return idp, tokend, base, [("tokend", tokend.proc.pid, tokend.url(bench.Q)),
                               ("baseline", base.pid, f"http://127.0.0.1:{port}{bench.Q}")]


def under_load(url, seconds, during):
    """Runs `during()` while wrk loads `url`; returns what it returned and wrk's request count."""
    w = subprocess.Popen(["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", "Metadata: true", url],
                         stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    result = during()
    out = w.communicate()[0]
    return result, int(re.search(r"(\d+) requests in", out).group(1)), float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def allocs():
    subprocess.run(["perf", "probe", "-q", "-x", LIBC, "malloc"], stderr=subprocess.DEVNULL)
    idp, tokend, base, targets = servers()
    try:
        for name, pid, url in targets:
            def stat(events):
                out = subprocess.run(["perf", "stat", "-x,", "-e", events, "-p", str(pid), "--", "sleep", "3"],
                                     capture_output=True, text=True).stderr
                return {line.split(",")[2]: float(line.split(",")[0]) for line in out.splitlines() if line.count(",") > 3}
            # One writev per answer on a keep-alive connection. CPU without the probe (a uprobe traps).
            cpu, _, rps = under_load(url, 5, lambda: stat("syscalls:sys_enter_writev,task-clock"))
            heap, _, _ = under_load(url, 5, lambda: stat("syscalls:sys_enter_writev,probe_libc:malloc"))
            print(f"{name:9} {heap['probe_libc:malloc'] / heap['syscalls:sys_enter_writev']:5.1f} allocations, "
                  f"{cpu['task-clock'] * 1e3 / cpu['syscalls:sys_enter_writev']:5.2f} us CPU (user + kernel) "
                  f"per request; {rps:.0f} req/s")
    finally:
        base.kill()
        tokend.stop()
        idp.stop()


def record():
    idp, tokend, base, targets = servers()
    out = os.path.join(bench.ROOT, "target/bench/perf.data")
    try:
        _, pid, url = targets[0]
        under_load(url, 8, lambda: subprocess.run(["perf", "record", "-F", "2000", "--call-graph", "dwarf,16384", "-p", str(pid),
                                                   "-o", out, "--", "sleep", "5"], capture_output=True))
        print(f"perf report -i {out} --no-children --sort symbol")
    finally:
        base.kill()
        tokend.stop()
        idp.stop()


if __name__ == "__main__":
    for tool in ["perf", "wrk", "node"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is required (perf: apt-get install linux-perf; wrk: apt-get install wrk)")
    {"allocs": allocs, "record": record}[sys.argv[1] if len(sys.argv) > 1 else "allocs"]()
