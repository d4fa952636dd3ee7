"""Kept conversations belong to the key that started them (issue 19): with keys set, another
key sending the same conversation is not served by its process, and one key cannot hold more
than its share of the kept slots.  Real CLI, fake upstream; which process served a turn is seen
through /health (idle kept hits)."""
import functools

import pytest

import fake_upstream

CHAT = "/v1/chat/completions"
KEY_A = "tenant-a-key-0123456789abcdef"
KEY_B = "tenant-b-key-0123456789abcdef"


@pytest.fixture
def start(make_proxy):
    """make_proxy with keys A and B, no pool, and no reuse (a turn not kept ends its process)
    by default; its proxies stop when the test ends."""
    return functools.partial(make_proxy, CLAUDE_PROXY_API_KEYS="%s,%s" % (KEY_A, KEY_B),
                             CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_REUSE=0,
                             CLAUDE_PROXY_IDLE_MAX=8)


def idle(p):
    status, _, body = p.request("GET", "/health", headers={"Authorization": "Bearer " + KEY_A})
    assert status == 200, body
    return body["idle"]


def turn(p, upstream, key, messages, answer):
    """One request of a conversation with `key`; returns the messages with its answer."""
    upstream.push(fake_upstream.text(answer))
    status, _, body = p.post(CHAT, {"model": "sonnet", "messages": messages},
                             headers={"Authorization": "Bearer " + key})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == answer
    return messages + [{"role": "assistant", "content": answer}]


def opening(name):
    """A conversation's first two messages: kept from its second request on."""
    return [{"role": "user", "content": "%s: first question." % name},
            {"role": "assistant", "content": "%s: first answer." % name},
            {"role": "user", "content": "%s: second question." % name}]


def test_another_key_sending_the_same_conversation_gets_another_process(start, upstream):
    p = start(CLAUDE_PROXY_SESSIONS=4)
    shared = turn(p, upstream, KEY_A, opening("shared agent"), "A's answer.")
    assert idle(p)["idle"]["kept"] == 1
    nxt = shared + [{"role": "user", "content": "third question."}]
    turn(p, upstream, KEY_B, nxt, "B's answer.")
    got = idle(p)
    assert got["hits"]["kept"] == 0            # not A's process
    assert got["idle"]["kept"] == 2            # A's, still waiting, and B's own
    turn(p, upstream, KEY_A, nxt, "A's next answer.")
    assert idle(p)["hits"]["kept"] == 1        # A's own conversation: its process


def test_one_key_filling_the_slots_ends_its_own_conversations(start, upstream):
    """Four kept slots: B keeps one conversation, then A keeps five.  A's oldest go, B's stays
    (the least recently used of all, it went first before); A keeps the rest."""
    p = start(CLAUDE_PROXY_SESSIONS=4)
    b = turn(p, upstream, KEY_B, opening("B"), "B's answer.")
    a = [turn(p, upstream, KEY_A, opening("A%d" % i), "A%d's answer." % i) for i in range(5)]
    assert idle(p)["idle"]["kept"] == 4
    turn(p, upstream, KEY_B, b + [{"role": "user", "content": "B again."}], "B's next.")
    assert idle(p)["hits"]["kept"] == 1         # B's conversation was still on its process
    turn(p, upstream, KEY_A, a[4] + [{"role": "user", "content": "A4 again."}], "A4's next.")
    assert idle(p)["hits"]["kept"] == 2         # A's newest too
    turn(p, upstream, KEY_A, a[0] + [{"role": "user", "content": "A0 again."}], "A0's next.")
    assert idle(p)["hits"]["kept"] == 2         # A's oldest was ended for A's newer ones


def test_without_keys_the_least_recently_used_conversation_goes(start, upstream):
    p = start(CLAUDE_PROXY_SESSIONS=2, CLAUDE_PROXY_API_KEYS="")
    first = turn(p, upstream, "", opening("one"), "one's answer.")
    for name in ("two", "three"):
        turn(p, upstream, "", opening(name), name + "'s answer.")
    turn(p, upstream, "", first + [{"role": "user", "content": "again."}], "one's next.")
    assert idle(p)["hits"]["kept"] == 0


def test_the_idle_budget_also_ends_the_biggest_holders_conversation(start, upstream):
    """Room for 3 idle processes (CLAUDE_PROXY_IDLE_MAX) and 4 kept slots: the budget is what
    ends one, and it picks A's oldest as the slots would."""
    p = start(CLAUDE_PROXY_SESSIONS=4, CLAUDE_PROXY_IDLE_MAX=3)
    b = turn(p, upstream, KEY_B, opening("B"), "B's answer.")
    for i in range(3):
        turn(p, upstream, KEY_A, opening("A%d" % i), "A%d's answer." % i)
    got = idle(p)
    assert got["idle"]["kept"] == 3 and got["evicted"] == 1
    turn(p, upstream, KEY_B, b + [{"role": "user", "content": "B again."}], "B's next.")
    assert idle(p)["hits"]["kept"] == 1
