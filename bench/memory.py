#!/usr/bin/env python3
"""The proxy inside a memory limit (issue 21): what a small VPS gets at the default settings.

    python3 bench/memory.py                 # 1 GiB, 64 clients
    python3 bench/memory.py 1G 2G 4G        # one run per limit, then a table for the README
    python3 bench/memory.py --quick         # a few requests, no limit needed (CI smoke)
    options: --clients N (64)  --requests N (4 a client)  --think S (30: a client waits S to 2S
             seconds, at random, between its requests, as people do; it also starts within S)
             --seconds S (300 a limit, then no new request starts)

The proxy runs in a memory cgroup the bench makes (root needed): cgroup v2
/sys/fs/cgroup/claude-proxy-bench with memory.max, else v1 /sys/fs/cgroup/memory/claude-proxy-bench
with memory.limit_in_bytes, else `systemd-run --scope -p MemoryMax=`; where none can be made it
sets CLAUDE_PROXY_MEMORY instead and says so (then nothing enforces the limit).  The proxy sees
the limit itself, from its own cgroup: nothing tells it the size.  Real CLI (.cli/) on the fake
upstream from tests/ (it answers at once).

Clients: two in three send one-shot requests (one system prompt, as an app does), one in three
holds conversations of 4 turns without a session signal; all stream.  Each request carries an
X-Request-Id; the kind of process that served it comes from /dashboard/data, its time to first
token is measured here, from the request's start (so it includes any wait for one of the
`max_concurrency` slots).  Printed: requests served by reused / kept / pre-started / spawned
processes and the median time to first token of each; the peak PSS of the proxy and its CLIs
(sampled every 0.2 s) and the cgroup's own peak against the limit; OOM kills (memory.events
oom_kill, memory.oom_control oom_kill, memory.failcnt).  Targets: nothing OOM-killed, peak
within the limit, >= 90 % of one-shot requests after warm-up (each client's first request)
served by a reused process.
"""
import http.client
import json
import os
import pathlib
import random
import shutil
import statistics
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from run import CLAUDE, PROXY, UP, env_for, settle  # noqa: E402
import harness  # noqa: E402
import claude_openai_proxy as cp  # noqa: E402

NAME = "claude-proxy-bench"
MiB = 2 ** 20


