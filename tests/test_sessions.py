"""Kept conversations (IdleStore kind "kept", KeptConversation): the process that answered a turn takes
the conversation's next turn.  Real CLI, fake upstream; behaviour, not timings.

Nothing here asserts a duration.  Which process served a turn is seen through /health
(idle kept hits, misses = spawns, cli_processes_started) and through /proc (the proxy's children).
"""
import functools
import json
import os
import signal

import pytest

import fake_upstream
from conftest import sse_events
from test_history import normalised
from test_pool import alive, children, health, metric, poll, wait_gone

CHAT = "/v1/chat/completions"
WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
F = "`" * 3
#: an earlier turn: a conversation with history (a first message's process is kept too, but
#: as one another request may reuse: test_a_first_message_without_a_signal_is_kept_...)
SEED = [{"role": "user", "content": "Seed question."}, {"role": "assistant", "content": "Seed answer."}]


@pytest.fixture
def start(make_proxy):
    """make_proxy without a pool or reuse by default (so every started process is a
    request's, and only kept ones outlive it: a turn not kept ends its process here)."""
    return functools.partial(make_proxy, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_REUSE=0)


def without_cache_marks(messages):
    """The request as the prompt cache compares it: cache_control marks are not content, and a
    string is shorthand for one text block (the CLI writes a message it marked as blocks, and
    the same message unmarked as a string, the next time)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": m["role"], "content": [
            {k: v for k, v in b.items() if k != "cache_control"} for b in content]})
    return out


def chat_turns(proxy, upstream, n, stream=False, prefix="Q"):
    """Continue one OpenAI conversation (after SEED) for n turns; returns (messages, upstream
    calls).  Its first request is a miss: a new process is given the history, and kept."""
    messages, calls = list(SEED), []
    for i in range(n):
        messages.append({"role": "user", "content": "%s%d: tell me about %d." % (prefix, i, i)})
        upstream.push(fake_upstream.text("%s-answer %d." % (prefix, i)))
        before = len(upstream.model_calls)
        if stream:
            status, _, body = proxy.post(CHAT, {"model": "sonnet", "stream": True,
                                                "messages": messages})
            assert status == 200, body
            chunks = [json.loads(data) for _, data in sse_events(body) if data != "[DONE]"]
            text = "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in chunks if c["choices"])
        else:
            status, _, body = proxy.post(CHAT, {"model": "sonnet", "messages": messages})
            assert status == 200, body
            text = body["choices"][0]["message"]["content"]
        assert text == "%s-answer %d." % (prefix, i)
        assert len(upstream.model_calls) == before + 1      # one upstream call per turn
        calls.append(upstream.model_calls[-1]["messages"])
        messages.append({"role": "assistant", "content": text})
    return messages, calls


@pytest.mark.parametrize("stream", [False, True])
def test_a_conversation_continues_on_the_process_that_answered(start, upstream, stream):
    p = start()
    _, calls = chat_turns(p, upstream, 4, stream=stream)
    h = health(p)
    assert h["idle"]["hits"]["kept"] == 3 and h["idle"]["misses"] == 1
    assert h["cli_processes_started"] == 1          # one process for all four turns
    assert h["idle"]["idle"]["kept"] == 1 and len(children(p)) == 1
    assert metric(p, 'claude_proxy_idle_requests_total{served_by="kept"}') == 3
    assert metric(p, 'claude_proxy_idle_requests_total{served_by="spawned"}') == 1
    assert metric(p, 'claude_proxy_idle_processes{kind="kept"}') == 1
    # each request is exactly the previous one plus the answer and the new question (the CLI's
    # own system messages included; cache_control marks aside, which the cache ignores)
    for prev, nxt in zip(calls, calls[1:]):
        assert without_cache_marks(nxt)[:len(prev)] == without_cache_marks(prev)
        assert [m["role"] for m in nxt[len(prev):]] == ["assistant", "user"]


def test_emulated_tool_call_and_result_continue_the_session(start, upstream):
    """Anthropic dialect: the model calls a tool (emulated), the client sends the call back with
    its result; that request continues on the same process, and the model sees the result."""
    p = start()
    call = F + 'tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' + F
    upstream.push(fake_upstream.text("Let me look that up.\n\n" + call))
    messages = SEED + [{"role": "user", "content": "Weather in Paris?"}]
    body = {"model": "sonnet", "max_tokens": 1024, "tools": [WEATHER], "messages": messages}
    status, _, out = p.post("/v1/messages", body)
    assert status == 200 and out["stop_reason"] == "tool_use", out
    use = [b for b in out["content"] if b["type"] == "tool_use"][0]
    assert use["name"] == "get_weather" and use["input"] == {"city": "Paris"}
    messages += [{"role": "assistant", "content": out["content"]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                               "content": "SUNNY-21C"}]}]
    upstream.push(fake_upstream.text("It is sunny, 21 C."))
    status, _, out = p.post("/v1/messages", dict(body, messages=messages))
    assert status == 200 and out["content"][0]["text"] == "It is sunny, 21 C.", out
    h = health(p)
    assert h["idle"]["hits"]["kept"] == 1 and h["cli_processes_started"] == 1
    sent = upstream.model_calls[-1]["messages"]
    assert "SUNNY-21C" in json.dumps(sent[-1]) and "Let me look that up." in json.dumps(sent[-2])


def test_an_edited_history_is_not_continued(start, upstream):
    """A process is continued only by the conversation it answered: change an earlier message
    (or the answer) and the request is served as a new one, with the history as sent."""
    p = start()
    messages, _ = chat_turns(p, upstream, 1)
    misses = health(p)["idle"]["misses"]
    edited = [messages[0], {"role": "assistant", "content": "An answer I made up."},
              {"role": "user", "content": "And then?"}]
    upstream.push(fake_upstream.text("Then this."))
    status, _, body = p.post(CHAT, {"model": "sonnet", "messages": edited})
    assert status == 200 and body["choices"][0]["message"]["content"] == "Then this."
    h = health(p)
    assert h["idle"]["hits"]["kept"] == 0 and h["idle"]["misses"] == misses + 1
    assert h["cli_processes_started"] == 2
    sent = normalised(upstream.model_calls[-1]["messages"])
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == [{"type": "text", "text": "An answer I made up."}]
    # other settings are another conversation too: a different system prompt
    upstream.push(fake_upstream.text("Sure."))
    status, _, body = p.post(CHAT, {"model": "sonnet", "messages": [
        {"role": "system", "content": "Be terse."}] + messages + [
        {"role": "user", "content": "More?"}]})
    assert status == 200
    assert health(p)["idle"]["hits"]["kept"] == 0


def test_a_kept_process_that_died_is_replaced(start, upstream):
    p = start()
    messages, _ = chat_turns(p, upstream, 1)
    (pid,) = children(p)
    os.kill(pid, signal.SIGKILL)
    wait_gone([pid])
    messages.append({"role": "user", "content": "Still there?"})
    upstream.push(fake_upstream.text("Yes."))
    status, _, body = p.post(CHAT, {"model": "sonnet", "messages": messages})
    assert status == 200 and body["choices"][0]["message"]["content"] == "Yes.", body
    sent = normalised(upstream.model_calls[-1]["messages"])
    assert [m["role"] for m in sent] == ["user", "assistant"] * 2 + ["user"]   # all of it, fresh
    assert health(p)["idle"]["hits"]["kept"] == 0


def test_at_most_sessions_are_kept_oldest_ended_first(start, upstream):
    p = start(CLAUDE_PROXY_SESSIONS=1)
    first, _ = chat_turns(p, upstream, 1, prefix="A")
    (a_pid,) = children(p)
    second, _ = chat_turns(p, upstream, 1, prefix="B")
    wait_gone([a_pid])
    assert health(p)["idle"]["idle"]["kept"] == 1 and len(children(p)) == 1
    first.append({"role": "user", "content": "Back to A."})
    upstream.push(fake_upstream.text("A again."))
    misses = health(p)["idle"]["misses"]
    status, _, _ = p.post(CHAT, {"model": "sonnet", "messages": first})
    assert status == 200
    assert health(p)["idle"]["misses"] == misses + 1


def test_idle_sessions_end_and_their_tmpdir_goes(start, upstream):
    p = start(CLAUDE_PROXY_SESSION_IDLE=1)
    chat_turns(p, upstream, 1)
    (pid,) = children(p)
    with open("/proc/%d/environ" % pid, "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    tmpdir = env[b"TMPDIR"].decode()
    assert os.path.isdir(tmpdir)
    wait_gone([pid])
    poll(lambda: health(p)["idle"]["idle"]["kept"] == 0, "the session to be forgotten")
    poll(lambda: not os.path.exists(tmpdir), "its TMPDIR to be removed")


def test_shutdown_ends_kept_sessions(make_proxy, upstream):
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0)
    chat_turns(p, upstream, 1)
    pids = children(p)
    assert pids and all(alive(x) for x in pids)
    p.proc.send_signal(signal.SIGTERM)
    p.proc.wait(timeout=30)
    wait_gone(pids)


@pytest.mark.parametrize("env, body", [
    ({}, {"stop": ["STOP"]}),                               # the CLI was interrupted
    ({}, {"max_tokens": 5}),                                # ditto, at max_tokens
    ({"CLAUDE_PROXY_SESSIONS": 0}, {}),                     # switched off
    ({"CLAUDE_PROXY_HISTORY": "flat"}, {}),                 # flat history has no real turns
])
def test_turns_that_are_not_kept(start, upstream, env, body):
    p = start(**env)
    upstream.push(fake_upstream.text("one two STOP three four five six seven", chunks=4)
                  if "stop" in body else fake_upstream.text("one two three", stop_reason="max_tokens")
                  if "max_tokens" in body else fake_upstream.text("fine"))
    status, _, out = p.post(CHAT, dict({"model": "sonnet", "messages": SEED + [
        {"role": "user", "content": "Go."}]}, **body))
    assert status == 200, out
    wait_gone(children(p))
    assert health(p)["idle"]["idle"]["kept"] == 0


def test_a_turn_whose_extra_tool_calls_were_dropped_is_not_kept(start, upstream):
    """parallel_tool_calls: false hands the client the first call only; the process heard the
    model make two, so it no longer holds the conversation the client has."""
    p = start()
    two = "".join(F + 'tool_call\n{"name": "get_weather", "arguments": {"city": "%s"}}\n' % c + F + "\n"
                  for c in ("Paris", "Rome"))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}
    body = {"model": "sonnet", "tools": [tool], "messages": SEED + [{"role": "user", "content": "Both?"}]}
    for parallel, kept in ((False, 0), (True, 1)):
        upstream.push(fake_upstream.text(two))
        status, _, out = p.post(CHAT, dict(body, parallel_tool_calls=parallel))
        assert status == 200, out
        calls = out["choices"][0]["message"]["tool_calls"]
        assert len(calls) == (2 if parallel else 1)
        poll(lambda: health(p)["idle"]["idle"]["kept"] == kept, "%d kept session(s)" % kept)


def test_a_lone_surrogate_in_the_history_is_served_and_kept(start, upstream):
    """JavaScript clients can cut a string inside a surrogate pair; such text reaches the CLI
    (as a JSON escape) and must not break the conversation key, leak the slot or the process."""
    p = start(CLAUDE_PROXY_MAX_CONCURRENCY=1)
    messages = SEED + [{"role": "user", "content": "cut emoji \ud83d here"}]
    for answer in ("first", "second"):
        upstream.push(fake_upstream.text(answer))
        status, _, body = p.post(CHAT, {"model": "sonnet", "messages": messages})
        assert status == 200 and body["choices"][0]["message"]["content"] == answer, body
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "more \udc00 text"}]
    h = health(p)
    assert h["concurrency"]["running"] == 0
    assert h["idle"]["hits"]["kept"] == 1 and h["idle"]["idle"]["kept"] == 1 and len(children(p)) == 1


def test_a_stream_that_got_more_than_the_re_asked_answer_is_not_kept(start, upstream):
    """The upstream stream drops after some text and the CLI's second answer is shorter than
    what the client already has: the client's answer is not the one the CLI keeps."""
    p = start()
    first = "AAAA BBBB CCCC DDDD EEEE FFFF GGGG HHHH IIII JJJJ"
    upstream.push(fake_upstream.text(first, chunks=10, drop_after=5))
    upstream.default = fake_upstream.text("AAAA")
    status, _, body = p.post(CHAT, {"model": "sonnet", "stream": True,
                                    "messages": SEED + [{"role": "user", "content": "Go."}]},
                             timeout=150)
    assert status == 200, body
    chunks = [json.loads(d) for _, d in sse_events(body) if d != "[DONE]"]
    got = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(upstream.model_calls) >= 2 and got.startswith("AAAA") and len(got) > 4, got
    wait_gone(children(p))
    assert health(p)["idle"]["idle"]["kept"] == 0


