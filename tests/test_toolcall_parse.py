"""Unit tests of the prompt-emulated tool-call parser and refusal detector (no CLI, no network).

The corpus below is a list of model answers, each with the segments that
`handler.parse(text, final=True, names=NAMES)` must return and what `is_refusal(text)` must say.
The same corpus drives the streaming contract: feeding an answer in small pieces, the way
`_tool_attempt` does, must give the same segments as one final parse.
"""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import claude_openai_proxy as cop  # noqa: E402

F = "`" * 3                     # a code fence, spelled out so this file stays easy to read
NAMES = {"get_weather", "search", "run_code", "send_email"}


def ns(markup):
    """Put the "antml:" namespace prefix on every tag of Claude's native call markup."""
    prefix = "antml" + ":"
    out = markup.replace("</", "\x00").replace("<", "<" + prefix).replace("\x00", "</" + prefix)
    assert out.count(prefix) == markup.count("<")
    return out


def block(body, info="tool_call"):
    return F + info + "\n" + body + "\n" + F


def call(name, **args):
    return ("call", (name, args))


def text(s):
    return ("text", s)


WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
SEARCH_A = '{"name": "search", "arguments": {"q": "a"}}'
SEARCH_B = '{"name": "search", "arguments": {"q": "b"}}'
XML_ONE = ('<function_calls>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
           '<parameter name="days">3</parameter>\n</invoke>\n</function_calls>')
XML_TWO = ('<function_calls><invoke name="search"><parameter name="q">a</parameter></invoke>'
           '<invoke name="search"><parameter name="q">b</parameter></invoke></function_calls>')
CODE_WITH_FENCE = 'print("' + F + 'python")\nx = {"a": {"b": [1, 2]}}\nprint("' + F + '")'
BAD_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}'          # one brace short

