"""Section 7, logins: plan limits per login (GET /v1/usage, /health, /metrics, the log), limit
errors a client can act on, the extra-usage guard, several logins.

The real CLI runs with made-up subscription logins (CLAUDE_CODE_OAUTH_TOKEN, a token file, or
a CLAUDE_CONFIG_DIR holding a made-up .credentials.json) against the fake upstream, whose
`plans` play one subscription per token with its own anthropic-ratelimit-unified-* headers.
"""
import json
import re
import secrets
import time

import pytest

import fake_upstream
from conftest import Proxy, base_env, real_claude_bin
from fake_upstream import Plan

CHAT = "/v1/chat/completions"


def new_token():
    return "sk-ant-oat01-madeup-" + secrets.token_hex(12)


@pytest.fixture
def sub_proxy(home, upstream_server):
    """Factory: sub_proxy(token=..., **env) -> a proxy on the real CLI whose login is a
    subscription (no API key anywhere); stopped at the end of the test."""
    started = []

    def make(token=None, args=(), **extra):
        env = base_env(home, upstream_server.url, real_claude_bin(),
                       CLAUDE_PROXY_PASS_ENV="ANTHROPIC_BASE_URL", **extra)
        env.pop("ANTHROPIC_API_KEY")
        if token:
            env["CLAUDE_CODE_OAUTH_TOKEN"] = token
        p = Proxy(env, args)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


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
