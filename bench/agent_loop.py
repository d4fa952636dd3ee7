#!/usr/bin/env python3
"""Agent-loop benchmark: native tools vs emulated tools, side by side, in one run.

    python3 bench/agent_loop.py [steps]       # default 10 steps

One agent loop of `steps` requests through the real CLI and the fake upstream from tests/: the
task is one user message, and at every step the model calls one tool (`read_file`) and the
client sends the whole conversation again with a ~2 KB result added (OpenAI chat completions,
streaming, as agents do).  Each proxy has a warm pool (default size 2); a step is sent once
its pool is ready, as in an agent that spends time running the tool.  All modes' proxies run
at once and their loops are interleaved step by step, so a busy machine's drift hits every
mode alike.  Modes:

- native: X-Toolcall-Module native (this proxy: real tool turns, kept with the call held open,
  MCP handshake given in initialize);
- native, not kept: the same with CLAUDE_PROXY_SESSIONS=0 (each step a new process given the
  history as real turns);
- emulated: the default handler (```tool_call fences, kept conversations);
- native before: native mode of the proxy at git revision BEFORE (default: the merge base
  with main; on main itself, name it: BEFORE=8b60662 is the last commit before native mode sent
  real tool turns), read with `git show`, when that revision is available.

Printed per mode:
- shared prefix between consecutive steps' upstream requests: how much of step N's request
  (tool definitions, system blocks, then message blocks, in the order the prompt cache
  reads them) is, unchanged, the start of step N+1's, at block granularity (a changed block
  counts as not shared), weighed by the blocks' JSON size; cache_control marks are ignored
  and a string content counts as one text block (bench/history.py does the same);
- time to first token per step (the first content or tool-call delta), and its median;
- first, the MCP set-up alone on a pre-started bare CLI (handshake()): no tools, the
  handshake over the control channel, and the handshake given in initialize;
- upstream input not a cache prefix, summed over the loop: for every request, the JSON size
  of the blocks after the prefix shared with the request before (all of the first one),
  divided by 4 as a token estimate (the fake upstream has no tokenizer and no cache).
"""
import http.client
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run  # noqa: E402   (also starts the fake upstream)
from run import CLAUDE, POOL, QUICK, ROOT, UP, env_for, size  # noqa: E402
import fake_upstream  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the project.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"]}}}]
RESULT = ("line %03d of the file: the quick brown fox jumps over the lazy dog 0123456789\n" * 25)
F = "`" * 3


class Proxy(run.Proxy):
    """A proxy running `script` (today's file, or an older revision's)."""

    def __init__(self, script, **extra):
        super().__init__(script=script, **extra)

    def wait_ready(self, n=POOL, timeout=size(30, 2)):
        """Until the pre-starter holds its pool of `n` (/health `idle.ready`: pre-started,
        reused, or the loop's first step kept without a session signal, which it counts)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.health()           # the idle store, or an older proxy's pool
            idle = h.get("idle") or h.get("pool")
            if idle["ready"] >= n:
                run.settle(1.5)          # ready = spawned; let it finish booting
                return
            time.sleep(0.05)
        print("  (a pool not ready after %g s, the step sent anyway: /health idle %s)"
              % (timeout, json.dumps(idle)), flush=True)

    def step(self, messages, headers):
        """One streaming request: (seconds to the first delta, the tool calls)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        body = {"model": "sonnet", "stream": True, "tools": TOOLS, "messages": messages}
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", json.dumps(body),
                  dict({"Content-Type": "application/json"}, **headers))
        resp = c.getresponse()
        if resp.status != 200:
            raise RuntimeError("status %d: %s" % (resp.status, resp.read()[:300]))
        first, calls = None, {}
        for line in resp:
            if line.startswith(b"data: [DONE]"):
                break
            if not line.startswith(b"data: {"):
                continue
            for ch in json.loads(line[6:])["choices"]:
                d = ch["delta"]
                if d.get("content") or d.get("tool_calls"):
                    first = first or time.perf_counter() - t0
                for tc in d.get("tool_calls") or []:
                    call = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                    call["id"] = tc.get("id") or call["id"]
                    fn = tc.get("function") or {}
                    call["name"] = fn.get("name") or call["name"]
                    call["arguments"] += fn.get("arguments") or ""
        c.close()
        return first, [calls[i] for i in sorted(calls)]


