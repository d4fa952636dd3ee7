"""The warm pool of pre-started CLI processes and the concurrency gate: behaviour, not timings.

Nothing here asserts a duration: waits are bounded polls with generous limits (the machine is
small and shared).  The real CLI is used where the behaviour depends on it (what reaches the
upstream), the fake CLI where faults or slow answers are needed.  The proxy's CLI processes are
found through /proc: the processes whose parent is the proxy.
"""
import functools
import json
import os
import signal
import socket
import stat
import threading
import time

import pytest

import fake_upstream
import harness
from harness import alive

READY_WAIT = 15.0          # seconds a poll for pool readiness may take under load


# -- helpers ------------------------------------------------------------------------------------

def _stat(pid):
    """(state, ppid, pgid) of a process, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _all_pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def children(proxy):
    """Live (non-zombie) child processes of the proxy: its CLI processes."""
    return set(harness.children(proxy.proc.pid))


def in_groups(pgids):
    """Live processes whose process group is one of `pgids` (a CLI and anything it started)."""
    return {pid for pid in _all_pids()
            if (st := _stat(pid)) and st[2] in pgids and st[0] != "Z"}


def health(proxy):
    status, _, body = proxy.request("GET", "/health", timeout=10)
    assert status == 200, body
    return body


def pool_hits(h):
    """Requests served by a pre-started process (initialized ahead or not)."""
    return h["idle"]["hits"]["pool"] + h["idle"]["hits"]["initialized"]


def poll(fn, what, timeout=READY_WAIT, every=0.05):
    """harness.wait_for with this file's longer default (pool readiness under load)."""
    return harness.wait_for(fn, what, timeout, every)


def wait_ready(proxy, n=None):
    """Until /health says the pool holds `n` (default: its size) ready processes and exactly
    that many CLI children are alive (no request running); returns (health, pids)."""
    def check():
        h = health(proxy)
        want = h["idle"]["pool_size"] if n is None else n
        kids = children(proxy)
        if h["idle"]["ready"] == want and len(kids) == want and h["concurrency"]["running"] == 0:
            return h, kids
        return None
    return poll(check, "the pool to be ready")


def fully_dead(pid):
    """Gone, or a zombie with no thread left but its leader (a multi-threaded process whose
    leader shows "Z" may still be exiting; only then can its parent reap it)."""
    st = _stat(pid)
    if st is None:
        return True
    try:
        return st[0] == "Z" and os.listdir("/proc/%d/task" % pid) == [str(pid)]
    except OSError:
        return True


def wait_gone(pids, timeout=10.0):
    poll(lambda: not any(alive(p) for p in pids) or None, "processes %s to end" % sorted(pids),
         timeout)


def chat(proxy, text, model="sonnet", timeout=60, **extra):
    return proxy.post("/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": text}], **extra}, timeout=timeout)


def answer(body):
    return body["choices"][0]["message"]["content"]


def calls_with(upstream, marker):
    """Upstream model calls whose body mentions `marker`."""
    return [c for c in upstream.model_calls if marker in json.dumps(c)]


def metric(proxy, line_start):
    status, _, text = proxy.request("GET", "/metrics", timeout=10)
    assert status == 200
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError("metric %s missing" % line_start)


class RawRequest:
    """A request sent on a plain socket, so the test can hang up while it waits or runs."""

    def __init__(self, proxy, path, body):
        data = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % (path.encode(), len(data)) + data)

    def close(self):
        self.sock.close()


@pytest.fixture
def start(make_proxy):
    """make_proxy without kept sessions or reuse by default: only pre-started and running CLIs
    are counted here (reuse: tests/test_reuse.py)."""
    return functools.partial(make_proxy, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_REUSE=0)


# -- (1)-(3) reuse, refill, one request per process, no history (real CLI) ---------------------

