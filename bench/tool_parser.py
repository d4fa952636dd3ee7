#!/usr/bin/env python3
"""The emulated tool parser's CPU (issue 19): a streamed ~10 KB ```tool_call whose argument is
markdown with a few hundred inline ``` fences (an agent writing a README) against a plain call
of the same size, through the proxy's own tool-call engine (emulated_tool_events, section 6),
in small deltas as the CLI streams them.  Also an answer of the same size that opens like a
refusal ("I can't access the tool"), held back while the engine decides on its retry (whose
short answer is not what is measured).  No CLI, no network: the CPU measured is the proxy's.

    python3 bench/tool_parser.py            # 15 rounds
    python3 bench/tool_parser.py --quick    # 3 rounds (bench/all.py --quick, CI)

The two shapes are measured interleaved in one run (fenced, plain, fenced, ...), CPU time of
this process (time.process_time), and the ratio of the medians is printed; target <= 2x.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import claude_openai_proxy as cp  # noqa: E402

FENCE = "`" * 3
DELTA = 12            # characters a text delta (the CLI streams a few tokens at a time)
TARGET = 2.0


def answer(fences):
    """A tool_call answer of about 10 KB; `fences` inline code spans in its argument, or none
    (the same size in plain words)."""
    line = "Run %s%s%s then go on.\n"
    doc = "".join(line % (FENCE, "cmd%03d" % i, FENCE) for i in range(fences)) if fences else \
        "".join(line % ("'", "cmd%03d" % i, "'") for i in range(300))
    call = json.dumps({"name": "write_file", "arguments": {"path": "README.md", "content": doc}})
    return "I will write it.\n%stool_call\n%s\n%s\n" % (FENCE, call, FENCE), doc


def refusal():
    """About the same size, no call, and a refusal in its first line."""
    return "I can't access the tool right now, so here is the text instead.\n" + \
        "".join("Step %03d: go on with the work.\n" % i for i in range(300)), None


def run_once(text, doc):
    req = cp.Request(model="sonnet", cli_model="sonnet", handler=cp.HANDLERS["generic"],
                     tools=[cp.ToolSpec("write_file", "", {"type": "object"})],
                     messages=[cp.Message("user", [{"type": "text", "text": "write it"}])])

    def run(messages):
        yield cp.Start(cp.Usage())
        if len(messages) > 1:            # the engine's retry after a refusal: a short answer
            yield cp.TextDelta("Still no.")
            yield cp.Done("end_turn", cp.Usage())
            return
        for i in range(0, len(text), DELTA):
            yield cp.TextDelta(text[i:i + DELTA])
        yield cp.Done("end_turn", cp.Usage())
    t0 = time.process_time()
    out = cp.collect(cp.emulated_tool_events(req, run))
    spent = time.process_time() - t0
    if doc is None:
        assert out.text == text and not out.tool_calls, "wrong answer"
    else:
        assert [json.loads(c.arguments)["content"] for c in out.tool_calls] == [doc], "wrong parse"
    return spent


def main(argv):
    rounds = 3 if "--quick" in argv else 15
    shapes = {"fenced": answer(300), "plain": answer(0), "refusal": refusal()}
    times = {name: [] for name in shapes}
    run_once(*shapes["plain"])             # warm-up: compiled patterns, caches
    for _ in range(rounds):
        for name, shape in shapes.items():
            times[name].append(run_once(*shape))
    med = {name: statistics.median(t) for name, t in times.items()}
    print("tool parser: %d-byte call in %d-char deltas, %d rounds interleaved"
          % (len(shapes["fenced"][0]), DELTA, rounds))
    print("  plain call                 %8.2f ms CPU (median)" % (med["plain"] * 1000))
    for name, label in (("fenced", "300 inline fences"), ("refusal", "refusal first, no call")):
        ratio = med[name] / med["plain"] if med["plain"] else float("inf")
        print("  %-26s %8.2f ms CPU, %5.2f x plain (target <= %g x)  %s"
              % (label, med[name] * 1000, ratio, TARGET, "ok" if ratio <= TARGET else "OVER TARGET"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
