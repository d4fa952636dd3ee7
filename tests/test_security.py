"""Section 13's request path against an attacker (issue 19, items 1, 3 and 6): web pages, DNS
rebinding, callers without a key, broken body framing and crowds of stalled connections.

Each test sends what the attacker sends (raw sockets for connection and framing attacks, the
headers a browser sends for the page attacks), checks the refusal and that nothing reached a
CLI, and that the server answers the next request (`still_serving`).  README: Security.
"""
import json
import os
import re
import socket
import struct
import time
import types

import pytest

import claude_openai_proxy as cop
from harness import accept_queue, send_raw, wait_for
import fake_upstream

CHAT = "/v1/chat/completions"
KEY = "sec-key-0123456789abcdef"
PLACEHOLDER = "change-me-to-a-long-random-string"      # claude-proxy.env.example's key
BODY = json.dumps({"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]}).encode()
#: what Chrome sends with a page's fetch(url, {method: "POST", body: "..."}) to another site
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0 Safari/537.36",
           "Accept": "*/*", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
           "Sec-Fetch-Dest": "empty", "Referer": "https://evil.example/"}


# Helpers ########################################################################################

def cli_runs(p):
    return set(os.listdir(p.pids))


def raw(port, data, timeout=15):
    """Send raw bytes; everything the server sends until it closes: (status, head, body)."""
    head, _, body = send_raw(port, data, timeout).partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1").lower(), body


def post_head(path, *lines, host="127.0.0.1"):
    return ("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            "Connection: close\r\n%s\r\n"
            % (path, host, "".join(line + "\r\n" for line in lines))).encode()


def still_serving(p, headers=None):
    status, _, got = p.post(CHAT, json.loads(BODY), headers=headers)
    assert status == 200, got
    assert got["choices"][0]["message"]["content"] == "fake answer"


def error_message(got):
    return got["error"]["message"] if isinstance(got, dict) else got


@pytest.fixture(scope="module")
def open_proxy(make_proxy, tmp_path_factory):
    """No keys (a laptop's loopback proxy), CORS off; its fake CLI records its runs."""
    pids = tmp_path_factory.mktemp("pids")
    p = make_proxy(fake=True, FAKE_CLAUDE_PIDS=pids, CLAUDE_PROXY_PASS_ENV="FAKE_CLAUDE_PIDS",
                   CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    p.pids = pids
    return p


@pytest.fixture(scope="module")
def keyed_proxy(make_proxy, tmp_path_factory):
    pids = tmp_path_factory.mktemp("pids")
    p = make_proxy(fake=True, FAKE_CLAUDE_PIDS=pids, CLAUDE_PROXY_PASS_ENV="FAKE_CLAUDE_PIDS",
                   CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_API_KEYS=KEY)
    p.pids = pids
    return p


# Web pages and DNS rebinding (item 1) ###########################################################

@pytest.mark.parametrize("content_type", ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=----x"])
def test_body_a_page_can_send_without_preflight_is_415(open_proxy, upstream, content_type):
    """fetch() with a string body sends text/plain (no preflight needed); `curl -d` sends a
    form type.  Both are refused with a message saying what to send."""
    runs = cli_runs(open_proxy)
    status, hdrs, got = open_proxy.request("POST", CHAT, raw=BODY,
                                           headers={"Content-Type": content_type})
    assert status == 415, got
    message = error_message(got)
    assert "Content-Type: application/json" in message and "curl" in message, message
    assert hdrs.get("Connection") == "close"
    assert cli_runs(open_proxy) == runs and upstream.model_calls == []
    still_serving(open_proxy)


def test_text_plain_fetch_from_a_page_is_refused(open_proxy, upstream):
    """The whole request a page's fetch() sends: its Origin alone refuses it (403)."""
    runs = cli_runs(open_proxy)
    status, _, got = open_proxy.request("POST", CHAT, raw=BODY, headers=dict(
        BROWSER, Origin="https://evil.example", **{"Content-Type": "text/plain;charset=UTF-8"}))
    assert status == 403, got
    assert "https://evil.example" in error_message(got)
    assert "CLAUDE_PROXY_CORS_ORIGINS" in error_message(got)
    assert cli_runs(open_proxy) == runs and upstream.model_calls == []
    still_serving(open_proxy)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1.evil.example"])
def test_json_post_with_a_foreign_origin_is_403(open_proxy, upstream, origin):
    runs = cli_runs(open_proxy)
    headers = dict(BROWSER, Origin=origin, **{"Sec-Fetch-Mode": "cors"})
    status, hdrs, got = open_proxy.post(CHAT, json.loads(BODY), headers=headers)
    assert status == 403, got
    assert got["error"]["type"] == "permission_error"
    assert not [k for k in hdrs if k.lower().startswith("access-control-")]
    assert cli_runs(open_proxy) == runs and upstream.model_calls == []
    still_serving(open_proxy)


def test_own_page_is_same_origin(open_proxy):
    """A page served by the proxy itself (its Origin is the Host) is not a foreign page."""
    still_serving(open_proxy, headers={"Origin": open_proxy.url})


@pytest.mark.parametrize("method,path", [("POST", CHAT), ("GET", "/v1/usage"),
                                         ("GET", "/dashboard/data"), ("GET", "/v1/models"),
                                         ("GET", "/metrics")])
def test_dns_rebinding_host_is_403(open_proxy, upstream, method, path):
    """A page at attacker.example whose name now resolves to 127.0.0.1 is same-origin with the
    proxy: the browser sends Host: attacker.example:PORT and no Origin (same-origin GET)."""
    runs = cli_runs(open_proxy)
    host = "attacker.example:%d" % open_proxy.port
    body = BODY if method == "POST" else b""
    data = ("%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\nSec-Fetch-Site: same-origin\r\nConnection: close\r\n\r\n"
            % (method, path, host, len(body))).encode() + body
    status, head, text = raw(open_proxy.port, data)
    assert status == 403, text
    message = json.loads(text)["error"]["message"]
    assert "attacker.example" in message and "CLAUDE_PROXY_ALLOWED_HOSTS" in message
    assert "connection: close" in head
    assert cli_runs(open_proxy) == runs and upstream.model_calls == []
    still_serving(open_proxy)


@pytest.mark.parametrize("host", ["localhost:%d", "127.0.0.1:%d", "LOCALHOST", "[::1]:%d"])
def test_local_host_names_are_served(open_proxy, host):
    host = host % open_proxy.port if "%d" in host else host
    data = ("GET /v1/models HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host).encode()
    status, _, text = raw(open_proxy.port, data)
    assert status == 200, text
    assert json.loads(text)["object"] == "list"


def test_two_host_headers_are_400(open_proxy):
    data = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: attacker.example\r\n"
            b"Connection: close\r\n\r\n")
    status, _, text = raw(open_proxy.port, data)
    assert status == 400 and "Host" in json.loads(text)["error"]["message"]


def test_allowed_hosts_adds_a_reverse_proxys_name(make_proxy):
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_ALLOWED_HOSTS="llm.example.com")
    for host, want in (("llm.example.com", 200), ("LLM.example.com:443", 200),
                       ("other.example.com", 403)):
        data = post_head(CHAT, "Content-Length: %d" % len(BODY), host=host) + BODY
        status, _, text = raw(p.port, data)
        assert status == want, (host, text)
    p.stop()


def test_with_keys_the_host_is_not_checked(keyed_proxy):
    """With keys a page has no key to send: any Host (a Docker service name, a reverse proxy's
    name) is served to a caller with a key, and a caller without one gets 401."""
    for auth, want in ((KEY, 200), (None, 401)):
        lines = ["Content-Length: %d" % len(BODY)] + (["Authorization: Bearer " + auth] if auth else [])
        data = post_head(CHAT, *lines, host="claude-proxy:8088") + BODY
        status, _, text = raw(keyed_proxy.port, data)
        assert status == want, text


def test_allowed_page_works_through_cors(make_proxy):
    """A browser app the operator allowed: preflight, then the request, both with CORS headers."""
    origin = "https://chat.example"
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_CORS_ORIGINS=origin)
    status, hdrs, _ = p.request("OPTIONS", CHAT, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type", "Sec-Fetch-Mode": "cors"})
    h = {k.lower(): v for k, v in hdrs.items()}
    assert status == 204
    assert h["access-control-allow-origin"] == origin and "POST" in h["access-control-allow-methods"]
    status, hdrs, got = p.post(CHAT, json.loads(BODY), headers={"Origin": origin,
                                                                 "Sec-Fetch-Mode": "cors"})
    assert status == 200, got
    assert {k.lower(): v for k, v in hdrs.items()}["access-control-allow-origin"] == origin
    status, _, _ = p.post(CHAT, json.loads(BODY), headers={"Origin": "https://evil.example"})
    assert status == 403
    p.stop()


# Unauthenticated callers (item 3) ###############################################################

def test_no_key_is_401_before_the_body_is_read(keyed_proxy, upstream):
    """Content-Length: 9000000 and no key: the 401 comes at once, the body never sent, and the
    connection closes (its unread body cannot be the next request)."""
    runs = cli_runs(keyed_proxy)
    status, head, text = raw(keyed_proxy.port, post_head(CHAT, "Content-Length: 9000000"), timeout=10)
    assert status == 401, text
    assert "connection: close" in head
    assert json.loads(text)["error"]["type"] == "authentication_error"
    # the same with a chunked body and with the Anthropic dialect
    status, head, text = raw(keyed_proxy.port, post_head("/v1/messages", "Transfer-Encoding: chunked",
                                                         "anthropic-version: 2023-06-01"), timeout=10)
    assert status == 401 and json.loads(text)["type"] == "error"
    assert cli_runs(keyed_proxy) == runs and upstream.model_calls == []
    still_serving(keyed_proxy, headers={"Authorization": "Bearer " + KEY})


# Body framing (item 3) ##########################################################################

@pytest.mark.parametrize("size", [b"-1", b"-0", b"0x10", b"+5", b"1_0", b" ", b"fffffffffffffffff"])
def test_chunk_size_must_be_hex_digits(open_proxy, upstream, size):
    runs = cli_runs(open_proxy)
    data = post_head(CHAT, "Transfer-Encoding: chunked") + size + b"\r\n" + BODY + b"\r\n0\r\n\r\n"
    status, head, text = raw(open_proxy.port, data)
    assert status == 400, text
    assert "chunk" in json.loads(text)["error"]["message"]
    assert "connection: close" in head
    assert cli_runs(open_proxy) == runs and upstream.model_calls == []
    still_serving(open_proxy)


def test_chunk_without_crlf_after_its_data_is_400(open_proxy):
    data = post_head(CHAT, "Transfer-Encoding: chunked") + b"%x\r\n%sXX0\r\n\r\n" % (len(BODY), BODY)
    status, _, text = raw(open_proxy.port, data)
    assert status == 400 and "CRLF" in json.loads(text)["error"]["message"], text


@pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "12 ", "+12"])
def test_content_length_must_be_ascii_digits(open_proxy, length):
    """'²' and Arabic-Indic digits pass str.isdigit() but are no Content-Length."""
    data = post_head(CHAT).replace(b"\r\n\r\n", ("\r\nContent-Length: %s\r\n\r\n" % length)
                                   .encode("latin-1", "replace")) + BODY
    status, _, text = raw(open_proxy.port, data)
    assert status == 400, text
    assert "Content-Length" in json.loads(text)["error"]["message"]
    still_serving(open_proxy)


