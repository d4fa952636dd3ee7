#!/usr/bin/env python3
"""What a web search costs through the proxy: one request with Anthropic's web search tool vs
the same request without it, measured side by side in one run.

    python3 bench/web_search.py [N]      # N requests of each kind (default 5), medians printed

Loopback only, against the fake Anthropic upstream from tests/ (it answers at once, so the
time is the CLI's and the proxy's own; with the real API add the nested search request's and
the second model turn's own time).  Both kinds run on the same proxy, alternately, with no
warm pool and no kept sessions but the default reuse (a process that answered cleanly serves
the next request with the same launch settings), as a user's proxy runs.
"""
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import fake_upstream  # noqa: E402
from harness import Proxy, base_env, real_claude_bin  # noqa: E402

ARGS = [a for a in sys.argv[1:] if a != "--quick"]     # --quick: bench/all.py's smoke run
N = int(ARGS[0]) if ARGS else 1 if "--quick" in sys.argv else 5
UP = fake_upstream.FakeUpstream()
SEARCH = {"type": "web_search_20250305", "name": "web_search"}
state = {"search": False, "turn": 0}


def responder(body):
    if fake_upstream.offers_web_search(body):
        return fake_upstream.web_search_answer("kiwi facts", [{"url": "https://example.org/", "title": "t"}],
                                               "found")
    state["turn"] += 1
    if state["search"] and state["turn"] == 1:
        return fake_upstream.tool_use("WebSearch", {"query": "kiwi facts"})
    return fake_upstream.text("Answer. [t](https://example.org/)")


def one(proxy, search):
    state.update(search=search, turn=0)
    before = len(UP.model_calls)
    t0 = time.perf_counter()
    status, _, body = proxy.post("/v1/messages", {
        "model": "claude-sonnet-4-6", "max_tokens": 100, "tools": [SEARCH] if search else [],
        "messages": [{"role": "user", "content": "Question %d" % time.time_ns()}]}, timeout=120)
    elapsed = time.perf_counter() - t0
    assert status == 200, body
    assert search == ("server_tool_use" in [b["type"] for b in body["content"]]), body
    return elapsed, len(UP.model_calls) - before


def main():
    UP.responder = responder
    home = pathlib.Path(tempfile.mkdtemp(prefix="claude-proxy-bench-home-"))
    proxy = Proxy(base_env(home, UP.url, real_claude_bin(), CLAUDE_PROXY_POOL_SIZE=0,
                           CLAUDE_PROXY_SESSIONS=0))
    try:
        one(proxy, False)                                   # warm-up: disk caches
        plain, searched, calls = [], [], set()
        for _ in range(N):
            plain.append(one(proxy, False)[0])
            t, n = one(proxy, True)
            searched.append(t)
            calls.add(n)
    finally:
        proxy.stop()
        UP.close()
    p, s = statistics.median(plain), statistics.median(searched)
    print("requests of each kind:           %d" % N)
    print("median without web search:       %.3f s" % p)
    print("median with one web search:      %.3f s" % s)
    print("ratio with / without:            %.2f" % (s / p))
    print("upstream requests per search:    %s" % ", ".join(str(c) for c in sorted(calls)))


if __name__ == "__main__":
    main()
