#!/usr/bin/env python3
"""A fake `claude` CLI for faults the real one can't be made to show on demand.

It speaks just enough stream-json: reads the initialize and user lines from stdin, then acts
on a directive in the user's text:
    [[crash]]       some text deltas, then exit 3 without a result line (crash mid-stream)
    [[hang]]        print the init line and sleep (never answers)
    [[garbage]]     print lines that are not JSON, then exit 0
    [[silent-exit]] exit 0 without printing anything
    [[slow:N]]      N text deltas, 0.05 s apart (for disconnect tests)
    [[gate:N]]      the text delta "gate ", then nothing until the file $HOME/.fake-claude-gates/N
                    exists (the test opens the gate once it has seen what it waits for; 120 s
                    at most), then "open" and a result: the answer is "gate open", and the
                    request runs exactly as long as the test needs
    [[echo-env]]    answer with the environment it was given, as JSON
    [[echo-argv]]   answer with its argv, as JSON
    [[echo-cwd]]    answer with its working directory, that directory's mode and entries, as JSON
    [[rate-limited]] a rate_limit_event (resets in 120 s), then a 429 result
    [[limited-late]] a text delta, then a rejected rate_limit_event and a 429 result (a limit
                    that arrives after the answer began; the real CLI never shows one on demand)
    [[stamps:N]]    N text deltas, each "<time.time()>;" when printed, 2 ms apart (benchmarks)
    [[deaf]]        acknowledge that user line with a result line, then never read stdin again
                    (a CLI that stops reading: the proxy's next large write cannot complete)
    [[die:N]]       the first N runs given this text are SIGKILLed before their first event
                    (after the init line, as a real CLI killed while it waits for the upstream);
                    later runs answer "fake answer".  Counted in a file per text under
                    $HOME/.fake-claude-counters (appends: safe across processes)
    [[die-late:N]]  the same, but killed after message_start and one text delta
    anything else   answer "fake answer" with a result line
`claude --version` says 2.1.330 (the version the proxy is tested with); `claude auth status`
says logged in, unless $FAKE_CLAUDE_LOGGED_OUT is set.
Each run records its pid in $FAKE_CLAUDE_PIDS (a directory) when that is passed to it, and
refuses every initialize request when $FAKE_CLAUDE_REFUSE_INIT is set.
"""
import hashlib
import json
import os
import re
import signal
import sys
import time


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def delta(text):
    out({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": text}}})


def result(text):
    out({"type": "result", "subtype": "success", "is_error": False, "result": text,
         "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 2}})


def dies(text, times):
    """True for the first `times` runs given `text` (a counter file per text)."""
    folder = os.path.join(os.environ.get("HOME") or "/tmp", ".fake-claude-counters")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, hashlib.sha256(text.encode()).hexdigest()[:16])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return os.path.getsize(path) <= times


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    if "--version" in sys.argv:
        print("2.1.330 (Claude Code; fake)")
        return 0
    if sys.argv[1:3] == ["auth", "status"]:
        logged_in = not os.environ.get("FAKE_CLAUDE_LOGGED_OUT")
        print(json.dumps({"loggedIn": logged_in, "authMethod": "fake" if logged_in else "none"}))
        return 0 if logged_in else 1
    pids = os.environ.get("FAKE_CLAUDE_PIDS")
    if pids and os.path.isdir(pids):
        open(os.path.join(pids, str(os.getpid())), "w").close()
    text = ""
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("type") == "control_request":      # as the real CLI: every request answered
            if os.environ.get("FAKE_CLAUDE_REFUSE_INIT") and \
                    msg.get("request", {}).get("subtype") == "initialize":
                out({"type": "control_response", "response": {
                    "subtype": "error", "request_id": msg.get("request_id"), "error": "refused"}})
            else:
                out({"type": "control_response", "response": {
                    "subtype": "success", "request_id": msg.get("request_id"), "response": {}}})
        if msg.get("type") == "user":
            content = msg["message"]["content"]
            text = content if isinstance(content, str) else " ".join(
                b.get("text", "") for b in content if isinstance(b, dict))
            break
    m = re.search(r"\[\[([a-z-]+)(?::(\d+))?\]\]", text)
    mode, arg = (m.group(1), int(m.group(2) or 0)) if m else ("", 0)
    out({"type": "system", "subtype": "init", "model": "fake"})
    if mode == "deaf":
        out({"type": "result", "subtype": "success", "is_error": False, "result": "",
             "num_turns": 0, "usage": {"input_tokens": 0, "output_tokens": 0}})
        time.sleep(3600)
        return 0
    if mode == "die" and dies(text, arg or 1):
        die()
    if mode == "silent-exit":
        return 0
    if mode == "hang":
        time.sleep(3600)
        return 0
    if mode == "garbage":
        print("Segmentation fault? not JSON at all")
        print("<html>also not json</html>")
        return 0
    out({"type": "stream_event", "event": {"type": "message_start", "message": {
        "usage": {"input_tokens": 3, "output_tokens": 1}}}})
    if mode == "die-late" and dies(text, arg or 1):
        delta("partial ")
        die()
    if mode == "crash":
        delta("partial ")
        delta("answer")
        sys.stderr.write("fatal: simulated crash\n")
        return 3
    if mode == "slow":
        for i in range(arg or 100):
            delta("tick%d " % i)
            time.sleep(0.05)
        result("slow done")
        return 0
    if mode == "gate":
        gate = os.path.join(os.environ.get("HOME") or "/tmp", ".fake-claude-gates", str(arg))
        delta("gate ")
        deadline = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        delta("open")
        result("gate open")
        return 0
    if mode == "rate-limited":
        out({"type": "rate_limit_event", "rate_limit_info": {
            "status": "rejected", "resetsAt": int(time.time()) + 120,
            "rateLimitType": "five_hour", "utilization": 1.0}})
        out({"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
             "result": "Claude usage limit reached", "usage": {}})
        return 1
    if mode == "limited-late":
        delta("partial ")
        out({"type": "rate_limit_event", "rate_limit_info": {
            "status": "rejected", "resetsAt": int(time.time()) + 120,
            "rateLimitType": "five_hour", "overageStatus": "rejected", "isUsingOverage": False}})
        out({"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
             "result": "You've hit your limit", "usage": {}})
        return 1
    if mode == "stamps":
        for _ in range(arg or 500):
            delta("%.6f;" % time.time())
            time.sleep(0.002)
        result("stamps done")
        return 0
    if mode == "echo-env":
        answer = json.dumps(dict(os.environ))
    elif mode == "echo-argv":
        answer = json.dumps(sys.argv[1:])
    elif mode == "echo-cwd":
        answer = json.dumps({"cwd": os.getcwd(), "mode": os.stat(".").st_mode & 0o7777,
                             "entries": os.listdir(".")})
    else:
        answer = "fake answer"
    delta(answer)
    result(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
