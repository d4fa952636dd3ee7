"""Multi-turn history (CLAUDE_PROXY_HISTORY): real proxy, real CLI, fake upstream.

With `structured`, earlier messages reach the upstream as real user/assistant turns, so the
request of turn N+1 starts with exactly the request of turn N followed by turn N's answer: the
shape the upstream prompt cache needs.  That is compared after `normalised()`:
  - the CLI's own {"role": "system"} messages are dropped ("# Environment" after the first user
    message, and "Today's date is ..." that it appends after the newest user message of a
    multi-turn conversation: it moves every turn and cannot be switched off);
  - string content equals one text block;
  - cache_control markers are ignored (the CLI moves them to the latest blocks).
Everything else (roles, order, block types, text, image data) must be equal.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import fake_upstream
from conftest import PROXY, base_env, no_leftover_cli, sse_events

F = "`" * 3
TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def normalised(messages):
    out = []
    for m in messages:
        if m.get("role") == "system":
            continue
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        content = [{k: v for k, v in b.items() if k != "cache_control"} for b in content]
        out.append({"role": m["role"], "content": content})
    return out


def text_msg(role, text):
    return {"role": role, "content": [{"type": "text", "text": text}]}


def assert_continues(prev_call, next_call, answer_blocks, new_user_blocks):
    """next = prev + [assistant answer] + [new user message], exactly (after normalising)."""
    prev, nxt = normalised(prev_call["messages"]), normalised(next_call["messages"])
    expected = prev + [{"role": "assistant", "content": answer_blocks},
                       {"role": "user", "content": new_user_blocks}]
    assert nxt[:len(prev) + 1] == expected[:-1]
    assert nxt == expected
    roles = [m["role"] for m in nxt]
    assert all(a != b for a, b in zip(roles, roles[1:])), roles       # nothing merged


@pytest.fixture(scope="module")
def structured(make_proxy):
    """Structured history given to a new process each request: sessions off, so every turn
    here injects its earlier turns (test_sessions.py covers continuing a kept process)."""
    return make_proxy(CLAUDE_PROXY_HISTORY="structured", CLAUDE_PROXY_SESSIONS=0)


def test_structured_is_the_default(proxy):
    status, _, body = proxy.request("GET", "/health")
    assert status == 200 and body["history"] == "structured", body


def test_history_option_is_validated(home, upstream):
    env = base_env(home, upstream.url, "claude", CLAUDE_PROXY_HISTORY="json")
    run = subprocess.run([sys.executable, str(PROXY), "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=20)
    assert run.returncode != 0 and "CLAUDE_PROXY_HISTORY must be structured or flat" in run.stderr


def test_openai_three_turns_continue_the_previous_request(structured, upstream):
    messages, calls = [], []
    for n in range(3):
        question, answer = "Question number %d?" % n, "Answer number %d." % n
        messages.append({"role": "user", "content": question})
        upstream.push(fake_upstream.text(answer))
        status, _, out = structured.post("/v1/chat/completions",
                                         {"model": "sonnet", "messages": messages})
        assert status == 200, out
        assert out["choices"][0]["message"]["content"] == answer
        calls.append(upstream.model_calls[-1])
        messages.append({"role": "assistant", "content": answer})
    assert normalised(calls[0]["messages"]) == [text_msg("user", "Question number 0?")]
    assert len(upstream.model_calls) == 3      # acknowledged user lines cost no upstream call
    for n in (1, 2):
        assert_continues(calls[n - 1], calls[n], [{"type": "text", "text": "Answer number %d." % (n - 1)}],
                         [{"type": "text", "text": "Question number %d?" % n}])
    # the CLI's own trailing system message, documented in the README
    assert calls[2]["messages"][-1]["role"] == "system"


def test_anthropic_three_turns_continue_the_previous_request(structured, upstream):
    messages, calls = [], []
    for n in range(3):
        blocks = [{"type": "text", "text": "Part A of question %d." % n},
                  {"type": "text", "text": "Part B of question %d." % n}]
        messages.append({"role": "user", "content": blocks})
        upstream.push(fake_upstream.text("Reply %d." % n))
        status, _, out = structured.post(
            "/v1/messages", {"model": "sonnet", "max_tokens": 100, "system": "Be brief.",
                             "messages": messages}, headers={"anthropic-version": "2023-06-01"})
        assert status == 200, out
        calls.append(upstream.model_calls[-1])
        messages.append({"role": "assistant", "content": out["content"]})
    assert normalised(calls[0]["messages"]) == [{"role": "user", "content": messages[0]["content"]}]
    for n in (1, 2):
        assert_continues(calls[n - 1], calls[n], [{"type": "text", "text": "Reply %d." % (n - 1)}],
                         messages[2 * n]["content"])
        assert "Be brief." in json.dumps(calls[n]["system"])


def test_emulated_tool_calls_and_results_in_history(structured, upstream):
    call_text = F + "tool_call\n" + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}},
                                               ensure_ascii=False) + "\n" + F
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    upstream.push(fake_upstream.text(call_text))
    status, _, out = structured.post("/v1/chat/completions",
                                     {"model": "sonnet", "messages": messages, "tools": [WEATHER]})
    assert status == 200, out
    tc = out["choices"][0]["message"]["tool_calls"][0]
    first = upstream.model_calls[-1]
    messages += [{"role": "assistant", "content": None, "tool_calls": [tc]},
                 {"role": "tool", "tool_call_id": tc["id"], "content": "18 C, sunny"}]
    upstream.push(fake_upstream.text("It is 18 C and sunny."))
    status, _, out = structured.post("/v1/chat/completions",
                                     {"model": "sonnet", "messages": messages, "tools": [WEATHER]})
    assert status == 200, out
    second = upstream.model_calls[-1]
    result_text = F + "tool_result\n" + json.dumps(
        {"tool_call_id": tc["id"], "name": "get_weather", "content": "18 C, sunny"}) + "\n" + F
    assert_continues(first, second, [{"type": "text", "text": call_text}],
                     [{"type": "text", "text": result_text}])
    messages += [{"role": "assistant", "content": "It is 18 C and sunny."},
                 {"role": "user", "content": "Thanks. And tomorrow?"}]
    upstream.push(fake_upstream.text("Rain."))
    status, _, out = structured.post("/v1/chat/completions",
                                     {"model": "sonnet", "messages": messages, "tools": [WEATHER]})
    assert status == 200, out
    assert_continues(second, upstream.model_calls[-1],
                     [{"type": "text", "text": "It is 18 C and sunny."}],
                     [{"type": "text", "text": "Thanks. And tomorrow?"}])


def test_image_in_history_is_an_image_block_in_its_own_turn(structured, upstream):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
                {"role": "assistant", "content": "A single pixel."},
                {"role": "user", "content": "What colour?"}]
    status, _, out = structured.post("/v1/messages", {"model": "sonnet", "max_tokens": 50,
                                                      "messages": messages},
                                     headers={"anthropic-version": "2023-06-01"})
    assert status == 200, out
    sent = normalised(upstream.model_calls[-1]["messages"])
    assert sent == [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
                    text_msg("assistant", "A single pixel."), text_msg("user", "What colour?")]


def test_prefill_keeps_the_flat_transcript(structured, upstream):
    messages = [{"role": "user", "content": "Count to five."},
                {"role": "assistant", "content": "One, two,"}]
    status, _, out = structured.post("/v1/messages", {"model": "sonnet", "max_tokens": 50,
                                                      "messages": messages},
                                     headers={"anthropic-version": "2023-06-01"})
    assert status == 200, out
    sent = normalised(upstream.model_calls[-1]["messages"])
    assert len(sent) == 1 and sent[0]["role"] == "user"
    assert "continue it exactly where it stops" in sent[0]["content"][0]["text"]
    assert "One, two," in sent[0]["content"][0]["text"]


def test_one_message_is_sent_verbatim(structured, upstream):
    blocks = [{"type": "text", "text": "Just one message, {\"json\": true}."}]
    status, _, out = structured.post("/v1/messages", {"model": "sonnet", "max_tokens": 50,
                                                      "messages": [{"role": "user", "content": blocks}]},
                                     headers={"anthropic-version": "2023-06-01"})
    assert status == 200, out
    assert normalised(upstream.model_calls[-1]["messages"]) == [{"role": "user", "content": blocks}]


def test_streaming_with_history(structured, upstream):
    upstream.push(fake_upstream.text("Streamed reply.", chunks=3))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    status, _, out = structured.post("/v1/chat/completions",
                                     {"model": "sonnet", "messages": messages, "stream": True})
    assert status == 200
    frames = [json.loads(d) for _, d in sse_events(out) if d != "[DONE]"]
    assert "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"]) \
        == "Streamed reply."
    assert [m["role"] for m in normalised(upstream.model_calls[-1]["messages"])] == \
        ["user", "assistant", "user"]


def test_flat_mode_keeps_the_json_transcript(make_proxy, upstream):
    proxy = make_proxy(CLAUDE_PROXY_HISTORY="flat")
    messages = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."},
                {"role": "user", "content": "Follow-up?"}]
    status, _, out = proxy.post("/v1/chat/completions", {"model": "sonnet", "messages": messages})
    assert status == 200, out
    sent = normalised(upstream.model_calls[-1]["messages"])
    assert len(sent) == 1
    text = sent[0]["content"][0]["text"]
    assert text.startswith("The conversation so far is below as a JSON array of turns")
    assert json.loads(text.split("\n\n", 1)[1]) == [
        {"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."},
        {"role": "user", "content": "Follow-up?"}]



def test_history_with_structured_output_effort_and_model_alias(structured, upstream):
    """The answers to the control lines (initialize with a schema, set_model, effort) arrive
    during the acknowledgement waits; the query still gets the schema tool and the effort."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"n": 3}))
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "{\"n\": 1}"},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "{\"n\": 2}"},
                {"role": "user", "content": "three"}]
    status, _, out = structured.post("/v1/chat/completions", {
        "model": "haiku", "messages": messages, "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert status == 200, out
    assert json.loads(out["choices"][0]["message"]["content"]) == {"n": 3}
    call = upstream.model_calls[-1]
    assert [t["name"] for t in call["tools"]] == ["StructuredOutput"]
    assert call["output_config"]["effort"] == "low" and "haiku" in call["model"]
    assert [m["role"] for m in normalised(call["messages"])] == ["user", "assistant"] * 2 + ["user"]


def test_thinking_in_history_is_dropped(structured, upstream):
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "secret thoughts", "signature": "sig"},
                    {"type": "text", "text": "visible answer"}]},
                {"role": "user", "content": "next"}]
    status, _, out = structured.post("/v1/messages", {"model": "sonnet", "max_tokens": 50,
                                                      "messages": messages},
                                     headers={"anthropic-version": "2023-06-01"})
    assert status == 200, out
    sent = normalised(upstream.model_calls[-1]["messages"])
    assert sent == [text_msg("user", "q"), text_msg("assistant", "visible answer"), text_msg("user", "next")]