REFUSAL = "I'm sorry, but I don't have access to real-time weather data."
CALL = F + 'tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' + F
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize("case", ["refusal retried", "structured output", "native tools", "kept"])
def test_more_turns_that_are_not_kept(start, upstream, case):
    """The refusal retry (the process heard a refusal and a nudge the client never saw) and
    structured output are not kept; the same tool request without the retry is (the control
    case), and so is a native tools turn (tests/test_native_tools.py: held calls)."""
    p = start()
    body, headers = {"model": "sonnet", "messages": SEED + [{"role": "user", "content": "Paris?"}]}, {}
    if case == "structured output":
        upstream.push(fake_upstream.tool_use("StructuredOutput", {"n": 1}))
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    else:
        body["tools"] = [TOOL]
        if case == "refusal retried":
            upstream.push(fake_upstream.text(REFUSAL))
        upstream.push(fake_upstream.text("Checking." if case == "native tools" else CALL))
        if case == "native tools":
            headers = {"X-Toolcall-Module": "native"}
    status, _, out = p.post(CHAT, body, headers=headers)
    assert status == 200, out
    if case == "refusal retried":
        assert out["choices"][0]["message"]["tool_calls"] and len(upstream.model_calls) == 2
    kept = 1 if case in ("kept", "native tools") else 0
    poll(lambda: health(p)["idle"]["idle"]["kept"] == kept and len(children(p)) == kept,
         "%d kept session(s)" % kept)


