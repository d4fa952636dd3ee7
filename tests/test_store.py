"""Section 12, the state store: one SQLite file, migrated at open, swept by age and size, and a
proxy that still serves when the file cannot be opened."""
import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from conftest import FAKE_CLAUDE, PROXY, ROOT, base_env

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import claude_openai_proxy as cop  # noqa: E402


def store_at(path, **kw):
    return cop.StateStore(cop.Config(state_dir=str(path), **kw))


def add_response(store, id_, created_at, size=100, status="completed"):
    store.write(lambda db: db.execute(
        "INSERT INTO responses (id, owner, created_at, status, input, body, request, bytes) "
        "VALUES (?, '', ?, ?, '[]', '{}', '{}', ?)", (id_, created_at, status, size)))


def ids(store):
    return sorted(r[0] for r in store.read("SELECT id FROM responses"))


def test_open_migrates_and_reopens(tmp_path):
    d = tmp_path / "state" / "nested"
    s = store_at(d)
    assert s.enabled and s.error is None
    assert s.read("PRAGMA user_version") == [(len(cop.MIGRATIONS),)]
    assert s.read("PRAGMA journal_mode") == [("wal",)]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / cop.STORE_FILE).st_mode) == 0o600
    add_response(s, "resp_1", time.time())
    s.close()
    again = store_at(d)                        # reopening runs no migration twice
    assert again.enabled and ids(again) == ["resp_1"]
    again.close()


def test_migrations_run_in_order_from_the_stored_version(tmp_path, monkeypatch):
    s = store_at(tmp_path)
    s.close()
    monkeypatch.setattr(cop, "MIGRATIONS", cop.MIGRATIONS + ["CREATE TABLE later (x INTEGER)"])
    s = store_at(tmp_path)
    assert s.read("PRAGMA user_version") == [(len(cop.MIGRATIONS),)]
    assert s.read("SELECT COUNT(*) FROM later") == [(0,)]
    s.close()


def test_a_failed_migration_leaves_the_previous_schema(tmp_path, monkeypatch, capfd):
    store_at(tmp_path).close()
    monkeypatch.setattr(cop, "MIGRATIONS", cop.MIGRATIONS + [
        "CREATE TABLE half (x INTEGER); INSERT INTO nowhere VALUES (1)"])
    s = store_at(tmp_path)
    assert not s.enabled and "no such table: nowhere" in s.error
    assert "cannot be opened" in capfd.readouterr().err
    db = sqlite3.connect(str(tmp_path / cop.STORE_FILE))
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(cop.MIGRATIONS) - 1
    assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall()
    db.close()


def test_a_newer_schema_is_refused_not_rewritten(tmp_path):
    store_at(tmp_path).close()
    db = sqlite3.connect(str(tmp_path / cop.STORE_FILE))
    db.execute("PRAGMA user_version = 99")
    db.close()
    s = store_at(tmp_path)
    assert not s.enabled and "written by a newer claude-proxy" in s.error
    with pytest.raises(cop.StoreUnavailable) as err:
        s.read("SELECT 1")
    assert err.value.status == 503 and "newer claude-proxy" in err.value.message


def test_unopenable_and_corrupt_files_are_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    s = store_at(blocker / "state")            # a directory cannot be made under a file
    assert not s.enabled and "cannot be opened" in s.error and str(blocker) in s.error
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / cop.STORE_FILE).write_bytes(b"this is not a database" * 200)
    s = store_at(bad)
    assert not s.enabled and "not a database" in s.error


def test_off_makes_no_file(tmp_path):
    s = store_at(tmp_path / "state", store="off")
    assert not s.enabled and "CLAUDE_PROXY_STORE=off" in s.error
    assert not (tmp_path / "state").exists()
    with pytest.raises(cop.StoreUnavailable):
        s.write(lambda db: None)


def test_a_failing_write_is_rolled_back_and_counted(tmp_path):
    s = store_at(tmp_path)

    def half(db):
        db.execute("INSERT INTO responses (id, owner, created_at, status, input, body, request, "
                   "bytes) VALUES ('resp_half', '', 0, 'completed', '[]', '{}', '{}', 1)")
        db.execute("INSERT INTO nowhere VALUES (1)")
    with pytest.raises(cop.StoreUnavailable):
        s.write(half)
    assert ids(s) == [] and s.lost == 1 and s.report()["lost_writes"] == 1
    s.close()