# -- the acknowledgement wait honours the request's deadline, client and CLI (fake CLI) --------

@pytest.fixture(scope="module")
def fake_structured(make_proxy, tmp_path_factory):
    """The fake CLI reads the first user line (here a shouldQuery:false one) and acts on its
    directive: [[hang]] never acknowledges, [[crash]] exits without a result line."""
    return make_proxy(fake=True, args=("--timeout", "4"), pids=tmp_path_factory.mktemp("history-pids"),
                      CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_HISTORY="structured")


def earlier(directive):
    return [{"role": "user", "content": "earlier %s" % directive},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "now"}]


def test_ack_wait_ends_at_the_deadline(fake_structured):
    with no_leftover_cli(fake_structured.pids):
        status, _, body = fake_structured.post("/v1/chat/completions",
                                               {"model": "sonnet", "messages": earlier("[[hang]]")},
                                               timeout=30)
    assert status == 504, body
    assert "CLAUDE_PROXY_TIMEOUT" in body["error"]["message"]


def test_ack_wait_notices_a_client_that_hangs_up(fake_structured):
    body = json.dumps({"model": "sonnet", "messages": earlier("[[hang]]")}).encode()
    before = set(os.listdir(fake_structured.pids))
    with no_leftover_cli(fake_structured.pids, within=10.0):
        sock = socket.create_connection(("127.0.0.1", fake_structured.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while set(os.listdir(fake_structured.pids)) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert set(os.listdir(fake_structured.pids)) != before, "no CLI started for the request"
        sock.close()
    # the CLI is ended (no_leftover_cli), and because of the hang-up, not the 4 s --timeout:
    # the request is logged as the client's (499), not as a 504
    deadline = time.monotonic() + 5
    while " POST /v1/chat/completions 499 " not in fake_structured.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert " POST /v1/chat/completions 499 " in fake_structured.log, fake_structured.log[-2000:]


def test_cli_dying_during_the_ack_wait_is_502(fake_structured):
    with no_leftover_cli(fake_structured.pids):
        status, _, body = fake_structured.post("/v1/chat/completions",
                                               {"model": "sonnet", "messages": earlier("[[crash]]")})
    assert status == 502, body
    assert "ended without an answer" in body["error"]["message"]
