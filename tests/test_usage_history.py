"""Usage history (issue 24, section 12 usage history): per-request figures in the state store,
hourly and daily rollups, GET /v1/usage?since=&until=&group_by=&format=, the API-equivalent
value estimate, budgets that count after a restart, and history that never costs a request
(a SIGKILL mid-write, a store that cannot open, a file locked by someone else).

The real CLI serves the end-to-end budget and history test; the rest runs on
tests/fake_claude.py (3 input and 2 output tokens a request)."""
import json
import os
import random
import signal
import socket
import sqlite3
import sys
import threading
import time

import pytest

from conftest import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import claude_openai_proxy as cop  # noqa: E402

from conftest import wait_for  # noqa: E402
from harness import recv_until  # noqa: E402
from test_keys import ADMIN, CLIENT, OTHER, bearer, chat, standard  # noqa: E402

CHAT = "/v1/chat/completions"


def start(make_proxy, keys, state, fake=True, **env):
    return make_proxy(fake=fake, CLAUDE_PROXY_KEYS_FILE=keys, CLAUDE_PROXY_STATE_DIR=state,
                      CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0, **env)


def usage(p, as_key=ADMIN, **query):
    path = "/v1/usage?" + "&".join("%s=%s" % kv for kv in query.items())
    return p.request("GET", path, headers=bearer(as_key))


def written(p):
    """claude_proxy_history_rows_total {written, lost} from /metrics."""
    _, _, text = p.request("GET", "/metrics", headers=bearer(ADMIN))
    out = {}
    for line in text.splitlines():
        if line.startswith("claude_proxy_history_rows_total{"):
            out[line.split('"')[1]] = int(line.rsplit(" ", 1)[1])
    return out


def wait_written(p, n):
    return wait_for(lambda: written(p).get("written", 0) >= n, "%d history rows" % n)


# The query over rollups and rows ###############################################################

def history_at(tmp_path, days=90):
    store = cop.StateStore(cop.Config(state_dir=str(tmp_path)))
    return cop.UsageHistory(store, days, dict(cop.PRICES))


def test_query_over_days_hours_and_rows_equals_the_rows_themselves(tmp_path):
    """Random rows over four days; for random windows, what the rollups answer is what
    summing the raw rows gives, by every grouping."""
    h = history_at(tmp_path)
    rnd = random.Random(7)
    base = 1_796_000_000.0
    rows = []
    for _ in range(3000):
        t = base + rnd.uniform(0, 4 * 86400)
        rows.append((t, rnd.choice(["a", "b", "c"]), rnd.choice(["home", "work"]),
                     rnd.choice(["sonnet", "claude-opus-4-8", "haiku"]), CHAT,
                     rnd.choice([200, 200, 200, 429, 502]), rnd.randint(0, 900),
                     rnd.randint(0, 300), rnd.randint(0, 5000), rnd.randint(0, 200), 120.0,
                     900.0, "spawned"))
    for r in rows:
        h.add(r)
    h.flush()
    assert h.report()["written"] == 3000 and h.lost == 0
    for _ in range(25):
        a, b = sorted(base + rnd.uniform(-3600, 4 * 86400 + 3600) for _ in range(2))
        for group in cop.GROUPS:
            got = {r[group]: r for r in h.query(a, b, group)}
            want = {}
            for r in rows:
                if a <= r[0] < b:
                    g = {"key": r[1], "login": r[2], "model": r[3],
                         "day": time.strftime("%Y-%m-%d", time.gmtime(r[0]))}[group]
                    w = want.setdefault(g, [0, 0, 0, 0, 0, 0])
                    for i, v in enumerate((1, int(r[5] >= 400)) + r[6:10]):
                        w[i] += v
            assert {g: [r["requests"], r["errors"], r["input"], r["output"], r["cache_read"],
                        r["cache_write"]] for g, r in got.items()} == want, (a, b, group)
    one = h.query(base, base + 5 * 86400, "key", key="a")
    assert [r["key"] for r in one] == ["a"]
    h.close()


