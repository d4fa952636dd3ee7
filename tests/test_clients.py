"""Real agent clients, unmodified, end to end: client -> proxy -> real CLI -> fake upstream.

The Codex CLI (npm @openai/codex, pinned, installed by .ci/run into .codex-cli/) runs as
`codex exec` with its stock configuration except for a model provider pointing at the proxy
(wire_api "responses"), in a scratch CODEX_HOME, with update checks, analytics and feedback off
and every non-loopback address unreachable (HTTP(S)_PROXY to a closed port).  openai-agents
(pip, pinned in tests/requirements.txt) runs on its Responses model.  Each of these tests runs a
real client once; the fake upstream scripts the model and records what reached it.
"""
import asyncio
import json
import os
import subprocess

import pytest

import fake_upstream
from conftest import ROOT

CODEX = ROOT / ".codex-cli" / "node_modules" / ".bin" / "codex"
MARKER = "codex-marker-42"


def system_text(call):
    system = call.get("system") or []
    return system if isinstance(system, str) else " ".join(b.get("text", "") for b in system)


def upstream_text(call):
    return json.dumps(call["messages"])


@pytest.fixture
def codex(proxy, tmp_path):
    """run(prompt, *args, headers=None) -> (CompletedProcess, last message): one `codex exec`."""
    if not CODEX.exists():
        pytest.fail("the pinned Codex CLI is missing at %s: run bash .ci/run" % CODEX)
    work = tmp_path / "work"
    work.mkdir()

    def run(prompt, *args, headers=None):
        home = tmp_path / "codex-home"
        home.mkdir(exist_ok=True)
        config = [
            'model = "claude-sonnet-4-6"',
            'model_provider = "claude-proxy"',
            'check_for_update_on_startup = false',
            '[analytics]', 'enabled = false',
            '[feedback]', 'enabled = false',
            '[model_providers.claude-proxy]',
            'name = "claude-proxy"',
            'base_url = "%s/v1"' % proxy.url,
            'wire_api = "responses"',
        ]
        if headers:
            config.append("http_headers = { %s }" % ", ".join(
                '"%s" = "%s"' % kv for kv in headers.items()))
        (home / "config.toml").write_text("\n".join(config) + "\n")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAUDE", "ANTHROPIC", "OPENAI", "CODEX"))}
        env.update(CODEX_HOME=str(home), HOME=str(tmp_path), OPENAI_API_KEY="unused",
                   HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                   NO_PROXY="127.0.0.1,localhost")
        last = tmp_path / "last-message.txt"
        argv = [str(CODEX), "exec", "--skip-git-repo-check", "--ephemeral", "--color", "never",
                "-C", str(work), "-o", str(last), *args, prompt]
        run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180,
                             stdin=subprocess.DEVNULL)
        return run, last.read_text() if last.exists() else ""

    return run


def test_codex_plain_answer(codex, upstream):
    upstream.push(fake_upstream.text("Hello from Claude via Codex."))
    run, last = codex("Say hello")
    assert run.returncode == 0, run.stderr[-3000:]
    assert last.strip() == "Hello from Claude via Codex."
    (call,) = upstream.model_calls
    offered = system_text(call)
    # Codex's stock tools: functions, the multi_agent_v1 namespace, web_search (left out)
    assert "exec_command" in offered and "multi_agent_v1." in offered
    assert "Say hello" in upstream_text(call)
    assert "Model metadata for `claude-sonnet-4-6` not found" in run.stderr   # README says so


def test_codex_shell_round_trip(codex, upstream):
    """A two-step task: the model calls exec_command (an emulated ```tool_call block), Codex
    runs it, the output reaches the model, which calls it again on what it learnt; then the
    model's answer ends the run."""
    upstream.push(fake_upstream.text('```tool_call\n{"name": "exec_command", "arguments": '
                                     '{"cmd": "echo codex-marker-$((40+2))"}}\n```'),
                  fake_upstream.text('```tool_call\n{"name": "exec_command", "arguments": '
                                     '{"cmd": "echo %s | tr a-z A-Z"}}\n```' % MARKER),
                  fake_upstream.text("The command printed %s." % MARKER))
    run, last = codex("Run the echo")
    assert run.returncode == 0, run.stderr[-3000:]
    assert last.strip() == "The command printed %s." % MARKER
    first, second, third = upstream.model_calls
    assert MARKER not in upstream_text(first)
    assert MARKER in upstream_text(second)          # the command's output, as Codex ran it
    assert MARKER.upper() in upstream_text(third)   # and the second command's


