"""A warm CLI serves request after request (section 7, IdleStore): the reset it gets between
requests, and what the upstream sees.  Real CLI, fake upstream; behaviour, not timings.

The first tests drive one CLIProcess by hand, so they pin the CLI's own behaviour
(rewind_conversation leaves nothing behind, /clear does); the rest go through the proxy.
"""
import functools
import json
import tempfile

import pytest

import claude_openai_proxy as P
from conftest import base_env, real_claude_bin


class NoClient:
    def check(self):
        pass

    maybe_check = check


@pytest.fixture
def cli(home, upstream):
    """cli() -> a started CLIProcess on the real CLI (ended after the test)."""
    cfg = P.load_config([], base_env(home, upstream.url, real_claude_bin()))[0]
    workdir, started = tempfile.mkdtemp(), []

    def make():
        proc = P.CLIProcess(cfg, P.Launch(), workdir)
        started.append(proc)
        return proc
    yield make
    for proc in started:
        proc.close()


def until_result(proc):
    for item in proc.read(NoClient()):
        if isinstance(item, dict) and item.get("type") == "result":
            return item
    raise AssertionError("no result line: %s" % list(proc.stderr_tail))


def ask(proc, text, init=True, query=True):
    lines = [P.control("init", {"subtype": "initialize", "systemPrompt": "Be terse."})] if init else []
    proc.send(*lines, P.user_line([{"type": "text", "text": text}], query))
    return until_result(proc)


def fresh_call(cli, upstream, text):
    proc = cli()
    ask(proc, text)
    call = upstream.model_calls[-1]
    proc.close()
    return call


def test_rewind_makes_the_next_request_what_a_fresh_process_sends(cli, upstream):
    want = fresh_call(cli, upstream, "Second question.")
    proc = cli()
    ask(proc, "Earlier turn, given as history.", query=False)
    proc.send(P.assistant_line([{"type": "text", "text": "Earlier answer."}]))
    ask(proc, "First question.", init=False)
    assert "First question." in json.dumps(upstream.model_calls[-1]["messages"])
    for _ in range(2):            # twice: a reset process resets again
        assert proc.reset()
        ask(proc, "Second question.", init=False)
        got = upstream.model_calls[-1]
        assert got["system"] == want["system"]
        assert got["messages"] == want["messages"]     # the "# Environment" and date ones too
        assert "Earlier" not in json.dumps(got) and "First question" not in json.dumps(got)
        assert {k for k in want if want[k] != got.get(k)} <= {"metadata"}   # its session id


def test_a_process_with_no_turn_has_nothing_to_reset(cli):
    assert not cli().reset()


def test_clear_is_no_reset(cli, upstream):
    """The alternative once measured, /clear (it left three caveat blocks before the next user
    message), is out of reach: a user line is never a command (not_a_command), so "/clear"
    is text for the model and the conversation stays."""
    proc = cli()
    ask(proc, "First question.")
    ask(proc, "/clear", init=False)
    messages = json.dumps(upstream.model_calls[-1]["messages"])
    assert "First question." in messages and "local-command" not in messages
    assert [b["text"] for b in upstream.model_calls[-1]["messages"][-1]["content"]
            if not b["text"].startswith("<system-reminder>")][-2:] == ["/", "clear"]


# -- through the proxy --------------------------------------------------------------------------

from test_pool import RawRequest, alive, children, health, poll, wait_gone  # noqa: E402
import fake_upstream  # noqa: E402

CHAT = "/v1/chat/completions"


@pytest.fixture
def start(make_proxy):
    """make_proxy with no pool and no kept sessions by default, so every process it holds
    idle is a reused one."""
    return functools.partial(make_proxy, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)


def reused_idle(p, n=1):
    """Until the proxy holds n reused processes and nothing runs; returns /health."""
    return poll(lambda: (lambda h: h if h["idle"]["idle"]["reused"] == n and
                         h["concurrency"]["running"] == 0 else None)(health(p)),
                "%d reused idle process(es)" % n)


def chat(p, text, system=None, **extra):
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": text}]
    status, _, body = p.post(CHAT, {"model": "sonnet", "messages": messages, **extra})
    return status, body