@pytest.mark.parametrize("lines", [
    ("Content-Length: %d" % len(BODY), "Content-Length: %d" % (len(BODY) + 5)),
    ("Transfer-Encoding: chunked", "Content-Length: %d" % len(BODY)),
    ("Transfer-Encoding: gzip, chunked",),
    ("Transfer-Encoding: chunked", "Transfer-Encoding: chunked")])
def test_ambiguous_framing_is_400(open_proxy, upstream, lines):
    """Two framings a proxy in front could read differently (request smuggling)."""
    runs = cli_runs(open_proxy)
    status, head, text = raw(open_proxy.port, post_head(CHAT, *lines) + BODY)
    assert status == 400, text
    assert "connection: close" in head
    assert cli_runs(open_proxy) == runs and upstream.model_calls == []


def test_chunk_trailers_count_against_max_body(make_proxy):
    p = make_proxy(fake=True, CLAUDE_PROXY_MAX_BODY=4096, CLAUDE_PROXY_POOL_SIZE=0)
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 200) for i in range(40))
    data = post_head(CHAT, "Transfer-Encoding: chunked") + b"%x\r\n%s\r\n0\r\n%s\r\n" % (
        len(BODY), BODY, trailers)
    status, _, text = raw(p.port, data)
    assert status == 413 and b"CLAUDE_PROXY_MAX_BODY" in text, text
    still_serving(p)
    p.stop()


