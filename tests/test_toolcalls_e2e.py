"""Prompt-emulated tool calling end to end: a real client -> the proxy -> the real claude CLI ->
the scripted fake upstream, which plays the model and records what the CLI sent it.

The upstream never sees OpenAI tools: they are described in the system prompt, and the scripted
"model" answers with ```tool_call blocks that the proxy must turn back into tool calls.
"""
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import fake_upstream
from conftest import PROXY, base_env, real_claude_bin, sse_events, upstream_texts

F = "`" * 3

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
REFUSAL = "I'm sorry, but I don't have access to real-time weather data."
EVONIC_ONLY_REFUSAL = "Sorry, the board is unavailable at the moment, please try again later."


def block(name, **args):
    return F + "tool_call\n" + json.dumps({"name": name, "arguments": args}) + "\n" + F


def chat(proxy, headers=None, **body):
    body.setdefault("model", "sonnet")
    body.setdefault("messages", ASK)
    status, _, out = proxy.post("/v1/chat/completions", body, headers=headers or {})
    assert status == 200, out
    return out


def system_text(model_call):
    system = model_call.get("system") or ""
    if isinstance(system, list):
        return "\n".join(b.get("text", "") for b in system)
    return system


def user_text(model_call):
    """All text of the user turns the CLI sent upstream."""
    out = []
    for m in model_call["messages"]:
        if m.get("role") != "user":
            continue
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out += [b.get("text", "") for b in content if b.get("type") == "text"]
    return "\n".join(out)


def transcript(model_call):
    """The JSON transcript of earlier turns inside the upstream user message (flat history)."""
    text = user_text(model_call)
    return json.loads(text[text.index("["):text.rindex("]") + 1])


@pytest.fixture(scope="module")
def flat_proxy(make_proxy):
    """A proxy with CLAUDE_PROXY_HISTORY=flat: earlier turns as a JSON transcript."""
    return make_proxy(CLAUDE_PROXY_HISTORY="flat")


def fenced(text, info):
    """The JSON objects inside ```info blocks of `text`, in order."""
    out, pos = [], 0
    while True:
        start = text.find(F + info + "\n", pos)
        if start < 0:
            return out
        obj, pos = json.JSONDecoder().raw_decode(text, start + len(F + info + "\n"))
        assert text.startswith("\n" + F, pos), text[pos:pos + 20]
        out.append(obj)


def tool_prompt_absent(model_call):
    text = system_text(model_call)
    return "tool_call" not in text and "# Tools" not in text and "get_weather" not in text


# -- non-streaming ------------------------------------------------------------------------------

def test_single_call(proxy, upstream):
    upstream.push(fake_upstream.text("Let me check.\n" + block("get_weather", city="Paris")))
    out = chat(proxy, tools=[WEATHER])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) > len("call_")
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert isinstance(calls[0]["function"]["arguments"], str)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert F not in (choice["message"]["content"] or "")
    [model_call] = upstream.model_calls
    system = system_text(model_call)
    assert "tool_call" in system and "get_weather" in system and "Current weather for a city." in system
    assert model_call["tools"] == []                    # emulated: no native tools upstream


