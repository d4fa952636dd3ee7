"""Stored responses, previous_response_id, conversations and background runs (section 11, on the
state store of section 12): the official openai SDK -> proxy -> real CLI -> fake upstream.

Which process answered a turn is seen through /health (idle kept hits) and through what the
upstream received: a turn continued on its kept process sends only the new message, and the
upstream request extends the previous one.
"""
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import openai
import pytest
from openai.types.responses import Response

import fake_upstream
from conftest import FAKE_CLAUDE, PROXY, Gate, Proxy, base_env, sse_events, upstream_turns
from test_pool import health, poll

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CALL_TEXT = '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'


@pytest.fixture
def start(make_proxy, tmp_path):
    """A proxy of its own (own state directory, no pool), stopped after the test."""
    started = []

    def make(fake=False, **env):
        env.setdefault("CLAUDE_PROXY_POOL_SIZE", 0)
        env.setdefault("CLAUDE_PROXY_STATE_DIR", tmp_path / "state")
        p = make_proxy(fake=fake, **env)
        started.append(p)
        return p
    yield make
    for p in started:
        p.stop()


def sdk(proxy, key="x"):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def texts(call):
    return [(role, "\n".join(b.get("text", "") for b in blocks if b.get("type") == "text"))
            for role, blocks in upstream_turns(call)]


def kept_hits(proxy):
    return health(proxy)["idle"]["hits"]["kept"]


# -- stored responses ------------------------------------------------------------------------

@pytest.mark.parametrize("limit", ["\u00b2", "\u0661", "\uff15", "0" * 5000 + "5", "0", "101", "-1"],
                         ids=["superscript", "arabic-indic", "fullwidth", "5001-digits", "0",
                              "101", "-1"])
def test_list_limit_that_is_not_1_to_100_in_ascii_digits_is_a_400(limit):
    """isdigit() alone took superscripts and other scripts' digits, and 5,000 digits, that
    int() then refused (a 500)."""
    sys.path.insert(0, str(PROXY.parent))
    import claude_openai_proxy as cop
    items = [{"id": "item_%d" % i} for i in range(3)]
    with pytest.raises(cop.BadRequest) as err:
        cop.list_page(items, {"limit": [limit]})
    assert err.value.param == "limit" and str(err.value) == "limit must be an integer from 1 to 100"
    assert [i["id"] for i in cop.list_page(items, {"limit": ["002"]})["data"]] == ["item_2", "item_1"]


