"""Client text is the model's text (issue 19): no client message runs a CLI command or reads a
file of this server, and no request changes what a reused process does for the next one.
Real CLI, fake upstream."""
import json
import socket
import threading
import time

import pytest

import claude_openai_proxy as P
import fake_upstream
from conftest import upstream_turns
from test_reuse import reused_idle, start  # noqa: F401 - start: no pool, no kept conversations

CHAT = "/v1/chat/completions"
#: commands the CLI 2.1.330 runs itself when a user line's last text starts with them, and
#: the interactive prompt's other prefixes
COMMANDS = ("/model opus", "/compact", "/clear", "/cost", "/help", "/context", "/init",
            "/review", "  /model haiku", "/model opus\nand then answer me",
            "!id", "# remember this")      # bash and memory prefixes: text in stream-json too


def last_user_text(call):
    """The text of the last user turn the upstream got, its blocks joined as they are."""
    role, blocks = [t for t in upstream_turns(call) if t[0] == "user"][-1]
    return "".join(b["text"] for b in blocks if b.get("type") == "text")


def test_command_texts_reach_the_model_and_the_process_keeps_its_model(start, upstream):
    p = start()
    for i, text in enumerate(COMMANDS):
        upstream.push(fake_upstream.text("answer %d" % i))
        before = len(upstream.model_calls)
        status, _, body = p.post(CHAT, {"model": "claude-sonnet-4-6",
                                        "messages": [{"role": "user", "content": text}]})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == "answer %d" % i
        calls = upstream.model_calls[before:]
        assert len(calls) == 1                   # one model call: the user's text, nothing else
        assert last_user_text(calls[0]) == text
        assert "local-command" not in json.dumps(calls[0]["messages"])
        # the same process serves every request, with the model it was started with
        assert calls[0]["model"] == "claude-sonnet-4-6"
        h = reused_idle(p)
        assert h["idle"]["hits"]["reused"] == i and h["cli_processes_started"] == 1


