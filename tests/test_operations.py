"""Operations and hardening (issue 6): API keys, binding, CORS, upstream and CLI faults, client
disconnects, a soak for leaks, request ids and the access log, /metrics, graceful shutdown,
`--check`, and the deployment files.

Upstream faults run on the real pinned CLI (`proxy`, or a proxy made for the test) against the
scripted fake upstream; CLI faults run on tests/fake_claude.py; the soak runs on
tests/soak_claude.sh, a shell stand-in that costs milliseconds per run.
"""
import concurrent.futures
import email.message
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import fake_upstream
import harness
from conftest import FAKE_CLAUDE, PROXY, ROOT, Gate, alive, base_env, children, need_tool, \
    no_leftover_cli, real_claude_bin, sse_events

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import claude_openai_proxy as cop  # noqa: E402

CHAT = "/v1/chat/completions"
MSGS = "/v1/messages"
AV = {"anthropic-version": "2023-06-01"}
KEY1, KEY2 = "k1-f7a3-0c9d2e41b8", "k2longer-b9e15c0d"
SOAK_CLAUDE = pathlib.Path(__file__).resolve().parent / "soak_claude.sh"
FULL = "The quick brown fox jumps over the lazy dog, twice over, and then rests a while."


# Helpers ########################################################################################

def body_for(dialect, content, stream=False, **extra):
    if dialect == "openai":
        return CHAT, {"model": "sonnet", "stream": stream,
                      "messages": [{"role": "user", "content": content}], **extra}
    return MSGS, {"model": "claude-sonnet-4-6", "max_tokens": 256, "stream": stream,
                  "messages": [{"role": "user", "content": content}], **extra}


def ask(p, dialect, content, stream=False, headers=None, timeout=60, **extra):
    """POST one request in a dialect; (status, headers, JSON or SSE text)."""
    path, body = body_for(dialect, content, stream, **extra)
    hdrs = dict(AV if dialect == "anthropic" else {}, **(headers or {}))
    return p.post(path, body, headers=hdrs, timeout=timeout)


def answer(dialect, body):
    assert isinstance(body, dict), body
    if dialect == "openai":
        return body["choices"][0]["message"]["content"]
    return "".join(b.get("text", "") for b in body["content"] if b["type"] == "text")


def error_of(dialect, body):
    """The error object of an error body, checking the dialect's shape."""
    assert isinstance(body, dict), body
    if dialect == "anthropic":
        assert body.get("type") == "error", body
    else:
        assert "type" not in body, body
    err = body.get("error")
    assert isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"], body
    assert isinstance(err.get("type"), str) and err["type"], body
    assert "Traceback" not in json.dumps(body)
    return err


def stream_result(dialect, text):
    """(streamed text, completed normally, error object or None) of an SSE body."""
    assert isinstance(text, str), text
    events = sse_events(text)
    assert events, "empty stream"
    if dialect == "openai":
        datas = [d for _n, d in events]
        assert datas[-1] == "[DONE]", "the stream must end with [DONE]: %r" % datas[-3:]
        chunks = [json.loads(d) for d in datas[:-1]]
        errors = [c["error"] for c in chunks if "error" in c]
        content = "".join(c["choices"][0]["delta"].get("content") or ""
                          for c in chunks if c.get("choices"))
        finishes = [c["choices"][0]["finish_reason"] for c in chunks
                    if c.get("choices") and c["choices"][0].get("finish_reason")]
        if errors:
            assert "error" in chunks[-1], "the error chunk must be the last before [DONE]"
            assert not finishes, "an errored stream must not also finish normally: %r" % finishes
        return content, bool(finishes) and not errors, (errors[-1] if errors else None)
    names = [n for n, _d in events]
    datas = [json.loads(d) for _n, d in events]
    content = "".join(d["delta"].get("text", "") for n, d in zip(names, datas)
                      if n == "content_block_delta")
    err = None
    if "error" in names:
        assert names[-1] == "error", names
        assert "message_stop" not in names, names
        err = datas[-1]["error"]
        assert datas[-1]["type"] == "error" and err["type"] and err["message"], datas[-1]
    else:
        assert names[-1] == "message_stop", "the stream ended without message_stop or error: %r" % names
    return content, err is None, err


def wait_for(cond, timeout, what, interval=0.05):
    """harness.wait_for, in this file's argument order."""
    return harness.wait_for(cond, what, timeout, interval)


def health(p, key=None):
    """/health as the operator sees it (a proxy with keys shows it whole to an admin key)."""
    headers = {"Authorization": "Bearer " + key} if key else None
    status, _, body = p.request("GET", "/health", headers=headers, timeout=30)
    assert status == 200, body
    return body


def wait_idle(p, timeout=5):
    """The slot is given back: nothing running or queued."""
    wait_for(lambda: (lambda c: c["running"] == 0 and c["queued"] == 0)(health(p)["concurrency"]),
             timeout, "the proxy to be idle")


def new_pids(p, before, timeout=10):
    return wait_for(lambda: [int(x) for x in set(os.listdir(p.pids)) - before], timeout,
                    "a CLI process to start")


def fake_with_pids(make_proxy, tmp_path_factory, args=(), **env):
    """A proxy on the fake CLI with no warm pool whose CLI runs record their pids."""
    env.setdefault("CLAUDE_PROXY_POOL_SIZE", 0)
    return make_proxy(fake=True, args=args, pids=tmp_path_factory.mktemp("pids"), **env)


def log_lines_with(p, needle, timeout=5):
    """Lines of the proxy's log containing `needle` (waits: the access log follows the answer)."""
    return wait_for(lambda: [l for l in p.log.splitlines() if needle in l], timeout,
                    "%r in the proxy log" % needle)


def connect_refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except (ConnectionRefusedError, ConnectionResetError):   # reset: queued when the listener closed
        return True
    except ConnectionResetError:        # queued while the listener closed: not refused yet
        return False


# Auth ###########################################################################################

@pytest.fixture(scope="module")
def auth_proxy(make_proxy):
    return make_proxy(fake=True, CLAUDE_PROXY_API_KEYS="%s,%s" % (KEY1, KEY2), CLAUDE_PROXY_POOL_SIZE=0)


BAD_AUTH = [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Bearer " + KEY1 + "x"},
            {"Authorization": "Bearer " + KEY2[:-1]}, {"Authorization": "Bearer k1"},
            {"Authorization": "Bearer %s,%s" % (KEY1, KEY2)}, {"Authorization": "Basic " + KEY1},
            {"Authorization": "Bearer "}, {"Authorization": KEY1}]


