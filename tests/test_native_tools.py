"""Native tool mode: the client's tools reach the model as real tools through the CLI's SDK MCP
bridge (real CLI, fake upstream, the official openai and anthropic SDKs as clients).

What these pin about the CLI (2.1.330): the tools arrive upstream as mcp__client__NAME with the
client's schema; the model's tool_use streams back as input_json_delta; denying can_use_tool with
interrupt ends the turn after exactly one upstream call, and holding that answer until the
message ends keeps parallel calls whole; the CLI rewrites names to [A-Za-z0-9_-].
"""
import json
import signal
import time

import anthropic
import openai
import pytest

import fake_upstream
from conftest import children, sse_events, upstream_turns, wait_for

NATIVE = {"X-Toolcall-Module": "native"}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
          "required": ["city"]}
OPENAI_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.", "parameters": SCHEMA}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Current weather for a city.",
                    "input_schema": SCHEMA}]
FENCE_WORDS = ("```", "tool_call", "# Tools", "Available tools")


def oai(proxy, headers=NATIVE):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0,
                         default_headers=headers)


def anth(proxy, headers=NATIVE):
    return anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0,
                               default_headers=headers)


def system_text(call):
    system = call.get("system") or []
    return system if isinstance(system, str) else " ".join(b.get("text", "") for b in system)


def user_text(call):
    out = []
    for m in call["messages"]:
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(b.get("text", "") for b in content if isinstance(b, dict))
    return "\n".join(out)


@pytest.fixture(scope="module")
def native_proxy(make_proxy):
    """Native as the configured default handler, and no warm pool: every CLI process it starts
    belongs to a request, so none may be left once the request is answered."""
    return make_proxy(CLAUDE_PROXY_TOOLCALL_MODULE="native", CLAUDE_PROXY_POOL_SIZE=0)


# -- the request upstream ----------------------------------------------------------------------

