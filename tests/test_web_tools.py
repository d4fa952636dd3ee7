"""Web search as a real tool: each dialect's web search runs as the CLI's own WebSearch tool
(real CLI, fake upstream), and comes back in the dialect's own shapes.

What this pins about the CLI (2.1.330): with `--tools WebSearch --allowedTools WebSearch` the
model's WebSearch tool_use makes the CLI send a nested upstream request offering Anthropic's
server tool web_search_20250305 with the user text "Perform a web search for the query: Q";
the answer goes back to the model as a tool_result beginning 'Web search results for query:
"Q"', and the CLI's stdout carries the sources in the user line's tool_use_result.
"""
import json
import subprocess
import sys

import anthropic
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseStreamEvent

import fake_upstream
from conftest import PROXY, base_env, sse_events

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
URL, TITLE = "https://example.org/kiwi", "Kiwi facts"
ANSWER = "Kiwis are flightless birds. Source: [%s](%s)" % (TITLE, URL)
CITED = ANSWER.index("[")


@pytest.fixture
def web(upstream):
    """The fake upstream as the model that searches once, then answers with a citation: the
    CLI's nested search request gets Anthropic's server-side search answer."""
    main = [fake_upstream.tool_use("WebSearch", {"query": "kiwi facts"}),
            fake_upstream.text(ANSWER)]

    def responder(body):
        if fake_upstream.offers_web_search(body):
            return fake_upstream.web_search_answer("kiwi facts", [{"url": URL, "title": TITLE}],
                                                   "Kiwis cannot fly (example.org).")
        return main.pop(0) if main else fake_upstream.text("unexpected extra call")
    upstream.responder = responder
    return upstream


def assert_searched(upstream):
    """The whole path reached 'Anthropic': the model was offered WebSearch, the CLI ran the
    nested server-side search, and the results went back to the model."""
    first, nested, last = upstream.model_calls
    assert "WebSearch" in [t["name"] for t in first["tools"]]
    assert "WebFetch" not in [t["name"] for t in first["tools"]]      # default: search only
    assert [t["type"] for t in nested["tools"]] == ["web_search_20250305"]
    assert "Perform a web search for the query: kiwi facts" in json.dumps(nested["messages"])
    assert 'Web search results for query: \\"kiwi facts\\"' in json.dumps(last["messages"])


def test_anthropic_server_tool_blocks_and_usage(proxy, web):
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=500, tools=[
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        messages=[{"role": "user", "content": "Tell me about kiwis."}])
    assert [b.type for b in msg.content] == ["server_tool_use", "web_search_tool_result", "text"]
    use, result, text = msg.content
    assert use.name == "web_search" and use.input == {"query": "kiwi facts"}
    assert result.tool_use_id == use.id
    assert [(r.url, r.title) for r in result.content] == [(URL, TITLE)]
    assert text.text == ANSWER
    assert msg.usage.server_tool_use.web_search_requests == 1
    assert_searched(web)


def test_anthropic_stream(proxy, web):
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=500, tools=[
            {"type": "web_search_20250305", "name": "web_search"}],
            messages=[{"role": "user", "content": "Tell me about kiwis."}]) as stream:
        msg = stream.get_final_message()
    assert [b.type for b in msg.content] == ["server_tool_use", "web_search_tool_result", "text"]
    assert msg.content[0].input == {"query": "kiwi facts"}
    assert msg.content[2].text == ANSWER
    assert msg.usage.server_tool_use.web_search_requests == 1


def test_responses_web_search_call_and_citation(proxy, web):
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = client.responses.with_raw_response.create(model="sonnet", input="Tell me about kiwis.",
                                                    tools=[{"type": "web_search"}])
    resp = Response.model_validate(json.loads(raw.text))
    search, message = resp.output
    assert search.type == "web_search_call" and search.status == "completed"
    assert search.action.query == "kiwi facts" and search.action.sources[0].url == URL
    assert resp.output_text == ANSWER
    (note,) = message.content[0].annotations
    assert (note.type, note.url, note.title, note.start_index, note.end_index) == (
        "url_citation", URL, TITLE, CITED, len(ANSWER))
    assert_searched(web)

    # the usual client loop sends the output back as input: the search item is accepted
    web.responder = None
    web.push(fake_upstream.text("You are welcome."))
    again = client.responses.create(model="sonnet", tools=[{"type": "web_search"}], input=[
        {"role": "user", "content": "Tell me about kiwis."},
        *[item.model_dump(exclude_none=True) for item in resp.output],
        {"role": "user", "content": "Thanks!"}])
    assert again.output_text == "You are welcome."
    assert "Kiwis are flightless" in json.dumps(web.model_calls[-1]["messages"])


