#!/usr/bin/env python3
"""Multi-turn history benchmark: kept sessions vs structured injection vs flat, side by side.

    python3 bench/history.py [rounds]      # default 5 rounds

One conversation is continued turn by turn, from 0 to 10 earlier turns (an earlier turn = one
user message and the assistant's answer), through three proxies on the real CLI and the fake
upstream from tests/ (kept: the default; injected: CLAUDE_PROXY_SESSIONS=0; flat:
CLAUDE_PROXY_HISTORY=flat), each with a warm pool of one (a request is sent only once its
pre-started process has booted).  Printed per mode:

- shared prefix between consecutive turns: how much of turn N's upstream request is, unchanged,
  the start of turn N+1's, counted at content-block granularity (the prompt cache matches whole
  prefixes; a block that changed counts as not shared) and weighed by the JSON size of the
  blocks.  "raw" compares the request as the CLI sent it (but for cache_control marks, which
  the cache does not compare, and string content, which is shorthand for one text block);
  "normalised" also drops the CLI's own {"role": "system"} messages (as
  tests/test_history.py does).
  Messages only: the system prompt is the same in all modes.
- the same injection done by hand on a pre-started bare CLI, two ways: "naive" (wait for the
  initialize answer, then one write per line) and "batched" (what the proxy does: the first
  earlier user line in the write with the control lines, each assistant line in the write
  with the line after it).  Figures: ms from the first write to the first text delta.
- time to first token (median over rounds) at 0, 1, 5 and 10 earlier turns, and the cost per
  earlier turn: the least-squares slope over all runs, and the median over k of
  (mode - flat at k earlier turns) / k.  Single requests are noisy here (tens of ms on a
  2-core machine); use several rounds.
"""
import http.client
import json
import pathlib
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run import CLAUDE, ROOT, UP, Proxy, env_for, settle, size  # noqa: E402   (also starts the fake upstream)

EARLIER = size(10, 2)


def blocks_of(messages, normalise):
    """A request's messages as a list of (role, canonical JSON of one block)."""
    out = []
    for m in messages:
        if normalise and m.get("role") == "system":
            continue
        content = m["content"]
        if isinstance(content, str):     # shorthand for one text block, to the API too
            content = [{"type": "text", "text": content}]
        for b in content:
            if isinstance(b, dict):      # a cache mark is not content: the cache ignores it
                b = {k: v for k, v in b.items() if k != "cache_control"}
            out.append(json.dumps([m["role"], b], sort_keys=True))
    return out


def shared_fraction(prev, nxt, normalise):
    a, b = blocks_of(prev, normalise), blocks_of(nxt, normalise)
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += len(x)
    return shared / sum(len(x) for x in a)


