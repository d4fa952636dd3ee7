"""Shared fixtures: a fake Anthropic upstream, the real CLI, and proxies run as subprocesses.

The proxy is started exactly as a user starts it (`python3 claude_openai_proxy.py --port 0`,
by tests/harness.py, which bench/ uses too)
with the real `claude` CLI (pinned, installed by .ci/run into .cli/) pointed at the fake
upstream.  HOME is a temporary directory holding a ~/.claude/CLAUDE.md with a marker that must
never reach the upstream.
"""
import contextlib
import itertools
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fake_upstream  # noqa: E402
import harness  # noqa: E402
from harness import FAKE_CLAUDE, PROXY, ROOT, Proxy, alive, base_env, children, wait_for  # noqa: E402,F401

MARKER = "CLAUDE-MD-MARKER-8f3a"


def real_claude_bin():
    path = harness.real_claude_bin()
    if path is None:
        pytest.exit("the pinned claude CLI is missing: run bash .ci/run "
                    "(or npm install --prefix .cli @anthropic-ai/claude-code@2.1.330)", 2)
    return path


def free_port():
    """A port that was free a moment ago: only for a program that cannot report the port it
    bound (a load balancer's front end); proxies bind port 0 and say which port they got."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_tool(name):
    """The path of command `name`, or skip the test saying that .ci/run installs it (under
    CI=true a skip is a failure: see pytest_runtest_makereport)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip("%s is not installed (.ci/run installs it)" % name)
    return path


# The head of an nginx configuration that runs unprivileged from a test's directory (%(dir)s):
# a recipe's `upstream`, `map` and `server` blocks follow it, inside its open `http {`.
NGINX_HEAD = """
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body; proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fcgi; uwsgi_temp_path %(dir)s/uwsgi; scgi_temp_path %(dir)s/scgi;"""

# The head of an HAProxy configuration (after any `global` section): HTTP, the recipes'
# timeouts, and the front end on %(port)d, whose rules follow.
HAPROXY_HEAD = """
defaults
    mode http
    timeout connect 5s
    timeout client 660s
    timeout server 660s
frontend fe
    bind 127.0.0.1:%(port)d"""