# (id, answer, expected segments, expected is_refusal; None = not asserted)
CORPUS = [
    # -- well-formed calls ---------------------------------------------------------------------
    ("single", block(WEATHER), [call("get_weather", city="Paris")], False),
    ("prose_before", "Let me check the weather.\n" + block(WEATHER),
     [text("Let me check the weather.\n"), call("get_weather", city="Paris")], False),
    ("prose_after", block(WEATHER) + "\nI'll report back.",
     [call("get_weather", city="Paris"), text("\nI'll report back.")], False),
    ("prose_around", "Sure.\n\n" + block(WEATHER) + "\n\nDone.",
     [text("Sure.\n\n"), call("get_weather", city="Paris"), text("\n\nDone.")], False),
    ("parallel_blocks", block(SEARCH_A) + "\n" + block(SEARCH_B),
     [call("search", q="a"), text("\n"), call("search", q="b")], False),
    ("parallel_blocks_adjacent", block(SEARCH_A) + block(SEARCH_B) + block(WEATHER),
     [call("search", q="a"), call("search", q="b"), call("get_weather", city="Paris")], False),
    ("parallel_json_array", block("[" + SEARCH_A + ", " + SEARCH_B + "]"),
     [call("search", q="a"), call("search", q="b")], False),
    ("no_arguments_key", block('{"name": "search"}'), [call("search")], False),
    ("parameters_key", block('{"name": "search", "parameters": {"q": "a"}}'), [call("search", q="a")], False),
    ("openai_shaped", block('{"type": "function", "function": {"name": "search", '
                            '"arguments": "{\\"q\\": \\"a\\"}"}}'), [call("search", q="a")], False),
    ("arguments_as_json_string", block('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'),
     [call("get_weather", city="Paris")], False),
    ("arguments_empty_string", block('{"name": "search", "arguments": ""}'), [call("search")], False),
    ("info_uppercase_and_spaces", F + " TOOL_CALL \n" + SEARCH_A + "\n" + F, [call("search", q="a")], False),
    ("closing_fence_same_line", F + "tool_call\n" + SEARCH_A + F, [call("search", q="a")], False),
    ("pretty_printed_json", block('{\n  "name": "search",\n  "arguments": {\n    "q": "a"\n  }\n}'),
     [call("search", q="a")], False),
    ("raw_newline_inside_string", block('{"name": "send_email", "arguments": {"body": "line 1\nline 2"}}'),
     [call("send_email", body="line 1\nline 2")], False),
    # -- string arguments full of syntax ----------------------------------------------------
    ("nested_braces_in_string", block('{"name": "run_code", "arguments": {"code": "d = {\\"a\\": {\\"b\\": '
                                      '[1, {}]}}; print(\\"}}}\\")"}}'),
     [call("run_code", code='d = {"a": {"b": [1, {}]}}; print("}}}")')], False),
    ("backtick_fence_in_string", block('{"name": "run_code", "arguments": {"code": '
                                       + json.dumps(CODE_WITH_FENCE) + "}}"),
     [call("run_code", code=CODE_WITH_FENCE)], False),
    ("nested_objects_and_lists", block('{"name": "search", "arguments": {"q": "a", "filters": '
                                       '{"tags": ["x", {"y": [1, 2, {"z": null}]}], "deep": {"er": true}}}}'),
     [call("search", q="a", filters={"tags": ["x", {"y": [1, 2, {"z": None}]}], "deep": {"er": True}})],
     False),
    ("unicode_arguments", "天気を調べます。\n" + block('{"name": "get_weather", "arguments": '
                                                     '{"city": "東京", "note": "café ☃ 🎉 \\u00e9"}}'),
     [text("天気を調べます。\n"), call("get_weather", city="東京", note="café ☃ 🎉 é")], False),
    # -- ```json fences: calls only when they name an offered tool ---------------------------
    ("json_fence_known_tool", block(WEATHER, "json"), [call("get_weather", city="Paris")], False),
    ("json_fence_unknown_tool", block('{"name": "delete_everything", "arguments": {}}', "json"),
     [text(block('{"name": "delete_everything", "arguments": {}}', "json"))], False),
    ("json_fence_plain_data", "Here is the data:\n" + block('{"city": "Paris", "temp": 21}', "json"),
     [text("Here is the data:\n" + block('{"city": "Paris", "temp": 21}', "json"))], False),
    # -- Claude's native markup ---------------------------------------------------------------
    ("native_xml", XML_ONE, [call("get_weather", city="Paris", days=3)], False),
    ("native_xml_antml_prefix", ns(XML_ONE), [call("get_weather", city="Paris", days=3)], False),
    ("native_xml_parallel", "Searching both.\n" + XML_TWO,
     [text("Searching both.\n"), call("search", q="a"), call("search", q="b")], False),
    ("native_xml_antml_parallel", ns(XML_TWO), [call("search", q="a"), call("search", q="b")], False),
    ("native_xml_json_value", '<function_calls><invoke name="search"><parameter name="filters">'
                              '{"tags": ["a"]}</parameter></invoke></function_calls>',
     [call("search", filters={"tags": ["a"]})], False),
    # -- malformed: stays text, never raises ----------------------------------------------------
    ("malformed_json", "Calling.\n" + block(BAD_JSON) + "\nok",
     [text("Calling.\n" + block(BAD_JSON) + "\nok")], False),
    ("not_json_at_all", block("get_weather(city='Paris')"), [text(block("get_weather(city='Paris')"))], False),
    ("unterminated_fence", F + "tool_call\n" + WEATHER, [text(F + "tool_call\n" + WEATHER)], False),
    ("fence_without_newline", "see " + F + "tool_call", [text("see " + F + "tool_call")], False),
    ("arguments_bad_json_string", block('{"name": "search", "arguments": "{q: a}"}'),
     [text(block('{"name": "search", "arguments": "{q: a}"}'))], False),
    ("arguments_not_object", block('{"name": "search", "arguments": [1, 2]}'),
     [text(block('{"name": "search", "arguments": [1, 2]}'))], False),
    ("unclosed_native_xml", "<function_calls><invoke name=\"search\">",
     [text("<function_calls><invoke name=\"search\">")], False),
    # A broken block must not swallow the well-formed call that follows it.
    ("malformed_then_valid", block(BAD_JSON) + "\n" + block(SEARCH_A),
     [text(block(BAD_JSON) + "\n"), call("search", q="a")], False),
    # -- ordinary code fences are text -----------------------------------------------------------
    ("python_fence", "Use this:\n" + block("print('hi')", "python"),
     [text("Use this:\n" + block("print('hi')", "python"))], False),
    ("python_fence_with_call_like_dict", block('x = {"name": "search", "arguments": {"q": "a"}}', "python"),
     [text(block('x = {"name": "search", "arguments": {"q": "a"}}', "python"))], False),
    ("bare_fence_with_call_like_json", block(SEARCH_A, ""), [text(block(SEARCH_A, ""))], False),
    ("bash_fence_then_real_call", block("ls -la", "bash") + "\n" + block(SEARCH_A),
     [text(block("ls -la", "bash") + "\n"), call("search", q="a")], False),
    ("inline_code_mention", "Write a `tool_call` block to call a tool; `<function_calls>` is XML.",
     [text("Write a `tool_call` block to call a tool; `<function_calls>` is XML.")], False),
    # -- plain answers: not refusals ---------------------------------------------------------
    ("plain_answer", "The capital of France is Paris.", [text("The capital of France is Paris.")], False),
    ("no_tool_needed", "None of the available tools is needed here: 2 + 2 = 4.",
     [text("None of the available tools is needed here: 2 + 2 = 4.")], False),
    ("no_tool_fits", "No tool fits this request, so here is the answer directly: Paris.",
     [text("No tool fits this request, so here is the answer directly: Paris.")], False),
    ("no_tool_that_translates", "There's no tool that translates text, but I can do it myself: Bonjour.",
     [text("There's no tool that translates text, but I can do it myself: Bonjour.")], False),
    ("you_lack_access", "You don't have access to the admin panel, so ask your administrator.",
     [text("You don't have access to the admin panel, so ask your administrator.")], False),
    ("explains_api_errors", "Handle the API error by retrying with exponential backoff.",
     [text("Handle the API error by retrying with exponential backoff.")], False),
    ("third_person_cannot", "The user cannot access the file because of its permissions.",
     [text("The user cannot access the file because of its permissions.")], False),
    ("declines_on_merit", "I cannot recommend that approach; use a transaction instead.",
     [text("I cannot recommend that approach; use a transaction instead.")], False),
    ("spanish_answer", "Puedo ayudarte con eso: la respuesta es 4.",
     [text("Puedo ayudarte con eso: la respuesta es 4.")], False),
    ("chinese_answer", "答案是四。", [text("答案是四。")], False),
    # -- false refusals: worth one retry -----------------------------------------------------
    ("refusal_en_access", "I don't have access to real-time weather data.",
     [text("I don't have access to real-time weather data.")], True),
    ("refusal_en_browse", "I'm sorry, but I can't browse the internet.",
     [text("I'm sorry, but I can't browse the internet.")], True),
    ("refusal_en_unable_execute", "I'm unable to execute code in this environment.",
     [text("I'm unable to execute code in this environment.")], True),
    ("refusal_en_no_tools", "There are no tools available to me right now.",
     [text("There are no tools available to me right now.")], True),
    ("refusal_en_tool_down", "It looks like the search tool is not working at the moment.",
     [text("It looks like the search tool is not working at the moment.")], True),
    ("refusal_en_as_an_ai", "As an AI language model, I cannot check live prices.",
     [text("As an AI language model, I cannot check live prices.")], True),
    ("refusal_en_curly_apostrophe", "I can\u2019t access the weather service from here.",
     [text("I can\u2019t access the weather service from here.")], True),
    ("refusal_es", "Lo siento, no tengo acceso a internet.", [text("Lo siento, no tengo acceso a internet.")], True),
    ("refusal_es_usar", "No puedo usar herramientas en esta conversación.",
     [text("No puedo usar herramientas en esta conversación.")], True),
    ("refusal_fr", "Désolé, je n'ai pas accès à Internet.", [text("Désolé, je n'ai pas accès à Internet.")], True),
    ("refusal_fr_utiliser", "Je ne peux pas utiliser cet outil.", [text("Je ne peux pas utiliser cet outil.")], True),
    ("refusal_de", "Ich habe keinen Zugriff auf das Internet.",
     [text("Ich habe keinen Zugriff auf das Internet.")], True),
    ("refusal_de_inverted", "Leider kann ich nicht auf Echtzeitdaten zugreifen.",
     [text("Leider kann ich nicht auf Echtzeitdaten zugreifen.")], True),
    ("refusal_pt", "Desculpe, não tenho acesso à internet.", [text("Desculpe, não tenho acesso à internet.")], True),
    ("refusal_pt_acessar", "Não posso acessar dados em tempo real.",
     [text("Não posso acessar dados em tempo real.")], True),
    ("refusal_zh", "抱歉，我无法访问互联网。", [text("抱歉，我无法访问互联网。")], True),
    ("refusal_zh_tool", "我不能使用这个工具。", [text("我不能使用这个工具。")], True),
    ("refusal_ja", "申し訳ありませんが、インターネットにアクセスできません。",
     [text("申し訳ありませんが、インターネットにアクセスできません。")], True),
    ("refusal_ja_tool", "ツールを使用できません。", [text("ツールを使用できません。")], True),
    ("refusal_it", "Mi dispiace, non ho accesso a internet.", [text("Mi dispiace, non ho accesso a internet.")], True),
]