def test_one_process_serves_request_after_request_and_nothing_leaks(start, upstream):
    p = start()
    markers = ["MARK-%d-%s" % (i, "xyz"[i % 3]) for i in range(6)]
    for i, m in enumerate(markers):
        upstream.push(fake_upstream.text("answer %s" % m))
        status, body = chat(p, "question %s" % m)
        assert status == 200 and body["choices"][0]["message"]["content"] == "answer " + m
        h = reused_idle(p)
        assert h["idle"]["hits"]["reused"] == i and h["idle"]["misses"] == 1
    assert health(p)["cli_processes_started"] == 1 and len(children(p)) == 1
    calls = upstream.model_calls
    assert len(calls) == len(markers)
    for m, call in zip(markers, calls):          # each request saw its own text only
        text = json.dumps(call)
        assert m in text and not [o for o in markers if o != m and o in text]
        # and the same request a fresh process sends, but for the text
        assert json.dumps(call["messages"]).replace(m, "M") == \
            json.dumps(calls[0]["messages"]).replace(markers[0], "M")
        assert call["system"] == calls[0]["system"]


def test_with_a_pool_a_reused_process_coming_back_ends_no_pre_started_one(start, upstream):
    """One-shot requests in a row go to the reused process; the pool starts one process while
    the first request holds its pre-started one, then none: the reused one coming back does not
    make a pre-started one spare (it did, and one CLI was started and ended per request)."""
    p = start(CLAUDE_PROXY_POOL_SIZE=2)

    def settled(h):
        idle = h["idle"]["idle"]
        return h if h["concurrency"]["running"] == 0 and idle["pool"] + idle["initialized"] == 2 \
            and idle["reused"] == (h["idle"]["hits"]["pool"] + h["idle"]["hits"]["initialized"]) \
            else None
    started = poll(lambda: settled(health(p)), "the pool to be ready")["cli_processes_started"]
    for i in range(5):
        assert chat(p, "question %d" % i, system="Be terse.")[0] == 200
        h = poll(lambda: settled(health(p)), "the process back and the pool full")
    assert h["idle"]["hits"]["reused"] == 4 and h["idle"]["misses"] == 0
    assert h["cli_processes_started"] == started + 1 and len(children(p)) == 3


def test_a_request_with_history_leaves_nothing_for_the_next(start, upstream):
    p = start()
    status, _, _ = p.post(CHAT, {"model": "sonnet", "messages": [
        {"role": "user", "content": "HIST-SECRET question"},
        {"role": "assistant", "content": "HIST-SECRET answer"},
        {"role": "user", "content": "and then?"}]})
    assert status == 200
    reused_idle(p)
    status, _ = chat(p, "unrelated")
    assert status == 200 and health(p)["idle"]["hits"]["reused"] == 1
    last = json.dumps(upstream.model_calls[-1])
    assert "HIST-SECRET" not in last and "unrelated" in last


def test_other_settings_do_not_get_the_reused_process_and_the_oldest_is_evicted(start, upstream):
    p = start(CLAUDE_PROXY_IDLE_MAX=2)
    assert chat(p, "one", system="PROMPT-A")[0] == 200
    reused_idle(p)
    assert chat(p, "two", system="PROMPT-B")[0] == 200           # another system prompt
    reused_idle(p, 2)
    assert chat(p, "three", system="PROMPT-B", reasoning_effort="low")[0] == 200   # another effort
    h = health(p)
    assert h["idle"]["hits"]["reused"] == 0 and h["idle"]["misses"] == 3
    assert "PROMPT-A" not in json.dumps(upstream.model_calls[1]["system"])
    # within the budget of 2: PROMPT-A's, the least recently used, is ended
    poll(lambda: health(p)["idle"]["evicted"] == 1, "an eviction")
    reused_idle(p, 2)
    assert chat(p, "four", system="PROMPT-B")[0] == 200
    assert health(p)["idle"]["hits"]["reused"] == 1
    assert "PROMPT-B" in json.dumps(upstream.model_calls[-1]["system"])
    assert chat(p, "five", system="PROMPT-A")[0] == 200
    assert health(p)["idle"]["hits"]["reused"] == 1