@pytest.mark.parametrize("path, body, headers", [
    (CHAT, {"prompt_cache_key": "conv-1"}, {}),
    (CHAT, {"user": "someone"}, {}),
    (CHAT, {"safety_identifier": "hashed-user"}, {}),
    (CHAT, {}, {"X-Session-Id": "conv-2"}),
    ("/v1/messages", {"metadata": {"user_id": "claude-code-session"}, "max_tokens": 100}, {}),
    ("/v1/responses", {"prompt_cache_key": "conv-3"}, {}),
])
def test_a_first_message_is_kept_when_the_client_says_a_conversation_follows(start, upstream, path,
                                                                             body, headers):
    p = start()
    messages, calls = [], []
    for i in range(3):
        messages.append({"role": "user", "content": "Turn %d question." % i})
        upstream.push(fake_upstream.text("Turn %d answer." % i))
        key = "input" if path == "/v1/responses" else "messages"
        status, _, out = p.post(path, {"model": "sonnet", key: messages, **body}, headers=headers)
        assert status == 200, out
        calls.append(upstream.model_calls[-1]["messages"])
        messages.append({"role": "assistant", "content": "Turn %d answer." % i})
    h = health(p)
    assert h["idle"]["hits"]["kept"] == 2 and h["cli_processes_started"] == 1
    # from the first request on, each upstream request extends the one before exactly
    for prev, nxt in zip(calls, calls[1:]):
        assert without_cache_marks(nxt)[:len(prev)] == without_cache_marks(prev)
        assert [m["role"] for m in nxt[len(prev):]] == ["assistant", "user"]