IDS = [c[0] for c in CORPUS]
assert len(CORPUS) >= 40 and len(set(IDS)) == len(IDS)


@pytest.fixture(scope="module")
def generic():
    return cop.HANDLERS["generic"]


@pytest.fixture(scope="module")
def evonic():
    cop.discover_modules()
    assert "evonic" not in cop.MODULE_ERRORS, cop.MODULE_ERRORS
    return cop.HANDLERS["evonic"]


def streamed(handler, answer, step, names=NAMES):
    """The streaming loop of `_tool_attempt` (its ToolTextParser): each piece fed in turn, then
    what is left parsed with final=True.  Returns (segments, segments released per step)."""
    parser, segs, released = cop.ToolTextParser(handler, names), [], []
    for i in range(0, len(answer), step):
        got = parser.feed(answer[i:i + step])
        assert len(parser.pending) <= i + step
        segs += got
        released.append(got)
    segs += parser.finish()
    return cop.joined_text(segs), released


# -- the corpus ---------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,expected", [(c[1], c[2]) for c in CORPUS], ids=IDS)
def test_parse_final(generic, answer, expected):
    segs, consumed = generic.parse(answer, final=True, names=NAMES)
    assert segs == expected
    assert consumed == len(answer)


@pytest.mark.parametrize("answer,refusal", [(c[1], c[3]) for c in CORPUS if c[3] is not None], ids=IDS)
def test_is_refusal(generic, answer, refusal):
    assert generic.is_refusal(answer) is refusal


