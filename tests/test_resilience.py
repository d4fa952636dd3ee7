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
import subprocess
import sys
import threading
import time

import pytest

import fake_upstream
from conftest import FAKE_CLAUDE, Proxy, base_env, real_claude_bin, sse_events
from fake_upstream import Plan
from test_logins import chat, new_token, no_secret_in, tokens_used
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
        assert names and names[-1] == "response.completed" and "error" not in names, got
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


# -- honest health: told at start-up, without a model turn -------------------------------------

def bare_proxy(home, upstream, claude_bin=None, **extra):
    """A proxy whose CLI has no API key (only what `extra` and `home` give it)."""
    env = base_env(home, upstream.url, claude_bin or real_claude_bin(),
                   CLAUDE_PROXY_PASS_ENV="ANTHROPIC_BASE_URL", **extra)
    env.pop("ANTHROPIC_API_KEY")
    return Proxy(env)


@pytest.fixture
def stopping():
    """Proxies made in a test, stopped at its end."""
    made = []
    yield made
    for p in made:
        p.stop()


def test_not_logged_in_is_degraded_at_start_without_a_model_turn(tmp_path, upstream, stopping):
    """A HOME with no credentials and no API key: /health's first answer says so, and nothing
    was sent upstream to find out."""
    p = bare_proxy(tmp_path, upstream)
    stopping.append(p)
    h = p.request("GET", "/health")[2]
    assert h["status"] == "degraded"
    assert h["reasons"] == ["login default cannot serve: not logged in (`claude auth status` "
                            "says so); run `claude login` on the server"]
    [login] = h["logins"]["accounts"]
    assert login["healthy"] is False and login["reason"].startswith("not logged in")
    assert upstream.requests == []
    assert "login default cannot serve" in p.log


def test_unreadable_credentials_are_degraded_at_start(tmp_path, upstream, stopping):
    """A login whose .credentials.json cannot be read (here a directory; in a container, a
    host ~/.claude owned by another uid) is named with the file and the uid."""
    config = tmp_path / "config-a"
    (config / ".credentials.json").mkdir(parents=True)
    p = bare_proxy(tmp_path, upstream, CLAUDE_PROXY_ACCOUNTS="a=%s" % config)
    stopping.append(p)
    h = p.request("GET", "/health")[2]
    assert h["status"] == "degraded"
    [reason] = h["reasons"]
    assert reason.startswith("login a cannot serve: its credentials file %s/.credentials.json "
                             "cannot be read by uid %d" % (config, os.getuid())), reason
    assert reason.endswith("; log in again: CLAUDE_CONFIG_DIR=%s claude login" % config)
    assert upstream.requests == []


def test_an_older_cli_is_degraded(make_proxy, tmp_path):
    old = tmp_path / "old-claude"
    old.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "2.0.5 (Claude Code)"; '
                   'exit 0; fi\nexec %s %s "$@"\n' % (sys.executable, FAKE_CLAUDE))
    old.chmod(0o755)
    p = make_proxy(fake=True, CLAUDE_BIN=str(old), CLAUDE_PROXY_POOL_SIZE=0)
    h = p.request("GET", "/health")[2]
    assert h["status"] == "degraded"
    assert h["reasons"] == ["the claude CLI is 2.0.5 (Claude Code), older than 2.1.330, which "
                            "this proxy is tested with and relies on (npm install -g "
                            "@anthropic-ai/claude-code@2.1.330)"]


def test_a_logged_in_proxy_starts_ok(make_proxy):
    h = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0).request("GET", "/health")[2]
    assert (h["status"], h["reasons"]) == ("ok", [])
    assert h["logins"]["accounts"][0]["reason"] is None


# -- credentials that change under a running proxy ---------------------------------------------

def write_credentials(folder, token):
    """A made-up subscription login in a CLAUDE_CONFIG_DIR, valid for a day."""
    folder.mkdir(exist_ok=True)
    (folder / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {
        "accessToken": token, "refreshToken": "sk-ant-ort01-madeup-" + secrets.token_hex(8),
        "expiresAt": int((time.time() + 86400) * 1000),
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}))