def test_parallel_calls_get_distinct_ids(proxy, upstream):
    upstream.push(fake_upstream.text(block("get_weather", city="Paris") + "\n" +
                                     block("get_weather", city="Rome") + "\n" + block("search", q="news")))
    out = chat(proxy, tools=[WEATHER, SEARCH])
    calls = out["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}), ("search", {"q": "news"})]
    assert len({c["id"] for c in calls}) == 3
    assert out["choices"][0]["finish_reason"] == "tool_calls"


def test_parallel_tool_calls_false_keeps_the_first(proxy, upstream):
    upstream.push(fake_upstream.text(block("get_weather", city="Paris") + block("get_weather", city="Rome")))
    out = chat(proxy, tools=[WEATHER], parallel_tool_calls=False)
    calls = out["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_native_function_call_markup_becomes_a_call(proxy, upstream):
    ns = "antml" + ":"
    markup = ('<{0}function_calls>\n<{0}invoke name="get_weather">\n<{0}parameter name="city">Paris'
              '</{0}parameter>\n</{0}invoke>\n</{0}function_calls>').format(ns)
    upstream.push(fake_upstream.text("Checking.\n" + markup, chunks=30))
    out = chat(proxy, tools=[WEATHER])
    msg = out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert "function_calls" not in (msg["content"] or "")


def test_refusal_is_retried_with_the_nudge(proxy, upstream):
    upstream.push(fake_upstream.text(REFUSAL), fake_upstream.text(block("get_weather", city="Paris")))
    out = chat(proxy, tools=[WEATHER])
    msg = out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert REFUSAL not in (msg["content"] or "")
    first, second = upstream.model_calls
    assert upstream_texts(first) == [("user", ASK[0]["content"])]
    # the retry: the question, the refusal as the model's turn, then the nudge
    [(r1, ask), (r2, refusal), (r3, nudge)] = upstream_texts(second)
    assert (r1, ask) == ("user", ASK[0]["content"]) and (r2, refusal) == ("assistant", REFUSAL)
    assert r3 == "user" and "did not call a tool" in nudge
    assert "get_weather" in system_text(second)


def test_refusal_twice_returns_the_original_answer_without_looping(proxy, upstream):
    upstream.push(fake_upstream.text(REFUSAL), fake_upstream.text("I really can't access tools."),
                  fake_upstream.text(block("get_weather", city="Paris")))
    out = chat(proxy, tools=[WEATHER])
    assert out["choices"][0]["message"]["content"] == REFUSAL
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in out["choices"][0]["message"]
    assert len(upstream.model_calls) == 2


def test_tool_choice_none_describes_no_tools(proxy, upstream):
    upstream.push(fake_upstream.text("It is probably mild."))
    out = chat(proxy, tools=[WEATHER], tool_choice="none")
    assert out["choices"][0]["message"]["content"] == "It is probably mild."
    [model_call] = upstream.model_calls
    assert tool_prompt_absent(model_call)


def test_tool_choice_required_retries_once_when_no_call(proxy, upstream):
    upstream.push(fake_upstream.text("Paris is usually mild in spring."),
                  fake_upstream.text(block("get_weather", city="Paris")))
    out = chat(proxy, tools=[WEATHER], tool_choice="required")
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert len(upstream.model_calls) == 2
    assert "MUST call at least one tool" in system_text(upstream.model_calls[0])
    assert "did not call a tool" in user_text(upstream.model_calls[1])


def test_named_tool_choice_describes_only_that_tool(proxy, upstream):
    upstream.push(fake_upstream.text(block("search", q="Paris weather")))
    out = chat(proxy, tools=[WEATHER, SEARCH], tool_choice={"type": "function", "function": {"name": "search"}})
    calls = out["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["search"]
    system = system_text(upstream.model_calls[0])
    assert '"search"' in system and "Search the web." in system
    assert "get_weather" not in system and "Current weather" not in system
    assert len(upstream.model_calls) == 1


def test_legacy_functions_and_function_call(proxy, upstream):
    upstream.push(fake_upstream.text(block("get_weather", city="Paris")))
    out = chat(proxy, functions=[WEATHER["function"]], function_call="auto")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert json.loads(choice["message"]["function_call"]["arguments"]) == {"city": "Paris"}
    assert not choice["message"].get("tool_calls")
    assert "get_weather" in system_text(upstream.model_calls[0])


def test_no_tools_means_no_protocol_in_the_system_prompt(proxy, upstream):
    upstream.push(fake_upstream.text("Hello."))
    chat(proxy, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    [model_call] = upstream.model_calls
    assert "Be brief." in system_text(model_call)
    assert tool_prompt_absent(model_call) and "tool_result" not in system_text(model_call)


# -- streaming ----------------------------------------------------------------------------------

def stream_chunks(proxy, **body):
    body.update(stream=True)
    body.setdefault("model", "sonnet")
    body.setdefault("messages", ASK)
    status, headers, text = proxy.post("/v1/chat/completions", body)
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    assert events[-1][1] == "[DONE]"
    return [json.loads(data) for _, data in events[:-1]]


def test_streaming_tool_calls(proxy, upstream):
    answer = ("Checking both cities.\n" + block("get_weather", city="Paris") + "\n" +
              block("get_weather", city="Rome"))
    upstream.push(fake_upstream.text(answer, chunks=40))
    chunks = stream_chunks(proxy, tools=[WEATHER])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content.startswith("Checking both cities.") and F not in content and "tool_call" not in content
    first_text = next(i for i, d in enumerate(deltas) if d.get("content"))
    first_tool = next(i for i, d in enumerate(deltas) if d.get("tool_calls"))
    assert first_text < first_tool
    by_index = {}
    for d in deltas:
        for tc in d.get("tool_calls") or []:
            by_index.setdefault(tc["index"], []).append(tc)
    assert sorted(by_index) == [0, 1]
    ids = set()
    for index, parts in by_index.items():
        head = parts[0]
        assert head["id"].startswith("call_") and head["type"] == "function"
        assert head["function"]["name"] == "get_weather"
        assert all("id" not in p and "name" not in p.get("function", {}) for p in parts[1:])
        args = "".join(p["function"].get("arguments") or "" for p in parts)
        assert json.loads(args) == {"city": ["Paris", "Rome"][index]}
        ids.add(head["id"])
    assert len(ids) == 2
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}


def test_streaming_refusal_is_retried_and_never_shown(proxy, upstream):
    upstream.push(fake_upstream.text(REFUSAL, chunks=10),
                  fake_upstream.text(block("get_weather", city="Paris"), chunks=10))
    chunks = stream_chunks(proxy, tools=[WEATHER])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    assert any(d.get("tool_calls") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(upstream.model_calls) == 2


# -- history ------------------------------------------------------------------------------------

@pytest.mark.parametrize("history", ["structured", "flat"])
def test_history_of_calls_and_results_reaches_upstream_intact(request, upstream, history):
    proxy = request.getfixturevalue("proxy" if history == "structured" else "flat_proxy")
    tricky = 'He said "hi" \\o/\nline 2\t{"temp": 21, "unit": "C", "tags": ["a", "b"]}\n' + F + "json\n{}\n" + F
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_paris1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}},
            {"id": "call_rome22", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Rome \"Roma\""})}}]},
        {"role": "tool", "tool_call_id": "call_paris1", "content": tricky},
        {"role": "tool", "tool_call_id": "call_rome22", "content": "25 C, sunny"},
    ]
    upstream.push(fake_upstream.text("Paris 21 C, Rome 25 C."))
    out = chat(proxy, tools=[WEATHER], messages=messages)
    assert out["choices"][0]["message"]["content"] == "Paris 21 C, Rome 25 C."
    assert out["choices"][0]["finish_reason"] == "stop"
    [model_call] = upstream.model_calls
    assert "You are a weather bot." in system_text(model_call)
    if history == "structured":      # the default: earlier turns as real messages
        turns = [{"role": r, "content": c} for r, c in upstream_texts(model_call)]
    else:
        turns = transcript(model_call)
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[0]["content"] == "Weather in Paris and Rome?"
    calls = fenced(turns[1]["content"], "tool_call")
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                     {"name": "get_weather", "arguments": {"city": "Rome \"Roma\""}}]
    results = fenced(turns[2]["content"], "tool_result")
    assert [(r["tool_call_id"], r["name"], r["content"]) for r in results] == [
        ("call_paris1", "get_weather", tricky), ("call_rome22", "get_weather", "25 C, sunny")]


