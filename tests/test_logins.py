"""Section 7, logins: plan limits per login (GET /v1/usage, /health, /metrics, the log), limit
errors a client can act on, the extra-usage guard, several logins.

The real CLI runs with made-up subscription logins (CLAUDE_CODE_OAUTH_TOKEN, a token file, or
a CLAUDE_CONFIG_DIR holding a made-up .credentials.json) against the fake upstream, whose
`plans` play one subscription per token with its own anthropic-ratelimit-unified-* headers.
"""
import json
import os
import re
import secrets
import shutil
import socket
import time

import pytest

import fake_upstream
from conftest import HAPROXY_HEAD, NGINX_HEAD, Proxy, base_env, need_tool, real_claude_bin
from fake_upstream import Plan

CHAT = "/v1/chat/completions"


def new_token():
    return "sk-ant-oat01-madeup-" + secrets.token_hex(12)


@pytest.fixture
def sub_proxy(make_proxy):
    """Factory: sub_proxy(token=None, args=(), **env) -> a proxy on the real CLI whose login is
    a subscription (no API key anywhere)."""
    return lambda token=None, args=(), **env: make_proxy(args=args, token=token, subscription=True,
                                                         **env)


def chat(proxy, text="hi", headers=None, model="sonnet", timeout=120):
    return proxy.post(CHAT, {"model": model, "messages": [{"role": "user", "content": text}]},
                      headers=headers, timeout=timeout)


def messages(proxy, text="hi", headers=None, timeout=120):
    return proxy.post("/v1/messages", {"model": "sonnet", "max_tokens": 50,
                                       "messages": [{"role": "user", "content": text}]},
                      headers=headers, timeout=timeout)


def lower(headers):
    return {k.lower(): v for k, v in headers.items()}


def tokens_used(upstream):
    """The bearer token of every model call, in order."""
    with upstream.lock:
        return [r["headers"].get("Authorization", "")[7:] for r in upstream.requests
                if r["method"] == "POST" and r["path"].startswith("/v1/messages")
                and "count_tokens" not in r["path"]]


def no_secret_in(proxy, *tokens):
    """No token in the log, /health, /v1/usage or /metrics."""
    texts = [proxy.log] + [json.dumps(proxy.request("GET", p)[2])
                           for p in ("/health", "/v1/usage", "/metrics")]
    for t in tokens:
        for text in texts:
            assert t not in text
            assert t[12:] not in text      # nor its unprefixed part


# -- 1. plan limits, live -----------------------------------------------------------------------

def test_windows_tokens_and_warning_are_reported(sub_proxy, upstream):
    """A subscription's windows as the CLI reports them reach /v1/usage, /health and /metrics;
    tokens per model are counted; a window past a warning step is logged once."""
    token, reset5, reset7 = new_token(), int(time.time()) + 3000, int(time.time()) + 200000
    upstream.plans[token] = Plan(five_hour=0.83, seven_day=0.41, five_hour_reset=reset5,
                                 seven_day_reset=reset7)
    p = sub_proxy(token)
    for _ in range(2):
        status, hdrs, got = chat(p)
        assert status == 200, got
        assert got["choices"][0]["message"]["content"] == "Hello from the fake upstream."
        assert lower(hdrs)["x-claude-account"] == "default"
    assert tokens_used(upstream) == [token, token]

    status, _, usage = p.request("GET", "/v1/usage")
    assert status == 200
    assert usage["guard"] == {"extra_usage": "deny"}
    [acct] = usage["accounts"]
    assert acct["name"] == "default" and acct["healthy"] is True and acct["hint"] is None
    assert acct["windows"]["five_hour"] == {"utilization": 0.83, "status": "allowed_warning",
                                            "resets_at": reset5}
    assert acct["windows"]["seven_day"] == {"utilization": 0.41, "status": "allowed",
                                            "resets_at": reset7}
    assert acct["extra_usage"] == {"status": "rejected", "in_use": False}
    assert abs(acct["updated_at"] - time.time()) < 120
    [(model, counts)] = acct["tokens"].items()
    assert model.startswith("claude-sonnet")
    assert counts == {"input": 22, "output": 14, "cache_read": 0, "cache_write": 0}

    health = p.request("GET", "/health")[2]["logins"]
    assert health["guard"] == {"extra_usage": "deny"}
    [h] = health["accounts"]
    assert h["name"] == "default" and h["healthy"] and not h["limited"]
    assert h["binding"] == {"window": "five_hour", "utilization": 0.83,
                            "status": "allowed_warning", "resets_at": reset5}

    metrics = p.request("GET", "/metrics")[2]
    assert 'claude_proxy_plan_window_utilization{account="default",window="five_hour"} 0.83' in metrics
    assert 'claude_proxy_plan_window_resets_at{account="default",window="seven_day"} %d' % reset7 in metrics
    assert 'claude_proxy_plan_window_rejected{account="default",window="five_hour"} 0' in metrics
    assert 'claude_proxy_login_healthy{account="default"} 1' in metrics
    assert 'claude_proxy_login_tokens_total{account="default",model="%s",kind="output"} 14' % model \
        in metrics

    warned = [l for l in p.log.splitlines() if "plan window" in l]
    assert len(warned) == 1, warned            # two reports at 83 %: one line
    assert "login default: plan window five_hour at 83% (allowed_warning)" in warned[0]
    no_secret_in(p, token)


