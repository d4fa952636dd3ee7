"""Every OpenAI tool type, on /v1/responses and chat completions, in both tool modes (real CLI,
fake upstream, the official openai SDK's types as the spec).

namespace tools offer the function tools inside them (the model sees NAMESPACE.name) and their
calls come back as function_call items carrying `namespace`; custom tools (free-form input,
optional grammar) come back as custom_tool_call items / chat `custom` tool calls with the raw
input; OpenAI's hosted tools are left out when the client can work without them and refused
with a 400 that says what to do when it cannot.
"""
import json

import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseStreamEvent

import fake_upstream
from conftest import sse_events, upstream_turns

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
NATIVE = {"X-Toolcall-Module": "native"}
EXEC = {"type": "function", "name": "exec_command", "description": "Run a shell command.",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                       "required": ["cmd"]}}
AGENTS = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
          "tools": [{"type": "function", "name": "spawn_agent", "description": "Start one.",
                     "parameters": {"type": "object", "properties": {"task": {"type": "string"}},
                                    "required": ["task"]}}]}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch.",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: \"*** Begin Patch\" /(.|\\n)*/"}}
OPTIONAL_SEARCH = {"type": "web_search", "external_web_access": False}
CODEX_LIKE = [EXEC, AGENTS, OPTIONAL_SEARCH, PATCH]
PATCH_TEXT = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"


def fence(name, arguments):
    return "```tool_call\n%s\n```" % json.dumps({"name": name, "arguments": arguments})