def test_hit_reuses_the_waiting_process_then_refills_and_ends_it(start, upstream):
    proxy = start(CLAUDE_PROXY_POOL_SIZE=1)
    h0, (waiting,) = wait_ready(proxy)
    assert h0["idle"]["mode"] == "warm" and h0["idle"]["pool_size"] == 1
    started0 = h0["cli_processes_started"]

    upstream.push(fake_upstream.text("ANSWER-ONE"))
    status, _, body = chat(proxy, "first question SECRET-ONE")
    assert status == 200, body
    assert answer(body) == "ANSWER-ONE"

    # the waiting process served it and was ended; one new process refilled the pool and no
    # cold spawn happened
    h1, (refill,) = wait_ready(proxy)
    assert not alive(waiting)
    assert refill != waiting
    assert pool_hits(h1) == pool_hits(h0) + 1
    assert h1["idle"]["misses"] == h0["idle"]["misses"]
    assert h1["cli_processes_started"] == started0 + 1
    assert metric(proxy, 'claude_proxy_idle_requests_total{served_by="pool"}') == h1["idle"]["hits"]["pool"]
    assert metric(proxy, 'claude_proxy_idle_processes{kind="pool"}') == 1

    # the refilled process answers the next request with nothing of the first one
    upstream.push(fake_upstream.text("ANSWER-TWO"))
    status, _, body = chat(proxy, "second question")
    assert status == 200, body
    assert answer(body) == "ANSWER-TWO"
    h2, (third,) = wait_ready(proxy)
    assert not alive(refill) and third not in (waiting, refill)
    assert pool_hits(h2) == pool_hits(h0) + 2
    second = calls_with(upstream, "second question")
    assert second, upstream.model_calls
    for call in second:
        assert "SECRET-ONE" not in json.dumps(call["messages"])
        assert "ANSWER-ONE" not in json.dumps(call["messages"])
        assert all(m["role"] != "assistant" for m in call["messages"]), call["messages"]


# -- (4) a dead waiting process is replaced, never handed out ---------------------------------

def test_killed_pool_process_is_not_handed_out_and_is_replaced(start, upstream):
    proxy = start(CLAUDE_PROXY_POOL_SIZE=1)
    h0, (waiting,) = wait_ready(proxy)
    os.kill(waiting, signal.SIGKILL)
    poll(lambda: fully_dead(waiting), "the killed process to have ended entirely")

    upstream.push(fake_upstream.text("after the kill"))
    status, _, body = chat(proxy, "are you there")
    assert status == 200, body
    assert answer(body) == "after the kill"

    h1, (refill,) = wait_ready(proxy)
    assert refill != waiting and not alive(waiting)
    # one request was counted, and the dead process once, as a failure (never as an answer):
    # a miss, or a hit on the replacement if the pool's own check noticed the death first
    assert pool_hits(h1) + h1["idle"]["misses"] == pool_hits(h0) + h0["idle"]["misses"] + 1
    assert h1["idle"]["start_failures"] == h0["idle"]["start_failures"] + 1
    assert h1["idle"]["mode"] == "warm"


def test_pool_process_killed_just_before_a_request_is_not_an_error(start, upstream):
    """The real CLI is multi-threaded: after SIGKILL it takes a moment to die, and during it
    Popen.poll() still says "running".  A request arriving then must still be answered (the
    pooled process printed nothing, so a fresh one can take over), not get a 502."""
    proxy = start(CLAUDE_PROXY_POOL_SIZE=1)
    for i in range(2):
        _, (waiting,) = wait_ready(proxy)
        upstream.push(fake_upstream.text("survived %d" % i))
        os.kill(waiting, signal.SIGKILL)
        status, _, body = chat(proxy, "right after the kill %d" % i)
        assert status == 200, (i, body)
        assert answer(body) == "survived %d" % i


