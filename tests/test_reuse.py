"""A warm CLI serves request after request (section 7, Idle): the reset it gets between
requests, and what the upstream sees.  Real CLI, fake upstream; behaviour, not timings.

The first tests drive one CLIProcess by hand, so they pin the CLI's own behaviour
(rewind_conversation leaves nothing behind, /clear does); the rest go through the proxy.
"""
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


def test_clear_is_not_a_clean_reset(cli, upstream):
    """The alternative that was measured: /clear empties the conversation but the CLI puts
    three caveat blocks before the next user message."""
    proc = cli()
    ask(proc, "First question.")
    ask(proc, "/clear", init=False)
    ask(proc, "Second question.", init=False)
    first = upstream.model_calls[-1]["messages"][0]["content"]
    texts = [b.get("text", "") for b in first]
    assert texts[-1].startswith("Second question.") and "First question" not in json.dumps(first)
    assert any("<local-command-caveat>" in t for t in texts)
    assert any("<command-name>/clear</command-name>" in t for t in texts)
