"""End-to-end tests of the Anthropic Messages dialect (issue 4), driven by the official
`anthropic` SDK against the proxy on the real pinned CLI and the fake upstream.

What a test pushes onto the fake upstream is what "Anthropic" answers the CLI; what the test
then reads from the SDK is what the proxy made of it.  Error paths that need a misbehaving CLI
(hang, crash) use `fake_proxy`.
"""
import json
import re

import anthropic
import pytest

import fake_upstream
from conftest import sse_events, upstream_turns

ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "x"}


# -- helpers ------------------------------------------------------------------------------------

def client_for(p, **kw):
    """The official SDK pointed at a proxy; no SDK retries, so a failure is seen once."""
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 60)
    return anthropic.Anthropic(base_url=p.url, api_key="x", **kw)


@pytest.fixture
def client(proxy):
    c = client_for(proxy)
    yield c
    c.close()


def upstream_system(call):
    """The system prompt text that reached upstream (a string or a list of text blocks)."""
    system = call.get("system") or ""
    if isinstance(system, list):
        return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    return system


def upstream_user_text(call):
    """All text the CLI sent upstream in user turns."""
    out = []
    for m in call.get("messages", []):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
            continue
        for b in content or []:
            if b.get("type") == "text":
                out.append(b["text"])
            elif b.get("type") == "tool_result":
                inner = b.get("content")
                out.append(inner if isinstance(inner, str) else json.dumps(inner))
    return "\n".join(out)


def fenced_all(blocks, info):
    """The JSON objects of the ```info blocks in the text blocks, in order."""
    text = "\n".join(b["text"] for b in blocks if b.get("type") == "text")
    return [json.loads(m) for m in re.findall(r"```%s\n(.*?)\n```" % info, text, re.S)]


def tool_call_text(name, arguments, before=""):
    """A model reply in the proxy's tool emulation format (a fenced ```tool_call block)."""
    return "%s```tool_call\n%s\n```" % (before, json.dumps({"name": name, "arguments": arguments}))


WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
TIME = {"name": "get_time", "description": "Current local time in a timezone.",
        "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}},
                         "required": ["tz"]}}


def raw_stream(p, body, headers=None):
    """POST a streaming request with plain HTTP: (status, headers, [(event, data dict)])."""
    status, hdrs, text = p.post("/v1/messages", dict(body, stream=True),
                                headers={**ANTHROPIC_HEADERS, **(headers or {})})
    assert isinstance(text, str), text
    return status, hdrs, [(name, json.loads(data)) for name, data in sse_events(text)]


# -- messages.create --------------------------------------------------------------------------

def test_create_text_with_string_system_and_usage(client, upstream):
    upstream.push(fake_upstream.text("Hello there.", usage={
        "input_tokens": 21, "output_tokens": 9,
        "cache_read_input_tokens": 1200, "cache_creation_input_tokens": 340}))
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=256,
                                 system="You are terse.",
                                 messages=[{"role": "user", "content": "Say hello."}])
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.id.startswith("msg_")
    assert msg.model == "claude-sonnet-4-6"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello there."
    assert msg.stop_reason == "end_turn"
    assert msg.stop_sequence is None
    assert msg.usage.input_tokens == 21
    assert msg.usage.output_tokens == 9
    assert msg.usage.cache_read_input_tokens == 1200
    assert msg.usage.cache_creation_input_tokens == 340
    call = upstream.model_calls[-1]
    assert "You are terse." in upstream_system(call)
    assert "Say hello." in upstream_user_text(call)