def test_commands_in_earlier_turns_are_history_not_commands(start, upstream):
    """Earlier user messages go to the CLI as shouldQuery:false lines, which it would run as
    commands too (/clear would empty the conversation it is given)."""
    p = start()
    upstream.push(fake_upstream.text("the answer"))
    status, _, body = p.post(CHAT, {"model": "claude-sonnet-4-6", "messages": [
        {"role": "user", "content": "/model opus"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "/clear"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "what did I say?"}]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "the answer"
    call = upstream.model_calls[-1]
    assert call["model"] == "claude-sonnet-4-6"
    texts = [(role, "".join(b.get("text", "") for b in blocks)) for role, blocks in upstream_turns(call)]
    assert texts == [("user", "/model opus"), ("assistant", "first answer"), ("user", "/clear"),
                     ("assistant", "second answer"), ("user", "what did I say?")]


def test_a_file_mention_reads_nothing(start, upstream, tmp_path):
    """"@/path" in the CLI's own prompt attaches that file; client text must not."""
    secret = tmp_path / "secret.txt"
    secret.write_text("FILE-SECRET-4711\n")
    p = start()
    status, _, body = p.post(CHAT, {"model": "sonnet", "messages": [
        {"role": "user", "content": "summarise @%s please" % secret}]})
    assert status == 200
    sent = json.dumps(upstream.model_calls[-1])
    assert "FILE-SECRET-4711" not in sent
    assert last_user_text(upstream.model_calls[-1]) == "summarise @%s please" % secret


@pytest.mark.parametrize("text, want", [
    ("/model opus", ["/", "model opus"]),
    ("  /clear", ["  /", "clear"]),
    ("//x", ["//", "x"]),
    ("/ /", ["/ /"]),                   # no command name: left as it is
    ("hello /model", ["hello /model"]),
    ("", [""]),
])
def test_not_a_command_splits_only_a_leading_slash(text, want):
    got = P.user_line([{"type": "text", "text": text}])["message"]["content"]
    assert [b["text"] for b in got] == want
    assert "".join(b["text"] for b in got) == text


def test_not_a_command_looks_at_the_last_block_only():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    blocks = [{"type": "text", "text": "/model opus"}, image]
    assert P.not_a_command(blocks) == blocks          # the CLI runs nothing for these
    got = P.not_a_command([image, {"type": "text", "text": "/init", "cache_control": {"x": 1}}])
    assert got == [image, {"type": "text", "text": "/"},
                   {"type": "text", "text": "init", "cache_control": {"x": 1}}]


# -- permission requests --------------------------------------------------------------------------

class Lines:
    """A stand-in CLIProcess that records what the proxy writes to it."""

    def __init__(self, web_tools=()):
        self.sent, self.launch = [], P.Launch(web_tools=tuple(web_tools))

    def send(self, *objs):
        self.sent.extend(objs)

    def answers(self):
        return {o["response"]["request_id"]: o["response"]["response"] for o in self.sent
                if o.get("type") == "control_response"}


def held_bridge():
    req = P.Request(model="sonnet", cli_model="sonnet", handler=P.HANDLERS["native"],
                    tools=[P.ToolSpec("get_weather", "", {"type": "object"})],
                    messages=[P.Message("user", [{"type": "text", "text": "hi"}])])
    return P.ToolBridge(req, hold=True)


def ask_permission(bridge, proc, rid, name, tid):
    bridge.on_control(proc, {"type": "control_request", "request_id": rid, "request": {
        "subtype": "can_use_tool", "tool_name": name, "input": {"x": 1}, "tool_use_id": tid}})


def stream_call(bridge, proc, tid):
    for ev in ({"type": "message_start", "message": {"usage": {}}},
               {"type": "content_block_start", "index": 0, "content_block": {
                   "type": "tool_use", "id": tid, "name": "mcp__client__get_weather", "input": {}}},
               {"type": "content_block_stop", "index": 0}):
        list(bridge.on_stream(proc, ev))


def test_a_held_turn_allows_the_clients_own_tool():
    bridge, proc = held_bridge(), Lines()
    stream_call(bridge, proc, "toolu_1")
    ask_permission(bridge, proc, "r1", "mcp__client__get_weather", "toolu_1")
    list(bridge.on_stream(proc, {"type": "message_stop"}))
    assert proc.answers() == {"r1": {"behavior": "allow", "updatedInput": {"x": 1}}}


@pytest.mark.parametrize("name", ["Bash", "mcp__client__other_tool", "WebFetch", "mcp__other__x"])
def test_a_held_turn_denies_every_other_tool(name):
    """Nothing but the client's offered tools is allowed; the turn is stopped, not held."""
    bridge, proc = held_bridge(), Lines()
    stream_call(bridge, proc, "toolu_1")
    ask_permission(bridge, proc, "r1", "mcp__client__get_weather", "toolu_1")
    ask_permission(bridge, proc, "r2", name, "toolu_2")
    list(bridge.on_stream(proc, {"type": "message_stop"}))
    deny = {"behavior": "deny", "message": P.DENY_MESSAGE, "interrupt": True}
    assert proc.answers() == {"r1": deny, "r2": deny}
    assert not bridge.hold and not bridge.waiting


def test_a_plain_turn_refuses_every_permission_request():
    proc = Lines()
    P.refuse(proc, "r1")
    assert proc.sent[0]["response"]["subtype"] == "error"


# -- WebFetch's address guard ---------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8088/v1/usage", "http://localhost/", "http://[::1]/", "http://0.0.0.0/",
    "http://2130706433/", "http://0x7f.1/", "http://[::ffff:127.0.0.1]/",
    "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1/", "http://100.64.0.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[fe80::1]/",
    "http://[fc00::1]/", "http://[64:ff9b::a9fe:a9fe]/", "http://metadata.google.internal/x",
    "http://METADATA.google.internal./x", "file:///etc/passwd", "ftp://example.com/",
    "gopher://example.com/", "http:///nohost", "not a url"])