@pytest.fixture
def balancer(tmp_path):
    """balancer(argv, conf, **values) -> the URL of a load balancer (nginx, HAProxy) started
    from `conf`, a template of `values` plus dir (the test's directory) and port (its front
    end); "CONF" in argv is the written file's path.  Skips when the program is missing; the
    balancer ends with the test."""
    started = []

    def start(argv, conf, **values):
        need_tool(argv[0])
        port = free_port()
        (tmp_path / "lb.conf").write_text(conf % dict(values, dir=tmp_path, port=port))
        lb = subprocess.Popen([a.replace("CONF", str(tmp_path / "lb.conf")) for a in argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(lb)
        url = "http://127.0.0.1:%d" % port
        deadline = time.time() + 10
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                return url
            except OSError:
                assert time.time() < deadline and lb.poll() is None, "%s did not start" % argv[0]
                time.sleep(0.05)

    yield start
    for lb in started:
        lb.terminate()
        lb.wait(10)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With CI=true a skipped test fails: CI installs every tool and client the suite uses, so
    a skip there means a broken CI that would otherwise pass without the test.  The one
    exception is marked skip_in_ci_allowed: what no install step can bring here (a container
    engine's base images from a registry CI cannot reach)."""
    report = yield
    if item.get_closest_marker("skip_in_ci_allowed") is not None:
        return report
    return _no_skip_in_ci(report)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (pytest.importorskip at the top)."""
    return _no_skip_in_ci((yield))


def _no_skip_in_ci(report):
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = "CI=true, so this skip is a failure: %s" % reason
    return report


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


# The proxy factory ##############################################################################
# One factory, `make_proxy`, starts every proxy of the suite.  A proxy lives as long as whoever
# started it: one started in a test (or by a factory the test calls) stops when the test ends;
# one started while a fixture is set up stops when that fixture is torn down (a module-scoped
# fixture's at the end of its module).  The hook below tells the factory which fixture is being
# set up.

_SETTING_UP = []        #: the SubRequest of each fixture being set up, innermost last


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    _SETTING_UP.append(request)
    try:
        return (yield)
    finally:
        _SETTING_UP.pop()


class ProxyFactory:
    """make_proxy(fake=False, args=(), *, token=None, subscription=False, pids=None,
    script=PROXY, cwd=None, **env) -> a started Proxy.

    fake          the stand-in CLI tests/fake_claude.py instead of the real one
    token         a subscription login: CLAUDE_CODE_OAUTH_TOKEN=token and no API key anywhere
                  (subscription=True: the same without a token, e.g. with CLAUDE_PROXY_ACCOUNTS)
    pids          a directory where the fake CLI records the pid of each of its runs (`p.pids`)
    script        another copy of the proxy to run; args go on its command line; env (strings
                  or anything str() takes) on top of base_env.
    """

    def __init__(self, home, upstream_url):
        self.home, self.upstream_url = home, upstream_url
        self.test_owned = []        #: proxies started in the running test, stopped at its end

    def __call__(self, fake=False, args=(), *, token=None, subscription=False, pids=None,
                 script=PROXY, cwd=None, **extra):
        if pids is not None:
            extra["FAKE_CLAUDE_PIDS"] = pids
            extra.setdefault("CLAUDE_PROXY_PASS_ENV", "FAKE_CLAUDE_PIDS")
        if token is not None or subscription:
            extra.setdefault("CLAUDE_PROXY_PASS_ENV", "ANTHROPIC_BASE_URL")
        env = base_env(self.home, self.upstream_url, str(FAKE_CLAUDE) if fake else real_claude_bin(),
                       **extra)
        if token is not None or subscription:
            env.pop("ANTHROPIC_API_KEY")
            if token:
                env["CLAUDE_CODE_OAUTH_TOKEN"] = token
        try:
            p = Proxy(env, args, cwd=cwd, script=script)
        except harness.ProxyStartError as err:
            pytest.fail(str(err), pytrace=False)
        p.pids = pids
        if _SETTING_UP:
            _SETTING_UP[-1].addfinalizer(lambda: self.stop(p))
        else:
            self.test_owned.append(p)
        return p

    @staticmethod
    def stop(p):
        p.stop()
        # a proxy that stopped on SIGTERM ends its CLI processes itself
        assert not (p.left_behind and p.proc.returncode == 0), \
            "the proxy left CLI processes running after it stopped: %s\n%s" % (p.left_behind, p.log)


@pytest.fixture(scope="session")
def make_proxy(home, upstream_server):
    """Factory: make_proxy(fake=False, args=(), **env) -> a started Proxy (see ProxyFactory)."""
    return ProxyFactory(home, upstream_server.url)


@pytest.fixture(autouse=True)
def _proxies_end_with_their_test(make_proxy):
    make_proxy.test_owned = []
    yield
    started, make_proxy.test_owned = make_proxy.test_owned, []
    for p in started:
        make_proxy.stop(p)


# Shared proxies, one per test module that uses them (not per session: a proxy's idle CLIs
# would otherwise live on, and be replaced in the background, while later modules run).

@pytest.fixture(scope="module")
def proxy(make_proxy):
    """A proxy on the real CLI with default settings but no pool: pre-starting is tested in
    test_pool.py, and a pool here would start CLIs in the background of every later test."""
    return make_proxy(CLAUDE_PROXY_POOL_SIZE=0)


@pytest.fixture(scope="module")
def fake_proxy(make_proxy, tmp_path_factory):
    """A proxy on the fake CLI, without a warm pool or kept sessions (so every CLI process it
    starts belongs to a request and ends with it); it records the pids of its CLI runs in `fake_proxy.pids`."""
    return make_proxy(fake=True, args=("--timeout", "4"), pids=tmp_path_factory.mktemp("pids"),
                      CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)


class Gate:
    """For the fake CLI's [[gate:N]] directive: `text` goes in a request, whose CLI answers
    "gate ", waits until `open()` is called, then answers "open" (so a test needs no guess at
    how long a request must run)."""

    def __init__(self, home):
        self.number = next(_gates)
        self.path = pathlib.Path(home) / ".fake-claude-gates" / str(self.number)
        self.text = "[[gate:%d]]" % self.number

    def open(self):
        self.path.parent.mkdir(exist_ok=True)
        self.path.touch()


_gates = itertools.count(1)      #: gate numbers (HOME is the session's own)


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