class Limit:
    """A memory cgroup for the proxy (or, where none can be made, the override)."""

    def __init__(self, size, quick=False):
        self.size, self.kind, self.dir, self.prefix, self.env = size, "", None, [], {}
        if quick:
            self.kind, self.env = "CLAUDE_PROXY_MEMORY (quick mode: no cgroup)", \
                {"CLAUDE_PROXY_MEMORY": str(size)}
            return
        v2 = pathlib.Path("/sys/fs/cgroup")
        v1 = pathlib.Path("/sys/fs/cgroup/memory")
        if "memory" in self._read(v2 / "cgroup.controllers").split() and self._make(v2 / NAME):
            (self.dir / "memory.max").write_text(str(size))
            self._try(self.dir / "memory.swap.max", "0")
            self.kind = "cgroup v2 /%s memory.max" % NAME
        elif v1.is_dir() and self._make(v1 / NAME):
            self._try(self.dir / "memory.memsw.limit_in_bytes", "-1")   # lowered with the limit
            (self.dir / "memory.limit_in_bytes").write_text(str(size))
            self._try(self.dir / "memory.memsw.limit_in_bytes", str(size))   # no swap either
            self._try(self.dir / "memory.max_usage_in_bytes", "0")
            self.kind = "cgroup v1 /%s memory.limit_in_bytes" % NAME
        elif shutil.which("systemd-run") and os.path.isdir("/run/systemd/system"):
            self.prefix = ["systemd-run", "--scope", "--quiet", "-p", "MemoryMax=%d" % size,
                           "-p", "MemorySwapMax=0", "--"]
            self.kind = "systemd-run --scope MemoryMax (figures from the scope are not read)"
        else:
            self.kind = "CLAUDE_PROXY_MEMORY: no cgroup could be made here, nothing enforces it"
            self.env = {"CLAUDE_PROXY_MEMORY": str(size)}

    @staticmethod
    def _read(path):
        try:
            return path.read_text()
        except OSError:
            return ""

    @staticmethod
    def _try(path, text):
        try:
            path.write_text(text)
        except OSError:
            pass

    def _make(self, path):
        try:
            if path.exists():
                self._remove(path)
            path.mkdir()
        except OSError:
            return False
        self.dir = path
        return True

    @staticmethod
    def _remove(path):
        for _ in range(50):
            pids = [int(p) for p in Limit._read(path / "cgroup.procs").split()]
            if not pids:
                break
            for pid in pids:            # only what this bench started lives here
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            time.sleep(0.1)
        try:
            path.rmdir()
        except OSError:
            pass

    def argv(self, argv):
        """The proxy's argv: it joins the cgroup itself, then becomes the proxy (no shell)."""
        if self.dir is None:
            return self.prefix + argv
        join = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
                "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
        return [sys.executable, "-c", join, str(self.dir / "cgroup.procs")] + argv[1:]

    def figures(self):
        """(peak bytes or None, OOM kills, times the limit was hit) from the cgroup's files."""
        if self.dir is None:
            return None, None, None
        d, v2 = self.dir, (self.dir / "memory.max").exists()
        if v2:
            events = dict(line.split() for line in self._read(d / "memory.events").splitlines())
            peak = self._read(d / "memory.peak").strip()
            return (int(peak) if peak else None), int(events.get("oom_kill", 0)), \
                int(events.get("max", 0))
        oom = dict(line.split() for line in self._read(d / "memory.oom_control").splitlines())
        stat = dict(line.split() for line in self._read(d / "memory.stat").splitlines())
        kills = int(oom.get("oom_kill", 0)) + int(stat.get("oom_kill", 0))
        return int(self._read(d / "memory.max_usage_in_bytes") or 0), kills, \
            int(self._read(d / "memory.failcnt") or 0)

    def usage(self):
        if self.dir is None:
            return None
        for name in ("memory.current", "memory.usage_in_bytes"):
            text = self._read(self.dir / name).strip()
            if text:
                return int(text)
        return None

    def close(self):
        if self.dir is not None:
            self._remove(self.dir)


def descendants(pid):
    """`pid` and every process below it."""
    return [pid] + harness.descendants(pid)