def test_create_system_blocks_with_cache_control_and_content_blocks(client, upstream):
    upstream.push(fake_upstream.text("Blocks understood.", chunks=3))
    msg = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=256,
        system=[{"type": "text", "text": "SYSTEM-PART-ONE: be precise."},
                {"type": "text", "text": "SYSTEM-PART-TWO: be kind.",
                 "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "first block", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "second block"}]}])
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "Blocks understood."
    call = upstream.model_calls[-1]
    system = upstream_system(call)
    assert "SYSTEM-PART-ONE: be precise." in system and "SYSTEM-PART-TWO: be kind." in system
    user = upstream_user_text(call)
    assert "first block" in user and "second block" in user


# -- streaming ----------------------------------------------------------------------------------

def test_sdk_stream_text_and_final_message(client, upstream):
    upstream.push(fake_upstream.text("One two three four five.", chunks=5,
                                     usage={"input_tokens": 30, "output_tokens": 12}))
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=256,
                                messages=[{"role": "user", "content": "Count to five."}]) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == "One two three four five."
    assert len(pieces) > 1, "the text arrived in one piece: not streamed"
    assert final.id.startswith("msg_")
    assert final.model == "claude-sonnet-4-6"
    assert final.content[0].type == "text"
    assert final.content[0].text == "One two three four five."
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 30
    assert final.usage.output_tokens == 12


def test_raw_stream_event_order(proxy, upstream):
    upstream.push(fake_upstream.text("alpha beta gamma", chunks=3,
                                     usage={"input_tokens": 17, "output_tokens": 6}))
    status, hdrs, events = raw_stream(proxy, {
        "model": "claude-sonnet-4-6", "max_tokens": 128,
        "messages": [{"role": "user", "content": "Stream please."}]})
    assert status == 200
    ctype = {k.lower(): v for k, v in hdrs.items()}["content-type"]
    assert ctype.startswith("text/event-stream")
    for name, data in events:
        assert name == data["type"], "event: name %r differs from data type %r" % (name, data["type"])
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start"
    assert names[1] == "content_block_start"
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    middle = names[2:-3]
    assert middle and set(middle) == {"content_block_delta"}
    # the ping comes right after message_start, as from the real API
    assert [n for n, _ in events][:2] == ["message_start", "ping"]

    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["role"] == "assistant"
    assert start["model"] == "claude-sonnet-4-6"
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 17
    assert isinstance(start["usage"]["output_tokens"], int)

    block_start = next(d for n, d in events if n == "content_block_start")
    assert block_start["index"] == 0
    assert block_start["content_block"] == {"type": "text", "text": ""}
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == "alpha beta gamma"
    assert next(d for n, d in events if n == "content_block_stop")["index"] == 0

    message_delta = next(d for n, d in events if n == "message_delta")
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["delta"]["stop_sequence"] is None
    assert message_delta["usage"]["output_tokens"] == 6


# -- thinking -----------------------------------------------------------------------------------

THOUGHT = "The user wants a number. 6 times 7 is 42."


def test_thinking_enabled_returns_signed_thinking_block_first(client, upstream):
    upstream.push(fake_upstream.thinking(THOUGHT, "42"))
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=4096,
                                 thinking={"type": "enabled", "budget_tokens": 2048},
                                 messages=[{"role": "user", "content": "What is 6*7?"}])
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == THOUGHT
    assert msg.content[0].signature == "sig-%d" % len(THOUGHT)
    assert msg.content[1].text == "42"


