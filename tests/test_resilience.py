"""Issue 22, nothing the client can see: a CLI that ends before any byte of its answer reached
the client is replaced once (Backend.run), and the client gets a normal answer.

Faults on demand come from tests/fake_claude.py ([[die:N]]: the first N runs given a text are
SIGKILLed before their first event; [[die-late:N]]: after one text delta); the real CLI is
SIGKILLed while the fake upstream holds its request (so it is alive and waiting, before its
first event), and the upstream then answers the retry.
"""
import concurrent.futures
import json
import os
import secrets
import signal
import threading

import pytest

import fake_upstream
from test_operations import answer, ask, error_of, stream_result
from test_pool import children, poll

RESPONSES = "/v1/responses"


def metric(p, name):
    status, _, text = p.request("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError("no metric %s in /metrics" % name)


def logged(p):
    """The dashboard's request log, newest first."""
    status, _, data = p.request("GET", "/dashboard/data")
    assert status == 200, data
    return data["requests"]


def unique(directive):
    """A prompt with a fake-CLI directive, unique to this run (its counter file is new)."""
    return "%s %s" % (directive, secrets.token_hex(6))


@pytest.fixture
def fake(make_proxy):
    """A proxy on the fake CLI, no pre-started or kept processes."""
    return make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)


# -- fake CLI: killed before its first event --------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_cli_killed_before_first_event_is_retried_invisibly(fake, dialect, stream):
    before = metric(fake, "claude_proxy_retries_total")
    status, _, got = ask(fake, dialect, unique("[[die:1]]"), stream=stream)
    assert status == 200, got
    if stream:
        content, complete, err = stream_result(dialect, got)
        assert (content, complete, err) == ("fake answer", True, None)
    else:
        assert answer(dialect, got) == "fake answer"
    assert metric(fake, "claude_proxy_retries_total") == before + 1
    entry = logged(fake)[0]
    assert entry["status"] == 200 and entry["retried"] is True
    assert "ended before its answer reached the client; asking another" in fake.log


@pytest.mark.parametrize("stream", [False, True])
def test_responses_dialect_retried_invisibly(fake, stream):
    status, _, got = fake.post(RESPONSES, {"model": "sonnet", "stream": stream,
                                           "input": unique("[[die:1]]")})
    assert status == 200, got
    if stream:
        names = [json.loads(line[6:])["type"] for line in got.splitlines()
                 if line.startswith("data: ")]
        assert names[-1] == "response.completed" and "error" not in names, names
        assert '"delta": "fake answer"' in got
    else:
        assert got["status"] == "completed"
        assert got["output"][-1]["content"][0]["text"] == "fake answer"
    assert logged(fake)[0]["retried"] is True


def test_a_request_is_retried_once_never_twice(fake):
    before = metric(fake, "claude_proxy_retries_total")
    status, _, got = ask(fake, "openai", unique("[[die:2]]"))
    assert status == 502, got
    assert "ended without an answer" in error_of("openai", got)["message"]
    assert metric(fake, "claude_proxy_retries_total") == before + 1
    assert logged(fake)[0]["retried"] is True


def test_a_request_that_needs_no_retry_is_not_marked(fake):
    status, _, got = ask(fake, "openai", "plain question")
    assert status == 200 and answer("openai", got) == "fake answer"
    assert logged(fake)[0]["retried"] is False


# -- after the first byte, and errors the upstream gave ---------------------------------------

@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_non_streamed_answer_cut_short_is_retried_from_the_start(fake, dialect):
    """Nothing of a non-streamed answer has reached the client before its end: the retry's
    answer replaces the partial one entirely."""
    status, _, got = ask(fake, dialect, unique("[[die-late:1]]"))
    assert status == 200, got
    assert answer(dialect, got) == "fake answer"
    assert logged(fake)[0]["retried"] is True


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_stream_cut_after_its_first_text_is_not_retried(fake, dialect):
    """Text has reached the client: asking again could only repeat or contradict it, so the
    stream ends with the dialect's error event, as before."""
    before = metric(fake, "claude_proxy_retries_total")
    status, _, got = ask(fake, dialect, unique("[[die-late:1]]"), stream=True)
    assert status == 200
    content, complete, err = stream_result(dialect, got)
    assert content == "partial " and not complete
    assert "ended without an answer" in err["message"]
    assert metric(fake, "claude_proxy_retries_total") == before
    assert logged(fake)[0]["retried"] is False


def test_upstream_errors_are_the_clients_to_see(fake):
    before = metric(fake, "claude_proxy_retries_total")
    status, _, got = ask(fake, "openai", "[[rate-limited]]")
    assert status == 429, got
    assert metric(fake, "claude_proxy_retries_total") == before
    assert logged(fake)[0]["retried"] is False


# -- the real CLI, SIGKILLed while it waits for the upstream ----------------------------------

def held_first_call(upstream, text):
    """Hold the first model call until `release` is set; answer every call with `text`.
    Returns (arrived, release) events."""
    arrived, release, calls = threading.Event(), threading.Event(), []

    def responder(body):
        calls.append(body)
        if len(calls) == 1:
            arrived.set()
            release.wait(60)
        return fake_upstream.text(text)
    upstream.responder = responder
    return arrived, release


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_real_cli_killed_before_first_event_is_invisible(make_proxy, upstream, dialect, stream):
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    arrived, release = held_first_call(upstream, "The answer after the kill.")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, p, dialect, "are you there?", stream=stream, timeout=120)
        try:
            assert arrived.wait(90), "the CLI never asked the upstream"
            (pid,) = children(p)
            os.kill(pid, signal.SIGKILL)
        finally:
            release.set()
        status, _, got = pending.result()
    assert status == 200, got
    if stream:
        content, complete, err = stream_result(dialect, got)
        assert (content, complete, err) == ("The answer after the kill.", True, None)
    else:
        assert answer(dialect, got) == "The answer after the kill."
    assert len(upstream.model_calls) == 2
    assert metric(p, "claude_proxy_retries_total") == 1
    assert logged(p)[0]["retried"] is True
    assert p.request("GET", "/health")[2]["retries"] == 1
    poll(lambda: pid not in children(p), "the killed CLI to be gone")