def test_web_fetch_refuses_internal_addresses_and_other_schemes(url):
    assert P.web_fetch_refusal(url) is not None


def fixed_resolver(address):
    return lambda host, port, **kw: [(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                      socket.SOCK_STREAM, 6, "", (address, port))]


def test_web_fetch_judges_a_name_by_every_address_it_resolves_to():
    assert P.web_fetch_refusal("https://docs.example.com/a", fixed_resolver("93.184.216.34")) is None
    assert P.web_fetch_refusal("https://docs.example.com/a", fixed_resolver("2606:2800:220:1::1")) is None
    refused = P.web_fetch_refusal("https://docs.example.com/a", fixed_resolver("10.1.2.3"))
    assert refused == "the address of docs.example.com is private (10.1.2.3)"

    def two(host, port, **kw):
        return fixed_resolver("93.184.216.34")(host, port) + fixed_resolver("127.0.0.1")(host, port)
    assert "loopback" in P.web_fetch_refusal("http://docs.example.com/", two)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1\\@docs.example.com/", "http://docs.example.com\\@127.0.0.1/",
    "http://user:pw@docs.example.com/", "http://127.0.0.1 @docs.example.com/",
    "http://docs.example.com/\tx", "http://docs.example.com/\x7f"])
def test_web_fetch_refuses_urls_the_cli_may_read_another_way(url):
    """Node's WHATWG parser reads http://127.0.0.1\\@docs.example.com/ as host 127.0.0.1, Python's
    urlsplit as docs.example.com: a URL the two could read apart is refused, whatever it resolves to."""
    assert P.web_fetch_refusal(url, fixed_resolver("93.184.216.34")) is not None


def test_web_fetch_lets_through_a_public_looking_name_that_resolves_nowhere():
    """The CLI asks the same resolver and finds nothing either (no connection is made here)."""
    def nowhere(host, port, **kw):
        raise socket.gaierror(-2, "Name or service not known")
    assert P.web_fetch_refusal("https://docs.example-public-site.invalid/page", nowhere) is None


def test_web_tool_permission_answers():
    proc = Lines(web_tools=("WebSearch", "WebFetch"))
    for rid, name, url in (("r1", "WebFetch", "http://127.0.0.1:1/"), ("r2", "WebSearch", None),
                           ("r3", "WebFetch", "https://8.8.8.8/")):
        P.web_tool_permission(proc, {"request_id": rid, "request": {
            "subtype": "can_use_tool", "tool_name": name, "input": {"url": url, "prompt": "p"}}})
    got = proc.answers()
    assert got["r1"] == {"behavior": "deny", "message": "claude-proxy does not fetch the address "
                         "of 127.0.0.1 is loopback (127.0.0.1)"}
    assert got["r2"]["behavior"] == got["r3"]["behavior"] == "allow"
    only_search = Lines(web_tools=("WebSearch",))
    P.web_tool_permission(only_search, {"request_id": "r4", "request": {
        "tool_name": "WebFetch", "input": {"url": "https://8.8.8.8/"}}})
    assert only_search.answers()["r4"]["behavior"] == "deny"


