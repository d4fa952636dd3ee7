"""End-to-end tests of the OpenAI chat-completions dialect and the proxy's core behaviour.

Real-CLI tests go through the shared `proxy` (the pinned `claude` CLI talking to the fake
Anthropic upstream) and check both what the client received and what reached "Anthropic".
Fault tests use the fake CLI (tests/fake_claude.py), which can crash, hang or print garbage
on demand.
"""
import concurrent.futures
import json
import os
import re
import socket
import time

import openai
import pytest

import fake_upstream
from conftest import MARKER, Gate, alive, no_leftover_cli, sse_events, upstream_texts
from harness import recv_until

CHAT = "/v1/chat/completions"


# Helpers ########################################################################################

def chat(proxy, messages, model="sonnet", **extra):
    """POST a chat completion; `messages` may be a plain string (one user message)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return proxy.post(CHAT, {"model": model, "messages": messages, **extra})


def chunks_of(text):
    """The JSON chunks of an OpenAI SSE body, and whether it ended with data: [DONE]."""
    events = sse_events(text)
    datas = [data for _name, data in events]
    assert datas, "empty SSE body: %r" % text
    done = datas[-1] == "[DONE]"
    assert datas.count("[DONE]") == 1, "[DONE] must appear exactly once, at the end"
    return [json.loads(d) for d in datas if d != "[DONE]"], done


def content_deltas(chunks):
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if c.get("choices") and c["choices"][0]["delta"].get("content")]


def strip_cache(blocks):
    """Content blocks without the cache_control marks the CLI adds."""
    return [{k: v for k, v in b.items() if k != "cache_control"} for b in blocks]


def system_text(call):
    system = call.get("system") or []
    if isinstance(system, str):
        return system
    return "\n".join(b.get("text", "") for b in system)


def user_messages(call):
    return [m for m in call["messages"] if m["role"] == "user"]


def text_of(content):
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))


@pytest.fixture(scope="module")
def flat_proxy(make_proxy):
    """A proxy with CLAUDE_PROXY_HISTORY=flat: earlier turns as a JSON transcript."""
    return make_proxy(CLAUDE_PROXY_HISTORY="flat")


def transcript_in(text):
    """The JSON array of turns embedded in a flattened multi-turn prompt."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\[", text):
        try:
            value, _end = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(value, list) and value and all(isinstance(t, dict) and "role" in t for t in value):
            return value
    raise AssertionError("no JSON transcript found in the upstream prompt:\n" + text[:2000])


def error_of(body):
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    return body["error"]


def new_pids(pids_dir, before, timeout=5.0):
    """Wait until a fake CLI run started after `before` has recorded its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        fresh = set(os.listdir(pids_dir)) - before
        if fresh:
            return [int(p) for p in fresh]
        time.sleep(0.02)
    raise AssertionError("no CLI process was started")


def raw_request(proxy, body):
    """Send a chat request on a raw socket (to hang up on it later); returns the socket."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(data), data))
    return sock


def sdk_client(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)


USAGE = {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2,
         "output_tokens": 7}


# Endpoints: non-streaming, streaming, models, health ############################################

def test_non_streaming_completion(proxy, upstream):
    """A plain request returns one OpenAI chat.completion object with the upstream's text."""
    upstream.push(fake_upstream.text("pong, from upstream"))
    status, headers, body = chat(proxy, "ping")
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "sonnet"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "pong, from upstream"
    assert choice["finish_reason"] == "stop"
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert len(upstream.model_calls) == 1