def test_value_estimate_uses_the_price_of_each_model(tmp_path):
    h = history_at(tmp_path)
    t = 1_796_000_000.0
    h.add((t, "a", "home", "claude-opus-4-8", CHAT, 200, 1_000_000, 100_000, 2_000_000, 10_000,
           None, 1.0, ""))
    h.add((t, "a", "home", "sonnet", CHAT, 200, 1_000_000, 0, 0, 0, None, 1.0, ""))
    h.add((t, "b", "home", "mystery-model", CHAT, 200, 5, 5, 0, 0, None, 1.0, ""))
    h.flush()
    by_model = {r["model"]: r for r in h.query(t - 1, t + 1, "model")}
    # opus 4.8: $5 in, $6.25 cache write, $0.50 cache read, $25 out per million
    assert by_model["claude-opus-4-8"]["cost_usd"] == round(5 + 0.0625 + 1.0 + 2.5, 6)
    assert by_model["sonnet"]["cost_usd"] == 2.0          # the alias: the newest Sonnet
    assert by_model["mystery-model"]["cost_usd"] == 0
    assert by_model["mystery-model"]["unpriced_models"] == ["mystery-model"]
    by_key = {r["key"]: r for r in h.query(t - 1, t + 1, "key")}
    assert by_key["a"]["cost_usd"] == round(5 + 0.0625 + 1.0 + 2.5 + 2.0, 6)
    h.close()


def test_price_lookup_and_the_operators_price_file(tmp_path):
    assert cop.price_of(cop.PRICES, "claude-opus-4-8-20261001") == cop.PRICES["claude-opus-4-8"]
    assert cop.price_of(cop.PRICES, "claude-opus-4-1") == cop.PRICES["claude-opus-4"]
    assert cop.price_of(cop.PRICES, "claude-sonnet-5-5") == cop.PRICES["claude-sonnet-5-5"]
    assert cop.price_of(cop.PRICES, "claude-sonnet-9-9") == cop.PRICES["sonnet"]
    assert cop.price_of(cop.PRICES, "gpt-4o") is None
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"source": "my contract", "sonnet": {"input": 1, "output": 2},
                                "claude-new-1": {"input": 3, "output": 4, "cache_read": 0}}))
    prices = cop.load_prices(str(path))
    assert prices["sonnet"] == (1.0, 1.25, 0.1, 2.0)
    assert prices["claude-new-1"] == (3.0, 3.75, 0.0, 4.0)
    assert prices["haiku"] == cop.PRICES["haiku"], "entries not in the file stay"
    path.write_text(json.dumps({"sonnet": {"input": "cheap"}}))
    with pytest.raises(ValueError, match="USD per million tokens"):
        cop.load_prices(str(path))


def test_retention_drops_rows_and_rollups_past_the_days_kept(tmp_path):
    h = history_at(tmp_path, days=2)
    now = time.time()
    for age in (0.5, 1.5, 3, 10):
        h.add((now - age * 86400, "a", "home", "sonnet", CHAT, 200, 1, 1, 0, 0, None, 1.0, ""))
    h.flush()
    h.sweep(now)
    rows = h.query(now - 30 * 86400, now + 1, "day")
    assert sum(r["requests"] for r in rows) == 2
    assert h.store.read("SELECT COUNT(*) FROM usage_requests")[0][0] == 2
    h.close()


# Over HTTP ######################################################################################

