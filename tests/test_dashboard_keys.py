"""The status page's keys, budgets, usage history and value estimate (issue 24), and its layout:
in headless Chromium at a narrow and a wide viewport, nothing in a card spills out of it and no
two cards overlap (at 1400 px the capacity card's idle-process table once covered the logins
card's badge).  Skipped without Chromium, as tests/test_dashboard.py's browser tests are."""
import json
import re
import sys
import time

import pytest

from conftest import ROOT
from conftest import wait_for
from test_dashboard import DevTools
from test_keys import ADMIN, CLIENT, OTHER, bearer, chat, standard

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import claude_openai_proxy as cop  # noqa: E402

#: every element of every card that is not inside a scrolling or clipping box of the card, and
#: is outside the card's box; then every pair of cards whose boxes overlap
LAYOUT_JS = r"""
(function () {
  var cards = [].slice.call(document.querySelectorAll(".card")).filter(function (c) {
    var r = c.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  var spills = [], overlaps = [];
  function name(e) {
    return e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") +
      (e.className && e.className.baseVal === undefined ? "." + e.className : "") +
      " '" + (e.textContent || "").trim().slice(0, 30) + "'";
  }
  function clipped(e, card) {
    for (var a = e.parentElement; a && a !== card; a = a.parentElement)
      if (/auto|scroll|hidden/.test(getComputedStyle(a).overflowX)) return true;
    return false;
  }
  cards.forEach(function (card) {
    var r = card.getBoundingClientRect();
    card.querySelectorAll("*").forEach(function (e) {
      var q = e.getBoundingClientRect();
      if ((!q.width && !q.height) || clipped(e, card)) return;
      if (q.left < r.left - 1 || q.right > r.right + 1 || q.top < r.top - 1 ||
          q.bottom > r.bottom + 1)
        spills.push(name(card) + " <- " + name(e) + " [" + Math.round(q.left) + "," +
                    Math.round(q.right) + "] in [" + Math.round(r.left) + "," +
                    Math.round(r.right) + "]");
    });
  });
  for (var i = 0; i < cards.length; i++)
    for (var j = i + 1; j < cards.length; j++) {
      if (cards[i].contains(cards[j]) || cards[j].contains(cards[i])) continue;
      var a = cards[i].getBoundingClientRect(), b = cards[j].getBoundingClientRect();
      var w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
      var h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      if (w > 1 && h > 1) overlaps.push(name(cards[i]) + " x " + name(cards[j]));
    }
  return {cards: cards.length, spills: spills, overlaps: overlaps};
})()
"""


@pytest.fixture(scope="module")
def keyed_page(make_proxy, tmp_path_factory):
    """A proxy with three keys (one with budgets and lists), history in its own store, and a
    few requests by each key."""
    tmp = tmp_path_factory.mktemp("dash-keys")
    p = make_proxy(fake=True, CLAUDE_PROXY_KEYS_FILE=standard(tmp, {
        "budgets": {"tokens_day": 40, "requests_per_minute": 30, "concurrent": 2},
        "models": ["sonnet", "haiku"]}), CLAUDE_PROXY_STATE_DIR=tmp / "state",
        CLAUDE_PROXY_POOL_SIZE=0, CLAUDE_PROXY_SESSIONS=0)
    for key, n in ((CLIENT, 3), (OTHER, 2), (ADMIN, 1)):
        for i in range(n):
            assert chat(p, key, headers={"X-Request-Id": "dk-%s-%d" % (key[:5], i)})[0] == 200
    assert chat(p, CLIENT, model="haiku")[0] == 200
    wait_for(lambda: p.request("GET", "/dashboard/data", headers=bearer(ADMIN))[2]
             ["history"]["written"] >= 7, "the history rows")
    return p


def test_data_has_keys_budgets_history_and_the_estimate(keyed_page):
    status, _, d = keyed_page.request("GET", "/dashboard/data", headers=bearer(ADMIN))
    assert status == 200
    keys = {k["name"]: k for k in d["keys"]}
    assert list(keys) == ["ops", "coder", "nightly"]
    coder = keys["coder"]
    assert coder["role"] == "client" and coder["models"] == ["sonnet", "haiku"]
    assert coder["budgets"]["tokens_day"]["limit"] == 40
    assert coder["budgets"]["tokens_day"]["used"] == 20 and coder["budgets"]["tokens_day"]["fill"] == 0.5
    assert coder["budgets"]["tokens_day"]["frees_at"] > time.time() + 86000
    h = d["usage_history"]
    assert h["estimate"]["what"].startswith("an estimate of what the same tokens would have cost")
    by_key = {r["key"]: r for r in h["by_key"]["week"]}
    assert by_key["coder"]["requests"] == 4 and by_key["nightly"]["requests"] == 2
    assert by_key["coder"]["cost_usd"] > 0
    by_model = {r["model"]: r for r in h["by_model"]["day"]}
    assert by_model["haiku"]["requests"] == 1 and by_model["sonnet"]["requests"] == 6
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert [r["day"] for r in h["days"]][-1] == today and len(h["days"]) == 30
    assert h["days"][-1]["requests"] == 7 and h["days"][0]["requests"] == 0
    assert ADMIN not in json.dumps(d) and CLIENT not in json.dumps(d)


