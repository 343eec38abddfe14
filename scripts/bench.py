#!/usr/bin/env python3
"""The benchmark (BENCHMARKS.md): tokend against a bare axum baseline, on loopback, in one invocation.

Run through scripts/bench.sh, which builds the release binaries and the test IdP first. Measures, in
alternating rounds so that both servers see the same machine noise:
  - throughput and p50/p99 with keep-alive connections (SDK clients) and with a new connection per
    request (curl from scripts; tokend's per-connection caller lookup included), tokend vs baseline,
    both as tokend is started bare and as deployed (`[access]` with a rate limit, and `[audit]`: every
    line checked to be written);
  - a flood: one unprivileged user with 3000 idle processes and no rights floods tokend with new
    connections while another user's latency is measured, against the same user's without the flood;
  - p99 while many short-lived tokens are being refreshed vs steady state;
  - upstream calls for 500 concurrent cold callers of one resource;
  - RSS idle and after ~1M requests spread over 100 resources;
  - start-up to the first answer (no pre-warm); the release binary's size.
Writes target/bench/results.json and prints a table. Timing here is noisy: compare ratios.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEND = os.path.join(ROOT, "target/release/tokend")
BASELINE = os.path.join(ROOT, "target/release/examples/baseline")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
RESOURCE = "https://storage.azure.com"
Q = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={RESOURCE}"
CLIENT_ID, SECRET = "broker-secret", "Sup3r~Secret.Value_1"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, headers=None, timeout=10):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=timeout) as r:
        return r.status, r.read()


def first_answer(port, timeout=20):
    """When a GET /healthz on 127.0.0.1:port is first answered 200: a tight loop of raw connects (a
    refused connect costs microseconds), so the figure is tokend's start-up, not a poll interval."""
    import socket
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.perf_counter()
        except OSError:
            time.sleep(0.0002)
    sys.exit(f"tokend did not answer on port {port}")