def idle_ready(p):
    h = p.request("GET", "/health")[2]
    return h["idle"]["ready"] >= 1 and h["concurrency"]["running"] == 0


@pytest.mark.parametrize("kind", ["token_file", "config_dir"])
def test_rotated_credentials_serve_the_next_request(tmp_path, upstream, stopping, kind):
    """The login's credentials are replaced on disk while its processes wait; the old token is
    revoked upstream.  The next request goes out with the new token and succeeds: no process
    that still held the old one served it."""
    old, new = new_token(), new_token()
    if kind == "token_file":
        path = tmp_path / "a.token"
        path.write_text(old + "\n")
        accounts = "a=token-file:%s" % path
    else:
        path = tmp_path / "config-a"
        write_credentials(path, old)
        accounts = "a=%s" % path
    p = bare_proxy(tmp_path, upstream, CLAUDE_PROXY_ACCOUNTS=accounts, CLAUDE_PROXY_POOL_SIZE=1)
    stopping.append(p)
    assert chat(p)[0] == 200
    poll(lambda: idle_ready(p), "an idle process of the login")
    if kind == "token_file":
        path.write_text(new + "\n")
    else:
        write_credentials(path, new)
    upstream.plans[old] = Plan(revoked=True)
    status, _, got = chat(p, "after the rotation")
    assert status == 200, got
    assert tokens_used(upstream) == [old, new]
    assert p.log.count("its credentials changed on disk") == 1
    no_secret_in(p, old, new)


def test_a_login_that_could_not_serve_is_back_once_its_token_is_written(tmp_path, upstream,
                                                                        stopping):
    token, path = new_token(), tmp_path / "late.token"
    path.write_text("")                   # created, not yet written
    p = bare_proxy(tmp_path, upstream, CLAUDE_PROXY_ACCOUNTS="a=token-file:%s" % path,
                   CLAUDE_PROXY_POOL_SIZE=0)
    stopping.append(p)
    h = p.request("GET", "/health")[2]
    assert h["status"] == "degraded" and "must hold one token" in h["reasons"][0], h
    path.write_text(token + "\n")
    poll(lambda: p.request("GET", "/health")[2]["status"] == "ok", "the login to be back")
    assert chat(p)[0] == 200
    assert tokens_used(upstream) == [token]
    assert "login a: its new credentials pass the check; serving again" in p.log