def test_responses_stream(proxy, web):
    status, _, text = proxy.post("/v1/responses", {
        "model": "sonnet", "input": "Tell me about kiwis.", "stream": True,
        "tools": [{"type": "web_search_preview"}]})
    assert status == 200
    events = [STREAM_EVENT.validate_json(d) for _, d in sse_events(text)]   # the SDK's types
    kinds = [ev.type for ev in events]
    assert "response.web_search_call.searching" in kinds
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [i.type for i in final.output] == ["web_search_call", "message"]
    assert final.output[1].content[0].annotations[0].url == URL
    assert "".join(ev.delta for ev in events if ev.type == "response.output_text.delta") == ANSWER


def test_chat_web_search_options_annotations(proxy, web):
    status, _, body = proxy.post("/v1/chat/completions", {
        "model": "sonnet", "web_search_options": {},
        "messages": [{"role": "user", "content": "Tell me about kiwis."}]})
    assert status == 200, body
    msg = ChatCompletion.model_validate(body).choices[0].message
    assert msg.content == ANSWER
    (note,) = msg.annotations
    assert note.url_citation.url == URL and note.url_citation.start_index == CITED
    assert_searched(web)


def test_chat_stream_annotations(proxy, web):
    status, _, text = proxy.post("/v1/chat/completions", {
        "model": "sonnet", "stream": True, "web_search_options": {"search_context_size": "low"},
        "messages": [{"role": "user", "content": "Tell me about kiwis."}]})
    assert status == 200
    deltas = [json.loads(d)["choices"][0]["delta"] for _, d in sse_events(text) if d != "[DONE]"]
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    (notes,) = [d["annotations"] for d in deltas if "annotations" in d]
    assert notes[0]["url_citation"]["url"] == URL


def test_codex_style_cached_only_search_is_not_live(proxy, upstream):
    """external_web_access: false asks for cached results only: no live search is offered."""
    upstream.push(fake_upstream.text("No search."))
    status, _, body = proxy.post("/v1/responses", {
        "model": "sonnet", "input": "hi", "tools": [{"type": "web_search",
                                                     "external_web_access": False}]})
    assert status == 200, body
    assert upstream.model_calls[0]["tools"] == []


@pytest.fixture(scope="module")
def web_off(make_proxy):
    return make_proxy(CLAUDE_PROXY_WEB_TOOLS="off")


def test_switched_off_the_request_is_answered_without_search(web_off, upstream):
    upstream.push(fake_upstream.text("Answered from memory."))
    status, _, body = web_off.post("/v1/messages", {
        "model": "claude-sonnet-4-6", "max_tokens": 100,
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        "messages": [{"role": "user", "content": "Tell me about kiwis."}]})
    assert status == 200, body
    assert [b["type"] for b in body["content"]] == ["text"]
    (call,) = upstream.model_calls
    assert call["tools"] == []


