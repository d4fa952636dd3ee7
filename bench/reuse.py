#!/usr/bin/env python3
"""Reuse benchmarks (issue 13): one warm CLI serving request after request, measured side by
side with the one-process-per-request design in the same run.

    python3 bench/reuse.py                    # all
    python3 bench/reuse.py ttft cpu load      # some
    python3 bench/reuse.py mixed 1000         # `mixed` with its request count

Real CLI (pinned, .cli/) on the fake upstream from tests/ (it answers at once, so the times
are the CLI's and the proxy's own).  The machine is shared and has 2 cores: single figures are
noisy, the ratios measured in one run are what counts.

1. ttft    one-shot time to first token on the reused path vs a spawned bare CLI and vs a
           pre-started bare CLI (the pool's floor); targets <= 0.1 and <= 0.35
2. cpu     CLI CPU (children's utime+stime from /proc, reaped and live) per one-shot request
           over >= 50 requests, reuse on vs off (pool 2 in both); target <= 0.2
3. load    64 streaming clients, cap 4: throughput with reuse vs reuse off; target >= 3x
4. convo   a 20-turn conversation with a session signal (`user`), and one without: shared block
           prefix between consecutive upstream requests; target 100 % from turn 1 to turn 2 on
5. growth  RSS of one process serving 200 requests in a row (where growth flattens: the
           recycle defaults)
6. mixed   proxy + CLIs PSS after N mixed requests (one-shot with 3 system prompts, streaming
           or not, conversations with and without a signal), against the budget it chose
"""
import http.client
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import CLAUDE, POOL, UP, Proxy, bare_cli_ttft, report, RESULTS, settle, size  # noqa: E402
from history import shared_fraction  # noqa: E402
import fake_upstream  # noqa: E402

