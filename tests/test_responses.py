"""POST /v1/responses end to end: the official openai SDK -> proxy -> real CLI -> fake upstream.

Tool calls are emulated: the model writes ```tool_call fenced blocks in its text, so a scripted
text reply containing such a block stands for the model calling a tool.
"""
import base64
import importlib.util
import json
import struct
import sys
import urllib.request
import zlib

import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

import fake_upstream
from conftest import PROXY, sse_events, upstream_turns

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CALL_TEXT = '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'


@pytest.fixture(scope="module")
def client(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


def system_text(call):
    return " ".join(b["text"] for b in call["system"])


def text_of(blocks):
    return "\n".join(b["text"] for b in blocks if b["type"] == "text")


def fenced(text, info):
    """The JSON object inside the ```info fence of text."""
    start = text.index("```%s\n" % info) + len(info) + 4
    return json.loads(text[start:text.index("\n```", start)])


def tiny_png():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


# -- non-streaming --------------------------------------------------------------------------

def test_string_input_with_instructions(client, upstream):
    upstream.push(fake_upstream.text("Bonjour!"))
    raw = client.responses.with_raw_response.create(
        model="sonnet", instructions="Answer in French.", input="Say hello.", store=True,
        metadata={"run": "t1"})
    body = json.loads(raw.text)
    resp = Response.model_validate(body)          # every field the SDK declares, validated
    assert resp.output_text == "Bonjour!"
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.model == "sonnet"
    assert resp.metadata == {"run": "t1"} and resp.instructions == "Answer in French."
    msg = body["output"][0]
    assert len(body["output"]) == 1
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["status"] == "completed"
    assert msg["id"].startswith("msg_")
    assert msg["content"] == [{"type": "output_text", "text": "Bonjour!", "annotations": [],
                               "logprobs": []}]
    assert body["store"] is True                  # kept: GET /v1/responses/{id} finds it
    call = upstream.model_calls[-1]
    assert "Answer in French." in system_text(call)
    assert call["messages"][0] == {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}
    assert call["tools"] == []


def test_usage_counts_cache_tokens(client, upstream):
    upstream.push(fake_upstream.text("ok", usage={
        "input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20}))
    u = client.responses.create(model="sonnet", input="hi").usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (125, 9, 134)
    assert u.input_tokens_details.cached_tokens == 100
    assert u.input_tokens_details.cache_write_tokens == 20
    assert u.output_tokens_details.reasoning_tokens == 0


def test_items_input_with_image(client, upstream):
    data = base64.b64encode(tiny_png()).decode()
    upstream.push(fake_upstream.text("A green pixel."))
    resp = client.responses.create(model="sonnet", input=[
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Remember the word kiwi."},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Noted: kiwi."}]},
        {"role": "user", "content": [
            {"type": "input_text", "text": "What is in this image?"},
            {"type": "input_image", "image_url": "data:image/png;base64," + data, "detail": "auto"}]}])
    assert resp.output_text == "A green pixel."
    call = upstream.model_calls[-1]
    assert "Be terse." in system_text(call)
    turns = upstream_turns(call)
    assert [role for role, _ in turns] == ["user", "assistant", "user"]
    assert text_of(turns[0][1]) == "Remember the word kiwi."
    assert text_of(turns[1][1]) == "Noted: kiwi."
    assert turns[2][1] == [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]
    assert "Be terse." not in json.dumps(call["messages"])


def test_remote_image_url_is_refused(client, upstream):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="sonnet", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "auto"}]}])
    assert "data: URL" in exc.value.body["message"]
    assert exc.value.body["param"] == "input[0].content[0]"
    assert upstream.model_calls == []


def test_function_tool_round_trip(client, upstream):
    upstream.push(fake_upstream.text("Let me check.\n" + CALL_TEXT))
    question = {"role": "user", "content": "Weather in Paris?"}
    first = client.responses.create(model="sonnet", input=[question], tools=[WEATHER])
    assert [item.type for item in first.output] == ["message", "function_call"]
    assert first.output_text.strip() == "Let me check."
    fc = first.output[1]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris"}
    assert fc.call_id.startswith("call_") and fc.id.startswith("fc_") and fc.status == "completed"
    assert first.tools[0].name == "get_weather" and first.tool_choice == "auto"
    offered = system_text(upstream.model_calls[-1])
    assert "```tool_call" in offered and "get_weather" in offered and "Current weather" in offered

    # the usual client loop: earlier output items go back as input, then the tool's result
    upstream.push(fake_upstream.text("It is 21 degrees in Paris."))
    second = client.responses.create(model="sonnet", tools=[WEATHER], input=[
        question, *first.output,
        {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp": 21}'}])
    assert second.output_text == "It is 21 degrees in Paris."
    assert [item.type for item in second.output] == ["message"]
    turns = upstream_turns(upstream.model_calls[-1])
    assert [role for role, _ in turns] == ["user", "assistant", "user"]
    assert text_of(turns[0][1]) == "Weather in Paris?"
    answer = text_of(turns[1][1])
    assert "Let me check." in answer
    assert fenced(answer, "tool_call") == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert fenced(text_of(turns[2][1]), "tool_result") == {
        "tool_call_id": fc.call_id, "name": "get_weather", "content": '{"temp": 21}'}


def test_bad_requests_are_400_in_openai_shape(client, upstream):
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="sonnet", input="hi", previous_response_id="resp_abc")
    assert exc.value.body["param"] == "previous_response_id"
    assert exc.value.body["message"] == "Previous response with id 'resp_abc' not found."
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="sonnet", input="hi", background=True, store=False)
    assert exc.value.body["param"] == "background"
    assert exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="sonnet", input="hi",
                                tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}])
    assert exc.value.body["param"] == "tools[0]"
    assert "vector stores" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="sonnet", input="hi", tools=[WEATHER],
                                tool_choice={"type": "function", "name": "nope"})
    assert exc.value.body["param"] == "tool_choice"
    assert upstream.model_calls == []