def test_tools_reach_upstream_as_real_tools_openai(proxy, upstream):
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", {"city": "Paris"}))
    r = oai(proxy).chat.completions.create(
        model="sonnet", tools=OPENAI_TOOLS,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Weather in Paris?"}])
    assert len(upstream.model_calls) == 1          # the turn stopped: nothing was executed
    call = upstream.model_calls[0]
    assert call["tools"] == [{"name": "mcp__client__get_weather",
                              "description": "Current weather for a city.", "input_schema": SCHEMA}]
    system = system_text(call)
    assert "Be brief." in system
    assert not [w for w in FENCE_WORDS if w in system], system
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [tc] = choice.message.tool_calls
    assert tc.type == "function" and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris"}
    assert tc.id == "call_fake01"
    assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 7


def test_emulated_mode_is_unchanged(proxy, upstream):
    """Without the header the default handler still describes tools in the prompt."""
    upstream.push(fake_upstream.text("No call needed."))
    oai(proxy, headers={}).chat.completions.create(
        model="sonnet", tools=OPENAI_TOOLS, messages=[{"role": "user", "content": "hi"}])
    call = upstream.model_calls[-1]
    assert call["tools"] == []
    assert "```tool_call" in system_text(call)


# -- tool calls back to the client -------------------------------------------------------------

def test_openai_stream_streams_argument_deltas(proxy, upstream):
    args = {"city": "Paris", "unit": "celsius", "note": "x" * 40}
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", args, chunks=5))
    stream = oai(proxy).chat.completions.create(
        model="sonnet", tools=OPENAI_TOOLS, stream=True,
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    deltas, finish, head = [], None, None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        for tc in c.delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                head = tc
            if tc.function and tc.function.arguments:
                deltas.append(tc.function.arguments)
        finish = c.finish_reason or finish
    assert head is not None and head.function.name == "get_weather" and head.id == "call_fake01"
    assert len(deltas) >= 5, deltas                  # streamed as they came, not in one piece
    assert json.loads("".join(deltas)) == args
    assert finish == "tool_calls"
    assert len(upstream.model_calls) == 1


def test_anthropic_stream_input_json_delta(proxy, upstream):
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", {"city": "Paris"},
                                         before="Let me check.", chunks=3))
    with anth(proxy).messages.stream(
            model="sonnet", max_tokens=512, tools=ANTHROPIC_TOOLS,
            messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["text", "tool_use"]
    assert starts[1].name == "get_weather" and starts[1].id == "toolu_fake01"
    partial = [e.delta.partial_json for e in events
               if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(partial) >= 3 and json.loads("".join(partial)) == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    assert final.content[0].text == "Let me check."
    assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Paris"}
    assert len(upstream.model_calls) == 1


def test_anthropic_non_stream_tool_use_block(proxy, upstream):
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", {"city": "Oslo"}))
    m = anth(proxy).messages.create(model="sonnet", max_tokens=512, tools=ANTHROPIC_TOOLS,
                                    messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert m.stop_reason == "tool_use"
    [block] = m.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Oslo"}
    assert len(upstream.model_calls) == 1


def test_parallel_calls_are_not_cut_off(proxy, upstream):
    """The CLI asks can_use_tool as soon as the first tool_use block ends; the proxy holds the
    answer until the message ends, so the second call (still streaming) arrives whole."""
    upstream.push(fake_upstream.Reply(blocks=[
        {"type": "tool_use", "id": "toolu_A", "name": "mcp__client__get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_B", "name": "mcp__client__get_weather", "input": {"city": "Rome"}}],
        stop_reason="tool_use", chunks=3, delay=0.1))
    r = oai(proxy).chat.completions.create(
        model="sonnet", tools=OPENAI_TOOLS, messages=[{"role": "user", "content": "Paris and Rome?"}])
    calls = r.choices[0].message.tool_calls
    assert [(c.id, json.loads(c.function.arguments)) for c in calls] == [
        ("call_A", {"city": "Paris"}), ("call_B", {"city": "Rome"})]
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(upstream.model_calls) == 1


def test_parallel_tool_calls_false_keeps_the_first(proxy, upstream):
    upstream.push(fake_upstream.Reply(blocks=[
        {"type": "tool_use", "id": "toolu_A", "name": "mcp__client__get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_B", "name": "mcp__client__get_weather", "input": {"city": "Rome"}}],
        stop_reason="tool_use"))
    r = oai(proxy).chat.completions.create(
        model="sonnet", tools=OPENAI_TOOLS, parallel_tool_calls=False,
        messages=[{"role": "user", "content": "Paris and Rome?"}])
    assert [c.id for c in r.choices[0].message.tool_calls] == ["call_A"]


# -- the next turn -----------------------------------------------------------------------------

def test_follow_up_with_tool_result_gets_final_answer_openai(proxy, upstream):
    upstream.push(fake_upstream.text("It is sunny in Paris, 22 C."))
    r = oai(proxy).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_fake01", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_fake01", "content": "sunny, 22 C, RESULT-MARKER-41"}])
    assert r.choices[0].message.content == "It is sunny in Paris, 22 C."
    assert r.choices[0].finish_reason == "stop"
    assert len(upstream.model_calls) == 1
    call = upstream.model_calls[0]
    assert upstream_turns(call) == [
        ("user", [{"type": "text", "text": "Weather in Paris?"}]),
        ("assistant", [{"type": "tool_use", "id": "toolu_fake01", "name": "mcp__client__get_weather",
                        "input": {"city": "Paris"}}]),
        ("user", [{"type": "tool_result", "tool_use_id": "toolu_fake01",
                   "content": [{"type": "text", "text": "sunny, 22 C, RESULT-MARKER-41"}]}])]
    assert call["tools"][0]["name"] == "mcp__client__get_weather"   # still offered natively
    assert "```tool_call" not in system_text(call) + user_text(call)
    assert "[tool call" not in user_text(call)


def test_follow_up_with_tool_result_anthropic_stream(proxy, upstream):
    upstream.push(fake_upstream.text("Oslo: rain.", chunks=3))
    with anth(proxy).messages.stream(model="sonnet", max_tokens=512, tools=ANTHROPIC_TOOLS,
                                     messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "rain RESULT-MARKER-77"}]}]}]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "end_turn" and final.content[0].text == "Oslo: rain."
    assert len(upstream.model_calls) == 1
    assert upstream_turns(upstream.model_calls[0])[1:] == [
        ("assistant", [{"type": "tool_use", "id": "toolu_1", "name": "mcp__client__get_weather",
                        "input": {"city": "Oslo"}}]),
        ("user", [{"type": "tool_result", "tool_use_id": "toolu_1",
                   "content": [{"type": "text", "text": "rain RESULT-MARKER-77"}]}])]


# -- tool_choice and names ---------------------------------------------------------------------

def test_tool_choice_none_offers_nothing(proxy, upstream):
    upstream.push(fake_upstream.text("Just text."))
    r = oai(proxy).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, tool_choice="none",
                                           messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Just text."
    call = upstream.model_calls[-1]
    assert call["tools"] == []
    assert not [w for w in FENCE_WORDS if w in system_text(call)]