# Crowds of stalled connections (item 3) #########################################################

def open_stalled(port, n, head=b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"):
    """n connections that each send part of a request head and then nothing.  Every 64 it
    waits until the proxy has accepted them all: a connection the kernel finds its listen
    queue full for is retried only a second later (SYN retransmission), which made this take
    7 s for 1,100 without changing what the proxy ends up holding."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head)
        socks.append(s)
        if i % 64 == 63:
            wait_for(lambda: not accept_queue(port), "the proxy to accept the connections")
    return socks


def proxy_fds(p):
    return len(os.listdir("/proc/%d/fd" % p.proc.pid))


def test_stalled_heads_never_keep_a_request_out(make_proxy):
    """1,100 half-sent request heads: the proxy holds at most CLAUDE_PROXY_MAX_WAITING of them
    (the longest-waiting is closed), and a real request, streamed, is answered."""
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_MAX_WAITING=100)
    socks = open_stalled(p.port, 1100)
    try:
        status, _, text = p.post(CHAT, dict(json.loads(BODY), stream=True), timeout=30)
        assert status == 200, text
        assert "fake answer" in text and "[DONE]" in text
        assert proxy_fds(p) < 400, "the proxy holds every stalled connection"
        closed = 0
        for s in socks[:900]:           # the earliest were dropped: they read the end of stream
            s.settimeout(5)
            try:
                closed += s.recv(1) == b""
            except (ConnectionResetError, socket.timeout):
                pass
        assert closed >= 800, closed
        assert "Traceback" not in p.log
    finally:
        for s in socks:
            s.close()
    p.stop()


def test_descriptors_over_1024_are_not_a_hang_up(make_proxy):
    """With over 1,024 descriptors open in the proxy (every stalled head kept), a request is
    served on a descriptor select() cannot watch: it must be answered, not taken as gone."""
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_MAX_WAITING=5000)
    socks = open_stalled(p.port, 1100)
    try:
        deadline = time.monotonic() + 20
        while proxy_fds(p) < 1100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy_fds(p) >= 1100
        for stream in (False, True):
            status, _, got = p.post(CHAT, dict(json.loads(BODY), stream=stream), timeout=30)
            assert status == 200, got
            assert "fake answer" in (got if stream else got["choices"][0]["message"]["content"])
    finally:
        for s in socks:
            s.close()
    p.stop()


def test_client_gone_on_a_high_descriptor():
    """Call.client_gone on a socket numbered over 1,024: alive while the peer is there, gone
    once it closes."""
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1500))
    a.close()
    try:
        call = types.SimpleNamespace(sock=high)
        assert cop.Call.client_gone(call) is False
        b.sendall(b"next request")             # data waiting is not a hang-up
        assert cop.Call.client_gone(call) is False
        high.recv(100)
        b.close()
        assert cop.Call.client_gone(call) is True
    finally:
        high.close()


def test_a_head_sent_a_byte_at_a_time_is_cut_off(make_proxy):
    """The read timeout bounds the whole head, not each byte: a sender that never pauses for
    CLAUDE_PROXY_READ_TIMEOUT still cannot hold its connection open by trickling."""
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_READ_TIMEOUT=1)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        s.settimeout(0.3)
        for _ in range(60):                      # a byte every 0.3 s, up to 18 s
            try:
                if s.recv(1) == b"":
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                break
            try:
                s.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the trickling connection was never closed")
    finally:
        s.close()
    assert p.request("GET", "/health")[0] == 200
    p.stop()


def trickle_until_answered(sock, byte, rounds, pause=0.25):
    """Send `byte` every `pause` seconds, up to `rounds` times, until the server answers;
    everything it sent until it closed (b"" if it never answered while we trickled)."""
    sock.settimeout(pause)
    got = b""
    for _ in range(rounds):
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
            continue
        except socket.timeout:
            if got:
                continue
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            break
    return got


def answered_without_its_body(p, request, byte):
    """Send `request` (a head announcing 1,000,000 bytes, and a first one), then trickle `byte`
    until the proxy answers: it must answer 200 at once and close; returns the answer's body."""
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    try:
        s.sendall(request)
        got = trickle_until_answered(s, byte, 40)        # 10 s at most
    finally:
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), got[:300]
    assert b"connection: close" in head.lower()
    return body