def blocks_of(call):
    """A request as the prompt cache reads it: tools, system blocks, message blocks."""
    out = [json.dumps(["tool", t], sort_keys=True) for t in call.get("tools") or []]
    system = call.get("system") or []
    system = [{"type": "text", "text": system}] if isinstance(system, str) else system
    out += [json.dumps(["system", {k: v for k, v in b.items() if k != "cache_control"}],
                       sort_keys=True) for b in system]
    for m in call["messages"]:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out += [json.dumps([m["role"], {k: v for k, v in b.items() if k != "cache_control"}],
                           sort_keys=True) for b in content]
    return out


def shared(prev, nxt):
    """(shared fraction of prev, characters of nxt after the shared prefix)."""
    a, b = blocks_of(prev), blocks_of(nxt)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return sum(map(len, a[:n])) / sum(map(len, a)), sum(map(len, b[n:]))


def loop(proxy, steps, native, ttft, calls):
    """The agent loop, one step per next(): appends each step's time to first token and
    upstream request to `ttft` and `calls` (so the modes' loops can be run interleaved)."""
    messages = [{"role": "system", "content": "You are a coding agent. Use the tools."},
                {"role": "user", "content": "Read the project's files one by one and summarise."}]
    headers = {"X-Toolcall-Module": "native"} if native else {"X-Toolcall-Module": "generic"}
    for i in range(steps):
        path = "src/file_%02d.py" % i
        if native:
            UP.default = fake_upstream.tool_use("mcp__client__read_file", {"path": path},
                                                id="toolu_step%02d" % i)
            UP.default.id = "msg_step%02d" % i      # the real API's ids are unique
        else:
            UP.default = fake_upstream.text(
                F + 'tool_call\n{"name": "read_file", "arguments": {"path": "%s"}}\n' % path + F)
        proxy.wait_ready()
        before = len(UP.model_calls)
        first, got = proxy.step(messages, headers)
        if len(UP.model_calls) != before + 1 or len(got) != 1:
            raise RuntimeError("step %d: %d upstream calls, %d tool calls"
                               % (i, len(UP.model_calls) - before, len(got)))
        ttft.append(first)
        calls.append(UP.model_calls[before])
        messages += [{"role": "assistant", "content": None, "tool_calls": [
                         {"id": got[0]["id"], "type": "function",
                          "function": {"name": got[0]["name"], "arguments": got[0]["arguments"]}}]},
                     {"role": "tool", "tool_call_id": got[0]["id"], "content": RESULT}]
        yield


def handshake(rounds=size(7, 1)):
    """What the MCP set-up costs a pre-started bare CLI: ms from writing initialize + the user
    line to the first text delta, with the handshake over the control channel (initialize
    without sdkMcpServerManifests, each mcp_message answered at once) and with it given in
    initialize (what the proxy sends), and with no tools at all; medians of `rounds`."""
    sys.path.insert(0, str(ROOT))
    import claude_openai_proxy as cp
    cfg, _ = cp.load_config(["--claude-bin", CLAUDE], env_for(CLAUDE))
    tools = [cp.ToolSpec("read_file", "Read a file of the project.",
                         TOOLS[0]["function"]["parameters"])]
    work = tempfile.mkdtemp(prefix="claude-proxy-bench-cwd-")
    modes = ("no tools", "handshake over the control channel", "manifest in initialize")
    times = {mode: [] for mode in modes}
    for _ in range(rounds):             # the modes interleaved: a busy machine's drift hits all
        for mode in modes:
            req = cp.Request(model="sonnet", cli_model="sonnet", messages=[],
                             tools=[] if mode == "no tools" else tools, handler=cp.HANDLERS["native"])
            bridge = cp.ToolBridge(req) if req.tools else None
            init = cp.init_request(req, bridge)
            if mode.startswith("handshake"):
                del init["sdkMcpServerManifests"]
            UP.default = fake_upstream.text("Hello there.")
            proc = cp.CLIProcess(cfg, cp.Launch(), work)
            try:
                run.settle(2.0)
                t0 = time.perf_counter()
                proc.send(cp.control("init", init), cp.user_line([{"type": "text", "text": "hi"}]))

                class Call:
                    def check(self):
                        pass
                    maybe_check = check
                for ev in cp.translate(proc, Call(), bridge):
                    if isinstance(ev, cp.TextDelta):
                        times[mode].append(time.perf_counter() - t0)
                        break
            finally:
                proc.close()
    out = {mode: statistics.median(times[mode]) for mode in modes}
    for mode in modes:
        print("  handshake: %-36s first delta %4.0f ms (median of %d)"
              % (mode, 1000 * out[mode], rounds), flush=True)
    print("  handshake: manifest saves %.0f ms; tools still cost %.0f ms over none"
          % (1000 * (out["handshake over the control channel"] - out["manifest in initialize"]),
             1000 * (out["manifest in initialize"] - out["no tools"])), flush=True)