def test_each_warning_step_is_logged_as_it_is_crossed(sub_proxy, upstream):
    token = new_token()
    upstream.plans[token] = Plan(five_hour=0.7, seven_day=0.1, step=0.1)
    p = sub_proxy(token)
    for _ in range(3):                 # reports 0.7, 0.8, 0.9
        assert chat(p)[0] == 200
    warned = [l for l in p.log.splitlines() if "plan window five_hour" in l]
    assert [re.search(r"at (\d+)%", l).group(1) for l in warned] == ["70", "80", "90"]
    assert p.request("GET", "/v1/usage")[2]["accounts"][0]["windows"]["five_hour"]["status"] \
        == "allowed_warning"


# -- 2. limit errors a client can act on ----------------------------------------------------------

def ask(proxy, dialect, text="hi", stream=False, headers=None):
    path, body = {"openai": (CHAT, {}), "anthropic": ("/v1/messages", {"max_tokens": 50}),
                  "responses": ("/v1/responses", {})}[dialect]
    body.update(model="sonnet", stream=stream)
    if dialect == "responses":
        body["input"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    return proxy.post(path, body, headers=headers, timeout=120)


def error_of(dialect, body):
    return body["error"]


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "responses"])
@pytest.mark.parametrize("window", ["five_hour", "seven_day"])
def test_rejected_window_is_429_naming_it_with_retry_after_its_reset(sub_proxy, upstream,
                                                                     dialect, window):
    token, now = new_token(), int(time.time())
    plan = Plan(five_hour=1.0 if window == "five_hour" else 0.3, five_hour_reset=now + 1800,
                seven_day=1.0 if window == "seven_day" else 0.3, seven_day_reset=now + 90000)
    upstream.plans[token] = plan
    p = sub_proxy(token, CLAUDE_PROXY_POOL_SIZE=0)
    status, hdrs, got = ask(p, dialect)
    assert status == 429, got
    err, h = error_of(dialect, got), lower(hdrs)
    reset = now + (1800 if window == "five_hour" else 90000)
    assert reset - time.time() - 5 <= int(h["retry-after"]) <= reset - now + 1
    assert h["anthropic-ratelimit-unified-reset"] == str(reset)
    assert h["anthropic-ratelimit-unified-type"] == window
    assert h["x-claude-account"] == "default"
    assert "the %s window" % window in err["message"]
    # the CLI's own words for it, pinned (2.1.330)
    # (it says "your weekly limit" only when the plan's extra usage is switched off)
    assert "You've hit your limit · resets" in err["message"]
    assert time.strftime("%Y-%m-%d %H:%M", time.gmtime(reset)) in err["message"]
    if dialect == "anthropic":
        assert err["type"] == "rate_limit_error"
    else:
        assert err["code"] == "rate_limit_exceeded"
    assert p.request("GET", "/v1/usage")[2]["accounts"][0]["windows"][window]["status"] == "rejected"
    assert len(tokens_used(upstream)) == 1       # CLAUDE_PROXY_CLI_RETRIES=1: >60 s is not retried


def test_rejected_window_in_a_stream_is_still_a_429(sub_proxy, upstream):
    token = new_token()
    upstream.plans[token] = Plan(five_hour=1.0)
    p = sub_proxy(token, CLAUDE_PROXY_POOL_SIZE=0)
    for dialect in ("openai", "anthropic"):
        status, hdrs, got = ask(p, dialect, stream=True)
        assert status == 429, got
        assert "five_hour" in got["error"]["message"] and int(lower(hdrs)["retry-after"]) > 3000


def test_extra_usage_refusal_is_429_insufficient_quota(sub_proxy, upstream):
    """Past the plan's limits with no usage credits, the API refuses with credits_required;
    the CLI says "You've hit your usage limit"."""
    token = new_token()
    upstream.plans[token] = Plan(five_hour=1.0, overage="allowed", credits_required=True)
    p = sub_proxy(token, CLAUDE_PROXY_POOL_SIZE=0)
    status, hdrs, got = ask(p, "openai")
    assert status == 429, got
    assert got["error"]["code"] == "insufficient_quota"
    assert "refused extra usage" in got["error"]["message"]
    assert "You've hit your usage limit · resets" in got["error"]["message"]
    assert int(lower(hdrs)["retry-after"]) > 3000
    status, _, got = ask(p, "anthropic")
    assert status == 429 and got["error"]["type"] == "rate_limit_error", got
    assert "refused extra usage" in got["error"]["message"]