def test_named_tool_choice_is_forced_upstream_with_every_tool_offered(proxy, upstream):
    other = {"type": "function", "function": {"name": "get_time", "description": "Time.",
                                              "parameters": {"type": "object", "properties": {}}}}
    upstream.push(fake_upstream.tool_use("mcp__client__get_time", {}))
    r = oai(proxy).chat.completions.create(
        model="sonnet", tools=OPENAI_TOOLS + [other],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        messages=[{"role": "user", "content": "hi"}])
    call = upstream.model_calls[-1]
    # forced upstream, so every tool stays offered (the same definitions as the other steps);
    # the CLI sends them sorted by name, whatever the client's order
    assert [t["name"] for t in call["tools"]] == ["mcp__client__get_time", "mcp__client__get_weather"]
    assert call["tool_choice"] == {"type": "tool", "name": "mcp__client__get_time"}
    assert "thinking" not in call                    # the API refuses a forced choice with it
    assert "MUST call the tool \"mcp__client__get_time\"" in system_text(call)
    [tc] = r.choices[0].message.tool_calls
    assert tc.function.name == "get_time" and tc.function.arguments == "{}"


def test_required_tool_choice_is_forced_upstream(proxy, upstream):
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", {"city": "Rome"}),
                  fake_upstream.tool_use("mcp__client__get_weather", {"city": "Rome"}),
                  fake_upstream.text("auto again"))
    anth(proxy).messages.create(model="sonnet", max_tokens=256, tools=ANTHROPIC_TOOLS,
                                tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "hi"}])
    call = upstream.model_calls[-1]
    assert call["tool_choice"] == {"type": "any"}
    assert "thinking" not in call
    assert "MUST call at least one" in system_text(call)
    oai(proxy).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, tool_choice="required",
                                       parallel_tool_calls=False,
                                       messages=[{"role": "user", "content": "hi"}])
    assert upstream.model_calls[-1]["tool_choice"] == {"type": "any",
                                                      "disable_parallel_tool_use": True}
    oai(proxy).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS,
                                       messages=[{"role": "user", "content": "hi"}])
    call = upstream.model_calls[-1]
    assert "tool_choice" not in call and call["thinking"]    # auto: nothing forced, thinking on


def test_required_with_thinking_shown_stays_an_instruction(proxy, upstream):
    """The API refuses a forced tool_choice with thinking on: a client that wants to see the
    thinking gets the instruction instead, and every tool stays offered only when forced."""
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", {"city": "Rome"}))
    anth(proxy).messages.create(model="sonnet", max_tokens=2048, tools=ANTHROPIC_TOOLS,
                                tool_choice={"type": "any"},
                                thinking={"type": "enabled", "budget_tokens": 1024},
                                messages=[{"role": "user", "content": "hi"}])
    call = upstream.model_calls[-1]
    assert "tool_choice" not in call and call["thinking"]
    assert "MUST call at least one" in system_text(call)


def test_names_the_cli_would_rewrite_are_mapped_back(proxy, upstream):
    dotted = {"type": "function", "function": {"name": "weather.get:v2", "description": "Dotted.",
                                               "parameters": SCHEMA}}
    long_name = "t" * 120                            # over the CLI's 128-character limit
    longer = {"type": "function", "function": {"name": long_name, "description": "Long.",
                                               "parameters": SCHEMA}}
    upstream.responder = lambda body: fake_upstream.Reply(blocks=[
        {"type": "tool_use", "id": "toolu_%d" % i, "name": t["name"], "input": {"city": "Nice"}}
        for i, t in enumerate(body["tools"])], stop_reason="tool_use")
    r = oai(proxy).chat.completions.create(model="sonnet", tools=[dotted, longer],
                                           messages=[{"role": "user", "content": "hi"}])
    names = {t["name"] for t in upstream.model_calls[-1]["tools"]}
    assert "mcp__client__weather_get_v2" in names
    [shortened] = names - {"mcp__client__weather_get_v2"}
    assert len(shortened) <= 128 and shortened.startswith("mcp__client__ttt")
    assert sorted(c.function.name for c in r.choices[0].message.tool_calls) == \
        sorted([long_name, "weather.get:v2"])


def test_schema_without_type_is_offered(proxy, upstream):
    """One inputSchema without "type" makes the CLI drop every tool; the proxy adds it."""
    upstream.push(fake_upstream.text("ok"))
    anth(proxy).messages.create(model="sonnet", max_tokens=256, tools=[
        {"name": "loose", "description": "No type.", "input_schema": {"properties": {"a": {"type": "string"}}}}],
        messages=[{"role": "user", "content": "hi"}])
    [tool] = upstream.model_calls[-1]["tools"]
    assert tool["name"] == "mcp__client__loose" and tool["input_schema"]["type"] == "object"