# -- handler selection ----------------------------------------------------------------------------

def test_unknown_toolcall_module_is_a_400_listing_handlers(proxy, upstream):
    status, _, out = proxy.post("/v1/chat/completions", {"model": "sonnet", "messages": ASK, "tools": [WEATHER]},
                                headers={"X-Toolcall-Module": "no-such-handler"})
    assert status == 400
    message = out["error"]["message"]
    assert "no-such-handler" in message and "generic" in message and "evonic" in message
    assert out["error"]["type"] == "invalid_request_error"
    assert upstream.model_calls == []


def test_health_lists_handlers(proxy):
    with urllib.request.urlopen(proxy.url + "/health", timeout=5) as resp:
        health = json.loads(resp.read())
    assert {"generic", "evonic"} <= set(health["handlers"])
    assert health["module_errors"] == {}


@pytest.mark.parametrize("module,retried", [("generic", False), ("evonic", True)])
def test_evonic_module_is_selected_by_header(proxy, upstream, module, retried):
    upstream.push(fake_upstream.text(EVONIC_ONLY_REFUSAL), fake_upstream.text(block("get_weather", city="Paris")))
    out = chat(proxy, tools=[WEATHER], headers={"X-Toolcall-Module": module})
    msg = out["choices"][0]["message"]
    if retried:
        assert out["choices"][0]["finish_reason"] == "tool_calls"
        assert len(upstream.model_calls) == 2
        assert "boards, skills and integrations" in user_text(upstream.model_calls[1])   # evonic's nudge
    else:
        assert msg["content"] == EVONIC_ONLY_REFUSAL and out["choices"][0]["finish_reason"] == "stop"
        assert len(upstream.model_calls) == 1