@pytest.mark.parametrize("path", ["/health", "/", "/dashboard"])
def test_a_route_anyone_may_call_reads_no_body(make_proxy, path):
    """GET on a route anyone may call, announcing a body of 1,000,000 bytes and trickling it a
    byte at a time, without a key: the proxy reads none of it; it answers at once (200, not a
    408 or 500 when the trickle stalls) and closes the connection."""
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_API_KEYS=KEY,
                   CLAUDE_PROXY_READ_TIMEOUT=1)
    body = answered_without_its_body(p, (
        "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\nx" % path).encode(), b"x")
    if path == "/health":
        assert json.loads(body)["status"] in ("ok", "degraded")
    else:
        assert b"<title>claude-proxy</title>" in body
    assert "Traceback" not in p.log and " 500 " not in p.log, p.log[-2000:]
    assert p.request("GET", "/health")[0] == 200
    p.stop()


def test_a_post_route_that_takes_no_body_reads_none(make_proxy, tmp_path):
    """POST /v1/responses/{id}/cancel takes no body (its ROUTES entry: body="none"), and is
    treated as a GET announcing one: a key holder's request announcing 1,000,000 bytes and
    trickling them is answered at once (the response cancelled, not a 408 when the trickle
    stalls) and its connection closed; nothing of the body is read."""
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_API_KEYS=KEY,
                   CLAUDE_PROXY_READ_TIMEOUT=1, CLAUDE_PROXY_STATE_DIR=tmp_path / "state")
    auth = {"Authorization": "Bearer " + KEY}
    status, _, made = p.post("/v1/responses", {"model": "sonnet", "input": "[[slow:200]]",
                                               "background": True}, headers=auth)
    assert status == 200 and made["status"] == "queued", made
    body = answered_without_its_body(p, post_head(
        "/v1/responses/%s/cancel" % made["id"], "Content-Length: 1000000",
        "Authorization: Bearer " + KEY).replace(b"Connection: close\r\n", b"") + b"{", b" ")
    assert json.loads(body)["status"] == "cancelled"
    # a form type, which a web page sends without a preflight, is refused on it as on any POST
    status, _, got = p.request("POST", "/v1/responses/%s/cancel" % made["id"], raw=b"",
                               headers=dict(auth, **{"Content-Type": "text/plain"}))
    assert status == 415, got
    assert "Traceback" not in p.log, p.log[-2000:]
    still_serving(p, headers=auth)


