"""The status page (section 12): GET / and /dashboard, its data endpoint GET /dashboard/data, the
request log behind it (RequestLog), the degraded /health rule, and the page in a real headless
Chromium against a proxy that served requests through the real CLI and the fake upstream.

The browser tests need Debian's `chromium` (`.ci/run` installs it); without it they are skipped
with the reason.  Their screenshot goes to tests/artifacts/ (git-ignored).
"""
import base64
import html.parser
import json
import os
import pathlib
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

import fake_upstream
from conftest import ROOT, wait_for

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import claude_openai_proxy as cop  # noqa: E402

ARTIFACTS = pathlib.Path(__file__).resolve().parent / "artifacts"
CHAT = "/v1/chat/completions"
KEY = "dash-key-5e1f09-77"
OAUTH = "made-up-oauth-token-77c2"
PROMPT_MARKER = "PROMPT-TEXT-NEVER-LOGGED-3b7d"
INJECTED = '<b id="injected">x</b>'        # a client naming itself in markup


def data(p, headers=None):
    status, hdrs, body = p.request("GET", "/dashboard/data", headers=headers, timeout=30)
    assert status == 200, body
    assert hdrs.get("Cache-Control") == "no-store"
    return body


def row_for(p, request_id, headers=None):
    """The ring's row for one request (it is written just after the response is sent)."""
    return wait_for(lambda: next((r for r in data(p, headers)["requests"]
                                  if r["id"] == request_id), None), "row %s" % request_id)


def chat(p, content, request_id, agent="dash-test/1.0", headers=None, **extra):
    body = {"model": "sonnet", "messages": [{"role": "user", "content": content}], **extra}
    return p.post(CHAT, body, headers={"X-Request-Id": request_id, "User-Agent": agent,
                                       **(headers or {})}, timeout=120)


class Tags(html.parser.HTMLParser):
    """Every start tag of a document as (name, attrs dict)."""

    def __init__(self, text):
        super().__init__()
        self.tags = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag):
        return [a for t, a in self.tags if t == tag]

    def by_id(self, id_):
        return next(a for t, a in self.tags if a.get("id") == id_)


# The page and its headers ########################################################################

@pytest.mark.parametrize("path", ["/", "/dashboard"])
def test_page_is_one_self_contained_document_under_a_strict_csp(fake_proxy, path):
    status, hdrs, page = fake_proxy.request("GET", path)
    assert status == 200
    assert hdrs["Content-Type"] == "text/html; charset=utf-8"
    csp = hdrs["Content-Security-Policy"]
    nonce = re.search(r"script-src 'nonce-([A-Za-z0-9+/=]+)'", csp).group(1)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["style-src"] == "'nonce-%s'" % nonce
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
    assert "unsafe" not in csp and "http" not in csp
    assert hdrs["X-Content-Type-Options"] == "nosniff" and hdrs["Cache-Control"] == "no-store"

    tags = Tags(page)
    scripts, styles = tags.find("script"), tags.find("style")
    assert len(scripts) == 1 and len(styles) == 1
    assert all(t["nonce"] == nonce for t in scripts + styles)
    assert not [a for _, a in tags.tags if "src" in a], "no script/img is loaded from anywhere"
    assert not [a for _, a in tags.tags if "style" in a], "inline style attributes would be blocked"
    assert [a["href"] for t, a in tags.tags if "href" in a] == ["data:,"]       # the favicon
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page), "no external URL"
    assert "eval(" not in page and "new Function" not in page and "innerHTML" not in page
    # live by polling a relative URL (works at a sub-path), never a reload
    assert 'fetch("dashboard/data"' in page and "location.reload" not in page
    assert re.search(r"setTimeout\(refresh, document\.hidden \? 15000 : 3000\)", page)
    # the shell carries no data: no version, config or request ids in it
    assert cop.__version__ not in page and "req_" not in page
    # the key goes to sessionStorage and an Authorization header, never a URL or a cookie
    assert "sessionStorage" in page and "Authorization" in page
    assert "document.cookie" not in page and "localStorage" not in page
    for needed in ('id="accounts"', 'id="capacity"', 'id="plots"', 'id="requests"', 'id="filter"',
                   'id="keyform"', 'id="page-errors"'):
        assert needed in page

    _, hdrs2, page2 = fake_proxy.request("GET", path)
    nonce2 = re.search(r"'nonce-([^']+)'", hdrs2["Content-Security-Policy"]).group(1)
    assert nonce2 != nonce and 'nonce="%s"' % nonce2 in page2, "a fresh nonce every response"