def test_max_output_tokens_and_effort_reach_upstream(client, upstream):
    upstream.push(fake_upstream.text("Short."))
    resp = client.responses.create(model="sonnet", input="Tell a story.", max_output_tokens=50,
                                   reasoning={"effort": "low"})
    assert resp.status == "completed" and resp.output_text == "Short."
    assert resp.max_output_tokens == 50 and resp.reasoning.effort == "low"
    call = upstream.model_calls[-1]
    assert call["max_tokens"] == 50
    assert call["output_config"]["effort"] == "low"


def test_max_tokens_stop_renders_incomplete(monkeypatch):
    """The real CLI resumes by itself after a max_tokens stop (and fails after three tries), so
    no end-to-end request reaches this path: the dialect is driven with neutral events."""
    spec = importlib.util.spec_from_file_location("claude_openai_proxy", PROXY)
    m = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "claude_openai_proxy", m)      # dataclasses look it up
    spec.loader.exec_module(m)
    dialect, body = m.DIALECTS["responses"], {"model": "sonnet", "input": "hi"}
    req = dialect.parse(body, {}, m.Config())
    events = [m.Start(m.Usage()), m.TextDelta("Once upon"), m.Done("max_tokens", m.Usage(3, 16))]

    resp = Response.model_validate(dialect.render(req, m.collect(events), body))
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete" and resp.output_text == "Once upon"

    class Capture:
        def __init__(self):
            self.events = []

        def event(self, data, name=None):
            self.events.append(STREAM_EVENT.validate_python(data))

        def comment(self, text):
            pass

    sse = Capture()
    dialect.stream(req, iter(events), sse, body)
    assert sse.events[-1].type == "response.incomplete"
    final = sse.events[-1].response
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.usage.output_tokens == 16


# -- streaming ------------------------------------------------------------------------------