def test_a_body_trickled_a_byte_at_a_time_is_408(make_proxy, upstream):
    """The read timeout bounds the whole body, as it does the head: a key holder whose body of
    60 bytes comes a byte every 0.25 s gets a 408 in its dialect (Anthropic here) after
    CLAUDE_PROXY_READ_TIMEOUT, not when the last byte arrives; no traceback, no CLI run."""
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_API_KEYS=KEY,
                   CLAUDE_PROXY_READ_TIMEOUT=1)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    try:
        s.sendall(post_head("/v1/messages", "Content-Length: 60", "x-api-key: " + KEY,
                            "anthropic-version: 2023-06-01") + b"{")
        got = trickle_until_answered(s, b" ", 59)        # the whole body: 15 s
    finally:
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), got[:300]
    err = json.loads(body)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert "CLAUDE_PROXY_READ_TIMEOUT" in err["error"]["message"]
    assert "Traceback" not in p.log and upstream.model_calls == []
    still_serving(p, headers={"Authorization": "Bearer " + KEY})
    p.stop()


def reset(sock):
    """Close with an RST (SO_LINGER 0), as a client killed mid-request does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_resets_is_no_traceback(make_proxy):
    """Clients that reset their connection between requests (an idle keep-alive) or while
    their answer is written: the proxy logs a line (an answer not taken as a 499), never a
    traceback or a 500, and serves on."""
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"Content-Length: (\d+)", got).group(1)):
        got += s.recv(65536)
    assert got.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in got
    reset(s)                                     # kept alive, idle: reset
    for _ in range(30):                          # reset while the answer is written
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.sendall(b"GET /dashboard HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.recv(1)
        reset(s)
    deadline = time.monotonic() + 10
    while "ConnectionResetError" not in p.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ConnectionResetError" in p.log, p.log[-2000:]
    assert p.request("GET", "/health")[0] == 200
    log = p.log
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
    assert " GET /dashboard 499 " in log, log[-3000:]      # the answers it did not take
    p.stop()


# What a caller without a key sees (item 6) ######################################################

def test_health_without_a_key_says_status_and_reasons_only(make_proxy, tmp_path, home):
    """Keys set, a missing CLI and a login whose token file is unreadable: the keyless caller
    learns that the proxy is degraded and why in general, not where the CLI, the logins or
    their files are; an admin key sees it all."""
    token = tmp_path / "token-of-alice"
    token.write_text("not-a-real-token")
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_API_KEYS=KEY,
                   CLAUDE_BIN=str(tmp_path / "no-claude-here"),
                   CLAUDE_PROXY_ACCOUNTS="alice=token-file:%s" % token)
    status, _, got = p.request("GET", "/health")
    assert status == 200
    assert got == {"status": "degraded", "logins": {"serving": True},
                   "reasons": ["the claude CLI was not found: every model request fails with 503"]}
    for header in ({"Authorization": "Bearer wrong-key-0123456789"}, {"x-api-key": KEY[:-1]}):
        assert p.request("GET", "/health", headers=header)[2] == got
    status, _, full = p.request("GET", "/health", headers={"Authorization": "Bearer " + KEY})
    text = json.dumps(full)
    assert "no-claude-here" in text and "alice" in text and "module_errors" in full
    assert full["reasons"][0].startswith("the claude CLI was not found (CLAUDE_BIN=%s)"
                                         % (tmp_path / "no-claude-here"))
    p.stop()


def test_health_names_no_login_to_a_keyless_caller(make_proxy, upstream):
    """A login that failed to authenticate is a reason; its name and hint (real CLI, the
    upstream refusing it) are the operator's."""
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_API_KEYS=KEY)
    admin = {"Authorization": "Bearer " + KEY}
    upstream.default = fake_upstream.error(401, "authentication_error", "invalid x-api-key")
    status, _, got = p.post(CHAT, json.loads(BODY), headers=admin)
    assert status == 502, got
    deadline = time.monotonic() + 10
    while p.request("GET", "/health", headers=admin)[2]["status"] != "degraded":
        assert time.monotonic() < deadline, "health did not turn degraded"
        time.sleep(0.1)
    full = p.request("GET", "/health", headers=admin)[2]
    assert full["reasons"][0].startswith("login default failed to authenticate: "), full
    assert p.request("GET", "/health")[2] == {
        "status": "degraded", "reasons": ["a login failed to authenticate"],
        "logins": {"serving": False}}
    p.stop()