@pytest.fixture
def listener():
    """A local TCP listener that counts the connections it is offered."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    hits, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            hits.append(conn.recv(200))
            conn.close()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()[1], hits
    stop.set()
    t.join(2)
    server.close()


def test_a_prompt_cannot_make_the_server_fetch_a_local_url(make_proxy, upstream, listener):
    port, hits = listener
    url = "http://127.0.0.1:%d/internal-secret" % port
    upstream.push(fake_upstream.Reply(blocks=[{"type": "tool_use", "id": "toolu_wf1", "name": "WebFetch",
                                               "input": {"url": url, "prompt": "what does it say?"}}],
                                      stop_reason="tool_use", id="msg_wf1"),
                  fake_upstream.Reply(blocks=[{"type": "text", "text": "I could not fetch it."}],
                                      id="msg_wf2"))
    p = make_proxy(CLAUDE_PROXY_WEB_TOOLS="all", CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    try:
        status, _, out = p.post("/v1/messages", {
            "model": "claude-sonnet-4-6", "max_tokens": 100,
            "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
            "messages": [{"role": "user", "content": "Read %s" % url}]})
        assert status == 200, out
        assert [b["text"] for b in out["content"] if b["type"] == "text"] == ["I could not fetch it."]
        calls = upstream.model_calls
        assert len(calls) == 2
        result = [b for m in calls[1]["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                  for b in m["content"] if b.get("type") == "tool_result"]
        assert len(result) == 1 and result[0]["tool_use_id"] == "toolu_wf1"
        assert "claude-proxy does not fetch the address of 127.0.0.1 is loopback" in json.dumps(result)
        time.sleep(0.5)
        assert hits == []
    finally:
        p.stop()


# -- a CLI that stops reading ---------------------------------------------------------------------

def test_a_cli_that_stops_reading_fails_the_request_and_is_ended(fake_proxy):
    """The second write (the rest of the history, 2 MB) finds a full pipe: the request fails
    within the request timeout (the fixture's 4 s) with a clear 502, the CLI is killed, and the
    proxy answers the next request."""
    from conftest import no_leftover_cli
    with no_leftover_cli(fake_proxy.pids):
        status, _, body = fake_proxy.post(CHAT, {"model": "sonnet", "messages": [
            {"role": "user", "content": "[[deaf]] first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "x" * 2_000_000}]}, timeout=30)
    assert status == 502, body
    assert "stopped reading its input" in body["error"]["message"]
    assert "Traceback" not in fake_proxy.log
    status, _, body = fake_proxy.post(CHAT, {"model": "sonnet",
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "fake answer"


def test_web_fetch_asks_even_for_the_hosts_the_cli_pre_approves(home, upstream, listener):
    """The CLI fetches from its own list of documentation hosts (docs.python.org, ...) without a
    permission request; the proxy's launch makes it ask for those too.  The CLI's HTTP(S)
    proxy is a local listener, so nothing leaves this machine whatever it does."""
    import tempfile
    from conftest import base_env, real_claude_bin
    from test_reuse import NoClient
    port, hits = listener
    local = "http://127.0.0.1:%d" % port
    cfg = P.load_config([], base_env(home, upstream.url, real_claude_bin(), HTTP_PROXY=local,
                                     HTTPS_PROXY=local, NO_PROXY="127.0.0.1"))[0]
    upstream.push(fake_upstream.Reply(blocks=[{"type": "tool_use", "id": "toolu_pa1", "name": "WebFetch",
                                               "input": {"url": "https://docs.python.org/3/", "prompt": "p"}}],
                                      stop_reason="tool_use", id="msg_pa1"),
                  fake_upstream.Reply(blocks=[{"type": "text", "text": "ok"}], id="msg_pa2"))
    proc = P.CLIProcess(cfg, P.Launch(web_tools=("WebFetch",)), tempfile.mkdtemp())
    try:
        proc.send(P.control("init", {"subtype": "initialize", "systemPrompt": "s"}),
                  P.user_line([{"type": "text", "text": "read the docs"}]))
        asked = []
        for item in proc.read(NoClient()):
            if isinstance(item, dict) and item.get("type") == "control_request":
                asked.append(item["request"].get("tool_name"))
                proc.send({"type": "control_response", "response": {
                    "subtype": "success", "request_id": item["request_id"],
                    "response": {"behavior": "deny", "message": "not here"}}})
            if isinstance(item, dict) and item.get("type") == "result":
                break
        assert asked == ["WebFetch"]
        assert hits == []
    finally:
        proc.close()