def test_page_routes_other_methods(fake_proxy):
    status, hdrs, body = fake_proxy.request("POST", "/dashboard", {"x": 1})
    assert status == 405 and hdrs["Allow"] == "GET", body
    status, _, body = fake_proxy.request("GET", "/dashboard/nope")
    assert status == 404 and "/dashboard/data" in body["error"]["message"]


# The data endpoint and the request log ###########################################################

def test_data_shape_and_a_row_per_request(fake_proxy):
    rid = "dash-row-%d" % time.time_ns()
    status, _, _ = chat(fake_proxy, "hello " + PROMPT_MARKER, rid, agent="row-agent/2.0 (x)\x7f")
    assert status == 200
    r = row_for(fake_proxy, rid)
    assert r["route"] == "/v1/chat/completions" and r["method"] == "POST"
    assert r["status"] == 200 and r["model"] == "sonnet" and r["account"] == "default"
    assert r["client"] == "row-agent/2.0 (x)?"               # printable, truncated (below)
    assert r["in"] == 3 and r["out"] == 2 and r["cache_read"] == 0 and r["cache_write"] == 0
    assert isinstance(r["ttft_ms"], float) and 0 < r["ttft_ms"] <= r["ms"]
    assert r["stream"] is False and r["served_by"] in ("spawned", "reused")
    assert set(r) == {"t", "id", "method", "route", "client", "model", "account", "status",
                      "stream", "ttft_ms", "ms", "in", "out", "cache_read", "cache_write",
                      "served_by", "retried", "key"}
    assert r["retried"] is False
    assert r["key"] == "operator"          # no keys: the loopback operator

    d = data(fake_proxy)
    assert set(d) == {"version", "now", "health", "cli", "config", "usage", "requests", "minutes",
                      "history", "keys", "usage_history"}
    assert d["version"] == cop.__version__ and abs(d["now"] - time.time()) < 60
    assert d["cli"]["found"] is True and d["cli"]["version"] == "2.1.330 (Claude Code; fake)"
    assert d["health"]["status"] in ("ok", "degraded") and "concurrency" in d["health"]
    assert [r["t"] for r in d["requests"]] == sorted((r["t"] for r in d["requests"]), reverse=True)
    minutes = d["minutes"]
    assert len(minutes) == 60 and [m["t"] for m in minutes] == sorted(m["t"] for m in minutes)
    assert minutes[-1]["t"] in (int(d["now"] // 60) * 60, int(d["now"] // 60) * 60 + 60)
    busy = [m for m in minutes[-2:] if m["requests"]]       # the request's minute
    assert busy and busy[-1]["tokens_in"] >= 3 and busy[-1]["cache_share"] == 0.0
    assert busy[-1]["ttft_p50"] is not None and busy[-1]["ttft_p95"] >= busy[-1]["ttft_p50"]
    acc = d["usage"]["accounts"][0]
    # tokens per model are the login's, from the CLI's modelUsage (tests/test_logins.py; the
    # fake CLI reports none); the guard is on by default
    assert acc["name"] == "default" and acc["healthy"] is True
    assert d["usage"]["guard"] == {"extra_usage": "deny"}
    assert d["usage"]["accounts"] == fake_proxy.request("GET", "/v1/usage")[2]["accounts"]

    long_agent = "A" * 500
    rid2 = rid + "-long"
    chat(fake_proxy, "hi", rid2, agent=long_agent)
    assert row_for(fake_proxy, rid2)["client"] == "A" * 120


def test_no_prompt_or_answer_text_in_the_ring(fake_proxy):
    rid = "dash-text-%d" % time.time_ns()
    status, _, body = chat(fake_proxy, "Please repeat " + PROMPT_MARKER, rid,
                           stop=["never-" + PROMPT_MARKER])
    assert status == 200, body
    answer = body["choices"][0]["message"]["content"]
    row_for(fake_proxy, rid)
    text = json.dumps(data(fake_proxy))
    assert PROMPT_MARKER not in text and answer not in text


def test_errors_are_rows_and_operational_routes_are_not(fake_proxy):
    rid = "dash-err-%d" % time.time_ns()
    status, _, _ = fake_proxy.post(CHAT, {"model": "sonnet"}, headers={"X-Request-Id": rid})
    assert status == 400
    r = row_for(fake_proxy, rid)
    assert r["status"] == 400 and r["in"] == 0 and r["ttft_ms"] is None
    for path in ("/health", "/metrics", "/", "/dashboard"):
        fake_proxy.request("GET", path, headers={"X-Request-Id": rid + "-op"})
    d = data(fake_proxy)
    assert not [x for x in d["requests"] if x["id"] == rid + "-op"]
    assert not [x for x in d["requests"] if x["route"] in cop.RequestLog.QUIET]


def test_ring_is_bounded_over_http(fake_proxy):
    first = "dash-bound-%d-" % time.time_ns()
    for i in range(210):                     # 404s: no CLI runs, still a row each
        fake_proxy.request("GET", "/no-such-route", headers={"X-Request-Id": first + str(i)})
    rows = wait_for(lambda: (lambda rs: rs if first + "209" in [r["id"] for r in rs[:3]] else None)(
        data(fake_proxy)["requests"]), "the last row")
    ids = [r["id"] for r in rows]
    assert len(ids) == 200 and len(set(ids)) == 200 and all(i.startswith(first) for i in ids)
    # the newest 200, newest first: a row is written once its answer has gone out, so two
    # requests in a row from one client may land swapped, never further apart
    got = [int(i[len(first):]) for i in ids]
    assert max(got) == 209 and min(got) >= 8
    assert all(abs(a - b) <= 2 for a, b in zip(got, range(209, 9, -1))), got


def test_request_log_bounds_and_percentiles():
    log = cop.RequestLog(size=200)
    t0 = 1_800_000_000.0
    for i in range(500):                     # two hours and more of traffic, one every 15 s
        log.add({"t": t0 + 15 * i, "id": str(i), "status": 500 if i % 10 == 0 else 200,
                 "account": "", "model": "m", "ttft_ms": float(i % 100)},
                cop.Usage(10, 5, 30, 0))
    assert len(log.ring) == 200 and [r["id"] for r in log.recent()][:2] == ["499", "498"]
    assert log.recent()[-1]["id"] == "300"
    assert len(log.minutes) <= cop.RequestLog.MINUTES
    rows = log.per_minute(now=t0 + 15 * 499)
    assert len(rows) == 60 and all(r["requests"] == 4 for r in rows[1:])
    assert sum(r["errors"] for r in rows) == 24      # i = 260, 270 ... 490: the last 60 minutes
    assert rows[-1]["cache_share"] == 0.75 and rows[-1]["tokens_in"] == 4 * 40
    # a quiet hour later: nothing kept but zeros
    later = log.per_minute(now=t0 + 15 * 499 + 3 * 3600)
    assert all(r["requests"] == 0 and r["ttft_p50"] is None and r["cache_share"] is None
               for r in later)
    assert cop.percentile([1, 2, 3, 4], 50) == 2 and cop.percentile([1, 2, 3, 4], 95) == 4
    assert cop.percentile([7], 95) == 7 and cop.percentile([], 50) is None
    # TTFT samples per minute are capped
    for i in range(cop.RequestLog.TTFT_SAMPLES + 50):
        log.add({"t": t0 + 10 ** 6, "id": "x", "status": 200, "account": "", "model": "m",
                 "ttft_ms": 1.0}, None)
    assert max(len(m["ttft"]) for m in log.minutes.values()) == cop.RequestLog.TTFT_SAMPLES


# Auth and masking ################################################################################

@pytest.fixture(scope="module")
def keyed(make_proxy):
    return make_proxy(fake=True, CLAUDE_PROXY_API_KEYS=KEY + ",other-key-2-f0a3b9c1", CLAUDE_PROXY_POOL_SIZE=0,
                      CLAUDE_CODE_OAUTH_TOKEN=OAUTH, CLAUDE_PROXY_CORS_ORIGINS="https://a.example")


def test_data_needs_a_key_the_shell_does_not(keyed):
    status, _, page = keyed.request("GET", "/dashboard")
    assert status == 200 and 'id="keyform"' in page and KEY not in page
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        status, _, body = keyed.request("GET", "/dashboard/data", headers=headers)
        assert status == 401, (headers, body)
        assert "requests" not in body
    status, _, _ = keyed.request("GET", "/dashboard/data?key=" + KEY)
    assert status == 401, "a key in the URL is not accepted"
    assert data(keyed, {"Authorization": "Bearer " + KEY})["version"] == cop.__version__
    assert data(keyed, {"x-api-key": "other-key-2-f0a3b9c1"})["version"] == cop.__version__


def test_secrets_are_masked_in_the_data(keyed):
    rid = "dash-mask-%d" % time.time_ns()
    chat(keyed, "hi", rid, headers={"Authorization": "Bearer " + KEY})
    row_for(keyed, rid, {"Authorization": "Bearer " + KEY})
    d = data(keyed, {"Authorization": "Bearer " + KEY})
    text = json.dumps(d)
    assert KEY not in text and "other-key-2-f0a3b9c1" not in text and OAUTH not in text
    config = {c["name"]: c["value"] for c in d["config"]}
    assert config["CLAUDE_PROXY_API_KEYS"] == "2 key(s), masked"
    assert config["CLAUDE_PROXY_CORS_ORIGINS"] == "https://a.example"
    assert set(config) == {env for _f, env, _n, _t, _h in cop.OPTIONS}


# /health: degraded #############################################################################

def test_health_degraded_when_the_cli_is_missing(make_proxy, tmp_path):
    p = make_proxy(fake=True, CLAUDE_BIN=str(tmp_path / "no-claude"), CLAUDE_PROXY_POOL_SIZE=0)
    status, _, h = p.request("GET", "/health")
    assert status == 200, "degraded stays 200: a restart would not fix it"
    assert h["status"] == "degraded" and h["claude_found"] is False
    assert len(h["reasons"]) == 1 and "CLAUDE_BIN=%s" % (tmp_path / "no-claude") in h["reasons"][0]
    raw = urllib.request.urlopen(p.url + "/health").read().decode()
    assert '"status": "degraded"' in raw and '"status": "ok"' not in raw    # the README's grep
    d = data(p)
    assert d["cli"]["found"] is False and d["cli"]["version"] is None


def test_health_degraded_while_the_login_is_refused(make_proxy, upstream):
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    assert p.request("GET", "/health")[2]["status"] == "ok"
    assert '"status": "ok"' in urllib.request.urlopen(p.url + "/health").read().decode()
    upstream.default = fake_upstream.error(401, "authentication_error", "invalid x-api-key")
    status, _, body = chat(p, "hi", "dash-auth-1")
    assert status == 502, body
    h = wait_for(lambda: (lambda h: h if h["status"] == "degraded" else None)(
        p.request("GET", "/health")[2]), "health to turn degraded")
    assert p.request("GET", "/health")[0] == 200
    assert len(h["reasons"]) == 1 and "claude login" in h["reasons"][0]
    acc = data(p)["usage"]["accounts"][0]
    assert acc["healthy"] is False and "claude login" in acc["hint"]
    assert "sk-ant-test-dummy-key" not in json.dumps(h)

    upstream.default = fake_upstream.text("Back in.")
    status, _, body = chat(p, "hi", "dash-auth-2")
    assert status == 200, body
    wait_for(lambda: p.request("GET", "/health")[2]["status"] == "ok", "health to recover")
    assert data(p)["usage"]["accounts"][0]["healthy"] is True


def test_health_degraded_when_the_pool_is_in_cold_fallback(make_proxy, tmp_path):
    script = tmp_path / "dying-claude"
    script.write_text("#!/bin/sh\necho 'dying-claude: cannot start' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    p = make_proxy(fake=True, CLAUDE_BIN=str(script), CLAUDE_PROXY_POOL_SIZE=1)
    h = wait_for(lambda: (lambda h: h if h["idle"]["mode"] == "cold-fallback" else None)(
        p.request("GET", "/health")[2]), "the pool to fall back", timeout=30)
    assert h["status"] == "degraded"
    assert [r for r in h["reasons"] if "cold fallback" in r]


# The page in a real browser ######################################################################

def chromium():
    for name in (os.environ.get("CHROMIUM") or "", "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def browse(url, tmp_path, *extra, budget=6000):
    """Load `url` in headless Chromium (loopback only, nothing on by default that calls home);
    returns (the DOM after `budget` ms of page time, the console messages it logged)."""
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium on PATH: run .ci/run (apt-get install chromium) to test the page "
                    "in a real browser")
    profile = tmp_path / ("profile-%d" % time.time_ns())
    profile.mkdir()
    argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
            "--user-data-dir=%s" % profile, "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=%d" % budget, *(extra or ["--dump-dom"]), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and ("--screenshot" in " ".join(extra) or "<body" in out.stdout), \
        "chromium failed (exit %s): %s" % (out.returncode, out.stderr[-3000:])
    console = [l for l in out.stderr.splitlines() if ":CONSOLE" in l]
    return out.stdout, console


@pytest.fixture(scope="module")
def served(make_proxy, upstream_server):
    """A proxy on the real CLI with a (made-up) subscription login, so the CLI reports the plan
    windows the fake upstream sends, after a few requests in both dialects and two errors."""
    now = int(time.time())
    limits = {"anthropic-ratelimit-unified-status": "allowed",
              "anthropic-ratelimit-unified-reset": str(now + 3 * 3600),
              "anthropic-ratelimit-unified-5h-utilization": "0.42",
              "anthropic-ratelimit-unified-5h-status": "allowed",
              "anthropic-ratelimit-unified-5h-reset": str(now + 3 * 3600),
              "anthropic-ratelimit-unified-7d-utilization": "0.86",
              "anthropic-ratelimit-unified-7d-status": "allowed_warning",
              "anthropic-ratelimit-unified-7d-reset": str(now + 4 * 86400),
              "anthropic-ratelimit-unified-representative-claim": "seven_day",
              "anthropic-ratelimit-unified-overage-status": "rejected"}
    upstream = upstream_server
    upstream.reset()
    upstream.default = fake_upstream.text("Hello from the fake upstream.", headers=limits,
                                          usage={"input_tokens": 12, "output_tokens": 9,
                                                 "cache_read_input_tokens": 300,
                                                 "cache_creation_input_tokens": 40})
    p = make_proxy(CLAUDE_CODE_OAUTH_TOKEN=OAUTH, CLAUDE_PROXY_PASS_ENV="ANTHROPIC_BASE_URL",
                   CLAUDE_PROXY_POOL_SIZE=1)
    for i in range(3):
        status, _, body = chat(p, "question %d" % i, "dash-ok-%d" % i,
                               agent="openai-python/3.54.0" if i % 2 else "litellm/1.80")
        assert status == 200, body
    status, _, body = p.post("/v1/messages", {
        "model": "claude-sonnet-4-6", "max_tokens": 64, "stream": True,
        "messages": [{"role": "user", "content": "stream please"}]},
        headers={"anthropic-version": "2023-06-01", "X-Request-Id": "dash-stream",
                 "User-Agent": "Anthropic/Python 2.12.0"}, timeout=120)
    assert status == 200, body
    assert p.post(CHAT, {"model": "sonnet"}, headers={"X-Request-Id": "dash-bad",
                                                      "User-Agent": INJECTED})[0] == 400
    assert p.request("GET", "/v1/nothing-here")[0] == 404
    acc = wait_for(lambda: (lambda d: d["usage"]["accounts"][0]
                            if len(d["requests"]) >= 6 else None)(data(p)), "six rows")
    assert set(acc["windows"]) == {"five_hour", "seven_day"}, acc
    upstream.reset()
    return p


def test_plan_windows_come_from_the_cli_rate_limit_event(served):
    acc = data(served)["usage"]["accounts"][0]
    assert acc["windows"]["five_hour"]["utilization"] == 0.42
    assert acc["windows"]["seven_day"] == {"utilization": 0.86, "status": "allowed_warning",
                                           "resets_at": acc["windows"]["seven_day"]["resets_at"]}
    assert acc["windows"]["seven_day"]["resets_at"] > time.time() + 3 * 86400
    assert acc["extra_usage"] == {"status": "rejected", "in_use": False}
    assert acc["healthy"] is True and acc["updated_at"] is not None
    assert sum(t["cache_read"] for t in acc["tokens"].values()) >= 300     # per CLI model id


def test_page_renders_in_chromium(served, tmp_path):
    dom, console = browse(served.url + "/dashboard", tmp_path)
    tags = Tags(dom)
    body = tags.find("body")[0]
    assert body["data-state"] == "ready", dom[-2000:]
    assert body["data-errors"] == "0", dom
    assert not console, "console messages (errors, CSP refusals): %s" % console
    assert "hidden" in tags.by_id("page-errors")
    # plan windows with bars, status and a countdown
    windows = {a["data-window"] for a in tags.find("div") if "data-window" in a}
    assert windows == {"five_hour", "seven_day"}, windows
    assert "5-hour \u00b7 42% \u00b7 allowed" in dom and "7-day \u00b7 86% \u00b7 allowed_warning" in dom
    assert re.search(r"resets in (2h 5\dm|3h 0m)", dom), "the 5-hour countdown"
    assert "extra usage" in dom and "rejected" in dom and "extra usage denied" in dom
    # the request table: one row per request, the errors marked
    rows = [a for t, a in tags.tags if t == "tr" and "data-status" in a]
    statuses = sorted(a["data-status"] for a in rows)
    assert statuses == ["200", "200", "200", "200", "400", "404"], statuses
    assert all("err" in a.get("class", "") for a in rows if a["data-status"] >= "400")
    assert not [a for a in rows if a["data-status"] == "200" and "err" in a.get("class", "")]
    for text in ("dash-ok-0", "dash-stream", "litellm/1.80", "Anthropic/Python 2.12.0",
                 "POST /v1/messages", "6 of 6"):
        assert text in dom, text
    # three plots of the usage history by day, four of the last hour, each an inline SVG with
    # something drawn
    plots = re.findall(r'<div class="card plot" data-plot="(\w+)">(.*?)</svg>', dom, re.S)
    assert [name for name, _ in plots] == ["days", "daytokens", "dayvalue", "requests", "ttft",
                                           "tokens", "cache"]
    for name, svg in plots:
        assert re.search(r"<(rect|path|circle) ", svg), name
    assert "CLI and logins" in dom and "logged in" in dom
    assert "slots: 0 of 2 running, 0 queued" in dom
    # the idle store by kind: waiting now and requests served (the fixture's pool of one)
    idle_rows = {a["data-kind"] for a in tags.find("tr") if "data-kind" in a}
    assert idle_rows == {"kept", "reused", "initialized", "pool", "spawned"}, idle_rows
    assert "idle CLI processes" in dom and "requests served" in dom and "<dt>budget</dt>" in dom
    assert not [a for _, a in tags.tags if a.get("id") == "injected"], "a User-Agent became markup"
    assert "&lt;b id=\"injected\"&gt;x&lt;/b&gt;" in dom
    assert "key(s), masked" not in dom and "API_KEYS" in dom    # the config card, no keys

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    if shot.exists():
        shot.unlink()
    browse(served.url + "/dashboard", tmp_path, "--hide-scrollbars", "--window-size=1280,1400",
           "--screenshot=%s" % shot)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_at_a_sub_path_asks_the_sub_path(served, tmp_path):
    """Behind a reverse proxy at /claude/ the page's data request goes to /claude/dashboard/data:
    a tiny path-stripping proxy in front shows what the browser asked for."""
    import http.server
    import threading
    seen = []

    class Strip(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append(self.path)
            if not self.path.startswith("/claude/"):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with urllib.request.urlopen(served.url + self.path[len("/claude"):]) as r:
                payload, headers = r.read(), r.headers
            self.send_response(200)
            for k in ("Content-Type", "Content-Security-Policy"):
                if headers.get(k):
                    self.send_header(k, headers[k])
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Strip)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        dom, console = browse("http://127.0.0.1:%d/claude/" % front.server_address[1], tmp_path,
                              budget=4000)
    finally:
        front.shutdown()
        front.server_close()
    assert Tags(dom).find("body")[0]["data-state"] == "ready", dom[-1500:]
    assert not [s for s in seen if not s.startswith("/claude/")], seen
    # live: the data is asked for again and again, the page itself once (no reload)
    assert seen.count("/claude/") == 1 and seen.count("/claude/dashboard/data") >= 2, seen
    assert not console, console


def test_page_with_keys_shows_the_key_form_and_no_data(keyed, tmp_path):
    dom, console = browse(keyed.url + "/", tmp_path, budget=3000)
    tags = Tags(dom)
    assert tags.find("body")[0]["data-state"] == "locked", dom[-1500:]
    assert "hidden" not in tags.find("form")[0]
    assert "hidden" in tags.by_id("main")
    assert "This proxy needs one of its API keys." in dom
    assert "CLAUDE_PROXY_HOST" not in dom and 'data-status' not in dom
    # the refused data request is the only console line (Chromium reports every 401)
    assert all("401" in line for line in console), console


class DevTools:
    """Just enough of the Chrome DevTools protocol over a WebSocket (standard library only) to
    drive one page: evaluate script, and keep the events it sends (console, network)."""

    def __init__(self, tmp_path):
        exe = chromium()
        if exe is None:
            pytest.skip("no chromium on PATH: run .ci/run (apt-get install chromium) to test the "
                        "page in a real browser")
        profile = tmp_path / "devtools-profile"
        profile.mkdir()
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--disable-default-apps", "--disable-extensions", "--user-data-dir=%s" % profile,
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and len(port_file.read_text().split()) >= 2,
                 "chromium's DevTools port", timeout=30)
        port = int(port_file.read_text().split()[0])
        pages = json.load(urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port))
        ws = next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n"
                           % (ws.split(str(port), 1)[1], port, key)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id, self.events = 0, []

    def _recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def _recv_message(self):
        parts = []
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            parts.append(self._recv_exact(n))
            if b0 & 0x80:
                return json.loads(b"".join(parts))

    def call(self, method, **params):
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                  bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                  bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            msg = self._recv_message()
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]
            self.events.append(msg)

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def until(self, expression, what, timeout=20):
        return wait_for(lambda: self.js(expression), what, timeout=timeout)

    def close(self):
        self.sock.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_key_form_in_chromium_keeps_the_key_in_session_storage_and_sends_a_header(keyed, tmp_path):
    auth = {"Authorization": "Bearer " + KEY}
    assert chat(keyed, "hi", "dash-filter-ok", headers=auth)[0] == 200
    assert keyed.request("GET", "/v1/dash-filter-missing", headers=auth)[0] == 404
    row_for(keyed, "dash-filter-ok", auth)
    browser = DevTools(tmp_path)
    try:
        for domain in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
            browser.call(domain)
        browser.call("Page.navigate", url=keyed.url + "/dashboard")
        browser.until("document.body && document.body.dataset.state === 'locked'", "the key form")
        submit = ("document.getElementById('key').value = %s; "
                  "document.getElementById('keyform').requestSubmit(); true")
        browser.js(submit % json.dumps("wrong-key"))
        browser.until("document.getElementById('keymsg').textContent === 'That key was refused.'",
                      "the refusal")
        browser.js(submit % json.dumps(KEY))
        browser.until("document.body.dataset.state === 'ready'", "the dashboard")
        assert browser.js("sessionStorage.getItem('claude-proxy-key')") == KEY
        assert browser.js("document.cookie") == "" and browser.js("localStorage.length") == 0
        assert browser.js("document.getElementById('key').value") == ""
        assert browser.js("document.getElementById('health').textContent") in ("ok", "degraded")
        assert browser.js("document.getElementById('config').textContent").count("API_KEYS") == 1
        browser.until("document.getElementById('updated').textContent.startsWith('updated')",
                      "a poll")
        # the status filter
        rows = ("Array.from(document.querySelectorAll('#requests tbody tr'))"
                ".map(function (r) { return [r.dataset.status, r.className]; })")
        everything = browser.js(rows)
        assert ["200", ""] in everything and ["404", "err"] in everything, everything
        for choice, keep in (("errors", lambda st: int(st) >= 400), ("ok", lambda st: int(st) < 400),
                             ("4xx", lambda st: 400 <= int(st) < 500), ("all", lambda st: True)):
            browser.js("var f = document.getElementById('filter'); f.value = %s; "
                       "f.dispatchEvent(new Event('change')); true" % json.dumps(choice))
            shown = browser.js(rows)
            assert shown == [r for r in everything if keep(r[0])], (choice, shown)
            assert all((cls == "err") == (int(st) >= 400) for st, cls in shown)
        # forgetting the key locks the page again
        browser.js("document.getElementById('forget').click(); true")
        browser.until("document.body.dataset.state === 'locked'", "the page to lock again")
        assert browser.js("sessionStorage.getItem('claude-proxy-key')") is None
        assert browser.js("document.body.dataset.errors") == "0"
    finally:
        browser.close()
    sent = [e["params"]["request"] for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"]
    data_requests = [r for r in sent if "/dashboard/data" in r["url"]]
    assert len(data_requests) >= 3
    for r in data_requests:
        assert r["url"] == keyed.url + "/dashboard/data", "the key is never in a URL"
        assert "Cookie" not in r["headers"]
    auths = [r["headers"].get("Authorization") for r in data_requests]
    assert None in auths and "Bearer wrong-key" in auths and "Bearer " + KEY in auths
    thrown = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown",
                                                               "Runtime.consoleAPICalled")]
    assert not thrown, thrown
    logged = [e["params"]["entry"] for e in browser.events if e.get("method") == "Log.entryAdded"]
    assert all(entry["source"] == "network" and "401" in entry["text"] for entry in logged), logged