def test_a_limited_key_is_not_told_the_other_logins(make_proxy, tmp_path):
    """X-Claude-Account and a key's login list: the refusal names the logins the key may use,
    never the proxy's others."""
    work, other = tmp_path / "work", tmp_path / "secret-login"
    work.mkdir()
    other.mkdir()
    retired = KEY + "-retired"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "c", "key": KEY, "logins": ["work"]},
                                         {"name": "r", "key": retired, "logins": ["gone"]}]}))
    os.chmod(keys, 0o600)
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_KEYS_FILE=keys,
                   CLAUDE_PROXY_STATE_DIR=tmp_path / "state",
                   CLAUDE_PROXY_ACCOUNTS="work=%s,hidden=%s" % (work, other))
    for key, pinned, allowed in ((KEY, "nobody", "work"), (KEY, "hidden", "work"),
                                 (retired, None, "gone")):
        headers = {"Authorization": "Bearer " + key}
        if pinned:
            headers["X-Claude-Account"] = pinned
        status, _, got = p.post(CHAT, json.loads(BODY), headers=headers)
        assert status == 403, got
        assert got["error"]["message"] == "This key may use the login(s) %s only." % allowed
    p.stop()


@pytest.mark.parametrize("keys,why", [("short-key-12", "shorter than 16 characters"),
                                      (PLACEHOLDER, "placeholder"),
                                      ("a-long-enough-key-0123,x", "key 2 is shorter")])