def test_missing_or_wrong_key_is_401_openai_shape(auth_proxy):
    started = health(auth_proxy, KEY1)["cli_processes_started"]
    for headers in BAD_AUTH:
        for method, path, body in (("POST", CHAT, body_for("openai", "hi")[1]), ("GET", "/v1/models", None),
                                   ("GET", "/v1/models/sonnet", None), ("GET", "/metrics", None)):
            status, hdrs, got = auth_proxy.request(method, path, body, headers=headers)
            assert status == 401, (headers, path, got)
            err = error_of("openai", got)
            assert err["type"] == "authentication_error"
            assert "API key" in err["message"] and "CLAUDE_PROXY_API_KEYS" in err["message"]
            assert hdrs.get("X-Request-Id")
    assert health(auth_proxy, KEY1)["cli_processes_started"] == started, "a CLI ran for an unauthorized call"


def test_missing_or_wrong_key_is_401_anthropic_shape(auth_proxy):
    bad = BAD_AUTH + [{"x-api-key": "wrong-key"}, {"x-api-key": KEY2[:-1]}, {"x-api-key": ""}]
    for headers in bad:
        for path in (MSGS, MSGS + "/count_tokens"):
            status, _, got = auth_proxy.post(path, body_for("anthropic", "hi")[1],
                                             headers=dict(AV, **headers))
            assert status == 401, (headers, path, got)
            err = error_of("anthropic", got)
            assert err["type"] == "authentication_error"
            assert "API key" in err["message"]


def test_valid_keys_are_accepted(auth_proxy):
    for headers in ({"Authorization": "Bearer " + KEY1}, {"Authorization": "bearer " + KEY2},
                    {"x-api-key": KEY1}, {"x-api-key": KEY2}):
        status, _, got = ask(auth_proxy, "openai", "hi", headers=headers)
        assert status == 200, (headers, got)
        assert answer("openai", got) == "fake answer"
        status, _, got = ask(auth_proxy, "anthropic", "hi", headers=headers)
        assert status == 200, (headers, got)
        assert answer("anthropic", got) == "fake answer"
        status, _, got = auth_proxy.request("GET", "/v1/models", headers=headers)
        assert status == 200 and got["data"], got


def test_health_needs_no_key_and_shows_none(auth_proxy):
    status, hdrs, got = auth_proxy.request("GET", "/health")
    assert status == 200 and got["status"] == "ok"
    text = json.dumps(got) + json.dumps(hdrs)
    assert KEY1 not in text and KEY2 not in text
    assert cop.key_digest(KEY1).hex() not in text


def test_keys_never_reach_the_log_or_the_cli(auth_proxy):
    status, _, got = ask(auth_proxy, "openai", "[[echo-env]]", headers={"Authorization": "Bearer " + KEY2})
    assert status == 200, got
    env = json.loads(answer("openai", got))
    assert "PATH" in env, "echo-env did not run"
    assert not [k for k in env if k.startswith("CLAUDE_PROXY")]
    assert KEY1 not in json.dumps(env) and KEY2 not in json.dumps(env)
    rid = "auth-log-probe-1"
    ask(auth_proxy, "anthropic", "hi", headers={"x-api-key": KEY1, "X-Request-Id": rid})
    log_lines_with(auth_proxy, rid)
    log = auth_proxy.log
    assert "listening" in log
    assert KEY1 not in log and KEY2 not in log


class _Counting:
    """Stands in for the hmac module inside claude_openai_proxy, counting comparisons."""

    def __init__(self):
        self.calls = []

    def compare_digest(self, a, b):
        self.calls.append((a, b))
        import hmac
        return hmac.compare_digest(a, b)


@pytest.mark.parametrize("given", [KEY1, KEY2, "k3-third", "nope", ""])
@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
def test_authenticate_compares_every_key(monkeypatch, given, header):
    """No early exit: every configured key is compared (as equal-length digests) whichever
    key matches, or none, so timing reveals neither which key matched nor its length."""
    ring = cop.KeyRing(cop.Config(api_keys=(KEY1, KEY2, "k3-third")))
    counter = _Counting()
    monkeypatch.setattr(cop, "hmac", counter)
    headers = email.message.Message()
    headers[header] = ("Bearer " + given) if header == "Authorization" else given
    found = ring.authenticate(headers, "127.0.0.1")
    expected = {k: "key-" + cop.hashlib.sha256(k.encode()).hexdigest()[:8]
                for k in (KEY1, KEY2, "k3-third")}.get(given)
    assert (found.name if found else None) == expected
    assert len(counter.calls) == 3, "every key must be compared"
    assert {len(a) for a, b in counter.calls} | {len(b) for a, b in counter.calls} == {32}


def test_without_keys_the_loopback_operator_is_admin_and_others_are_clients():
    ring = cop.KeyRing(cop.Config())
    assert ring.authenticate(email.message.Message(), "127.0.0.1") is cop.OPERATOR
    assert ring.authenticate(email.message.Message(), "::1").role == "admin"
    assert ring.authenticate(email.message.Message(), "192.0.2.7") is cop.ANONYMOUS
    assert cop.ANONYMOUS.role == "client"


# Binding ########################################################################################

@pytest.mark.parametrize("args,env", [
    (("--host", "0.0.0.0"), {}),
    (("--host", "::"), {}),
    ((), {"CLAUDE_PROXY_HOST": "192.0.2.10"}),
])
def test_public_bind_without_keys_refuses_to_start(home, upstream, args, env):
    e = base_env(home, upstream.url, str(FAKE_CLAUDE), **env)
    res = subprocess.run([sys.executable, str(PROXY), "--port", "0", *args], env=e,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "CLAUDE_PROXY_API_KEYS" in res.stderr, res.stderr
    assert "--allow-unauthenticated" in res.stderr
    assert "Traceback" not in res.stderr
    assert "listening" not in res.stderr


def test_public_bind_with_allow_unauthenticated_starts(make_proxy):
    p = make_proxy(fake=True, args=("--host", "0.0.0.0", "--allow-unauthenticated"),
                   CLAUDE_PROXY_POOL_SIZE=0)
    assert health(p)["status"] == "ok"
    assert "listening on http://0.0.0.0:%d" % p.port in p.log
    p.stop()
    assert p.proc.returncode == 0


def test_public_bind_with_keys_starts_and_requires_them(make_proxy):
    p = make_proxy(fake=True, args=("--host", "0.0.0.0"), CLAUDE_PROXY_API_KEYS="bind-key-31-a7c0e9f4",
                   CLAUDE_PROXY_POOL_SIZE=0)
    assert ask(p, "openai", "hi")[0] == 401
    assert ask(p, "openai", "hi", headers={"Authorization": "Bearer bind-key-31-a7c0e9f4"})[0] == 200
    p.stop()
    assert p.proc.returncode == 0


# CORS ###########################################################################################

ORIGIN = "https://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-request-id"}