def test_thinking_enabled_streams_thinking_and_signature_deltas(client, upstream):
    upstream.push(fake_upstream.thinking(THOUGHT, "The answer is 42.", chunks=3))
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=4096,
                                thinking={"type": "enabled", "budget_tokens": 2048},
                                messages=[{"role": "user", "content": "What is 6*7?"}]) as s:
        events = list(s)
        final = s.get_final_message()
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [(e.index, e.delta.type) for e in events if e.type == "content_block_delta"]
    thinking_deltas = [t for i, t in deltas if i == 0]
    assert set(thinking_deltas) == {"thinking_delta", "signature_delta"}
    # the signature closes the thinking block: it comes after every thinking_delta
    assert thinking_deltas[-1] == "signature_delta"
    assert {t for i, t in deltas if i == 1} == {"text_delta"}
    assert "".join(e.delta.thinking for e in events
                   if e.type == "content_block_delta" and e.delta.type == "thinking_delta") == THOUGHT
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THOUGHT
    assert final.content[0].signature == "sig-%d" % len(THOUGHT)
    assert final.content[1].text == "The answer is 42."


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_thinking_not_requested_is_not_returned(client, upstream, stream):
    upstream.push(fake_upstream.thinking(THOUGHT, "42"))
    kw = dict(model="claude-sonnet-4-6", max_tokens=1024,
              messages=[{"role": "user", "content": "What is 6*7?"}])
    if stream:
        with client.messages.stream(**kw) as s:
            events = list(s)
            msg = s.get_final_message()
        starts = [e.content_block.type for e in events if e.type == "content_block_start"]
        assert starts == ["text"]
        assert not [e for e in events if e.type == "content_block_delta"
                    and e.delta.type in ("thinking_delta", "signature_delta")]
    else:
        msg = client.messages.create(**kw)
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "42"
    assert THOUGHT not in msg.model_dump_json()


# -- tools --------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", [{"type": "auto"}, {"type": "any"},
                                    {"type": "tool", "name": "get_weather"}])
def test_tool_use_blocks(client, upstream, choice):
    upstream.push(fake_upstream.text(tool_call_text("get_weather", {"city": "Paris"},
                                                    before="Let me check.\n\n")))
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=512,
                                 tools=[WEATHER, TIME], tool_choice=choice,
                                 messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1
    assert uses[0].id.startswith("toolu_")
    assert uses[0].name == "get_weather"
    assert uses[0].input == {"city": "Paris"}
    assert "tool_call" not in "".join(b.text for b in msg.content if b.type == "text")
    assert len(upstream.model_calls) == 1, "a call on the first try needs no second run"
    system = upstream_system(upstream.model_calls[-1])
    assert "get_weather" in system
    if choice["type"] != "auto":            # the forced choice is passed on to the model
        assert re.search(r"\bmust call\b", system, re.I)


def test_tool_choice_none_answers_in_text(client, upstream):
    upstream.push(fake_upstream.text("It is sunny in Paris, I believe."))
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=512,
                                 tools=[WEATHER], tool_choice={"type": "none"},
                                 messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert msg.stop_reason == "end_turn"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "It is sunny in Paris, I believe."
    assert "get_weather" not in upstream_system(upstream.model_calls[-1])


def test_tool_use_streamed_as_input_json_delta(client, upstream):
    upstream.push(fake_upstream.text(tool_call_text("get_time", {"tz": "Europe/Paris"}), chunks=4))
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=512, tools=[WEATHER, TIME],
                                messages=[{"role": "user", "content": "Time in Paris?"}]) as s:
        events = list(s)
        final = s.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"
              and e.content_block.type == "tool_use"]
    assert len(starts) == 1
    start = starts[0]
    assert start.content_block.id.startswith("toolu_")
    assert start.content_block.name == "get_time"
    json_deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"
                   and e.delta.type == "input_json_delta"]
    assert json_deltas and json.loads("".join(json_deltas)) == {"tz": "Europe/Paris"}
    stop_reason = [e.delta.stop_reason for e in events if e.type == "message_delta"]
    assert stop_reason == ["tool_use"]
    assert final.stop_reason == "tool_use"
    use = [b for b in final.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].input == {"tz": "Europe/Paris"}
    assert use[0].id == start.content_block.id


