"""A scripted fake of the Anthropic Messages API, for the real CLI to talk to.

Tests push replies (`Reply`) onto a queue; each POST /v1/messages takes the next one
(or `default`, or what `responder(body)` returns). Every request is recorded with its
headers and JSON body, so tests can assert what actually reached "Anthropic".
Subscriptions: `plans[token] = Plan(...)` makes a request whose Authorization is
`Bearer <token>` (a made-up OAuth token) carry that plan's `anthropic-ratelimit-unified-*`
headers, as the real API does for subscription logins, and be refused (429) when a window is
used up and no extra usage covers it, or (401) when the plan is `revoked`.
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
    details: dict = None        # an error's `details` (e.g. {"error_code": "credits_required"})
    id: str = "msg_fake"


@dataclass
class Plan:
    """One made-up subscription.  Utilization is 0-1 per window; a window at 1.0 is rejected,
    from 0.8 allowed_warning.  Past a rejected window, `overage` decides: "allowed" answers
    (billed as extra usage), "rejected" refuses with 429; `credits_required` refuses with the
    error_code the API gives when extra usage has no credits."""
    five_hour: float = 0.1
    seven_day: float = 0.1
    five_hour_reset: int = 0     # unix seconds; 0 = an hour from now
    seven_day_reset: int = 0     # 0 = three days from now
    overage: str = "rejected"    # overage-status: allowed | allowed_warning | rejected
    credits_required: bool = False
    step: float = 0.0            # what every answered request adds to both windows
    revoked: bool = False        # the token is refused (401)
    answered: int = 0

    def windows(self):
        now = int(time.time())
        return {"5h": (self.five_hour, self.five_hour_reset or now + 3600),
                "7d": (self.seven_day, self.seven_day_reset or now + 3 * 86400)}

    @staticmethod
    def status(u):
        return "rejected" if u >= 1.0 else "allowed_warning" if u >= 0.8 else "allowed"

    def headers(self):
        w = self.windows()
        rejected = [k for k, (u, _r) in w.items() if u >= 1.0]
        claim = rejected[0] if rejected else max(w, key=lambda k: w[k][0])
        h = {"anthropic-ratelimit-unified-status": "rejected" if rejected else "allowed",
             "anthropic-ratelimit-unified-reset": str(w[claim][1]),
             "anthropic-ratelimit-unified-representative-claim":
                 {"5h": "five_hour", "7d": "seven_day"}[claim],
             "anthropic-ratelimit-unified-overage-status": self.overage}
        if self.credits_required:
            h["anthropic-ratelimit-unified-representative-claim"] = "overage"
        for k, (u, r) in w.items():
            h.update({"anthropic-ratelimit-unified-%s-utilization" % k: str(u),
                      "anthropic-ratelimit-unified-%s-status" % k: self.status(u),
                      "anthropic-ratelimit-unified-%s-reset" % k: str(r)})
        return h

    def refusal(self):
        """The error Reply for a request this plan refuses, or None."""
        if self.revoked:
            return Reply(status=401, error_type="authentication_error",
                         message="OAuth token has been revoked")
        over = any(u >= 1.0 for u, _r in self.windows().values())
        if self.credits_required:
            return Reply(status=429, error_type="rate_limit_error", message="credits required",
                         headers=self.headers(), details={"error_code": "credits_required"})
        if over and self.overage not in ("allowed", "allowed_warning"):
            return Reply(status=429, error_type="rate_limit_error", message="rate limited",
                         headers=self.headers())
        return None


def text(s, **kw):
    return Reply(blocks=[{"type": "text", "text": s}], **kw)


def thinking(thought, answer, **kw):
    return Reply(blocks=[{"type": "thinking", "thinking": thought, "signature": "sig-" + str(len(thought))},
                         {"type": "text", "text": answer}], **kw)


def tool_use(name, input, id="toolu_fake01", before="", **kw):
    blocks = [{"type": "text", "text": before}] if before else []
    blocks.append({"type": "tool_use", "id": id, "name": name, "input": input})
    return Reply(blocks=blocks, stop_reason="tool_use", **kw)


def web_search_answer(query, results, answer, srv_id="srvtoolu_fake01"):
    """What Anthropic's server-side web search returns to a request offering web_search_2025...:
    the search the model ran, its results ({"url", "title"}), and the model's text."""
    return Reply(blocks=[
        {"type": "server_tool_use", "id": srv_id, "name": "web_search", "input": {"query": query}},
        {"type": "web_search_tool_result", "tool_use_id": srv_id, "content": [
            dict({"type": "web_search_result", "encrypted_content": "enc", "page_age": None}, **r)
            for r in results]},
        {"type": "text", "text": answer}],
        usage={"input_tokens": 9, "output_tokens": 5, "server_tool_use": {"web_search_requests": 1}})


def offers_web_search(body):
    """True for the CLI's nested request that runs a WebSearch (it offers Anthropic's server
    tool web_search_20250305)."""
    return isinstance(body, dict) and any(str(t.get("type", "")).startswith("web_search")
                                          for t in body.get("tools") or [])


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
        self.plans = {}             # made-up OAuth token -> Plan
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
                auth = self.headers.get("Authorization") or ""
                plan = upstream.plans.get(auth[7:] if auth.startswith("Bearer ") else None)
                reply = plan.refusal() if plan is not None else None
                if reply is None:
                    reply = upstream.next_reply(body)
                    if plan is not None and reply.status == 200:
                        reply = Reply(**dict(reply.__dict__, headers=dict(reply.headers,
                                                                          **plan.headers())))
                        with upstream.lock:
                            plan.answered += 1
                            plan.five_hour = round(plan.five_hour + plan.step, 6)
                            plan.seven_day = round(plan.seven_day + plan.step, 6)
                if reply.status != 200:
                    err = {"type": reply.error_type, "message": reply.message}
                    if reply.details is not None:
                        err["details"] = reply.details
                    return self._json(reply.status, {"type": "error", "error": err}, reply.headers)
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
            self.plans.clear()
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
            elif kind in ("tool_use", "server_tool_use"):
                yield "content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                    "type": kind, "id": block["id"], "name": block["name"], "input": {}}}
                for piece in _split(json.dumps(block["input"]), reply.chunks):
                    yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "input_json_delta", "partial_json": piece}}
            elif kind.endswith("_tool_result"):      # server tool results arrive whole
                yield "content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": block}
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