def test_page_shows_keys_budgets_history_and_filters_by_key(keyed_page, tmp_path):
    browser = DevTools(tmp_path)
    try:
        for domain in ("Runtime.enable", "Page.enable"):
            browser.call(domain)
        browser.call("Page.navigate", url=keyed_page.url + "/dashboard")
        browser.until("document.body && document.body.dataset.state === 'locked'", "the key form")
        browser.js("document.getElementById('key').value = %s; "
                   "document.getElementById('keyform').requestSubmit(); true" % json.dumps(ADMIN))
        browser.until("document.body.dataset.state === 'ready'", "the page with data")
        assert browser.js("document.body.dataset.errors") == "0"
        text = browser.js("document.getElementById('main').innerText")
        # keys and their budgets: a bar per budget set, its fill and when it frees
        cards = browser.js("[].map.call(document.querySelectorAll('.card[data-key]'), "
                           "function (c) { return c.dataset.key; })")
        assert cards == ["ops", "coder", "nightly"]
        bars = browser.js("[].map.call(document.querySelectorAll('[data-key=coder] [data-budget]'),"
                          " function (b) { return b.dataset.budget + ' ' + b.innerText; })")
        assert [b.split(" ")[0] for b in bars] == ["tokens_day", "requests_per_minute",
                                                   "concurrent"], bars
        assert "20 of 40 tokens" in bars[0] and "50%" in bars[0]
        assert re.search(r"frees in 23h 5\dm", bars[0]), bars[0]
        assert "models: sonnet, haiku" in text and "admin" in text
        # history tables per key and per model with the value estimate, labelled
        assert "API-equivalent value" in text
        assert "estimate of what the same tokens would have cost on Anthropic's API" in text
        rows = browser.js("[].map.call(document.querySelectorAll('#history-keys tr[data-row]'),"
                          " function (r) { return r.innerText.split('\\t').join(' '); })")
        assert rows[0].startswith("coder 4") and rows[1].startswith("nightly 2"), rows
        models = browser.js("[].map.call(document.querySelectorAll('#history-models tr[data-row]'),"
                            " function (r) { return r.dataset.row; })")
        assert models == ["haiku", "sonnet"]
        assert browser.js("document.querySelectorAll('[data-plot=days] rect.barv').length") >= 1
        # the request log, filtered by key
        names = browser.js("[].map.call(document.getElementById('keyfilter').options, "
                           "function (o) { return o.value; })")
        assert names == ["", "ops", "coder", "nightly"]
        browser.js("var s = document.getElementById('keyfilter'); s.value = 'nightly'; "
                   "s.dispatchEvent(new Event('change')); true")
        keys = browser.js("[].map.call(document.querySelectorAll('#requests tbody tr'), "
                          "function (r) { return r.dataset.key; })")
        assert keys == ["nightly", "nightly"]
        assert browser.js("document.getElementById('count').textContent").startswith("2 of ")
    finally:
        browser.close()


@pytest.mark.parametrize("width", [390, 1400])
def test_layout_nothing_spills_out_of_a_card_and_no_cards_overlap(keyed_page, tmp_path, width):
    browser = DevTools(tmp_path)
    try:
        for domain in ("Runtime.enable", "Page.enable"):
            browser.call(domain)
        browser.call("Emulation.setDeviceMetricsOverride", width=width, height=2400,
                     deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=keyed_page.url + "/dashboard")
        browser.until("document.body && document.body.dataset.state === 'locked'", "the key form")
        browser.js("document.getElementById('key').value = %s; "
                   "document.getElementById('keyform').requestSubmit(); true" % json.dumps(ADMIN))
        browser.until("document.body.dataset.state === 'ready'", "the page with data")
        layout = browser.js(LAYOUT_JS)
        assert layout["cards"] >= 10, layout
        assert layout["spills"] == [], "\n".join(layout["spills"][:20])
        assert layout["overlaps"] == [], layout["overlaps"]
        assert browser.js("document.documentElement.scrollWidth <= %d" % width), \
            "the page scrolls sideways"
    finally:
        browser.close()