def test_retrieve_input_items_and_delete(start, upstream):
    p = start()
    c = sdk(p)
    upstream.push(fake_upstream.text("Bonjour!"))
    items = [{"role": "developer", "content": "Answer in French."}] + [
        {"role": "user", "content": "Part %d." % i} for i in range(4)]
    created = c.responses.create(model="sonnet", input=items, metadata={"k": "v"})
    assert created.store is True and created.id.startswith("resp_")
    got = c.responses.retrieve(created.id)
    assert got.model_dump() == created.model_dump()
    listed = c.responses.input_items.list(created.id, order="asc")
    assert [i.content[0].text for i in listed.data] == ["Answer in French."] + [
        "Part %d." % i for i in range(4)]
    assert listed.has_more is False and listed.first_id == listed.data[0].id
    # pagination as the API defines it: newest first by default, limit, after, before
    page = c.responses.input_items.list(created.id, limit=2)
    assert [i.content[0].text for i in page.data] == ["Part 3.", "Part 2."] and page.has_more
    every = [i.content[0].text for i in c.responses.input_items.list(created.id, limit=2)]
    assert every == ["Part 3.", "Part 2.", "Part 1.", "Part 0.", "Answer in French."]
    status, _, body = p.request("GET", "/v1/responses/%s/input_items?order=asc&before=%s&limit=2"
                                % (created.id, listed.data[3].id))
    assert status == 200 and [i["content"][0]["text"] for i in body["data"]] == ["Part 0.", "Part 1."]
    assert body["has_more"] is True and body["last_id"] == listed.data[2].id
    status, _, body = p.request("GET", "/v1/responses/%s/input_items?limit=0" % created.id)
    assert status == 400 and body["error"]["param"] == "limit"
    # "²" passes str.isdigit() and int() refuses it: it was a 500
    status, _, body = p.request("GET", "/v1/responses/%s/input_items?limit=%%C2%%B2" % created.id)
    assert status == 400 and body["error"]["param"] == "limit", body
    # not a background response: its stream is rebuilt in a few events
    events = list(c.responses.retrieve(created.id, stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == [0, 1, 2, 3, 4]
    assert events[-1].response.model_dump() == created.model_dump()
    assert [e.type for e in c.responses.retrieve(created.id, stream=True, starting_after=2)] == [
        "response.output_item.done", "response.completed"]
    c.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.retrieve(created.id)
    assert err.value.body["message"] == "Response with id '%s' not found." % created.id
    with pytest.raises(openai.NotFoundError):
        c.responses.delete(created.id)


def test_a_response_belongs_to_the_key_that_made_it(start, upstream):
    p = start(CLAUDE_PROXY_API_KEYS="key-one-0123456789,key-two-0123456789")
    one, two = sdk(p, "key-one-0123456789"), sdk(p, "key-two-0123456789")
    upstream.push(fake_upstream.text("Mine."))
    r = one.responses.create(model="sonnet", input="hi")
    conv = one.conversations.create(items=[{"role": "user", "content": "private"}])
    for call in (lambda: two.responses.retrieve(r.id), lambda: two.responses.delete(r.id),
                 lambda: two.responses.input_items.list(r.id),
                 lambda: two.responses.create(model="sonnet", input="go on",
                                              previous_response_id=r.id),
                 lambda: two.conversations.retrieve(conv.id),
                 lambda: two.conversations.items.list(conv.id),
                 lambda: two.responses.create(model="sonnet", input="go on", conversation=conv.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert one.responses.retrieve(r.id).output_text == "Mine."      # still there for its owner
    assert len(upstream.model_calls) == 1


def test_store_false_keeps_nothing_and_cannot_be_continued(start, upstream, tmp_path):
    p = start()
    c = sdk(p)
    upstream.push(fake_upstream.text("Forgotten."))
    r = c.responses.create(model="sonnet", input="hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.create(model="sonnet", input="more", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id"
    db = sqlite3.connect(str(tmp_path / "state" / "claude-proxy.db"))
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone() == (0,)
    db.close()


# -- previous_response_id ----------------------------------------------------------------------

def test_a_chain_continues_on_its_kept_process(start, upstream):
    """No session signal: the stored response names the conversation, whose process takes the
    next turn with only the new message; the upstream request extends the previous one."""
    p = start(CLAUDE_PROXY_SESSIONS=2)
    c = sdk(p)
    prev, calls = None, []
    for i in range(3):
        upstream.push(fake_upstream.text("Answer %d." % i))
        r = c.responses.create(model="sonnet", input="Question %d." % i, instructions="Be brief.",
                               previous_response_id=prev)
        assert r.output_text == "Answer %d." % i and r.previous_response_id == prev
        prev = r.id
        calls.append(upstream.model_calls[-1]["messages"])
    assert kept_hits(p) == 2
    assert texts({"messages": calls[2]}) == [
        ("user", "Question 0."), ("assistant", "Answer 0."), ("user", "Question 1."),
        ("assistant", "Answer 1."), ("user", "Question 2.")]
    for before, after in zip(calls, calls[1:]):       # each request extends the one before
        strip = lambda ms: [{"role": m["role"], "content": [
            {k: v for k, v in b.items() if k != "cache_control"} for b in
            (m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])]}
            for m in ms]
        assert strip(after)[:len(before)] == strip(before)


def test_stored_one_shot_responses_do_not_push_a_conversation_out(start, upstream):
    """Being stored is no session signal: stored first messages are kept `first`, outside
    CLAUDE_PROXY_SESSIONS, so a Chat Completions conversation with history stays kept."""
    from test_pool import children
    from test_sessions import CHAT, chat_turns
    p = start(CLAUDE_PROXY_SESSIONS=1, CLAUDE_PROXY_IDLE_MAX=5)
    conversation, _ = chat_turns(p, upstream, 1, prefix="A")
    (a_pid,) = children(p)
    c = sdk(p)
    for instructions in ("Be brief.", "Be kind."):        # other settings: each its own process
        upstream.push(fake_upstream.text("Shot."))
        assert c.responses.create(model="sonnet", input="One-shot.",
                                  instructions=instructions).output_text == "Shot."
    poll(lambda: health(p)["concurrency"]["running"] == 0, "the turns to end", 30)
    h = health(p)
    assert h["idle"]["evicted"] == 0 and a_pid in children(p)
    conversation.append({"role": "user", "content": "Back to A."})
    upstream.push(fake_upstream.text("A again."))
    status, _, _ = p.post(CHAT, {"model": "sonnet", "messages": conversation})
    assert status == 200 and kept_hits(p) == 1


def test_a_chain_is_replayed_when_its_process_is_gone(start, upstream):
    p = start(CLAUDE_PROXY_SESSIONS=0)
    c = sdk(p)
    upstream.push(fake_upstream.text("First answer."))
    r1 = c.responses.create(model="sonnet", input="First question.")
    upstream.push(fake_upstream.text("Second answer."))
    r2 = c.responses.create(model="sonnet", input="Second question.", previous_response_id=r1.id,
                            instructions="New rules.")
    assert r2.output_text == "Second answer." and r2.instructions == "New rules."
    assert kept_hits(p) == 0
    call = upstream.model_calls[-1]
    assert texts(call) == [("user", "First question."), ("assistant", "First answer."),
                           ("user", "Second question.")]
    assert "New rules." in " ".join(b["text"] for b in call["system"])


def test_changed_instructions_are_not_inherited_and_go_to_another_process(start, upstream):
    p = start(CLAUDE_PROXY_SESSIONS=2)
    c = sdk(p)
    upstream.push(fake_upstream.text("Un."))
    r1 = c.responses.create(model="sonnet", input="One?", instructions="Answer in French.")
    upstream.push(fake_upstream.text("Two."))
    c.responses.create(model="sonnet", input="Two?", previous_response_id=r1.id)
    assert kept_hits(p) == 0                        # other settings: the history is replayed
    call = upstream.model_calls[-1]
    assert "Answer in French." not in json.dumps(call["system"])
    assert texts(call) == [("user", "One?"), ("assistant", "Un."), ("user", "Two?")]


@pytest.mark.parametrize("module", ["generic", "native"])
def test_a_function_call_across_the_chain(start, upstream, module):
    """The model calls a tool; the client sends only the tool's output with
    previous_response_id; the model's next turn sees its call and the result."""
    p = start(CLAUDE_PROXY_SESSIONS=2, CLAUDE_PROXY_TOOLCALL_MODULE=module)
    c = sdk(p)
    upstream.push(fake_upstream.text("Let me check." + ("\n" + CALL_TEXT if module == "generic" else ""))
                  if module == "generic" else
                  fake_upstream.tool_use("mcp__client__get_weather", {"city": "Paris"}, id="toolu_w1",
                                         before="Let me check."))
    r1 = c.responses.create(model="sonnet", input="Weather in Paris?", tools=[WEATHER])
    fc = [o for o in r1.output if o.type == "function_call"][0]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris"}
    upstream.push(fake_upstream.text("It is 21 degrees.", id="msg_two"))
    r2 = c.responses.create(model="sonnet", tools=[WEATHER], previous_response_id=r1.id, input=[
        {"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp": 21}'}])
    assert r2.output_text == "It is 21 degrees."
    turns = upstream_turns(upstream.model_calls[-1])
    assert "Weather in Paris?" in json.dumps(turns[0]) and "temp" in json.dumps(turns[-1])
    upstream.push(fake_upstream.text("You are welcome.", id="msg_three"))
    r3 = c.responses.create(model="sonnet", tools=[WEATHER], previous_response_id=r2.id,
                            input="Thanks!")
    assert r3.output_text == "You are welcome."
    assert kept_hits(p) == 2                         # turns 2 and 3 on turn 1's process
    assert [role for role, _ in upstream_turns(upstream.model_calls[-1])][-1] == "user"


# -- conversations ---------------------------------------------------------------------------

def test_conversations_with_the_sdk(start, upstream):
    p = start()
    c = sdk(p)
    conv = c.conversations.create(metadata={"topic": "demo"}, items=[
        {"type": "message", "role": "user", "content": "My name is Ada."}])
    assert conv.object == "conversation" and conv.metadata == {"topic": "demo"}
    assert c.conversations.retrieve(conv.id).model_dump() == conv.model_dump()
    assert c.conversations.update(conv.id, metadata={"topic": "new"}).metadata == {"topic": "new"}
    upstream.push(fake_upstream.text("Hello Ada."))
    r = c.responses.create(model="sonnet", input="Greet me.", conversation=conv.id)
    assert r.output_text == "Hello Ada." and r.conversation.id == conv.id
    assert texts(upstream.model_calls[-1]) == [("user", "My name is Ada.\nGreet me.")]
    items = list(c.conversations.items.list(conv.id, order="asc"))
    assert [i.type for i in items] == ["message", "message", "message"]
    assert [i.role for i in items] == ["user", "user", "assistant"]
    assert items[2].content[0].text == "Hello Ada." and items[2].id == r.output[0].id
    added = c.conversations.items.create(conv.id, items=[
        {"type": "message", "role": "user", "content": "Remember: blue."}])
    assert added.first_id == added.last_id == added.data[0].id and added.has_more is False
    got = c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert got.content[0].text == "Remember: blue."
    page = c.conversations.items.list(conv.id, limit=2)           # newest first
    assert [i.id for i in page.data] == [added.data[0].id, items[2].id] and page.has_more
    upstream.push(fake_upstream.text("Blue, Ada."))
    r2 = c.responses.create(model="sonnet", input="What do you remember?",
                            conversation={"id": conv.id})
    assert r2.output_text == "Blue, Ada."
    assert texts(upstream.model_calls[-1]) == [
        ("user", "My name is Ada.\nGreet me."), ("assistant", "Hello Ada."),
        ("user", "Remember: blue.\nWhat do you remember?")]
    assert c.conversations.items.delete(items[0].id, conversation_id=conv.id).id == conv.id
    with pytest.raises(openai.NotFoundError):
        c.conversations.items.retrieve(items[0].id, conversation_id=conv.id)
    assert len(list(c.conversations.items.list(conv.id))) == 5
    deleted = c.conversations.delete(conv.id)
    assert deleted.deleted is True and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="sonnet", input="again", conversation=conv.id)


def test_conversation_bad_input_is_a_400(start, upstream):
    p = start()
    for body, param in (({"metadata": "x"}, "metadata"), ({"items": "x"}, "items"),
                        ({"items": [{"type": "nonsense"}]}, "input[0]"),
                        ({"items": [{"role": "user", "content": "x"}] * 21}, "items")):
        status, _, got = p.post("/v1/conversations", body)
        assert status == 400 and got["error"]["param"] == param, got
    status, _, got = p.post("/v1/responses", {"model": "sonnet", "input": "x", "conversation": "conv_a",
                                              "previous_response_id": "resp_b"})
    assert status == 400 and got["error"]["param"] == "conversation"
    assert len(upstream.model_calls) == 0


# -- background runs ---------------------------------------------------------------------------

def test_background_poll_until_completed(start, upstream):
    p = start()
    c = sdk(p)
    upstream.push(fake_upstream.text("Slow but sure.", chunks=10, delay=0.2))
    r = c.responses.create(model="sonnet", input="Take your time.", background=True)
    assert r.status == "queued" and r.background is True
    seen = {r.status}
    while r.status in ("queued", "in_progress"):
        time.sleep(0.1)
        r = c.responses.retrieve(r.id)
        seen.add(r.status)
    assert r.status == "completed" and r.output_text == "Slow but sure."
    assert "in_progress" in seen
    # the run's events are kept: a stream resumes after any of them
    events = list(c.responses.retrieve(r.id, stream=True, starting_after=3))
    assert events[0].sequence_number == 4 and events[-1].type == "response.completed"
    assert "".join(e.delta for e in c.responses.retrieve(r.id, stream=True)
                   if e.type == "response.output_text.delta") == "Slow but sure."


def test_background_cancel_ends_the_cli(start, upstream):
    p = start()
    c = sdk(p)
    upstream.push(fake_upstream.text("word " * 200, chunks=200, delay=0.1))
    r = c.responses.create(model="sonnet", input="Write a lot.", background=True)
    poll(lambda: c.responses.retrieve(r.id).status == "in_progress", "the run to start", 30)
    cancelled = c.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    assert c.responses.retrieve(r.id).status == "cancelled"
    assert c.responses.cancel(r.id).status == "cancelled"          # cancelling again: as it is
    poll(lambda: health(p)["concurrency"]["running"] == 0, "the slot to be free", 10)
    from test_pool import children
    poll(lambda: not children(p), "the CLI to end", 10)
    upstream.push(fake_upstream.text("Plain."))
    plain = c.responses.create(model="sonnet", input="hi")
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(plain.id)


def test_background_stream_resumes_with_starting_after(start, upstream):
    p = start()
    c = sdk(p)
    upstream.push(fake_upstream.text("One two three four five six.", chunks=6, delay=0.2))
    stream = c.responses.create(model="sonnet", input="Count.", background=True, stream=True)
    first = []
    for ev in stream:
        first.append(ev)
        if ev.type == "response.output_text.delta":
            break                                           # the connection drops here
    stream.close()
    rid, last = first[0].response.id, first[-1].sequence_number
    rest = list(c.responses.retrieve(rid, stream=True, starting_after=last))
    assert rest[0].sequence_number == last + 1
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == "One two three four five six."
    assert rest[-1].type == "response.completed"
    assert c.responses.retrieve(rid).output_text == text


def test_a_background_run_that_fails_before_its_first_event_streams_why(start):
    """A CLI that refuses the request before any event: the creating stream, a later
    GET ?stream=true and GET all say failed, with the reason (not an empty 200)."""
    p = start(fake=True, FAKE_CLAUDE_REFUSE_INIT="1", CLAUDE_PROXY_PASS_ENV="FAKE_CLAUDE_REFUSE_INIT")
    status, _, text = p.post("/v1/responses", {"model": "sonnet", "input": "hi",
                                                "background": True, "stream": True})
    assert status == 200
    events = [json.loads(data) for _name, data in sse_events(text)]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress",
                                           "response.failed"]
    assert [e["sequence_number"] for e in events] == [0, 1, 2]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "refused the request settings" in failed["error"]["message"]
    rid = failed["id"]
    status, _, again = p.request("GET", "/v1/responses/%s?stream=true" % rid)
    assert status == 200 and [json.loads(d) for _n, d in sse_events(again)] == events
    status, _, got = p.request("GET", "/v1/responses/" + rid)
    assert status == 200 and got == failed


def test_starting_after_must_be_a_sequence_number(start):
    p = start(fake=True)
    status, _, r = p.post("/v1/responses", {"model": "sonnet", "input": "hi"})
    assert status == 200 and r["status"] == "completed"
    for bad in ("-3", "-1", "x", "1.5"):
        status, _, body = p.request("GET", "/v1/responses/%s?stream=true&starting_after=%s"
                                    % (r["id"], bad))
        assert status == 400 and body["error"]["param"] == "starting_after", (bad, body)
    status, _, text = p.request("GET", "/v1/responses/%s?stream=true&starting_after=2" % r["id"])
    assert status == 200
    assert [json.loads(d)["sequence_number"] for _n, d in sse_events(text)][0] == 3


def test_a_background_run_whose_end_cannot_be_saved_is_served_as_it_ended(start, tmp_path):
    """The store is locked (another writer) when the run ends: its save fails after the busy
    timeout (half a second here), and GET serves the run's end, not the in_progress row."""
    p = start(fake=True, CLAUDE_PROXY_STORE_BUSY_TIMEOUT=0.5)
    status, _, r = p.post("/v1/responses", {"model": "sonnet", "input": "[[slow:40]]",
                                            "background": True})
    assert status == 200 and r["status"] == "queued"

    def got():
        status, _, body = p.request("GET", "/v1/responses/" + r["id"])
        assert status == 200, body
        return body
    poll(lambda: got()["status"] == "in_progress", "the run to start", 30)
    db = sqlite3.connect(str(tmp_path / "state" / "claude-proxy.db"), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")               # every write of the proxy's fails now
    try:
        poll(lambda: got()["status"] != "in_progress", "the run to end", 40)
        end = got()
        assert end["status"] == "completed" and end["output"][0]["content"][0]["text"] == \
            "".join("tick%d " % i for i in range(40))
    finally:
        db.execute("ROLLBACK")
        db.close()


def test_a_streamed_response_is_stored_from_its_first_event(start):
    """Its id is the client's at response.created: GET serves it in_progress from then on, and
    incomplete, as far as it got, once the client leaves before the end."""
    p = start(fake=True)
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
    conn.request("POST", "/v1/responses", json.dumps({"model": "sonnet", "input": "[[slow:200]]",
                                                      "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    line = b""
    while not line.startswith(b"data: "):
        line = resp.readline()
    created = json.loads(line[6:])
    assert created["type"] == "response.created"
    rid = created["response"]["id"]
    status, _, got = p.request("GET", "/v1/responses/" + rid)
    assert status == 200 and got["status"] == "in_progress"
    conn.close()                                    # the client leaves mid-answer
    poll(lambda: p.request("GET", "/v1/responses/" + rid)[2]["status"] != "in_progress",
         "the response to be kept as it stood", 30)
    status, _, got = p.request("GET", "/v1/responses/" + rid)
    assert status == 200 and got["status"] == "incomplete" and got["id"] == rid


def test_a_conversation_deleted_mid_turn_still_keeps_the_response(start):
    p = start(fake=True)
    status, _, conv = p.post("/v1/conversations", {})
    assert status == 200
    out, gate = {}, Gate(p.env["HOME"])             # the turn runs until the gate opens
    t = threading.Thread(target=lambda: out.update(r=p.post("/v1/responses", {
        "model": "sonnet", "input": gate.text, "conversation": conv["id"]})))
    t.start()
    poll(lambda: health(p)["concurrency"]["running"] == 1, "the turn to run", 30)
    status, _, gone = p.request("DELETE", "/v1/conversations/" + conv["id"])
    assert status == 200 and gone["deleted"] is True
    assert t.is_alive(), "the turn was still running when its conversation was deleted"
    gate.open()
    t.join(60)
    status, _, r = out["r"]
    assert status == 200 and r["status"] == "completed"
    status, _, got = p.request("GET", "/v1/responses/" + r["id"])
    assert status == 200 and got == r


def test_background_runs_are_capped_with_a_429(start):
    """At most CLAUDE_PROXY_MAX_CONCURRENCY + 8 (BACKGROUND_QUEUE) runs live at once; the next
    create is a 429 in OpenAI's shape that stores nothing, and a cancelled run frees its place."""
    p = start(fake=True, CLAUDE_PROXY_MAX_CONCURRENCY=1)
    made = []
    for i in range(9):
        status, _, r = p.post("/v1/responses", {"model": "sonnet", "input": "[[slow:400]] %d" % i,
                                                "background": True})
        assert status == 200 and r["status"] == "queued", r
        made.append(r["id"])
    status, headers, err = p.post("/v1/responses", {"model": "sonnet", "input": "one more",
                                                    "background": True})
    assert status == 429 and err["error"]["code"] == "rate_limit_exceeded", err
    assert err["error"]["message"] == ("Too many background responses are running or queued "
                                       "(9 on this proxy); wait for one to finish or cancel one.")
    assert headers["Retry-After"] == "1"
    status, _, cancelled = p.post("/v1/responses/%s/cancel" % made[-1], {})
    assert status == 200 and cancelled["status"] == "cancelled"
    status, _, r = p.post("/v1/responses", {"model": "sonnet", "input": "[[slow:400]] last",
                                            "background": True})
    assert status == 200 and r["status"] == "queued"
    for rid in made[:-1] + [r["id"]]:
        assert p.post("/v1/responses/%s/cancel" % rid, {})[2]["status"] == "cancelled"
    poll(lambda: health(p)["concurrency"]["running"] == 0, "the slot to be free", 30)


def test_one_key_holds_at_most_half_of_the_background_places(start):
    one, two = "background-key-one-0123", "background-key-two-4567"
    p = start(fake=True, CLAUDE_PROXY_MAX_CONCURRENCY=1, CLAUDE_PROXY_API_KEYS=one + "," + two)

    def create(key, text):
        return p.post("/v1/responses", {"model": "sonnet", "input": "[[slow:400]] " + text,
                                        "background": True},
                      headers={"Authorization": "Bearer " + key})
    made = []
    for i in range(4):                                     # (1 + 8) // 2
        status, _, r = create(one, "one %d" % i)
        assert status == 200 and r["status"] == "queued", r
        made.append((one, r["id"]))
    status, _, err = create(one, "one more")
    assert status == 429 and err["error"]["message"] == (
        "Too many background responses are running or queued (4 for this key); wait for one to "
        "finish or cancel one.")
    status, _, r = create(two, "two")
    assert status == 200 and r["status"] == "queued"
    made.append((two, r["id"]))
    for key, rid in made:
        assert p.post("/v1/responses/%s/cancel" % rid, {},
                      headers={"Authorization": "Bearer " + key})[2]["status"] == "cancelled"
    from test_pool import children
    poll(lambda: not children(p), "the CLIs to end", 30)


def test_a_background_run_the_store_cannot_start_ends_failed(start, tmp_path):
    """A run waiting for the only slot when the store locks: its in_progress write fails after
    the busy timeout (half a second here: each write waits it out), and so does saving its
    failure; GET serves it failed, not queued forever."""
    p = start(fake=True, CLAUDE_PROXY_MAX_CONCURRENCY=1, CLAUDE_PROXY_STORE_BUSY_TIMEOUT=0.5)

    def create(text):
        status, _, r = p.post("/v1/responses", {"model": "sonnet", "input": text,
                                                "background": True})
        assert status == 200 and r["status"] == "queued", r
        return r["id"]

    def got(rid):
        status, _, body = p.request("GET", "/v1/responses/" + rid)
        assert status == 200, body
        return body
    first = create("[[slow:40]]")
    poll(lambda: got(first)["status"] == "in_progress", "the first run to start", 30)
    second = create("second")                       # waits for the slot
    db = sqlite3.connect(str(tmp_path / "state" / "claude-proxy.db"), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")                   # every write of the proxy's fails now
    try:
        poll(lambda: got(second)["status"] not in ("queued", "in_progress"),
             "the second run to end", 90)
        end = got(second)
        assert end["status"] == "failed" and end["error"]["code"] == "server_error"
        assert end["error"]["message"].startswith("This background response stopped before it "
                                                  "finished")
    finally:
        db.execute("ROLLBACK")
        db.close()


def test_a_restart_marks_a_running_background_response_failed(start, upstream, tmp_path):
    p = start(CLAUDE_PROXY_INSTANCE="one")
    c = sdk(p)
    upstream.push(fake_upstream.text("never finished", stall=60))
    r = c.responses.create(model="sonnet", input="Long job.", background=True)
    assert r.id.startswith("resp_one_")
    poll(lambda: c.responses.retrieve(r.id).status == "in_progress", "the run to start", 30)
    p.proc.kill()                                   # no chance to clean up
    p.proc.wait(10)
    again = start(CLAUDE_PROXY_INSTANCE="one")
    got = sdk(again).responses.retrieve(r.id)
    assert got.status == "failed" and got.error.code == "server_error"
    assert got.error.message.startswith("The proxy restarted while this background response")
    assert "1 background response(s) were running when the proxy stopped" in again.log


def test_another_instances_id_is_a_404_that_names_it(start, upstream):
    p = start(CLAUDE_PROXY_INSTANCE="here")
    c = sdk(p)
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.retrieve("resp_there_AbC123")
    assert err.value.body["message"] == (
        "Response with id 'resp_there_AbC123' was made by claude-proxy instance 'there'; this is "
        "instance 'here'. Send requests for it to that instance (README: Several instances).")
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.create(model="sonnet", input="x", previous_response_id="resp_there_AbC123")
    assert err.value.body["param"] == "previous_response_id" and "'there'" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        c.conversations.retrieve("conv_there_AbC123")
    assert "instance 'there'" in err.value.body["message"]
    assert len(upstream.model_calls) == 0


def test_input_tokens_counts_the_stored_items_too(start, upstream):
    p = start()
    c = sdk(p)
    upstream.push(fake_upstream.text("A" * 400))
    r = c.responses.create(model="sonnet", input="B" * 400)
    alone = c.responses.input_tokens.count(model="sonnet", input="C" * 400)
    chained = c.responses.input_tokens.count(model="sonnet", input="C" * 400,
                                             previous_response_id=r.id)
    assert alone.object == "response.input_tokens"
    assert 100 <= alone.input_tokens < 150 and 300 <= chained.input_tokens < 400
    status, _, body = p.post("/v1/responses/compact", {"model": "sonnet", "input": "x"})
    assert status == 400 and "compaction item is OpenAI's encrypted format" in body["error"]["message"]


def test_store_off_keeps_nothing_and_says_so(start, upstream, tmp_path):
    p = start(CLAUDE_PROXY_STORE="off")
    c = sdk(p)
    upstream.push(fake_upstream.text("Stateless."))
    r = c.responses.create(model="sonnet", input="hi")
    assert r.store is False and r.output_text == "Stateless."
    for call in (lambda: c.responses.retrieve(r.id),
                 lambda: c.responses.create(model="sonnet", input="x", previous_response_id=r.id),
                 lambda: c.responses.create(model="sonnet", input="x", background=True),
                 lambda: c.conversations.create()):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert "off on this proxy (CLAUDE_PROXY_STORE=off)" in err.value.body["message"]
    assert not (tmp_path / "state").exists()
    assert health(p)["store"] == {"enabled": False, "path": None, "lost_writes": 0,
                                  "error": "the state store is off (CLAUDE_PROXY_STORE=off)"}


def test_sigkill_mid_write_loses_nothing_it_answered(start, tmp_path):
    """Stored requests from four clients while the proxy is SIGKILLed: after a restart the store
    opens, every response a client got back is there whole, and nothing else is half there."""
    p = start(fake=True, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_MAX_CONCURRENCY=4)
    answered, stop = [], threading.Event()

    def client(n):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                status, _, body = p.post("/v1/responses", {"model": "sonnet",
                                                           "input": "client %d request %d" % (n, i)},
                                         timeout=10)
            except OSError:
                return
            if status == 200:
                answered.append(body)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    poll(lambda: len(answered) >= 8, "some answers", 60)
    os.kill(p.proc.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(15)
    p.proc.wait(10)
    db = sqlite3.connect(str(tmp_path / "state" / "claude-proxy.db"))
    assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
    db.close()
    again = start(fake=True)
    assert health(again)["store"]["enabled"] is True
    for body in answered:
        status, _, got = again.request("GET", "/v1/responses/" + body["id"])
        assert status == 200 and got == body
    rows = sqlite3.connect(str(tmp_path / "state" / "claude-proxy.db")).execute(
        "SELECT status, input, body FROM responses").fetchall()
    assert len(rows) >= len(answered)
    for status, input_, body in rows:
        assert status == "completed" and json.loads(body)["output"][0]["content"][0]["text"]
        assert json.loads(input_)[0]["content"][0]["text"].startswith("client ")


# -- real clients, unmodified ---------------------------------------------------------------------

def test_openai_agents_chains_by_previous_response_id_and_conversation_id(start, upstream):
    """openai-agents with server-side state: previous_response_id across two runs (a function
    tool called mid-chain, its output sent as the only new item), then conversation_id."""
    import asyncio
    import agents
    from openai import AsyncOpenAI
    agents.set_tracing_disabled(True)
    p = start(CLAUDE_PROXY_SESSIONS=2)
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return "21 degrees in %s" % city

    async def main():
        client = AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        try:
            model = agents.OpenAIResponsesModel(model="claude-sonnet-4-6", openai_client=client)
            agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                              model=model)
            first = await agents.Runner.run(agent, "Weather in Paris?")
            second = await agents.Runner.run(agent, "And in Rome?",
                                          previous_response_id=first.last_response_id)
            conv = await client.conversations.create()
            third = await agents.Runner.run(agent, "My name is Ada.", conversation_id=conv.id)
            fourth = await agents.Runner.run(agent, "What is my name?", conversation_id=conv.id)
            return first, second, third, fourth
        finally:
            await client.close()

    upstream.push(fake_upstream.text(CALL_TEXT), fake_upstream.text("21 in Paris."),
                  fake_upstream.text(CALL_TEXT.replace("Paris", "Rome")),
                  fake_upstream.text("21 in Rome too."),
                  fake_upstream.text("Hello Ada."), fake_upstream.text("You are Ada."))
    first, second, third, fourth = asyncio.run(main())
    assert seen == ["Paris", "Rome"]
    assert (first.final_output, second.final_output) == ("21 in Paris.", "21 in Rome too.")
    assert (third.final_output, fourth.final_output) == ("Hello Ada.", "You are Ada.")
    rome = json.dumps(upstream_turns(upstream.model_calls[3]))    # the chain's last step
    assert "Weather in Paris?" in rome and "21 degrees in Paris" in rome and "And in Rome?" in rome
    assert "21 degrees in Rome" in rome
    assert texts(upstream.model_calls[5])[-3:] == [
        ("user", "My name is Ada."), ("assistant", "Hello Ada."), ("user", "What is my name?")]
    assert kept_hits(p) >= 3               # the chain's later steps ran on its kept process
    c = sdk(p)
    last = c.responses.retrieve(second.last_response_id)
    assert last.previous_response_id is not None
    step = c.responses.retrieve(last.previous_response_id)      # the call of Rome's weather
    assert [o.type for o in step.output] == ["function_call"]
    assert [i.type for i in c.responses.input_items.list(last.id)] == ["function_call_output"]


def test_langchain_use_previous_response_id(start, upstream):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI
    p = start(CLAUDE_PROXY_SESSIONS=2)
    llm = ChatOpenAI(model="claude-sonnet-4-6", base_url=p.url + "/v1", api_key="unused",
                     use_responses_api=True, use_previous_response_id=True, max_retries=0)
    upstream.push(fake_upstream.text("Noted: blue."), fake_upstream.text("Blue."))
    history = [HumanMessage("My favourite colour is blue.")]
    history.append(llm.invoke(history))
    history.append(HumanMessage("What is my favourite colour?"))
    answer = llm.invoke(history)
    assert answer.text == "Blue." if isinstance(answer.text, str) else answer.text() == "Blue."
    assert texts(upstream.model_calls[-1]) == [
        ("user", "My favourite colour is blue."), ("assistant", "Noted: blue."),
        ("user", "What is my favourite colour?")]
    assert kept_hits(p) == 1               # only the new message went to the kept process
    stored = sdk(p).responses.retrieve(answer.response_metadata["id"])
    assert stored.previous_response_id == history[1].response_metadata["id"]
    assert [i.content[0].text for i in sdk(p).responses.input_items.list(stored.id)] == [
        "What is my favourite colour?"]     # the client sent only the new message


@pytest.mark.parametrize("module", ["generic", "native"])
def test_namespaced_and_custom_calls_across_the_chain(start, upstream, module):
    """A namespace's function call and a custom tool call in one response; their outputs come
    back as the only new items, by previous_response_id, in either tool mode."""
    from test_tool_types import CODEX_LIKE, PATCH_TEXT, fence
    p = start(CLAUDE_PROXY_SESSIONS=2, CLAUDE_PROXY_TOOLCALL_MODULE=module)
    c = sdk(p)
    if module == "generic":
        upstream.push(fake_upstream.text(fence("multi_agent_v1.spawn_agent", {"task": "lint"}) +
                                         "\n" + fence("apply_patch", {"input": PATCH_TEXT})))
    else:
        upstream.push(fake_upstream.Reply(blocks=[
            {"type": "tool_use", "id": "toolu_ns1", "name": "mcp__client__multi_agent_v1_spawn_agent",
             "input": {"task": "lint"}},
            {"type": "tool_use", "id": "toolu_cu1", "name": "mcp__client__apply_patch",
             "input": {"input": PATCH_TEXT}}], stop_reason="tool_use"))
    r1 = c.responses.create(model="sonnet", input="lint, then add a.txt", tools=CODEX_LIKE)
    fc, ctc = [i for i in r1.output if i.type != "message"]
    assert (fc.type, fc.name, fc.namespace) == ("function_call", "spawn_agent", "multi_agent_v1")
    assert (ctc.type, ctc.name, ctc.input) == ("custom_tool_call", "apply_patch", PATCH_TEXT)
    upstream.push(fake_upstream.text("Both done.", id="msg_two"))
    r2 = c.responses.create(model="sonnet", tools=CODEX_LIKE, previous_response_id=r1.id, input=[
        {"type": "function_call_output", "call_id": fc.call_id, "output": "agent 7"},
        {"type": "custom_tool_call_output", "call_id": ctc.call_id, "output": "Success. A a.txt"}])
    assert r2.output_text == "Both done."
    history = json.dumps(upstream_turns(upstream.model_calls[-1]))
    assert "lint, then add a.txt" in history and "agent 7" in history
    assert "Success. A a.txt" in history and "Begin Patch" in history
    assert kept_hits(p) == 1                 # the turn went on on the process that made the calls
