"""Shared fixtures: a fake Anthropic upstream, the real CLI, and proxies run as subprocesses.

The proxy is started exactly as a user starts it (`python3 claude_openai_proxy.py --port N`)
with the real `claude` CLI (pinned, installed by .ci/run into .cli/) pointed at the fake
upstream.  HOME is a temporary directory holding a ~/.claude/CLAUDE.md with a marker that must
never reach the upstream.
"""
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fake_upstream  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROXY = ROOT / "claude_openai_proxy.py"
FAKE_CLAUDE = pathlib.Path(__file__).resolve().parent / "fake_claude.py"
MARKER = "CLAUDE-MD-MARKER-8f3a"


def real_claude_bin():
    path = os.environ.get("CLAUDE_TEST_BIN") or str(ROOT / ".cli" / "node_modules" / ".bin" / "claude")
    if not os.path.exists(path):
        pytest.exit("the pinned claude CLI is missing at %s: run bash .ci/run "
                    "(or npm install --prefix .cli @anthropic-ai/claude-code@2.1.330)" % path, 2)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A running proxy subprocess; `url` is its base URL, `log` its stderr so far."""

    def __init__(self, env, args=(), cwd=None):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = pathlib.Path(env["HOME"]) / ("proxy-%d.log" % self.port)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(PROXY), "--port", str(self.port), *args],
                                     env=env, cwd=cwd or env["HOME"], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("proxy did not start:\n" + self.log)
                time.sleep(0.05)

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def request(self, method, path, body=None, headers=None, raw=None, timeout=60):
        """(status, headers, parsed JSON or text) for one request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, hdrs, text = resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            status, hdrs, text = err.code, dict(err.headers), err.read().decode()
        try:
            return status, hdrs, json.loads(text)
        except ValueError:
            return status, hdrs, text

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def upstream_server():
    up = fake_upstream.FakeUpstream()
    yield up
    up.close()


@pytest.fixture
def upstream(upstream_server):
    """The fake Anthropic API, emptied before each test."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@pytest.fixture(scope="session")
def home(tmp_path_factory):
    """HOME for the CLI: holds a ~/.claude/CLAUDE.md whose marker must never reach upstream."""
    h = tmp_path_factory.mktemp("home")
    (h / ".claude").mkdir()
    (h / ".claude" / "CLAUDE.md").write_text("Always say %s.\n" % MARKER)
    (h / "CLAUDE.md").write_text("Project rule: %s\n" % MARKER)
    (h / "AGENTS.md").write_text("Agent rule: %s\n" % MARKER)
    return h


def base_env(home, upstream_url, claude_bin, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE", "ANTHROPIC"))}
    env.update(HOME=str(home), CLAUDE_BIN=claude_bin, ANTHROPIC_BASE_URL=upstream_url,
               ANTHROPIC_API_KEY="sk-ant-test-dummy-key",
               CLAUDE_PROXY_PASS_ENV="ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def make_proxy(home, upstream_server):
    """Factory: make_proxy(fake=False, args=(), **env) -> a started Proxy (stopped at the end)."""
    started = []

    def make(fake=False, args=(), **extra):
        env = base_env(home, upstream_server.url, str(FAKE_CLAUDE) if fake else real_claude_bin(),
                       **extra)
        p = Proxy(env, args)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def proxy(make_proxy):
    """One shared proxy on the real CLI with default settings."""
    return make_proxy()


@pytest.fixture(scope="session")
def fake_proxy(make_proxy, tmp_path_factory):
    """A proxy on the fake CLI, without a warm pool or kept sessions (so every CLI process it
    starts belongs to a request and ends with it); it records the pids of its CLI runs in `fake_proxy.pids`."""
    pids = tmp_path_factory.mktemp("pids")
    p = make_proxy(fake=True, args=("--timeout", "4"), FAKE_CLAUDE_PIDS=pids,
                   CLAUDE_PROXY_PASS_ENV="FAKE_CLAUDE_PIDS", CLAUDE_PROXY_POOL_SIZE=0,
                   CLAUDE_PROXY_SESSIONS=0)
    p.pids = pids
    return p


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def no_leftover_cli(pids_dir, within=2.0):
    """Asserts every CLI process started inside the block is gone within `within` seconds."""
    before = set(os.listdir(pids_dir))
    yield
    new = [int(p) for p in set(os.listdir(pids_dir)) - before]
    deadline = time.time() + within
    while any(alive(p) for p in new) and time.time() < deadline:
        time.sleep(0.05)
    assert not [p for p in new if alive(p)], "CLI processes left running"


def sse_events(text):
    """Parse an SSE body into a list of (event name or None, data string)."""
    out = []
    for frame in text.split("\n\n"):
        if not frame.strip() or frame.startswith(":"):
            continue
        name, data = None, []
        for line in frame.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        out.append((name, "\n".join(data)))
    return out


def upstream_turns(call):
    """The conversation a CLI sent upstream as [(role, blocks)], without what the CLI adds itself
    (role "system" messages, <system-reminder> blocks, cache_control marks)."""
    out = []
    for m in call["messages"]:
        if m["role"] == "system":
            continue
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append((m["role"], [{k: v for k, v in b.items() if k != "cache_control"}
                                for b in content if not (b.get("type") == "text" and
                                                         b["text"].startswith("<system-reminder>"))]))
    return out


def upstream_texts(call):
    """upstream_turns as [(role, the text blocks joined by newlines)]."""
    return [(role, "\n".join(b["text"] for b in blocks if b.get("type") == "text"))
            for role, blocks in upstream_turns(call)]