@pytest.mark.parametrize("case", ["upstream error", "stop sequence", "client gone"])
def test_a_process_whose_turn_did_not_end_cleanly_is_not_reused(start, upstream, case):
    p = start()
    assert chat(p, "warm-up")[0] == 200
    reused_idle(p)
    (pid,) = children(p)
    if case == "upstream error":
        upstream.push(*[fake_upstream.error(500, "api_error")] * 3)    # the CLI retries once
        assert chat(p, "fails")[0] >= 500
    elif case == "stop sequence":
        upstream.push(fake_upstream.text("one two STOP three four five six", chunks=4, delay=0.05))
        status, body = chat(p, "stops", stop=["STOP"])
        assert status == 200 and body["choices"][0]["message"]["content"] == "one two "
    else:
        upstream.push(fake_upstream.text("slow " * 50, chunks=50, delay=0.1))
        r = RawRequest(p, CHAT, {"model": "sonnet", "stream": True,
                                 "messages": [{"role": "user", "content": "hang up"}]})
        poll(lambda: len(upstream.model_calls) == 2, "the request to reach the upstream")
        r.close()
    wait_gone([pid])
    h = poll(lambda: (lambda h: h if h["concurrency"]["running"] == 0 else None)(health(p)),
             "the request to end")
    assert h["idle"]["hits"]["reused"] == 1 and h["idle"]["idle"]["reused"] == 0
    assert not children(p)


def test_recycled_after_reuse_turns(start, upstream):
    p = start(CLAUDE_PROXY_REUSE=2)
    assert chat(p, "one")[0] == 200
    reused_idle(p)
    (pid,) = children(p)
    assert chat(p, "two")[0] == 200          # its second turn: then it is replaced
    wait_gone([pid])
    assert chat(p, "three")[0] == 200
    h = health(p)
    assert h["idle"]["recycled"] == 1 and h["idle"]["hits"]["reused"] == 1
    assert h["cli_processes_started"] == 2


def test_recycled_above_the_memory_limit(start, upstream):
    p = start(CLAUDE_PROXY_RECYCLE_RSS=1)          # 1 MB: every CLI is above it
    for text in ("one", "two"):
        assert chat(p, text)[0] == 200
    poll(lambda: health(p)["idle"]["recycled"] == 2, "both processes to be recycled")
    assert health(p)["idle"]["hits"]["reused"] == 0


def test_reuse_switched_off(start, upstream):
    p = start(CLAUDE_PROXY_REUSE=0)
    for text in ("one", "two"):
        assert chat(p, text)[0] == 200
        poll(lambda: not children(p), "the process to end")
    h = health(p)
    assert h["idle"]["hits"]["reused"] == 0 and h["cli_processes_started"] == 2
    assert h["idle"]["reuse"] == 0


def test_served_by_names_the_kind_that_answered(home, upstream):
    """Backend.run sets req.served_by (the request log reads it)."""
    cfg = P.load_config([], dict(base_env(home, upstream.url, real_claude_bin()),
                                 CLAUDE_PROXY_POOL_SIZE="0", CLAUDE_PROXY_SESSIONS="0"))[0]
    backend = P.Backend(cfg, tempfile.mkdtemp())
    try:
        kinds = []
        for text in ("one", "two"):
            req = P.Request(model="sonnet", cli_model="sonnet", handler=P.HANDLERS["generic"],
                            messages=[P.Message("user", [{"type": "text", "text": text}])])
            assert P.collect(backend.run(req, req.messages, NoClient())).text
            kinds.append(req.served_by)
            poll(lambda: backend.idle_status()["idle"]["reused"] == 1, "the reset")
        assert kinds == ["spawned", "reused"]
    finally:
        backend.close_all()


# -- memory-aware sizes ---------------------------------------------------------------------------

# (the sizing rules themselves: tests/test_memory.py)

def test_health_and_the_start_up_log_say_what_was_chosen(start):
    # sessions are the fixture's, the pool set here: the budget from memory (a fixed figure:
    # MemAvailable moves while the test runs)
    p = start(CLAUDE_PROXY_POOL_SIZE=1, CLAUDE_PROXY_MEMORY="4G")
    idle = health(p)["idle"]
    assert (idle["pool_size"], idle["sessions"], idle["budget"]) == (1, 0, 10)
    assert idle["sized"] == P.load_config([], {"CLAUDE_PROXY_POOL_SIZE": "1", "CLAUDE_PROXY_SESSIONS": "0",
                                               "CLAUDE_PROXY_MEMORY": "4G"})[0].sizing \
        == "idle_max from CLAUDE_PROXY_MEMORY 4.0 GiB, 130 MB a CLI (default), 2 running"
    assert "budget 10, %s" % idle["sized"] in p.log