def test_tool_result_round_trip_reaches_upstream(client, upstream):
    upstream.push(fake_upstream.text("Paris is 18C and it is 14:05 there."))
    msg = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=512, tools=[WEATHER, TIME],
        messages=[
            {"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking both."},
                {"type": "tool_use", "id": "toolu_01Weather", "name": "get_weather",
                 "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_02Time", "name": "get_time",
                 "input": {"tz": "Europe/Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01Weather",
                 "content": "WEATHER-RESULT 18C cloudy"},
                {"type": "tool_result", "tool_use_id": "toolu_02Time", "is_error": True,
                 "content": [{"type": "text", "text": "TIME-ERROR tz database offline"}]}]}])
    assert msg.stop_reason == "end_turn"
    assert msg.content[0].text == "Paris is 18C and it is 14:05 there."
    # structured history: the earlier turns reach upstream as real messages, in order, with
    # the calls as ```tool_call text and the results (error flag included) as ```tool_result
    [(r1, ask), (r2, answer), (r3, results)] = upstream_turns(upstream.model_calls[-1])
    assert (r1, r2, r3) == ("user", "assistant", "user")
    assert ask == [{"type": "text", "text": "Weather and time in Paris?"}]
    assert "Checking both." in answer[0]["text"]
    assert fenced_all(answer, "tool_call") == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]
    assert fenced_all(results, "tool_result") == [
        {"tool_call_id": "toolu_01Weather", "name": "get_weather",
         "content": "WEATHER-RESULT 18C cloudy"},
        {"tool_call_id": "toolu_02Time", "name": "get_time",
         "content": "TIME-ERROR tz database offline", "is_error": True}]


# -- count_tokens and models --------------------------------------------------------------------

def test_count_tokens(client, upstream):
    before = len(upstream.model_calls)
    small = client.messages.count_tokens(model="claude-sonnet-4-6",
                                         messages=[{"role": "user", "content": "Hello"}])
    big = client.messages.count_tokens(
        model="claude-sonnet-4-6", system="You are helpful. " * 50, tools=[WEATHER, TIME],
        messages=[{"role": "user", "content": "Hello " * 400}])
    assert isinstance(small.input_tokens, int) and small.input_tokens > 0
    assert big.input_tokens > small.input_tokens
    assert len(upstream.model_calls) == before, "count_tokens must not run a model turn"


def test_models_list_and_retrieve_anthropic_shape(client):
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert "claude-sonnet-4-6" in ids
    assert page.has_more is False
    assert page.first_id == ids[0] and page.last_id == ids[-1]
    for m in page.data:
        assert m.type == "model"
        assert isinstance(m.display_name, str) and m.display_name
        assert m.created_at.year >= 2024            # parsed as an RFC 3339 datetime
    info = client.models.retrieve("claude-sonnet-4-6")
    assert info.id == "claude-sonnet-4-6" and info.type == "model"
    assert info.display_name and info.created_at.year >= 2024
    with pytest.raises(anthropic.NotFoundError) as exc:
        client.models.retrieve("gpt-4o")
    assert exc.value.type == "not_found_error"


def test_models_without_anthropic_headers_is_openai_shaped(proxy):
    status, _, body = proxy.request("GET", "/v1/models")
    assert status == 200
    assert body["object"] == "list"
    assert body["data"] and all(m["object"] == "model" for m in body["data"])
    assert "has_more" not in body and "type" not in body["data"][0]
    assert {"opus", "sonnet", "haiku"} <= {m["id"] for m in body["data"]}   # aliases: OpenAI list
    status, _, body = proxy.request("GET", "/v1/models", headers=ANTHROPIC_HEADERS)
    assert status == 200 and body["data"][0]["type"] == "model" and "has_more" in body