def test_streaming_one_chunk_per_upstream_delta(proxy, upstream):
    """Streaming is real streaming: every upstream text delta becomes its own SSE chunk, in
    order, followed by a finish chunk and data: [DONE]."""
    upstream.push(fake_upstream.text("aaaa bbbb cccc dddd eeee", chunks=5))
    status, headers, text = chat(proxy, "count", stream=True)
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/event-stream")
    # nginx buffers responses unless told not to (README: behind Caddy or nginx)
    assert headers["X-Accel-Buffering"] == "no" and headers["Cache-Control"] == "no-cache"
    chunks, done = chunks_of(text)
    assert done, "stream must end with data: [DONE]"
    assert content_deltas(chunks) == ["aaaa ", "bbbb ", "cccc ", "dddd ", "eeee"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1, "all chunks of one completion share an id"
    assert all(c["id"].startswith("chatcmpl-") and c["model"] == "sonnet" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert not any("error" in c for c in chunks)
    assert not any("usage" in c and c["usage"] for c in chunks), "no usage unless asked for"


def test_stream_include_usage_final_chunk(proxy, upstream):
    """stream_options.include_usage adds a last chunk with choices [] and the usage."""
    upstream.push(fake_upstream.text("counted", chunks=2, usage=USAGE))
    status, _, text = chat(proxy, "count", stream=True, stream_options={"include_usage": True})
    assert status == 200, text
    chunks, done = chunks_of(text)
    assert done
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 17
    assert last["usage"]["completion_tokens"] == 7
    assert last["usage"]["total_tokens"] == 24
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == 5
    # the other chunks carry usage: null, as OpenAI's do
    assert all(c.get("usage") is None for c in chunks[:-1])
    assert "".join(content_deltas(chunks)) == "counted"


def test_models_list_shape(proxy):
    """GET /v1/models answers in OpenAI's list shape and names the accepted aliases."""
    status, _, body = proxy.request("GET", "/v1/models")
    assert status == 200, body
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert {"opus", "sonnet", "haiku"} <= set(ids)
    assert any(i.startswith("claude-sonnet-") for i in ids)
    for m in body["data"]:
        assert m["object"] == "model"
        assert isinstance(m["created"], int)
        assert isinstance(m["owned_by"], str) and m["owned_by"]


def test_health(proxy):
    """GET /health is a cheap liveness probe that needs no CLI run."""
    status, _, body = proxy.request("GET", "/health")
    assert status == 200, body
    assert body["status"] == "ok"


# Model names ####################################################################################

FAMILY_RE = r"claude-%s-[0-9][0-9a-z.-]*"


@pytest.mark.parametrize("asked, upstream_model", [
    ("opus", FAMILY_RE % "opus"),
    ("sonnet", FAMILY_RE % "sonnet"),
    ("haiku", FAMILY_RE % "haiku"),
    ("claude-sonnet-4-6", "claude-sonnet-4-6"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001"),
    ("claude-code-cli/sonnet", FAMILY_RE % "sonnet"),
    ("openai/claude-opus-5-5", "claude-opus-5-5"),
    ("anthropic/haiku", FAMILY_RE % "haiku"),
])
def test_model_names_accepted(proxy, upstream, asked, upstream_model):
    """Aliases, full ids, dated ids and provider-prefixed names all work; full ids reach
    upstream verbatim, aliases as the CLI's current model of that family; the response echoes
    the name the client asked for."""
    status, _, body = chat(proxy, "which model? MODEL-Q", model=asked)
    assert status == 200, body
    assert body["model"] == asked
    [call] = [c for c in upstream.model_calls if "MODEL-Q" in json.dumps(c["messages"])]
    assert re.fullmatch(upstream_model, call["model"]), call["model"]


@pytest.mark.parametrize("asked", ["claude-sonnet-4-6", "claude-haiku-4-5-20251001"])
def test_full_model_id_costs_one_upstream_call(proxy, upstream, asked):
    """Asking for a full model id must not add upstream requests (such as a max_tokens=1
    "Hi" probe that validates the model): each one costs latency and subscription quota."""
    status, _, body = chat(proxy, "only this MODEL-ONE", model=asked)
    assert status == 200, body
    calls = upstream.model_calls
    assert [c["model"] for c in calls] == [asked], [
        (c["model"], c.get("max_tokens"), text_of(c["messages"][0]["content"])[:40]) for c in calls]
    assert "MODEL-ONE" in json.dumps(calls[0]["messages"])


def test_unknown_model_is_400_listing_choices(proxy, upstream):
    """An unknown family is refused up front with a message that says what would work."""
    status, _, body = chat(proxy, "hi", model="gpt-4o")
    assert status == 400, body
    err = error_of(body)
    assert err["type"] == "invalid_request_error"
    assert "gpt-4o" in err["message"]
    for name in ("opus", "sonnet", "haiku", "claude-sonnet-4-6"):
        assert name in err["message"]
    assert upstream.model_calls == []


# Usage ##########################################################################################

def test_usage_counts_cache_tokens(proxy, upstream):
    """prompt_tokens includes cache reads and writes; cached_tokens reports the reads."""
    upstream.push(fake_upstream.text("ok", usage=USAGE))
    status, _, body = chat(proxy, "use tokens")
    assert status == 200, body
    u = body["usage"]
    assert u["prompt_tokens"] == 17
    assert u["prompt_tokens_details"]["cached_tokens"] == 5
    assert u["completion_tokens"] == 7
    assert u["total_tokens"] == 24


# Fidelity: what reaches upstream ################################################################

def test_single_user_message_reaches_upstream_verbatim(proxy, upstream):
    """One user message is sent as exactly that text: no transcript wrapper, no edits; no
    built-in tools are offered and no CLAUDE.md / AGENTS.md is read."""
    text = "Say hi.\n  Keep \"quotes\", ünïcødé ✓ and   spacing.\n"
    status, _, body = chat(proxy, text)
    assert status == 200, body
    [call] = upstream.model_calls
    [user] = user_messages(call)
    assert call["messages"][0]["role"] == "user"
    assert strip_cache(user["content"]) == [{"type": "text", "text": text}]
    assert call["tools"] == []
    assert MARKER not in json.dumps(upstream.requests)


def test_system_message_replaces_agent_prompt(proxy, upstream):
    """The client's system messages become the system prompt, replacing Claude Code's long
    agent prompt (the model must behave as a plain model, not a coding agent)."""
    status, _, body = chat(proxy, [{"role": "system", "content": "You are a pirate. SYS-7731."},
                                   {"role": "developer", "content": "Answer in one line. DEV-4410."},
                                   {"role": "user", "content": "hello"}])
    assert status == 200, body
    [call] = upstream.model_calls
    system = system_text(call)
    assert "You are a pirate. SYS-7731." in system
    assert "Answer in one line. DEV-4410." in system
    assert "Claude Code" not in system
    assert len(system) < 1000, "Claude Code's agent prompt leaked into the system prompt"
    assert "SYS-7731" not in json.dumps(call["messages"]), "system text belongs in system"
    assert strip_cache(user_messages(call)[0]["content"]) == [{"type": "text", "text": "hello"}]


def test_no_system_message_still_no_agent_prompt(proxy, upstream):
    """Without a system message the CLI must not fall back to its agent prompt."""
    status, _, body = chat(proxy, "hello")
    assert status == 200, body
    system = system_text(upstream.model_calls[0])
    assert "Claude Code" not in system
    assert len(system) < 500, system


@pytest.mark.parametrize("history", ["structured", "flat"])
def test_multi_turn_history_reaches_upstream(request, upstream, history):
    """Every earlier turn (role and text) reaches the model: as real messages of their own
    (structured, the default) or inside the one user message's transcript (flat); the system
    prompt stays out of the conversation."""
    p = request.getfixturevalue("proxy" if history == "structured" else "flat_proxy")
    turns = [("user", "First question: what is 2+2? Q1-ALPHA"),
             ("assistant", "It is 4. A1-BRAVO"),
             ("user", "And doubled? Q2-CHARLIE \"quoted\" ünï")]
    messages = [{"role": "system", "content": "Be terse. SYS-DELTA"}]
    messages += [{"role": r, "content": t} for r, t in turns]
    status, _, body = chat(p, messages)
    assert status == 200, body
    [call] = upstream.model_calls
    if history == "structured":
        assert upstream_texts(call) == turns
    else:
        [user] = user_messages(call)
        transcript = transcript_in(text_of(user["content"]))
        assert [(t["role"], text_of(t["content"])) for t in transcript] == turns
    assert "Be terse. SYS-DELTA" in system_text(call)
    assert "SYS-DELTA" not in json.dumps(call["messages"])


def test_content_as_list_of_parts(proxy, upstream):
    """OpenAI content given as a list of text parts (user and system) works."""
    status, _, body = chat(proxy, [
        {"role": "system", "content": [{"type": "text", "text": "System part PARTS-S1."}]},
        {"role": "user", "content": [{"type": "text", "text": "part one"},
                                     {"type": "text", "text": "part two"}]}])
    assert status == 200, body
    [call] = upstream.model_calls
    [user] = user_messages(call)
    texts = [b["text"] for b in user["content"] if b["type"] == "text"]
    joined = "\n".join(texts)
    assert "part one" in joined and "part two" in joined
    assert joined.index("part one") < joined.index("part two")
    assert "System part PARTS-S1." in system_text(call)


def test_text_starting_with_dashes_stays_text(proxy, upstream):
    """Text that looks like CLI flags is content, never options (no argv injection)."""
    status, _, body = chat(proxy, [{"role": "system", "content": "--system-prompt injected"},
                                   {"role": "user", "content": "--model opus --help"}],
                           model="haiku")
    assert status == 200, body
    [call] = upstream.model_calls
    assert re.fullmatch(FAMILY_RE % "haiku", call["model"]), call["model"]
    assert strip_cache(user_messages(call)[0]["content"]) == [
        {"type": "text", "text": "--model opus --help"}]
    assert "--system-prompt injected" in system_text(call)


def test_one_megabyte_system_prompt(proxy, upstream):
    """A 1 MB system prompt (far over the 128 KiB argv limit) reaches upstream intact."""
    big = "".join("line %06d: the quick brown fox jumps over the lazy dog.\n" % i
                  for i in range(18000))
    assert len(big) > 1_000_000
    status, _, body = chat(proxy, [{"role": "system", "content": big},
                                   {"role": "user", "content": "summarise"}], timeout=120)
    assert status == 200, body
    [call] = upstream.model_calls
    assert big in system_text(call)


def test_no_claude_md_and_no_tools_reach_upstream(proxy, upstream):
    """HOME and project CLAUDE.md / AGENTS.md never reach the model, and the CLI offers it
    none of its built-in tools (Bash, Read, ...)."""
    status, _, body = chat(proxy, [{"role": "user", "content": "q1"},
                                   {"role": "assistant", "content": "a1"},
                                   {"role": "user", "content": "q2"}], stream=True)
    assert status == 200, body
    [call] = upstream.model_calls
    assert call["tools"] == []
    assert MARKER not in json.dumps(upstream.requests)


# Environment, TMPDIR and argv of the CLI (fake CLI) #############################################

def echo(proxy, directive, **kw):
    status, _, body = chat(proxy, "please [[%s]]" % directive, **kw)
    assert status == 200, body
    return json.loads(body["choices"][0]["message"]["content"])


def test_cli_environment_is_allow_listed(make_proxy):
    """The CLI never inherits the proxy's own settings, CLAUDECODE, or ANTHROPIC_* variables
    (a stray ANTHROPIC_API_KEY would switch a subscriber to pay-per-token billing) unless the
    operator names them in CLAUDE_PROXY_PASS_ENV."""
    p = make_proxy(fake=True, ANTHROPIC_API_KEY="sk-ant-api03-stray-key",
                   ANTHROPIC_AUTH_TOKEN="stray-token", ANTHROPIC_MODEL="claude-opus-1",
                   CLAUDECODE="1", CLAUDE_PROXY_API_KEYS="proxy-client-key",
                   CLAUDE_PROXY_PASS_ENV="EXTRA_PASSED,ANTHROPIC_BASE_URL",
                   EXTRA_PASSED="yes", NOT_PASSED="no",
                   # no kept sessions: a kept process keeps its TMPDIR (test_sessions.py)
                   CLAUDE_PROXY_SESSIONS=0)
    status, _, body = p.post(CHAT, {"model": "sonnet",
                                    "messages": [{"role": "user", "content": "[[echo-env]]"}]},
                             headers={"Authorization": "Bearer proxy-client-key"})
    assert status == 200, body
    env = json.loads(body["choices"][0]["message"]["content"])
    assert not [k for k in env if k.startswith("CLAUDE_PROXY_")]
    assert "CLAUDECODE" not in env
    assert sorted(k for k in env if k.startswith("ANTHROPIC_")) == ["ANTHROPIC_BASE_URL"]
    assert "proxy-client-key" not in json.dumps(env)
    assert "sk-ant-api03-stray-key" not in json.dumps(env)
    assert env["EXTRA_PASSED"] == "yes"
    assert "NOT_PASSED" not in env
    assert env["HOME"] and env["PATH"]
    # a pre-started (pooled) process also gets its own TMPDIR, removed once it is used
    deadline = time.time() + 3
    while os.path.exists(env["TMPDIR"]) and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(env["TMPDIR"])


def test_cli_tmpdir_is_per_run_and_removed(fake_proxy):
    """Each CLI run gets its own TMPDIR (the CLI litters /tmp otherwise), removed afterwards."""
    first = echo(fake_proxy, "echo-env")["TMPDIR"]
    second = echo(fake_proxy, "echo-env")["TMPDIR"]
    assert first != second
    deadline = time.time() + 3
    while (os.path.exists(first) or os.path.exists(second)) and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(first) and not os.path.exists(second)


def test_cli_argv_has_no_prompt_and_no_tools(fake_proxy):
    """Prompts travel on stdin, never on argv (E2BIG, and visible in ps); the CLI runs with
    --tools "" and --no-session-persistence."""
    status, _, body = chat(fake_proxy, [
        {"role": "system", "content": "SECRET-SYSTEM-9d1"},
        {"role": "user", "content": "SECRET-USER-44a [[echo-argv]]"}])
    assert status == 200, body
    argv = json.loads(body["choices"][0]["message"]["content"])
    assert not [a for a in argv if "SECRET-" in a]
    assert "--tools" in argv and argv[argv.index("--tools") + 1] == ""
    assert "--no-session-persistence" in argv


# Failures #######################################################################################

def test_missing_cli_is_503_naming_claude_bin(make_proxy, tmp_path):
    """A wrong CLAUDE_BIN is an operator problem: 503 with a message saying what to fix."""
    p = make_proxy(fake=True, CLAUDE_BIN=str(tmp_path / "no-such-claude"))
    for stream in (False, True):
        status, _, body = p.post(CHAT, {"model": "sonnet", "stream": stream,
                                        "messages": [{"role": "user", "content": "hi"}]})
        assert status == 503, body
        assert "CLAUDE_BIN" in error_of(body)["message"]


def test_upstream_401_fails_fast_mentioning_login(proxy, upstream):
    """A logged-out CLI fails at once, not after the CLI's ~3 minutes of retries (at most 3
    upstream calls), with a 502 that tells the operator to run `claude login`."""
    upstream.default = fake_upstream.error(401, "authentication_error", "invalid x-api-key")
    status, _, body = chat(proxy, "hi", timeout=120)
    assert status == 502, body
    assert "claude login" in error_of(body)["message"]
    assert 1 <= len(upstream.model_calls) <= 3, "the CLI kept retrying a 401"


def test_streamed_crash_ends_with_error_chunk(fake_proxy):
    """A CLI that dies mid-stream must not look like a finished answer: the stream ends with
    an error chunk and [DONE], never finish_reason stop."""
    with no_leftover_cli(fake_proxy.pids):
        status, _, text = chat(fake_proxy, "[[crash]]", stream=True)
    assert status == 200
    chunks, done = chunks_of(text)
    assert done
    assert "".join(content_deltas(chunks)) == "partial answer"
    assert "error" in chunks[-1], chunks[-1]
    assert chunks[-1]["error"]["message"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert "stop" not in finishes


def test_hung_cli_gives_504_after_timeout(fake_proxy):
    """A CLI that never answers is killed at --timeout (4 s here) and the client gets 504
    (the client's own 30 s timeout would fail the test first if it were not)."""
    with no_leftover_cli(fake_proxy.pids):
        status, _, body = chat(fake_proxy, "[[hang]]", timeout=30)
    assert status == 504, body
    assert "CLAUDE_PROXY_TIMEOUT" in error_of(body)["message"]


def test_client_disconnect_mid_stream_kills_cli(fake_proxy):
    """A client hanging up during a stream ends the CLI run at once (it would otherwise run,
    and spend, to the end)."""
    before = set(os.listdir(fake_proxy.pids))
    with no_leftover_cli(fake_proxy.pids, within=3.0):
        sock = raw_request(fake_proxy, {"model": "sonnet", "stream": True,
                                        "messages": [{"role": "user", "content": "[[slow:200]]"}]})
        try:
            recv_until(sock, b"tick2")
            pids = new_pids(fake_proxy.pids, before)
            assert all(alive(p) for p in pids), "the CLI should still be streaming"
        finally:
            sock.close()


def test_client_disconnect_while_waiting_kills_cli(fake_proxy):
    """A client hanging up on a non-streaming request ends the CLI run long before the
    request's timeout (4 s here)."""
    before = set(os.listdir(fake_proxy.pids))
    with no_leftover_cli(fake_proxy.pids, within=2.0):
        sock = raw_request(fake_proxy, {"model": "sonnet",
                                        "messages": [{"role": "user", "content": "[[hang]]"}]})
        try:
            pids = new_pids(fake_proxy.pids, before)
            time.sleep(0.2)
            assert all(alive(p) for p in pids)
        finally:
            sock.close()


@pytest.mark.parametrize("directive", ["garbage", "silent-exit"])
def test_broken_cli_output_is_502(fake_proxy, directive):
    """A CLI that prints no usable answer gives a clear 502, not an empty 200."""
    with no_leftover_cli(fake_proxy.pids):
        status, _, body = chat(fake_proxy, "[[%s]]" % directive)
    assert status == 502, body
    err = error_of(body)
    assert "CLI" in err["message"]
    if directive == "garbage":
        assert "not JSON at all" in err["message"], "show what the CLI printed"


# Concurrency ####################################################################################

def test_one_slot_second_request_waits(make_proxy):
    """With one slot, a second request queues until the first finishes, then runs."""
    p = make_proxy(fake=True, CLAUDE_PROXY_MAX_CONCURRENCY=1, CLAUDE_PROXY_QUEUE_TIMEOUT=30)
    finished = []

    def run(text):
        result = chat(p, text)
        finished.append(text)
        return result

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(run, "[[slow:30]]")
        deadline = time.time() + 5
        while p.request("GET", "/health")[2]["concurrency"]["running"] < 1:
            assert time.time() < deadline, "first request never started"
            time.sleep(0.02)
        fast = pool.submit(run, "quick one")
        deadline = time.time() + 5
        while p.request("GET", "/health")[2]["concurrency"]["queued"] < 1:
            assert time.time() < deadline and not fast.done(), "second request did not queue"
            time.sleep(0.02)
        s1, _, b1 = slow.result(30)
        s2, _, b2 = fast.result(30)
    assert (s1, s2) == (200, 200), (b1, b2)
    assert b1["choices"][0]["message"]["content"].startswith("tick0 ")
    assert b2["choices"][0]["message"]["content"] == "fake answer"
    assert finished == ["[[slow:30]]", "quick one"]


def test_queue_timeout_gives_429_with_retry_after(make_proxy):
    """A request that cannot get a slot within the queue timeout gets 429 + Retry-After."""
    p = make_proxy(fake=True, CLAUDE_PROXY_MAX_CONCURRENCY=1, CLAUDE_PROXY_QUEUE_TIMEOUT=1)
    gate = Gate(p.env["HOME"])                  # the first request holds the slot until then
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, p, gate.text)
        deadline = time.time() + 5
        while p.request("GET", "/health")[2]["concurrency"]["running"] < 1:
            assert time.time() < deadline, "first request never started"
            time.sleep(0.02)
        status, headers, body = chat(p, "no room")
        assert status == 429, body
        assert error_of(body)["message"]
        assert int(headers["Retry-After"]) >= 1
        assert not slow.done(), "the first request held the slot all along"
        gate.open()
        s1, _, b1 = slow.result(30)
    assert s1 == 200, b1


def test_slot_released_after_errors(make_proxy):
    """Failures (crash, garbage, timeout, client hang-up) all give their slot back: with one
    slot, a normal request afterwards still succeeds at once."""
    p = make_proxy(fake=True, args=("--timeout", "2"), CLAUDE_PROXY_MAX_CONCURRENCY=1,
                   CLAUDE_PROXY_QUEUE_TIMEOUT=1)
    assert chat(p, "[[crash]]", stream=True)[0] == 200
    assert chat(p, "[[crash]]")[0] == 502
    assert chat(p, "[[garbage]]")[0] == 502
    assert chat(p, "[[hang]]")[0] == 504
    sock = raw_request(p, {"model": "sonnet", "stream": True,
                           "messages": [{"role": "user", "content": "[[slow:100]]"}]})
    try:
        assert sock.recv(65536)
    finally:
        sock.close()
    status, _, body = None, None, None
    deadline = time.time() + 3
    while time.time() < deadline:
        status, _, body = chat(p, "after the errors")
        if status != 429:
            break
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "fake answer"
    health = p.request("GET", "/health")[2]
    assert health["concurrency"]["running"] == 0
    assert health["concurrency"]["queued"] == 0


# The official openai SDK as a client ############################################################

def test_sdk_chat_completion(proxy, upstream):
    """client.chat.completions.create works unchanged against the proxy."""
    upstream.push(fake_upstream.text("Hello via the SDK.", usage=USAGE))
    with sdk_client(proxy) as client:
        resp = client.chat.completions.create(
            model="anthropic/sonnet",
            messages=[{"role": "system", "content": "SDK-SYS"}, {"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "Hello via the SDK."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "anthropic/sonnet"
    assert resp.usage.prompt_tokens == 17 and resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens_details.cached_tokens == 5
    [call] = upstream.model_calls
    assert re.fullmatch(FAMILY_RE % "sonnet", call["model"]), call["model"]
    assert "SDK-SYS" in system_text(call)


def test_sdk_streaming(proxy, upstream):
    """The SDK's stream iterator sees each delta, the finish reason and the usage chunk."""
    upstream.push(fake_upstream.text("one two three four", chunks=4, usage=USAGE))
    with sdk_client(proxy) as client:
        stream = client.chat.completions.create(
            model="haiku", messages=[{"role": "user", "content": "count"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == fake_upstream._split("one two three four", 4)
    assert len(deltas) == 4
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 24
    assert len(upstream.model_calls) == 1


def test_sdk_models_list(proxy):
    """client.models.list() parses the model list."""
    with sdk_client(proxy) as client:
        ids = [m.id for m in client.models.list()]
    assert {"opus", "sonnet", "haiku"} <= set(ids)


def test_sdk_unknown_model_raises_bad_request(proxy, upstream):
    """Errors use OpenAI's error shape, so the SDK raises its typed exception."""
    with sdk_client(proxy) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="gpt-4o",
                                           messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 400
    assert "sonnet" in info.value.message
    assert upstream.model_calls == []


# -- small promises of the README -------------------------------------------------------------

def test_routes_answer_without_the_v1_prefix(proxy, upstream):
    """Clients configured with a bare host post to /chat/completions and /messages."""
    upstream.push(fake_upstream.text("bare openai"), fake_upstream.text("bare anthropic"))
    status, _, body = proxy.post("/chat/completions", {
        "model": "sonnet", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "bare openai"
    status, _, body = proxy.post("/messages", {
        "model": "sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["content"][0]["text"] == "bare anthropic"
    assert proxy.request("GET", "/models")[2]["object"] == "list"


def test_missing_model_uses_the_default_and_sampling_options_are_accepted(make_proxy, upstream):
    p = make_proxy(CLAUDE_PROXY_DEFAULT_MODEL="haiku", CLAUDE_PROXY_POOL_SIZE=0)
    status, _, body = p.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "top_p": 0.9,
        "seed": 7, "user": "u-1", "presence_penalty": 0.1, "frequency_penalty": 0.1})
    assert status == 200, body
    assert body["model"] == "haiku"
    call = upstream.model_calls[-1]
    assert call["model"] == "claude-haiku-5-5"
    assert "temperature" not in call and "top_p" not in call and "seed" not in call


def test_cli_runs_in_an_empty_read_only_working_directory(fake_proxy):
    """The CLI's working directory is empty and read-only (mode 0500: nothing for it to read
    or write), the same one for every run of a proxy (the CLI quotes it to the model), and not
    the directory the proxy was started in."""
    first, second = echo(fake_proxy, "echo-cwd"), echo(fake_proxy, "echo-cwd")
    assert first == second
    assert first["mode"] == 0o500 and first["entries"] == []
    assert first["cwd"] != fake_proxy.env["HOME"] and os.path.basename(first["cwd"]).startswith("claude-proxy-cwd-")