def first_message(p, upstream, text, answer, system=None):
    """A first message without a session signal (a blank `user` is none); waits until its
    process is back in the store."""
    upstream.push(fake_upstream.text(answer))
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": text}]
    status, _, body = p.post(CHAT, {"model": "sonnet", "user": "  ", "messages": messages})
    assert status == 200 and body["choices"][0]["message"]["content"] == answer, body
    return poll(lambda: (lambda h: h if h["concurrency"]["running"] == 0 and
                         sum(h["idle"]["idle"].values()) == len(children(p)) else None)(health(p)),
                "the process to come back")


def test_a_first_message_without_a_signal_is_kept_and_continued(start, upstream):
    """Its next turn continues on the same process, and that upstream request extends the
    first one exactly (a new process would share ~45-50 % of the blocks)."""
    p = start()
    h = first_message(p, upstream, "Go.", "Gone.")
    assert h["idle"]["idle"]["kept"] == 1 and len(children(p)) == 1
    first = upstream.model_calls[-1]["messages"]
    upstream.push(fake_upstream.text("Further."))
    status, _, body = p.post(CHAT, {"model": "sonnet", "messages": [
        {"role": "user", "content": "Go."}, {"role": "assistant", "content": "Gone."},
        {"role": "user", "content": "And then?"}]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "Further.", body
    second = upstream.model_calls[-1]["messages"]
    h = health(p)
    assert h["idle"]["hits"]["kept"] == 1 and h["cli_processes_started"] == 1
    assert without_cache_marks(second)[:len(first)] == without_cache_marks(first)
    assert [m["role"] for m in second[len(first):]] == ["assistant", "user"]


def test_a_kept_first_message_is_reused_by_another_request(start, upstream):
    """A one-shot request with the same settings takes it after a reset: served as reused,
    with nothing of the first conversation upstream."""
    p = start(CLAUDE_PROXY_REUSE=100)
    first_message(p, upstream, "FIRST-TEXT question", "FIRST-TEXT answer")
    h = first_message(p, upstream, "Other question", "Other answer")
    assert h["idle"]["hits"]["reused"] == 1 and h["cli_processes_started"] == 1
    assert h["idle"]["idle"] == {"kept": 1, "reused": 0, "initialized": 0, "pool": 0}
    assert "FIRST-TEXT" not in json.dumps(upstream.model_calls[-1])
    assert "Other question" in json.dumps(upstream.model_calls[-1]["messages"])


def test_kept_first_messages_do_not_push_a_conversation_out(start, upstream):
    """CLAUDE_PROXY_SESSIONS counts conversations with history: one-shot traffic leaves them."""
    p = start(CLAUDE_PROXY_SESSIONS=1, CLAUDE_PROXY_REUSE=100, CLAUDE_PROXY_IDLE_MAX=5)
    conversation, _ = chat_turns(p, upstream, 1, prefix="A")
    (a_pid,) = children(p)
    for system in ("Be brief.", "Be kind."):          # other settings: each its own process
        first_message(p, upstream, "One-shot.", "Shot.", system=system)
    h = health(p)
    assert h["idle"]["idle"]["kept"] == 3 and a_pid in children(p) and h["idle"]["evicted"] == 0
    conversation.append({"role": "user", "content": "Back to A."})
    upstream.push(fake_upstream.text("A again."))
    status, _, _ = p.post(CHAT, {"model": "sonnet", "messages": conversation})
    assert status == 200 and health(p)["idle"]["hits"]["kept"] == 1