def test_a_model_the_plan_lacks_is_404_model_not_found(sub_proxy, upstream):
    token = new_token()
    upstream.plans[token] = Plan()
    upstream.default = fake_upstream.error(404, "not_found_error", "model: claude-opus-4-8")
    p = sub_proxy(token, CLAUDE_PROXY_POOL_SIZE=0)
    status, _, got = p.post(CHAT, {"model": "claude-opus-4-8",
                                   "messages": [{"role": "user", "content": "hi"}]}, timeout=120)
    assert status == 404, got
    assert got["error"]["code"] == "model_not_found"
    msg = got["error"]["message"]
    assert "not available to login 'default'" in msg and "plan may not include it" in msg
    assert "There's an issue with the selected model (claude-opus-4-8)" in msg
    status, _, got = p.post("/v1/messages", {"model": "claude-opus-4-8", "max_tokens": 9,
                                             "messages": [{"role": "user", "content": "hi"}]},
                            timeout=120)
    assert status == 404 and got["error"]["type"] == "not_found_error", got


# -- 3. the extra-usage guard ---------------------------------------------------------------------

def test_guard_refuses_once_a_response_was_billed_as_extra_usage_until_the_reset(sub_proxy,
                                                                                upstream):
    """Default deny: the first answer past a used-up window comes back billed as extra usage
    (the CLI reports isUsingOverage); from then on the proxy answers 429 without sending
    anything, until the window's reset; then requests go through again."""
    token = new_token()
    plan = Plan(five_hour=1.0, overage="allowed")
    upstream.plans[token] = plan
    p = sub_proxy(token)
    # the window resets 10 s after the first answer is asked for (once the proxy is up): time
    # for that answer and the refusals below, then the test waits for the reset
    reset = plan.five_hour_reset = int(time.time()) + 10
    assert chat(p)[0] == 200                  # already billed when the proxy learns it
    acct = p.request("GET", "/v1/usage")[2]["accounts"][0]
    assert acct["extra_usage"] == {"status": "allowed", "in_use": True}
    assert "billed as extra usage; refusing more until the reset" in p.log

    for dialect in ("openai", "anthropic", "responses"):
        status, hdrs, got = ask(p, dialect)
        assert status == 429, got
        assert "would be billed as extra usage" in got["error"]["message"]
        assert "CLAUDE_PROXY_EXTRA_USAGE=deny" in got["error"]["message"]
        assert 1 <= int(lower(hdrs)["retry-after"]) <= 11
    assert len(tokens_used(upstream)) == 1, "the guard sent nothing"
    assert p.request("GET", "/health")[2]["logins"]["accounts"][0]["limited"] is True
    assert 'claude_proxy_extra_usage_in_use{account="default"} 1' in p.request("GET", "/metrics")[2]

    while time.time() < reset + 1:             # the window resets
        time.sleep(0.2)
    plan.five_hour, plan.five_hour_reset = 0.05, int(time.time()) + 18000
    status, _, got = chat(p)
    assert status == 200, got
    assert len(tokens_used(upstream)) == 2
    assert p.request("GET", "/v1/usage")[2]["accounts"][0]["extra_usage"]["in_use"] is False


def test_guard_allow_lets_extra_usage_through(sub_proxy, upstream):
    token = new_token()
    upstream.plans[token] = Plan(five_hour=1.0, overage="allowed")
    p = sub_proxy(token, CLAUDE_PROXY_EXTRA_USAGE="allow")
    for _ in range(2):
        assert chat(p)[0] == 200
    assert len(tokens_used(upstream)) == 2
    usage = p.request("GET", "/v1/usage")[2]
    assert usage["guard"] == {"extra_usage": "allow"}
    assert usage["accounts"][0]["extra_usage"]["in_use"] is True
    assert "billed as extra usage" in p.log and "refusing" not in p.log


