"""Structured output, stop sequences and reasoning, end to end (real CLI, fake upstream)."""
import json
import time

import pytest

import fake_upstream
from conftest import sse_events

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
          "required": ["city", "temp"]}


def chat(proxy, content, **extra):
    return proxy.post("/v1/chat/completions", {
        "model": "sonnet", "messages": [{"role": "user", "content": content}], **extra})


# -- structured output ------------------------------------------------------------------------

def test_openai_json_schema_gives_exactly_the_json(proxy, upstream):
    """The CLI's StructuredOutput tool answer becomes the content; prose around it is dropped."""
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Paris", "temp": 21.5},
                                         before="Sure, here it is:"))
    status, _, body = chat(proxy, "weather as json", response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}})
    assert status == 200, body
    assert json.loads(body["choices"][0]["message"]["content"]) == {"city": "Paris", "temp": 21.5}
    assert body["choices"][0]["finish_reason"] == "stop"
    tools = upstream.model_calls[-1]["tools"]
    assert [t["name"] for t in tools] == ["StructuredOutput"]
    assert tools[0]["input_schema"] == SCHEMA


def test_openai_json_object_streams_the_json(proxy, upstream):
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"ok": True}))
    status, _, text = chat(proxy, "json please", stream=True, response_format={"type": "json_object"})
    assert status == 200
    chunks = [json.loads(d) for _, d in sse_events(text) if d != "[DONE]"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert json.loads(content) == {"ok": True}
    assert upstream.model_calls[-1]["tools"][0]["input_schema"] == {"type": "object"}


def test_anthropic_output_config_format(proxy, upstream):
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Oslo", "temp": -3}))
    status, _, body = proxy.post("/v1/messages", {
        "model": "claude-sonnet-4-6", "max_tokens": 200,
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
        "messages": [{"role": "user", "content": "weather"}]})
    assert status == 200, body
    assert [b["type"] for b in body["content"]] == ["text"]
    assert json.loads(body["content"][0]["text"]) == {"city": "Oslo", "temp": -3}


def test_no_valid_json_is_an_error_not_prose(proxy, upstream):
    """The model never calls StructuredOutput: the CLI retries, then gives up -> a 502."""
    upstream.default = fake_upstream.text("I'd rather write prose.")
    status, _, body = chat(proxy, "json", response_format={
        "type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert status == 502, body
    assert "JSON" in body["error"]["message"]
    assert "prose" not in json.dumps(body)


def test_bad_response_format_is_400(proxy, upstream):
    status, _, body = chat(proxy, "x", response_format={"type": "yaml"})
    assert status == 400 and body["error"]["param"] == "response_format"
    assert upstream.model_calls == []


# -- stop sequences ---------------------------------------------------------------------------

def test_openai_stop_cuts_text_and_stops_the_cli(proxy, upstream):
    """Text ends before the stop sequence, even when it arrives split across deltas, and the
    CLI is stopped: the upstream stream is abandoned before its end."""
    upstream.push(fake_upstream.text("Hello there END and much more text " + "x" * 200,
                                     chunks=60, delay=0.05))
    status, _, body = chat(proxy, "go", stop=["END", "NEVER"])
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Hello there "
    assert body["choices"][0]["finish_reason"] == "stop"
    deadline = time.time() + 5
    while upstream.aborted_streams == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert upstream.aborted_streams == 1


def test_anthropic_stop_sequences_streaming(proxy, upstream):
    upstream.push(fake_upstream.text("one two ##three", chunks=8))
    status, _, text = proxy.post("/v1/messages", {
        "model": "claude-haiku-4-5-20251001", "max_tokens": 100, "stream": True,
        "stop_sequences": ["##"], "messages": [{"role": "user", "content": "count"}]})
    assert status == 200
    events = [(n, json.loads(d)) for n, d in sse_events(text)]
    streamed = "".join(d["delta"]["text"] for n, d in events
                       if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
    assert streamed == "one two "
    delta = [d for n, d in events if n == "message_delta"][0]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "##"}


def test_stop_sequence_not_present_changes_nothing(proxy, upstream):
    upstream.push(fake_upstream.text("plain answer", chunks=3))
    status, _, body = proxy.post("/v1/messages", {
        "model": "sonnet", "max_tokens": 50, "stop_sequences": ["ZZZ"],
        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    assert body["content"][0]["text"] == "plain answer"
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None


# -- reasoning --------------------------------------------------------------------------------

def test_reasoning_effort_maps_to_cli_effort_and_returns_reasoning(proxy, upstream):
    upstream.push(fake_upstream.thinking("step by step", "42", chunks=2))
    status, _, body = chat(proxy, "think", reasoning_effort="high")
    assert status == 200, body
    msg = body["choices"][0]["message"]
    assert msg["content"] == "42" and msg["reasoning_content"] == "step by step"
    assert upstream.model_calls[-1]["output_config"]["effort"] == "high"


def test_reasoning_not_returned_unless_asked(proxy, upstream):
    upstream.push(fake_upstream.thinking("hidden thoughts", "answer"))
    status, _, body = chat(proxy, "hi")
    assert status == 200
    assert "reasoning_content" not in body["choices"][0]["message"]
    assert "hidden thoughts" not in json.dumps(body)


def test_reasoning_streams_as_reasoning_content(proxy, upstream):
    upstream.push(fake_upstream.thinking("abc", "done", chunks=3))
    status, _, text = chat(proxy, "hi", stream=True, reasoning_effort="low")
    chunks = [json.loads(d) for _, d in sse_events(text) if d != "[DONE]"]
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
    assert reasoning == "abc"
    assert upstream.model_calls[-1]["output_config"]["effort"] == "low"


def test_reasoning_effort_none_disables_thinking(make_proxy, upstream):
    """Thinking off is fixed at launch (an environment switch): such a request gets its own
    process, with no thinking block upstream."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0)
    status, _, body = chat(p, "hi", reasoning_effort="none")
    assert status == 200, body
    assert "thinking" not in upstream.model_calls[-1]


# -- models and the control protocol ----------------------------------------------------------

def test_full_model_id_costs_no_extra_upstream_request(proxy, upstream):
    """`set_model` with a full id makes the CLI probe upstream first; the proxy puts full ids
    on argv instead, so each request is exactly one upstream call."""
    for model in ("claude-sonnet-4-6", "claude-haiku-4-5-20251001", "haiku"):
        before = len(upstream.model_calls)
        status, _, body = proxy.post("/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200, body
        calls = upstream.model_calls[before:]
        assert len(calls) == 1, [c.get("max_tokens") for c in calls]
        assert calls[0]["model"] == ("claude-haiku-5-5" if model == "haiku" else model)


# -- max_tokens -------------------------------------------------------------------------------

def test_max_tokens_stop_is_reported_not_resumed(proxy, upstream):
    """The CLI would ask the model to resume after a max_tokens stop and join the pieces; the
    proxy returns the cut-off answer with finish_reason "length" / stop_reason "max_tokens"."""
    upstream.push(fake_upstream.Reply(blocks=[{"type": "text", "text": "cut off here"}],
                                      stop_reason="max_tokens", chunks=3))
    upstream.default = fake_upstream.text(" RESUMED TEXT")
    status, _, body = chat(proxy, "long story", max_tokens=20)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "cut off here"
    assert body["choices"][0]["finish_reason"] == "length"

    upstream.push(fake_upstream.Reply(blocks=[{"type": "text", "text": "also cut"}],
                                      stop_reason="max_tokens", chunks=2))
    status, _, text = proxy.post("/v1/messages", {
        "model": "sonnet", "max_tokens": 20, "stream": True,
        "messages": [{"role": "user", "content": "long story"}]})
    events = [(n, json.loads(d)) for n, d in sse_events(text)]
    streamed = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert streamed == "also cut"
    assert [d for n, d in events if n == "message_delta"][0]["delta"]["stop_reason"] == "max_tokens"
    assert events[-1][0] == "message_stop"


# -- dropped upstream streams -----------------------------------------------------------------

def test_dropped_stream_retried_with_a_different_answer(proxy, upstream):
    """A real model answers differently when the CLI asks again after a dropped stream: a
    non-streaming client gets the new answer alone; a streaming client, which already has part
    of the old one, gets the dialect's error event instead of a spliced answer."""
    first, second = "Alpha beta gamma delta epsilon.", "Completely different words here."
    upstream.push(fake_upstream.text(first, chunks=8, drop_after=5))
    upstream.default = fake_upstream.text(second, chunks=3)
    status, _, body = chat(proxy, "hi")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == second

    upstream.push(fake_upstream.text(first, chunks=8, drop_after=5))
    status, _, text = chat(proxy, "hi", stream=True)
    assert status == 200
    frames = [json.loads(d) for _, d in sse_events(text) if d != "[DONE]"]
    streamed = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f.get("choices"))
    assert first.startswith(streamed) and streamed
    assert "error" in frames[-1] and "differs" in frames[-1]["error"]["message"]
    assert text.rstrip().endswith("data: [DONE]")


# -- through the official SDKs ----------------------------------------------------------------

TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def test_openai_sdk_response_format_and_image_part(proxy, upstream):
    import openai
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Lima", "temp": 19}))
    out = client.chat.completions.create(
        model="sonnet", messages=[{"role": "user", "content": [
            {"type": "text", "text": "Which city is on this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + TINY_PNG}}]}],
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert json.loads(out.choices[0].message.content) == {"city": "Lima", "temp": 19}
    sent = upstream.model_calls[-1]["messages"][0]["content"]
    assert {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                        "data": TINY_PNG}} in sent
    assert sent[0] == {"type": "text", "text": "Which city is on this picture?"}


def test_anthropic_sdk_image_block_and_structured_output(proxy, upstream):
    import anthropic
    client = anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0)
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Quito", "temp": 14}))
    msg = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=300,
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG}},
            {"type": "text", "text": "Where?"}]}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
    assert json.loads(msg.content[0].text) == {"city": "Quito", "temp": 14}
    sent = upstream.model_calls[-1]["messages"][0]["content"]
    # (for pre-5 models the CLI itself puts <system-reminder> text blocks first)
    assert {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                        "data": TINY_PNG}} in sent


def test_remote_image_url_refused_through_the_sdk(proxy, upstream):
    import openai
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="sonnet", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert "not fetched" in str(err.value)
    assert upstream.model_calls == []