def test_the_cli_takes_a_token_another_process_refreshed(tmp_path, upstream):
    """What makes several CLI processes of one login safe (README, Operations): a process
    holding an expired access token re-reads .credentials.json before refreshing, and uses the
    token another process wrote there instead of spending the single-use refresh token (the
    refresh endpoint itself cannot be reached here: a refresh would fail and the old token go
    out).  Pinned on the real CLI, without the proxy: processes started before the change."""
    config = tmp_path / "config"
    config.mkdir()
    expired, fresh = new_token(), new_token()
    (config / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {
        "accessToken": expired, "refreshToken": "sk-ant-ort01-madeup-x",
        "expiresAt": int((time.time() - 3600) * 1000),
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLAUDE_CONFIG_DIR": str(config),
           "ANTHROPIC_BASE_URL": upstream.url, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "CLAUDE_CODE_MAX_RETRIES": "0"}
    cli = subprocess.Popen([real_claude_bin(), "-p", "--input-format", "stream-json",
                            "--output-format", "stream-json", "--verbose"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           cwd=str(tmp_path), env=env)
    try:
        cli.stdin.write(b'{"type": "control_request", "request_id": "i", "request": '
                        b'{"subtype": "initialize"}}\n')
        cli.stdin.flush()
        assert json.loads(cli.stdout.readline())["type"] == "control_response"
        write_credentials(config, fresh)                # another process refreshed it
        cli.stdin.write(json.dumps({"type": "user", "session_id": "default",
                                    "parent_tool_use_id": None, "message": {
                                        "role": "user", "content": [{"type": "text",
                                                                     "text": "hi"}]}}).encode()
                        + b"\n")
        cli.stdin.flush()
        for line in cli.stdout:
            item = json.loads(line)
            if item["type"] == "result":
                break
        assert item["is_error"] is False, item
    finally:
        cli.kill()
        cli.communicate()
    assert tokens_used(upstream) == [fresh]


# -- found by bench/soak.py: a stream reset before its first text ------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_stream_reset_before_its_first_text_still_answers(make_proxy, upstream, stream):
    """The upstream resets after message_start: the CLI asks again without streaming and the
    answer arrives as whole blocks after a message that never ended; the client gets it (it
    got an empty 200 before)."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0)
    upstream.push(fake_upstream.text("The answer, asked again.", chunks=3, drop_after=1,
                                     id="msg_reset1"))
    upstream.default = fake_upstream.text("The answer, asked again.", id="msg_reset2")
    status, _, got = ask(p, "openai", "are you there?", stream=stream, timeout=120)
    assert status == 200, got
    if stream:
        assert stream_result("openai", got) == ("The answer, asked again.", True, None)
    else:
        assert answer("openai", got) == "The answer, asked again."
    assert len(upstream.model_calls) == 2


NATIVE_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def tool_reply(drop_after=-1, msg_id="msg_reset2", chunks=1):
    reply = fake_upstream.tool_use("mcp__client__get_weather",
                                   {"city": "Paris, the capital of France"}, id="toolu_reset01",
                                   before="Let me look.", chunks=chunks, drop_after=drop_after)
    reply.id = msg_id
    return reply


def ask_weather(p, upstream, stream):
    """Paris' weather asked with the native tool, which the upstream is asked for twice (the
    reply it reset, then the one asked again); returns the 200's body."""
    body = {"model": "sonnet", "stream": stream, "tools": NATIVE_TOOLS,
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    status, _, got = p.post("/v1/chat/completions", body,
                            headers={"X-Toolcall-Module": "native"}, timeout=120)
    assert status == 200, got
    assert len(upstream.model_calls) == 2
    return got


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("drop_after", [1, 8, 9, 10])
def test_a_stream_reset_inside_a_native_tool_call_gives_it_whole(make_proxy, upstream, stream,
                                                                 drop_after):
    """The upstream resets inside the tool_use block (8: right after its start, 9 and 10: after
    one and two pieces of its arguments): the CLI withdraws the streamed message
    (abandoned_blocks) and asks again, streaming; the client gets the call once, with all its
    arguments, and the text before it once (it got arguments {} or a cut-off JSON before).
    1: a reset right after message_start, which the CLI asks again without streaming (whole
    blocks in assistant lines)."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0)
    upstream.push(tool_reply(drop_after, "msg_reset1", chunks=4))
    upstream.default = tool_reply()
    got = ask_weather(p, upstream, stream)
    if stream:
        chunks = [json.loads(line[6:]) for line in got.split("\n")
                  if line.startswith("data: {")]
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        text = "".join(d.get("content") or "" for d in deltas)
        calls = [t for d in deltas for t in d.get("tool_calls") or ()]
        assert [(t["index"], t["id"], t["function"]["name"]) for t in calls if "id" in t] == \
            [(0, "call_reset01", "get_weather")]
        arguments = "".join(t["function"]["arguments"] for t in calls)
        finish = [c["choices"][0]["finish_reason"] for c in chunks
                  if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish == ["tool_calls"]
    else:
        message = got["choices"][0]["message"]
        text = message["content"]
        assert [(t["id"], t["function"]["name"]) for t in message["tool_calls"]] == \
            [("call_reset01", "get_weather")]
        arguments = message["tool_calls"][0]["function"]["arguments"]
        assert got["choices"][0]["finish_reason"] == "tool_calls"
    assert text == "Let me look."
    assert json.loads(arguments) == {"city": "Paris, the capital of France"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_native_tool_call_asked_again_with_other_arguments(make_proxy, upstream, stream):
    """The same reset after two pieces of the arguments, and the call asked again has other
    arguments: a non-streamed answer is the new call alone; a stream, whose first pieces are
    out, ends with an error event and never a call mixing the two."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0)
    upstream.push(tool_reply(10, "msg_reset1", chunks=4))
    other = fake_upstream.tool_use("mcp__client__get_weather", {"city": "Rome"},
                                   id="toolu_reset02", before="Let me look.")
    other.id = "msg_reset2"
    upstream.default = other
    got = ask_weather(p, upstream, stream)
    if stream:
        content, complete, err = stream_result("openai", got)
        assert (content, complete) == ("Let me look.", False), got
        assert "differ" in err["message"], err
        assert "Rome" not in got
    else:
        message = got["choices"][0]["message"]
        assert [(t["id"], t["function"]["name"], json.loads(t["function"]["arguments"]))
                for t in message["tool_calls"]] == [("call_reset02", "get_weather", {"city": "Rome"})]


def two_calls_reply(msg_id, drop_after=-1):
    """Text and two native calls in one message (the CLI prints one assistant line a block)."""
    return fake_upstream.Reply(blocks=[
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_twoA", "name": "mcp__client__get_weather",
         "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_twoB", "name": "mcp__client__get_weather",
         "input": {"city": "Rome"}}], stop_reason="tool_use", drop_after=drop_after, id=msg_id)


def tool_calls_of(dialect, stream, got):
    """(text, [(id, name, arguments as JSON)], stop reason) of a native tool answer."""
    if dialect == "openai" and not stream:
        message, = [c["message"] for c in got["choices"]]
        return message["content"], [(t["id"], t["function"]["name"],
                                     json.loads(t["function"]["arguments"]))
                                    for t in message["tool_calls"]], got["choices"][0]["finish_reason"]
    if dialect == "anthropic" and not stream:
        return ("".join(b["text"] for b in got["content"] if b["type"] == "text"),
                [(b["id"], b["name"], b["input"]) for b in got["content"] if b["type"] == "tool_use"],
                got["stop_reason"])
    events = sse_events(got)
    text, calls, stop = "", {}, None
    if dialect == "openai":
        assert events[-1][1] == "[DONE]", events[-3:]
        for _name, data in events[:-1]:
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                for t in choice["delta"].get("tool_calls") or ():
                    call = calls.setdefault(t["index"], ["", "", ""])
                    call[0] += t.get("id") or ""
                    call[1] += (t.get("function") or {}).get("name") or ""
                    call[2] += (t.get("function") or {}).get("arguments") or ""
                stop = choice.get("finish_reason") or stop
    else:
        assert "error" not in [n for n, _d in events], events
        for name, data in events:
            ev = json.loads(data)
            if name == "content_block_start" and ev["content_block"]["type"] == "tool_use":
                calls[ev["index"]] = [ev["content_block"]["id"], ev["content_block"]["name"], ""]
            elif name == "content_block_delta" and ev["delta"]["type"] == "input_json_delta":
                calls[ev["index"]][2] += ev["delta"]["partial_json"]
            elif name == "content_block_delta" and ev["delta"]["type"] == "text_delta":
                text += ev["delta"]["text"]
            elif name == "message_delta":
                stop = ev["delta"]["stop_reason"]
    return text, [(i, n, json.loads(a)) for _index, (i, n, a) in sorted(calls.items())], stop


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_shown_then_not_made_when_asked_again_is_an_error(make_proxy, upstream, stream):
    """The upstream reset inside a call and the message asked again makes none.  A stream had
    shown the call's start: what the client saw can't be completed, so it gets an error saying
    so, never an answer that silently drops the call.  Without streaming the client saw
    nothing: the answer asked again is the answer."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0)
    upstream.push(tool_reply(9, "msg_gone1", chunks=4))        # 9: one piece of its arguments
    upstream.default = fake_upstream.text("Let me look.", id="msg_gone2")     # the same text, no call
    got = ask_weather(p, upstream, stream)
    if stream:
        _, complete, err = stream_result("openai", got)
        assert complete is False and err["type"] == "server_error", got
        assert "does not make that call" in err["message"], err
    else:
        assert got["choices"][0]["message"]["content"] == "Let me look."
        assert got["choices"][0]["finish_reason"] == "stop"
        assert "tool_calls" not in got["choices"][0]["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_reset_message_asked_again_whole_keeps_every_native_call(make_proxy, upstream,
                                                                   dialect, stream):
    """The upstream resets right after message_start; the CLI asks again without streaming and
    prints the answer as one assistant line a block (text, call A, call B, joined by message
    id).  The client gets both calls, in order, with their ids, names and arguments (the
    second, in a later line, was dropped before)."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0)
    upstream.push(two_calls_reply("msg_two1", drop_after=1))
    upstream.default = two_calls_reply("msg_two2")
    if dialect == "openai":
        path, body, headers = "/v1/chat/completions", {"tools": NATIVE_TOOLS}, {}
    else:
        path, headers = "/v1/messages", {"anthropic-version": "2023-06-01"}
        body = {"max_tokens": 512, "tools": [dict(t["function"], input_schema=t["function"]["parameters"])
                                             for t in NATIVE_TOOLS]}
        for t in body["tools"]:
            del t["parameters"]
    body.update(model="sonnet", stream=stream,
                messages=[{"role": "user", "content": "Weather in Paris and Rome?"}])
    status, _, got = p.post(path, body, headers=dict(headers, **{"X-Toolcall-Module": "native"}),
                            timeout=120)
    assert status == 200, got
    assert len(upstream.model_calls) == 2
    assert upstream.model_calls[1].get("stream") is not True     # the whole-blocks fallback
    prefix = "call_" if dialect == "openai" else "toolu_"
    assert tool_calls_of(dialect, stream, got) == (
        "Checking both.",
        [(prefix + "twoA", "get_weather", {"city": "Paris"}),
         (prefix + "twoB", "get_weather", {"city": "Rome"})],
        "tool_calls" if dialect == "openai" else "tool_use")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reply", ["one call ended", "second call cut"])
def test_a_reset_after_a_native_call_ended_is_an_error_not_a_wait(make_proxy, upstream, stream,
                                                                  reply):
    """The upstream resets after a tool_use block has ended (before the message's end, or
    inside a second call): the CLI has asked can_use_tool for it, keeps it, withdraws the rest
    (abandoned_blocks from_block_index 2) and does not ask again.  The client gets an error
    at once, in its dialect; the request waited for CLAUDE_PROXY_TIMEOUT before (the CLI for
    an answer to its permission request)."""
    p = make_proxy(args=("--timeout", "30"), CLAUDE_PROXY_POOL_SIZE=0)
    if reply == "one call ended":
        upstream.push(tool_reply(13, "msg_cut1", chunks=4))    # 13: after the call's block_stop
    else:
        upstream.push(two_calls_reply("msg_cut1", drop_after=9))   # 9: the second call begun
    upstream.default = fake_upstream.text("never asked for", id="msg_cut2")
    body = {"model": "sonnet", "stream": stream, "tools": NATIVE_TOOLS,
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    status, _, got = p.post("/v1/chat/completions", body,
                            headers={"X-Toolcall-Module": "native"}, timeout=60)
    if stream:
        assert status == 200, got
        content, complete, err = stream_result("openai", got)
        assert complete is False and err["type"] == "server_error", got
    else:
        assert status == 502, got
        err = error_of("openai", got)
    assert "stream broke after the model had made a tool call" in err["message"], err
    assert len(upstream.model_calls) == 1
    assert "never asked for" not in json.dumps(got)
