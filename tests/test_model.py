"""Sections 4, 5 and 8 on their own (no CLI, no network): the neutral model (model names,
session signals, the nesting limit, how an event stream folds into one answer, citations),
and SSE framing.  Sections 1-3 are covered where they act: errors per dialect in
test_bad_input.py, config and --check in test_operations.py, memory sizing in
test_memory.py; prompt rendering (section 5) end to end in test_history.py."""
import io

import pytest

import claude_openai_proxy as P


# 4. Neutral model ###############################################################################

@pytest.mark.parametrize("name,want", [
    ("sonnet", "sonnet"), ("Opus", "opus"), ("  haiku ", "haiku"),
    ("claude-sonnet-4-6", "claude-sonnet-4-6"), ("anthropic/claude-opus-4-1", "claude-opus-4-1"),
    ("openai/sonnet", "sonnet"), ("claude-3-5-haiku-20241022", "claude-3-5-haiku-20241022"),
    (None, "sonnet"), ("", "sonnet")])
def test_model_names_map_to_a_cli_model(name, want):
    assert P.resolve_model(name, "sonnet")[1] == want


@pytest.mark.parametrize("name", ["gpt-4o", "claude-", "claude-sonnet-", "sonnet-ish"])
def test_unknown_model_is_a_400_naming_the_choices(name):
    with pytest.raises(P.BadRequest) as err:
        P.resolve_model(name, "sonnet")
    assert err.value.param == "model"
    assert str(err.value).startswith("Unknown model %r. Use one of: " % name)
    assert "opus, sonnet, haiku" in str(err.value)


def test_a_model_that_is_not_a_string_is_a_400():
    with pytest.raises(P.BadRequest) as err:
        P.resolve_model(42, "sonnet")
    assert (err.value.param, str(err.value)) == (
        "model", 'model must be a string such as "sonnet" or "claude-sonnet-4-6".')


def test_session_signal_takes_the_first_of_five_in_order():
    assert P.session_signal({"user": "u", "prompt_cache_key": "k"}, {"X-Session-Id": "h"}) == "h"
    assert P.session_signal({"user": "u", "prompt_cache_key": "k"}, {}) == "k"
    assert P.session_signal({"safety_identifier": "s", "user": "u"}, {}) == "s"
    assert P.session_signal({"metadata": {"user_id": " m "}}, {}) == "m"
    assert P.session_signal({"user": "  ", "metadata": "not a dict"}, {}) == ""


def test_json_depth_counts_the_body_as_level_one_and_stops_at_the_limit():
    nested = []
    for _ in range(62):
        nested = [nested]
    assert P.json_depth({"a": nested}) == P.MAX_JSON_DEPTH == 64
    assert P.json_depth({"a": [nested]}) == 65
    deep = []
    for _ in range(100000):                 # iterative: no RecursionError, stops counting early
        deep = [deep]
    assert P.json_depth(deep) == P.MAX_JSON_DEPTH + 1
    assert P.json_depth("text") == 0 and P.json_depth({}) == 1


def test_merge_messages_joins_consecutive_turns_of_one_role_without_touching_the_input():
    a = P.Message("user", [{"type": "text", "text": "a"}])
    b = P.Message("user", [{"type": "text", "text": "b"}])
    c = P.Message("assistant", [{"type": "text", "text": "c"}])
    merged = P.merge_messages([a, b, c])
    assert [(m.role, [x["text"] for x in m.blocks]) for m in merged] == [
        ("user", ["a", "b"]), ("assistant", ["c"])]
    assert [x["text"] for x in a.blocks] == ["a"]


def test_collect_folds_events_and_a_reset_withdraws_what_came_before():
    usage = P.Usage(3, 2)
    events = [P.TextDelta("withdrawn "), P.Reset(), P.TextDelta("Hello, "), P.TextDelta("world."),
              P.ToolCall("t1", "get", ""), P.Done("end_turn", usage)]
    out = P.collect(events)
    assert out.text == "Hello, world."
    assert [(t.id, t.name, t.arguments) for t in out.tool_calls] == [("t1", "get", "{}")]
    assert (out.stop_reason, out.usage) == ("end_turn", usage)


def test_url_citations_mark_markdown_links_and_bare_urls_of_found_sources_only():
    url = "https://example.org/kiwi"
    found = [P.WebSearch("s1", "kiwi", [{"url": url, "title": "Kiwi"}])]
    text = "See [Kiwi](%s) or %s, not https://other.example/." % (url, url)
    link = text.index("[")
    bare = text.index(url, text.index(")"))
    assert P.url_citations(text, found) == [
        (link, link + len("[Kiwi](%s)" % url), url, "Kiwi"), (bare, bare + len(url), url, "Kiwi")]
    assert P.url_citations(text, []) == []


# 8. SSE #########################################################################################

class Handler:
    """Just what SSE writes to: http.server's response methods and wfile."""

    def __init__(self):
        self.wfile, self.head, self.close_connection = io.BytesIO(), [], False

    def send_response(self, code):
        self.head.append(("status", code))

    def send_header(self, k, v):
        self.head.append((k, v))

    def end_headers(self):
        pass


def test_sse_frames_each_event_as_one_http_chunk():
    h = Handler()
    sse = P.SSE(h)
    sse.start([("X-Request-Id", "r1")])
    sse.event({"a": "é"}, name="delta")
    sse.comment("ping")
    sse.event("[DONE]")
    sse.end()
    assert ("status", 200) in h.head and ("Transfer-Encoding", "chunked") in h.head
    assert ("X-Accel-Buffering", "no") in h.head and ("X-Request-Id", "r1") in h.head
    frames = ['event: delta\ndata: {"a": "é"}\n\n', ": ping\n\n", "data: [DONE]\n\n"]
    want = b"".join(b"%x\r\n%s\r\n" % (len(f.encode()), f.encode()) for f in frames) + b"0\r\n\r\n"
    assert h.wfile.getvalue() == want


def test_sse_write_to_a_gone_client_is_client_gone():
    h = Handler()
    h.wfile.close()
    with pytest.raises(P.ClientGone):
        P.SSE(h).event({"x": 1})
    P.SSE(h).end()                          # ending a gone stream only marks the connection
    assert h.close_connection


def test_first_then_pulls_the_first_event_early_and_keeps_it():
    pulled = []

    def events():
        for x in (1, 2, 3):
            pulled.append(x)
            yield x
    chained = P.first_then(events())
    assert pulled == [1]
    assert list(chained) == [1, 2, 3]
    assert list(P.first_then(iter(()))) == []
