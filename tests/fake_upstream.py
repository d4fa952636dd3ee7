"""A scripted fake of the Anthropic Messages API, for the real CLI to talk to.

Tests push replies (`Reply`) onto a queue; each POST /v1/messages takes the next one
(or `default`, or what `responder(body)` returns). Every request is recorded with its
headers and JSON body, so tests can assert what actually reached "Anthropic".
Loopback only, stdlib only.
"""

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """One scripted upstream answer.

    blocks: Anthropic content blocks (text / thinking / tool_use) to return.
    chunks: for text blocks, how many deltas to split each text into (>= 1).
    delay: seconds to sleep between streamed events (slow streams).
    status/error_type/headers: an HTTP error instead of an answer.
    drop_after: close the connection after this many streamed events (a reset).
    stall: seconds to sleep after message_start (a stalled stream).
    id: the message id.  The CLI joins the assistant lines of one message by it, so the steps
    of one CLI turn (tool calls answered inside the turn) need ids of their own, as the real
    API gives.
    """
    blocks: list = field(default_factory=list)
    stop_reason: str = "end_turn"
    usage: dict = field(default_factory=lambda: {"input_tokens": 11, "output_tokens": 7})
    chunks: int = 1
    delay: float = 0.0
    status: int = 200
    error_type: str = ""
    message: str = ""
    headers: dict = field(default_factory=dict)
    drop_after: int = -1
    stall: float = 0.0
    id: str = "msg_fake"


def text(s, **kw):
    return Reply(blocks=[{"type": "text", "text": s}], **kw)


def thinking(thought, answer, **kw):
    return Reply(blocks=[{"type": "thinking", "thinking": thought, "signature": "sig-" + str(len(thought))},
                         {"type": "text", "text": answer}], **kw)


def tool_use(name, input, id="toolu_fake01", before="", **kw):
    blocks = [{"type": "text", "text": before}] if before else []
    blocks.append({"type": "tool_use", "id": id, "name": name, "input": input})
    return Reply(blocks=blocks, stop_reason="tool_use", **kw)


def error(status, error_type, message="scripted failure", headers=None):
    return Reply(status=status, error_type=error_type, message=message, headers=headers or {})


def _split(s, n):
    if n <= 1 or len(s) <= 1:
        return [s]
    size = max(1, -(-len(s) // n))
    return [s[i:i + size] for i in range(0, len(s), size)]


class FakeUpstream:
    def __init__(self):
        self.requests = []          # every request: {"method","path","headers","body"}
        self.replies = deque()
        self.default = text("Hello from the fake upstream.")
        self.responder = None       # optional callable(body) -> Reply, wins over the queue
        self.aborted_streams = 0    # streams whose reader hung up before the end
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _record(self, body):
                with upstream.lock:
                    upstream.requests.append({"method": self.command, "path": self.path,
                                              "headers": dict(self.headers), "body": body})

            def do_HEAD(self):
                self._record(None)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self._record(None)
                self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                self._record(body)
                if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                    return self._json(200, {"input_tokens": 42})
                reply = upstream.next_reply(body)
                if reply.status != 200:
                    return self._json(reply.status, {"type": "error", "error": {
                        "type": reply.error_type, "message": reply.message}}, reply.headers)
                if isinstance(body, dict) and body.get("stream"):
                    return self._stream(body, reply)
                msg = upstream.message(body, reply)
                self._json(200, msg, reply.headers)

            def _json(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body, reply):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                sent = 0
                for name, data in upstream.events(body, reply):
                    if reply.drop_after >= 0 and sent >= reply.drop_after:
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    try:
                        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                        self.wfile.flush()
                    except OSError:
                        with upstream.lock:
                            upstream.aborted_streams += 1
                        return
                    sent += 1
                    if name == "message_start" and reply.stall:
                        time.sleep(reply.stall)
                    elif reply.delay and name == "content_block_delta":
                        time.sleep(reply.delay)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- scripting -------------------------------------------------------------------------
    def push(self, *replies):
        with self.lock:
            self.replies.extend(replies)

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.replies.clear()
            self.responder = None
            self.aborted_streams = 0
            self.default = text("Hello from the fake upstream.")

    def next_reply(self, body):
        if self.responder is not None:
            return self.responder(body)
        with self.lock:
            return self.replies.popleft() if self.replies else self.default

    @property
    def model_calls(self):
        """Recorded POST /v1/messages bodies (the model turns), oldest first."""
        with self.lock:
            return [r["body"] for r in self.requests
                    if r["method"] == "POST" and r["path"].startswith("/v1/messages")
                    and "count_tokens" not in r["path"] and isinstance(r["body"], dict)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- rendering -------------------------------------------------------------------------
    @staticmethod
    def message(body, reply):
        return {"id": reply.id, "type": "message", "role": "assistant",
                "model": body.get("model", "claude-fake") if isinstance(body, dict) else "claude-fake",
                "content": reply.blocks, "stop_reason": reply.stop_reason, "stop_sequence": None,
                "usage": reply.usage}

    @staticmethod
    def events(body, reply):
        usage = dict(reply.usage)
        start_usage = {k: v for k, v in usage.items() if k != "output_tokens"}
        start_usage["output_tokens"] = 1
        yield "message_start", {"type": "message_start", "message": {
            "id": reply.id, "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}}
        for i, block in enumerate(reply.blocks):
            kind = block["type"]
            if kind == "text":
                yield "content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {"type": "text", "text": ""}}
                for piece in _split(block["text"], reply.chunks):
                    yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "text_delta", "text": piece}}
            elif kind == "thinking":
                yield "content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
                for piece in _split(block["thinking"], reply.chunks):
                    yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "thinking_delta", "thinking": piece}}
                yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                              "delta": {"type": "signature_delta", "signature": block["signature"]}}
            elif kind == "tool_use":
                yield "content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}
                for piece in _split(json.dumps(block["input"]), reply.chunks):
                    yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "input_json_delta", "partial_json": piece}}
            yield "content_block_stop", {"type": "content_block_stop", "index": i}
        yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": reply.stop_reason,
                                                                   "stop_sequence": None},
                                "usage": {"output_tokens": usage.get("output_tokens", 0)}}
        yield "message_stop", {"type": "message_stop"}


if __name__ == "__main__":  # manual exploration: python3 tests/fake_upstream.py
    import sys
    up = FakeUpstream()
    print(up.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        up.close()
        sys.exit(0)