@pytest.fixture(scope="module")
def cors_proxy(make_proxy):
    return make_proxy(fake=True, CLAUDE_PROXY_CORS_ORIGINS=ORIGIN, CLAUDE_PROXY_API_KEYS="cors-key-5e1-b3d8a0c2",
                      CLAUDE_PROXY_POOL_SIZE=0)


def lower(headers):
    return {k.lower(): v for k, v in headers.items()}


def test_cors_is_off_by_default(fake_proxy):
    """With CLAUDE_PROXY_CORS_ORIGINS unset no page is allowed: a request carrying an Origin
    (every browser request from a page) is refused, with no CORS header (README: Security)."""
    status, hdrs, _ = fake_proxy.request("GET", "/health", headers={"Origin": ORIGIN})
    assert status == 403 and "access-control-allow-origin" not in lower(hdrs)
    status, hdrs, _ = ask(fake_proxy, "openai", "hi", headers={"Origin": ORIGIN})
    assert status == 403 and "access-control-allow-origin" not in lower(hdrs)
    status, hdrs, _ = fake_proxy.request("OPTIONS", CHAT, headers=PREFLIGHT)
    assert status == 403
    assert not [k for k in lower(hdrs) if k.startswith("access-control-")]
    status, _, _ = ask(fake_proxy, "openai", "hi")             # a client without Origin: served
    assert status == 200