def test_usage_groups_csv_and_who_sees_what(make_proxy, tmp_path):
    p = start(make_proxy, standard(tmp_path), tmp_path / "state")
    for key, n in ((CLIENT, 3), (OTHER, 2)):
        for _ in range(n):
            assert chat(p, key)[0] == 200
    assert chat(p, CLIENT, model="haiku")[0] == 200
    wait_written(p, 6)
    status, _, got = usage(p, group_by="key")
    assert status == 200, got
    assert [(r["key"], r["requests"], r["input"], r["output"]) for r in got["rows"]] == [
        ("coder", 4, 12, 8), ("nightly", 2, 6, 4)]
    assert got["estimate"]["what"].startswith("an estimate of what the same tokens would have cost")
    assert got["estimate"]["prices_source"] == cop.PRICES_SOURCE
    _, _, got = usage(p, group_by="model")
    assert {r["model"]: r["requests"] for r in got["rows"]} == {"haiku": 1, "sonnet": 5}
    _, _, got = usage(p, group_by="login")
    assert [(r["login"], r["requests"]) for r in got["rows"]] == [("default", 6)]
    _, _, got = usage(p, group_by="day")
    assert [r["day"] for r in got["rows"]] == [time.strftime("%Y-%m-%d", time.gmtime())]
    assert got["total"]["requests"] == 6
    # a client: its own rows only, whatever it asks
    # without a query: the client's own use over the last day and week, with its value
    _, _, own = p.request("GET", "/v1/usage", headers=bearer(CLIENT))
    assert own["key"]["usage"]["day"]["requests"] == 4
    assert own["key"]["usage"]["week"]["input"] == 12 and own["key"]["usage"]["week"]["cost_usd"] > 0
    assert "nightly" not in json.dumps(own) and "accounts" not in own
    _, _, everyone = p.request("GET", "/v1/usage", headers=bearer(ADMIN))
    assert {k["name"]: k["usage"].get("week", {}).get("requests") for k in everyone["keys"]} == {
        "ops": None, "coder": 4, "nightly": 2}
    _, _, mine = usage(p, CLIENT, group_by="key")
    assert [r["key"] for r in mine["rows"]] == ["coder"] and mine["key"] == "coder"
    status, _, err = usage(p, CLIENT, group_by="key", key="nightly")
    assert status == 403 and "its own usage only" in err["error"]["message"]
    # the admin can narrow to one key
    _, _, one = usage(p, group_by="model", key="nightly")
    assert [(r["model"], r["requests"]) for r in one["rows"]] == [("sonnet", 2)]
    # CSV
    status, hdrs, text = usage(p, group_by="key", format="csv")
    assert status == 200 and hdrs["Content-Type"] == "text/csv; charset=utf-8"
    lines = text.strip().split("\n")
    assert lines[0] == ("key,requests,errors,input,output,cache_read,cache_write,"
                        "api_equivalent_usd_estimate")
    assert lines[1].startswith("coder,4,0,12,8,0,0,") and lines[2].startswith("nightly,2,0,6,4,")
    # a window that holds nothing, dates as well as Unix seconds
    _, _, none = usage(p, group_by="day", since="2020-01-01", until="2020-02-01")
    assert none["rows"] == [] and none["since"] == 1577836800.0
    for bad, says in (({"group_by": "week"}, "group_by must be"), ({"format": "xml"}, "format"),
                      ({"since": "yesterday"}, "since must be"), ({"colour": "red"}, "colour"),
                      ({"since": "2026-02-01", "until": "2026-01-01"}, "before until")):
        status, _, err = usage(p, **bad)
        assert status == 400 and says in err["error"]["message"], (bad, err)
    p.stop()


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e400", "1e300", "-1",
                                   "1969-12-31", "253402300800"])
def test_a_time_out_of_range_is_a_400_naming_the_parameter(value):
    """float() takes nan, inf, 1e400 and 1e300; int() or SQLite then failed: a 500."""
    with pytest.raises(cop.BadRequest) as err:
        cop.when(value, "since")
    assert err.value.status == 400 and err.value.param == "since"
    assert str(err.value).startswith("since must be Unix seconds (0 to 253402300799)"), err.value
    assert cop.when("253402300799", "until") == 253402300799.0
    assert cop.when("0", "since") == 0.0