def test_sporadic_deaths_do_not_switch_the_pool_off(start, upstream):
    """Three pool processes dying far apart, with healthy processes serving requests in
    between, are not "repeated start failures": the pool must stay warm."""
    proxy = start(fake=True, CLAUDE_PROXY_POOL_SIZE=1)
    for i in range(3):
        _, (waiting,) = wait_ready(proxy)
        os.kill(waiting, signal.SIGKILL)
        poll(lambda: fully_dead(waiting), "the killed process to end")
        status, _, body = chat(proxy, "after death %d" % i)
        assert status == 200 and answer(body) == "fake answer", body
        pool = poll(lambda: (lambda p: p if p["ready"] == 1 or p["mode"] != "warm" else None)(
            health(proxy)["idle"]), "a replacement or a change of mode")
        assert pool["mode"] == "warm", (i, pool)
        h0, _ = wait_ready(proxy)                    # a healthy replacement ...
        status, _, body = chat(proxy, "healthy %d" % i)
        assert status == 200 and answer(body) == "fake answer", body
        assert pool_hits(health(proxy)) == pool_hits(h0) + 1   # ... served from the pool
    h = health(proxy)
    assert h["idle"]["start_failures"] == 3
    assert h["idle"]["mode"] == "warm", h["idle"]
    wait_ready(proxy)


# -- (5) idle recycling (fake CLI) --------------------------------------------------------------

def test_idle_process_is_recycled(start, upstream):
    proxy = start(fake=True, CLAUDE_PROXY_POOL_SIZE=1, CLAUDE_PROXY_POOL_MAX_IDLE=2)
    h0, (first,) = wait_ready(proxy)

    def replaced():
        kids = children(proxy)
        return len(kids) == 1 and first not in kids and not alive(first) and kids
    (second,) = poll(replaced, "the idle process to be replaced")
    h1 = health(proxy)
    assert pool_hits(h1) == pool_hits(h0) == 0
    assert h1["idle"]["misses"] == 0
    assert h1["idle"]["start_failures"] == 0          # recycling is not a failure
    assert h1["idle"]["mode"] == "warm"
    assert h1["cli_processes_started"] >= 2
    # and it still serves requests from the pool
    status, _, body = chat(proxy, "hi")
    assert status == 200 and answer(body) == "fake answer"
    assert pool_hits(health(proxy)) == 1


# -- (6) shutdown ends every pool process (real CLI) --------------------------------------------

def test_sigterm_ends_all_pool_processes(start, upstream):
    proxy = start(CLAUDE_PROXY_POOL_SIZE=2)
    _, kids = wait_ready(proxy)
    assert len(kids) == 2
    group = in_groups(kids)            # each CLI runs in its own process group
    assert kids <= group
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 0
    wait_gone(group)
    assert not in_groups(kids)


# -- (7) per-request settings on a pooled process; launch settings are a miss (real CLI) --------

def test_model_and_effort_per_request_are_pool_hits(start, upstream):
    proxy = start(CLAUDE_PROXY_POOL_SIZE=1)
    # no effort asked: the CLI's own default ("medium"), also right after a "high" one
    cases = [("sonnet", None, "claude-sonnet-5-5", "medium"),
             ("haiku", "low", "claude-haiku-5-5", "low"),
             ("opus", "high", "claude-opus-5-5", "high"),
             ("sonnet", None, "claude-sonnet-5-5", "medium")]
    for i, (alias, effort, model_id, want_effort) in enumerate(cases):
        h0, _ = wait_ready(proxy)
        marker = "settings-case-%d" % i
        upstream.push(fake_upstream.text("ok %d" % i))
        extra = {"reasoning_effort": effort} if effort else {}
        status, _, body = chat(proxy, marker, model=alias, **extra)
        assert status == 200, (alias, effort, body)
        assert answer(body) == "ok %d" % i
        h1 = health(proxy)
        assert pool_hits(h1) == pool_hits(h0) + 1, (alias, effort, h1["idle"])
        assert h1["idle"]["misses"] == h0["idle"]["misses"], (alias, effort, h1["idle"])
        calls = calls_with(upstream, marker)
        assert calls, upstream.model_calls
        assert {c["model"] for c in calls} == {model_id}, (alias, [c["model"] for c in calls])
        got = {(c.get("output_config") or {}).get("effort") for c in calls}
        assert got == {want_effort}, (alias, effort, got)