@pytest.mark.parametrize("check", [False, True])
def test_weak_keys_are_refused_at_start(home, upstream, keys, why, check):
    import subprocess
    import sys
    from conftest import FAKE_CLAUDE, PROXY, base_env, free_port
    env = base_env(home, upstream.url, str(FAKE_CLAUDE), CLAUDE_PROXY_API_KEYS=keys)
    args = ["--check"] if check else ["--port", str(free_port())]
    res = subprocess.run([sys.executable, str(PROXY), *args], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0
    assert why in res.stderr and "CLAUDE_PROXY_API_KEYS" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "listening" not in res.stderr
    for k in keys.split(","):
        assert k not in res.stderr + res.stdout


def test_example_placeholder_is_the_one_in_the_example_files():
    root = cop.pathlib.Path(cop.__file__).parent
    assert "CLAUDE_PROXY_API_KEYS=%s" % PLACEHOLDER in (root / "claude-proxy.env.example").read_text()
    assert cop.EXAMPLE_KEY == PLACEHOLDER


def test_access_log_escapes_control_characters(open_proxy):
    rid = "ctl-%d" % os.getpid()
    data = ("GET /v1/\x1b[2J\x1b[31mfake\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: %s\r\n"
            "Connection: close\r\n\r\n" % rid).encode("latin-1")
    status, _, _ = raw(open_proxy.port, data)
    assert status == 404
    deadline = time.monotonic() + 5
    while rid not in open_proxy.log and time.monotonic() < deadline:
        time.sleep(0.05)
    line = [l for l in open_proxy.log.splitlines() if rid in l][-1]
    assert "/v1/\\x1b[2J\\x1b[31mfake\\x07 404" in line, line
    assert "\x1b" not in open_proxy.log and "\x07" not in open_proxy.log


def test_a_500_is_logged_with_its_request_id(monkeypatch, capfd):
    """An unexpected exception in a route: a 500 in the caller's dialect, and the log line
    names the request id (so the client's report finds the traceback)."""
    import http.client
    import threading

    def boom(call):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cop, "ROUTES", cop.ROUTES + (cop.Route("GET", "/boom", boom),))
    cfg, _ = cop.load_config(["--port", "0", "--pool-size", "0", "--sessions", "0"],
                             environ={"CLAUDE_PROXY_STORE": "off", "CLAUDE_BIN": "/bin/false",
                                      "HOME": os.environ.get("HOME", "/tmp")})
    server = cop.ProxyServer(cfg)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/boom", headers={"X-Request-Id": "boom-req-1"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 500 and resp.getheader("X-Request-Id") == "boom-req-1"
        assert body["error"]["message"] == "Internal proxy error; see the proxy's log."
        assert "kaboom" not in json.dumps(body)
    finally:
        server.shutdown()
        server.server_close()
        server.app.close()
        thread.join(10)
    err = capfd.readouterr().err
    assert "request boom-req-1: internal error: RuntimeError: kaboom" in err, err
