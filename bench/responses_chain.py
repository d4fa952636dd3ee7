#!/usr/bin/env python3
"""A Responses chain by previous_response_id, against the same conversation sent whole.

    python3 bench/responses_chain.py [turns]     # default 20 turns
    python3 bench/responses_chain.py --quick     # 2 turns (the CI smoke run)

One conversation of `turns` turns through three proxies on the real CLI and the fake upstream
from tests/, in lockstep (turn N of each, then turn N+1), streaming:

- chained:  each request sends only its new message and previous_response_id, with no
            session signal (no X-Session-Id, prompt_cache_key or user);
- session:  each request sends the whole conversation in `input` with a prompt_cache_key
            (the path a client had before stored responses: its process is kept by the signal);
- replayed: as chained, with CLAUDE_PROXY_SESSIONS=0: no process is kept, so the stored items
            are replayed into another process each turn.

Printed per mode: the shared block prefix between consecutive upstream requests (as
bench/history.py counts it: turn N's request, block by block, unchanged at the start of turn
N+1's, weighed by JSON size; raw = as the CLI sent it, cache marks aside), from turn 1 -> 2 on;
the time to first text delta per turn (median of turns 2..N, the continued ones); and the ratio
of chained to session.  Targets: chained 100 % shared prefix from turn 1 -> 2 on, and its TTFT
within 1.2 x of session.
"""
import http.client
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run import CLAUDE, QUICK, UP, Proxy  # noqa: E402   (also starts the fake upstream)
from history import shared_fraction  # noqa: E402
import fake_upstream  # noqa: E402

MODES = ("chained", "session", "replayed")


def ask(proxy, body):
    """One streaming Responses request: (seconds to the first text delta, response id, text)."""
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
    t0 = time.perf_counter()
    c.request("POST", "/v1/responses", json.dumps(dict(body, model="sonnet", stream=True)),
              {"Content-Type": "application/json"})
    resp = c.getresponse()
    if resp.status != 200:
        raise RuntimeError("status %d: %s" % (resp.status, resp.read()[:300]))
    first, rid, text = None, None, []
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        ev = json.loads(line[6:])
        if ev["type"] == "response.created":
            rid = ev["response"]["id"]
        elif ev["type"] == "response.output_text.delta":
            first = first or time.perf_counter() - t0
            text.append(ev["delta"])
        elif ev["type"] in ("response.completed", "response.failed", "response.incomplete"):
            if ev["type"] != "response.completed":
                raise RuntimeError("turn ended %s: %s" % (ev["type"], ev["response"]["error"]))
            break
    c.close()
    return first, rid, "".join(text)


def main(turns):
    print("Responses chain: real CLI %s, fake upstream, %d turns, streaming" % (CLAUDE, turns))
    env = {"chained": {}, "session": {}, "replayed": {"CLAUDE_PROXY_SESSIONS": 0}}
    proxies = {m: Proxy(CLAUDE_PROXY_POOL_SIZE=1, CLAUDE_PROXY_STATE_DIR=tempfile.mkdtemp(),
                        **env[m]) for m in MODES}
    ttft = {m: [] for m in MODES}
    calls = {m: [] for m in MODES}
    state = {m: {"prev": None, "input": []} for m in MODES}
    try:
        for m in MODES:
            proxies[m].wait_pool(1)
        for n in range(turns):
            question = "Turn %d question: %s" % (n, "lorem ipsum " * 20)
            for m in MODES:
                s = state[m]
                UP.default = fake_upstream.text("Turn %d answer: %s" % (n, "dolor sit " * 20))
                if m == "session":
                    s["input"].append({"role": "user", "content": question})
                    body = {"input": s["input"], "prompt_cache_key": "bench-chain"}
                else:
                    body = {"input": question, "previous_response_id": s["prev"]}
                before = len(UP.model_calls)
                first, rid, text = ask(proxies[m], body)
                if len(UP.model_calls) != before + 1:
                    raise RuntimeError("%s turn %d: %d upstream calls" % (m, n, len(UP.model_calls) - before))
                calls[m].append(UP.model_calls[before]["messages"])
                ttft[m].append(first)
                s["prev"] = rid
                if m == "session":
                    s["input"].append({"role": "assistant", "content": text})
        kept = {m: proxies[m].request("GET", "/health")[2]["idle"]["hits"]["kept"] for m in MODES}
    finally:
        for p in proxies.values():
            p.stop()
    print("\n  %-52s" % "" + "".join("%11s" % m for m in MODES))

    def row(label, fn, fmt):
        print("  %-52s" % label + "".join("%11s" % (fmt % fn(m)) for m in MODES))
    shared = {m: [shared_fraction(a, b, False) for a, b in zip(calls[m], calls[m][1:])] for m in MODES}
    row("shared block prefix, turn 1 -> 2 on (min)", lambda m: 100 * min(shared[m]), "%.1f %%")
    row("shared block prefix, turn 1 -> 2 on (mean)", lambda m: 100 * statistics.mean(shared[m]),
        "%.1f %%")
    row("turns on the kept process", lambda m: kept[m], "%d")
    row("time to first token, turn 1", lambda m: 1000 * ttft[m][0], "%.0f ms")
    med = {m: statistics.median(ttft[m][1:]) for m in MODES}
    row("time to first token, turns 2..%d (median)" % turns, lambda m: 1000 * med[m], "%.0f ms")
    row("time to first token, turn %d" % turns, lambda m: 1000 * ttft[m][-1], "%.0f ms")
    print("\n  chained / session TTFT (turns 2..%d, medians): %.2f x   (target: within 1.2 x)"
          % (turns, med["chained"] / med["session"]))
    print("  chained / replayed TTFT (turns 2..%d, medians): %.2f x"
          % (turns, med["chained"] / med["replayed"]))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    main(int(args[0]) if args else (2 if QUICK else 20))
