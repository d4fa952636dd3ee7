#!/usr/bin/env python3
"""What the status page costs: one poll of GET /dashboard/data with an empty request log and
with a full one (200 rows, an hour of per-minute figures), and what a request pays for being
recorded.

    python3 bench/dashboard.py [polls]        # default 200 polls each

Runs one proxy on tests/fake_claude.py (no pool, no sessions: nothing else runs).  Printed:
the page's size, the data endpoint's size and median time per poll (client side, loopback,
one keep-alive connection) empty and full, their ratio, and RequestLog.add's cost per call
measured in-process (the only work the log adds to a request).
"""
import http.client
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import claude_openai_proxy as cop  # noqa: E402
import harness  # noqa: E402


def polls(conn, n):
    times, size = [], 0
    for _ in range(n):
        started = time.perf_counter()
        conn.request("GET", "/dashboard/data")
        resp = conn.getresponse()
        size = len(resp.read())
        times.append(time.perf_counter() - started)
        assert resp.status == 200
    return statistics.median(times) * 1000, size


def main():
    args = [a for a in sys.argv[1:] if a != "--quick"]    # --quick: bench/all.py's smoke run
    quick = "--quick" in sys.argv
    n = int(args[0]) if args else 10 if quick else 200
    home = tempfile.mkdtemp(prefix="bench-dash-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE", "ANTHROPIC"))}
    env.update(HOME=home, CLAUDE_BIN=str(harness.FAKE_CLAUDE),
               CLAUDE_PROXY_POOL_SIZE="0", CLAUDE_PROXY_SESSIONS="0")
    proxy = harness.Proxy(env)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", "/")
        page = conn.getresponse().read()
        polls(conn, 5)                               # warm up (and read `claude --version`)
        empty_ms, empty_size = polls(conn, n)
        body = json.dumps({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]})
        for i in range(3 if quick else 20):          # real rows with tokens and TTFT ...
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json", "User-Agent": "bench/%d" % i})
            conn.getresponse().read()
        for i in range(200):                         # ... and 404s to fill the ring fast
            conn.request("GET", "/no-such-route", headers={"User-Agent": "bench-agent/1.0 " * 8})
            conn.getresponse().read()
        full_ms, full_size = polls(conn, n)
    finally:
        proxy.stop()

    log, usage = cop.RequestLog(), cop.Usage(12, 9, 300, 40)
    entry = {"t": time.time(), "id": "req_x", "status": 200, "account": "", "model": "sonnet",
             "ttft_ms": 123.4}
    started = time.perf_counter()
    for _ in range(20000):
        log.add(dict(entry), usage)
    add_us = (time.perf_counter() - started) / 20000 * 1e6

    print("page (GET /): %d bytes" % len(page))
    print("GET /dashboard/data, empty log: %d bytes, median %.2f ms over %d polls"
          % (empty_size, empty_ms, n))
    print("GET /dashboard/data, 200 rows:  %d bytes, median %.2f ms over %d polls"
          % (full_size, full_ms, n))
    print("full / empty time per poll: %.2f" % (full_ms / empty_ms))
    print("RequestLog.add: %.1f us per request" % add_us)


if __name__ == "__main__":
    main()