# -- default handler, process lifetime ---------------------------------------------------------

def test_default_handler_native_and_no_cli_left_behind(native_proxy, upstream):
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", {"city": "Paris"}))
    status, _, body = native_proxy.post("/v1/chat/completions", {
        "model": "sonnet", "tools": OPENAI_TOOLS, "stream": True,
        "messages": [{"role": "user", "content": "Weather in Paris?"}]})
    assert status == 200
    chunks = [json.loads(d) for _, d in sse_events(body) if d != "[DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(upstream.model_calls) == 1 and upstream.model_calls[0]["tools"]
    deadline = time.time() + 3
    while children(native_proxy.proc.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert children(native_proxy.proc.pid) == []


def test_unknown_tool_from_model_still_stops_the_turn(native_proxy, upstream):
    """A name the CLI does not know gets no can_use_tool: the CLI answers it with an error itself
    and goes on to a second upstream call that an interrupt request does not stop.  The proxy
    hands the call over at the end of the first message; whatever follows is not the answer.
    (Whether that second call reaches upstream before the process is killed is a race.)"""
    upstream.push(fake_upstream.tool_use("mcp__client__nope", {"x": 1}),
                  fake_upstream.text("SECOND TURN"))
    r = oai(native_proxy, headers={}).chat.completions.create(
        model="sonnet", tools=OPENAI_TOOLS, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "nope"
    assert "SECOND TURN" not in (r.choices[0].message.content or "")
    assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 7


def test_responses_api_streams_native_argument_deltas(proxy, upstream):
    """The Responses dialect keeps a native call's item open while its arguments stream."""
    args = {"city": "Paris, France"}
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", args, chunks=4))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with client.responses.stream(
            model="sonnet", input="weather in Paris?",
            tools=[{"type": "function", "name": "get_weather", "parameters": SCHEMA}],
            extra_headers=NATIVE) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()
    deltas = kinds.count("response.function_call_arguments.delta")
    assert deltas >= 2, kinds
    assert kinds.index("response.function_call_arguments.done") > kinds.index(
        "response.function_call_arguments.delta")
    call = [o for o in final.output if o.type == "function_call"][0]
    assert call.name == "get_weather" and json.loads(call.arguments) == args



# -- real tool turns ---------------------------------------------------------------------------
# The conversation's earlier tool calls and results reach the upstream as the real turns the
# model made and the client answered: tool_use blocks under the MCP names the model sees, with
# the ids the upstream gave them (call_X handed out for toolu_X is mapped back), parallel results
# in one user turn, tool_result first in its turn, is_error and images inside the result.

def TEXT(text):
    return {"type": "text", "text": text}


AGENT_LOOP = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_A1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "call_B2", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
    {"role": "tool", "tool_call_id": "call_A1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_B2", "content": "rain"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_C3", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_C3", "content": "snow"}]

AGENT_TURNS = [
    ("user", [{"type": "text", "text": "Weather in Paris and Rome?"}]),
    ("assistant", [{"type": "text", "text": "Checking."},
                   {"type": "tool_use", "id": "toolu_A1", "name": "mcp__client__get_weather",
                    "input": {"city": "Paris"}},
                   {"type": "tool_use", "id": "toolu_B2", "name": "mcp__client__get_weather",
                    "input": {"city": "Rome"}}]),
    ("user", [{"type": "tool_result", "tool_use_id": "toolu_A1", "content": [TEXT("sunny")]},
              {"type": "tool_result", "tool_use_id": "toolu_B2", "content": [TEXT("rain")]}]),
    ("assistant", [{"type": "tool_use", "id": "toolu_C3", "name": "mcp__client__get_weather",
                    "input": {"city": "Oslo"}}]),
    ("user", [{"type": "tool_result", "tool_use_id": "toolu_C3", "content": [TEXT("snow")]}])]


def test_history_reaches_upstream_as_real_tool_turns_openai(proxy, upstream):
    upstream.push(fake_upstream.text("Sunny, rain, snow."))
    r = oai(proxy).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=AGENT_LOOP)
    assert r.choices[0].message.content == "Sunny, rain, snow."
    [call] = upstream.model_calls                     # history given without an upstream call
    assert upstream_turns(call) == AGENT_TURNS
    assert [m["role"] for m in call["messages"] if m["role"] != "system"] == \
        ["user", "assistant", "user", "assistant", "user"]