def test_guard_setting_is_checked_at_start_up(home, upstream_server):
    import subprocess, sys
    from conftest import PROXY
    env = base_env(home, upstream_server.url, real_claude_bin(), CLAUDE_PROXY_EXTRA_USAGE="maybe")
    out = subprocess.run([sys.executable, str(PROXY), "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "CLAUDE_PROXY_EXTRA_USAGE must be deny or allow" in out.stderr


# -- 4. several logins ----------------------------------------------------------------------------

@pytest.fixture
def two_logins(sub_proxy, upstream, tmp_path):
    """make(**env) -> (proxy, token of login "a" (a token file), token of "b" (a config dir
    holding a made-up .credentials.json)); no login in the proxy's own environment."""
    ta, tb = new_token(), new_token()
    (tmp_path / "a.token").write_text(ta + "\n")
    (tmp_path / "a.token").chmod(0o600)
    cdir = tmp_path / "b-config"
    cdir.mkdir()
    (cdir / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {
        "accessToken": tb, "refreshToken": "rt-" + tb, "expiresAt": int(time.time() + 86400 * 30) * 1000,
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}))
    upstream.plans[ta], upstream.plans[tb] = Plan(), Plan()

    def make(**extra):
        p = sub_proxy(CLAUDE_PROXY_ACCOUNTS="a=token-file:%s,b=%s" % (tmp_path / "a.token", cdir),
                      **extra)
        p.token_file = tmp_path / "a.token"
        return p, ta, tb
    return make


def test_new_conversations_go_to_the_most_headroom_and_stay_there(two_logins, upstream):
    p, ta, tb = two_logins()
    upstream.plans[ta].five_hour = 0.9
    upstream.plans[tb].five_hour = 0.2
    seen = []
    for text in ("one", "two", "three"):                   # three new conversations
        status, hdrs, got = chat(p, text)
        assert status == 200, got
        seen.append(lower(hdrs)["x-claude-account"])
    # nothing known at first: the first login; then b has more headroom (unknown, then 80 %)
    assert seen == ["a", "b", "b"]
    assert tokens_used(upstream) == [ta, tb, tb]
    # conversation "one" goes on on a, although b has more headroom
    status, hdrs, got = p.post(CHAT, {"model": "sonnet", "messages": [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Hello from the fake upstream."},
        {"role": "user", "content": "and on"}]}, timeout=120)
    assert status == 200, got
    assert lower(hdrs)["x-claude-account"] == "a" and tokens_used(upstream)[-1] == ta
    usage = {a["name"]: a for a in p.request("GET", "/v1/usage")[2]["accounts"]}
    assert usage["a"]["windows"]["five_hour"]["utilization"] == 0.9
    assert usage["b"]["windows"]["five_hour"]["utilization"] == 0.2
    assert sum(t["output"] for t in usage["b"]["tokens"].values()) == 14
    no_secret_in(p, ta, tb)


def test_a_limited_login_fails_over_before_the_first_byte(two_logins, upstream):
    p, ta, tb = two_logins(CLAUDE_PROXY_POOL_SIZE=0)
    upstream.plans[ta].five_hour = 1.0                    # a: refused, no extra usage
    for dialect, stream in (("openai", False), ("anthropic", True)):
        before = len(tokens_used(upstream))
        status, hdrs, got = ask(p, dialect, "fail me over %s" % dialect, stream=stream)
        assert status == 200, got
        assert lower(hdrs)["x-claude-account"] == "b"
        used = tokens_used(upstream)[before:]
        # the first time a is asked and refuses; once known limited it is not asked first
        assert used == ([ta, tb] if dialect == "openai" else [tb]), used
    assert "login a refused a request (429 rate_limit_exceeded); asking login b" in p.log
    # both limited: the 429 of the one that resets first
    upstream.plans[tb].five_hour = 1.0
    status, hdrs, got = chat(p, "nobody can")
    assert status == 429 and "hit its plan limit" in got["error"]["message"], got
    no_secret_in(p, ta, tb)


def test_pinning_a_login_and_unknown_names(two_logins, upstream):
    p, ta, tb = two_logins()
    for _ in range(2):
        status, hdrs, got = chat(p, headers={"X-Claude-Account": "b"})
        assert status == 200 and lower(hdrs)["x-claude-account"] == "b", got
    assert tokens_used(upstream) == [tb, tb]
    for dialect in ("openai", "anthropic", "responses"):
        status, _, got = ask(p, dialect, headers={"X-Claude-Account": "nobody"})
        assert status == 400, got
        assert "Unknown X-Claude-Account 'nobody'" in got["error"]["message"]
        assert "a, b" in got["error"]["message"]
    assert len(tokens_used(upstream)) == 2
    # pinned to a limited login: its 429, no failover
    upstream.plans[tb].five_hour = 1.0
    status, hdrs, got = chat(p, "pinned", headers={"X-Claude-Account": "b"})
    assert status == 429 and lower(hdrs)["x-claude-account"] == "b", got
    assert tokens_used(upstream)[-1] == tb and ta not in tokens_used(upstream)


def test_a_login_that_fails_to_authenticate_is_unhealthy_and_the_other_serves(two_logins, upstream):
    p, ta, tb = two_logins(CLAUDE_PROXY_POOL_SIZE=0)
    upstream.plans[ta].revoked = True
    status, hdrs, got = chat(p, "first")
    assert status == 200 and lower(hdrs)["x-claude-account"] == "b", got
    used = tokens_used(upstream)
    assert used[-1] == tb and set(used[:-1]) == {ta}, used     # (the CLI retries a 401 once)
    status, hdrs, got = chat(p, "second")
    assert status == 200 and lower(hdrs)["x-claude-account"] == "b", got
    assert tokens_used(upstream)[len(used):] == [tb], "an unhealthy login is not asked first"
    usage = {a["name"]: a for a in p.request("GET", "/v1/usage")[2]["accounts"]}
    assert usage["a"]["healthy"] is False and usage["b"]["healthy"] is True
    assert usage["a"]["hint"] == "write a new `claude setup-token` token to %s" % p.token_file
    health = {a["name"]: a for a in p.request("GET", "/health")[2]["logins"]["accounts"]}
    assert health["a"]["healthy"] is False and health["a"]["hint"] == usage["a"]["hint"]
    assert 'claude_proxy_login_healthy{account="a"} 0' in p.request("GET", "/metrics")[2]
    [line] = [l for l in p.log.splitlines() if "login a failed to authenticate" in l]
    assert "other logins serve until it is logged in again" in line and "upstream 401" in line
    # pinned to it: the login problem, the CLI's words (2.1.330) and the hint, not a 401
    status, _, got = chat(p, "pinned", headers={"X-Claude-Account": "a"})
    assert status == 502, got
    msg = got["error"]["message"]
    assert "could not authenticate with login 'a'" in msg and "claude setup-token" in msg
    assert "Failed to authenticate. API Error: 401 OAuth token has been revoked" in msg
    no_secret_in(p, ta, tb)
    assert ta not in json.dumps(got) and tb not in json.dumps(got)
    # logged in again (a new token in its file, read at each CLI start): healthy again
    renewed = new_token()
    p.token_file.write_text(renewed)
    upstream.plans[renewed] = Plan()
    status, hdrs, got = chat(p, "renewed", headers={"X-Claude-Account": "a"})
    assert status == 200 and lower(hdrs)["x-claude-account"] == "a", got
    assert tokens_used(upstream)[-1] == renewed
    usage = {a["name"]: a for a in p.request("GET", "/v1/usage")[2]["accounts"]}
    assert usage["a"]["healthy"] is True and usage["a"]["hint"] is None
    no_secret_in(p, renewed)


def test_accounts_setting_is_checked_and_never_echoed(home, upstream_server, tmp_path):
    import subprocess, sys
    from conftest import PROXY
    token = new_token()
    for value, says in ((token, "A token never goes into the configuration"),
                        ("x=" + token, "A token never goes into the configuration"),
                        ("x=token-file:/nonexistent/t", "no token file at /nonexistent/t"),
                        ("x=%s,x=%s" % (tmp_path, tmp_path), "names 'x' twice")):
        env = base_env(home, upstream_server.url, real_claude_bin(), CLAUDE_PROXY_ACCOUNTS=value)
        out = subprocess.run([sys.executable, str(PROXY), "--port", "0"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and says in out.stderr, out.stderr
        assert token not in out.stderr and token[12:] not in out.stderr


def test_no_failover_once_the_answer_began_and_each_login_gets_its_own_environment(
        make_proxy, tmp_path):
    """On the fake CLI: each login's CLI gets its own CLAUDE_CONFIG_DIR or token, nothing of
    the other; a limit that arrives after text went out is that request's error (no second
    login asked), and the next conversation goes to the other login."""
    from conftest import sse_events
    token = new_token()
    (tmp_path / "a.token").write_text(token)
    (tmp_path / "bdir").mkdir()
    pids = tmp_path / "pids"
    pids.mkdir()
    p = make_proxy(fake=True, pids=pids, CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0,
                   CLAUDE_CODE_OAUTH_TOKEN="inherited-" + token[12:],
                   CLAUDE_PROXY_ACCOUNTS="a=token-file:%s,b=%s" % (tmp_path / "a.token",
                                                                   tmp_path / "bdir"))
    envs = {}
    for name in ("a", "b"):
        status, hdrs, got = chat(p, "[[echo-env]] " + name, headers={"X-Claude-Account": name})
        assert status == 200 and lower(hdrs)["x-claude-account"] == name, got
        envs[name] = json.loads(got["choices"][0]["message"]["content"])
    assert envs["a"]["CLAUDE_CODE_OAUTH_TOKEN"] == token and "CLAUDE_CONFIG_DIR" not in envs["a"]
    assert envs["b"]["CLAUDE_CONFIG_DIR"] == str(tmp_path / "bdir")
    assert "CLAUDE_CODE_OAUTH_TOKEN" not in envs["b"], "the inherited login must not leak in"

    runs = len(list(pids.iterdir()))
    status, hdrs, text = p.post(CHAT, {"model": "sonnet", "stream": True, "messages": [
        {"role": "user", "content": "[[limited-late]]"}]}, timeout=60)
    assert status == 200 and lower(hdrs)["x-claude-account"] == "a"
    datas = [json.loads(d) for _n, d in sse_events(text) if d != "[DONE]"]
    assert any(c.get("choices") and c["choices"][0]["delta"].get("content") == "partial "
               for c in datas), text
    assert "hit its plan limit" in datas[-1]["error"]["message"], text
    assert len(list(pids.iterdir())) == runs + 1, "no second login was asked"
    status, hdrs, got = chat(p, "next conversation")
    assert status == 200 and lower(hdrs)["x-claude-account"] == "b", got
    assert token not in p.log and token[12:] not in p.log


def test_a_login_whose_cli_cannot_start_leaves_the_pool_to_the_others(make_proxy, tmp_path):
    """On the fake CLI: login a's token file is empty, so its CLI can't be started.  That is
    the login's fault: it is marked unhealthy with its hint, and the pool is not put into cold
    fallback for every login; b's processes are pre-started as usual."""
    (tmp_path / "a.token").write_text("")
    (tmp_path / "bdir").mkdir()
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=2, CLAUDE_PROXY_SESSIONS=0,
                   CLAUDE_PROXY_ACCOUNTS="a=token-file:%s,b=%s" % (tmp_path / "a.token",
                                                                   tmp_path / "bdir"))
    deadline = time.time() + 20
    while True:
        h = p.request("GET", "/health")[2]
        a = [x for x in h["logins"]["accounts"] if x["name"] == "a"][0]
        if not a["healthy"] and h["idle"]["ready"] >= 1 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not a["healthy"] and "a.token" in a["hint"], h
    assert h["idle"]["ready"] >= 1 and h["idle"]["mode"] == "warm", h
    assert h["idle"]["start_failures"] == 0, h
    # told by the start-up check, which reads the token file as a CLI start would
    assert [r for r in h["reasons"] if r.startswith(
        "login a cannot serve: The token file of login 'a' (%s) must hold one token"
        % (tmp_path / "a.token"))], h
    status, hdrs, got = chat(p, "hello")
    assert status == 200 and lower(hdrs)["x-claude-account"] == "b", got


# -- 5. beyond one machine: a LiteLLM Router in front of two instances ----------------------------

ROUTER_SCRIPT = r'''
import json, os, sys
from litellm import Router
import litellm
litellm.telemetry = False
litellm.suppress_debug_info = True
urls = sys.argv[1:]
router = Router(model_list=[
    {"model_name": "claude", "litellm_params": {"model": "openai/sonnet", "order": i + 1,
                                                "api_base": url + "/v1", "api_key": "unused"}}
    for i, url in enumerate(urls)], num_retries=1, allowed_fails=0, cooldown_time=300,
    retry_after=0)
out = []
for i in range(3):
    r = router.completion(model="claude", messages=[{"role": "user", "content": "q%d" % i}])
    out.append({"text": r.choices[0].message.content,
                "api_base": r._hidden_params.get("api_base")})
print(json.dumps(out))
'''


def test_litellm_router_fails_over_from_a_limited_instance_and_cools_it_down(sub_proxy, upstream,
                                                                              tmp_path):
    pytest.importorskip("litellm")
    import subprocess, sys, os
    t1, t2 = new_token(), new_token()
    upstream.plans[t1] = Plan(five_hour=1.0)             # instance 1's login: used up
    upstream.plans[t2] = Plan(five_hour=0.2)
    p1 = sub_proxy(t1, CLAUDE_PROXY_POOL_SIZE=0)
    p2 = sub_proxy(t2, CLAUDE_PROXY_POOL_SIZE=0)
    script = tmp_path / "router.py"
    script.write_text(ROUTER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False",
               NO_PROXY="127.0.0.1,localhost", HOME=str(tmp_path))
    out = subprocess.run([sys.executable, str(script), p1.url, p2.url], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [g["text"] for g in got] == ["Hello from the fake upstream."] * 3
    assert all(g["api_base"].startswith(p2.url) for g in got), got
    # instance 1 was asked once (its 429 put it in cooldown), instance 2 served all three
    assert tokens_used(upstream).count(t1) == 1, tokens_used(upstream)
    assert tokens_used(upstream).count(t2) == 3
    assert "/v1/chat/completions 429" in p1.log
    assert p1.request("GET", "/v1/usage")[2]["accounts"][0]["windows"]["five_hour"]["status"] \
        == "rejected"


NGINX_CONF = NGINX_HEAD + """
    upstream claude_proxies {
        hash $http_x_session_id consistent;
        server 127.0.0.1:%(p1)d max_fails=1 fail_timeout=300s;
        server 127.0.0.1:%(p2)d max_fails=1 fail_timeout=300s;
    }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://claude_proxies;
            proxy_set_header Host $host;
            proxy_next_upstream error timeout http_429 non_idempotent;
            proxy_next_upstream_tries 2;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 660s;
        }
    }
}
"""


@pytest.fixture
def balanced(sub_proxy, upstream, balancer):
    """balanced(program, conf) -> (front, t1, t2, sessions on 1): two instances, one
    subscription each, behind a load balancer started from `conf` (a template of p1, p2, sock,
    port, dir); each of the sessions found has been served twice by the same instance."""
    import tempfile
    sock_dir = tempfile.mkdtemp(prefix="lb-")      # short: a unix socket path has 107 bytes

    def make(argv, conf):
        need_tool(argv[0])
        t1, t2 = new_token(), new_token()
        upstream.plans[t1], upstream.plans[t2] = Plan(), Plan()
        p1 = sub_proxy(t1, CLAUDE_PROXY_POOL_SIZE=0)
        p2 = sub_proxy(t2, CLAUDE_PROXY_POOL_SIZE=0)
        front_sock = os.path.join(sock_dir, "admin.sock")
        front = Proxy.__new__(Proxy)          # only its request helpers, on the balancer's URL
        front.url = balancer(argv, conf, p1=p1.port, p2=p2.port, sock=front_sock)
        front.backends, front.sock = (p1, p2), front_sock
        where = {}
        for i in range(12):                   # sessions until both instances served some
            sid = "session-%d" % i
            status, _, got = chat(front, "hi " + sid, headers={"X-Session-Id": sid})
            assert status == 200, got
            where[sid] = tokens_used(upstream)[-1]
            if len(set(where.values())) == 2 and len(where) >= 4:
                break
        assert set(where.values()) == {t1, t2}, "the hash never chose one of the instances"
        for sid, token in where.items():      # each session stays where it began
            assert chat(front, "again " + sid, headers={"X-Session-Id": sid})[0] == 200
            assert tokens_used(upstream)[-1] == token, sid
        return front, t1, t2, [sid for sid, t in where.items() if t == t1]

    yield make
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_nginx_keeps_a_session_on_one_instance_and_fails_over_on_429(balanced, upstream):
    """The README's nginx recipe, run: a session header hashes to one instance; a 429 from a
    limited instance goes to the next one, and the limited one rests (max_fails)."""
    front, t1, t2, on_1 = balanced(["nginx", "-p", "/", "-c", "CONF", "-g",
                                    "daemon off; master_process off;"], NGINX_CONF)
    upstream.plans[t1].five_hour = 1.0                 # instance 1's login is used up
    status, _, got = chat(front, "over", headers={"X-Session-Id": on_1[0]})
    assert status == 200, got
    assert tokens_used(upstream)[-2:] == [t1, t2]      # asked, refused, next instance
    asked = len(tokens_used(upstream))
    status, _, got = chat(front, "rested", headers={"X-Session-Id": on_1[-1]})
    assert status == 200 and tokens_used(upstream)[asked:] == [t2], "instance 1 rests"


HAPROXY_CONF = """
global
    stats socket %(sock)s""" + HAPROXY_HEAD + """
    default_backend claude_proxies
backend claude_proxies
    balance hdr(X-Session-Id)
    hash-type consistent
    option httpchk GET /health
    http-check expect rstring "\\"serving\\": true"
    retry-on conn-failure empty-response
    retries 1
    option redispatch 1
    server a 127.0.0.1:%(p1)d check inter 500ms fall 1 rise 1
    server b 127.0.0.1:%(p2)d check inter 500ms fall 1 rise 1
"""


def haproxy_status(front, server, want, timeout=20):
    """Polls HAProxy's admin socket (the `stats socket` line, added for the test) until
    `server` has status `want`; True if it got there."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(front.sock)
            s.sendall(b"show stat\n")
            csv = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        rows = [line.split(",") for line in csv.splitlines() if line.startswith("claude_proxies,")]
        if [r for r in rows if r[1] == server and r[17].startswith(want)]:
            return True
        time.sleep(0.1)
    return False


def test_haproxy_keeps_a_session_and_takes_a_limited_instance_out(balanced, upstream):
    """The README's HAProxy recipe, run: a session header hashes to one instance; once an
    instance's only login is known out of limits its /health says "serving": false, the
    health check takes it out and its sessions go to the other one."""
    front, t1, t2, on_1 = balanced(["haproxy", "-db", "-f", "CONF"], HAPROXY_CONF)
    upstream.plans[t1].five_hour = 1.0
    status, _, got = chat(front, "refused", headers={"X-Session-Id": on_1[0]})
    assert status == 429, got           # HAProxy 2.6 cannot retry on a 429: it reaches the client
    assert front.backends[0].request("GET", "/health")[2]["logins"]["serving"] is False
    assert front.backends[1].request("GET", "/health")[2]["logins"]["serving"] is True
    assert haproxy_status(front, "a", "DOWN"), "the health check never took instance 1 out"
    asked = len(tokens_used(upstream))
    status, _, got = chat(front, "elsewhere", headers={"X-Session-Id": on_1[0]})
    assert status == 200 and tokens_used(upstream)[asked:] == [t2], got


def test_tokens_of_a_kept_conversation_count_each_turn_once(sub_proxy, upstream):
    """The CLI's modelUsage adds up over a process's turns; a conversation continued on its
    kept process counts only what each turn added."""
    token = new_token()
    upstream.plans[token] = Plan()
    p = sub_proxy(token)
    msgs = [{"role": "user", "content": "one"}]
    for turn in range(3):
        status, _, got = p.post(CHAT, {"model": "sonnet", "messages": msgs}, timeout=120)
        assert status == 200, got
        msgs += [{"role": "assistant", "content": got["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "more %d" % turn}]
    assert p.request("GET", "/health")[2]["idle"]["hits"]["kept"] >= 1, "the third turn was kept"
    assert len(tokens_used(upstream)) == 3
    [counts] = p.request("GET", "/v1/usage")[2]["accounts"][0]["tokens"].values()
    assert (counts["input"], counts["output"]) == (33, 21), counts


def test_a_403_for_the_model_is_not_a_login_failure(sub_proxy, upstream):
    token = new_token()
    upstream.plans[token] = Plan()
    upstream.default = fake_upstream.error(403, "permission_error",
                                           "Your plan does not include access to this model")
    p = sub_proxy(token, CLAUDE_PROXY_POOL_SIZE=0)
    status, _, got = chat(p)
    assert status == 403, got
    assert got["error"]["code"] == "model_not_found"
    assert "plan may not include it" in got["error"]["message"]
    assert p.request("GET", "/v1/usage")[2]["accounts"][0]["healthy"] is True


# -- the routing rules on their own (no CLI) ------------------------------------------------------

def logins_of(*names, guard="deny"):
    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import claude_openai_proxy as cop
    cfg = cop.Config(accounts=tuple((n, "token_file", "/nowhere/" + n) for n in names),
                     extra_usage=guard)
    req = cop.Request(model="sonnet", cli_model="sonnet",
                      messages=[cop.Message("user", [{"type": "text", "text": "hi"}])])
    return cop, cop.Logins(cfg), req


def limits(five_hour, resets, status="allowed", overage="rejected", in_use=False):
    return {"type": "rate_limit_event", "rate_limit_info": {
        "status": status, "resetsAt": resets, "rateLimitType": "five_hour",
        "overageStatus": overage, "isUsingOverage": in_use,
        "unifiedWindows": {"five_hour": {"utilization": five_hour, "resetsAt": resets,
                                         "status": status}}}}


def test_routing_rechecks_an_unhealthy_login_after_a_while():
    cop, logins, req = logins_of("a", "b")
    a, b = logins.accounts
    a.mark_unhealthy("upstream 401")
    assert logins.choose(req).name == "b"
    a.failed_at -= cop.RECHECK_SECONDS + 1              # five minutes later: a gets a try
    assert logins.choose(req).name == "a"
    b.mark_unhealthy("upstream 401")                     # both down: the one down longest
    a.mark_unhealthy("upstream 401")
    a.failed_at -= 10
    assert logins.choose(req).name == "a"
    assert logins.choose(req, tried=["a"]).name == "b"
    with pytest.raises(cop.CLIUnavailable):
        logins.choose(req, tried=["a", "b"])


def test_routing_by_headroom_ignores_windows_that_have_reset():
    cop, logins, req = logins_of("a", "b")
    a, b = logins.accounts
    now = time.time()
    a.note(limits(0.3, int(now) + 3600))
    b.note(limits(0.6, int(now) + 3600))
    assert logins.choose(req).name == "a"
    a.note(limits(0.95, int(now) - 1))                   # a's window is over: unused again
    assert a.headroom() == 1.0 and logins.choose(req).name == "a"
    a.note(limits(0.95, int(now) + 3600))
    assert logins.choose(req).name == "b"
    logins.remember(req, a)                              # the conversation began on a
    assert logins.choose(req).name == "a"
    a.note(limits(1.0, int(now) + 3600, status="rejected"))   # out of limits: it moves
    assert logins.choose(req).name == "b"


def test_the_guard_holds_until_the_reset_and_only_when_extra_usage_would_bill():
    cop, logins, req = logins_of("a")
    [a] = logins.accounts
    now = int(time.time())
    a.note(limits(1.0, now + 100, status="rejected", overage="rejected"))
    assert a.limited() is None, "no extra usage to bill: the upstream refuses for free"
    assert logins.choose(req).name == "a"
    a.note(limits(1.0, now + 100, status="rejected", overage="allowed", in_use=True))
    err = a.limited()
    assert err.status == 429 and 99 <= int(err.headers["Retry-After"]) <= 101
    with pytest.raises(cop.RateLimited):
        logins.choose(req)
    assert a.limited(now + 101) is None                  # after the reset
    _cop, allowing, _req = logins_of("a", guard="allow")
    allowing.accounts[0].note(limits(1.0, now + 100, status="rejected", overage="allowed",
                                     in_use=True))
    assert allowing.accounts[0].limited() is None


def test_usage_needs_a_key_and_health_does_not(make_proxy):
    p = make_proxy(fake=True, CLAUDE_PROXY_API_KEYS="usage-key-1-0d4c8b2e", CLAUDE_PROXY_POOL_SIZE=0)
    status, _, got = p.request("GET", "/v1/usage")
    assert status == 401, got
    status, _, got = p.request("GET", "/v1/usage", headers={"Authorization": "Bearer usage-key-1-0d4c8b2e"})
    assert status == 200 and got["accounts"][0]["name"] == "default", got
    assert got["accounts"][0]["windows"] == {} and got["accounts"][0]["updated_at"] is None
    assert p.request("GET", "/usage", headers={"x-api-key": "usage-key-1-0d4c8b2e"})[0] == 200
    status, _, health = p.request("GET", "/health")
    assert status == 200 and health["logins"]["serving"] is True
    assert "usage-key-1-0d4c8b2e" not in json.dumps(got) + json.dumps(health)