def test_bad_switch_value_stops_start_up(home, upstream):
    env = base_env(home, upstream.url, "claude", CLAUDE_PROXY_WEB_TOOLS="maybe")
    run = subprocess.run([sys.executable, str(PROXY), "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=20)
    assert run.returncode != 0
    assert "CLAUDE_PROXY_WEB_TOOLS must be search, all or off" in run.stderr


def test_web_fetch_is_offered_only_when_all_is_allowed(make_proxy, proxy, upstream):
    body = {"model": "claude-sonnet-4-6", "max_tokens": 100,
            "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
            "messages": [{"role": "user", "content": "Read example.org"}]}
    upstream.push(fake_upstream.text("Not fetched."))
    status, _, out = proxy.post("/v1/messages", body)            # default: search only
    assert status == 200, out
    assert upstream.model_calls[-1]["tools"] == []
    upstream.push(fake_upstream.text("Fetched."))
    status, _, out = make_proxy(CLAUDE_PROXY_WEB_TOOLS="all").post("/v1/messages", body)
    assert status == 200, out
    assert [t["name"] for t in upstream.model_calls[-1]["tools"]] == ["WebFetch"]


def test_a_conversation_that_used_web_tools_is_not_kept(make_proxy, web):
    """Its next turn goes to a new process given the history the client sent: the searching
    process's own copy holds the nested search, which the client's does not.  The control: a
    conversation without web tools, on the same proxy, is kept."""
    from conftest import children
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_REUSE=0)

    def turn(session, messages, **extra):
        status, _, body = p.post("/v1/chat/completions", {"model": "sonnet", "messages": messages,
                                                         **extra}, headers={"X-Session-Id": session})
        assert status == 200, body
        return body["choices"][0]["message"]["content"]

    asked = [{"role": "user", "content": "Tell me about kiwis."}]
    assert turn("web", asked, web_search_options={}) == ANSWER
    assert_searched(web)
    h = p.health()
    assert h["idle"]["idle"]["kept"] == 0, h["idle"]
    web.responder = None
    web.push(fake_upstream.text("Plain answer."), fake_upstream.text("More about kiwis."))
    assert turn("plain", [{"role": "user", "content": "Hello."}]) == "Plain answer."
    h = p.health()
    assert h["idle"]["idle"]["kept"] == 1 and len(children(p.proc.pid)) == 1, h["idle"]
    assert turn("web", asked + [{"role": "assistant", "content": ANSWER},
                                {"role": "user", "content": "More, please."}]) == "More about kiwis."
    h = p.health()
    assert h["idle"]["hits"]["kept"] == 0 and h["cli_processes_started"] == 3, h
    assert "Kiwis are flightless" in json.dumps(web.model_calls[-1]["messages"])


def test_a_web_fetch_comes_back_as_the_answer_text_alone(make_proxy, upstream):
    """With CLAUDE_PROXY_WEB_TOOLS=all a WebFetch runs inside the CLI (here refused by the
    address guard: a loopback URL) and the client gets the model's answer only: no
    server_tool_use or web_fetch_tool_result block, streamed or not (WebFetch is Anthropic's
    web_fetch tool only)."""
    p = make_proxy(CLAUDE_PROXY_WEB_TOOLS="all", CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    url = "http://127.0.0.1:9/page"

    def fetch_then_answer(n):
        return (fake_upstream.Reply(blocks=[{"type": "tool_use", "id": "toolu_wf%d" % n,
                                             "name": "WebFetch",
                                             "input": {"url": url, "prompt": "Summarise it."}}],
                                    stop_reason="tool_use", id="msg_wf%d" % n),
                fake_upstream.text("The page could not be read.", id="msg_wf%da" % n))

    upstream.push(*fetch_then_answer(1), *fetch_then_answer(2))
    status, _, out = p.post("/v1/messages", {
        "model": "claude-sonnet-4-6", "max_tokens": 100,
        "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
        "messages": [{"role": "user", "content": "Read %s" % url}]})
    assert status == 200, out
    assert out["content"] == [{"type": "text", "text": "The page could not be read."}], out
    assert not (out["usage"].get("server_tool_use") or {}).get("web_fetch_requests"), out["usage"]
    status, _, text = p.post("/v1/messages", {
        "model": "claude-sonnet-4-6", "max_tokens": 100, "stream": True,
        "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
        "messages": [{"role": "user", "content": "Read %s" % url}]})
    assert status == 200, text
    events = [(n, json.loads(d)) for n, d in sse_events(text)]
    assert [d["content_block"]["type"] for n, d in events if n == "content_block_start"] == ["text"]
    assert "".join(d["delta"].get("text", "") for n, d in events
                   if n == "content_block_delta") == "The page could not be read."
    assert [b["tool_use_id"] for m in upstream.model_calls[-1]["messages"] if m["role"] == "user"
            and isinstance(m["content"], list) for b in m["content"]
            if b.get("type") == "tool_result"] == ["toolu_wf2"]