def test_history_real_turns_anthropic_error_image_and_text(proxy, upstream):
    """Anthropic ids are the upstream's own; a result with text and an image keeps the image
    inside it, is_error goes through, and text sent with results follows them."""
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5"
           "ErkJggg==")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
    upstream.push(fake_upstream.text("Done."))
    anth(proxy).messages.create(model="sonnet", max_tokens=256, tools=ANTHROPIC_TOOLS, messages=[
        {"role": "user", "content": "Two cities."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_X", "name": "get_weather", "input": {"city": "A"}},
            {"type": "tool_use", "id": "toolu_Y", "name": "get_weather", "input": {"city": "B"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_X",
             "content": [{"type": "text", "text": "map of A"}, image]},
            {"type": "tool_result", "tool_use_id": "toolu_Y", "content": "no such city",
             "is_error": True}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B failed."}]},
        {"role": "user", "content": "Fine, thanks."}])
    [call] = upstream.model_calls
    assert upstream_turns(call) == [
        ("user", [{"type": "text", "text": "Two cities."}]),
        ("assistant", [{"type": "tool_use", "id": "toolu_X", "name": "mcp__client__get_weather",
                        "input": {"city": "A"}},
                       {"type": "tool_use", "id": "toolu_Y", "name": "mcp__client__get_weather",
                        "input": {"city": "B"}}]),
        ("user", [{"type": "tool_result", "tool_use_id": "toolu_X",
                   "content": [{"type": "text", "text": "map of A"}, image]},
                  {"type": "tool_result", "tool_use_id": "toolu_Y", "content": "no such city",
                   "is_error": True}]),
        ("assistant", [{"type": "text", "text": "B failed."}]),
        ("user", [{"type": "text", "text": "Fine, thanks."}])]


def test_history_real_turns_responses_and_rewritten_names(proxy, upstream):
    """Responses function_call items; a name the CLI would rewrite is the same MCP name in the
    tool list and in the history."""
    upstream.push(fake_upstream.text("ok"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    client.responses.create(model="sonnet", extra_headers=NATIVE, tools=[
        {"type": "function", "name": "weather.get", "parameters": SCHEMA}], input=[
        {"role": "user", "content": "Paris?"},
        {"type": "function_call", "call_id": "call_9z", "name": "weather.get",
         "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_9z", "output": "sunny"},
        {"role": "user", "content": "And now?"}])
    [call] = upstream.model_calls
    assert [t["name"] for t in call["tools"]] == ["mcp__client__weather_get"]
    assert upstream_turns(call)[1:] == [
        ("assistant", [{"type": "tool_use", "id": "toolu_9z", "name": "mcp__client__weather_get",
                        "input": {"city": "Paris"}}]),
        ("user", [{"type": "tool_result", "tool_use_id": "toolu_9z", "content": [TEXT("sunny")]},
                  {"type": "text", "text": "And now?"}])]


def test_agent_loop_steps_share_their_prefix(proxy, upstream):
    """Step N+1 of an agent loop begins with step N's conversation, unchanged: same system
    prompt, same tool definitions, same blocks (but for the CLI's own system messages)."""
    upstream.push(fake_upstream.tool_use("mcp__client__get_weather", {"city": "Oslo"}, id="toolu_s2"),
                  fake_upstream.text("done"))
    client = oai(proxy)
    step = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=AGENT_LOOP[:4])
    tc = step.choices[0].message.tool_calls[0]
    assert tc.id == "call_s2"
    client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=AGENT_LOOP[:4] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": tc.id, "type": "function",
             "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
        {"role": "tool", "tool_call_id": tc.id, "content": "snow"}])
    first, second = upstream.model_calls
    assert first["system"] == second["system"] and first["tools"] == second["tools"]
    before, after = upstream_turns(first), upstream_turns(second)
    assert after[:len(before)] == before
    assert after[len(before):] == [
        ("assistant", [{"type": "tool_use", "id": "toolu_s2", "name": "mcp__client__get_weather",
                        "input": {"city": "Oslo"}}]),
        ("user", [{"type": "tool_result", "tool_use_id": "toolu_s2", "content": [TEXT("snow")]}])]


def test_tool_choice_none_keeps_history_as_text(proxy, upstream):
    """With no tools offered the upstream would refuse tool blocks: the history stays records."""
    upstream.push(fake_upstream.text("Summary."))
    oai(proxy).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, tool_choice="none",
                                       messages=AGENT_LOOP)
    [call] = upstream.model_calls
    assert call["tools"] == []
    assert not [b for _, blocks in upstream_turns(call) for b in blocks
                if b["type"] in ("tool_use", "tool_result")]
    assert "[tool result id=" in user_text(call) and "call_C3" in user_text(call)


# -- no handshake on the request path ----------------------------------------------------------