def wait_http(url, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if get(url, timeout=1)[0] == 200:
                return
        except Exception:
            time.sleep(0.02)
    sys.exit(f"{what} did not come up at {url}")


class Idp:
    def __init__(self, ttl=3600):
        self.port = free_port()
        env = dict(os.environ, IDP_PORT=str(self.port), TOKEN_TTL=str(ttl), IDP_TENANT="test-tenant")
        self.proc = subprocess.Popen(["node", "idp.mjs"], cwd=os.path.join(ROOT, "tests/idp"), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.admin("stats"), "the test IdP")

    def admin(self, what):
        return f"http://127.0.0.1:{self.port}/__admin/{what}"

    def token_url(self):
        return f"http://127.0.0.1:{self.port}/test-tenant/oauth2/v2.0/token"

    def calls(self):
        return json.loads(get(self.admin("stats"))[1])["token_requests"]

    def stop(self):
        self.proc.kill()


class Tokend:
    def __init__(self, idp, resources, min_lifetime="5m", extra=""):
        self.dir = tempfile.mkdtemp(prefix="tokend-bench-")
        self.port = free_port()
        with open(os.path.join(self.dir, "secret"), "w") as f:
            f.write(SECRET)
        os.chmod(os.path.join(self.dir, "secret"), 0o600)
        res = ", ".join(json.dumps(r) for r in resources)
        with open(os.path.join(self.dir, "tokend.toml"), "w") as f:
            f.write(f'[server]\nlisten = ["127.0.0.1:{self.port}"]\nidentity_header_file = "header"\n\n'
                    f'[tokens]\nmin_lifetime = "{min_lifetime}"\nmax_on_demand_per_caller = 1000\n'
                    f'on_demand_rate = "1000/s"\n{extra}\n'
                    f'[[identity]]\nclient_id = "{CLIENT_ID}"\ntoken_url = "{idp.token_url()}"\n'
                    f'client_secret_file = "secret"\nresources = [{res}]\n')
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([TOKEND, "serve", "--config", os.path.join(self.dir, "tokend.toml")],
                                     env=dict(os.environ, TOKEND_LOG="warn"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.up_after = first_answer(self.port) - self.started

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if get(self.url("/readyz"))[0] == 200:
                    return
            except Exception:
                pass
            time.sleep(0.05)
        sys.exit("tokend did not get ready")

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)


def wrk(url, connections=16, seconds=SECONDS, close=False, script=None, threads=1, user=None, errors_ok=False):
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", "Metadata: true"]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] + cmd
    if close:
        cmd += ["-H", "Connection: close"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors and not errors_ok:
        sys.exit(f"wrk saw {errors.group(1)} non-2xx answers from {url}:\n{out}")
    socket_errors = re.search(r"Socket errors: (.*)", out)
    def ms(value, unit):
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    lat = re.search(r"Latency\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    return {"rps": rps, "p50_ms": pct(50), "p90_ms": pct(90), "max_ms": ms(lat.group(5), lat.group(6)), "p99_ms": pct(99), "requests": total,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1).strip() if socket_errors else ""}


# The deployed configuration's extra sections (format with audit= and rate=).
DEPLOYED = """
[access]
default = "deny"
unknown = "deny"
rate_limit = "{rate}"

[[access.rule]]
uids = [0]
identities = ["*"]
resources = ["*"]

[audit]
path = "{audit}"
"""


def audit_counts(path, served):
    """The audit log's lines: issued lines against the 200s wrk counted (wrk counts completed answers,
    tokend writes the line before answering, so issued >= served), and whether any carried process fields."""
    issued = lines = with_process = 0
    with open(path) as f:
        for line in f:
            lines += 1
            rec = json.loads(line)
            issued += rec.get("decision") == "issued"
            with_process += "pid" in rec.get("caller", {})
    return {"lines": lines, "issued": issued, "served_by_wrk": served, "with_process": with_process,
            "every_line_written": issued >= served}


VICTIM_LOOP = r"""
import json, socket, sys, time
port, path, seconds, pause = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\nConnection: close\r\n\r\n".encode()
took, statuses, end = [], {}, time.time() + seconds
while time.time() < end:
    t = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(req)
            head = s.recv(65536)
            while s.recv(65536):
                pass
        status = head[9:12].decode()
    except OSError as e:
        status = type(e).__name__
    took.append((time.perf_counter() - t) * 1000)
    statuses[status] = statuses.get(status, 0) + 1
    time.sleep(pause)
print(json.dumps({"ms": took, "statuses": statuses}))
"""


def ensure_user(name):
    import pwd
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name).pw_uid


def victim_latency(tokend, user, seconds):
    """Another user's new-connection requests, paced under the rate limit: p50, p90, max in ms."""
    # The system's python: the user's own (pyenv under /root, say) may not be readable by the victim.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    out = subprocess.run([python, "-c", VICTIM_LOOP, str(tokend.port), Q, str(seconds), "0.06"],
                         user=user, capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    ms = sorted(got["ms"])
    return {"p50_ms": ms[len(ms) // 2], "p90_ms": ms[int(len(ms) * 0.9)], "max_ms": ms[-1], "requests": len(ms),
            "statuses": got["statuses"]}


def flood(idp):
    """One unprivileged user with 3000 idle processes and no rights floods tokend with new connections
    (wrk -t2 -c256, Connection: close) while another user, allowed, asks at its own pace; that user's
    latency with and without the flood, tokend as deployed (rate limit 20/s, [audit])."""
    attacker, victim = ensure_user("tokend-bench-flood"), ensure_user("tokend-bench-victim")
    audit_dir = tempfile.mkdtemp(prefix="tokend-bench-flood-")
    os.chmod(audit_dir, 0o755)
    extra = DEPLOYED.format(audit=os.path.join(audit_dir, "audit.jsonl"), rate="20/s").replace(
        "uids = [0]", f"uids = [0, {victim}]")
    t = Tokend(idp, [RESOURCE], extra=extra)
    t.wait_ready()
    idle = [subprocess.Popen(["sleep", "3600"], user=attacker, stdout=subprocess.DEVNULL) for _ in range(3000)]
    try:
        seconds = max(SECONDS * 2, 8)
        quiet = victim_latency(t, victim, seconds)
        result = {}

        def attack():
            result["flood"] = wrk(t.url(Q), connections=256, seconds=seconds + 2, close=True, threads=2,
                                  user=attacker, errors_ok=True)

        attacking = threading.Thread(target=attack)
        attacking.start()
        time.sleep(1)
        loud = victim_latency(t, victim, seconds)
        attacking.join()
        log_bytes = os.path.getsize(os.path.join(audit_dir, "audit.jsonl"))
    finally:
        for p in idle:
            p.kill()
        for p in idle:
            p.wait()
        t.stop()
        shutil.rmtree(audit_dir, ignore_errors=True)
    return {"quiet": quiet, "flooded": loud, "flood": result["flood"], "audit_bytes": log_bytes,
            "p90_ratio": loud["p90_ms"] / quiet["p90_ms"]}


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def main():
    for tool in ["wrk", "node"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is required: apt-get install {'wrk' if tool == 'wrk' else 'nodejs npm'}")
    results = {"commit": subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip(),
               "machine": f"{os.cpu_count()} cores, {os.uname().release}", "rounds": ROUNDS, "seconds": SECONDS}
    idp = Idp()
    tokend = Tokend(idp, [RESOURCE])
    tokend.wait_ready()
    status, body = get(tokend.url(Q), {"Metadata": "true"})
    assert status == 200
    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    body_file = os.path.join(ROOT, "target/bench/body.json")
    with open(body_file, "wb") as f:
        f.write(body)
    base_port = free_port()
    baseline = subprocess.Popen([BASELINE, f"127.0.0.1:{base_port}", body_file], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{base_port}/healthz", "the baseline")
    results["rss_idle_kib"] = tokend.rss_kib()

    # As deployed: [access] (the bench runs as root: a rule for uid 0), a rate limit no load reaches, and
    # [audit]. Every line is checked to be written.
    audit_path = os.path.join(tempfile.mkdtemp(prefix="tokend-bench-audit-"), "audit.jsonl")
    deployed = Tokend(idp, [RESOURCE], extra=DEPLOYED.format(audit=audit_path, rate="1000000/s"))
    deployed.wait_ready()

    # Throughput and latency, alternating tokend, deployed tokend and the baseline every round.
    for mode, close in [("keepalive", False), ("new_connection", True)]:
        rows = {"tokend": [], "deployed": [], "baseline": []}
        for i in range(ROUNDS):
            order = [("tokend", tokend.url(Q)), ("deployed", deployed.url(Q)),
                     ("baseline", f"http://127.0.0.1:{base_port}{Q}")]
            order = order[i % 3:] + order[:i % 3]
            for name, url in order:
                rows[name].append(wrk(url, close=close))
        t, d, b = rows["tokend"], rows["deployed"], rows["baseline"]
        results[mode] = {
            "tokend": {k: median(t, k) for k in ["rps", "p50_ms", "p99_ms"]},
            "deployed": {k: median(d, k) for k in ["rps", "p50_ms", "p99_ms"]},
            "baseline": {k: median(b, k) for k in ["rps", "p50_ms", "p99_ms"]},
            "throughput_ratio": statistics.median(x["rps"] / y["rps"] for x, y in zip(t, b)),
            "throughput_ratio_rounds": [round(x["rps"] / y["rps"], 3) for x, y in zip(t, b)],
            "p99_ratio": statistics.median(x["p99_ms"] / y["p99_ms"] for x, y in zip(t, b)),
            "deployed_ratio": statistics.median(x["rps"] / y["rps"] for x, y in zip(d, b)),
            "deployed_ratio_rounds": [round(x["rps"] / y["rps"], 3) for x, y in zip(d, b)],
            "deployed_requests": sum(x["requests"] for x in d),
        }
    deployed.stop()
    results["audit"] = audit_counts(audit_path, results["keepalive"]["deployed_requests"]
                                    + results["new_connection"]["deployed_requests"])
    baseline.kill()

    # p99 during refreshes: 50 configured resources with 12 s tokens (refreshed every few seconds) vs the
    # steady tokend above, alternating.
    short_idp = Idp(ttl=12)
    many = [f"https://r{i}.example" for i in range(50)]
    busy = Tokend(short_idp, many, min_lifetime="4s")
    busy.wait_ready()
    steady, refreshing = [], []
    calls_before = short_idp.calls()
    for _ in range(ROUNDS):
        refreshing.append(wrk(busy.url(f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={many[0]}")))
        steady.append(wrk(tokend.url(Q)))
    results["refresh"] = {
        "steady_p99_ms": median(steady, "p99_ms"),
        "refreshing_p99_ms": median(refreshing, "p99_ms"),
        "p99_ratio": statistics.median(r["p99_ms"] / s["p99_ms"] for r, s in zip(refreshing, steady)),
        "refreshes_during_run": short_idp.calls() - calls_before,
    }
    busy.stop()
    short_idp.stop()

    # 500 concurrent cold callers of one resource.
    cold = "https://cold.example"
    before = idp.calls()
    answers = []

    def call():
        try:
            answers.append(get(tokend.url(f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={cold}"),
                               {"Metadata": "true"}, timeout=30)[0])
        except Exception as e:
            answers.append(str(e))

    threads = [threading.Thread(target=call) for _ in range(500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results["cold_500"] = {"upstream_calls": idp.calls() - before, "ok": answers.count(200), "callers": 500}

    # RSS after ~1M requests over 100 resources.
    lua = os.path.join(tokend.dir, "rotate.lua")
    with open(lua, "w") as f:
        f.write('local i = 0\nrequest = function()\n  i = (i + 1) % 100\n'
                '  return wrk.format("GET", "/metadata/identity/oauth2/token?api-version=2018-02-01'
                '&resource=https://r" .. i .. ".example")\nend\n')
    served = 0
    deadline = time.time() + 120
    while served < 1_000_000 and time.time() < deadline:
        served += wrk(tokend.url("/"), seconds=10, script=lua)["requests"]
    results["rss_after_requests"] = {"requests": served, "resources": 100, "rss_kib": tokend.rss_kib()}
    tokend.stop()

    results["flood"] = flood(idp)

    # Start-up to the first answer, no pre-warm (no configured resource).
    # The bare baseline measured the same way shows what process start and the measuring loop cost.
    startups, base_startups = [], []
    for _ in range(9):
        t = Tokend(idp, [])
        startups.append(t.up_after * 1000)
        t.stop()
        port = free_port()
        started = time.perf_counter()
        base = subprocess.Popen([BASELINE, f"127.0.0.1:{port}", body_file], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        base_startups.append((first_answer(port) - started) * 1000)
        base.kill()
        base.wait()
    results["startup_ms"] = statistics.median(startups)
    results["baseline_startup_ms"] = statistics.median(base_startups)
    idp.stop()
    results["binary_bytes"] = os.path.getsize(TOKEND)

    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench/results.json"), "w") as f:
        json.dump(results, f, indent=2)
    k, n, r = results["keepalive"], results["new_connection"], results["refresh"]
    a, f = results["audit"], results["flood"]
    rows = [
        ("keep-alive throughput, tokend / baseline", f"{k['throughput_ratio']:.2f}x",
         f"{k['tokend']['rps']:.0f} vs {k['baseline']['rps']:.0f} req/s; rounds "
         f"{min(k['throughput_ratio_rounds']):.2f}-{max(k['throughput_ratio_rounds']):.2f}", ">= 0.95x"),
        ("keep-alive p99, tokend / baseline", f"{k['p99_ratio']:.2f}x",
         f"{k['tokend']['p99_ms']:.2f} vs {k['baseline']['p99_ms']:.2f} ms", "<= 1.2x"),
        ("new-connection throughput (caller lookup on)", f"{n['throughput_ratio']:.2f}x",
         f"{n['tokend']['rps']:.0f} vs {n['baseline']['rps']:.0f} req/s", ">= 0.90x"),
        ("new-connection p99", f"{n['p99_ratio']:.2f}x",
         f"{n['tokend']['p99_ms']:.2f} vs {n['baseline']['p99_ms']:.2f} ms", "<= 1.2x"),
        ("keep-alive, [access] + [audit] / baseline", f"{k['deployed_ratio']:.2f}x",
         f"{k['deployed']['rps']:.0f} vs {k['baseline']['rps']:.0f} req/s; rounds "
         f"{min(k['deployed_ratio_rounds']):.2f}-{max(k['deployed_ratio_rounds']):.2f}", ">= 0.90x"),
        ("new connection, [access] + [audit] / baseline", f"{n['deployed_ratio']:.2f}x",
         f"{n['deployed']['rps']:.0f} vs {n['baseline']['rps']:.0f} req/s; rounds "
         f"{min(n['deployed_ratio_rounds']):.2f}-{max(n['deployed_ratio_rounds']):.2f}", ">= 0.85x"),
        ("audit lines for tokens served (deployed)", "all" if a["every_line_written"] else "MISSING",
         f"{a['issued']} issued lines, {a['served_by_wrk']} answers; {a['with_process']} with process", "all"),
        ("another user's p90 under a flood / without", f"{f['p90_ratio']:.2f}x",
         f"{f['flooded']['p90_ms']:.1f} vs {f['quiet']['p90_ms']:.1f} ms (max {f['flooded']['max_ms']:.0f} ms); "
         f"flood {f['flood']['requests']} req", "report"),
        ("p99 during refreshes / steady", f"{r['p99_ratio']:.2f}x",
         f"{r['refreshing_p99_ms']:.2f} vs {r['steady_p99_ms']:.2f} ms ({r['refreshes_during_run']} refreshes)",
         "<= 1.2x"),
        ("upstream calls, 500 cold callers", str(results["cold_500"]["upstream_calls"]),
         f"{results['cold_500']['ok']} of 500 answered 200", "1"),
        ("RSS idle", f"{results['rss_idle_kib'] / 1024:.1f} MiB", "", "<= 10 MiB"),
        ("RSS after requests over 100 resources", f"{results['rss_after_requests']['rss_kib'] / 1024:.1f} MiB",
         f"{results['rss_after_requests']['requests']} requests", "<= 16 MiB"),
        ("start-up to first answer", f"{results['startup_ms']:.1f} ms",
         f"median of 9; bare baseline {results['baseline_startup_ms']:.1f} ms", "<= 20 ms"),
        ("release binary", f"{results['binary_bytes'] / 2**20:.1f} MiB", "", "<= 10 MiB"),
    ]
    print(f"\ntokend benchmark, commit {results['commit']}, {results['machine']}, {ROUNDS} rounds of {SECONDS} s")
    print(f"{'measure':48} {'value':>10}  {'detail':44} target")
    for name, value, detail, target in rows:
        print(f"{name:48} {value:>10}  {detail:44} {target}")
    print("\nresults: target/bench/results.json")


if __name__ == "__main__":
    main()