def test_anthropic_model_list_has_full_ids_only(proxy):
    """As Anthropic lists them: full claude-... ids with display_name and created_at."""
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    models = list(client.models.list())
    assert models and all(m.id.startswith("claude-") and m.type == "model" for m in models)
    assert not {"opus", "sonnet", "haiku"} & {m.id for m in models}
    names = {m.id: m.display_name for m in models}
    assert names["claude-sonnet-4-6"] == "Claude Sonnet 4.6"
    assert all(m.created_at.year >= 2025 for m in models)
    assert client.models.retrieve("claude-haiku-4-5").display_name == "Claude Haiku 4.5"
    status, _, body = proxy.post("/v1/messages", {"model": "haiku", "max_tokens": 5,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body                      # aliases are still accepted in requests


# -- errors -------------------------------------------------------------------------------------

def assert_anthropic_error(exc, status, kind):
    assert exc.status_code == status
    body = exc.response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def test_missing_max_tokens_is_invalid_request(client, upstream):
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=anthropic.omit,
                               messages=[{"role": "user", "content": "hi"}])
    message = assert_anthropic_error(exc.value, 400, "invalid_request_error")
    assert "max_tokens" in message
    assert upstream.model_calls == []


def test_unknown_model_is_400(client, upstream):
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model="gpt-4o", max_tokens=64,
                               messages=[{"role": "user", "content": "hi"}])
    message = assert_anthropic_error(exc.value, 400, "invalid_request_error")
    assert "gpt-4o" in message and "claude-sonnet-4-6" in message
    assert upstream.model_calls == []


def test_upstream_rate_limit_is_rate_limit_error_with_retry_after(client, upstream):
    upstream.responder = lambda body: fake_upstream.error(
        429, "rate_limit_error", "Number of requests has exceeded your rate limit",
        headers={"retry-after": "2"})
    with pytest.raises(anthropic.RateLimitError) as exc:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                               messages=[{"role": "user", "content": "hi"}])
    assert_anthropic_error(exc.value, 429, "rate_limit_error")
    retry_after = exc.value.response.headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1


def test_upstream_overloaded_is_529(client, upstream):
    upstream.responder = lambda body: fake_upstream.error(529, "overloaded_error", "Overloaded")
    with pytest.raises(anthropic.APIStatusError) as exc:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                               messages=[{"role": "user", "content": "hi"}])
    assert isinstance(exc.value, anthropic.OverloadedError)
    assert_anthropic_error(exc.value, 529, "overloaded_error")


def test_upstream_auth_failure_says_claude_login(client, upstream):
    upstream.responder = lambda body: fake_upstream.error(
        401, "authentication_error", "invalid x-api-key")
    with pytest.raises(anthropic.APIStatusError) as exc:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                               messages=[{"role": "user", "content": "hi"}])
    body = exc.value.response.json()
    assert body["type"] == "error" and body["error"]["type"]
    assert "claude login" in body["error"]["message"]
    assert "sk-ant-test-dummy-key" not in exc.value.response.text


def test_cli_hang_is_504_timeout_error(fake_proxy):
    c = client_for(fake_proxy)
    with pytest.raises(anthropic.APIStatusError) as exc:
        c.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                          messages=[{"role": "user", "content": "please [[hang]]"}])
    assert isinstance(exc.value, anthropic.GatewayTimeoutError)
    assert_anthropic_error(exc.value, 504, "timeout_error")


def test_mid_stream_failure_is_an_error_event(fake_proxy):
    status, _, events = raw_stream(fake_proxy, {
        "model": "claude-sonnet-4-6", "max_tokens": 64,
        "messages": [{"role": "user", "content": "[[crash]] now"}]})
    assert status == 200
    names = [n for n, _ in events]
    assert names[0] == "message_start"
    assert "content_block_delta" in names
    assert names[-1] == "error", names
    assert "message_stop" not in names
    err = events[-1][1]
    assert err["type"] == "error"
    assert isinstance(err["error"]["type"], str) and err["error"]["type"].endswith("_error")
    assert err["error"]["message"]


def test_mid_stream_failure_raises_in_sdk(fake_proxy):
    c = client_for(fake_proxy)
    with pytest.raises(anthropic.APIStatusError) as exc:
        with c.messages.stream(model="claude-sonnet-4-6", max_tokens=64,
                               messages=[{"role": "user", "content": "[[crash]] now"}]) as s:
            for _ in s.text_stream:
                pass
    assert exc.value.type and exc.value.type.endswith("_error")


# -- model names --------------------------------------------------------------------------------