def test_initialize_carries_the_mcp_handshake(upstream, home):
    """The pinned CLI takes the MCP server's initialize and tools/list answers from initialize
    (sdkMcpServerManifests, "parked") and asks nothing over the control channel before the
    model's first token; the tools still reach the upstream."""
    import claude_openai_proxy as P
    from conftest import base_env, real_claude_bin
    cfg = P.load_config(["--port", "1"], base_env(home, upstream.url, real_claude_bin()))[0]
    req = P.Request(model="sonnet", cli_model="sonnet", messages=[], tools=[
        P.ToolSpec("get_weather", "Current weather for a city.", SCHEMA)],
        handler=P.HANDLERS["native"])
    upstream.push(fake_upstream.text("Hi there."))
    proc = P.CLIProcess(cfg, P.Launch(), str(home))
    try:
        proc.send(P.control("init", P.init_request(req, P.ToolBridge(req))),
                  P.user_line([{"type": "text", "text": "hi"}]))
        asked, parked = [], None

        class Call:
            def check(self):
                pass
            maybe_check = check
        for item in proc.read(Call()):
            if not isinstance(item, dict):
                continue
            if item.get("type") == "control_request":
                asked.append(item["request"].get("subtype"))
                P.refuse(proc, item["request_id"])
            elif item.get("type") == "control_response":
                parked = item["response"]["response"].get("sdk_mcp_manifests_parked")
            elif item.get("type") in ("stream_event", "result"):
                break
        assert parked == {"client": "parked"}
        assert asked == []
    finally:
        proc.close()
    [tool] = upstream.model_calls[0]["tools"]
    assert tool["name"] == "mcp__client__get_weather" and tool["input_schema"] == SCHEMA


