"""A proxy run as a subprocess, exactly as a user starts it; shared by tests/ and bench/.

Standard library only (bench/ runs without pytest).  The proxy binds port 0 and the port it
got is read from its "listening on http://HOST:PORT" line, so two starts never race for a
port.  `Proxy.stop` also ends any CLI process the proxy left behind (it should leave none;
`left_behind` names them for a test to assert on).
"""
import atexit
import itertools
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROXY = ROOT / "claude_openai_proxy.py"
FAKE_CLAUDE = ROOT / "tests" / "fake_claude.py"
LISTENING = re.compile(rb"listening on http://(\S+):(\d+)")
_serial = itertools.count(1)
_running = set()        #: every Proxy not stopped yet: stopped at exit (a bench interrupted midway)
atexit.register(lambda: [p.stop() for p in list(_running)])


def real_claude_bin():
    """The pinned CLI (bash .ci/run installs it into .cli/), or $CLAUDE_TEST_BIN; None if absent."""
    path = os.environ.get("CLAUDE_TEST_BIN") or str(ROOT / ".cli" / "node_modules" / ".bin" / "claude")
    return path if os.path.exists(path) else None


def base_env(home, upstream_url, claude_bin, **extra):
    """The proxy's environment: the caller's minus CLAUDE*/ANTHROPIC*, HOME, the CLI, and an
    API-key login on the fake upstream (passed through to the CLI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE", "ANTHROPIC"))}
    env.update(HOME=str(home), CLAUDE_BIN=claude_bin, ANTHROPIC_BASE_URL=upstream_url,
               ANTHROPIC_API_KEY="sk-ant-test-dummy-key",
               CLAUDE_PROXY_PASS_ENV="ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _parents():
    """{pid: parent pid} of every process, from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parent


def descendants(pid):
    """Pids of every process below `pid` (also those in a session of their own)."""
    parent = _parents()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def children(pid):
    """Live (non-zombie) processes whose parent is `pid`: a proxy's CLI processes."""
    return sorted(c for c, pp in _parents().items() if pp == pid and alive(c))


def alive(pid):
    """Running and not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(cond, what, timeout=10, every=0.05):
    """Calls cond() until it returns something truthy, and returns that; fails naming `what`
    (and the last value) after `timeout` seconds.  Tests poll with it, never sleep and hope."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %gs waiting for %s (last: %r)" % (timeout, what, value))
        time.sleep(every)


def accept_queue(port):
    """Connections to 127.0.0.1:port that the kernel completed and its server has not accepted
    yet (the rx_queue of the LISTEN row in /proc/net/tcp).  A client opening many connections
    waits for 0 now and then: one that finds the queue full is retried a second later."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError("nothing listens on port %d" % port)


def send_raw(port, data, timeout=15):
    """Writes raw bytes to 127.0.0.1:port and returns all the server sent until it closed (a
    server that never closes raises socket.timeout after `timeout` seconds of silence)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    finally:
        sock.close()


def recv_until(sock, marker):
    """Reads from `sock` until `marker` has come (a stream got that far); returns all read.
    Fails if the server closes first."""
    got = b""
    while marker not in got:
        data = sock.recv(65536)
        assert data, "the stream ended before %r: %r" % (marker, got)
        got += data
    return got


class ProxyStartError(RuntimeError):
    pass


class Proxy:
    """A running proxy subprocess: `url`, `port`, `log` (its output so far), `startup` (seconds
    from exec to the first /health answer), `request`/`post`/`health`, and `stop`.  `wrap`
    turns the command line into another (e.g. one that joins a cgroup first)."""

    def __init__(self, env, args=(), cwd=None, script=PROXY, timeout=30, wrap=None):
        home = pathlib.Path(env["HOME"])
        self.log_path = home / ("proxy-%d-%d.log" % (os.getpid(), next(_serial)))
        self._log = open(self.log_path, "wb")
        if "--port" not in args:
            args = ("--port", "0", *args)
        self.env, self.left_behind = env, []
        t0 = time.perf_counter()
        argv = [sys.executable, str(script), *args]
        self.proc = subprocess.Popen(wrap(argv) if wrap else argv, env=env,
                                     cwd=cwd or str(home), stdout=self._log,
                                     stderr=subprocess.STDOUT)
        _running.add(self)
        deadline = time.time() + timeout
        self.port = None
        while True:
            try:
                if self.port is None:
                    found = LISTENING.search(self.log_path.read_bytes())
                    if not found:
                        raise OSError("not listening yet")
                    self.port = int(found.group(2))
                    self.url = "http://127.0.0.1:%d" % self.port
                # generous: a poll that gave up mid-answer would only add a hang-up to the log
                with urllib.request.urlopen(self.url + "/health", timeout=15):
                    break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise ProxyStartError("proxy did not start:\n" + self.log)
                time.sleep(0.005)
        self.startup = time.perf_counter() - t0

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
            err.close()
        try:
            return status, hdrs, json.loads(text)
        except ValueError:
            return status, hdrs, text

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def health(self, **kw):
        return self.request("GET", "/health", **kw)[2]

    def stop(self, grace=10):
        """SIGTERM, then SIGKILL after `grace` seconds; CLI processes still running after the
        proxy exited are killed and listed in `left_behind`."""
        if self.proc.poll() is None:
            kids = descendants(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            deadline = time.time() + 5
            while any(alive(k) for k in kids) and time.time() < deadline:
                time.sleep(0.05)
            for k in kids:
                if alive(k):
                    self.left_behind.append(k)
                    try:
                        os.kill(k, signal.SIGKILL)
                    except OSError:
                        pass
        if not self._log.closed:
            self._log.close()
        _running.discard(self)