class Run:
    def __init__(self, limit, clients, per_client, seconds, think):
        self.limit, self.clients, self.per_client, self.seconds = limit, clients, per_client, seconds
        self.think = think
        self.lock = threading.Lock()
        self.results = []          # (request id, client kind, ordinal in client, ttft s, ok)
        self.served = {}           # request id -> served_by (from /dashboard/data)
        self.peak_pss, self.peak_usage, self.errors = 0, 0, []
        self.done = threading.Event()

    def get(self, path, timeout=10):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request("GET", path)
            return json.loads(c.getresponse().read())
        finally:
            c.close()

    def stream(self, rid, messages):
        """One streaming chat request: (seconds to first content, the answer's text)."""
        body = json.dumps({"model": "sonnet", "stream": True, "messages": messages})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=180)
        t0 = time.perf_counter()
        try:
            c.request("POST", "/v1/chat/completions", body,
                      {"Content-Type": "application/json", "X-Request-Id": rid})
            resp = c.getresponse()
            if resp.status != 200:
                raise RuntimeError("status %d: %s" % (resp.status, resp.read()[:200]))
            first, text, ended = None, [], False
            for line in resp:
                if line.startswith(b"data: [DONE]"):
                    ended = True
                    break
                if line.startswith(b"data: {"):
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        raise RuntimeError("stream error: %s" % obj["error"])
                    for ch in obj.get("choices") or []:
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            first = first if first is not None else time.perf_counter() - t0
                            text.append(piece)
            if not ended or first is None:
                raise RuntimeError("stream ended without an answer")
            return first, "".join(text)
        finally:
            c.close()

    def client(self, i):
        kind = "multi-turn" if i % 3 == 2 else "one-shot"
        messages, rng = [], random.Random(i)
        time.sleep(rng.uniform(0, self.think))        # clients arrive over a while
        for n in range(self.per_client):
            if n:
                time.sleep(rng.uniform(self.think, 2 * self.think))
            if time.monotonic() > self.deadline:
                return
            rid = "bench-%d-%d" % (i, n)
            if kind == "one-shot":
                messages = [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "One-shot question %d from client %d." % (n, i)}]
            elif len(messages) >= 8:           # 4 turns, then a new conversation
                messages = []
            if kind == "multi-turn":
                messages.append({"role": "user", "content": "Turn %d of client %d's chat." % (len(messages) // 2 + 1, i)})
            try:
                ttft, answer = self.stream(rid, messages)
                ok = True
            except Exception as exc:      # counted and shown: a failed request is a result here
                ttft, answer, ok = None, "", False
                with self.lock:
                    self.errors.append("%s: %s" % (rid, exc))
                messages = []
            if kind == "multi-turn" and ok:
                messages.append({"role": "assistant", "content": answer})
            with self.lock:
                self.results.append((rid, kind, n, ttft, ok))

    def sample(self):
        while not self.done.wait(0.2):
            try:
                pss = sum((cp.process_memory(p) or {"pss": 0})["pss"]
                          for p in descendants(self.proc.pid))
                self.peak_pss = max(self.peak_pss, pss)
                self.peak_usage = max(self.peak_usage, self.limit.usage() or 0)
            except OSError:
                pass

    def collect_served(self):
        while not self.done.wait(1.0):
            self._served_once()

    def _served_once(self):
        try:
            for r in self.get("/dashboard/data")["requests"]:
                if r.get("id", "").startswith("bench-"):
                    self.served[r["id"]] = r.get("served_by") or "-"
        except (OSError, ValueError, KeyError):
            pass

    def go(self):
        try:
            server = harness.Proxy(env_for(CLAUDE, **self.limit.env), script=PROXY,
                                   wrap=self.limit.argv)
        except harness.ProxyStartError as err:
            raise SystemExit(str(err)[-2000:])
        self.port, self.proc = server.port, server.proc
        try:
            health = self.get("/health")
            self.sized = health["idle"]["sized"]
            self.start_sizes = (health["idle"]["pool_size"], health["idle"]["sessions"],
                                health["idle"]["budget"])
            for t in (self.sample, self.collect_served):
                threading.Thread(target=t, daemon=True).start()
            settle(3.0)                      # the pool starts, as it would before any traffic
            self.deadline = time.monotonic() + self.seconds
            t0 = time.monotonic()
            threads = [threading.Thread(target=self.client, args=(i,)) for i in range(self.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.wall = time.monotonic() - t0
            settle(1.5)
            self._served_once()
            self.health = self.get("/health")
        finally:
            self.done.set()
            server.stop(grace=30)
        self.cg_peak, self.oom_kills, self.limit_hits = self.limit.figures()
        return self

    def report(self):
        size = self.limit.size
        print("\n== limit %s (%s), %d clients, %d requests in %.0f s ==" % (
            cp.gib(size), self.limit.kind, self.clients, len(self.results), self.wall))
        print("  the proxy sized itself: %s" % self.sized)
        print("  at start pool %d, sessions %d, budget %d; at the end pool %d, sessions %d, "
              "budget %d (%s)" % (self.start_sizes + (self.health["idle"]["pool_size"],
                                                       self.health["idle"]["sessions"],
                                                       self.health["idle"]["budget"],
                                                       self.health["idle"]["sized"])))
        by_kind = {}
        for rid, kind, n, ttft, ok in self.results:
            if ok:
                by_kind.setdefault(self.served.get(rid, "unknown"), []).append(ttft)
        order = ["reused", "kept", "initialized", "pool", "spawned", "unknown"]
        print("  %-12s %8s %14s   (TTFT from the request's start, slot wait included)"
              % ("served by", "requests", "TTFT median"))
        for k in sorted(by_kind, key=lambda k: order.index(k) if k in order else 99):
            v = by_kind[k]
            print("  %-12s %8d %11.0f ms" % (k, len(v), statistics.median(v) * 1000))
        errors = len(self.errors)
        print("  failed requests: %d%s" % (errors, "" if not errors else " (first: %s)" % self.errors[0]))
        after = [r for r in self.results if r[1] == "one-shot" and r[2] > 0 and r[4]]
        reused = sum(self.served.get(r[0]) == "reused" for r in after)
        share = reused / len(after) if after else 0.0
        peak_mb = self.peak_pss / MiB
        print("  peak PSS of the proxy and its CLIs (sampled): %.0f MB of %.0f MB" % (peak_mb, size / MiB))
        if self.cg_peak is not None:
            print("  cgroup peak (with page cache): %.0f MB; sampled %.0f MB; times the limit "
                  "was hit (failcnt / events max): %d" % (
                      self.cg_peak / MiB, self.peak_usage / MiB, self.limit_hits))
        print("  OOM kills: %s" % ("not observable (no cgroup)" if self.oom_kills is None
                                   else self.oom_kills))
        checks = [("nothing OOM-killed", self.oom_kills == 0 if self.oom_kills is not None else None),
                  # the kernel enforces the cgroup's own count; without one, the sampled PSS
                  ("peak within the limit", (self.cg_peak or self.peak_pss) <= size),
                  ("no failed request", errors == 0),
                  (">= 90 %% of one-shot requests after warm-up reused (%d of %d: %.1f %%)"
                   % (reused, len(after), share * 100), share >= 0.9)]
        for name, ok in checks:
            print("  target %-66s %s" % (name, "n/a" if ok is None else "PASS" if ok else "MISS"))
        self.row = (cp.gib(size), self.start_sizes, by_kind, share, peak_mb, self.cg_peak,
                    self.oom_kills, errors)
        return all(ok is not False for _, ok in checks)


def main(argv):
    quick = "--quick" in argv
    # --quick: 3 clients, so that one is a multi-turn one (every third)
    opts = {"--clients": 3 if quick else 64, "--requests": 3 if quick else 4,
            "--seconds": 60 if quick else 300, "--think": 0.1 if quick else 30}
    sizes = []
    args = [a for a in argv if a != "--quick"]
    while args:
        a = args.pop(0)
        if a in opts:
            opts[a] = float(args.pop(0)) if a == "--think" else int(args.pop(0))
        else:
            sizes.append(cp.parse_size(a))
    if not os.path.exists(CLAUDE):
        raise SystemExit("the pinned CLI is missing: run bash .ci/run first, or set CLAUDE_TEST_BIN")
    print("claude-proxy memory benchmark (%s, %d cores; real CLI, fake upstream)%s" % (
        time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(), " --quick" if quick else ""))
    runs, ok = [], True
    for size in sizes or [2 ** 30]:
        limit = Limit(size, quick)
        try:
            run = Run(limit, opts["--clients"], opts["--requests"], opts["--seconds"],
                      opts["--think"]).go()
        finally:
            limit.close()
        ok &= run.report()
        runs.append(run)
    if len(runs) > 1:
        print("\n| limit | pool / sessions / budget | reused | kept | pre-started | spawned | "
              "one-shot reused after warm-up | peak PSS | cgroup peak | OOM kills |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            size, sizes_, by, share, peak, cg, kills, errors = r.row

            def cell(*kinds):
                v = [t for k in kinds for t in by.get(k, [])]
                return "%d (%.0f ms)" % (len(v), statistics.median(v) * 1000) if v else "0"
            print("| %s | %d / %d / %d | %s | %s | %s | %s | %.1f %% | %.0f MB | %s | %s |" % (
                size, *sizes_, cell("reused"), cell("kept"), cell("pool", "initialized"),
                cell("spawned"), share * 100, peak, "%.0f MB" % (cg / MiB) if cg else "-",
                kills if kills is not None else "-"))
    UP.close()
    if quick:
        return 0 if all(not r.errors for r in runs) else 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
