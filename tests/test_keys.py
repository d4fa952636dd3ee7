"""Keys as principals (issue 24, section 12 keys): the keys file (names, roles, budgets, model and
login lists), roles on every route, budgets enforced before a slot is taken, reload on change
and SIGHUP without dropping a request in flight, and the fair share of the CLI slots.

Most of it runs on tests/fake_claude.py (roles and budgets do not depend on what the CLI says;
it answers 3 input and 2 output tokens a request, so a token budget counts 5 a request); the
budget and history tests against the real CLI are in tests/test_usage_history.py.
"""
import email.message
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import FAKE_CLAUDE, PROXY, ROOT, Gate, base_env, sse_events, wait_for

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import claude_openai_proxy as cop  # noqa: E402

CHAT = "/v1/chat/completions"
MSGS = "/v1/messages"
AV = {"anthropic-version": "2023-06-01"}
ADMIN, CLIENT, OTHER = "admin-key-0a1b2c3d4e", "client-key-5f6a7b8c9d", "other-key-1122334455"


def keys_file(tmp_path, entries, mode=0o600, name="keys.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"keys": entries}))
    os.chmod(path, mode)
    return path


def standard(tmp_path, client_extra=None, other_extra=None):
    return keys_file(tmp_path, [
        {"name": "ops", "key": ADMIN, "role": "admin"},
        dict({"name": "coder", "key": CLIENT, "role": "client"}, **(client_extra or {})),
        dict({"name": "nightly", "sha256": cop.hashlib.sha256(OTHER.encode()).hexdigest()},
             **(other_extra or {}))])


def bearer(key):
    return {"Authorization": "Bearer " + key} if key else {}


def chat(p, key, content="hi", stream=False, model="sonnet", headers=None, timeout=60):
    return p.post(CHAT, {"model": model, "stream": stream,
                         "messages": [{"role": "user", "content": content}]},
                  headers=dict(bearer(key), **(headers or {})), timeout=timeout)


def messages(p, key, content="hi", model="claude-sonnet-4-6"):
    return p.post(MSGS, {"model": model, "max_tokens": 64,
                         "messages": [{"role": "user", "content": content}]},
                  headers=dict(AV, **{"x-api-key": key}), timeout=60)


def start(make_proxy, path, **env):
    """A proxy on the fake CLI with the keys file `path` and a state directory of its own
    beside it (budgets are seeded from the history: a shared one would carry other tests'
    figures over)."""
    env.setdefault("CLAUDE_PROXY_STATE_DIR", path.parent / "state")
    return make_proxy(fake=True, CLAUDE_PROXY_KEYS_FILE=path, CLAUDE_PROXY_POOL_SIZE=0,
                      CLAUDE_PROXY_SESSIONS=0, **env)


def run_proxy(home, upstream, env):
    """Start the proxy expecting it to refuse: (exit status, stderr)."""
    e = base_env(home, upstream.url, str(FAKE_CLAUDE), **env)
    res = subprocess.run([sys.executable, str(PROXY), "--port", "0"], env=e,
                         capture_output=True, text=True, timeout=60)
    return res.returncode, res.stderr


# The keys file ##################################################################################

def test_parse_keys_reads_names_roles_budgets_and_lists():
    text = json.dumps({"keys": [
        {"name": "ops", "key": ADMIN, "role": "admin"},
        {"name": "coder", "sha256": "ab" * 32, "budgets": {"tokens_day": 1000, "concurrent": 2},
         "models": ["sonnet", "claude-haiku-4-5"], "logins": ["work"]}]})
    ops, coder, env = cop.parse_keys(text, "keys.json", ("env-key-1",))
    assert (ops.name, ops.role, ops.digest) == ("ops", "admin", cop.key_digest(ADMIN))
    assert (coder.role, coder.digest) == ("client", bytes.fromhex("ab" * 32))
    assert coder.budgets == (("concurrent", 2), ("tokens_day", 1000))
    assert coder.models == ("sonnet", "claude-haiku-4-5") and coder.logins == ("work",)
    # CLAUDE_PROXY_API_KEYS beside a keys file: unnamed client keys
    assert (env.name, env.role, env.digest) == (
        "key-" + cop.hashlib.sha256(b"env-key-1").hexdigest()[:8], "client",
        cop.key_digest("env-key-1"))
    # without a keys file they are all the keys there are, so they stay admin (as before)
    assert [p.role for p in cop.parse_keys("[]", "-", ("a", "b"))] == ["admin", "admin"]


def test_env_keys_are_named_by_their_digest_so_removing_one_renames_none():
    """Named by position, removing A from A,B made B "key-1" and gave it A's history rows and
    budget use; named by digest, B keeps its name whatever is before it."""
    a, b = "first-env-key-0a1b2c3d", "second-env-key-4e5f6a7b"
    both = {p.name: p.digest for p in cop.parse_keys("[]", "-", (a, b))}
    alone = {p.name: p.digest for p in cop.parse_keys("[]", "-", (b,))}
    name_b = "key-" + cop.hashlib.sha256(b.encode()).hexdigest()[:8]
    assert both[name_b] == alone[name_b] == cop.key_digest(b)
    assert list(alone) == [name_b] and len(both) == 2
    assert a not in "".join(both) and b not in "".join(both), "a name never holds the key"
    # a file entry with the same name is refused, never two principals under one name
    with pytest.raises(ValueError, match="is taken by a key in CLAUDE_PROXY_API_KEYS"):
        cop.parse_keys(json.dumps([{"name": name_b, "key": ADMIN}]), "k.json", (b,))


@pytest.mark.parametrize("entry,says", [
    ({"key": ADMIN}, "name must be"),
    ({"name": "a b", "key": ADMIN}, "name must be"),
    ({"name": "x"}, "exactly one of key"),
    ({"name": "x", "key": ADMIN, "sha256": "ab" * 32}, "exactly one of key"),
    ({"name": "x", "key": "short"}, "16 or more"),
    ({"name": "x", "sha256": "nothex"}, "64 hex digits"),
    ({"name": "x", "key": ADMIN, "role": "root"}, "role must be admin or client"),
    ({"name": "x", "key": ADMIN, "budget": {}}, "unknown field(s) budget"),
    ({"name": "x", "key": ADMIN, "budgets": {"tokens_month": 5}}, "unknown budget 'tokens_month'"),
    ({"name": "x", "key": ADMIN, "budgets": {"tokens_day": 0}}, "at least 1"),
    ({"name": "x", "key": ADMIN, "budgets": {"tokens_day": "5"}}, "at least 1"),
    ({"name": "x", "key": ADMIN, "models": "sonnet"}, "models must be a list"),
    ({"name": "x", "key": ADMIN, "models": ["gpt-4o"]}, "'gpt-4o' is not a model"),
    ({"name": "operator", "key": ADMIN}, "is taken"),
])
def test_parse_keys_names_the_entry_and_what_is_wrong(entry, says):
    with pytest.raises(ValueError) as err:
        cop.parse_keys(json.dumps([{"name": "fine", "key": OTHER}, entry]), "k.json")
    assert "k.json key 2" in str(err.value) and says in str(err.value), err.value
    assert ADMIN not in str(err.value), "a key is never echoed"


def test_parse_keys_refuses_duplicates_and_bad_json():
    with pytest.raises(ValueError, match="taken"):
        cop.parse_keys(json.dumps([{"name": "a", "key": ADMIN}, {"name": "a", "key": OTHER}]), "k")
    with pytest.raises(ValueError, match="listed twice"):
        cop.parse_keys(json.dumps([{"name": "a", "key": ADMIN}, {"name": "b", "key": ADMIN}]), "k")
    with pytest.raises(ValueError, match="not valid JSON"):
        cop.parse_keys("{", "k")
    with pytest.raises(ValueError, match="JSON list of keys"):
        cop.parse_keys('{"key": 1}', "k")


@pytest.mark.parametrize("text", ["[]", '{"keys": []}'])
def test_parse_keys_refuses_a_file_that_lists_no_keys(text):
    """No principals means no key is checked: a file with none must not open the proxy."""
    with pytest.raises(ValueError, match="k.json lists no keys"):
        cop.parse_keys(text, "k.json")
    with pytest.raises(ValueError, match="lists no keys"):
        cop.parse_keys(text, "k.json", ("env-key-0123456789",))


def test_a_keys_file_with_no_keys_refuses_to_start_on_any_address(home, upstream, tmp_path):
    path = keys_file(tmp_path, [])
    e = base_env(home, upstream.url, str(FAKE_CLAUDE), CLAUDE_PROXY_KEYS_FILE=path)
    res = subprocess.run([sys.executable, str(PROXY), "--host", "0.0.0.0", "--port", "0"],
                         env=e, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "CLAUDE_PROXY_KEYS_FILE: %s lists no keys" % path in res.stderr, res.stderr


def test_a_keys_file_emptied_at_run_time_keeps_the_keys_in_force(make_proxy, tmp_path):
    path = standard(tmp_path)
    p = start(make_proxy, path)
    path.write_text('{"keys": []}')
    wait_for(lambda: p.request("GET", "/v1/models", headers=bearer(CLIENT)) and
             "lists no keys" in p.log, "the refusal in the log")
    assert "keys file not reloaded, the keys in force stay: %s lists no keys" % path in p.log
    assert chat(p, None)[0] == 401, "no key is still refused"
    assert chat(p, CLIENT)[0] == 200, "the keys in force stay"
    p.stop()


def test_a_keys_file_readable_by_others_refuses_to_start(home, upstream, tmp_path):
    path = standard(tmp_path)
    os.chmod(path, 0o644)
    code, err = run_proxy(home, upstream, {"CLAUDE_PROXY_KEYS_FILE": path})
    assert code != 0 and "Traceback" not in err
    assert "readable by others" in err and "chmod 600 %s" % path in err, err
    assert ADMIN not in err and CLIENT not in err


def test_a_broken_keys_file_refuses_to_start(home, upstream, tmp_path):
    path = keys_file(tmp_path, [{"name": "x", "key": ADMIN, "role": "boss"}])
    code, err = run_proxy(home, upstream, {"CLAUDE_PROXY_KEYS_FILE": path})
    assert code != 0 and "Traceback" not in err
    assert "CLAUDE_PROXY_KEYS_FILE" in err and "role must be admin or client" in err, err
    code, err = run_proxy(home, upstream, {"CLAUDE_PROXY_KEYS_FILE": tmp_path / "absent.json"})
    assert code != 0 and "cannot be read" in err and "Traceback" not in err, err


# Roles on every route ###########################################################################

ROUTES = [  # method, path, body, who may: "all" (every key), "admin", "public" (no key)
    ("POST", CHAT, {"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]}, "all"),
    ("POST", "/v1/responses", {"model": "sonnet", "input": "hi"}, "all"),
    ("POST", MSGS, {"model": "sonnet", "max_tokens": 9, "messages": [
        {"role": "user", "content": "hi"}]}, "all"),
    ("POST", "/v1/messages/count_tokens", {"model": "sonnet", "messages": [
        {"role": "user", "content": "hi"}]}, "all"),
    ("GET", "/v1/models", None, "all"),
    ("GET", "/v1/models/sonnet", None, "all"),
    ("GET", "/v1/usage", None, "all"),
    ("GET", "/metrics", None, "admin"),
    ("GET", "/dashboard/data", None, "admin"),
    ("GET", "/health", None, "public"),
    ("GET", "/dashboard", None, "public"),
    ("GET", "/", None, "public"),
]


@pytest.fixture(scope="module")
def roles_proxy(make_proxy, tmp_path_factory):
    return start(make_proxy, standard(tmp_path_factory.mktemp("roles")))


@pytest.mark.parametrize("method,path,body,who", ROUTES, ids=[r[0] + r[1] for r in ROUTES])
def test_roles_on_every_route(roles_proxy, method, path, body, who):
    for key, role in ((ADMIN, "admin"), (CLIENT, "client"), (OTHER, "client"),
                      (None, "none"), ("wrong-key-0000000000", "none")):
        status, _, got = roles_proxy.request(method, path, body, headers=bearer(key))
        if who == "public" or (who == "all" and role != "none") or (who == role == "admin"):
            assert status == 200, (key, path, got)
        elif role == "none":
            assert status == 401, (key, path, got)
            assert got["error"]["type"] == "authentication_error"
        else:
            assert status == 403, (key, path, got)
            assert got["error"]["type"] == "permission_error"
            assert "admin keys only" in got["error"]["message"] and role in got["error"]["message"]


def test_every_route_in_the_table_checks_its_access(roles_proxy):
    """Every route of cop.ROUTES (those added later too): without a key 401 unless anyone may
    call it; a client key never 401 and 403 exactly on the admin routes; an admin key never
    401 or 403.  Path parameters get made-up ids (a 404 is fine: access came first)."""
    assert {r.access for r in cop.ROUTES} == {"anyone", "client", "admin"}
    for route in cop.ROUTES:
        path = re.sub(r"\{[a-z_]+\}", "nope_1", route.path)
        body = {} if route.method == "POST" else None
        for key, role in ((None, "none"), (CLIENT, "client"), (ADMIN, "admin")):
            status, _, got = roles_proxy.request(route.method, path, body, headers=bearer(key))
            where = (route.method, path, role, status, got)
            if route.access == "anyone":
                assert status not in (401, 403), where
            elif role == "none":
                assert status == 401, where
            elif role == "client" and route.access == "admin":
                assert status == 403 and got["error"]["type"] == "permission_error", where
            else:
                assert status not in (401, 403), where


def test_forbidden_in_the_anthropic_dialect(roles_proxy):
    status, _, got = roles_proxy.request("GET", "/metrics", headers=dict(AV, **{"x-api-key": CLIENT}))
    assert status == 403 and got["type"] == "error"
    assert got["error"]["type"] == "permission_error" and "coder" in got["error"]["message"]


def test_usage_shows_a_client_its_own_key_and_an_admin_every_key(roles_proxy):
    status, _, mine = roles_proxy.request("GET", "/v1/usage", headers=bearer(CLIENT))
    assert status == 200
    assert set(mine) == {"key", "estimate"}, "a client sees no login, no other key"
    assert mine["key"]["name"] == "coder" and mine["key"]["role"] == "client"
    assert set(mine["key"]["budgets"]) == set(cop.BUDGETS)
    status, _, everything = roles_proxy.request("GET", "/v1/usage", headers=bearer(ADMIN))
    assert status == 200 and "accounts" in everything
    assert [k["name"] for k in everything["keys"]] == ["ops", "coder", "nightly"]
    assert ADMIN not in json.dumps(everything) and CLIENT not in json.dumps(everything)


def test_without_keys_the_loopback_operator_reads_everything(fake_proxy):
    for path in ("/metrics", "/dashboard/data", "/v1/usage"):
        status, _, got = fake_proxy.request("GET", path)
        assert status == 200, (path, got)
    _, _, usage = fake_proxy.request("GET", "/v1/usage")
    assert "accounts" in usage and usage["keys"][0]["name"] == "operator"


def test_api_keys_beside_a_keys_file_are_client_keys(make_proxy, tmp_path):
    p = start(make_proxy, standard(tmp_path), CLAUDE_PROXY_API_KEYS="legacy-env-key-77")
    status, _, got = chat(p, "legacy-env-key-77")
    assert status == 200, got
    status, _, got = p.request("GET", "/metrics", headers=bearer("legacy-env-key-77"))
    name = "key-" + cop.hashlib.sha256(b"legacy-env-key-77").hexdigest()[:8]
    assert status == 403 and name in got["error"]["message"]
    p.stop()


# Model and login lists ##########################################################################

def test_a_model_outside_the_keys_list_is_403_naming_what_is_allowed(make_proxy, tmp_path):
    p = start(make_proxy, standard(tmp_path, {"models": ["haiku", "claude-sonnet-4-6"]}))
    assert chat(p, CLIENT, model="haiku")[0] == 200
    assert chat(p, CLIENT, model="claude-haiku-4-5")[0] == 200       # the family is listed
    assert messages(p, CLIENT, model="claude-sonnet-4-6")[0] == 200
    status, _, got = chat(p, CLIENT, model="opus")
    assert status == 403 and got["error"]["type"] == "permission_error", got
    assert got["error"]["message"] == ("Key 'coder' may use the model(s) haiku, claude-sonnet-4-6 "
                                       "only, not 'opus'.")
    assert got["error"]["param"] == "model"
    status, _, got = messages(p, CLIENT, model="claude-opus-4-8")
    assert status == 403 and got["error"]["type"] == "permission_error"
    assert chat(p, ADMIN, model="opus")[0] == 200, "other keys are not limited"
    p.stop()


def test_a_login_outside_the_keys_list_is_403_naming_what_is_allowed(make_proxy, tmp_path):
    work, home_login = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home_login.mkdir()
    p = start(make_proxy, standard(tmp_path, {"logins": ["work"]}, {"logins": ["nowhere"]}),
              CLAUDE_PROXY_ACCOUNTS="home=%s,work=%s" % (home_login, work))
    for _ in range(3):                       # unpinned: always the listed login
        status, hdrs, got = chat(p, CLIENT)
        assert status == 200 and hdrs["X-Claude-Account"] == "work", got
    status, hdrs, _ = chat(p, CLIENT, headers={"X-Claude-Account": "work"})
    assert status == 200 and hdrs["X-Claude-Account"] == "work"
    status, _, got = chat(p, CLIENT, headers={"X-Claude-Account": "home"})
    assert status == 403 and got["error"]["type"] == "permission_error"
    assert got["error"]["message"] == "This key may use the login(s) work only."
    status, _, got = chat(p, OTHER)
    assert status == 403
    # the logins it may not use are not named to it
    assert got["error"]["message"] == "This key may use the login(s) nowhere only."
    status, hdrs, _ = chat(p, ADMIN, headers={"X-Claude-Account": "home"})
    assert status == 200 and hdrs["X-Claude-Account"] == "home"
    p.stop()


# Budgets ########################################################################################

def test_budget_windows_fill_free_up_and_name_themselves():
    b = cop.Budgets()
    key = cop.Principal("k", budgets=(("requests_per_minute", 2), ("tokens_5h", 100)))
    t0 = 1_000_000.0
    b.admit(key, t0)
    b.done(key, 60, t0 + 1)
    b.admit(key, t0 + 10)
    b.done(key, 50, t0 + 11)
    with pytest.raises(cop.RateLimited) as err:        # 2 requests in the last minute
        b.admit(key, t0 + 20)
    assert "requests_per_minute=2" in err.value.message
    assert err.value.headers["Retry-After"] == "41"      # the first start leaves at t0 + 60
    with pytest.raises(cop.RateLimited) as err:        # a minute on: 110 tokens in 5 hours
        b.admit(key, t0 + 61)
    assert "tokens_5h=100" in err.value.message and "110 tokens" in err.value.message
    assert err.value.headers["Retry-After"] == str(5 * 3600 + 1 - 61 + 1)
    assert err.value.status == 429 and err.value.code == "rate_limit_exceeded"
    report = b.report(key, t0 + 61)
    assert report["tokens_5h"] == {"limit": 100, "used": 110, "fill": 1.1, "window_s": 18000,
                                   "frees_at": t0 + 1 + 18000}
    b.admit(key, t0 + 5 * 3600 + 2)                      # the window has moved past the first use
    assert b.report(key, t0 + 5 * 3600 + 2)["tokens_5h"]["used"] == 50
    other = cop.Principal("other", budgets=(("tokens_5h", 100),))
    b.admit(other, t0 + 61)                              # budgets are per key


def test_budgets_seeded_from_history_count_after_a_restart():
    b = cop.Budgets()
    key = cop.Principal("k", budgets=(("tokens_day", 1000), ("tokens_week", 5000)))
    now = time.time()
    b.seed([(now - 3600, "k", 900), (now - 3 * 86400, "k", 3000), (now - 8 * 86400, "k", 9999)])
    report = b.report(key, now)
    assert report["tokens_day"]["used"] == 900 and report["tokens_week"]["used"] == 3900
    b.done(key, 100, now)                     # done() without admit() leaves running at 0
    with pytest.raises(cop.RateLimited, match="tokens_day=1000"):
        b.admit(key, now + 1)


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_requests_per_minute_is_a_429_in_the_callers_dialect(make_proxy, tmp_path, dialect):
    p = start(make_proxy, standard(tmp_path, {"budgets": {"requests_per_minute": 2}}))
    ask = (lambda: chat(p, CLIENT)) if dialect == "openai" else (lambda: messages(p, CLIENT))
    assert ask()[0] == 200 and ask()[0] == 200
    status, hdrs, got = ask()
    assert status == 429, got
    assert 1 <= int(hdrs["Retry-After"]) <= 61
    err = got["error"]
    assert err["type"] == "rate_limit_error"
    assert "Key 'coder' is over its budget requests_per_minute=2" in err["message"]
    if dialect == "anthropic":
        assert got["type"] == "error"
    else:
        assert err["code"] == "rate_limit_exceeded"
    assert chat(p, OTHER)[0] == 200, "another key has its own budget"
    _, _, usage = p.request("GET", "/v1/usage", headers=bearer(CLIENT))
    rpm = usage["key"]["budgets"]["requests_per_minute"]
    assert rpm["limit"] == 2 and rpm["used"] == 2 and rpm["fill"] == 1.0
    p.stop()


def test_a_token_budget_refuses_the_request_after_the_one_that_used_it_up(make_proxy, tmp_path):
    p = start(make_proxy, standard(tmp_path, {"budgets": {"tokens_day": 8}}))
    assert chat(p, CLIENT)[0] == 200          # 5 tokens
    assert chat(p, CLIENT)[0] == 200          # 10: over, but known only after it ran
    status, hdrs, got = chat(p, CLIENT)
    assert status == 429
    assert "tokens_day=8 (10 tokens used in the last day)" in got["error"]["message"]
    assert 86000 < int(hdrs["Retry-After"]) <= 86401
    _, _, usage = p.request("GET", "/v1/usage", headers=bearer(CLIENT))
    assert usage["key"]["budgets"]["tokens_day"]["used"] == 10
    p.stop()


def test_concurrent_budget_refuses_at_once_and_frees_when_one_ends(make_proxy, tmp_path):
    p = start(make_proxy, standard(tmp_path, {"budgets": {"concurrent": 1}}),
              CLAUDE_PROXY_MAX_CONCURRENCY=3)
    result, gate = {}, Gate(p.env["HOME"])
    t = threading.Thread(target=lambda: result.update(r=chat(p, CLIENT, gate.text, timeout=60)))
    t.start()
    wait_for(lambda: p.request("GET", "/health", headers=bearer(ADMIN))[2]["concurrency"]["running"] == 1, "the stream")
    status, hdrs, got = chat(p, CLIENT)
    assert status == 429 and hdrs["Retry-After"] == "1"
    assert "concurrent=1: 1 of its requests are running" in got["error"]["message"]
    assert chat(p, OTHER)[0] == 200, "other keys are not held up"
    assert t.is_alive(), "the first request ran while the others were asked"
    gate.open()
    t.join(60)
    assert result["r"][0] == 200
    assert chat(p, CLIENT)[0] == 200, "the budget frees when the request ends"
    p.stop()


def test_one_key_cannot_hold_every_slot(make_proxy, tmp_path):
    """Two slots, three keys: the coder's second request waits for its first although a slot
    is free, so the nightly key gets the other slot at once."""
    p = start(make_proxy, standard(tmp_path), CLAUDE_PROXY_MAX_CONCURRENCY=2)
    results, gate = [], Gate(p.env["HOME"])         # the coder's requests answer once it opens
    threads = [threading.Thread(target=lambda: results.append(
        ("coder", chat(p, CLIENT, gate.text, timeout=60)[0], time.monotonic())))
        for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: p.request("GET", "/health", headers=bearer(ADMIN))[2]["concurrency"]["queued"] == 1, "one queued")
    health = p.request("GET", "/health", headers=bearer(ADMIN))[2]["concurrency"]
    assert health["running"] == 1 and health["queued"] == 1
    status, _, _ = chat(p, OTHER)
    done_other = time.monotonic()
    assert status == 200
    assert len(results) == 0, "the other key was served while the coder's second still waited"
    gate.open()
    for t in threads:
        t.join(60)
    assert [r[1] for r in results] == [200, 200]
    assert all(r[2] > done_other for r in results)
    p.stop()


# Reload #########################################################################################

def test_reload_on_change_and_sighup_keeps_a_stream_in_flight(make_proxy, tmp_path):
    path = standard(tmp_path)
    p = start(make_proxy, path)
    result, gate = {}, Gate(p.env["HOME"])
    t = threading.Thread(target=lambda: result.update(
        r=chat(p, CLIENT, gate.text, stream=True, timeout=60)))
    t.start()
    wait_for(lambda: p.request("GET", "/health", headers=bearer(ADMIN))[2]["concurrency"]["running"] == 1, "the stream")
    # the coder is removed and a new key added, written in place (the file watcher sees it)
    new = "fresh-key-9988776655"
    path.write_text(json.dumps([{"name": "ops", "key": ADMIN, "role": "admin"},
                                {"name": "fresh", "key": new}]))
    wait_for(lambda: chat(p, new)[0] == 200, "the new key to work")
    assert chat(p, CLIENT)[0] == 401, "the removed key is refused for new requests"
    assert t.is_alive(), "the stream was still running when the keys changed"
    gate.open()
    t.join(60)
    status, _, text = result["r"]
    assert status == 200
    frames = [d for _, d in sse_events(text)]
    assert frames[-1] == "[DONE]", "the removed key's stream ran to its end"
    assert "keys reloaded: 2 key(s) (ops:admin, fresh:client)" in p.log
    # a broken file keeps the keys in force, and says why in the log and /v1/usage
    path.write_text("{ not json")
    # the file is looked at by the next request (at most once a second)
    wait_for(lambda: p.request("GET", "/v1/models", headers=bearer(new)) and
             "keys file not reloaded" in p.log, "the refusal in the log")
    assert chat(p, new)[0] == 200
    _, _, usage = p.request("GET", "/v1/usage", headers=bearer(ADMIN))
    assert "not valid JSON" in usage["keys_file"]["error"]
    # SIGHUP: the file back to the first keys, written in place with the same size and mtime
    # as a broken version the watcher has seen, so the watcher cannot tell; only the signal can
    good = json.dumps([{"name": "ops", "key": ADMIN, "role": "admin"},
                       {"name": "coder", "key": CLIENT}])
    refusals = p.log.count("keys file not reloaded")
    path.write_text("[" + " " * (len(good) - 1))
    wait_for(lambda: p.request("GET", "/v1/models", headers=bearer(new)) and
             p.log.count("keys file not reloaded") > refusals, "the broken file seen")
    st = os.stat(path)
    with open(path, "r+") as f:
        f.write(good)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(3 * cop.KEYS_CHECK_SECONDS)
    assert chat(p, CLIENT)[0] == 401, "the watcher could not see this change"
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: chat(p, CLIENT)[0] == 200, "the coder after SIGHUP")
    assert chat(p, new)[0] == 401
    assert p.proc.poll() is None
    p.stop()


def test_a_reload_that_makes_the_file_world_readable_is_refused(make_proxy, tmp_path):
    path = standard(tmp_path)
    p = start(make_proxy, path)
    os.chmod(path, 0o644)
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "readable by others" in p.log, "the refusal")
    assert chat(p, CLIENT)[0] == 200, "the keys in force stay"
    p.stop()


# --check #######################################################################################

def test_check_lists_the_keys_and_refuses_a_broken_file(home, upstream, tmp_path):
    path = standard(tmp_path, {"budgets": {"tokens_day": 1000, "concurrent": 1},
                               "models": ["sonnet"], "logins": ["default"]})
    e = base_env(home, upstream.url, str(FAKE_CLAUDE), CLAUDE_PROXY_KEYS_FILE=path,
                 CLAUDE_PROXY_STATE_DIR=tmp_path / "state")
    res = subprocess.run([sys.executable, str(PROXY), "--check"], env=e, capture_output=True,
                         text=True, timeout=120)
    out = res.stdout
    assert "Keys: 3 from %s" % path in out, out
    assert "ops                  admin  no limits" in out
    assert ("coder                client concurrent=1, tokens_day=1000; models sonnet; "
            "logins default") in out
    assert "Usage history: kept 90 days" in out
    assert ADMIN not in out + res.stderr and CLIENT not in out + res.stderr
    assert "no admin key" not in out
    keys_file(tmp_path, [{"name": "only", "key": CLIENT}], name="clients.json")
    e["CLAUDE_PROXY_KEYS_FILE"] = str(tmp_path / "clients.json")
    res = subprocess.run([sys.executable, str(PROXY), "--check"], env=e, capture_output=True,
                         text=True, timeout=120)
    assert "note: no admin key: /metrics and /dashboard/data answer 403" in res.stdout
    keys_file(tmp_path, [{"name": "x", "key": CLIENT, "budgets": {"tokens_day": -1}}],
              name="bad.json")
    e["CLAUDE_PROXY_KEYS_FILE"] = str(tmp_path / "bad.json")
    res = subprocess.run([sys.executable, str(PROXY), "--check"], env=e, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "CLAUDE_PROXY_KEYS_FILE" in res.stderr and "budget tokens_day must be a whole number" \
        in res.stderr, res.stderr