@pytest.mark.parametrize("model,family", [
    ("claude-opus-5-5", "opus"),
    ("claude-haiku-4-5-20251001", "haiku"),
    ("sonnet", "sonnet"),
    ("anthropic/claude-sonnet-4-6", "sonnet"),
])
def test_claude_code_model_names_accepted(client, upstream, model, family):
    upstream.push(fake_upstream.text("ok"))
    msg = client.messages.create(model=model, max_tokens=64,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.model == model
    assert msg.content[0].text == "ok"
    assert family in upstream.model_calls[-1]["model"]


# -- an agent-sized request ---------------------------------------------------------------------

def big_tool(i):
    props = {}
    for j in range(25):
        props["field_%02d" % j] = {
            "type": "object", "description": "Nested option %d of tool %d. " % (j, i) * 4,
            "properties": {"value": {"type": "string", "enum": ["a", "b", "c", "d"]},
                           "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                           "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["value"]}
    return {"name": "agent_tool_%02d" % i, "description": "Agent tool number %d. " % i * 10,
            "input_schema": {"type": "object", "properties": props, "required": ["field_00"]}}


def test_agent_sized_request(client, upstream):
    head, tail = "AGENT-SYSTEM-HEAD-7c1e", "AGENT-SYSTEM-TAIL-93b0"
    filler = "".join("Rule %05d: follow the coding conventions of this repository.\n" % i
                     for i in range(850))
    assert len(filler) >= 50_000
    system = [{"type": "text", "text": head + "\n" + filler},
              {"type": "text", "text": "Environment notes.\n" + tail,
               "cache_control": {"type": "ephemeral"}}]
    tools = [big_tool(i) for i in range(20)]
    assert len(json.dumps(tools)) > 100_000
    upstream.push(fake_upstream.text("Ready to help with the repository."))
    msg = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=32000, system=system, tools=tools,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What can you do?", "cache_control": {"type": "ephemeral"}}]}],
        metadata={"user_id": "agent-user"},
        extra_headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                                         "fine-grained-tool-streaming-2025-05-14"})
    assert msg.content[0].text == "Ready to help with the repository."
    sent = upstream_system(upstream.model_calls[-1])
    assert head in sent and tail in sent and filler in sent
    assert "agent_tool_00" in sent and "agent_tool_19" in sent


# -- accepted, not forwarded --------------------------------------------------------------------

def test_sampling_options_and_metadata_accepted(client, upstream):
    upstream.push(fake_upstream.text("Sampled."))
    msg = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=128,
        stop_sequences=["NEVER-APPEARS"], metadata={"user_id": "user-4711"},
        messages=[{"role": "user", "content": "hi"}],
        # this SDK version no longer types the sampling options; they still travel in the body
        extra_body={"temperature": 0.3, "top_p": 0.9, "top_k": 40})
    assert msg.content[0].text == "Sampled."
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    call = upstream.model_calls[-1]
    assert call.get("top_k") != 40
    assert call.get("temperature") != 0.3
    assert "NEVER-APPEARS" not in json.dumps(call)
    assert "user-4711" not in json.dumps(call)


def test_stop_sequence_ends_the_answer(client, upstream):
    """The real API stops at the first stop sequence and reports it; the CLI cannot be told,
    so the proxy has to cut the text itself."""
    upstream.push(fake_upstream.text("First part.\nSTOP-HERE\nSecond part.", chunks=4))
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=128,
                                 stop_sequences=["STOP-HERE"],
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "First part.\n"
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == "STOP-HERE"


def test_stop_sequence_ends_the_stream(client, upstream):
    upstream.push(fake_upstream.text("Alpha beta.\nSTOP-HERE\nGamma delta.", chunks=8))
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=128,
                                stop_sequences=["NOT-THIS", "STOP-HERE"],
                                messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Alpha beta.\n"
    assert final.content[0].text == "Alpha beta.\n"
    assert final.stop_reason == "stop_sequence"
    assert final.stop_sequence == "STOP-HERE"