@pytest.mark.parametrize("answer", [c[1] for c in CORPUS], ids=IDS)
@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_streaming_matches_final(generic, answer, step):
    whole = generic.parse(answer, final=True, names=NAMES)[0]
    assert streamed(generic, answer, step)[0] == cop.joined_text(whole)


def test_text_of_all_segments_is_the_answer_when_nothing_is_a_call(generic):
    for _id, answer, expected, _r in CORPUS:
        if all(kind == "text" for kind, _ in expected):
            assert "".join(v for _, v in generic.parse(answer, final=True, names=NAMES)[0]) == answer


def test_json_fence_accepts_any_name_when_names_unknown(generic):
    answer = block('{"name": "anything", "arguments": {"x": 1}}', "json")
    assert generic.parse(answer, final=True, names=None)[0] == [call("anything", x=1)]
    assert generic.parse(answer, final=True, names={"other"})[0] == [text(answer)]


GARBAGE = {
    "empty": "", "lone_fence": F, "three_fences": F * 3, "fence_newline": F + "\n",
    "empty_tool_block": F + "tool_call\n" + F, "blank_tool_block": F + "tool_call\n\n" + F,
    "json_empty_list": F + "json\n[]\n" + F, "json_null": F + "tool_call\nnull\n" + F,
    "name_not_string": F + "tool_call\n" + '{"name": 5}' + "\n" + F,
    "name_empty": F + "tool_call\n" + '{"name": ""}' + "\n" + F,
    "xml_empty": "<function_calls></function_calls>",
    "xml_unclosed_invoke": "<function_calls><invoke name=\"x\"></function_calls>",
    "many_angles": "<" * 50, "many_backticks": "`" * 50 + "x",
    "nan_argument": F + "tool_call\n" + '{"name": "search", "arguments": {"q": NaN}}' + "\n" + F,
    "control_and_surrogate": "\x00\ud800 odd",
    # nesting deeper than Python's recursion limit: json.loads raises RecursionError
    "deep_list": F + "tool_call\n" + "[" * 5000 + "\n" + F,
    "deep_object": F + "tool_call\n" + '{"a":' * 3000 + "\n" + F,
    "deep_arguments": F + "tool_call\n" + '{"name": "search", "arguments": "' + "[" * 5000 + '"}' + "\n" + F,
    "deep_xml_value": '<function_calls><invoke name="search"><parameter name="q">' + "[" * 5000
                      + "</parameter></invoke></function_calls>",
}