def test_anthropic_messages_with_tools(proxy, upstream):
    upstream.push(fake_upstream.text("On it.\n" + block("get_weather", city="Paris")))
    status, _, out = proxy.post("/v1/messages", {
        "model": "sonnet", "max_tokens": 256, "messages": ASK,
        "tools": [{"name": "get_weather", "description": "Current weather for a city.",
                   "input_schema": WEATHER["function"]["parameters"]}]},
        headers={"anthropic-version": "2023-06-01", "X-Toolcall-Module": "evonic"})
    assert status == 200, out
    assert out["stop_reason"] == "tool_use"
    uses = [b for b in out["content"] if b["type"] == "tool_use"]
    assert len(uses) == 1 and uses[0]["id"].startswith("toolu_")
    assert uses[0]["name"] == "get_weather" and uses[0]["input"] == {"city": "Paris"}


# -- a real client ------------------------------------------------------------------------------

def test_openai_sdk_full_loop(proxy, upstream):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    upstream.push(fake_upstream.text(block("get_weather", city="Paris")))
    first = client.chat.completions.create(model="sonnet", messages=messages, tools=[WEATHER])
    assert first.choices[0].finish_reason == "tool_calls"
    [tc] = first.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": tc.id, "content": '{"temp_c": 21, "sky": "clear"}'})
    upstream.push(fake_upstream.text("It is 21 °C and clear in Paris."))
    second = client.chat.completions.create(model="sonnet", messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is 21 °C and clear in Paris."
    assert not second.choices[0].message.tool_calls
    turns = upstream_texts(upstream.model_calls[-1])
    assert [r for r, _ in turns] == ["user", "assistant", "user"]
    assert turns[0][1] == "What's the weather in Paris?"
    assert fenced(turns[1][1], "tool_call") == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    results = fenced(turns[2][1], "tool_result")
    assert results == [{"tool_call_id": tc.id, "name": "get_weather", "content": '{"temp_c": 21, "sky": "clear"}'}]


def test_openai_sdk_streaming_tool_call(proxy, upstream):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
    upstream.push(fake_upstream.text("Looking it up.\n" + block("search", q="Paris \"weather\""), chunks=20))
    calls, content, finish = {}, [], None
    with client.chat.completions.create(model="sonnet", messages=ASK, tools=[WEATHER, SEARCH],
                                        stream=True) as stream:
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            for tc in delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                if tc.function:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(content) == "Looking it up.\n"
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "search" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"q": "Paris \"weather\""}


