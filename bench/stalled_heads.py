#!/usr/bin/env python3
"""Half-sent request heads against the proxy (README: Security, callers without a key).

    python3 bench/stalled_heads.py            # 1,100 stalled connections, bounds 100 and 256
    python3 bench/stalled_heads.py --quick    # 300 of them

Starts the proxy on the fake CLI, opens N connections that each send part of a request head and
then nothing, and prints how many descriptors the proxy holds (its bound on connections still
sending a head, CLAUDE_PROXY_MAX_WAITING, closes the longest-waiting) and the status of a real
request made after them.  Asserts nothing about time.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from harness import accept_queue  # noqa: E402

QUICK = "--quick" in sys.argv
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(bound, n):
    port, home = free_port(), tempfile.mkdtemp(prefix="bench-stalled-")
    env = dict(os.environ, HOME=home, CLAUDE_BIN=str(ROOT / "tests" / "fake_claude.py"),
               CLAUDE_PROXY_POOL_SIZE="0", CLAUDE_PROXY_SESSIONS="0", CLAUDE_PROXY_STORE="off",
               CLAUDE_PROXY_MAX_WAITING=str(bound))
    proc = subprocess.Popen([sys.executable, str(ROOT / "claude_openai_proxy.py"), "--port",
                             str(port)], env=env, stderr=subprocess.DEVNULL)
    socks = []
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        before = len(os.listdir("/proc/%d/fd" % proc.pid))
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(HEAD)
            socks.append(s)
            # --quick: every 64 until the proxy accepted them, or a connection that finds its
            # listen queue full waits a second for the kernel's retry (the full run as measured)
            while QUICK and i % 64 == 63 and accept_queue(port):
                time.sleep(0.01)
        time.sleep(0.2 if QUICK else 1)     # the last threads reach the bound
        held = len(os.listdir("/proc/%d/fd" % proc.pid))
        req = urllib.request.Request(
            "http://127.0.0.1:%d/v1/chat/completions" % port, method="POST",
            data=json.dumps({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}],
                             "stream": True}).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status = "%d, %d bytes" % (resp.status, len(resp.read()))
        except OSError as exc:
            status = "failed: %s" % exc
        print("CLAUDE_PROXY_MAX_WAITING=%d: proxy descriptors %d before, %d with %d stalled heads "
              "open; a real streamed request after them: %s" % (bound, before, held, n, status),
              flush=True)
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    count = 300 if QUICK else 1100
    for b in (100, 256):
        run(b, count)
