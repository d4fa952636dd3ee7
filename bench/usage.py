#!/usr/bin/env python3
"""What the usage history costs (issue 24): the proxy's CPU per request with and without it,
and a GET /v1/usage?group_by=day over 90 days of 1,000 requests a day.

    python3 bench/usage.py            # 400 requests each way; 90 days x 1,000 requests
    python3 bench/usage.py --quick    # a smoke run (bench/all.py --quick, CI)

Printed:
- recording, in-process: CPU (thread time of this process: the caller's add() and the writer
  thread's batched transactions) per row for 20,000 rows.  Target: <= 1 ms per request.
- recording, the whole proxy: its own CPU (utime + stime of the proxy process, from
  /proc/PID/stat; the fake CLI's CPU is its children's and not counted) per request over N
  sequential requests on tests/fake_claude.py, with CLAUDE_PROXY_HISTORY_DAYS=90 and =0, and
  the difference.  Noisier than the in-process figure: the rest of a request costs far more.
- the query: the state store filled with 90 days x 1,000 requests (3 keys, 3 models, 2 logins)
  and GET /v1/usage?group_by=day&since=<90 days ago>, median of 20 over HTTP (loopback, one
  keep-alive connection), and of `UsageHistory.query` in-process.  Target: <= 200 ms.
"""
import http.client
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import claude_openai_proxy as cop  # noqa: E402
import harness  # noqa: E402

QUICK = "--quick" in sys.argv


def proxy_cpu(pid):
    """Seconds of CPU the process itself (all its threads) has used."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def env_for(home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE", "ANTHROPIC"))}
    env.update(HOME=home, CLAUDE_BIN=str(harness.FAKE_CLAUDE), CLAUDE_PROXY_POOL_SIZE="0",
               CLAUDE_PROXY_SESSIONS="0", CLAUDE_PROXY_STATE_DIR=os.path.join(home, "state"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def per_request_cpu(days, n, warm=5):
    home = tempfile.mkdtemp(prefix="bench-usage-")
    proxy = harness.Proxy(env_for(home, CLAUDE_PROXY_HISTORY_DAYS=days))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        body = json.dumps({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]})

        def one():
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
        for _ in range(warm):
            one()                                   # warm up
        time.sleep(0.05 if QUICK else 0.5)
        before = proxy_cpu(proxy.proc.pid)
        for _ in range(n):
            one()
        time.sleep(0.05 if QUICK else 1.0)      # the writer's last batch
        return (proxy_cpu(proxy.proc.pid) - before) / n * 1000
    finally:
        proxy.stop()


def in_process_recording(rows):
    state = tempfile.mkdtemp(prefix="bench-usage-rec-")
    h = cop.UsageHistory(cop.StateStore(cop.Config(state_dir=state)), 90, cop.PRICES)
    row = (time.time(), "coder", "default", "sonnet", "/v1/chat/completions", 200, 12, 9, 300,
           40, 120.5, 900.1, "reused")
    cpu0 = time.process_time()
    for i in range(rows):
        h.add(row)
        if i % 5000 == 4999:            # a burst no larger than the queue holds
            h.flush(60)
    h.flush(60)
    cpu = time.process_time() - cpu0
    assert h.report()["written"] == rows and h.lost == 0, h.report()
    h.close()
    return cpu / rows * 1000


def fill(state, days, per_day):
    """The store under `state` with `days` x `per_day` requests ending now."""
    h = cop.UsageHistory(cop.StateStore(cop.Config(state_dir=state)), 365, cop.PRICES)
    rnd, now = random.Random(1), time.time()
    for d in range(days):
        for _ in range(per_day):
            t = now - (d + rnd.random()) * 86400
            h.add((t, rnd.choice(["coder", "nightly", "chat-ui"]), rnd.choice(["home", "work"]),
                   rnd.choice(["sonnet", "opus", "haiku"]), "/v1/chat/completions",
                   200 if rnd.random() > 0.02 else 429, rnd.randint(1, 500),
                   rnd.randint(1, 2000), rnd.randint(0, 80000), rnd.randint(0, 4000),
                   rnd.uniform(50, 900), rnd.uniform(500, 30000), "reused"))
        if h.queue.qsize() > cop.HISTORY_QUEUE // 2:
            h.flush(60)
    h.flush(120)
    assert h.report()["written"] == days * per_day, h.report()
    h.close()
    h.store.close()


def query_times(days, per_day):
    home = tempfile.mkdtemp(prefix="bench-usage-q-")
    state = os.path.join(home, "state")
    fill(state, days, per_day)
    since = int(time.time() - days * 86400)
    h = cop.UsageHistory(cop.StateStore(cop.Config(state_dir=state)), 365, cop.PRICES)
    local, times = [], 3 if QUICK else 20
    for _ in range(times):
        t0 = time.perf_counter()
        rows = h.query(since, time.time(), "day")
        local.append(time.perf_counter() - t0)
    assert sum(r["requests"] for r in rows) == days * per_day
    h.close()
    h.store.close()
    proxy = harness.Proxy(env_for(home))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        over_http = []
        for _ in range(times):
            t0 = time.perf_counter()
            conn.request("GET", "/v1/usage?group_by=day&since=%d" % since)
            resp = conn.getresponse()
            got = json.loads(resp.read())
            over_http.append(time.perf_counter() - t0)
            assert resp.status == 200 and got["total"]["requests"] == days * per_day, got
    finally:
        proxy.stop()
    return statistics.median(local) * 1000, statistics.median(over_http) * 1000


def main():
    n = 3 if QUICK else 400
    rows = 2000 if QUICK else 20000
    days, per_day = (9, 100) if QUICK else (90, 1000)
    rec = in_process_recording(rows)
    print("recording in-process: %.3f ms CPU per row over %d rows (target <= 1 ms)" % (rec, rows))
    warm = 1 if QUICK else 5
    with_h, without = per_request_cpu(90, n, warm), per_request_cpu(0, n, warm)
    print("proxy CPU per request over %d requests: %.2f ms with history, %.2f ms without "
          "(difference %.2f ms; target <= 1 ms)" % (n, with_h, without, with_h - without))
    local, http_ms = query_times(days, per_day)
    print("GET /v1/usage?group_by=day over %d days x %d requests: median %.1f ms over HTTP, "
          "%.1f ms in-process (target <= 200 ms)" % (days, per_day, http_ms, local))


if __name__ == "__main__":
    main()