def test_launch_settings_are_a_miss_served_cold(start, upstream):
    proxy = start(CLAUDE_PROXY_POOL_SIZE=1)
    # Anthropic thinking disabled: CLAUDE_CODE_DISABLE_THINKING is fixed at launch
    h0, (waiting,) = wait_ready(proxy)
    upstream.push(fake_upstream.text("no thinking here"))
    status, _, body = proxy.post("/v1/messages", {
        "model": "sonnet", "max_tokens": 1000, "thinking": {"type": "disabled"},
        "messages": [{"role": "user", "content": "launch-case-thinking"}]}, timeout=60)
    assert status == 200, body
    assert [b["text"] for b in body["content"] if b["type"] == "text"] == ["no thinking here"]
    h1 = health(proxy)
    assert h1["idle"]["misses"] == h0["idle"]["misses"] + 1
    assert pool_hits(h1) == pool_hits(h0)
    assert h1["cli_processes_started"] >= h0["cli_processes_started"] + 1
    calls = calls_with(upstream, "launch-case-thinking")
    assert calls and all("thinking" not in c or c["thinking"].get("type") == "disabled"
                         for c in calls), calls
    assert all(c["max_tokens"] == 1000 for c in calls), [c.get("max_tokens") for c in calls]

    # the pool follows the settings last asked for: the same request again is a hit
    h0, _ = wait_ready(proxy)
    upstream.push(fake_upstream.text("again"))
    status, _, body = proxy.post("/v1/messages", {
        "model": "sonnet", "max_tokens": 1000, "thinking": {"type": "disabled"},
        "messages": [{"role": "user", "content": "launch-case-again"}]}, timeout=60)
    assert status == 200 and body["content"][-1]["text"] == "again", body
    assert pool_hits(health(proxy)) == pool_hits(h0) + 1

    # OpenAI max_tokens: CLAUDE_CODE_MAX_OUTPUT_TOKENS is fixed at launch
    h0, _ = wait_ready(proxy)
    upstream.push(fake_upstream.text("short"))
    status, _, body = chat(proxy, "launch-case-max-tokens", max_tokens=77)
    assert status == 200, body
    assert answer(body) == "short"
    h1 = health(proxy)
    assert h1["idle"]["misses"] == h0["idle"]["misses"] + 1
    calls = calls_with(upstream, "launch-case-max-tokens")
    assert calls and all(c["max_tokens"] == 77 for c in calls), [c.get("max_tokens") for c in calls]


# -- (7b) a repeated initialize is given ahead of time, and only ever to its own request ---------