@pytest.fixture(scope="module")
def client(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def native(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0,
                         default_headers=NATIVE)


def system_text(call):
    return " ".join(b["text"] for b in call["system"])


# -- Responses, emulated tools ------------------------------------------------------------------

def test_namespace_call_comes_back_with_its_namespace(client, upstream):
    upstream.push(fake_upstream.text(fence("multi_agent_v1.spawn_agent", {"task": "lint"})))
    raw = client.responses.with_raw_response.create(model="sonnet", input="lint it",
                                                    tools=CODEX_LIKE)
    body = json.loads(raw.text)
    resp = Response.model_validate(body)
    (fc,) = [item for item in resp.output if item.type == "function_call"]
    assert (fc.name, fc.namespace, json.loads(fc.arguments)) == (
        "spawn_agent", "multi_agent_v1", {"task": "lint"})
    offered = system_text(upstream.model_calls[-1])
    assert "multi_agent_v1.spawn_agent" in offered and "exec_command" in offered
    assert "apply_patch" in offered and "lark grammar" in offered
    assert "web_search" not in offered                # optional, cached-only: left out
    assert upstream.model_calls[-1]["tools"] == []
    assert body["tools"] == CODEX_LIKE                # echoed as sent

    # the call goes back as history with its namespace, and its output after it
    upstream.push(fake_upstream.text("Spawned."))
    again = client.responses.create(model="sonnet", tools=CODEX_LIKE, input=[
        {"role": "user", "content": "lint it"}, fc.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": fc.call_id, "output": "agent 7"}])
    assert again.output_text == "Spawned."
    history = json.dumps(upstream_turns(upstream.model_calls[-1]))
    assert "multi_agent_v1.spawn_agent" in history and "agent 7" in history


def test_custom_tool_call_and_its_output(client, upstream):
    upstream.push(fake_upstream.text(fence("apply_patch", {"input": PATCH_TEXT})))
    resp = client.responses.create(model="sonnet", input="add a.txt", tools=CODEX_LIKE)
    (ctc,) = [item for item in resp.output if item.type == "custom_tool_call"]
    assert ctc.name == "apply_patch" and ctc.input == PATCH_TEXT and ctc.call_id.startswith("call_")

    upstream.push(fake_upstream.text("Done."))
    again = client.responses.create(model="sonnet", tools=CODEX_LIKE, input=[
        {"role": "user", "content": "add a.txt"}, ctc.model_dump(exclude_none=True),
        {"type": "custom_tool_call_output", "call_id": ctc.call_id, "output": "Success. A a.txt"}])
    assert again.output_text == "Done."
    history = json.dumps(upstream_turns(upstream.model_calls[-1]))
    assert "Success. A a.txt" in history and "Begin Patch" in history


def test_custom_tool_call_streams_its_input(client, upstream):
    upstream.push(fake_upstream.text(fence("apply_patch", {"input": PATCH_TEXT})))
    with client.responses.stream(model="sonnet", input="add a.txt", tools=[PATCH]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [ev.type for ev in events]
    assert "response.custom_tool_call_input.delta" in kinds
    assert "response.custom_tool_call_input.done" in kinds
    assert "".join(ev.delta for ev in events
                   if ev.type == "response.custom_tool_call_input.delta") == PATCH_TEXT
    (item,) = [i for i in final.output if i.type == "custom_tool_call"]
    assert item.input == PATCH_TEXT and item.status == "completed"


def test_hosted_tools_the_client_needs_are_a_clear_400(client, upstream):
    for tool, words in ((({"type": "file_search", "vector_store_ids": ["vs_1"]}), "vector stores"),
                        ({"type": "code_interpreter", "container": {"type": "auto"}}, "container"),
                        ({"type": "mcp", "server_label": "x", "server_url": "https://x"}, "MCP"),
                        ({"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                          "environment": "linux"}, "computer use")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model="sonnet", input="hi", tools=[EXEC, tool])
        assert exc.value.body["param"] == "tools[1]"
        assert tool["type"] in exc.value.body["message"] or words in exc.value.body["message"]
        assert words in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:       # required by tool_choice
        client.responses.create(model="sonnet", input="hi", tools=[EXEC],
                                tool_choice={"type": "file_search"})
    assert exc.value.body["param"] == "tool_choice"
    assert "file_search" in exc.value.body["message"]
    assert upstream.model_calls == []


def test_optional_hosted_tools_do_not_break_a_request(client, upstream):
    upstream.push(fake_upstream.text("Plain answer."))
    resp = client.responses.create(model="sonnet", input="hi", tools=[
        OPTIONAL_SEARCH, {"type": "image_generation"}, {"type": "tool_search"}],
        tool_choice={"type": "web_search_preview"})   # the model decides: the CLI cannot force it
    assert resp.output_text == "Plain answer."
    assert "# Tools" not in system_text(upstream.model_calls[-1])
    assert upstream.model_calls[-1]["tools"] == []      # cached-only search: nothing live


# -- Responses, native tools --------------------------------------------------------------------

def test_native_namespace_and_custom_calls(native, upstream):
    upstream.push(fake_upstream.Reply(blocks=[
        {"type": "tool_use", "id": "toolu_ns1", "name": "mcp__client__multi_agent_v1_spawn_agent",
         "input": {"task": "lint"}},
        {"type": "tool_use", "id": "toolu_cu1", "name": "mcp__client__apply_patch",
         "input": {"input": PATCH_TEXT}}], stop_reason="tool_use", chunks=3))
    with native.responses.stream(model="sonnet", input="go", tools=CODEX_LIKE) as stream:
        for ev in stream:
            STREAM_EVENT.validate_python(ev.model_dump())
        final = stream.get_final_response()
    fc, ctc = [i for i in final.output if i.type != "message"]
    assert (fc.type, fc.name, fc.namespace) == ("function_call", "spawn_agent", "multi_agent_v1")
    assert json.loads(fc.arguments) == {"task": "lint"}
    assert (ctc.type, ctc.name, ctc.input) == ("custom_tool_call", "apply_patch", PATCH_TEXT)
    offered = {t["name"]: t for t in upstream.model_calls[0]["tools"]}
    assert {"mcp__client__exec_command", "mcp__client__multi_agent_v1_spawn_agent",
            "mcp__client__apply_patch"} <= set(offered)
    assert offered["mcp__client__apply_patch"]["input_schema"]["required"] == ["input"]
    assert not any("web_search" in name for name in offered)


# -- chat completions ----------------------------------------------------------------------------

CHAT_PATCH = {"type": "custom", "custom": {"name": "apply_patch", "description": "Apply a patch."}}


def test_chat_custom_tool_call(client, upstream):
    upstream.push(fake_upstream.text(fence("apply_patch", {"input": PATCH_TEXT})))
    raw = client.chat.completions.with_raw_response.create(
        model="sonnet", messages=[{"role": "user", "content": "add a.txt"}], tools=[CHAT_PATCH])
    resp = ChatCompletion.model_validate(json.loads(raw.text))
    (call,) = resp.choices[0].message.tool_calls
    assert call.type == "custom" and call.custom.name == "apply_patch"
    assert call.custom.input == PATCH_TEXT
    assert resp.choices[0].finish_reason == "tool_calls"

    # history: the assistant's custom call and the tool's result are accepted back
    upstream.push(fake_upstream.text("Patched."))
    again = client.chat.completions.create(model="sonnet", tools=[CHAT_PATCH], messages=[
        {"role": "user", "content": "add a.txt"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "custom", "custom": {"name": "apply_patch", "input": PATCH_TEXT}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Success."}])
    assert again.choices[0].message.content == "Patched."
    history = json.dumps(upstream_turns(upstream.model_calls[-1]))
    assert "Begin Patch" in history and "Success." in history


def test_chat_custom_tool_call_streaming(proxy, upstream):
    upstream.push(fake_upstream.text("One moment. " + fence("apply_patch", {"input": PATCH_TEXT}),
                                     chunks=5))
    status, _, text = proxy.post("/v1/chat/completions", {
        "model": "sonnet", "stream": True, "tools": [CHAT_PATCH],
        "messages": [{"role": "user", "content": "add"}]})
    assert status == 200
    chunks = [json.loads(d) for _, d in sse_events(text) if d != "[DONE]"]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls == [{"index": 0, "id": calls[0]["id"], "type": "custom",
                      "custom": {"name": "apply_patch", "input": PATCH_TEXT}}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_accepts_namespace_and_optional_hosted_tools(proxy, upstream):
    upstream.push(fake_upstream.text(fence("multi_agent_v1.spawn_agent", {"task": "x"})))
    status, _, body = proxy.post("/v1/chat/completions", {
        "model": "sonnet", "messages": [{"role": "user", "content": "go"}],
        "tools": [AGENTS, OPTIONAL_SEARCH]})
    assert status == 200, body
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "multi_agent_v1.spawn_agent"
    status, _, body = proxy.post("/v1/chat/completions", {
        "model": "sonnet", "messages": [{"role": "user", "content": "go"}],
        "tools": [{"type": "file_search"}]})
    assert status == 400 and "vector stores" in body["error"]["message"]