# -- handler modules: discovery, broken modules, a custom one ---------------------------------

ACME = '''
from claude_openai_proxy import BaseToolCallHandler, register


class AcmeHandler(BaseToolCallHandler):
    name = "acme"
    extra_refusal_patterns = (r"\\bthe CRM (?:is|seems) offline\\b",)

    def nudge(self):
        return "ACME-NUDGE: the CRM tools are online. Call one now in a ```tool_call block."


register(AcmeHandler)
'''


@pytest.fixture(scope="module")
def broken_install(tmp_path_factory, make_proxy):
    """A copy of the proxy whose modules/ holds evonic, a custom `acme` handler, a module that
    raises on import, and a private helper that must not be imported; started like a user would."""
    root = tmp_path_factory.mktemp("install")
    shutil.copy(PROXY, root / PROXY.name)
    shutil.copytree(PROXY.parent / "modules", root / "modules",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "modules" / "broken.py").write_text("raise RuntimeError('boom from a broken module')\n")
    (root / "modules" / "_private.py").write_text("raise RuntimeError('private helpers are not handlers')\n")
    (root / "modules" / "acme.py").write_text(ACME)
    p = make_proxy(script=root / PROXY.name, CLAUDE_PROXY_TOOLCALL_MODULE="acme")
    return {"root": root, "url": p.url, "health": p.health(), "env": p.env,
            "log": p.log_path}


def test_broken_module_is_reported_and_the_server_still_starts(broken_install):
    health = broken_install["health"]
    assert health["status"] == "ok"
    assert set(health["module_errors"]) == {"broken"}
    assert "RuntimeError" in health["module_errors"]["broken"]
    assert "boom from a broken module" in health["module_errors"]["broken"]
    assert {"generic", "evonic", "acme"} <= set(health["handlers"])
    assert "_private" not in health["handlers"]
    assert "boom from a broken module" in broken_install["log"].read_text()    # start-up log


def test_broken_module_is_reported_in_help(broken_install):
    env = dict(broken_install["env"])
    out = subprocess.run([sys.executable, str(broken_install["root"] / PROXY.name), "--help"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "broken" in out.stdout and "boom from a broken module" in out.stdout
    assert "evonic" in out.stdout and "acme" in out.stdout
    assert "private helpers" not in out.stdout + out.stderr


def _post(url, body, headers=None):
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_custom_module_is_the_default_from_env_and_the_header_overrides_it(broken_install, upstream):
    body = {"model": "sonnet", "messages": ASK, "tools": [SEARCH]}
    upstream.push(fake_upstream.text("Sorry, the CRM is offline today."), fake_upstream.text(block("search", q="crm")))
    status, out = _post(broken_install["url"], body)                   # CLAUDE_PROXY_TOOLCALL_MODULE=acme
    assert status == 200, out
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert len(upstream.model_calls) == 2
    assert "ACME-NUDGE" in user_text(upstream.model_calls[1])
    upstream.reset()
    upstream.push(fake_upstream.text("Sorry, the CRM is offline today."), fake_upstream.text(block("search", q="crm")))
    status, out = _post(broken_install["url"], body, {"X-Toolcall-Module": "generic"})
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == "Sorry, the CRM is offline today."
    assert len(upstream.model_calls) == 1


def test_unknown_default_module_is_refused_at_start_up(home, upstream_server):
    """A typo in CLAUDE_PROXY_TOOLCALL_MODULE should stop the server at start-up, listing the
    handlers, rather than answer every request with a 400 that blames X-Toolcall-Module."""
    env = base_env(home, upstream_server.url, real_claude_bin(), CLAUDE_PROXY_TOOLCALL_MODULE="evonik")
    proc = subprocess.run([sys.executable, str(PROXY), "--port", "0"], env=env, cwd=str(home),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    output = proc.stdout.decode()
    assert proc.returncode != 0
    assert "listening" not in output
    assert "evonik" in output and "generic" in output and "evonic" in output