def test_stream_text_events_in_order(client, upstream):
    text = "The quick brown fox jumps over the lazy dog."
    upstream.push(fake_upstream.text(text, chunks=4))
    events = list(client.responses.create(model="sonnet", input="Type a pangram.", stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * len(deltas) + [
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == text
    item_id = events[2].item.id
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)
    assert events[-4].text == text
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == "completed"
    assert final.output_text == text and final.output[0].id == item_id
    assert final.usage.output_tokens == 7 and final.usage.input_tokens == 11


def test_stream_helper_final_response(client, upstream):
    upstream.push(fake_upstream.text("Streamed through the helper.", chunks=3))
    with client.responses.stream(model="sonnet", input="go", instructions="Be kind.") as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "Streamed through the helper."
    assert snapshots[-1] == "Streamed through the helper."
    assert final.usage.total_tokens == 18
    assert "Be kind." in system_text(upstream.model_calls[-1])


def test_stream_text_then_function_call(client, upstream):
    upstream.push(fake_upstream.text("Checking.\n" + CALL_TEXT, chunks=5))
    with client.responses.stream(model="sonnet", input="Weather in Paris?", tools=[WEATHER],
                                 tool_choice="required") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events if e.type != "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added",
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    added = [e for e in events if e.type == "response.output_item.added"]
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [(e.output_index, e.item.type) for e in added] == [(0, "message"), (1, "function_call")]
    fc_added, fc_done = added[1].item, done[1].item
    assert fc_added.arguments == "" and fc_added.status == "in_progress"
    args = next(e for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args.delta) == {"city": "Paris"} and args.item_id == fc_added.id
    assert args.output_index == 1
    assert next(e for e in events if e.type == "response.function_call_arguments.done").arguments \
        == args.delta
    assert fc_done.status == "completed" and fc_done.call_id == fc_added.call_id
    assert fc_done.arguments == args.delta
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output_text.strip() == "Checking."
    assert final.output[1].name == "get_weather" and final.output[1].call_id == fc_added.call_id
    assert final.tool_choice == "required"
    assert "MUST call at least one tool" in system_text(upstream.model_calls[-1])


def test_raw_sse_event_names(proxy, upstream):
    upstream.push(fake_upstream.text("raw bytes", chunks=2))
    req = urllib.request.Request(proxy.url + "/responses", method="POST",
                                 data=json.dumps({"model": "sonnet", "input": "hi",
                                                  "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(resp.read().decode())
    assert events and all(name is not None for name, _ in events)
    datas = [json.loads(d) for _, d in events]
    assert [name for name, _ in events] == [d["type"] for d in datas]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    for d in datas:
        STREAM_EVENT.validate_python(d)           # each event matches the SDK's declared model
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    assert "".join(d["delta"] for d in datas if d["type"] == "response.output_text.delta") == "raw bytes"


def test_failure_after_stream_began_is_response_failed(client, upstream):
    # the stream starts (message_start), drops, and every retry fails: the CLI gives up mid-stream
    upstream.push(fake_upstream.text("partial", drop_after=1),
                  *[fake_upstream.error(500, "api_error", "upstream broke")] * 6)
    events = list(client.responses.create(model="sonnet", input="hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    failed = events[-1].response
    assert failed.status == "failed" and failed.id == events[0].response.id
    assert failed.error.code == "server_error" and "upstream broke" in failed.error.message


# -- structured output (text.format) ----------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
        "required": ["city", "temp"], "additionalProperties": False}


def test_json_schema_format_gives_the_json_and_echoes_the_format(client, upstream):
    """The flat text.format shape (as the AI SDK sends it, with a $schema key) goes the CLI's
    structured-output way: its StructuredOutput tool's answer is the output text."""
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Paris", "temp": 21.5},
                                         before="Here you go:"))
    fmt = {"type": "json_schema", "name": "weather", "strict": True,
           "schema": dict(CITY, **{"$schema": "http://json-schema.org/draft-07/schema#"})}
    raw = client.responses.with_raw_response.create(model="sonnet", input="weather as json",
                                                    text={"format": fmt})
    body = json.loads(raw.text)
    resp = Response.model_validate(body)
    assert json.loads(resp.output_text) == {"city": "Paris", "temp": 21.5}
    assert body["output"][0]["content"][0]["text"] == resp.output_text
    assert body["text"]["format"] == fmt                      # name, strict and all, echoed
    offered = upstream.model_calls[-1]["tools"]
    assert [t["name"] for t in offered] == ["StructuredOutput"]
    assert offered[0]["input_schema"] == CITY                 # $schema left out


def test_parse_and_stream_with_a_pydantic_model(client, upstream):
    class Weather(pydantic.BaseModel):
        city: str
        temp: float

    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Oslo", "temp": -3}))
    parsed = client.responses.parse(model="sonnet", input="weather", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Oslo", temp=-3)
    assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Weather"

    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Lima", "temp": 19}))
    with client.responses.stream(model="sonnet", input="weather", text_format=Weather) as stream:
        deltas = [ev.delta for ev in stream if ev.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert json.loads("".join(deltas)) == {"city": "Lima", "temp": 19}
    assert final.output_parsed == Weather(city="Lima", temp=19)


def test_json_object_format(client, upstream):
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"ok": True}))
    resp = client.responses.create(model="sonnet", input="json please",
                                   text={"format": {"type": "json_object"}})
    assert json.loads(resp.output_text) == {"ok": True}
    assert resp.text.format.type == "json_object"
    assert upstream.model_calls[-1]["tools"][0]["input_schema"] == {"type": "object"}


def test_json_schema_with_tools_is_a_rule_the_final_answer_follows(client, upstream):
    """With tools offered the model must be free to call them first (the CLI's structured mode
    would insist on StructuredOutput): the schema becomes a system-prompt rule instead."""
    upstream.push(fake_upstream.text('{"city": "Paris", "temp": 21}'))
    resp = client.responses.create(
        model="sonnet", input="weather", tools=[WEATHER],
        text={"format": {"type": "json_schema", "name": "weather", "schema": CITY}})
    assert json.loads(resp.output_text) == {"city": "Paris", "temp": 21}
    call = upstream.model_calls[-1]
    assert call["tools"] == []                                # no StructuredOutput tool
    assert "matching this JSON schema" in system_text(call)
    assert json.dumps(CITY) in system_text(call)


def test_bad_text_format_is_a_400(client, upstream):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="sonnet", input="hi", text={"format": {"type": "yaml"}})
    assert exc.value.body["param"] == "text.format"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="sonnet", input="hi",
                                text={"format": {"type": "json_schema", "name": "x", "schema": 3}})
    assert exc.value.body["param"] == "text.format"
    assert upstream.model_calls == []