def test_codex_native_tools_round_trip(codex, upstream):
    """The same with native tools, asked for by the provider's http_headers: Codex's tools, the
    namespace's included, reach the model as real tools."""
    upstream.push(fake_upstream.tool_use("mcp__client__exec_command",
                                         {"cmd": "echo codex-marker-$((40+2))"}),
                  fake_upstream.text("Native: %s." % MARKER))
    run, last = codex("Run the echo", headers={"X-Toolcall-Module": "native"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert last.strip() == "Native: %s." % MARKER
    first, second = upstream.model_calls
    names = {t["name"] for t in first["tools"]}
    assert {"mcp__client__exec_command", "mcp__client__multi_agent_v1_spawn_agent"} <= names
    assert not any("web_search" in n for n in names)
    assert MARKER in upstream_text(second)


def test_codex_output_schema(codex, upstream, tmp_path):
    """Codex sends its tools with the schema, so the schema is a system-prompt rule and the
    final message is the JSON.  Run in native tool mode (the emulated mode's rule is covered by
    test_responses.py's test_json_schema_with_tools_is_a_rule_the_final_answer_follows)."""
    headers = {"X-Toolcall-Module": "native"}
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    upstream.push(fake_upstream.text('{"answer": 42}'))
    run, last = codex("What is six times seven?", "--output-schema", str(path), headers=headers)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(last) == {"answer": 42}
    (call,) = upstream.model_calls
    assert "matching this JSON schema" in system_text(call)
    assert '"answer"' in system_text(call)
    assert "StructuredOutput" not in [t["name"] for t in call["tools"]]


def test_codex_live_web_search(codex, upstream):
    """Codex's web_search = "live" sends a web_search tool with external access: it runs as the
    CLI's WebSearch, and Codex shows the web_search_call item."""
    main = [fake_upstream.tool_use("WebSearch", {"query": "kiwi facts"}),
            fake_upstream.text("Kiwis: [Kiwi facts](https://example.org/kiwi)")]

    def responder(body):
        if fake_upstream.offers_web_search(body):
            return fake_upstream.web_search_answer(
                "kiwi facts", [{"url": "https://example.org/kiwi", "title": "Kiwi facts"}],
                "Kiwis cannot fly.")
        return main.pop(0)
    upstream.responder = responder
    run, last = codex("Search the web for kiwi facts", "-c", 'web_search="live"')
    assert run.returncode == 0, run.stderr[-3000:]
    assert last.strip() == "Kiwis: [Kiwi facts](https://example.org/kiwi)"
    assert "web search: kiwi facts" in run.stderr
    first, nested, _last = upstream.model_calls
    assert "WebSearch" in [t["name"] for t in first["tools"]]
    assert [t["type"] for t in nested["tools"]] == ["web_search_20250305"]


# -- openai-agents ------------------------------------------------------------------------------

@pytest.fixture
def agents(proxy):
    """(the agents module, run(agent, prompt) -> RunResult) on its Responses model."""
    import agents as sdk
    from openai import AsyncOpenAI
    sdk.set_tracing_disabled(True)                 # no call home with traces

    async def run(make_agent, prompt):
        client = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        try:
            model = sdk.OpenAIResponsesModel(model="claude-sonnet-4-6", openai_client=client)
            return await sdk.Runner.run(make_agent(model), prompt)
        finally:
            await client.close()

    return sdk, lambda make_agent, prompt: asyncio.run(run(make_agent, prompt))


def test_openai_agents_function_tool(agents, upstream):
    sdk, run = agents
    seen = []

    @sdk.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return "21 degrees in %s" % city

    upstream.push(fake_upstream.text('```tool_call\n{"name": "get_weather", "arguments": '
                                     '{"city": "Paris"}}\n```'),
                  fake_upstream.text("It is 21 degrees in Paris."))
    result = run(lambda model: sdk.Agent(name="weather", instructions="Use the tool.",
                                         tools=[get_weather], model=model), "Weather in Paris?")
    assert seen == ["Paris"]
    assert result.final_output == "It is 21 degrees in Paris."
    assert "21 degrees in Paris" in upstream_text(upstream.model_calls[-1])


def test_openai_agents_output_type(agents, upstream):
    import pydantic
    sdk, run = agents

    class Weather(pydantic.BaseModel):
        city: str
        temp: float

    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Oslo", "temp": -3}))
    result = run(lambda model: sdk.Agent(name="typed", instructions="Answer as JSON.",
                                         output_type=Weather, model=model), "Weather in Oslo?")
    assert result.final_output == Weather(city="Oslo", temp=-3)
    assert [t["name"] for t in upstream.model_calls[-1]["tools"]] == ["StructuredOutput"]


# -- LangChain and pydantic-ai: typed output on their Responses models --------------------------

class City(__import__("pydantic").BaseModel):
    city: str
    temp: float


def test_langchain_responses_structured_output(proxy, upstream):
    from langchain_openai import ChatOpenAI
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Lima", "temp": 19}))
    llm = ChatOpenAI(model="claude-sonnet-4-6", base_url=proxy.url + "/v1", api_key="unused",
                     use_responses_api=True, max_retries=0)
    assert llm.with_structured_output(City).invoke("Weather in Lima?") == City(city="Lima", temp=19)
    assert [t["name"] for t in upstream.model_calls[-1]["tools"]] == ["StructuredOutput"]


def test_pydantic_ai_native_output_on_responses(proxy, upstream):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Quito", "temp": 14}))
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        try:
            model = OpenAIResponsesModel("claude-sonnet-4-6",
                                         provider=OpenAIProvider(openai_client=client))
            return await Agent(model, output_type=NativeOutput(City)).run("Weather in Quito?")
        finally:
            await client.close()

    result = asyncio.run(run())
    assert result.output == City(city="Quito", temp=14)
    assert [t["name"] for t in upstream.model_calls[-1]["tools"]] == ["StructuredOutput"]


AI_SDK = ROOT / ".ai-sdk"


def test_vercel_ai_sdk_output_object(proxy, upstream):
    """The AI SDK's default OpenAI model is the Responses one; Output.object sends the flat
    json_schema format with a draft-07 $schema key (left out on the way to the CLI)."""
    if not (AI_SDK / "node_modules" / "ai").exists():
        pytest.fail("the pinned AI SDK is missing at %s: run bash .ci/run" % AI_SDK)
    upstream.push(fake_upstream.tool_use("StructuredOutput", {"city": "Lima", "temp": 19}))
    run = subprocess.run(["node", str(ROOT / "tests" / "clients" / "ai_sdk.mjs")],
                         env=dict(os.environ, AI_SDK_DIR=str(AI_SDK), BASE_URL=proxy.url + "/v1"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["output"] == {"city": "Lima", "temp": 19}
    (offered,) = upstream.model_calls[-1]["tools"]
    assert offered["name"] == "StructuredOutput" and "$schema" not in offered["input_schema"]


# -- AutoGen --------------------------------------------------------------------------------------

def test_autogen_assistant_agent_calls_a_tool_and_reflects(proxy, upstream):
    """AutoGen (autogen-agentchat + autogen-ext[openai], pinned) on chat completions: its
    OpenAIChatCompletionClient needs model_info for a model name it does not know; an
    AssistantAgent calls the tool, runs it, and (reflect_on_tool_use) answers from its result."""
    pytest.importorskip("autogen_agentchat", reason="bash .ci/run installs AutoGen into .venv/")
    from autogen_agentchat.agents import AssistantAgent
    from autogen_ext.models.openai import OpenAIChatCompletionClient
    seen = []

    async def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return "21 degrees in %s" % city

    async def run():
        client = OpenAIChatCompletionClient(
            model="claude-sonnet-4-6", base_url=proxy.url + "/v1", api_key="unused", max_retries=0,
            model_info={"vision": True, "function_calling": True, "json_output": True,
                        "structured_output": True, "family": "unknown",
                        "multiple_system_messages": False})
        try:
            agent = AssistantAgent("weather", model_client=client, tools=[get_weather],
                                   system_message="Use the tool.", reflect_on_tool_use=True)
            return await agent.run(task="Weather in Paris?")
        finally:
            await client.close()

    upstream.push(fake_upstream.text('```tool_call\n{"name": "get_weather", "arguments": '
                                     '{"city": "Paris"}}\n```'),
                  fake_upstream.text("It is 21 degrees in Paris."))
    result = asyncio.run(run())
    assert seen == ["Paris"]
    assert result.messages[-1].content == "It is 21 degrees in Paris."
    first, second = upstream.model_calls
    assert "get_weather" in system_text(first) and "Use the tool." in system_text(first)
    assert "21 degrees in Paris" in upstream_text(second)