@pytest.mark.parametrize("path", [CHAT, MSGS, "/v1/models"])
def test_cors_preflight_is_answered_without_a_key(cors_proxy, path):
    status, hdrs, body = cors_proxy.request("OPTIONS", path, headers=PREFLIGHT)
    h = lower(hdrs)
    assert status == 204, body
    assert h["access-control-allow-origin"] == ORIGIN
    assert "POST" in h["access-control-allow-methods"]
    allowed = h["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "origin" in h.get("vary", "").lower()


def test_cors_headers_on_responses(cors_proxy):
    key = {"Authorization": "Bearer cors-key-5e1-b3d8a0c2", "Origin": ORIGIN}
    for status_want, (status, hdrs, _body) in (
            (200, ask(cors_proxy, "openai", "hi", headers=key)),
            (200, ask(cors_proxy, "anthropic", "hi", headers=key)),
            (401, ask(cors_proxy, "openai", "hi", headers={"Origin": ORIGIN})),   # readable by the page
            (404, cors_proxy.request("GET", "/v1/nope", headers=key)),
            (200, cors_proxy.request("GET", "/health", headers={"Origin": ORIGIN}))):
        h = lower(hdrs)
        assert status == status_want
        assert h.get("access-control-allow-origin") == ORIGIN, (status, h)
        exposed = [x.strip().lower() for x in h.get("access-control-expose-headers", "").split(",")]
        assert "retry-after" in exposed and "x-request-id" in exposed, exposed


def test_cors_other_origin_gets_nothing(cors_proxy):
    other = {"Origin": "https://evil.example", "Authorization": "Bearer cors-key-5e1-b3d8a0c2"}
    status, hdrs, _ = ask(cors_proxy, "openai", "hi", headers=other)
    assert status == 403          # another page is refused even with a key (README: Security)
    assert not [k for k in lower(hdrs) if k.startswith("access-control-")]
    status, hdrs, _ = cors_proxy.request("OPTIONS", CHAT,
                                         headers=dict(PREFLIGHT, Origin="https://evil.example"))
    assert status != 204
    assert not [k for k in lower(hdrs) if k.startswith("access-control-")]
    # a look-alike origin is not the allowed one
    status, hdrs, _ = cors_proxy.request("OPTIONS", CHAT,
                                         headers=dict(PREFLIGHT, Origin=ORIGIN + ".evil.example"))
    assert "access-control-allow-origin" not in lower(hdrs)


# Upstream faults (real CLI, fake upstream) ######################################################

@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_is_fast_and_says_claude_login(proxy, upstream, dialect, status):
    kind = "authentication_error" if status == 401 else "permission_error"
    upstream.default = fake_upstream.error(status, kind, "invalid x-api-key")
    got_status, _, got = ask(proxy, dialect, "hi", timeout=120)
    err = error_of(dialect, got)
    assert got_status == 502, "an upstream login problem is not the client's 401: %s %s" % (got_status, got)
    assert "claude login" in err["message"]
    assert "sk-ant-test-dummy-key" not in json.dumps(got)
    assert 1 <= len(upstream.model_calls) <= 3, "the CLI kept retrying (~3 minutes)"


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_upstream_429_is_429_with_retry_after(proxy, upstream, dialect):
    upstream.default = fake_upstream.error(429, "rate_limit_error", "slow down",
                                           headers={"retry-after": "1"})   # the CLI waits it once
    status, hdrs, got = ask(proxy, dialect, "hi", timeout=120)
    assert status == 429, got
    err = error_of(dialect, got)
    if dialect == "anthropic":
        assert err["type"] == "rate_limit_error"
    retry_after = lower(hdrs).get("retry-after")
    assert retry_after and retry_after.isdigit() and 1 <= int(retry_after) <= 60, hdrs
    assert len(upstream.model_calls) >= 1


@pytest.mark.parametrize("dialect,want_status,want_type", [
    ("openai", 503, None), ("anthropic", 529, "overloaded_error")])
def test_upstream_529_is_overloaded(proxy, upstream, dialect, want_status, want_type):
    upstream.default = fake_upstream.error(529, "overloaded_error", "Overloaded")
    status, _, got = ask(proxy, dialect, "hi", timeout=120)
    assert status == want_status, got
    err = error_of(dialect, got)
    if want_type:
        assert err["type"] == want_type


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_upstream_500_is_502(proxy, upstream, dialect):
    upstream.default = fake_upstream.error(500, "api_error", "Internal server error")
    status, _, got = ask(proxy, dialect, "hi", timeout=120)
    assert status == 502, got
    error_of(dialect, got)


@pytest.fixture(scope="module")
def unreachable_proxy(make_proxy):
    """A real-CLI proxy whose upstream is a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return make_proxy(ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % port, CLAUDE_PROXY_POOL_SIZE=0)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_upstream_connection_failure_is_502(unreachable_proxy, dialect, stream):
    status, _, got = ask(unreachable_proxy, dialect, "hi", stream=stream, timeout=150)
    assert status == 502, got
    err = error_of(dialect, got)
    assert "upstream" in err["message"].lower() or "reach" in err["message"].lower(), err


#: what the client has of FULL when the upstream drops after 5 events (message_start,
#: content_block_start and 3 of FULL's 10 deltas)
SENT = "".join(fake_upstream._split(FULL, 10)[:3])
OTHER = "A different answer, written from scratch."


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_stream_dropped_after_text_goes_on_when_the_new_answer_begins_with_it(
        proxy, upstream, dialect, stream):
    """The upstream connection resets after some text and the CLI asks again; the new answer
    begins with what was already sent, so a stream continues and every client gets the whole
    answer exactly once."""
    upstream.push(fake_upstream.text(FULL, chunks=10, drop_after=5))
    upstream.default = fake_upstream.text(FULL)
    status, _, got = ask(proxy, dialect, "hi", stream=stream, timeout=150)
    assert status == 200, got
    if stream:
        assert stream_result(dialect, got) == (FULL, True, None)
    else:
        assert answer(dialect, got) == FULL
    assert len(upstream.model_calls) >= 2, "the drop was not noticed"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_stream_dropped_after_text_ends_with_an_error_when_the_new_answer_differs(
        proxy, upstream, dialect, stream):
    """The same drop, but the new answer is another text: a non-streaming request gets the new
    answer alone; a stream, whose first words are out, ends with the dialect's error event
    (sent text can't be taken back), and none of the new answer is appended."""
    upstream.push(fake_upstream.text(FULL, chunks=10, drop_after=5))
    upstream.default = fake_upstream.text(OTHER)
    status, _, got = ask(proxy, dialect, "hi", stream=stream, timeout=150)
    assert status == 200, got
    if stream:
        content, complete, err = stream_result(dialect, got)
        assert (content, complete) == (SENT, False), got
        assert err and err["message"], got
    else:
        assert answer(dialect, got) == OTHER
    assert len(upstream.model_calls) >= 2, "the drop was not noticed"


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_stream_failing_after_start_ends_with_error_event(proxy, upstream, dialect):
    """Text was streamed, then every further upstream call fails with 500: the stream must
    end with the dialect's error event (not a normal finish, not a hang)."""
    upstream.push(fake_upstream.text(FULL, chunks=10, drop_after=5))
    upstream.default = fake_upstream.error(500, "api_error", "Internal server error")
    status, _, text = ask(proxy, dialect, "hi", stream=True, timeout=150)
    assert status in (200, 502), text
    if status == 502:          # nothing had reached the client yet: a plain error is right too
        error_of(dialect, text)
        return
    content, complete, err = stream_result(dialect, text)
    assert not complete and err, text
    assert FULL.startswith(content)


# CLI faults (fake CLI) ##########################################################################

@pytest.fixture(scope="module")
def one_slot(make_proxy, tmp_path_factory):
    """One CLI slot and a short queue wait, so a slot that is not given back shows at once as
    a 429 on the next request; a 2 s --timeout, which each [[hang]] waits out (the fake CLI
    answers in a fraction of that)."""
    return fake_with_pids(make_proxy, tmp_path_factory, args=("--timeout", "2"),
                          CLAUDE_PROXY_MAX_CONCURRENCY=1, CLAUDE_PROXY_QUEUE_TIMEOUT=3)


def assert_recovers(p, dialect):
    wait_idle(p)
    status, _, got = ask(p, dialect, "are you still there?")
    assert status == 200, got
    assert answer(dialect, got) == "fake answer"


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("directive,want_status,mention", [
    ("crash", 502, "exit status 3"), ("garbage", 502, "not JSON at all"),
    ("silent-exit", 502, "without an answer"), ("hang", 504, "CLAUDE_PROXY_TIMEOUT")])
def test_cli_fault_is_a_clear_error(one_slot, dialect, directive, want_status, mention):
    with no_leftover_cli(one_slot.pids, within=3):
        status, _, got = ask(one_slot, dialect, "[[%s]]" % directive, timeout=60)
    assert status == want_status, got
    err = error_of(dialect, got)
    assert mention in err["message"], err
    assert_recovers(one_slot, dialect)


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_cli_crash_mid_stream_ends_with_error_event(one_slot, dialect):
    with no_leftover_cli(one_slot.pids, within=3):
        status, _, text = ask(one_slot, dialect, "[[crash]]", stream=True)
    assert status == 200
    content, complete, err = stream_result(dialect, text)
    assert content == "partial answer"
    assert not complete and err and "exit status 3" in err["message"], err
    assert_recovers(one_slot, dialect)


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_cli_hang_streaming_is_504(one_slot, dialect):
    """Nothing was sent yet when the timeout hits, so the status can still say 504."""
    with no_leftover_cli(one_slot.pids, within=3):
        status, _, got = ask(one_slot, dialect, "[[hang]]", stream=True)
    assert status == 504, got
    error_of(dialect, got)
    assert_recovers(one_slot, dialect)


def test_cli_stderr_is_always_in_the_error(make_proxy):
    """What the CLI printed on stderr before dying is the operator's best clue: it must be in
    the error every time, not only when the stderr reader thread happened to win the race
    against the process exit (seen missing in ~2% of runs)."""
    p = make_proxy(fake=True, CLAUDE_BIN=str(SOAK_CLAUDE), CLAUDE_PROXY_POOL_SIZE=0)
    missing = []
    for i in range(60):
        status, _, got = ask(p, "openai", "[[crash]] %d" % i)
        assert status == 502, got
        if "simulated crash" not in error_of("openai", got)["message"]:
            missing.append(error_of("openai", got)["message"])
    assert not missing, "%d of 60 errors lack the CLI's stderr, e.g. %r" % (len(missing), missing[0])


def test_missing_cli_is_503_naming_claude_bin(make_proxy, tmp_path):
    p = make_proxy(fake=True, CLAUDE_BIN=str(tmp_path / "no-such-claude"), CLAUDE_PROXY_POOL_SIZE=0,
                   CLAUDE_PROXY_MAX_CONCURRENCY=1, CLAUDE_PROXY_QUEUE_TIMEOUT=2)
    for _ in range(2):                       # the slot comes back: the second is not a 429
        for dialect in ("openai", "anthropic"):
            for stream in (False, True):
                status, _, got = ask(p, dialect, "hi", stream=stream)
                assert status == 503, got
                assert "CLAUDE_BIN" in error_of(dialect, got)["message"]
    wait_idle(p)
    assert health(p)["claude_found"] is False


# Client disconnects #############################################################################

def raw_post(p, path, body, headers=None):
    data = json.dumps(body).encode()
    extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=30)
    sock.sendall(("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
                  "Content-Length: %d\r\n\r\n" % (path, extra, len(data))).encode() + data)
    return sock


@pytest.fixture(scope="module")
def patient(make_proxy, tmp_path_factory):
    """One slot and a long --timeout: only the hang-up can end a run early."""
    return fake_with_pids(make_proxy, tmp_path_factory, args=("--timeout", "120"),
                          CLAUDE_PROXY_MAX_CONCURRENCY=1, CLAUDE_PROXY_QUEUE_TIMEOUT=3)


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_kills_the_cli(patient, dialect, stream):
    one_slot = patient
    before = set(os.listdir(one_slot.pids))
    path, body = body_for(dialect, "[[slow:200]]" if stream else "[[hang]]", stream)
    sock = raw_post(one_slot, path, body, AV if dialect == "anthropic" else None)
    try:
        pids = new_pids(one_slot, before)
        if stream:
            harness.recv_until(sock, b"tick2")
        else:
            time.sleep(0.3)
        assert all(alive(pid) for pid in pids), "the CLI should still be running"
    finally:
        sock.close()
    wait_for(lambda: not any(alive(pid) for pid in pids), 3, "the CLI to be killed after the hang-up")
    assert_recovers(one_slot, dialect)


# Soak ###########################################################################################

def proc_stats(pid):
    fds = len(os.listdir("/proc/%d/fd" % pid))
    with open("/proc/%d/status" % pid) as f:
        threads = int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return fds, threads, children


def soak_request(port, kind, i):
    """One request of the soak mix on its own connection: (kind, status, ok)."""
    path, body = {
        "chat": lambda: body_for("openai", "soak %d" % i),
        "chat-stream": lambda: body_for("openai", "soak %d" % i, True),
        "msg": lambda: body_for("anthropic", "soak %d" % i),
        "msg-stream": lambda: body_for("anthropic", "soak %d" % i, True),
        "crash-stream": lambda: body_for("openai", "[[crash]] %d" % i, True),
        "garbage": lambda: body_for("anthropic", "[[garbage]] %d" % i),
        "bad-json": lambda: (CHAT, None),
        "not-found": lambda: ("/v1/nope", {"x": i}),
    }[kind]()
    data = b'{"model": ' if body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=data, headers=dict(AV, **{"Content-Type": "application/json"})
                     if path == MSGS else {"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    want = {"garbage": 502, "bad-json": 400, "not-found": 404}.get(kind, 200)
    ok = resp.status == want
    if ok and kind in ("chat", "msg"):
        ok = "soak answer" in text
    elif ok and kind.endswith("-stream"):
        ok = "soak answer" in text and (("exit status 3" in text) == (kind == "crash-stream"))
    return kind, resp.status, ok


SOAK_MIX = ("chat", "chat-stream", "msg", "msg-stream", "crash-stream", "garbage", "bad-json",
            "not-found")


def settle(pid, base, timeout=10):
    """Wait for fds, threads and children to come back to the baseline; the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        now = proc_stats(pid)
        if (now[0] <= base[0] and now[1] <= base[1] and not now[2]) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def test_soak_no_leaks(make_proxy):
    # no pool, no kept sessions: every CLI process belongs to one request and must end with it
    p = make_proxy(fake=True, CLAUDE_BIN=str(SOAK_CLAUDE), CLAUDE_PROXY_POOL_SIZE=0,
                   CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_MAX_CONCURRENCY=2, args=("--timeout", "30"))
    pid = p.proc.pid
    for i in range(3 * len(SOAK_MIX)):                               # warm-up
        assert soak_request(p.port, SOAK_MIX[i % len(SOAK_MIX)], i)[2]
    wait_idle(p)
    wait_for(lambda: not proc_stats(pid)[2], 5, "the warm-up's CLI processes to end")
    readings = []
    for _ in range(10):
        readings.append(proc_stats(pid))
        time.sleep(0.1)
    base = (min(r[0] for r in readings), min(r[1] for r in readings), [])
    started = health(p)["cli_processes_started"]

    failures = []
    for i in range(500):
        kind, status, ok = soak_request(p.port, SOAK_MIX[i % len(SOAK_MIX)], i)
        if not ok:
            failures.append((i, kind, status))
    assert not failures, failures[:10]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: soak_request(p.port, ("chat", "msg-stream", "crash-stream",
                                                                "chat-stream")[i % 4], i), range(100)))
    assert all(ok for _k, _s, ok in results), [r for r in results if not r[2]][:10]

    after = settle(pid, base)
    assert after[0] <= base[0], "open file descriptors grew: %d -> %d" % (base[0], after[0])
    assert after[1] <= base[1], "threads grew: %d -> %d" % (base[1], after[1])
    assert not after[2], "child processes left: %r" % after[2]
    body = health(p)
    assert body["concurrency"] == {"capacity": 2, "running": 0, "queued": 0}
    uses_cli = ("chat", "chat-stream", "msg", "msg-stream", "crash-stream", "garbage")
    # a garbage-printing CLI ended before any answer reached the client: asked once more
    assert body["cli_processes_started"] - started == \
        sum(SOAK_MIX[i % len(SOAK_MIX)] in uses_cli for i in range(500)) + 100 + \
        sum(SOAK_MIX[i % len(SOAK_MIX)] == "garbage" for i in range(500))

    # full capacity afterwards: both slots run at once
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(ask, p, "openai", "[[sleep]] %d" % i) for i in range(2)]
        wait_for(lambda: health(p)["concurrency"]["running"] == 2, 10, "both slots to be in use")
        for f in futs:
            status, _, got = f.result(60)
            assert status == 200 and answer("openai", got) == "soak answer", got


# Request ids and the access log #################################################################

@pytest.fixture(scope="module")
def json_log_proxy(make_proxy):
    return make_proxy(fake=True, CLAUDE_PROXY_LOG_FORMAT="json", CLAUDE_PROXY_POOL_SIZE=0)


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
def test_request_id_is_echoed(fake_proxy, dialect, stream):
    rid = "trace-%s-%d.a:b_c" % (dialect, stream)
    status, hdrs, _ = ask(fake_proxy, dialect, "hi", stream=stream, headers={"X-Request-Id": rid})
    assert status == 200
    assert lower(hdrs)["x-request-id"] == rid


def test_request_id_is_generated_and_sanitised(fake_proxy):
    ids = set()
    for _ in range(3):
        status, hdrs, _ = fake_proxy.request("GET", "/v1/models")
        assert status == 200
        rid = lower(hdrs)["x-request-id"]
        assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", rid), rid
        ids.add(rid)
    assert len(ids) == 3, "generated ids must differ"
    status, hdrs, _ = fake_proxy.request("GET", "/v1/models",
                                         headers={"X-Request-Id": "a b<c>\"d" + "x" * 300})
    rid = lower(hdrs)["x-request-id"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid) and rid.startswith("abcd"), rid
    status, hdrs, _ = fake_proxy.request("GET", "/v1/nope", headers={"X-Request-Id": "err-id-7"})
    assert status == 404 and lower(hdrs)["x-request-id"] == "err-id-7"


def test_access_log_text_line(fake_proxy):
    rid = "log-text-%d" % os.getpid()
    status, _, _ = ask(fake_proxy, "openai", "hi", headers={"X-Request-Id": rid})
    assert status == 200
    line = log_lines_with(fake_proxy, rid)[-1]
    m = re.search(re.escape(rid) + r" POST /v1/chat/completions (\d{3}) ([\d.]+)ms "
                  r"model=(\S+) in=(\d+) out=(\d+)", line)
    assert m, line
    assert m.group(1) == "200" and m.group(3) == "sonnet" and (m.group(4), m.group(5)) == ("3", "2")
    rid = "log-text-err-%d" % os.getpid()
    ask(fake_proxy, "anthropic", "hi", headers={"X-Request-Id": rid}, max_tokens=0)
    line = log_lines_with(fake_proxy, rid)[-1]
    assert " POST /v1/messages 400 " in line, line


def test_access_log_json_lines(json_log_proxy):
    rid = "log-json-1"
    status, _, _ = ask(json_log_proxy, "anthropic", "hi", headers={"X-Request-Id": rid})
    assert status == 200
    ask(json_log_proxy, "openai", "hi", stream=True, headers={"X-Request-Id": rid + "-s"})
    json_log_proxy.request("GET", "/v1/nope", headers={"X-Request-Id": rid + "-404"})
    for suffix in ("", "-s", "-404"):       # each line is written after its answer went out,
        log_lines_with(json_log_proxy, '"%s%s"' % (rid, suffix))   # so not in request order
    records = {}
    for line in json_log_proxy.log.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)                      # every JSON-looking line parses
            records[rec["id"]] = rec
    for key, method, path, status_want, model, tokens in (
            (rid, "POST", MSGS, 200, "claude-sonnet-4-6", (3, 2)),
            (rid + "-s", "POST", CHAT, 200, "sonnet", (3, 2)),
            (rid + "-404", "GET", "/v1/nope", 404, None, (0, 0))):
        rec = records[key]
        assert (rec["method"], rec["path"], rec["status"]) == (method, path, status_want), rec
        assert isinstance(rec["ms"], (int, float)) and rec["ms"] >= 0
        if model:
            assert rec["model"] == model
        assert (rec["tokens_in"], rec["tokens_out"]) == tokens, rec


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_stream_the_client_abandons_is_logged_499(make_proxy, upstream, dialect):
    """A raw client reads the first bytes of a stream and closes: the access log line, the
    dashboard's request list and /metrics all record 499 (client closed request), not the 200
    whose head went out, so abandoned streams are told from served ones."""
    p = make_proxy(CLAUDE_PROXY_LOG_FORMAT="json", CLAUDE_PROXY_POOL_SIZE=0)
    upstream.push(fake_upstream.text("one two three four five six seven eight nine ten",
                                     chunks=40, delay=0.2))
    rid = "abandoned-%s" % dialect
    path, body = body_for(dialect, "count slowly", stream=True)
    sock = raw_post(p, path, body, dict(AV if dialect == "anthropic" else {}, **{"X-Request-Id": rid}))
    try:
        got = harness.recv_until(sock, b"data: ")
        assert got.startswith(b"HTTP/1.1 200 "), got
    finally:
        sock.close()
    [line] = log_lines_with(p, '"%s"' % rid, timeout=30)
    rec = json.loads(line)
    assert (rec["path"], rec["status"]) == (path, 499), rec
    status, _, data = p.request("GET", "/dashboard/data")
    assert status == 200
    assert [r["status"] for r in data["requests"] if r["id"] == rid] == [499]
    assert scrape(p)[0]['claude_proxy_requests_total{route="%s",status="499"}' % path] == 1


# Metrics ########################################################################################

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? (-?[0-9.e+]+|\+Inf|NaN)$')


def scrape(p):
    status, hdrs, text = p.request("GET", "/metrics")
    assert status == 200
    assert lower(hdrs)["content-type"].startswith("text/plain")
    samples, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            typed[name] = kind
        elif line.startswith("#") or not line.strip():
            continue
        else:
            m = SAMPLE.match(line)
            assert m, "not Prometheus text: %r" % line
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples, typed


@pytest.fixture(scope="module")
def metrics_proxy(make_proxy):
    return make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=1)


def test_metrics_exposition(metrics_proxy):
    samples, typed = scrape(metrics_proxy)
    for name, kind in (("claude_proxy_requests_total", "counter"), ("claude_proxy_in_flight", "gauge"),
                       ("claude_proxy_queued", "gauge"),
                       ("claude_proxy_cli_processes_started_total", "counter"),
                       ("claude_proxy_idle_requests_total", "counter"),
                       ("claude_proxy_idle_processes", "gauge"),
                       ("claude_proxy_tokens_total", "counter"),
                       ("claude_proxy_ttft_seconds", "histogram"),
                       ("claude_proxy_duration_seconds", "histogram")):
        assert typed.get(name) == kind, (name, typed)
    for key in tuple('claude_proxy_idle_requests_total{served_by="%s"}' % k
                     for k in ("kept", "reused", "initialized", "pool", "spawned")) + (
                'claude_proxy_tokens_total{direction="in"}', 'claude_proxy_tokens_total{direction="out"}',
                "claude_proxy_in_flight", "claude_proxy_queued"):
        assert key in samples, key
    assert samples["claude_proxy_in_flight"] >= 1            # the scrape itself
    for h in ("ttft", "duration"):
        buckets = [(k, v) for k, v in samples.items() if k.startswith("claude_proxy_%s_seconds_bucket" % h)]
        values = [v for _k, v in buckets]
        assert values == sorted(values), "buckets must be cumulative"
        assert buckets[-1][0].endswith('le="+Inf"}')
        assert values[-1] == samples["claude_proxy_%s_seconds_count" % h]


def test_metrics_counters_move(metrics_proxy):
    ask(metrics_proxy, "openai", "warm up")
    wait_idle(metrics_proxy)
    before, _ = scrape(metrics_proxy)
    status, _, got = ask(metrics_proxy, "openai", "hi")
    assert status == 200, got
    status, _, _ = ask(metrics_proxy, "anthropic", "hi", stream=True)
    assert status == 200
    metrics_proxy.request("GET", "/v1/nope")
    after = {}

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    def settled():                       # a request is counted just after its answer is sent
        after.clear()
        after.update(scrape(metrics_proxy)[0])
        return delta('claude_proxy_requests_total{route="other",status="404"}') >= 1 and \
            delta('claude_proxy_requests_total{route="/v1/messages",status="200"}') >= 1 and \
            delta("claude_proxy_duration_seconds_count") >= 2
    wait_for(settled, 5, "the requests to be counted", interval=0.1)

    assert delta('claude_proxy_requests_total{route="/v1/chat/completions",status="200"}') == 1
    assert delta('claude_proxy_requests_total{route="/v1/messages",status="200"}') == 1
    assert delta('claude_proxy_requests_total{route="other",status="404"}') == 1
    assert delta('claude_proxy_requests_total{route="/metrics",status="200"}') >= 1
    assert delta("claude_proxy_cli_processes_started_total") >= 1
    assert sum(delta('claude_proxy_idle_requests_total{served_by="%s"}' % k)
               for k in ("kept", "reused", "initialized", "pool", "spawned")) == 2
    assert delta('claude_proxy_tokens_total{direction="in"}') == 6
    assert delta('claude_proxy_tokens_total{direction="out"}') == 4
    assert delta("claude_proxy_duration_seconds_count") == 2
    assert delta("claude_proxy_ttft_seconds_count") == 2
    assert delta("claude_proxy_duration_seconds_sum") > 0
    assert after["claude_proxy_queued"] == 0


# Graceful shutdown ##############################################################################

def test_sigterm_stops_accepting_and_drains(make_proxy, tmp_path_factory):
    p = fake_with_pids(make_proxy, tmp_path_factory, args=("--timeout", "120"))
    before = set(os.listdir(p.pids))
    result, gate = {}, Gate(p.env["HOME"])          # the request runs until the gate opens

    def run():
        try:
            result["r"] = ask(p, "openai", gate.text, timeout=120)
        except Exception as exc:  # noqa: BLE001
            result["r"] = exc

    t = threading.Thread(target=run)
    t.start()
    pids = new_pids(p, before)
    wait_for(lambda: health(p)["concurrency"]["running"] == 1, 10, "the request to run")
    p.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: connect_refused(p.port), 5, "the listener to close", interval=0.02)
    assert t.is_alive(), "the request finished before the listener closed; cannot judge draining"
    assert p.proc.poll() is None, "the proxy exited with a request in flight"
    gate.open()
    t.join(120)
    assert not t.is_alive()
    status, _, got = result["r"]
    assert status == 200, got
    assert answer("openai", got) == "gate open", "the whole answer, also what came after SIGTERM"
    assert p.proc.wait(30) == 0
    assert "stopped" in p.log and "grace period over" not in p.log
    assert not any(alive(pid) for pid in pids)


def test_sigterm_grace_over_kills_the_cli(make_proxy, tmp_path_factory):
    p = fake_with_pids(make_proxy, tmp_path_factory, args=("--timeout", "120"),
                       CLAUDE_PROXY_SHUTDOWN_GRACE=1)
    before = set(os.listdir(p.pids))
    result = {}

    def run():
        try:
            result["r"] = ask(p, "anthropic", "[[hang]]", timeout=60)
        except Exception as exc:  # noqa: BLE001 - a dropped connection is what is expected
            result["r"] = exc

    t = threading.Thread(target=run)
    t.start()
    pids = new_pids(p, before)
    wait_for(lambda: all(alive(pid) for pid in pids), 5, "the CLI to run")
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(20) == 0
    wait_for(lambda: not any(alive(pid) for pid in pids), 3, "the hung CLI to be killed")
    t.join(30)
    assert not t.is_alive(), "the client was left hanging"
    assert "grace period over" in p.log


# --check ########################################################################################

def run_check(env, timeout=180):
    res = subprocess.run([sys.executable, str(PROXY), "--check"], env=env, capture_output=True,
                         text=True, timeout=timeout)
    return res.returncode, res.stdout + res.stderr


def pinned_cli_version():
    return re.search(r"^CLI_VERSION=(\S+)", (ROOT / ".ci" / "run").read_text(), re.M).group(1)


def test_check_ok_with_real_cli(home, upstream):
    upstream.default = fake_upstream.text("OK")
    env = base_env(home, upstream.url, real_claude_bin(), CLAUDE_PROXY_API_KEYS="check-secret-77d2,other-4k-5e2a91c07d")
    rc, out = run_check(env)
    assert rc == 0, out
    assert pinned_cli_version() in out
    assert "Logged in: yes" in out
    assert "check-secret-77d2" not in out and "other-4k" not in out
    assert "sk-ant-test-dummy-key" not in out
    assert re.search(r"CLAUDE_PROXY_API_KEYS\s+2 key\(s\), masked", out), out
    assert re.search(r"idle CLI sizes: pool \d+, sessions \d+, budget \d+ \(.*from MemAvailable", out), out
    assert len(upstream.model_calls) >= 1


def test_check_fails_when_upstream_refuses_login(home, upstream):
    upstream.default = fake_upstream.error(401, "authentication_error", "invalid x-api-key")
    rc, out = run_check(base_env(home, upstream.url, real_claude_bin()))
    assert rc != 0, out
    assert "Logged in: NO" in out and "claude login" in out


def test_check_fails_without_the_cli(home, upstream, tmp_path):
    rc, out = run_check(base_env(home, upstream.url, str(tmp_path / "no-such-claude")))
    assert rc != 0, out
    assert "NOT FOUND" in out and "CLAUDE_BIN" in out
    assert "Traceback" not in out


# Deployment files ###############################################################################

def unit_settings(text):
    """[section] -> list of (key, value) of a systemd unit (keys may repeat)."""
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, [])
        else:
            k, _, v = line.partition("=")
            out[section].append((k.strip(), v.strip()))
    return out


def test_systemd_unit_verifies(tmp_path):
    tool = need_tool("systemd-analyze")
    shutil.copy(ROOT / "claude-proxy.service", tmp_path / "claude-proxy@.service")
    res = subprocess.run([tool, "verify", "--man=no", str(tmp_path / "claude-proxy@alice.service")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for bad in ("Unknown key", "Unknown section", "Invalid", "Failed", "bad unit file", "Ignoring"):
        assert bad.lower() not in out.lower(), out


def test_systemd_unit_settings():
    s = unit_settings((ROOT / "claude-proxy.service").read_text())
    svc = dict(s["Service"])
    assert svc["User"] == "%i"
    assert svc["Restart"] == "on-failure"
    stop = re.fullmatch(r"(\d+)s?", svc["TimeoutStopSec"])
    assert stop and int(stop.group(1)) > cop.Config().shutdown_grace
    assert svc.get("KillSignal", "SIGTERM") in ("SIGTERM", "SIGINT")
    for flag in ("NoNewPrivileges", "PrivateTmp"):
        assert svc[flag] in ("yes", "true", "1", "on"), flag
    assert svc["ProtectSystem"] in ("strict", "full", "yes", "true")
    rw = " ".join(v for k, v in s["Service"] if k == "ReadWritePaths").split()
    assert any(p.lstrip("-") in ("/home/%i/.claude", "%h/.claude") for p in rw), rw
    assert "claude_openai_proxy.py" in svc["ExecStart"]
    assert "WantedBy" in dict(s["Install"])


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    version = re.search(r"^ARG CLAUDE_CODE_VERSION=(\S+)", text, re.M)
    assert version and version.group(1) == pinned_cli_version()
    assert "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" in text
    copies = [l for l in text.splitlines() if l.startswith(("COPY ", "ADD "))]
    assert any("claude_openai_proxy.py" in l for l in copies), copies
    assert any(re.search(r"\bmodules\b", l) for l in copies), copies
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert re.search(r"^HEALTHCHECK .*?/health", text, re.M | re.S)
    cmd = [l for l in text.splitlines() if l.startswith(("CMD", "ENTRYPOINT"))]
    assert cmd and "claude_openai_proxy.py" in cmd[-1]


def test_docker_compose():
    text = (ROOT / "docker-compose.yml").read_text()
    lines = text.splitlines()

    def block(key):
        """Items of a YAML list under `key:` (by indentation)."""
        for i, line in enumerate(lines):
            if line.strip() == key + ":":
                indent = len(line) - len(line.lstrip())
                items = []
                for nxt in lines[i + 1:]:
                    if not nxt.strip() or nxt.strip().startswith("#"):
                        continue
                    if len(nxt) - len(nxt.lstrip()) <= indent:
                        break
                    items.append(nxt.strip().lstrip("-").strip().strip("\"'"))
                return items
        return []

    ports = block("ports")
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports
    assert block("env_file"), "an env_file holds the keys"
    vols = block("volumes")
    claude = [v for v in vols if re.search(r"\.claude:/home/claude/\.claude(:rw)?$", v)]
    assert claude, vols
    assert "HOME=/home/claude" in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_subscription_limit_becomes_429_with_rate_limit_headers(fake_proxy, path):
    """With a subscription login the CLI reports its limit (rate_limit_event); a refused request
    gets 429 with Retry-After and the limit as x-ratelimit-* / anthropic-ratelimit-* headers."""
    body = {"model": "sonnet", "messages": [{"role": "user", "content": "[[rate-limited]]"}]}
    if path == "/v1/messages":
        body["max_tokens"] = 10
    status, headers, got = fake_proxy.post(path, body)
    assert status == 429, got
    h = {k.lower(): v for k, v in headers.items()}
    assert 100 <= int(h["retry-after"]) <= 121
    assert h["x-ratelimit-reset-requests"] == h["retry-after"] + "s"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["anthropic-ratelimit-unified-status"] == "rejected"
    assert h["anthropic-ratelimit-unified-type"] == "five_hour"
    assert int(h["anthropic-ratelimit-unified-reset"]) > 1_700_000_000
    message = got["error"]["message"]
    assert "usage limit" in message


def test_slow_clients_cannot_hold_a_thread(make_proxy):
    """A client that stalls in its headers or its body is cut off after
    CLAUDE_PROXY_READ_TIMEOUT; a stalled body gets a 408; the server keeps serving."""
    p = make_proxy(fake=True, CLAUDE_PROXY_READ_TIMEOUT=1, CLAUDE_PROXY_POOL_SIZE=0)

    def stalled(payload):
        """What the server sent before it closed the connection (a client that waited 10 s
        for that would raise socket.timeout and fail the test)."""
        return harness.send_raw(p.port, payload, timeout=10)

    data = stalled(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    assert data == b""
    data = stalled(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mod")
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"CLAUDE_PROXY_READ_TIMEOUT" in data and b"Connection: close" in data
    assert p.request("GET", "/health")[0] == 200


# Auth on the Responses API ######################################################################

def test_responses_api_needs_a_key_like_chat(auth_proxy):
    """/v1/responses is behind the same keys: 401 in OpenAI's shape for every bad header (and
    no CLI runs for it), 200 with a right key."""
    body = {"model": "sonnet", "input": "hi"}
    started = health(auth_proxy, KEY1)["cli_processes_started"]
    for headers in BAD_AUTH:
        status, _, got = auth_proxy.post("/v1/responses", body, headers=headers)
        assert status == 401, (headers, got)
        err = error_of("openai", got)
        assert err["type"] == "authentication_error" and "CLAUDE_PROXY_API_KEYS" in err["message"]
    assert health(auth_proxy, KEY1)["cli_processes_started"] == started, "a CLI ran for an unauthorized call"
    for headers in ({"Authorization": "Bearer " + KEY1}, {"x-api-key": KEY2}):
        status, _, got = auth_proxy.post("/v1/responses", body, headers=headers)
        assert status == 200, got
        assert [c["text"] for item in got["output"] if item["type"] == "message"
                for c in item["content"]] == ["fake answer"]


# A stalled upstream (real CLI, fake upstream) ###################################################

@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_upstream_stalled_after_message_start_is_a_504_at_the_timeout(make_proxy, upstream, dialect):
    """The upstream sends message_start and then nothing (the CLI alone would wait 300 s): the
    request ends at CLAUDE_PROXY_TIMEOUT with a 504 and the CLI is ended with it (6 s here: the
    real CLI reaches the upstream within about one)."""
    p = make_proxy(args=("--timeout", "6"), CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0,
                   CLAUDE_PROXY_REUSE=0)
    upstream.push(fake_upstream.text(FULL, stall=120))
    status, _, got = ask(p, dialect, "hi", timeout=60)
    assert status == 504, got
    assert "CLAUDE_PROXY_TIMEOUT" in error_of(dialect, got)["message"]
    assert len(upstream.model_calls) == 1, "the request never reached the upstream"
    wait_for(lambda: not health(p)["concurrency"]["running"], 5, "the slot to be given back")
    wait_for(lambda: not children(p.proc.pid), 5, "the stalled CLI to be ended")
