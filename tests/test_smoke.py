"""Harness smoke test: the proxy answers through the real CLI and the fake upstream."""
from conftest import MARKER


def test_chat_completion_reaches_upstream(proxy, upstream):
    upstream.push(upstream.default.__class__(blocks=[{"type": "text", "text": "pong"}]))
    status, _, body = proxy.post("/v1/chat/completions", {
        "model": "sonnet", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "ping"}]})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "pong"
    call = upstream.model_calls[-1]
    assert call["messages"][0] == {"role": "user", "content": [{"type": "text", "text": "ping"}]}
    system_text = " ".join(b["text"] for b in call["system"])
    assert "Be brief." in system_text
    assert MARKER not in str(call)
    assert call["tools"] == []