def test_same_tools_again_get_a_process_initialized_ahead(make_proxy, upstream):
    """An agent's second and later steps (same system prompt, same tools) find a pool process
    that already got their initialize, MCP set-up included."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=2)
    upstream.default = fake_upstream.tool_use("mcp__client__get_weather", {"city": "Paris"})
    client = oai(p)
    for i in range(4):
        # two ready processes; from the third step on (two requests with the same system
        # prompt seen) one of them has been given that initialize ahead
        wait_for(lambda: (lambda h: h if h["ready"] >= 2 and (
            i < 2 or h["idle"]["initialized"] >= 1) else None)(p.health()["idle"]),
            "the pool to be ready (initialized ahead from step 3)", timeout=30)
        r = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=[
            {"role": "system", "content": "Agent."}, {"role": "user", "content": "Paris?"}])
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    pool = p.request("GET", "/health")[2]["idle"]
    assert pool["hits"]["initialized"] >= 1, pool
    assert pool["start_failures"] == 0, pool
    assert all(c["tools"][0]["name"] == "mcp__client__get_weather" for c in upstream.model_calls)


# -- kept native conversations: the first call held open ---------------------------------------
# A native turn that ends in tool calls (from a conversation's second request on) keeps its
# process with the CLI's tools/call for the first call unanswered; the next request, bringing
# exactly the results of those calls, answers it there and the model goes on in the same turn.

from test_pool import alive, health, poll, wait_gone  # noqa: E402
from test_sessions import without_cache_marks  # noqa: E402


@pytest.fixture
def kept_proxy(make_proxy):
    p = make_proxy(CLAUDE_PROXY_TOOLCALL_MODULE="native", CLAUDE_PROXY_POOL_SIZE=0,
                   CLAUDE_PROXY_SESSION_IDLE=5)
    yield p
    p.stop()


SEED_TURNS = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!"},
              {"role": "user", "content": "Weather in Paris and Rome?"}]


def two_calls(upstream):
    upstream.push(fake_upstream.Reply(blocks=[
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_P1", "name": "mcp__client__get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_R2", "name": "mcp__client__get_weather", "input": {"city": "Rome"}}],
        stop_reason="tool_use"))


def answered(r, results, errors=()):
    """The conversation after the answer `r`, plus one tool message per call."""
    msg = r.choices[0].message
    out = SEED_TURNS + [{"role": "assistant", "content": msg.content, "tool_calls": [
        {"id": c.id, "type": "function",
         "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in msg.tool_calls]}]
    return out + [{"role": "tool", "tool_call_id": c.id, "content": res}
                  for c, res in zip(msg.tool_calls, results)]


def test_held_turn_continues_with_parallel_results(kept_proxy, upstream):
    p = kept_proxy
    two_calls(upstream)
    client = oai(p)
    r = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=SEED_TURNS)
    assert [c.id for c in r.choices[0].message.tool_calls] == ["call_P1", "call_R2"]
    poll(lambda: health(p)["idle"]["idle"]["kept"] == 1, "the held turn to be kept")
    (pid,) = children(p.proc.pid)
    upstream.push(fake_upstream.text("Paris sunny, Rome rain."))
    r2 = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS,
                                        messages=answered(r, ["sunny", "rain"]))
    assert r2.choices[0].message.content == "Paris sunny, Rome rain."
    h = health(p)
    assert h["idle"]["hits"]["kept"] == 1 and h["cli_processes_started"] == 1
    assert children(p.proc.pid) == [pid]                  # the same process, kept again
    first, second = upstream.model_calls
    # the next request is the previous one, unchanged, plus the model's calls and the results
    before = without_cache_marks(first["messages"])
    after = without_cache_marks(second["messages"])
    assert after[:len(before)] == before
    assert [m for m in after[len(before):] if m["role"] != "system"] == [
        {"role": "assistant", "content": [
            TEXT("Checking both."),
            {"type": "tool_use", "id": "toolu_P1", "name": "mcp__client__get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_R2", "name": "mcp__client__get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_P1", "content": [TEXT("sunny")]},
            {"type": "tool_result", "tool_use_id": "toolu_R2", "content": [TEXT("rain")]}]}]
    assert first["tools"] == second["tools"] and first["system"] == second["system"]


def test_held_and_new_process_send_the_same_turns(kept_proxy, make_proxy, upstream):
    """An error result and an image: the kept process (answered tools/call) and a new process
    given the same conversation as history send the same turns upstream."""
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5"
           "ErkJggg==")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
    tools = [{"name": "get_weather", "description": "Current weather for a city.", "input_schema": SCHEMA}]
    seed = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Paris and Rome?"}]
    two_calls(upstream)
    m = anth(kept_proxy).messages.create(model="sonnet", max_tokens=256, tools=tools, messages=seed)
    conversation = seed + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_P1",
             "content": [{"type": "text", "text": "map"}, image]},
            {"type": "tool_result", "tool_use_id": "toolu_R2", "content": "no such city",
             "is_error": True}]}]
    upstream.push(fake_upstream.text("done"))
    anth(kept_proxy).messages.create(model="sonnet", max_tokens=256, tools=tools, messages=conversation)
    assert health(kept_proxy)["idle"]["hits"]["kept"] == 1
    fresh = make_proxy(CLAUDE_PROXY_TOOLCALL_MODULE="native", CLAUDE_PROXY_SESSIONS=0)
    upstream.push(fake_upstream.text("done"))
    anth(fresh).messages.create(model="sonnet", max_tokens=256, tools=tools, messages=conversation)
    kept, new = upstream.model_calls[1], upstream.model_calls[2]
    assert upstream_turns(kept) == upstream_turns(new)
    assert upstream_turns(kept)[-1] == ("user", [
        {"type": "tool_result", "tool_use_id": "toolu_P1", "content": [TEXT("map"), image]},
        {"type": "tool_result", "tool_use_id": "toolu_R2", "content": "no such city", "is_error": True}])


@pytest.mark.parametrize("edit", ["earlier message", "one result missing", "text with the results"])
def test_held_turn_with_another_history_is_a_new_conversation(kept_proxy, upstream, edit):
    p = kept_proxy
    two_calls(upstream)
    client = oai(p)
    r = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=SEED_TURNS)
    poll(lambda: health(p)["idle"]["idle"]["kept"] == 1, "the held turn to be kept")
    (held,) = children(p.proc.pid)
    messages = answered(r, ["sunny", "rain"])
    if edit == "earlier message":
        messages[0] = {"role": "user", "content": "Hello, edited."}
    elif edit == "one result missing":
        messages = messages[:-1]
    else:
        messages.append({"role": "user", "content": "Be brief."})
    upstream.push(fake_upstream.text("fresh answer"))
    r2 = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=messages)
    assert r2.choices[0].message.content == "fresh answer"
    h = health(p)
    assert h["idle"]["hits"]["kept"] == 0 and h["cli_processes_started"] == 2
    turns = upstream_turns(upstream.model_calls[-1])
    assert turns[0][1] == [TEXT(messages[0]["content"])]
    assert turns[3][0] == "assistant" and len([b for b in turns[3][1] if b["type"] == "tool_use"]) == 2
    if edit != "earlier message":
        wait_gone([held])           # its results came: the held process is no use any more
    if edit == "text with the results":
        assert turns[4][1][-1] == TEXT("Be brief.")


def test_client_never_comes_back_held_process_ends(make_proxy, upstream):
    """CLAUDE_PROXY_SESSION_IDLE is the deadline of a held call: the process is ended, its slot
    was freed when the answer went out, and nothing is left."""
    p = make_proxy(CLAUDE_PROXY_TOOLCALL_MODULE="native", CLAUDE_PROXY_POOL_SIZE=0,
                   CLAUDE_PROXY_SESSION_IDLE=2)        # kept_proxy's, with 2 s to wait out, not 5
    two_calls(upstream)
    oai(p).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=SEED_TURNS)
    assert health(p)["concurrency"]["running"] == 0
    pids = children(p.proc.pid)
    assert len(pids) == 1
    wait_gone(pids, timeout=20)
    poll(lambda: health(p)["idle"]["idle"]["kept"] == 0, "the held session to be forgotten")


def test_shutdown_while_a_call_is_held(make_proxy, upstream):
    p = make_proxy(CLAUDE_PROXY_TOOLCALL_MODULE="native", CLAUDE_PROXY_POOL_SIZE=0)
    two_calls(upstream)
    oai(p).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=SEED_TURNS)
    pids = children(p.proc.pid)
    assert len(pids) == 1 and all(alive(x) for x in pids)
    p.proc.send_signal(signal.SIGTERM)
    p.proc.wait(timeout=30)
    wait_gone(pids)


def test_kept_agent_loop_each_request_extends_the_one_before(kept_proxy, upstream):
    """Steps 2, 3, 4 of an agent loop on the held process: each upstream request is the one
    before it, unchanged (cache marks aside), plus one call and its result."""
    client, messages = oai(kept_proxy), list(SEED_TURNS)
    for i in range(4):
        reply = fake_upstream.tool_use("mcp__client__get_weather", {"city": "C%d" % i},
                                       id="toolu_loop%d" % i)
        reply.id = "msg_loop%d" % i                 # one CLI turn: its messages' ids differ
        upstream.push(reply)
        r = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=messages)
        [tc] = r.choices[0].message.tool_calls
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": tc.id, "type": "function",
             "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
            {"role": "tool", "tool_call_id": tc.id, "content": "result %d" % i}]
    assert health(kept_proxy)["idle"]["hits"]["kept"] == 3
    calls = [without_cache_marks(c["messages"]) for c in upstream.model_calls]
    for i, (before, after) in enumerate(zip(calls, calls[1:])):
        assert after[:len(before)] == before, i
        assert after[len(before):] == [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_loop%d" % i,
                                               "name": "mcp__client__get_weather",
                                               "input": {"city": "C%d" % i}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_loop%d" % i,
                                          "content": [TEXT("result %d" % i)]}]}]


@pytest.mark.parametrize("case", ["parallel_tool_calls false", "unknown tool"])
def test_a_turn_the_proxy_had_to_stop_is_not_kept(kept_proxy, upstream, case):
    """A call dropped (parallel_tool_calls: false) or rejected by the CLI itself leaves the
    process with history the client does not have: denied and ended, never kept."""
    p, extra = kept_proxy, {}
    if case == "unknown tool":
        upstream.push(fake_upstream.tool_use("mcp__client__nope", {"x": 1}), fake_upstream.text("2nd"))
    else:
        two_calls(upstream)
        extra = {"parallel_tool_calls": False}
    r = oai(p).chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=SEED_TURNS,
                                       **extra)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    wait_gone(children(p.proc.pid))
    assert health(p)["idle"]["idle"]["kept"] == 0


def test_each_step_of_a_held_turn_reports_its_own_usage(kept_proxy, upstream):
    """The steps of a held turn are one CLI turn, whose result line adds up all of them; each
    request reports only its own upstream message (else the last step would count the whole
    loop again, and clients that size their context from input_tokens would think it full)."""
    client, messages = oai(kept_proxy), list(SEED_TURNS)
    for i, tokens in enumerate((100, 200, 300)):
        if i < 2:
            reply = fake_upstream.tool_use("mcp__client__get_weather", {"city": "U%d" % i},
                                           id="toolu_use%d" % i)
        else:
            reply = fake_upstream.text("All done.")
        reply.id, reply.usage = "msg_use%d" % i, {"input_tokens": tokens, "output_tokens": 5 + i}
        upstream.push(reply)
        r = client.chat.completions.create(model="sonnet", tools=OPENAI_TOOLS, messages=messages)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (tokens, 5 + i), (i, r.usage)
        if i < 2:
            [tc] = r.choices[0].message.tool_calls
            messages += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": tc.id, "type": "function",
                 "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
                {"role": "tool", "tool_call_id": tc.id, "content": "result %d" % i}]
    assert r.choices[0].message.content == "All done."
    assert health(kept_proxy)["idle"]["hits"]["kept"] == 2, "steps 2 and 3 continued the turn"
