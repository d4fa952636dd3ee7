"""What a CLI costs and how much there is (section 3: process_memory, cgroup_memory,
available_memory, size_idle): /proc and /sys files made in a temp dir, so no real limit is
needed; then one proxy on the real CLI under CLAUDE_PROXY_MEMORY=1G."""
import time

import pytest

import claude_openai_proxy as P

GiB, MiB = 2 ** 30, 2 ** 20
V1_NO_LIMIT = "9223372036854771712\n"


def tree(root, files):
    """Write {relative path: text} under root; returns root as a str."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


# -- a CLI's memory -------------------------------------------------------------------------------

SMAPS_ROLLUP = """\
5629ce5ee000-7ffeb7c7a000 ---p 00000000 00:00 0                          [rollup]
Rss:              192512 kB
Pss:              131072 kB
Pss_Anon:         112640 kB
Shared_Clean:      81920 kB
Private_Clean:      1024 kB
Private_Dirty:    112640 kB
Anonymous:        112640 kB
Swap:                  0 kB
"""


def test_smaps_rollup_gives_rss_pss_and_anonymous_as_private(tmp_path):
    root = tree(tmp_path, {"proc/42/smaps_rollup": SMAPS_ROLLUP,
                           "proc/42/status": "Name:\tclaude\nVmRSS:\t  999 kB\n"})
    assert P.process_memory(42, root) == {"rss": 188 * MiB, "pss": 128 * MiB,
                                          "private": 110 * MiB, "measure": "smaps_rollup"}


def test_without_smaps_rollup_every_figure_is_rss(tmp_path):
    root = tree(tmp_path, {"proc/42/status": "Name:\tclaude\nVmRSS:\t  196608 kB\nVmSwap:\t0 kB\n"})
    assert P.process_memory(42, root) == {"rss": 192 * MiB, "pss": 192 * MiB,
                                          "private": 192 * MiB, "measure": "rss"}


def test_a_process_that_is_gone_has_no_figure(tmp_path):
    assert P.process_memory(42, str(tmp_path)) is None


def test_this_process_is_measured_from_smaps_rollup():
    import os
    m = P.process_memory(os.getpid())
    assert m["measure"] == "smaps_rollup"
    assert 0 < m["private"] <= m["rss"] and 0 < m["pss"] <= m["rss"]


# -- the proxy's own cgroup -----------------------------------------------------------------------

def v2(tmp_path, limits, path="/system.slice/x.service", mount="sys/fs/cgroup"):
    """A cgroup v2 tree: limits = {cgroup path: (memory.max, memory.current, inactive_file)}."""
    files = {"proc/self/cgroup": "0::%s\n" % path, mount + "/cgroup.controllers": "cpu memory\n"}
    for where, (limit, current, inactive) in limits.items():
        d = mount + where.rstrip("/")
        files[d + "/memory.max"] = "%s\n" % limit
        files[d + "/memory.current"] = "%d\n" % current
        files[d + "/memory.stat"] = "anon 1\ninactive_file %d\nactive_file 2\n" % inactive
    return tree(tmp_path, files)


def test_cgroup_v2_limit_of_the_proxys_own_unit(tmp_path):
    root = v2(tmp_path, {"/system.slice/x.service": (GiB, 100 * MiB, 40 * MiB),
                         "/system.slice": ("max", 5 * GiB, 0)})
    room = GiB - 60 * MiB             # page cache that can be reclaimed is not counted as held
    assert P.cgroup_memory(root) == (
        room, "cgroup v2 /system.slice/x.service memory.max 1.0 GiB (0.9 GiB free)")


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path):
    root = v2(tmp_path, {"/system.slice/x.service": (2 * GiB, 100 * MiB, 0),
                         "/system.slice": (512 * MiB, 256 * MiB, 0)})
    assert P.cgroup_memory(root) == (
        256 * MiB, "cgroup v2 /system.slice memory.max 0.5 GiB (0.2 GiB free)")


def test_cgroup_v2_on_the_hybrid_mount(tmp_path):
    root = v2(tmp_path, {"/user.slice": (GiB, 0, 0)}, path="/user.slice",
              mount="sys/fs/cgroup/unified")
    assert P.cgroup_memory(root) == (GiB, "cgroup v2 /user.slice memory.max 1.0 GiB (1.0 GiB free)")


def test_cgroup_v2_without_any_limit(tmp_path):
    root = v2(tmp_path, {"/system.slice/x.service": ("max", 100 * MiB, 0), "/": ("max", 0, 0)})
    assert P.cgroup_memory(root) is None


def v1_files(path, limits):
    files = {"proc/self/cgroup": "9:name=systemd:/\n5:cpu,cpuacct:/\n4:memory:%s\n0::/\n" % path}
    for where, (limit, usage, inactive) in limits.items():
        d = "sys/fs/cgroup/memory" + where.rstrip("/")
        files[d + "/memory.limit_in_bytes"] = limit if isinstance(limit, str) else "%d\n" % limit
        files[d + "/memory.usage_in_bytes"] = "%d\n" % usage
        files[d + "/memory.stat"] = "cache 5\ntotal_inactive_file %d\n" % inactive
    return files


def test_cgroup_v1_walks_up_to_the_limit(tmp_path):
    root = tree(tmp_path, v1_files("/process_api/abc", {
        "/process_api/abc": (V1_NO_LIMIT, 10 * MiB, 0),
        "/process_api": (GiB, 300 * MiB, 100 * MiB),
        "/": (V1_NO_LIMIT, 9 * GiB, 0)}))
    assert P.cgroup_memory(root) == (
        GiB - 200 * MiB, "cgroup v1 /process_api memory.limit_in_bytes 1.0 GiB (0.8 GiB free)")


def test_cgroup_v1_in_a_container_sees_its_own_cgroup_at_the_mount(tmp_path):
    """/proc/self/cgroup names the host's path, which the container's mount does not have."""
    root = tree(tmp_path, v1_files("/docker/0123abcd", {"/": (GiB, 0, 0)}))
    assert P.cgroup_memory(root) == (
        GiB, "cgroup v1 / memory.limit_in_bytes 1.0 GiB (1.0 GiB free)")


def test_no_cgroup_file_no_limit(tmp_path):
    assert P.cgroup_memory(str(tmp_path)) is None


MEMINFO = "MemTotal:       25165824 kB\nMemFree:  1 kB\nMemAvailable:    8388608 kB\n"   # 8 GiB


def test_available_memory_is_the_least_of_meminfo_and_the_cgroup(tmp_path):
    files = v1_files("/x", {"/x": (GiB, 0, 0)})
    files["proc/meminfo"] = MEMINFO
    root = tree(tmp_path, files)
    assert P.available_memory(root) == (GiB, "cgroup v1 /x memory.limit_in_bytes 1.0 GiB (1.0 GiB free)")
    (tmp_path / "sys/fs/cgroup/memory/x/memory.limit_in_bytes").write_text(V1_NO_LIMIT)
    assert P.available_memory(root) == (8 * GiB, "MemAvailable 8.0 GiB")
    (tmp_path / "proc/meminfo").unlink()
    assert P.available_memory(root) == (None, "")


def test_the_operator_override_wins(tmp_path):
    files = v1_files("/x", {"/x": (4 * GiB, 0, 0)})
    files["proc/meminfo"] = MEMINFO
    root = tree(tmp_path, files)
    assert P.available_memory(root, override=GiB) == (GiB, "CLAUDE_PROXY_MEMORY 1.0 GiB")


@pytest.mark.parametrize("text, want", [
    ("1G", GiB), ("1g", GiB), ("512M", 512 * MiB), ("1.5GiB", 3 * GiB // 2), ("2048K", 2 * MiB),
    ("1073741824", GiB), ("1 GB", GiB)])
def test_sizes_the_override_accepts(text, want):
    assert P.parse_size(text) == want
    cfg = P.load_config([], {"CLAUDE_PROXY_MEMORY": text})[0]
    assert cfg.memory == want and cfg.memory_source[0] == want
    assert P.load_config(["--memory", text], {})[0].memory == want


@pytest.mark.parametrize("text", ["lots", "1X", "-1G", "G"])
def test_a_bad_override_is_refused_at_start_up(text):
    with pytest.raises(SystemExit) as exc:
        P.load_config([], {"CLAUDE_PROXY_MEMORY": text})
    assert str(exc.value) == "error: CLAUDE_PROXY_MEMORY must be a size such as 1G or 512M, " \
        "got %r" % text


# -- the sizes chosen -----------------------------------------------------------------------------

@pytest.mark.parametrize("gib, slots, want", [
    (0.3, 2, (0, 2, 2)),      # nothing beyond the slots: their processes still wait for reuse
    (0.5, 2, (1, 2, 3)),
    (0.7, 2, (2, 2, 4)),      # a 1 GB VPS (~0.7 GB available)
    (1.0, 2, (2, 4, 6)),      # a 1 GiB cgroup or CLAUDE_PROXY_MEMORY=1G
    (1.4, 2, (2, 6, 8)),
    (2.0, 2, (2, 8, 10)),     # never more than EXTRA_MAX (8) beyond the slots ...
    (24, 2, (2, 8, 10)),
    (24, 8, (2, 14, 16)),     # ... each running CLI can come back idle
    (0.3, 1, (0, 1, 1)),
])
def test_sizes_follow_available_memory(gib, slots, want):
    cfg = P.size_idle(P.Config(max_concurrency=slots), (int(gib * GiB), "MemAvailable %.1f GiB" % gib))
    assert (cfg.pool_size, cfg.sessions, cfg.idle_max) == want
    assert cfg.sizing == "pool_size, sessions, idle_max from MemAvailable %.1f GiB, 130 MB a CLI " \
        "(default), %d running" % (gib, slots)
    # the slots are the operator's; beyond them, what is held fits in 80 % of the memory
    assert (cfg.idle_max - slots) * P.CLI_MEMORY <= max(0, 0.8 * gib * GiB - slots * P.CLI_MEMORY)


def test_the_budget_never_falls_below_the_slots():
    """Reuse never needs extra memory: on any machine, as many idle processes as slots."""
    for mib in (0, 64, 256, 700, 1024):
        for slots in (1, 2, 4):
            cfg = P.size_idle(P.Config(max_concurrency=slots), (mib * MiB, "MemAvailable"))
            assert cfg.idle_max >= slots and cfg.sessions == cfg.idle_max - cfg.pool_size


def test_a_measured_figure_sizes_instead_of_the_default():
    cfg = P.size_idle(P.Config(), (GiB, "CLAUDE_PROXY_MEMORY 1.0 GiB"), cli_memory=250 * MiB)
    assert (cfg.pool_size, cfg.sessions, cfg.idle_max) == (1, 2, 3)     # (819 - 500) // 250 = 1
    assert cfg.sizing == "pool_size, sessions, idle_max from CLAUDE_PROXY_MEMORY 1.0 GiB, 250 MB " \
        "a CLI (measured), 2 running"


def test_sizes_are_chosen_again_from_the_largest_cli_that_served():
    """CLIs grow as they serve: the figure is the biggest that served, not their average (a
    budget at the average was exceeded by the ones above it), and a pre-started one that has
    served nothing holds less and does not count."""
    import threading
    import types

    class CLI:
        def __init__(self, mb, served):
            self.memory, self.served = {"private": mb * MiB}, served

        def measure(self):
            return self.memory
    resized = []
    backend = P.Backend.__new__(P.Backend)        # no threads, no processes: the rule alone
    backend.cfg = P.size_idle(P.Config(), (GiB, "CLAUDE_PROXY_MEMORY 1.0 GiB"))
    backend.lock = threading.Lock()
    backend.live = {CLI(100, 3), CLI(160, 40), CLI(90, 0)}
    backend.idle = types.SimpleNamespace(resize=lambda cfg, per: resized.append((cfg, per)))
    backend.measured(next(iter(backend.live)))
    ((cfg, per),) = resized
    assert per == 160 * MiB and cfg.sizing.endswith("160 MB a CLI (measured), 2 running")
    assert (cfg.pool_size, cfg.sessions, cfg.idle_max) == (2, 3, 5)    # (819 - 320) // 160 = 3


def test_memory_unknown():
    cfg = P.size_idle(P.Config(), (None, ""))
    assert (cfg.pool_size, cfg.sessions, cfg.idle_max) == (2, 2, 4)
    assert cfg.sizing == "pool_size, sessions, idle_max from defaults (memory unknown)"


def test_operator_sizes_win():
    cfg = P.size_idle(P.Config(pool_size=5, sessions=0, idle_max=7), (GiB // 2, "MemAvailable 0.5 GiB"))
    assert (cfg.pool_size, cfg.sessions, cfg.idle_max) == (5, 0, 7)
    assert cfg.sizing == "set by the operator (memory: MemAvailable 0.5 GiB)" and cfg.sized == ()


# -- through the proxy, real CLI ------------------------------------------------------------------

from test_pool import health, poll  # noqa: E402


def test_a_1g_proxy_reuses_and_reports_measured_memory(make_proxy, upstream):
    # no pool: what is held idle is exactly the process that answered (the pre-starter would
    # start and end others meanwhile)
    p = make_proxy(CLAUDE_PROXY_MEMORY="1G", CLAUDE_PROXY_POOL_SIZE=0)
    assert "pool 0, sessions 6, budget 6, sessions, idle_max from CLAUDE_PROXY_MEMORY " \
        "1.0 GiB, 130 MB a CLI (default), 2 running)" in p.log
    ids = []
    for i in range(3):
        ids.append("vps-mem-%d" % i)
        status, _, _ = p.post("/v1/chat/completions", {"model": "sonnet", "messages": [
            {"role": "user", "content": "question %d" % i}]}, headers={"X-Request-Id": ids[-1]})
        assert status == 200
        # kept for its next turn (a first message without a signal), or for another request
        poll(lambda: (lambda h: h["idle"]["idle"]["kept"] == 1 and
                      h["concurrency"]["running"] == 0)(health(p)), "the process to come back")
    status, _, data = p.request("GET", "/dashboard/data")
    served = {r["id"]: r["served_by"] for r in data["requests"]}
    assert [served[i] for i in ids] == ["spawned", "reused", "reused"]
    h = health(p)
    idle, memory = h["idle"], h["memory"]
    assert idle["cli_figure"] == "measured"
    # the first message's process waits for its next turn or another one-shot request: ready
    assert idle["idle"]["kept"] == 1 and idle["ready"] == 1
    assert idle["sized"] == "sessions, idle_max from CLAUDE_PROXY_MEMORY 1.0 GiB, " \
        "%d MB a CLI (measured), 2 running" % idle["cli_mb"]
    # re-sized from the measured figure (~100 MB: more fit than at the default 130)
    assert idle["sessions"] == idle["budget"] >= 6 and h["cli_processes_started"] == 1
    assert memory["from"] == "CLAUDE_PROXY_MEMORY 1.0 GiB" and memory["available_mb"] == 1024.0
    assert memory["measure"] == "smaps_rollup"
    assert [c["state"] for c in memory["clis"]] == ["kept"]
    for c in memory["clis"] + [memory["proxy"]]:
        assert 0 < c["private_mb"] <= c["rss_mb"] and 0 < c["pss_mb"] <= c["rss_mb"]
    (cli,) = memory["clis"]
    assert cli["private_mb"] > 50             # a CLI that answered holds ~100 MB of its own
    parts = memory["proxy"]["pss_mb"] + cli["pss_mb"]
    assert abs(memory["total_mb"] - parts) <= 0.1 + 1e-9      # each figure rounded to 0.1


def test_check_says_what_memory_applied_and_measures_a_cli(home, upstream):
    import re
    from conftest import base_env, real_claude_bin
    from test_operations import run_check
    env = base_env(home, upstream.url, real_claude_bin(), CLAUDE_PROXY_MEMORY="1G")
    rc, out = run_check(env)
    assert rc == 0, out
    assert re.search(r"^  CLAUDE_PROXY_MEMORY\s+1\.0 GiB$", out, re.M), out
    assert "idle CLI sizes: pool 2, sessions 4, budget 6 (pool_size, sessions, idle_max from " \
        "CLAUDE_PROXY_MEMORY 1.0 GiB, 130 MB a CLI (default), 2 running)" in out
    m = re.search(r"^a CLI measured (\d+) MB private memory after one request; idle CLI sizes "
                  r"now: pool 2, sessions (\d+), budget (\d+) \(pool_size, sessions, idle_max from "
                  r"CLAUDE_PROXY_MEMORY 1\.0 GiB, (\d+) MB a CLI \(measured\), 2 running\)$", out, re.M)
    assert m and m.group(1) == m.group(4) and 50 <= int(m.group(1)) <= 300, out
    assert int(m.group(2)) == int(m.group(3)) - 2     # the pool's 2, the rest for sessions


def test_running_and_idle_processes_stay_within_the_budget(make_proxy, upstream):
    """A request that starts a process first ends the least recently used idle one when the
    running and idle ones together fill the budget: never more CLIs than it."""
    import threading
    import fake_upstream
    from test_pool import children
    p = make_proxy(CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0, CLAUDE_PROXY_IDLE_MAX=2,
                   CLAUDE_PROXY_MAX_CONCURRENCY=2)
    for system in ("Prompt A.", "Prompt B."):
        status, _, _ = p.post("/v1/chat/completions", {"model": "sonnet", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": "Hi."}]})
        assert status == 200
    poll(lambda: health(p)["idle"]["idle"]["reused"] == 2, "two reused idle processes")
    upstream.push(*[fake_upstream.text("slow " * 20, chunks=20, delay=0.1)] * 2)
    statuses, most, done = [], [0], threading.Event()

    def ask():
        statuses.append(p.post("/v1/chat/completions", {"model": "sonnet", "messages": [
            {"role": "system", "content": "Prompt C."}, {"role": "user", "content": "Hi."}]})[0])
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        most[0] = max(most[0], len(children(p)))
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert statuses == [200, 200] and most[0] <= 2
    h = health(p)
    assert h["idle"]["evicted"] == 2 and h["idle"]["misses"] == 4 and h["cli_processes_started"] == 4


def test_on_a_1g_figure_with_big_clis_the_slots_still_reuse():
    """CLIs measured at 450 MB leave nothing beyond the 2 slots in 1 GiB: no pool, but the
    processes of the slots wait for reuse and keep their first messages."""
    cfg = P.size_idle(P.Config(), (GiB, "CLAUDE_PROXY_MEMORY 1.0 GiB"), cli_memory=450 * MiB)
    assert (cfg.pool_size, cfg.sessions, cfg.idle_max) == (0, 2, 2)