sys.path.insert(0, str(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import claude_openai_proxy as cp  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def health(proxy):
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def until(proxy, fn, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = health(proxy)
        if fn(h):
            return h
        time.sleep(0.02)
    raise RuntimeError("timed out waiting on /health: %s" % health(proxy)["idle"])


def post(proxy, body, path="/v1/chat/completions"):
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = c.getresponse()
    data = resp.read()
    c.close()
    if resp.status != 200:
        raise RuntimeError("status %d: %s" % (resp.status, data[:300]))
    return data


def stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(stat(int(d))[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError):
                pass
    return out


def cli_cpu(proxy):
    """Seconds of CPU used by the proxy's CLI children so far: reaped (cutime+cstime of the
    proxy) plus live ones (utime+stime)."""
    s = stat(proxy.proc.pid)
    total = int(s[13]) + int(s[14])        # cutime, cstime (fields 16, 17)
    for pid in children(proxy.proc.pid):
        try:
            c = stat(pid)
            total += int(c[11]) + int(c[12])   # utime, stime (fields 14, 15)
        except OSError:
            pass
    return total / TICK


def rss_mb(pid):
    try:
        for line in open("/proc/%d/status" % pid):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def total_rss_mb(proxy):
    return rss_mb(proxy.proc.pid) + sum(rss_mb(p) for p in children(proxy.proc.pid))


def total_pss_mb(proxy):
    """What the proxy and its CLIs hold together: their PSS (shared pages counted once)."""
    return sum((cp.process_memory(p) or {"pss": 0})["pss"]
               for p in [proxy.proc.pid] + children(proxy.proc.pid)) / 2 ** 20


def bench_ttft(rounds=size(7, 1)):
    print("\n1. one-shot time to first token (median of %d, interleaved)" % rounds)
    reuse = Proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    spawn = Proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_REUSE=0)
    # sessions on (the default): the last one-shot's process waits kept as a first message
    # and is rewound on the next request's path
    kept = Proxy(CLAUDE_PROXY_POOL_SIZE=0)
    bare, bare_warm, reused, spawned, rewound = [], [], [], [], []
    try:
        reuse.stream("warm-up")
        kept.stream("warm-up")
        for _ in range(rounds):
            until(kept, lambda h: h["idle"]["idle"]["kept"] == 1)
            settle(0.5)
            rewound.append(kept.stream("hi")[0])
            bare.append(bare_cli_ttft())
            bare_warm.append(bare_cli_ttft(prestarted=True))
            spawned.append(spawn.stream("hi")[0])
            until(reuse, lambda h: h["idle"]["idle"]["reused"] == 1)
            settle(0.5)                        # the reset is done; let the CLI settle as in use
            reused.append(reuse.stream("hi")[0])
        hits = health(reuse)["idle"]["hits"]["reused"]
    finally:
        reuse.stop()
        spawn.stop()
        kept.stop()
    b, w, r, s, k = (statistics.median(x) for x in (bare, bare_warm, reused, spawned, rewound))
    report("bare CLI spawned (spawn + lines -> first delta)", b * 1000, "ms")
    report("bare CLI pre-started (lines -> first delta)", w * 1000, "ms")
    report("proxy, spawn per request (pool 0, reuse off)", s * 1000, "ms")
    report("proxy, reused process (%d reused hits)" % hits, r * 1000, "ms")
    report("proxy, reused after a kept first message (rewound on the path)", k * 1000, "ms")
    report("reused / spawned bare CLI", r / b, "ratio", "<= 0.1", r / b <= 0.1)
    report("reused / pre-started bare CLI", r / w, "ratio", "<= 0.35", r / w <= 0.35)


def bench_cpu(n=size(60, 1)):
    print("\n2. CLI CPU per one-shot request (%d sequential requests each, pool %d)" % (n, POOL))
    out = {}
    for label, extra in (("reuse off", dict(CLAUDE_PROXY_REUSE=0)), ("reuse on", {})):
        proxy = Proxy(CLAUDE_PROXY_SESSIONS=0, **extra)
        try:
            until(proxy, lambda h: h["idle"]["ready"] >= POOL)
            settle(2.0)                       # the pool has booted
            c0 = cli_cpu(proxy)
            for i in range(n):
                proxy.stream("question %d" % i)
            settle(2.0)                       # resets and refills after the last request
            out[label] = (cli_cpu(proxy) - c0) / n
            started = health(proxy)["cli_processes_started"]
        finally:
            proxy.stop()
        report("%s: CLI CPU per request (%d CLIs started)" % (label, started), out[label], "s")
    ratio = out["reuse on"] / out["reuse off"]
    report("CPU per request, reuse on / off", ratio, "ratio", "<= 0.2", ratio <= 0.2)


def load(clients, **extra):
    proxy = Proxy(CLAUDE_PROXY_MAX_CONCURRENCY=4, CLAUDE_PROXY_QUEUE_TIMEOUT=600,
                  CLAUDE_PROXY_SESSIONS=0, **extra)
    until(proxy, lambda h: h["idle"]["ready"] >= POOL)
    settle(2.0)
    done, errors, lock = [], [], threading.Lock()

    def client(i):
        try:
            proxy.stream("client %d" % i)
            with lock:
                done.append(i)
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(str(exc))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    idle = health(proxy)["idle"]
    proxy.stop()
    return len(done) / wall, errors, idle


def bench_load(clients=size(64, 2)):
    print("\n3. throughput: %d concurrent streaming clients, cap 4, pool %d" % (clients, POOL))
    off, err_off, _ = load(clients, CLAUDE_PROXY_REUSE=0)
    on, err_on, idle = load(clients)
    report("reuse off (today's design): throughput", off, "req/s")
    report("reuse on: throughput (%d reused hits)" % idle["hits"]["reused"], on, "req/s")
    report("errors (both runs)", len(err_off) + len(err_on), "", "0", not (err_off or err_on))
    report("throughput reuse on / off", on / off, "ratio", ">= 3", on / off >= 3)


def bench_convo(turns=size(20, 2)):
    for signal in (True, False):
        convo(turns, signal)


def convo(turns, signal):
    print("\n4. a %d-turn conversation %s" % (
        turns, "with a session signal (`user`)" if signal else "without a session signal"))
    proxy = Proxy()
    messages, calls = [], []
    try:
        until(proxy, lambda h: h["idle"]["ready"] >= 1)
        for n in range(turns):
            messages.append({"role": "user", "content": "Turn %d question: %s" % (n, "lorem " * 20)})
            UP.default = fake_upstream.text("Turn %d answer: %s" % (n, "dolor " * 20))
            before = len(UP.model_calls)
            body = json.loads(post(proxy, dict({"model": "sonnet", "messages": messages},
                                               **({"user": "bench-user"} if signal else {}))))
            calls.append(UP.model_calls[before]["messages"])
            messages.append({"role": "assistant",
                             "content": body["choices"][0]["message"]["content"]})
        idle = health(proxy)["idle"]
    finally:
        proxy.stop()
        UP.default = fake_upstream.text("Hello from the fake upstream.")
    raw = [shared_fraction(a, b, False) for a, b in zip(calls, calls[1:])]
    report("turns served by the kept process", idle["hits"]["kept"], "of %d" % (turns - 1))
    report("shared prefix turn 1 -> 2 (raw blocks)", raw[0] * 100, "%", "100 %", raw[0] == 1.0)
    report("shared prefix, lowest over all steps (raw)", min(raw) * 100, "%", "100 %", min(raw) == 1.0)


def bench_growth(n=size(200, 3), every=size(25, 1)):
    print("\n5. RSS of one CLI process serving %d requests in a row" % n)
    proxy = Proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_REUSE=n + 1,
                  CLAUDE_PROXY_RECYCLE_RSS=0)
    samples = []
    try:
        for i in range(n + 1):
            until(proxy, lambda h: h["idle"]["idle"]["reused"] == 1 or i == 0)
            if i % every == 0 and i:
                kids = children(proxy.proc.pid)
                samples.append((i, sum(rss_mb(k) for k in kids)))
            if i < n:
                proxy.stream("question %d" % i)
        started = health(proxy)["cli_processes_started"]
    finally:
        proxy.stop()
    for i, mb in samples:
        report("RSS after %3d requests" % i, mb, "MB")
    report("processes started", started, "")
    first, last = samples[2][1] - samples[0][1], samples[-1][1] - samples[-3][1]
    report("growth from request %d to %d / over the last %d" % (every, 3 * every, 2 * every),
           first, "MB / %.1f MB" % last)


def bench_mixed(n=size(1000, 8)):
    print("\n6. proxy + CLIs memory (PSS) after %d mixed requests (defaults, cap 2)" % n)
    proxy = Proxy()
    systems = ["You are terse.", "You are a pirate.", "Answer in French."]
    peak, rng = [0.0], __import__("random").Random(13)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], total_pss_mb(proxy))
            time.sleep(0.25)
    threading.Thread(target=sample, daemon=True).start()
    convos = {}
    try:
        for i in range(n):
            r = rng.random()
            if r < 0.6:                     # one-shot, one of three system prompts
                body = {"model": "sonnet", "messages": [
                    {"role": "system", "content": systems[i % 3]},
                    {"role": "user", "content": "one-shot %d" % i}]}
            else:                           # a turn of one of 4 conversations, half with a signal
                k = i % 4
                msgs = convos.setdefault(k, [])
                if len(msgs) > 20:
                    msgs.clear()
                msgs.append({"role": "user", "content": "conv %d turn %d" % (k, len(msgs))})
                body = {"model": "sonnet", "messages": list(msgs)}
                if k < 2:
                    body["user"] = "user-%d" % k
            if r < 0.6 and rng.random() < 0.5:      # streaming (no system prompt)
                proxy.stream(body["messages"][-1]["content"])
            else:
                answer = json.loads(post(proxy, body))["choices"][0]["message"]["content"]
                if r >= 0.6:
                    convos[i % 4].append({"role": "assistant", "content": answer})
            if i and i % 250 == 0:
                print("   %d requests, proxy + CLIs %.0f MB" % (i, total_pss_mb(proxy)), flush=True)
        settle(2.0)
        end = total_pss_mb(proxy)
        idle = health(proxy)["idle"]
    finally:
        stop.set()
        proxy.stop()
    # the budget counts running and idle CLIs together, at the figure the proxy measured on
    # them; their mapped binary (~80 MB, shared) and the proxy (~60 MB) come once
    budget_mb = idle["budget"] * idle["cli_mb"] + 80 + 60
    report("proxy + CLIs PSS at the end", end, "MB", "<= %.0f MB" % budget_mb, end <= budget_mb)
    report("proxy + CLIs PSS peak", peak[0], "MB", "<= %.0f MB" % budget_mb, peak[0] <= budget_mb)
    report("hits kept / reused / pool+initialized / spawned", idle["hits"]["kept"],
           "/ %d / %d / %d (recycled %d, evicted %d)" % (
               idle["hits"]["reused"], idle["hits"]["pool"] + idle["hits"]["initialized"],
               idle["misses"], idle["recycled"], idle["evicted"]))


BENCHES = {"ttft": bench_ttft, "cpu": bench_cpu, "load": bench_load, "convo": bench_convo,
           "growth": bench_growth, "mixed": bench_mixed}


def main(args):
    if not os.path.exists(CLAUDE):
        raise SystemExit("the pinned CLI is missing: run bash .ci/run first, or set CLAUDE_TEST_BIN")
    print("claude-proxy reuse benchmarks (%s, %d cores, shared machine: figures are noisy, "
          "ratios are from one run)" % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count()))
    names = [a for a in args if a in BENCHES] or list(BENCHES)
    counts = [int(a) for a in args if a.isdigit()]
    for name in names:
        BENCHES[name](*counts) if name == "mixed" and counts else BENCHES[name]()
    UP.close()
    missed = [r[0] for r in RESULTS if r[3] and not r[4]]
    print("\n%d targets checked, %d missed%s" % (sum(1 for r in RESULTS if r[3]), len(missed),
                                                 (": " + ", ".join(missed)) if missed else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