def test_usage_with_a_time_out_of_range_answers_400_not_500(make_proxy, tmp_path):
    p = start(make_proxy, standard(tmp_path), tmp_path / "state")
    for param, query in (("since", {"since": "nan"}), ("since", {"since": "1e400"}),
                         ("until", {"until": "inf"}), ("since", {"since": "-1e300"}),
                         ("until", {"since": "0", "until": "1e300"})):
        status, _, err = usage(p, group_by="key", **query)
        assert status == 400 and err["error"]["param"] == param, (query, err)
        assert err["error"]["message"].startswith("%s must be Unix seconds" % param), err
    assert usage(p, group_by="key", since="0")[0] == 200
    assert "Traceback" not in p.log and "internal error" not in p.log
    p.stop()


def test_a_request_that_ends_before_done_counts_its_input_in_budgets_and_history(
        make_proxy, tmp_path):
    """The fake CLI's message_start says 3 input and 1 output tokens; [[crash]] dies after two
    deltas (an upstream error mid-stream), [[slow:200]] is hung up on by the client.  Neither
    has a Done, and both used to count 0 tokens: a client with a short timeout never ran out."""
    budget = {"budgets": {"tokens_day": 4}}
    p = start(make_proxy, standard(tmp_path, budget, budget), tmp_path / "state")

    def row(name):
        rows = usage(p, group_by="key")[2]["rows"]
        return next(((r["input"], r["output"]) for r in rows if r["key"] == name), None)

    status, _, text = chat(p, CLIENT, "[[crash]]", stream=True)
    assert status == 200 and "partial " in text and "error" in text, text
    assert wait_for(lambda: row("coder"), "the crashed request's row") == (3, 1)
    status, _, err = chat(p, CLIENT)
    assert status == 429 and "tokens_day=4 (4 tokens used" in err["error"]["message"], err
    # the client hangs up after the first delta
    body = json.dumps({"model": "sonnet", "stream": True, "messages": [
        {"role": "user", "content": "[[slow:200]]"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=30)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (CHAT.encode(), OTHER.encode(), len(body), body))
    got = recv_until(sock, b"tick0")
    assert got.startswith(b"HTTP/1.1 200 "), got
    sock.close()
    assert wait_for(lambda: row("nightly"), "the abandoned request's row") == (3, 1)
    status, _, err = chat(p, OTHER)
    assert status == 429 and "tokens_day=4 (4 tokens used" in err["error"]["message"], err
    p.stop()


def test_history_and_budgets_survive_a_restart(make_proxy, tmp_path):
    keys = standard(tmp_path, {"budgets": {"tokens_week": 12}})
    p = start(make_proxy, keys, tmp_path / "state")
    assert chat(p, CLIENT)[0] == 200 and chat(p, CLIENT)[0] == 200     # 10 budget tokens
    wait_written(p, 2)
    p.stop()
    q = start(make_proxy, keys, tmp_path / "state")
    _, _, got = usage(q, group_by="key")
    assert [(r["key"], r["requests"]) for r in got["rows"]] == [("coder", 2)]
    _, _, mine = q.request("GET", "/v1/usage", headers=bearer(CLIENT))
    assert mine["key"]["budgets"]["tokens_week"]["used"] == 10, "read back from the store"
    assert chat(q, CLIENT)[0] == 200                                    # 15 now: over
    status, _, err = chat(q, CLIENT)
    assert status == 429 and "tokens_week=12 (15 tokens" in err["error"]["message"]
    q.stop()


def test_a_background_response_is_counted_once_with_its_tokens(make_proxy, tmp_path):
    """The run records its usage when it ends (the creating POST records no model use): one
    history row with the run's tokens, which the key's budget still counts after a restart."""
    keys = standard(tmp_path, {"budgets": {"tokens_week": 12}})
    p = start(make_proxy, keys, tmp_path / "state")
    status, _, r = p.post("/v1/responses", {"model": "sonnet", "input": "hi", "background": True},
                          headers=bearer(CLIENT))
    assert status == 200 and r["status"] == "queued"
    wait_for(lambda: p.request("GET", "/v1/responses/" + r["id"], headers=bearer(CLIENT))[2]
             ["status"] == "completed", "the run to complete")
    wait_written(p, 1)
    db = sqlite3.connect(str(tmp_path / "state" / "claude-proxy.db"))
    rows = db.execute("SELECT key, route, status, input, output FROM usage_requests").fetchall()
    db.close()
    assert rows == [("coder", "/v1/responses", 200, 3, 2)]
    p.stop()
    q = start(make_proxy, keys, tmp_path / "state")
    _, _, mine = q.request("GET", "/v1/usage", headers=bearer(CLIENT))
    assert mine["key"]["budgets"]["tokens_week"]["used"] == 5, "read back from the store"
    q.stop()


def test_sigkill_mid_write_leaves_every_row_whole(make_proxy, tmp_path):
    keys, state = standard(tmp_path), tmp_path / "state"
    p = start(make_proxy, keys, state, CLAUDE_PROXY_MAX_CONCURRENCY=4)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                chat(p, random.choice([CLIENT, OTHER]), timeout=10)
            except OSError:
                return
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    wait_written(p, 20)
    p.proc.send_signal(signal.SIGKILL)          # mid-traffic: rows are queued and being written
    p.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(20)
    db = sqlite3.connect(str(state / "claude-proxy.db"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT CAST(t / 3600 AS INTEGER), key, COUNT(*), SUM(input) "
                      "FROM usage_requests GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    hourly = db.execute("SELECT hour, key, SUM(requests), SUM(input) FROM usage_hourly "
                        "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    daily = db.execute("SELECT SUM(requests) FROM usage_daily").fetchone()[0]
    db.close()
    assert rows and rows == hourly, "each batch: its rows and rollups together or not at all"
    assert daily == sum(r[2] for r in rows)
    q = start(make_proxy, keys, state)
    status, _, got = usage(q, group_by="key")
    assert status == 200 and got["total"]["requests"] == daily
    assert chat(q, CLIENT)[0] == 200
    q.stop()


def test_a_store_that_cannot_open_leaves_requests_working(make_proxy, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    p = start(make_proxy, standard(tmp_path), blocker / "state")
    for _ in range(3):
        assert chat(p, CLIENT)[0] == 200
    wait_for(lambda: written(p).get("lost", 0) >= 3, "the lost rows counted")
    assert written(p)["written"] == 0
    status, _, err = usage(p, group_by="day")
    assert status == 503 and "Usage history is unavailable" in err["error"]["message"]
    assert "cannot be opened" in err["error"]["message"]
    _, _, data = p.request("GET", "/dashboard/data", headers=bearer(ADMIN))
    assert data["history"]["lost"] >= 3 and data["history"]["error"]
    p.stop()


def test_a_locked_store_loses_rows_not_requests(make_proxy, tmp_path):
    state = tmp_path / "state"
    # each batch of rows waits out the busy timeout, then is lost: half a second here, not 10
    p = start(make_proxy, standard(tmp_path), state, CLAUDE_PROXY_STORE_BUSY_TIMEOUT=0.5)
    assert chat(p, CLIENT)[0] == 200
    wait_written(p, 1)
    db = sqlite3.connect(str(state / "claude-proxy.db"), isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")               # another program holds the file
    try:
        results = [chat(p, CLIENT, timeout=30)[0] for _ in range(3)]
        assert results == [200, 200, 200], "requests do not wait for the history"
        wait_for(lambda: written(p).get("lost", 0) >= 3, "the rows lost to the lock", timeout=60)
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert chat(p, CLIENT)[0] == 200
    wait_written(p, 2)                          # written again once the lock is gone
    _, _, got = usage(p, group_by="key")
    assert got["total"]["requests"] == 2 and got["lost_rows"] == 3
    p.stop()


def test_history_days_zero_keeps_nothing(make_proxy, tmp_path):
    p = start(make_proxy, standard(tmp_path), tmp_path / "state", CLAUDE_PROXY_HISTORY_DAYS=0)
    assert chat(p, CLIENT)[0] == 200
    status, _, err = usage(p, group_by="day")
    assert status == 503 and "CLAUDE_PROXY_HISTORY_DAYS=0" in err["error"]["message"]
    assert written(p) == {"written": 0, "lost": 0}
    p.stop()


# Against the real CLI ###########################################################################

def test_real_cli_budget_and_history(make_proxy, upstream, tmp_path):
    keys = standard(tmp_path, {"budgets": {"tokens_day": 1}})
    p = start(make_proxy, keys, tmp_path / "state", fake=False)
    status, _, first = chat(p, CLIENT, "Say hello.")
    assert status == 200, first
    u = first["usage"]
    status, hdrs, err = chat(p, CLIENT, "Again.")
    assert status == 429 and "tokens_day=1" in err["error"]["message"]
    assert int(hdrs["Retry-After"]) > 86000
    assert chat(p, OTHER, "Hello.")[0] == 200
    wait_written(p, 3)
    _, _, got = usage(p, group_by="key")
    rows = {r["key"]: r for r in got["rows"]}
    assert rows["coder"]["requests"] == 2 and rows["coder"]["errors"] == 1
    assert rows["coder"]["input"] + rows["coder"]["cache_read"] + rows["coder"]["cache_write"] \
        == u["prompt_tokens"]
    assert rows["coder"]["output"] == u["completion_tokens"]
    assert rows["coder"]["cost_usd"] > 0
    p.stop()


def test_a_bad_price_file_refuses_to_start(home, upstream, tmp_path):
    from test_keys import run_proxy
    bad = tmp_path / "prices.json"
    bad.write_text('{"sonnet": {"input": -1, "output": 2}}')
    code, err = run_proxy(home, upstream, {"CLAUDE_PROXY_PRICES": bad})
    assert code != 0 and "Traceback" not in err
    assert "CLAUDE_PROXY_PRICES" in err and "'sonnet' must be" in err, err


def test_a_full_disk_loses_rows_not_requests(home, upstream, tmp_path):
    """The proxy under a file-size limit (prlimit --fsize) just above what a fresh store needs:
    the store opens, then its writes fail as on a full disk (SQLite reports EFBIG as a disk
    I/O error, ENOSPC as "database or disk is full"); requests keep succeeding and the lost
    rows are counted."""
    import shutil
    import harness
    if not shutil.which("prlimit"):
        pytest.skip("no prlimit (util-linux) to limit the proxy's file sizes")
    env = harness.base_env(home, upstream.url, str(harness.FAKE_CLAUDE),
                           CLAUDE_PROXY_KEYS_FILE=standard(tmp_path),
                           CLAUDE_PROXY_STATE_DIR=tmp_path / "state",
                           CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    p = harness.Proxy(env, wrap=lambda argv: ["prlimit", "--fsize=%d" % (96 * 1024), "--"] + argv)
    try:
        status, _, _ = p.request("GET", "/v1/usage?group_by=day", headers=bearer(ADMIN))
        assert status == 200, "the store opened under the limit"
        for i in range(60):
            assert chat(p, CLIENT, "request %d" % i)[0] == 200
            if written(p).get("lost", 0):
                break
            time.sleep(0.1)
        lost = wait_for(lambda: written(p).get("lost", 0), "rows lost to the full disk")
        assert lost >= 1
        assert chat(p, CLIENT)[0] == 200, "requests go on"
        assert "state store write failed: disk I/O error" in p.log
        _, _, data = p.request("GET", "/dashboard/data", headers=bearer(ADMIN))
        assert data["history"]["lost"] >= 1 and "disk I/O error" in data["history"]["error"]
    finally:
        p.stop()