def test_a_write_waits_the_busy_timeout_for_a_lock_then_is_lost(tmp_path):
    """CLAUDE_PROXY_STORE_BUSY_TIMEOUT is SQLite's busy timeout (10 s by default): a write waits
    that long while another program holds the file locked, then fails and is counted lost."""
    default = store_at(tmp_path / "default")
    assert default.read("PRAGMA busy_timeout") == [(10000,)]
    default.close()
    s = store_at(tmp_path, store_busy_timeout=0.2)
    assert s.read("PRAGMA busy_timeout") == [(200,)]
    other = sqlite3.connect(str(tmp_path / cop.STORE_FILE), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(cop.StoreUnavailable, match="database is locked"):
            add_response(s, "resp_locked", time.time())
        assert s.lost == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    add_response(s, "resp_after", time.time())
    assert ids(s) == ["resp_after"]
    s.close()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "3601", "soon"])
def test_a_busy_timeout_out_of_range_is_refused_at_start(value):
    with pytest.raises(SystemExit, match="CLAUDE_PROXY_STORE_BUSY_TIMEOUT must be"):
        cop.load_config([], {"CLAUDE_PROXY_STORE_BUSY_TIMEOUT": value})


def test_retention_removes_what_is_older_than_the_days(tmp_path):
    s = store_at(tmp_path, store_days=2)
    now = time.time()
    add_response(s, "resp_old", now - 3 * 86400)
    add_response(s, "resp_running", now - 3 * 86400, status="in_progress")
    add_response(s, "resp_new", now - 86400)
    s.write(lambda db: db.execute(
        "INSERT INTO conversations VALUES ('conv_old', '', ?, ?, '{}', 10)",
        (now - 9 * 86400, now - 3 * 86400)))
    s.write(lambda db: db.execute(
        "INSERT INTO conversations VALUES ('conv_used', '', ?, ?, '{}', 10)",
        (now - 9 * 86400, now - 60)))
    s.sweep(now)
    assert ids(s) == ["resp_new", "resp_running"]   # a running background turn is not swept
    assert s.read("SELECT id FROM conversations") == [("conv_used",)]
    s.close()


def test_size_cap_removes_the_oldest_first(tmp_path):
    s = store_at(tmp_path, store_max_mb=1)
    now = time.time()
    for i in range(6):
        add_response(s, "resp_%d" % i, now - 100 + i, size=300 * 1024)
    s.sweep(now)
    assert ids(s) == ["resp_3", "resp_4", "resp_5"]
    assert s.size() <= 2 ** 20
    s.close()


def test_conversation_items_count_towards_the_cap_and_go_with_it(tmp_path):
    s = store_at(tmp_path, store_max_mb=1)
    now = time.time()

    def conv(db):
        db.execute("INSERT INTO conversations VALUES ('conv_a', '', ?, ?, '{}', 10)", (now, now - 50))
        db.execute("INSERT INTO conversation_items VALUES ('conv_a', 1, 'msg_1', '{}', ?)",
                   (800 * 1024,))
    s.write(conv)
    add_response(s, "resp_new", now, size=400 * 1024)
    s.sweep(now)
    assert s.read("SELECT COUNT(*) FROM conversation_items") == [(0,)]
    assert ids(s) == ["resp_new"]
    s.close()


def test_a_proxy_whose_store_cannot_open_still_serves(make_proxy, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    p = make_proxy(fake=True, CLAUDE_PROXY_STATE_DIR=blocker / "state", CLAUDE_PROXY_POOL_SIZE=0,
                   CLAUDE_PROXY_SESSIONS=0)
    status, _, body = p.post("/v1/chat/completions", {
        "model": "sonnet", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["choices"][0]["message"]["content"]
    status, _, health = p.request("GET", "/health")
    assert health["store"]["enabled"] is False and str(blocker) in health["store"]["error"]
    assert p.log.count("cannot be opened") == 1
    assert "Traceback" not in p.log


def test_check_names_the_store_and_fails_when_it_cannot_open(home, upstream, tmp_path):
    ok = base_env(home, upstream.url, str(FAKE_CLAUDE), CLAUDE_PROXY_STATE_DIR=tmp_path / "s")
    res = subprocess.run([sys.executable, str(PROXY), "--check"], env=ok, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "State store: %s (open)" % (tmp_path / "s" / cop.STORE_FILE) in res.stdout
    (tmp_path / "f").write_text("x")
    bad = dict(ok, CLAUDE_PROXY_STATE_DIR=str(tmp_path / "f" / "s"))
    res = subprocess.run([sys.executable, str(PROXY), "--check"], env=bad, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "State store: the state store" in res.stdout
    assert "cannot be opened" in res.stdout