@pytest.mark.parametrize("junk", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_never_raises_and_keeps_all_text(generic, junk):
    for final in (True, False):
        segs, used = generic.parse(junk, final=final, names=NAMES)
        assert all(kind in ("text", "call") for kind, _ in segs)
        if final:
            assert used == len(junk)
            if all(kind == "text" for kind, _ in segs):
                assert "".join(v for _, v in segs) == junk


# -- streaming details -----------------------------------------------------------------------

def test_text_before_a_fence_is_released_before_the_fence_completes(generic):
    prose = "Let me look that up for you.\n"
    answer = prose + block(WEATHER)
    for cut in range(len(prose) + 1, len(answer) - 1):
        segs, used = generic.parse(answer[:cut], final=False, names=NAMES)
        assert segs == [text(prose)], cut
        assert used == len(prose)
    _, released = streamed(generic, answer, 5)
    first_call = next(i for i, got in enumerate(released) if any(k == "call" for k, _ in got))
    early = "".join(v for got in released[:first_call] for k, v in got if k == "text")
    assert early == prose


@pytest.mark.parametrize("tail", ["`", "``", "<", "<func", "<function_calls", "<" + "antml" + ":func"])
def test_possible_marker_start_is_held_back(generic, tail):
    segs, used = generic.parse("Hello " + tail, final=False, names=NAMES)
    assert segs == [text("Hello ")] and used == len("Hello ")
    segs, used = generic.parse("Hello " + tail, final=True, names=NAMES)
    assert segs == [text("Hello " + tail)]


def test_plain_text_streams_without_delay(generic):
    assert generic.parse("Hello world.", final=False, names=NAMES) == ([text("Hello world.")], 12)
    assert generic.parse("a < b", final=False, names=NAMES) == ([text("a < b")], 5)


def test_ordinary_code_fence_streams_once_its_info_line_is_known(generic):
    partial = F + "python\nprint('hel"
    segs, used = generic.parse(partial, final=False, names=NAMES)
    assert cop.joined_text(segs) == [text(partial)] and used == len(partial)
    assert generic.parse(F + "pyth", final=False, names=NAMES) == ([], 0)


def test_incomplete_tool_block_is_undecided(generic):
    for partial in (F + "tool_call\n", F + "tool_call\n" + WEATHER, F + "tool_call\n" + WEATHER + "\n``",
                    XML_ONE[:40], ns(XML_ONE)[:60]):
        assert generic.parse(partial, final=False, names=NAMES) == ([], 0), partial


def test_calls_are_released_as_soon_as_their_block_closes(generic):
    answer = block(SEARCH_A) + "\nand then some more text"
    segs, used = generic.parse(block(SEARCH_A), final=False, names=NAMES)
    assert segs == [call("search", q="a")] and used == len(block(SEARCH_A))
    assert streamed(generic, answer, 4)[0] == [call("search", q="a"), text("\nand then some more text")]


# -- the engine: retries and heartbeats ------------------------------------------------------

def _request(handler, **kw):
    return cop.Request(model="sonnet", cli_model="sonnet",
                       messages=[cop.Message("user", [{"type": "text", "text": "weather?"}])],
                       tools=[cop.ToolSpec("get_weather", "", {"type": "object"})], handler=handler, **kw)


def _runner(*answers, heartbeat=False):
    """A fake `run(messages)`: one scripted answer per attempt; records the messages."""
    seen = []

    def run(messages):
        seen.append(messages)
        yield cop.Start(cop.Usage(3, 0))
        if heartbeat:
            yield cop.Heartbeat()
        for piece in answers[len(seen) - 1]:
            yield cop.TextDelta(piece)
        yield cop.Done("end_turn", cop.Usage(3, 5))
    run.seen = seen
    return run


def test_engine_retries_a_refusal_once_with_the_nudge(generic):
    run = _runner(["I don't have access to ", "weather data."], [block(WEATHER)])
    events = list(cop.emulated_tool_events(_request(generic), run))
    assert len(run.seen) == 2
    assert run.seen[1][-1].blocks[0]["text"] == generic.nudge()
    calls = [e for e in events if isinstance(e, cop.ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert not [e for e in events if isinstance(e, cop.TextDelta)]
    assert events[-1].stop_reason == "tool_use" and events[-1].usage.output_tokens == 10


def test_engine_keeps_the_first_answer_when_the_retry_refuses_too(generic):
    run = _runner(["I can't browse the web."], ["I still can't browse the web."])
    events = list(cop.emulated_tool_events(_request(generic), run))
    assert len(run.seen) == 2
    assert "".join(e.text for e in events if isinstance(e, cop.TextDelta)) == "I can't browse the web."
    assert events[-1].stop_reason == "end_turn"


def test_engine_forwards_heartbeats_during_the_retry(generic):
    """A slow retry must keep an SSE client alive: its Heartbeats reach the client too."""
    run = _runner(["I can't browse the web."], [block(WEATHER)], heartbeat=True)
    events = list(cop.emulated_tool_events(_request(generic), run))
    assert len(run.seen) == 2
    assert sum(isinstance(e, cop.Heartbeat) for e in events) == 2


def test_engine_streams_long_answers_without_waiting_for_the_end(generic):
    long = "Paris is lovely in spring. " * 20            # > REFUSAL_HOLD_CHARS, no refusal
    gen = cop.emulated_tool_events(_request(generic), _runner([long, "THE END"]))
    seen = []
    for ev in gen:
        seen.append(ev)
        if isinstance(ev, cop.TextDelta):
            break
    assert seen[-1].text.startswith("Paris") and "THE END" not in seen[-1].text
    gen.close()


# -- handler modules ---------------------------------------------------------------------------

EVONIC_REFUSALS = [
    "Sorry, the board is unavailable at the moment.",
    "The Kanban board seems to be offline right now.",
    "The skill 'crm_sync' is not responding.",
    "It looks like skill crm_sync isn't responding, please try again later.",
    "The `jira` integration is currently unavailable.",
    "The Jira integration is not responding.",
    "I couldn't reach the billing service.",
    "I was unable to connect to the board.",
    "I could not reach the CRM integration, please try later.",
    "The workplace appears to be offline.",
]
EVONIC_ANSWERS = [
    "What do I do when a skill is offline? Restart it from the /skills page.",
    "If a skill is not responding, check its logs.",
    "I created the task on the board.",
    "The board has 3 tasks in progress.",
    "Skill crm_sync is reachable again.",
    "I couldn't find any tasks on the board matching that name.",
]


@pytest.mark.parametrize("answer", EVONIC_REFUSALS)
def test_evonic_refusal_phrasings(evonic, generic, answer):
    assert evonic.is_refusal(answer)
    assert not generic.is_refusal(answer), "the generic handler should not know Evonic's vocabulary"


@pytest.mark.parametrize("answer", EVONIC_ANSWERS)
def test_evonic_ordinary_answers_are_not_refusals(evonic, answer):
    assert not evonic.is_refusal(answer)


def test_evonic_keeps_generic_behaviour(evonic, generic):
    assert isinstance(evonic, cop.BaseToolCallHandler) and evonic.name == "evonic"
    for _id, answer, expected, refusal in CORPUS:
        assert evonic.parse(answer, final=True, names=NAMES) == generic.parse(answer, final=True, names=NAMES)
    assert evonic.is_refusal("I don't have access to real-time weather data.")
    assert "tool_call" in evonic.nudge() and evonic.nudge() != generic.nudge()
    assert "tool_call" in evonic.tool_prompt([cop.ToolSpec("search", "d", {})], "auto")


def test_unknown_handler_is_a_400_listing_the_handlers(evonic):
    with pytest.raises(cop.BadRequest) as err:
        cop.pick_handler("nope", "generic")
    assert "evonic" in err.value.message and "generic" in err.value.message
    assert cop.pick_handler(None, "evonic") is evonic
    assert cop.pick_handler("generic", "evonic") is cop.HANDLERS["generic"]


# -- linear time: a long tool call with many inner fences ----------------------------------------

def readme_call(fences):
    """A ```tool_call whose argument is markdown with `fences` inline code fences (an agent
    writing a README), about 33 bytes a fence."""
    doc = "".join("Run %s%d%s then go on.\n" % (F, i, F) for i in range(fences))
    return block(json.dumps({"name": "run_code", "arguments": {"code": doc}})), doc


class Counting(cop.BaseToolCallHandler):
    name = "counting"

    def __init__(self):
        super().__init__()
        self.attempts = 0

    def _calls_from_json(self, raw, info, names):
        self.attempts += 1
        return super()._calls_from_json(raw, info, names)


@pytest.mark.parametrize("fences", [50, 300])
def test_many_inner_fences_give_the_one_call_trying_each_fence_once(fences):
    """Each closing-fence candidate is tried once however the call is cut into deltas (it
    was tried again at every delta: the cost grew with deltas x fences)."""
    answer, doc = readme_call(fences)
    answer = "Here it is.\n" + answer + "\nDone."
    handler = Counting()
    segs, _ = streamed(handler, answer, 8)
    assert segs == [text("Here it is.\n"), call("run_code", code=doc), text("\nDone.")]
    # the inner fences lie inside a JSON string, where JSON cannot end: only the closing fence
    # is tried (it was tried again at every delta, and so was every inner one)
    assert handler.attempts == 1


def test_fences_in_an_array_of_strings_and_outside_strings():
    """Strings opened and closed between fences, escaped quotes, and a fence outside any
    string (after which nothing in the block can be JSON: it stays text)."""
    snippets = ["%sbash\nls \\\"%d\\\" %s" % (F, i, F) for i in range(40)]
    good = block(json.dumps({"name": "run_code", "arguments": {"code": "x", "steps": snippets}}))
    handler = Counting()
    segs, _ = streamed(handler, good, 5)
    assert segs == [call("run_code", code="x", steps=snippets)]
    assert handler.attempts == 1
    bad = F + 'tool_call\n{"name": "run_code", ' + F + ' "arguments": {"code": "' + F + '"}}\n' + F
    handler = Counting()
    assert streamed(handler, bad, 3)[0] == [text(bad)] == cop.HANDLERS["generic"].parse(
        bad, final=True, names=NAMES)[0]
    assert handler.attempts == 1


def test_a_block_that_never_parses_stays_text_when_streamed(generic):
    """The resumed search keeps parse's rule: JSON that never parses is text up to the last
    closing fence, and what follows is parsed on."""
    answer = F + "tool_call\n{not json " + F + "x" + F + " more" + F + "y\n" + \
        block('{"name": "search", "arguments": {"q": "z"}}')
    whole = generic.parse(answer, final=True, names=NAMES)[0]
    for step in (1, 3, 8):
        assert streamed(generic, answer, step)[0] == cop.joined_text(whole)
