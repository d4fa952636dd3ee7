#!/usr/bin/env python3
"""claude-proxy benchmarks: one command, figures and ratios measured side by side in one run.

    python3 bench/run.py            # all four
    python3 bench/run.py ttft load  # some of them

Everything runs on loopback against the fake Anthropic upstream from tests/ (it answers at
once, so the times are the CLI's and the proxy's own).  The real CLI is the pinned one in
.cli/ (bash .ci/run installs it) or $CLAUDE_TEST_BIN.  Machines here are noisy (2 cores):
quote medians and ratios, not single runs.

1. ttft        time to first token: bare CLI vs proxy without pool vs proxy with pool
                (reuse off here; bench/reuse.py measures the reused path), interleaved in a
                turning order, each taken with the warm proxy's pool refilled and settled,
                the proxies timed from a raw socket
2. passthrough delay from the CLI printing a delta to the client reading it (500 deltas)
3. load        64 concurrent streaming clients, cap 4, pool 2, reuse off
4. footprint   start-up to first /health, idle RSS of the proxy (children excluded)
"""
import http.client
import json
import os
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import fake_upstream  # noqa: E402
import harness  # noqa: E402
from harness import base_env  # noqa: E402

PROXY = ROOT / "claude_openai_proxy.py"
FAKE_CLAUDE = ROOT / "tests" / "fake_claude.py"
CLAUDE = os.environ.get("CLAUDE_TEST_BIN") or str(ROOT / ".cli" / "node_modules" / ".bin" / "claude")
HOME = tempfile.mkdtemp(prefix="claude-proxy-bench-home-")
UP = fake_upstream.FakeUpstream()
RESULTS = []
#: `--quick` (bench/all.py --quick, run by .ci/run): a few iterations each, to show that every
#: bench still runs; its figures mean nothing
QUICK = "--quick" in sys.argv[1:]


def size(full, quick):
    """An iteration count: `full`, or `quick` under --quick."""
    return quick if QUICK else full


#: the pool of a proxy that leaves its size to the proxy (its default, 2 here), which the benches
#: wait for; --quick gives such proxies a pool of 1: the same paths, fewer CLI start-ups
POOL = size(2, 1)


def settle(seconds):
    """Wait `seconds` for a CLI that was just started to finish booting, or for the proxy to
    finish what follows a request, so that what is timed next is the steady state.  Under
    --quick only a moment: its figures mean nothing, and a second here is one in CI."""
    time.sleep(size(seconds, 0.05))


def env_for(claude_bin, **extra):
    """The proxy's environment, built exactly as the tests build it."""
    return base_env(HOME, UP.url, claude_bin, **extra)


