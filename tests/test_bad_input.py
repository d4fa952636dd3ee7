"""Malformed requests of every kind, in both dialects (issue 6: hardening).

Each case must give a 4xx in the caller's dialect (OpenAI `{"error": {...}}` on
/v1/chat/completions and other routes, Anthropic `{"type": "error", "error": {...}}` on
/v1/messages), with a message a person can act on (naming the offending field where there is
one), no traceback, and nothing started: no CLI process (the fake CLI records every run's pid)
and no call to the fake upstream.  Most cases run on `fake_proxy` (validation happens before
any CLI runs); a subset runs on the real-CLI `proxy` too.  Transport-level faults
(Content-Length, chunking, request line, header size) are sent on raw sockets.
"""
import http.client
import json
import os
import socket
import time
from dataclasses import dataclass, field

import pytest

from harness import send_raw

CHAT = "/v1/chat/completions"
MSGS = "/v1/messages"
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5"
           "ErkJggg==")


# Helpers ########################################################################################

def send(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection: (status, headers, text).  `body` is bytes, or any
    other value is sent as JSON."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode("utf-8")
    finally:
        conn.close()


def raw_exchange(port, data, method="POST", shutdown_write=False, timeout=15):
    """Send raw bytes, parse one HTTP response: (status, headers, text)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode("utf-8")
    finally:
        sock.close()


def check_error(status, headers, text, dialect, expect_status, mention=None):
    """The common contract of every error answer; returns the error object."""
    assert status == expect_status, (status, text)
    assert 400 <= status < 500
    assert headers.get("content-type", "").startswith("application/json"), headers
    for sign in ("Traceback (most recent call last)", 'File "/', "<html", "<!DOCTYPE"):
        assert sign not in text, text
    body = json.loads(text)
    if dialect == "anthropic":
        assert body.get("type") == "error", body
        err = body["error"]
        assert set(err) >= {"type", "message"}, body
        want_type = {400: "invalid_request_error", 404: "not_found_error",
                     413: "request_too_large"}.get(status)
        if want_type:
            assert err["type"] == want_type, body
    else:
        assert "type" not in body or body["type"] != "error", body
        err = body["error"]
        assert isinstance(err, dict) and set(err) >= {"message", "type", "param", "code"}, body
        if status == 400:
            assert err["type"] == "invalid_request_error", body
    assert isinstance(err["type"], str) and err["type"], body
    assert isinstance(err["message"], str) and len(err["message"].strip()) >= 10, body
    if mention:
        assert mention.lower() in err["message"].lower(), \
            "the message should name %r: %r" % (mention, err["message"])
    return err


def cli_runs(p):
    """Pid files of fake CLI runs (fake_proxy), or None for a proxy without them."""
    pids = getattr(p, "pids", None)
    return set(os.listdir(pids)) if pids else None


def nested_lists(depth):
    return ("[" * depth + "]" * depth).encode()


# The table ######################################################################################

@dataclass
class Case:
    id: str
    path: str
    body: object                  # bytes (sent as is) or a JSON value
    status: int = 400
    mention: str = None           # must appear in the message (case-insensitive)
    method: str = "POST"
    headers: dict = field(default_factory=dict)

    @property
    def dialect(self):
        return "anthropic" if self.path.startswith(MSGS) else "openai"


def user(content="hi"):
    return [{"role": "user", "content": content}]


def oa(**fields):
    body = {"model": "sonnet", "messages": user()}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not DROP}


def an(**fields):
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": user()}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
ATOOL = {"name": "get_weather", "input_schema": {"type": "object"}}
BAD_UTF8 = b'{"model": "sonnet", "max_tokens": 9, "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'
DEEP_DICT = {"model": "sonnet", "messages": user(), "metadata": {}}
_d = DEEP_DICT["metadata"]
for _ in range(100):
    _d["a"] = {}
    _d = _d["a"]

OPENAI_CASES = [
    Case("oa-not-json", CHAT, b'{"model": "sonnet", "messages": [', mention="JSON"),
    Case("oa-not-json-text", CHAT, b"hello there", mention="JSON"),
    Case("oa-empty-body", CHAT, b"", mention="empty"),
    Case("oa-top-list", CHAT, [{"role": "user", "content": "hi"}], mention="object"),
    Case("oa-top-string", CHAT, "hello", mention="object"),
    Case("oa-top-number", CHAT, 42, mention="object"),
    Case("oa-top-null", CHAT, b"null", mention="object"),
    Case("oa-messages-missing", CHAT, oa(messages=DROP), mention="messages"),
    Case("oa-messages-not-list", CHAT, oa(messages="hi"), mention="messages"),
    Case("oa-messages-empty", CHAT, oa(messages=[]), mention="messages"),
    Case("oa-message-not-object", CHAT, oa(messages=["hi"]), mention="messages[0]"),
    Case("oa-role-missing", CHAT, oa(messages=[{"content": "hi"}]), mention="role"),
    Case("oa-role-unknown", CHAT, oa(messages=[{"role": "wizard", "content": "hi"}]), mention="role"),
    Case("oa-only-system", CHAT, oa(messages=[{"role": "system", "content": "be brief"}]),
         mention="messages"),
    Case("oa-content-number", CHAT, oa(messages=user(42)), mention="content"),
    Case("oa-content-missing", CHAT, oa(messages=[{"role": "user"}]), mention="content"),
    Case("oa-part-unknown-type", CHAT, oa(messages=user([{"type": "audio", "data": "x"}])),
         mention="audio"),
    Case("oa-part-not-object", CHAT, oa(messages=user(["hi"])), mention="content[0]"),
    Case("oa-text-part-no-text", CHAT, oa(messages=user([{"type": "text"}])), mention="text"),
    Case("oa-system-content-image", CHAT, oa(messages=[
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "user", "content": "hi"}]), mention="content[0]"),
    Case("oa-tool-msg-no-call-id", CHAT, oa(messages=user() + [{"role": "tool", "content": "42"}]),
         mention="tool_call_id"),
    Case("oa-assistant-bad-tool-calls", CHAT, oa(messages=user() + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]),
        mention="tool_calls"),
    Case("oa-tool-calls-dict-beside-function-call", CHAT, oa(messages=user() + [
        {"role": "assistant", "content": None, "tool_calls": {"id": "c1"},
         "function_call": {"name": "f", "arguments": "{}"}}]), mention="tool_calls must be a list"),
    Case("oa-model-number", CHAT, oa(model=42), mention="model"),
    Case("oa-model-unknown", CHAT, oa(model="gpt-4o-mini"), mention="model"),
    Case("oa-stream-string", CHAT, oa(stream="yes"), mention="stream"),
    Case("oa-stop-too-many", CHAT, oa(stop=["a", "b", "c", "d", "e"]), mention="stop"),
    Case("oa-stop-number", CHAT, oa(stop=7), mention="stop"),
    Case("oa-n-2", CHAT, oa(n=2), mention="n must"),
    Case("oa-max-tokens-negative", CHAT, oa(max_tokens=-5), mention="max_tokens"),
    Case("oa-max-tokens-string", CHAT, oa(max_tokens="100"), mention="max_tokens"),
    Case("oa-tools-not-list", CHAT, oa(tools="get_weather"), mention="tools"),
    Case("oa-tool-no-function", CHAT, oa(tools=[{"type": "function"}]), mention="tools[0]"),
    Case("oa-tool-bad-name", CHAT, oa(tools=[{"type": "function", "function": {"name": "has space"}}]),
         mention="name"),
    Case("oa-tool-choice-absent", CHAT, oa(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "send_email"}}), mention="send_email"),
    Case("oa-tool-choice-required-no-tools", CHAT, oa(tool_choice="required"), mention="tool_choice"),
    Case("oa-tool-choice-bogus", CHAT, oa(tools=[TOOL], tool_choice="sometimes"), mention="tool_choice"),
    Case("oa-response-format-yaml", CHAT, oa(response_format={"type": "yaml"}),
         mention="response_format"),
    Case("oa-reasoning-effort-bogus", CHAT, oa(reasoning_effort="extreme"), mention="reasoning_effort"),
    Case("oa-logprobs", CHAT, oa(logprobs=True), mention="logprobs"),
    Case("oa-stream-options-list", CHAT, oa(stream=True, stream_options=[1]), mention="stream_options"),
    Case("oa-image-bad-base64", CHAT, oa(messages=user([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,%%%not-base64%%%"}}])), mention="base64"),
    Case("oa-invalid-utf8", CHAT, BAD_UTF8, mention="UTF-8"),
    Case("oa-nested-100", CHAT, nested_lists(100), mention="nest"),
    Case("oa-nested-100000", CHAT, nested_lists(100000), mention="nest"),
    Case("oa-nested-dict-100", CHAT, DEEP_DICT, mention="nest"),
]

ANTHROPIC_CASES = [
    Case("an-not-json", MSGS, b'{"model": "claude-sonnet-4-6", "max_tokens": ', mention="JSON"),
    Case("an-empty-body", MSGS, b"   ", mention="empty"),
    Case("an-top-list", MSGS, [1, 2, 3], mention="object"),
    Case("an-top-string", MSGS, "hello", mention="object"),
    Case("an-top-number", MSGS, 3.5, mention="object"),
    Case("an-model-missing", MSGS, an(model=DROP), mention="model"),
    Case("an-model-number", MSGS, an(model=4), mention="model"),
    Case("an-model-unknown", MSGS, an(model="gpt-4o"), mention="model"),
    Case("an-max-tokens-missing", MSGS, an(max_tokens=DROP), mention="max_tokens"),
    Case("an-max-tokens-zero", MSGS, an(max_tokens=0), mention="max_tokens"),
    Case("an-max-tokens-negative", MSGS, an(max_tokens=-1), mention="max_tokens"),
    Case("an-max-tokens-string", MSGS, an(max_tokens="64"), mention="max_tokens"),
    Case("an-max-tokens-bool", MSGS, an(max_tokens=True), mention="max_tokens"),
    Case("an-messages-missing", MSGS, an(messages=DROP), mention="messages"),
    Case("an-messages-not-list", MSGS, an(messages={"role": "user", "content": "hi"}), mention="messages"),
    Case("an-messages-empty", MSGS, an(messages=[]), mention="messages"),
    Case("an-message-not-object", MSGS, an(messages=["hi"]), mention="messages.0"),
    Case("an-role-missing", MSGS, an(messages=[{"content": "hi"}]), mention="role"),
    Case("an-role-system", MSGS, an(messages=[{"role": "system", "content": "hi"}]), mention="role"),
    Case("an-content-missing", MSGS, an(messages=[{"role": "user"}]), mention="content"),
    Case("an-content-number", MSGS, an(messages=user(42)), mention="content"),
    Case("an-block-unknown-type", MSGS, an(messages=user([{"type": "audio", "data": "x"}])),
         mention="audio"),
    Case("an-block-not-object", MSGS, an(messages=user(["hi"])), mention="content.0"),
    Case("an-text-block-no-text", MSGS, an(messages=user([{"type": "text"}])), mention="text"),
    Case("an-tool-result-in-assistant", MSGS, an(messages=user() + [{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]}]), mention="tool_result"),
    Case("an-tool-use-in-user", MSGS, an(messages=user([
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}])), mention="tool_use"),
    Case("an-tool-result-no-id", MSGS, an(messages=user([{"type": "tool_result", "content": "x"}])),
         mention="tool_use_id"),
    Case("an-image-base64-bad", MSGS, an(messages=user([{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "@@@"}}])), mention="base64"),
    Case("an-stream-string", MSGS, an(stream="true"), mention="stream"),
    Case("an-system-number", MSGS, an(system=12), mention="system"),
    Case("an-system-image-block", MSGS, an(system=[{"type": "image"}]), mention="system"),
    Case("an-temperature-high", MSGS, an(temperature=5), mention="temperature"),
    Case("an-stop-sequences-string", MSGS, an(stop_sequences="END"), mention="stop_sequences"),
    Case("an-stop-sequences-too-many", MSGS, an(stop_sequences=["s%d" % i for i in range(33)]),
         mention="at most 32"),
    Case("an-tools-not-list", MSGS, an(tools={"name": "x"}), mention="tools"),
    Case("an-tool-no-schema", MSGS, an(tools=[{"name": "get_weather"}]), mention="input_schema"),
    Case("an-tool-no-name", MSGS, an(tools=[{"input_schema": {"type": "object"}}]), mention="name"),
    Case("an-server-tool", MSGS, an(tools=[{"type": "code_execution_20250825",
                                            "name": "code_execution"}]),
         mention="code_execution_20250825"),
    Case("an-tool-choice-absent", MSGS, an(tools=[ATOOL], tool_choice={"type": "tool", "name": "nope"}),
         mention="tool_choice"),
    Case("an-tool-choice-bogus", MSGS, an(tools=[ATOOL], tool_choice={"type": "maybe"}),
         mention="tool_choice"),
    Case("an-thinking-budget-small", MSGS, an(max_tokens=4000, thinking={
        "type": "enabled", "budget_tokens": 100}), mention="budget_tokens"),
    Case("an-thinking-budget-over-max", MSGS, an(max_tokens=2000, thinking={
        "type": "enabled", "budget_tokens": 4000}), mention="max_tokens"),
    Case("an-thinking-type-bogus", MSGS, an(thinking={"type": "always"}), mention="thinking"),
    Case("an-output-format-bad", MSGS, an(output_config={"format": {"type": "xml"}}),
         mention="output_config"),
    Case("an-effort-bogus", MSGS, an(output_config={"effort": "ludicrous"}), mention="effort"),
    Case("an-invalid-utf8", MSGS, BAD_UTF8, mention="UTF-8"),
    Case("an-nested-100", MSGS, nested_lists(100), mention="nest"),
    Case("an-nested-100000", MSGS, nested_lists(100000), mention="nest"),
    Case("an-count-tokens-top-list", MSGS + "/count_tokens", [], mention="object"),
    Case("an-count-tokens-no-messages", MSGS + "/count_tokens", {"model": "claude-sonnet-4-6"},
         mention="messages"),
]

ROUTE_CASES = [
    Case("route-unknown-get", "/v1/nope", None, 404, "/v1/nope", method="GET"),
    Case("route-legacy-completions", "/v1/completions", {"prompt": "hi"}, 404, "/v1/completions"),
    Case("route-root-post", "/", {"prompt": "hi"}, 405, "use GET"),   # GET / is the dashboard
    Case("route-messages-batches", MSGS + "/batches", {"requests": []}, 404, "batches"),
    Case("route-model-unknown", "/v1/models/gpt-4o", None, 404, "gpt-4o", method="GET"),
    Case("method-get-chat", CHAT, None, 405, "GET", method="GET"),
    Case("method-get-messages", MSGS, None, 405, "GET", method="GET"),
    Case("method-put-messages", MSGS, an(), 405, "PUT", method="PUT"),
    Case("method-delete-models", "/v1/models", None, 405, "DELETE", method="DELETE"),
    Case("method-post-health", "/health", {"x": 1}, 405, "POST"),
    Case("method-propfind-chat", CHAT, None, 405, "PROPFIND", method="PROPFIND"),
    Case("method-foo-models", "/v1/models", b"ignored body", 405, "FOO", method="FOO"),
    Case("method-foo-unknown", "/nothing/here", None, 404, "/nothing/here", method="FOO"),
]

ALL_CASES = OPENAI_CASES + ANTHROPIC_CASES + ROUTE_CASES
REAL_CLI_SUBSET = ("oa-not-json", "oa-messages-missing", "oa-stream-string", "oa-nested-100000",
                   "an-max-tokens-missing", "an-tool-result-in-assistant", "an-thinking-budget-small",
                   "an-invalid-utf8", "route-unknown-get", "method-propfind-chat")


def test_the_table_is_big_enough():
    ids = [c.id for c in ALL_CASES]
    assert len(ids) == len(set(ids))
    assert len(OPENAI_CASES) >= 20 and len(ANTHROPIC_CASES) >= 20
    assert set(REAL_CLI_SUBSET) <= set(ids)


def run_case(p, upstream, case):
    runs, calls = cli_runs(p), len(upstream.model_calls)
    log_at = len(p.log)
    headers = dict(case.headers)
    if case.dialect == "anthropic":
        headers.update(ANTHROPIC_HEADERS)
    headers["X-Request-Id"] = "bad-" + case.id
    status, hdrs, text = send(p.port, case.method, case.path, case.body, headers)
    err = check_error(status, hdrs, text, case.dialect, case.status, case.mention)
    assert hdrs.get("x-request-id") == "bad-" + case.id
    # nothing was started, nothing reached "Anthropic"
    assert len(upstream.model_calls) == calls
    if runs is not None:
        assert cli_runs(p) == runs, "a CLI process was started for an invalid request"
    deadline = time.time() + 3           # the access log line is written after the answer
    while "bad-" + case.id not in p.log[log_at:] and time.time() < deadline:
        time.sleep(0.02)
    new_log = p.log[log_at:]
    assert "bad-" + case.id in new_log
    assert "Traceback" not in new_log and "internal error" not in new_log, new_log
    # still standing, with nothing left running or queued
    assert p.proc.poll() is None, "the proxy process died"
    status, _, health = p.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["concurrency"]["running"] == 0 and health["concurrency"]["queued"] == 0
    return err


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_malformed_request_fake_cli(fake_proxy, upstream, case):
    run_case(fake_proxy, upstream, case)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.id in REAL_CLI_SUBSET],
                         ids=lambda c: c.id)
def test_malformed_request_real_cli(proxy, upstream, case):
    run_case(proxy, upstream, case)
    assert upstream.model_calls == []


def test_openai_param_names_the_field(fake_proxy):
    """OpenAI clients read error.param: a field error names it."""
    for body, param in ((oa(messages=DROP), "messages"), (oa(stream=1), "stream"), (oa(n=3), "n"),
                        (oa(stop=["a"] * 5), "stop"), (oa(max_tokens=0), "max_tokens"),
                        (oa(tools=[TOOL], tool_choice={"type": "function",
                                                       "function": {"name": "x"}}), "tool_choice")):
        status, _, text = send(fake_proxy.port, "POST", CHAT, body)
        assert status == 400, text
        assert json.loads(text)["error"]["param"] == param, text


# Remote images: refused, and never fetched ######################################################

@pytest.mark.parametrize("which", ["fake", "real"])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_remote_image_url_is_400_and_not_fetched(request, upstream, which, dialect):
    p = request.getfixturevalue("fake_proxy" if which == "fake" else "proxy")
    url = upstream.url + "/cat-picture-%s.png" % dialect
    if dialect == "openai":
        path, body = CHAT, oa(messages=user([{"type": "text", "text": "what is it?"},
                                             {"type": "image_url", "image_url": {"url": url}}]))
    else:
        path, body = MSGS, an(messages=user([{"type": "text", "text": "what is it?"},
                                             {"type": "image", "source": {"type": "url", "url": url}}]))
    runs = cli_runs(p)
    status, hdrs, text = send(p.port, "POST", path, body)
    err = check_error(status, hdrs, text, dialect, 400, "data:")
    assert "fetch" in err["message"].lower() or "remote" in err["message"].lower()
    time.sleep(0.2)
    assert not [r for r in upstream.requests if "cat-picture" in r["path"]], "the image was fetched"
    assert upstream.model_calls == []
    if runs is not None:
        assert cli_runs(p) == runs


def test_inline_image_is_accepted(fake_proxy):
    """Control for the image cases: a data: URL goes through."""
    status, _, text = send(fake_proxy.port, "POST", CHAT, oa(messages=user([
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}}])))
    assert status == 200, text
    assert json.loads(text)["choices"][0]["message"]["content"] == "fake answer"


# Transport-level faults (raw sockets) ###########################################################

def post_head(path, *lines):
    head = "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" % path
    return (head + "".join(line + "\r\n" for line in lines) + "\r\n").encode()


@pytest.mark.parametrize("path", [CHAT, MSGS])
@pytest.mark.parametrize("length,expect,mention", [
    ("-5", 400, "Content-Length"), ("abc", 400, "Content-Length"), ("1e3", 400, "Content-Length"),
    ("", 400, "Content-Length"), (None, 411, "Content-Length")])
def test_bad_content_length(fake_proxy, upstream, path, length, expect, mention):
    runs = cli_runs(fake_proxy)
    lines = [] if length is None else ["Content-Length: %s" % length]
    data = post_head(path, *lines) + b'{"model": "sonnet"}'
    status, hdrs, text = raw_exchange(fake_proxy.port, data)
    dialect = "anthropic" if path == MSGS else "openai"
    check_error(status, hdrs, text, dialect, expect, mention)
    assert cli_runs(fake_proxy) == runs and upstream.model_calls == []


@pytest.mark.parametrize("path", [CHAT, MSGS])
def test_body_shorter_than_content_length(fake_proxy, path):
    data = post_head(path, "Content-Length: 500") + b'{"model": "sonnet"}'
    status, hdrs, text = raw_exchange(fake_proxy.port, data, shutdown_write=True)
    check_error(status, hdrs, text, "anthropic" if path == MSGS else "openai", 400, "Content-Length")


@pytest.mark.parametrize("path", [CHAT, MSGS])
def test_malformed_chunked_body(fake_proxy, path):
    data = post_head(path, "Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n"
    status, hdrs, text = raw_exchange(fake_proxy.port, data)
    check_error(status, hdrs, text, "anthropic" if path == MSGS else "openai", 400, "chunked")


def test_chunked_body_is_accepted(fake_proxy):
    """Control for the chunked cases: a well-formed chunked body is read and answered."""
    body = json.dumps(oa()).encode()
    half = len(body) // 2
    data = post_head(CHAT, "Transfer-Encoding: chunked") + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half, body[:half], len(body) - half, body[half:])
    status, _, text = raw_exchange(fake_proxy.port, data)
    assert status == 200, text
    assert json.loads(text)["choices"][0]["message"]["content"] == "fake answer"


@pytest.mark.parametrize("line", [b"THIS IS NOT HTTP", b"GARBAGE", b"GET /health HTTP/9"])
def test_garbage_request_line_is_a_json_4xx(fake_proxy, line):
    """A request line http.server cannot parse still gets a real HTTP/1.1 status line and
    JSON, not a bare body (which a client cannot read as a response at all)."""
    raw = send_raw(fake_proxy.port, line + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1."), "no status line: %r" % raw[:300]
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert 400 <= status < 500 or status == 505, head
    assert b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["message"] and err["type"]


def test_oversized_header_is_json_4xx(fake_proxy):
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    status, hdrs, text = raw_exchange(fake_proxy.port, data, method="GET")
    assert status in (400, 431), text
    check_error(status, hdrs, text, "openai", status)


def test_too_many_headers_is_json_4xx(fake_proxy):
    data = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n"
    status, hdrs, text = raw_exchange(fake_proxy.port, data, method="GET")
    assert status in (400, 431), text
    check_error(status, hdrs, text, "openai", status)


# Body size limit ################################################################################

@pytest.fixture(scope="module")
def small_body_proxy(make_proxy):
    return make_proxy(fake=True, CLAUDE_PROXY_MAX_BODY=4096, CLAUDE_PROXY_POOL_SIZE=0)


@pytest.mark.parametrize("path", [CHAT, MSGS])
def test_body_over_max_body_is_413(small_body_proxy, upstream, path):
    big = (oa if path == CHAT else an)(messages=user("x" * 20000))
    status, hdrs, text = send(small_body_proxy.port, "POST", path, big)
    dialect = "anthropic" if path == MSGS else "openai"
    err = check_error(status, hdrs, text, dialect, 413, "CLAUDE_PROXY_MAX_BODY")
    assert "4096" in err["message"]
    assert upstream.model_calls == []


def test_body_under_max_body_is_served(small_body_proxy):
    status, _, text = send(small_body_proxy.port, "POST", CHAT, oa(messages=user("x" * 1000)))
    assert status == 200, text


def test_huge_declared_length_is_413_without_reading(small_body_proxy):
    """The body is not waited for: a 413 comes back at once although nothing was sent."""
    data = post_head(CHAT, "Content-Length: 999999999999")
    status, hdrs, text = raw_exchange(small_body_proxy.port, data, timeout=15)
    check_error(status, hdrs, text, "openai", 413, "CLAUDE_PROXY_MAX_BODY")


def test_chunked_body_over_max_body_is_413(small_body_proxy):
    chunk = b"x" * 3000
    data = post_head(MSGS, "Transfer-Encoding: chunked") + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 3
    status, hdrs, text = raw_exchange(small_body_proxy.port, data)
    check_error(status, hdrs, text, "anthropic", 413, "CLAUDE_PROXY_MAX_BODY")


def test_413_tells_the_client_the_connection_closes(small_body_proxy):
    """The unread body makes the connection unusable: the proxy must say `Connection: close`
    (RFC 9112 9.6), or a keep-alive client sends its next request into a dead socket."""
    conn = http.client.HTTPConnection("127.0.0.1", small_body_proxy.port, timeout=15)
    try:
        conn.request("POST", CHAT, body=json.dumps(oa(messages=user("x" * 20000))),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 413
        assert (resp.getheader("Connection") or "").lower() == "close", resp.getheaders()
    finally:
        conn.close()


def test_405_names_the_allowed_methods(fake_proxy):
    """RFC 9110 15.5.6: a 405 carries an Allow header."""
    for method, path, allowed in (("GET", CHAT, "POST"), ("PUT", MSGS, "POST"),
                                  ("DELETE", "/v1/models", "GET"), ("POST", "/health", "GET")):
        status, hdrs, _ = send(fake_proxy.port, method, path, {} if method != "GET" else None)
        assert status == 405
        assert allowed in (hdrs.get("allow") or ""), (method, path, hdrs)


# Keep-alive stays in sync #######################################################################

def test_keep_alive_stays_in_sync_after_errors(fake_proxy):
    """On ONE connection, each answer belongs to its request: an error never leaves an unread
    body behind that the next request would be parsed from.  (A method that takes no body and
    is sent one is answered and its connection closed: test_security.py.)"""
    conn = http.client.HTTPConnection("127.0.0.1", fake_proxy.port, timeout=30)
    steps = [
        ("POST", CHAT, b'{"model": "sonnet", "messages": [', 400, "JSON"),
        ("GET", "/health", None, 200, None),
        ("POST", "/v1/nope", json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(),
         404, "/v1/nope"),
        ("GET", "/health", None, 200, None),
        ("PROPFIND", "/v1/models", None, 405, "PROPFIND"),
        ("POST", MSGS, json.dumps(an(max_tokens=DROP)).encode(), 400, "max_tokens"),
        ("GET", "/v1/models", None, 200, None),
        ("POST", CHAT, json.dumps(oa(n=5)).encode(), 400, "n must"),
        ("POST", CHAT, json.dumps(oa()).encode(), 200, None),
        ("GET", "/health", None, 200, None),
    ]
    sock = None
    try:
        for i, (method, path, body, expect, mention) in enumerate(steps):
            rid = "ka-%d-%s" % (i, method.lower())
            conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                           "X-Request-Id": rid})
            resp = conn.getresponse()
            text = resp.read().decode()
            assert resp.status == expect, (i, method, path, resp.status, text)
            assert resp.getheader("X-Request-Id") == rid, (i, resp.getheaders())
            if sock is None:
                sock = conn.sock
            assert conn.sock is sock and sock is not None, "the connection was closed at step %d" % i
            data = json.loads(text)
            if mention:
                err = data["error"]
                assert mention.lower() in err["message"].lower(), (i, data)
            elif path == "/health":
                assert data["status"] == "ok"
            elif path == "/v1/models":
                assert data["object"] == "list"
            else:
                assert data["choices"][0]["message"]["content"] == "fake answer"
    finally:
        conn.close()


# The nesting limit at its edge ###################################################################

@pytest.mark.parametrize("path", [CHAT, MSGS])
def test_json_nested_64_deep_is_served_and_65_is_refused(fake_proxy, upstream, path):
    """MAX_JSON_DEPTH = 64 counts the body object as level 1: a body 64 levels deep (here an
    unknown field holding 63 nested arrays, which the proxy ignores) is served; 65 is a 400
    naming the limit, and no CLI runs for it."""
    def body(depth):
        nested = []
        for _ in range(depth - 2):
            nested = [nested]
        return (oa if path == CHAT else an)(x_nested=nested)

    headers = ANTHROPIC_HEADERS if path == MSGS else None
    status, _, got = fake_proxy.post(path, body(64), headers=headers)
    assert status == 200, got
    err = run_case(fake_proxy, upstream, Case("nested-65", path, body(65),
                                              mention="nests deeper than 64 levels"))
    assert err["message"] == "The request body nests deeper than 64 levels."