def ask(proxy, messages):
    """One streaming chat request; seconds to the first content delta, and the full text."""
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions",
              json.dumps({"model": "sonnet", "stream": True, "messages": messages}),
              {"Content-Type": "application/json"})
    resp = c.getresponse()
    if resp.status != 200:
        raise RuntimeError("status %d: %s" % (resp.status, resp.read()[:300]))
    first, text = None, []
    for line in resp:
        if line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: {"):
            for ch in json.loads(line[6:])["choices"]:
                piece = ch["delta"].get("content")
                if piece:
                    first = first or time.perf_counter() - t0
                    text.append(piece)
    c.close()
    return first, "".join(text)


def wait_ready(proxy, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        c.request("GET", "/health")
        if json.loads(c.getresponse().read())["idle"]["ready"] >= 1:
            settle(1.5)              # ready = spawned; let it finish booting
            return
        time.sleep(0.05)
    raise RuntimeError("pool not ready")


def conversation(proxy, mode, ttft):
    """Continue one conversation from 0 to EARLIER earlier turns; returns the upstream requests."""
    messages, calls = [], []
    for n in range(EARLIER + 1):
        messages.append({"role": "user", "content": "Turn %d question: %s" % (n, "lorem ipsum " * 20)})
        UP.default = __import__("fake_upstream").text("Turn %d answer: %s" % (n, "dolor sit " * 20))
        wait_ready(proxy)
        before = len(UP.model_calls)
        first, answer = ask(proxy, messages)
        ttft[mode][n].append(first)
        calls.append(UP.model_calls[before]["messages"])
        messages.append({"role": "assistant", "content": answer})
    return calls


MODES = {   # name: the proxy's settings
    "kept": dict(CLAUDE_PROXY_HISTORY="structured"),                       # the default
    "injected": dict(CLAUDE_PROXY_HISTORY="structured", CLAUDE_PROXY_SESSIONS=0),
    "flat": dict(CLAUDE_PROXY_HISTORY="flat", CLAUDE_PROXY_SESSIONS=0),
}


def main(rounds):
    print("multi-turn history: real CLI %s, fake upstream, warm pool of 1, %d round(s)"
          % (CLAUDE, rounds))
    print("  kept     = structured history, the conversation's process kept between turns (default;")
    print("             from the conversation's second request on)")
    print("  injected = structured history given to a pre-started process line by line")
    print("  flat     = earlier turns as one JSON transcript in the user message")
    proxies = {mode: Proxy(CLAUDE_PROXY_POOL_SIZE=1, **env) for mode, env in MODES.items()}
    ttft = {mode: [[] for _ in range(EARLIER + 1)] for mode in proxies}
    prefix = {mode: {"raw": [], "normalised": []} for mode in proxies}
    try:
        for _ in range(rounds):
            for mode, proxy in proxies.items():     # interleaved, so drift hits all alike
                calls = conversation(proxy, mode, ttft)
                for prev, nxt in zip(calls, calls[1:]):
                    prefix[mode]["raw"].append(shared_fraction(prev, nxt, False))
                    prefix[mode]["normalised"].append(shared_fraction(prev, nxt, True))
    finally:
        for proxy in proxies.values():
            proxy.stop()
    bare = {(mode, n): [] for mode in ("naive", "batched") for n in (0, EARLIER)}
    for _ in range(rounds):
        for key in bare:
            bare[key].append(bare_injection(*key))
    print("\n  %-56s" % "" + "".join("%11s" % m for m in MODES))

    def row(label, fn, fmt):
        print("  %-56s" % label + "".join("%11s" % (fmt % fn(m)) for m in MODES))
    row("shared prefix, consecutive turns, raw (mean)",
        lambda m: 100 * statistics.mean(prefix[m]["raw"]), "%.1f %%")
    row("shared prefix, consecutive turns, raw (min)",
        lambda m: 100 * min(prefix[m]["raw"]), "%.1f %%")
    row("shared prefix, turns 2..%d, raw (min)" % EARLIER,      # after the first continuation
        lambda m: 100 * min(x for i, x in enumerate(prefix[m]["raw"]) if i % EARLIER), "%.1f %%")
    row("shared prefix, consecutive turns, normalised (mean)",
        lambda m: 100 * statistics.mean(prefix[m]["normalised"]), "%.1f %%")
    row("shared prefix, consecutive turns, normalised (min)",
        lambda m: 100 * min(prefix[m]["normalised"]), "%.1f %%")
    med = {m: [statistics.median(x) for x in ttft[m]] for m in ttft}
    for n in sorted({n for n in (0, 1, 5, EARLIER) if n <= EARLIER}):    # (--quick: fewer)
        row("time to first token, %d earlier turns (median)" % n, lambda m: 1000 * med[m][n], "%.0f ms")
    row("cost per earlier turn (least-squares slope, all runs)", lambda m: 1000 * slope(ttft[m]),
        "%.1f ms")
    row("minus flat, per earlier turn (median of k=1..%d)" % EARLIER,
        lambda m: 1000 * statistics.median((med[m][k] - med["flat"][k]) / k
                                           for k in range(1, EARLIER + 1)), "%.1f ms")
    for n in (0, EARLIER):
        print("  %-56s%11s%11s" % ("bare CLI, %d earlier turns: naive / batched injection" % n,
                                   "%.0f ms" % (1000 * statistics.median(bare["naive", n])),
                                   "%.0f ms" % (1000 * statistics.median(bare["batched", n]))))


def bare_injection(mode, earlier):
    """ms from the first stdin write to the first text delta, injecting `earlier` turns into a
    pre-started bare CLI by hand (the proxy's argv, environment and line shapes)."""
    sys.path.insert(0, str(ROOT))
    import claude_openai_proxy as cp
    cfg, _ = cp.load_config(["--claude-bin", CLAUDE], env_for(CLAUDE))
    launch = cp.Launch()
    tmp, work = tempfile.mkdtemp(), tempfile.mkdtemp()
    p = subprocess.Popen(cp.cli_argv(cfg, launch), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=cp.cli_env(cfg, launch, tmp), cwd=work)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(json.loads(raw)) for raw in p.stdout],
                     daemon=True).start()

    def send(*objs):
        p.stdin.write("".join(json.dumps(o) + "\n" for o in objs).encode())
        p.stdin.flush()

    def wait(kind, event=None):
        while True:
            o = lines.get(timeout=30)
            if o.get("type") == kind and (event is None or o["event"].get("type") == event):
                return

    def text(s):
        return [{"type": "text", "text": s}]
    init = {"type": "control_request", "request_id": "init",
            "request": {"subtype": "initialize", "systemPrompt": "SYS"}}
    turns = []
    for n in range(earlier):
        turns += [cp.user_line(text("Turn %d question: %s" % (n, "lorem ipsum " * 20)), query=False),
                  cp.assistant_line(text("Turn %d answer: %s" % (n, "dolor sit " * 20)))]
    settle(2.0)                      # booted, as a pooled process is
    t0 = time.perf_counter()
    if mode == "naive":
        send(init)
        wait("control_response")
        for line in turns:
            send(line)
            if line["type"] == "user":
                wait("result")
        send(cp.user_line(text("final")))
    else:
        pending = [init]
        for line in turns:
            pending.append(line)
            if line["type"] == "user":
                send(*pending)
                pending = []
                wait("result")
        send(*pending, cp.user_line(text("final")))
    wait("stream_event", "content_block_delta")
    first = time.perf_counter() - t0
    p.kill()
    p.wait()
    return first


def slope(samples):
    """Least-squares slope of time to first token over the number of earlier turns."""
    xs = [k for k, runs in enumerate(samples) for _ in runs]
    ys = [t for runs in samples for t in runs]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    main(int(args[0]) if args else size(5, 1))