class Proxy(harness.Proxy):
    """A proxy on the bench's HOME and fake upstream (tests/harness.py starts and stops it)."""

    def __init__(self, claude_bin=CLAUDE, script=PROXY, **extra):
        if QUICK:
            extra.setdefault("CLAUDE_PROXY_POOL_SIZE", POOL)
        super().__init__(env_for(claude_bin, **extra), script=script)

    def wait_pool(self, n, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            c.request("GET", "/health")
            if json.loads(c.getresponse().read())["idle"]["ready"] >= n:
                settle(2.0)           # ready = spawned; let it finish booting, as in steady use
                return
            time.sleep(0.05)

    def first_token(self, text):
        """Seconds from writing a streaming request on a connected raw socket to reading its
        first content delta: no client library's own time in the figure."""
        body = json.dumps({"model": "sonnet", "stream": True,
                           "messages": [{"role": "user", "content": text}]}).encode()
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                "application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as s:
            seen, first = b"", None
            t0 = time.perf_counter()
            s.sendall(head.encode() + body)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                if first is None:
                    seen += chunk
                    if re.search(rb'"content": "[^"]', seen):
                        first = time.perf_counter() - t0
        return first

    def rss_kb(self, field="VmRSS"):
        for line in open("/proc/%d/status" % self.proc.pid):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    def stream(self, text, on_chunk=None):
        """One streaming chat request; returns (seconds to first content, total seconds, chunks)."""
        body = json.dumps({"model": "sonnet", "stream": True,
                           "messages": [{"role": "user", "content": text}]})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = c.getresponse()
        if resp.status != 200:
            raise RuntimeError("status %d: %s" % (resp.status, resp.read()[:300]))
        first, chunks = None, 0
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                chunks += 1
                if on_chunk:
                    on_chunk(line, time.time())
            elif line.startswith(b"data: [DONE]"):
                break
        c.close()
        return first, time.perf_counter() - t0, chunks



def report(name, value, unit, target=None, ok=None):
    line = "  %-46s %10.3f %s" % (name, value, unit)
    if target:
        line += "   target %s -> %s" % (target, "PASS" if ok else "MISS")
    RESULTS.append((name, value, unit, target, ok))
    print(line, flush=True)


def bare_cli_ttft(prestarted=False):
    """The CLI spawned directly with the proxy's own argv, env and stdin lines; with
    `prestarted`, the clock starts only when the lines are written to a booted process."""
    sys.path.insert(0, str(ROOT))
    import claude_openai_proxy as cp
    cfg, _ = cp.load_config(["--claude-bin", CLAUDE], env_for(CLAUDE))
    req = cp.Request(model="sonnet", cli_model="sonnet",
                     messages=[cp.Message("user", [{"type": "text", "text": "hi"}])],
                     handler=cp.HANDLERS["generic"])
    launch = cp.launch_of(req)
    tmp, work = tempfile.mkdtemp(), tempfile.mkdtemp()
    lines = "".join(json.dumps(x) + "\n" for x in cp.control_lines(req, req.messages)).encode()
    t0 = time.perf_counter()
    p = subprocess.Popen(cp.cli_argv(cfg, launch), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=cp.cli_env(cfg, launch, tmp), cwd=work)
    if prestarted:
        settle(2.0)
        t0 = time.perf_counter()
    p.stdin.write(lines)
    p.stdin.flush()
    first = None
    for raw in p.stdout:
        if b'"text_delta"' in raw:
            first = time.perf_counter() - t0
            break
    p.kill()
    p.wait()
    return first


def bench_ttft(rounds=size(7, 1)):
    print("\n1. time to first token (real CLI %s, fake upstream; median of %d)" % (CLAUDE, rounds))
    # one-message requests: no conversation to keep, and a kept process left idle beside the
    # measurement is noise.  The default pool of 2: after two requests with the same system
    # prompt, one of its processes gets it ahead of time.
    # reuse off: this is the one-process-per-request design (reuse: bench/reuse.py)
    cold = Proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_REUSE=0)
    warm = Proxy(CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_REUSE=0)
    bare, nopool, pool, bare_warm = [], [], [], []
    kinds = [(bare, bare_cli_ttft), (bare_warm, lambda: bare_cli_ttft(prestarted=True)),
             (nopool, lambda: cold.first_token("hi")), (pool, lambda: warm.first_token("hi"))]
    try:
        for r in range(rounds):        # interleaved, in a turning order, so drift hits all alike
            for figures, measure in kinds[r % 4:] + kinds[:r % 4]:
                # never right after the warm proxy handed out a pool process: its replacement
                # starts in the background, and would be timed with whatever comes next
                warm.wait_pool(POOL)
                figures.append(measure())
    finally:
        cold.stop()
        warm.stop()
    b, n, p, w = (statistics.median(x) for x in (bare, nopool, pool, bare_warm))
    report("bare CLI (spawn + lines -> first delta)", b * 1000, "ms")
    report("bare CLI, pre-started (lines -> first delta)", w * 1000, "ms")
    report("proxy, no pool", n * 1000, "ms")
    report("proxy, warm pool (size 1: --quick)" if QUICK else "proxy, warm pool (default size 2)",
           p * 1000, "ms")
    report("proxy pool overhead over pre-started bare CLI", (p - w) * 1000, "ms")
    report("proxy no-pool overhead over bare CLI", (n - b) * 1000, "ms", "<= 20 ms", n - b <= 0.020)
    report("pool / no-pool", p / n, "ratio", "<= 0.25", p / n <= 0.25)