def ask_with_system(proxy, system, text):
    return proxy.post("/v1/chat/completions", {"model": "sonnet", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": text}]}, timeout=60)


def test_repeated_system_prompt_is_initialized_ahead_and_never_given_to_another(start, upstream):
    proxy = start(CLAUDE_PROXY_POOL_SIZE=2)
    for i in range(2):                      # the same system prompt twice in a row
        wait_ready(proxy)
        upstream.push(fake_upstream.text("plain %d" % i))
        status, _, body = ask_with_system(proxy, "AGENT-PROMPT-A", "task %d" % i)
        assert status == 200 and answer(body) == "plain %d" % i, body
    h0, _ = wait_ready(proxy)
    assert h0["idle"]["hits"]["initialized"] == 0
    # one refill got AGENT-PROMPT-A ahead of time and serves the third request with it
    upstream.push(fake_upstream.text("pre-initialized"))
    status, _, body = ask_with_system(proxy, "AGENT-PROMPT-A", "task 2")
    assert status == 200 and answer(body) == "pre-initialized", body
    assert health(proxy)["idle"]["hits"]["initialized"] == 1
    assert "AGENT-PROMPT-A" in json.dumps(calls_with(upstream, "task 2")[0]["system"])
    # another system prompt never gets a process initialized with A; the pool keeps one that
    # got none, so it is still a hit (no cold start), served with its own prompt
    for i in (3, 4):
        wait_ready(proxy)
        upstream.push(fake_upstream.text("other agent %d" % i))
        status, _, body = ask_with_system(proxy, "AGENT-PROMPT-B", "task %d" % i)
        assert status == 200 and answer(body) == "other agent %d" % i, body
        system = json.dumps(calls_with(upstream, "task %d" % i)[0]["system"])
        assert "AGENT-PROMPT-B" in system and "AGENT-PROMPT-A" not in system
    h, _ = wait_ready(proxy)
    assert h["idle"]["misses"] == h0["idle"]["misses"] and h["idle"]["mode"] == "warm"
    assert pool_hits(h) == pool_hits(h0) + 3
    assert h["idle"]["hits"]["initialized"] == 1


def test_a_pool_of_one_is_not_initialized_ahead(start, upstream):
    """With one pooled process there is none to spare for another system prompt: it gets none."""
    proxy = start(CLAUDE_PROXY_POOL_SIZE=1)
    for i in range(4):
        wait_ready(proxy)
        upstream.push(fake_upstream.text("same %d" % i))
        status, _, body = ask_with_system(proxy, "AGENT-PROMPT-A", "same task %d" % i)
        assert status == 200 and answer(body) == "same %d" % i, body
    h, _ = wait_ready(proxy)
    assert h["idle"]["hits"]["initialized"] == 0 and pool_hits(h) == 4


def test_a_refused_initialize_ahead_is_not_a_start_failure(start, upstream):
    """The CLI refuses the initialize (here: every one): requests get the 400 they would get
    anyway (also one handed a process before its refusal arrived), and the processes given it
    ahead are ended without counting as start failures, so the pool stays warm."""
    proxy = start(fake=True, CLAUDE_PROXY_POOL_SIZE=2, FAKE_CLAUDE_REFUSE_INIT="1",
                  CLAUDE_PROXY_PASS_ENV="FAKE_CLAUDE_REFUSE_INIT")
    for i in range(4):
        wait_ready(proxy)
        status, _, body = chat(proxy, "refused %d" % i)
        assert status == 400 and "refused the request settings" in body["error"]["message"], body
    h, _ = wait_ready(proxy)
    assert h["idle"]["start_failures"] == 0 and h["idle"]["mode"] == "warm"


# -- (8) processes that die at start: cold fallback, clear errors (fake bin) --------------------

def test_pool_of_dying_processes_falls_back_and_requests_get_an_error(start, upstream, tmp_path):
    script = tmp_path / "dying-claude"
    script.write_text("#!/bin/sh\necho 'dying-claude: cannot start' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    proxy = start(fake=True, CLAUDE_BIN=str(script), CLAUDE_PROXY_POOL_SIZE=1)

    def fell_back():
        p = health(proxy)["idle"]
        return p if p["mode"] == "cold-fallback" and p["start_failures"] >= 3 else None
    pool = poll(fell_back, "the pool to give up on warm processes")
    assert pool["ready"] == 0

    status, _, body = chat(proxy, "anyone?", timeout=30)
    assert 500 <= status < 600, (status, body)
    message = body["error"]["message"]
    assert "claude CLI" in message and "exit status 1" in message, message
    status, _, body = proxy.post("/v1/messages", {
        "model": "sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30)
    assert 500 <= status < 600 and body["type"] == "error", (status, body)
    assert "claude CLI" in body["error"]["message"]
    assert health(proxy)["idle"]["mode"] == "cold-fallback"


# -- (9) pool processes are not running requests (fake CLI) -------------------------------------

def test_pool_processes_do_not_use_concurrency_slots(start, upstream):
    proxy = start(fake=True, CLAUDE_PROXY_POOL_SIZE=2, CLAUDE_PROXY_MAX_CONCURRENCY=1,
                  CLAUDE_PROXY_QUEUE_TIMEOUT=30)
    h, kids = wait_ready(proxy)
    assert h["idle"]["ready"] == 2 and len(kids) == 2
    assert h["concurrency"] == {"capacity": 1, "running": 0, "queued": 0}
    assert metric(proxy, "claude_proxy_cli_running") == 0
    # the one slot is free for a request, served from the pool
    status, _, body = chat(proxy, "hello")
    assert status == 200 and answer(body) == "fake answer"
    assert pool_hits(health(proxy)) == 1


# -- (10) the gate ------------------------------------------------------------------------------

def _background(fn):
    out = {}

    def run():
        out["result"] = fn()
        out["done"] = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_gate_full_gives_429_in_each_dialect(start, upstream):
    proxy = start(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_MAX_CONCURRENCY=1,
                  CLAUDE_PROXY_QUEUE_TIMEOUT=1)
    slow = RawRequest(proxy, "/v1/chat/completions", {
        "model": "sonnet", "messages": [{"role": "user", "content": "[[slow:100]]"}]})
    try:
        poll(lambda: health(proxy)["concurrency"]["running"] == 1, "the slow request to run")
        status, headers, body = chat(proxy, "second", timeout=30)
        assert status == 429, body
        assert headers.get("Retry-After", "").isdigit(), headers
        assert set(body) == {"error"} and body["error"]["type"] == "rate_limit_error"
        assert "CLAUDE_PROXY_QUEUE_TIMEOUT" in body["error"]["message"]

        status, headers, body = proxy.post("/v1/messages", {
            "model": "sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "third"}]},
            timeout=30)
        assert status == 429, body
        assert headers.get("Retry-After", "").isdigit(), headers
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        h = health(proxy)
        assert h["concurrency"]["running"] == 1 and h["concurrency"]["queued"] == 0
        assert h["cli_processes_started"] == 1          # the refused ones started nothing
    finally:
        slow.close()
    poll(lambda: health(proxy)["concurrency"]["running"] == 0, "the slot to be released")


def test_gate_serves_queued_requests_in_arrival_order(start, upstream):
    proxy = start(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_MAX_CONCURRENCY=1,
                  CLAUDE_PROXY_QUEUE_TIMEOUT=60)
    runs = []
    for i in range(4):
        runs.append(_background(lambda i=i: chat(proxy, "req%d [[slow:10]]" % i, timeout=60)))
        # arrival order is made certain: request i is running or queued before i+1 is sent
        poll(lambda: (lambda c: c["running"] + c["queued"] >= i + 1)(health(proxy)["concurrency"]),
             "request %d to reach the gate" % i, every=0.02)
        time.sleep(0.1)
    for t, _ in runs:
        t.join(60)
    results = [out["result"] for _, out in runs]
    assert [r[0] for r in results] == [200] * 4, results
    assert all(answer(r[2]).startswith("tick0 ") and answer(r[2]).endswith("tick9 ")
               for r in results), results
    finish = [out["done"] for _, out in runs]
    assert finish == sorted(finish), finish
    assert health(proxy)["concurrency"] == {"capacity": 1, "running": 0, "queued": 0}


def test_queued_client_that_hangs_up_leaves_the_queue(start, upstream):
    proxy = start(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_MAX_CONCURRENCY=1,
                  CLAUDE_PROXY_QUEUE_TIMEOUT=60)
    slow = RawRequest(proxy, "/v1/chat/completions", {
        "model": "sonnet", "messages": [{"role": "user", "content": "[[slow:100]]"}]})
    try:
        poll(lambda: health(proxy)["concurrency"]["running"] == 1, "the slow request to run")
        waiter = RawRequest(proxy, "/v1/messages", {
            "model": "sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "wait"}]})
        poll(lambda: health(proxy)["concurrency"]["queued"] == 1, "the second request to queue")
        waiter.close()
        poll(lambda: health(proxy)["concurrency"]["queued"] == 0, "the gone client to leave the queue")
        h = health(proxy)
        assert h["concurrency"]["running"] == 1           # it did not take a slot
        assert h["cli_processes_started"] == 1            # nor start a CLI
    finally:
        slow.close()
    poll(lambda: health(proxy)["concurrency"]["running"] == 0, "the slot to be released")
    # the slot is whole again: a new request is served at once, not queued behind a ghost
    status, _, body = chat(proxy, "after", timeout=30)
    assert status == 200 and answer(body) == "fake answer"
    assert health(proxy)["concurrency"] == {"capacity": 1, "running": 0, "queued": 0}