def before_script():
    rev = os.environ.get("BEFORE")
    try:
        rev = rev or subprocess.check_output(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"],
                                             text=True, stderr=subprocess.DEVNULL).strip()
        text = subprocess.check_output(["git", "-C", str(ROOT), "show", rev + ":claude_openai_proxy.py"],
                                       stderr=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, OSError):
        return None, None
    path = pathlib.Path(tempfile.mkdtemp(prefix="claude-proxy-before-")) / "claude_openai_proxy.py"
    path.write_bytes(text)
    return path, rev[:10]


def main(steps):
    script = ROOT / "claude_openai_proxy.py"
    modes = [("native", script, True, {}),
             ("native, not kept", script, True, {"CLAUDE_PROXY_SESSIONS": 0}),
             ("emulated", script, False, {})]
    old, rev = before_script()
    # --quick on main (CI): the merge base is HEAD, the same file as today's native mode
    same = QUICK and old is not None and old.read_bytes() == script.read_bytes()
    if old is not None and not same:
        modes.append(("native before (%s)" % rev, old, True, {}))
    print("agent loop: %d steps, one tool call each, ~%d-byte results; real CLI, fake upstream"
          % (steps, len(RESULT)), flush=True)
    if same:
        print("  native before (%s): the same file as today's, not run again under --quick" % rev)
    handshake()
    rows, proxies, figures = {}, {}, {}
    try:
        for name, path, native, env in modes:
            proxies[name] = Proxy(path, **env)
            figures[name] = ([], [])
        steppers = [loop(proxies[name], steps, native, *figures[name]) for name, _p, native, _e in modes]
        for _ in range(steps):          # the modes step by step in turn: drift hits all alike
            for stepper in steppers:
                next(stepper)
        kept = {}
        for name, p in proxies.items():
            h = p.health()       # the store of today, or the old proxy's sessions
            kept[name] = h.get("sessions") or {"kept hits": h.get("idle", {}).get("hits", {}).get("kept")}
    finally:
        for p in proxies.values():
            p.stop()
    for name, (ttft, calls) in figures.items():
        pairs = [shared(a, b) for a, b in zip(calls, calls[1:])]
        fractions = [f for f, _ in pairs]
        uncached = (sum(map(len, blocks_of(calls[0]))) + sum(n for _, n in pairs)) / 4
        rows[name] = dict(ttft=ttft, mean=statistics.mean(fractions), min=min(fractions),
                          uncached=uncached, kept=kept[name])
        print("  %-24s prefix mean %5.1f %% min %5.1f %%  ttft median %4.0f ms  "
              "uncached input ~%6.0f tokens  sessions %s" % (
                  name, 100 * rows[name]["mean"], 100 * rows[name]["min"],
                  1000 * statistics.median(ttft), uncached, kept[name]), flush=True)
        print("    ttft per step (ms): " + " ".join("%.0f" % (1000 * t) for t in ttft), flush=True)
        print("    shared prefix per step (%): " + " ".join("%.1f" % (100 * f) for f in fractions),
              flush=True)
    nat, emu = rows["native"], rows["emulated"]
    tail = lambda r: statistics.median(r["ttft"][2:])       # from the first kept step on
    print("native / emulated, ttft median from step 3 on: %.2f (%.0f vs %.0f ms; the bridge's "
          "extra time per step: %+.0f ms)" % (tail(nat) / tail(emu), 1000 * tail(nat),
                                              1000 * tail(emu), 1000 * (tail(nat) - tail(emu))))
    for name, r in rows.items():
        print("uncached input, %s / emulated: %.2f" % (name, r["uncached"] / emu["uncached"]))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    main(int(args[0]) if args else size(10, 3))