def bench_passthrough(deltas=size(500, 20)):
    print("\n2. stream pass-through (fake CLI prints %d timestamped deltas, 2 ms apart)" % deltas)
    proxy = Proxy(str(FAKE_CLAUDE), CLAUDE_PROXY_POOL_SIZE=0)
    delays = []

    def on_chunk(line, now):
        text = json.loads(line[6:])["choices"][0]["delta"]["content"]
        delays.append(now - float(text.rstrip(";")))
    try:
        proxy.stream("[[stamps:%d]]" % deltas, on_chunk)
    finally:
        proxy.stop()
    delays.sort()
    p50, p99 = delays[len(delays) // 2], delays[int(len(delays) * 0.99) - 1]
    report("deltas received", len(delays), "")
    report("p50 delay CLI print -> client read", p50 * 1000, "ms", "<= 2 ms", p50 <= 0.002)
    report("p99 delay CLI print -> client read", p99 * 1000, "ms", "<= 5 ms", p99 <= 0.005)


def bench_load(clients=size(64, 2)):
    print("\n3. load: %d concurrent streaming clients, cap 4, pool 2 (real CLI)" % clients)
    proxy = Proxy(CLAUDE_PROXY_POOL_SIZE=2, CLAUDE_PROXY_MAX_CONCURRENCY=4, CLAUDE_PROXY_QUEUE_TIMEOUT=300,
                  CLAUDE_PROXY_REUSE=0)
    proxy.wait_pool(2)
    results, errors, order, lock = {}, [], [], threading.Lock()
    peak = [proxy.rss_kb()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proxy.rss_kb() or 0)
            time.sleep(0.05)

    def client(i):
        try:
            first, total, _ = proxy.stream("client %d" % i)
            with lock:
                results[i] = (first, total)
                order.append(i)
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append("%d: %s" % (i, exc))

    threading.Thread(target=sample, daemon=True).start()
    threads = []
    t0 = time.perf_counter()
    for i in range(clients):
        t = threading.Thread(target=client, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.01)          # a defined arrival order
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    hwm = proxy.rss_kb("VmHWM")
    proxy.stop()
    lat = sorted(v[1] for v in results.values())
    # FIFO: with 4 slots a request can finish at most a few places away from its arrival
    inversions = sum(1 for a, b in zip(order, order[1:]) if b < a - 4)
    report("errors", len(errors), "", "0", not errors)
    report("requests completed", len(results), "")
    report("throughput", len(results) / wall, "req/s")
    report("latency p50", lat[len(lat) // 2], "s")
    report("latency p99", lat[max(0, int(len(lat) * 0.99) - 1)], "s")
    report("completions out of arrival order (> 4 places)", inversions, "", "0", inversions == 0)
    report("proxy peak RSS (VmHWM, children excluded)", hwm / 1024, "MB", "<= 60 MB", hwm <= 60 * 1024)
    if errors:
        print("   first errors:", errors[:3])


def bench_footprint(rounds=size(5, 1)):
    print("\n4. footprint (median of %d starts)" % rounds)
    starts, rss = [], []
    for _ in range(rounds):
        p = Proxy(CLAUDE_PROXY_POOL_SIZE=0)
        starts.append(p.startup)
        settle(0.3)
        rss.append(p.rss_kb())
        p.stop()
    s, r = statistics.median(starts), statistics.median(rss)
    # the interpreter's own share on this machine, for comparison (site hooks differ by host)
    bare_start, bare_rss = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"],
                             capture_output=True, text=True).stdout
        bare_start.append(time.perf_counter() - t0)
        bare_rss.append(int(out.split("VmRSS:")[1].split()[0]))
    bs, br = statistics.median(bare_start), statistics.median(bare_rss)
    report("start-up to first /health", s * 1000, "ms", "<= 150 ms", s <= 0.150)
    report("  of which: bare `python3 -c` start-up here", bs * 1000, "ms")
    report("idle RSS (children excluded)", r / 1024, "MB", "<= 25 MB", r <= 25 * 1024)
    report("  of which: bare `python3 -c` RSS here", br / 1024, "MB")


BENCHES = {"ttft": bench_ttft, "passthrough": bench_passthrough, "load": bench_load,
           "footprint": bench_footprint}


def main(names):
    if not os.path.exists(CLAUDE):
        raise SystemExit("the pinned CLI is missing: run bash .ci/run first, or set CLAUDE_TEST_BIN")
    print("claude-proxy benchmarks (%s, %d cores)" % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count()))
    for name in [n for n in names if n != "--quick"] or list(BENCHES):
        BENCHES[name]()
    UP.close()
    missed = [r[0] for r in RESULTS if r[3] and not r[4]]
    print("\n%d targets checked, %d missed%s" % (sum(1 for r in RESULTS if r[3]), len(missed),
                                                 (": " + ", ".join(missed)) if missed else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
