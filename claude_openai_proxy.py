#!/usr/bin/env python3
"""claude-proxy: the local, logged-in `claude` CLI as an OpenAI- and Anthropic-compatible API.

One file, Python 3.10+ standard library only.  Copy it onto a server where `claude` is logged
in (a Claude Max/Pro subscription has no API key), run

    python3 claude_openai_proxy.py --port 8088

and point any OpenAI client at http://127.0.0.1:8088/v1 (or any Anthropic client at
http://127.0.0.1:8088).  A `modules/` folder beside this file adds tool-call handlers.

SECURITY WARNING: anyone who can reach the port spends your subscription.  Keep the default
loopback bind, or put it behind a TLS proxy and set CLAUDE_PROXY_API_KEYS.  Check that your use
complies with Anthropic's terms for your plan.

Endpoints
---------
    POST /v1/chat/completions        OpenAI chat completions (stream / non-stream, tools)
    POST /v1/responses               OpenAI Responses (stream / non-stream, function tools);
                                     stateless: no previous_response_id, `store` keeps nothing
    POST /v1/messages                Anthropic Messages (stream / non-stream, tools, thinking)
    POST /v1/messages/count_tokens   Anthropic token count (an estimate: ~4 bytes a token)
    GET  /v1/models                  model list (Anthropic shape if anthropic-version/x-api-key)
    GET  /v1/models/{id}             one model
    GET  /health                     liveness, capacity, pool, handler modules (no secrets)
    GET  /metrics                    Prometheus text format
  Every /v1/... route also answers without the /v1 prefix.

Configuration (flags win over environment; read once at start-up)
-------------------------------------------------------------------
    --host            CLAUDE_PROXY_HOST              127.0.0.1
    --port            CLAUDE_PROXY_PORT              8088
    --claude-bin      CLAUDE_BIN                     `claude` on PATH
    --default-model   CLAUDE_PROXY_DEFAULT_MODEL     sonnet
    --max-concurrency CLAUDE_PROXY_MAX_CONCURRENCY   2     CLI processes running at once
    --queue-timeout   CLAUDE_PROXY_QUEUE_TIMEOUT     120   seconds a request waits for a slot
    --timeout         CLAUDE_PROXY_TIMEOUT           600   seconds per request, then 504
    --cli-retries     CLAUDE_PROXY_CLI_RETRIES       1     upstream retries inside the CLI
    --pass-env        CLAUDE_PROXY_PASS_ENV          ""    extra variables passed to the CLI
    --toolcall-module CLAUDE_PROXY_TOOLCALL_MODULE   generic  (generic | native | modules/NAME)
    --pool-size       CLAUDE_PROXY_POOL_SIZE         2     pre-started CLI processes (0 = off)
    --pool-max-idle   CLAUDE_PROXY_POOL_MAX_IDLE     300   seconds before a waiting one is renewed
    (env only)        CLAUDE_PROXY_API_KEYS          ""    keys clients must send (Bearer/x-api-key)
    --max-body        CLAUDE_PROXY_MAX_BODY          10 MB largest request body, then 413
    --cors-origins    CLAUDE_PROXY_CORS_ORIGINS      ""    browser origins allowed (or *)
    --shutdown-grace  CLAUDE_PROXY_SHUTDOWN_GRACE    30    seconds in-flight requests may finish
    --read-timeout    CLAUDE_PROXY_READ_TIMEOUT      60    seconds of client silence while reading
    --history         CLAUDE_PROXY_HISTORY     structured  earlier turns: structured | flat
    --sessions        CLAUDE_PROXY_SESSIONS          2     conversations kept live for their next turn
    --session-idle    CLAUDE_PROXY_SESSION_IDLE      300   seconds a kept conversation waits
    --log-format      CLAUDE_PROXY_LOG_FORMAT        text  (text | json)
    --allow-unauthenticated   serve a non-loopback address without keys
    --check                   check the CLI, its login and the config, then exit

Data flow
---------
    HTTP body -> dialect.parse -> Request (neutral) -> prompt rendering -> CLI process
      -> stream-json lines -> events (Start, TextDelta, ThinkingDelta, ToolCall, ToolCallDelta,
         Done) -> tool-call engine (emulated tools) -> dialect encoder -> JSON or SSE
    Native tools (X-Toolcall-Module: native) skip the engine: the client's tools reach the model
    as real tools through the CLI's MCP bridge, and its tool_use blocks come back as ToolCalls.
    The CLI process is a pre-started one from the pool when one is ready, and when a request
    continues a conversation whose last turn ended whole, the very process that answered it
    (Sessions): then only the new user message is sent.

Contents
--------
    1. constants          5. prompt rendering        9. OpenAI chat completions
    2. errors             6. tool calling            10. Anthropic messages
    3. config             7. CLI backend             11. OpenAI responses
    4. neutral model      8. SSE                     12. routes, handler, server
                                                     13. main
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import base64
import binascii
import collections
import hashlib
import hmac
import importlib
import itertools
import json
import os
import pathlib
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["BaseToolCallHandler", "register", "ProxyError", "Config", "main"]


# 1. Constants ###################################################################################

MODEL_FAMILIES = ("opus", "sonnet", "haiku")
#: ids listed by /v1/models; any other claude-<family>-... id is accepted and passed to the CLI.
KNOWN_MODELS = ("claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5",
                "claude-opus-4-8", "claude-sonnet-4-6", "claude-haiku-4-5",
                "opus", "sonnet", "haiku")
MODEL_PREFIXES = ("claude-code-cli/", "claude-code/", "openai/", "anthropic/")
EFFORTS = ("low", "medium", "high", "xhigh", "max")

#: environment the CLI may inherit; everything else is dropped (a stray ANTHROPIC_API_KEY in a
#: shell would silently switch a subscriber to pay-per-token billing).
ENV_ALLOW = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "NODE_EXTRA_CA_CERTS",
             "SSL_CERT_FILE", "SSL_CERT_DIR", "CLAUDE_CONFIG_DIR", "CLAUDE_CODE_OAUTH_TOKEN",
             "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
             "http_proxy", "https_proxy", "no_proxy", "all_proxy")
ENV_ALLOW_PREFIXES = ("LC_", "XDG_")
ENV_NEVER = ("CLAUDECODE",)
ENV_NEVER_PREFIXES = ("CLAUDE_PROXY_",)

HEARTBEAT_SECONDS = 10.0      # SSE keep-alive while the model is silent
POLL_SECONDS = 0.25           # how often a waiting request checks deadline and client
REFUSAL_HOLD_CHARS = 400      # streamed text held back while it may still be a false refusal
MAX_JSON_DEPTH = 64
HISTORY_MODES = ("flat", "structured")


# 2. Errors ######################################################################################

class ProxyError(Exception):
    """An error with an HTTP status; rendered in the caller's dialect by the route."""
    status = 500
    kind = "api_error"          # Anthropic error type; the OpenAI renderer maps it

    def __init__(self, message, status=None, kind=None, headers=None, param=None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        self.headers = dict(headers or {})
        self.param = param


class BadRequest(ProxyError):
    status, kind = 400, "invalid_request_error"


class Unauthorized(ProxyError):
    status, kind = 401, "authentication_error"


class NotFound(ProxyError):
    status, kind = 404, "not_found_error"


class MethodNotAllowed(ProxyError):
    status, kind = 405, "invalid_request_error"


class TooLarge(ProxyError):
    status, kind = 413, "request_too_large"


class RateLimited(ProxyError):
    status, kind = 429, "rate_limit_error"


class Overloaded(ProxyError):
    status, kind = 529, "overloaded_error"


class UpstreamError(ProxyError):
    status, kind = 502, "api_error"


class StillBorn(UpstreamError):
    """The CLI ended before printing a single line."""


class CLIUnavailable(ProxyError):
    status, kind = 503, "api_error"


class Timeout(ProxyError):
    status, kind = 504, "timeout_error"


class ClientGone(Exception):
    """The HTTP client went away; nothing more can be sent to it."""


# 3. Config ######################################################################################

@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8088
    claude_bin: str = "claude"
    default_model: str = "sonnet"
    max_concurrency: int = 2
    queue_timeout: float = 120.0
    timeout: float = 600.0
    cli_retries: int = 1
    pass_env: tuple = ()
    toolcall_module: str = "generic"
    log_format: str = "text"
    api_keys: tuple = field(default=(), repr=False)
    allow_unauthenticated: bool = False
    max_body: int = 10 * 1024 * 1024
    cors_origins: tuple = ()
    shutdown_grace: float = 30.0
    pool_size: int = 2
    pool_max_idle: float = 300.0
    read_timeout: float = 60.0
    history: str = "structured"
    sessions: int = 2
    session_idle: float = 300.0
    #: an empty directory every CLI runs in (stable name: the CLI quotes it to the model)
    workdir: str = ""
    #: snapshot of os.environ taken at start-up; nothing reads os.environ later
    environ: dict = field(default_factory=dict, repr=False)


#: (flag, env var, Config field, type, help)
OPTIONS = (
    ("--host", "CLAUDE_PROXY_HOST", "host", str, "address to bind"),
    ("--port", "CLAUDE_PROXY_PORT", "port", int, "port to bind"),
    ("--claude-bin", "CLAUDE_BIN", "claude_bin", str, "path of the claude CLI"),
    ("--default-model", "CLAUDE_PROXY_DEFAULT_MODEL", "default_model", str,
     "model used when a request names none"),
    ("--max-concurrency", "CLAUDE_PROXY_MAX_CONCURRENCY", "max_concurrency", int,
     "CLI processes running at once"),
    ("--queue-timeout", "CLAUDE_PROXY_QUEUE_TIMEOUT", "queue_timeout", float,
     "seconds a request waits for a free slot before a 429"),
    ("--timeout", "CLAUDE_PROXY_TIMEOUT", "timeout", float, "seconds per request before a 504"),
    ("--cli-retries", "CLAUDE_PROXY_CLI_RETRIES", "cli_retries", int,
     "upstream retries inside the CLI (its default of 10 takes ~3 minutes to fail)"),
    ("--pass-env", "CLAUDE_PROXY_PASS_ENV", "pass_env", str,
     "comma-separated extra variables for the CLI, e.g. ANTHROPIC_BASE_URL"),
    ("--toolcall-module", "CLAUDE_PROXY_TOOLCALL_MODULE", "toolcall_module", str,
     "default tool-call handler (X-Toolcall-Module overrides per request)"),
    ("--log-format", "CLAUDE_PROXY_LOG_FORMAT", "log_format", str, "access log: text or json"),
    # keys have no flag: argv is readable by every user of the machine (ps)
    (None, "CLAUDE_PROXY_API_KEYS", "api_keys", str,
     "comma-separated keys clients must send (Authorization: Bearer or x-api-key)"),
    ("--max-body", "CLAUDE_PROXY_MAX_BODY", "max_body", int, "largest request body in bytes (413)"),
    ("--cors-origins", "CLAUDE_PROXY_CORS_ORIGINS", "cors_origins", str,
     "comma-separated browser origins allowed by CORS, or *"),
    ("--shutdown-grace", "CLAUDE_PROXY_SHUTDOWN_GRACE", "shutdown_grace", float,
     "seconds in-flight requests may finish after SIGTERM/SIGINT"),
    ("--pool-size", "CLAUDE_PROXY_POOL_SIZE", "pool_size", int,
     "pre-started CLI processes kept ready (0 = off; each idle one holds ~180 MB)"),
    ("--pool-max-idle", "CLAUDE_PROXY_POOL_MAX_IDLE", "pool_max_idle", float,
     "seconds a pre-started process may wait before it is replaced by a fresh one"),
    ("--read-timeout", "CLAUDE_PROXY_READ_TIMEOUT", "read_timeout", float,
     "seconds of client silence while a request is read (or a kept-alive connection idles)"),
    ("--history", "CLAUDE_PROXY_HISTORY", "history", str,
     "earlier turns of a conversation: structured (real turns) or flat (one JSON transcript)"),
    ("--sessions", "CLAUDE_PROXY_SESSIONS", "sessions", int,
     "finished conversations whose CLI process is kept for their next turn (structured history; "
     "0 = off; each holds ~180 MB)"),
    ("--session-idle", "CLAUDE_PROXY_SESSION_IDLE", "session_idle", float,
     "seconds a kept conversation waits for its next turn before its process is ended"),
)
LIST_OPTIONS = ("pass_env", "api_keys", "cors_origins")
SECRET_OPTIONS = ("api_keys",)


def build_parser():
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="claude_openai_proxy.py",
        description="Serve the local `claude` CLI as an OpenAI- and Anthropic-compatible API.",
        epilog=epilog_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    env_only = []
    for flag, env, name, _type, help_ in OPTIONS:
        if flag is None:
            env_only.append("  %s: %s" % (env, help_))
            continue
        p.add_argument(flag, dest=name, default=None,
                       help="%s (env %s, default %r)" % (help_, env, getattr(defaults, name)))
    p.epilog = "environment only:\n" + "\n".join(env_only) + "\n\n" + p.epilog
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow a non-loopback --host without CLAUDE_PROXY_API_KEYS")
    p.add_argument("--check", action="store_true",
                   help="check the CLI (found, version, logged in) and the config, then exit")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


def epilog_text():
    lines = ["tool-call handlers: " + ", ".join(sorted(HANDLERS))]
    for name, err in sorted(MODULE_ERRORS.items()):
        lines.append("  module %s failed to load: %s" % (name, err))
    return "\n".join(lines)


def load_config(argv=None, environ=None):
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    values = {}
    for _flag, env, name, type_, _help in OPTIONS:
        raw = getattr(args, name, None)
        if raw is None:
            raw = environ.get(env)
        if raw is None or raw == "":
            continue
        try:
            values[name] = type_(raw)
        except ValueError:
            raise SystemExit("error: %s must be %s, got %r" % (env, type_.__name__, raw))
    for name in LIST_OPTIONS:
        if name in values:
            values[name] = tuple(v.strip() for v in values[name].split(",") if v.strip())
    cfg = Config(environ=environ, allow_unauthenticated=args.allow_unauthenticated, **values)
    if cfg.max_concurrency < 1:
        raise SystemExit("error: CLAUDE_PROXY_MAX_CONCURRENCY must be at least 1")
    if cfg.pool_size < 0:
        raise SystemExit("error: CLAUDE_PROXY_POOL_SIZE must be 0 or more")
    if cfg.sessions < 0:
        raise SystemExit("error: CLAUDE_PROXY_SESSIONS must be 0 or more")
    try:
        resolve_model(cfg.default_model, None)
    except ProxyError as err:
        raise SystemExit("error: CLAUDE_PROXY_DEFAULT_MODEL: " + err.message)
    if cfg.log_format not in ("text", "json"):
        raise SystemExit("error: CLAUDE_PROXY_LOG_FORMAT must be text or json")
    if cfg.history not in HISTORY_MODES:
        raise SystemExit("error: CLAUDE_PROXY_HISTORY must be structured or flat")
    if not cfg.api_keys and not cfg.allow_unauthenticated and not is_loopback(cfg.host):
        raise SystemExit("error: refusing to listen on %s without CLAUDE_PROXY_API_KEYS: anyone who "
                         "reaches it would spend your subscription. Set keys, or pass "
                         "--allow-unauthenticated if something in front checks them." % cfg.host)
    return cfg, args


def is_loopback(host):
    try:
        import ipaddress
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def describe_config(cfg):
    """The effective config as text, secrets masked."""
    lines = []
    for _flag, env, name, _t, _h in OPTIONS:
        value = getattr(cfg, name)
        if name in SECRET_OPTIONS and value:
            value = "%d key(s), masked" % len(value)
        elif isinstance(value, tuple):
            value = ",".join(value)
        lines.append("  %-30s %s" % (env, value))
    return "\n".join(lines)


# 4. Neutral model ###############################################################################
# Every dialect parses into a Request and renders from Events.  Content blocks use Anthropic's
# block shapes (text, image, tool_use, tool_result, thinking): they are what the CLI consumes.
# A tool_result's content is its text; images that came with it are image blocks of their own
# beside it, and also listed under the result's "images" (native tools put them back inside).

@dataclass
class Message:
    role: str                    # "user" | "assistant"
    blocks: list                 # Anthropic content blocks


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict


@dataclass
class Request:
    model: str                   # as the client asked (echoed back)
    cli_model: str               # what the CLI gets as --model
    messages: list
    system: str = ""
    stream: bool = False
    tools: list = field(default_factory=list)
    tool_choice: object = "auto"  # "auto" | "none" | "required" | {"name": ...}
    parallel_tool_calls: bool = True
    stop: list = field(default_factory=list)
    effort: str = ""
    max_tokens: int = 0
    thinking: bool = False       # return thinking to the client
    disable_thinking: bool = False
    include_usage: bool = False
    handler: object = None
    id_prefix: str = "call_"     # tool call ids: call_... (OpenAI) or toolu_... (Anthropic)
    json_schema: dict = None     # structured output: the answer must be JSON matching it


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read: int = 0
    cache_write: int = 0

    def add(self, other):
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read += other.cache_read
        self.cache_write += other.cache_write

    @property
    def prompt_tokens(self):
        return self.input_tokens + self.cache_read + self.cache_write

    @classmethod
    def from_api(cls, u):
        u = u or {}
        return cls(int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0),
                   int(u.get("cache_read_input_tokens") or 0),
                   int(u.get("cache_creation_input_tokens") or 0))


@dataclass
class Start:
    usage: Usage


@dataclass
class TextDelta:
    text: str


@dataclass
class ThinkingDelta:
    text: str
    signature: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str               # a JSON string, or its first part when ToolCallDelta follow


@dataclass
class ToolCallDelta:
    """More argument text for the ToolCall with this id (native tools stream their input)."""
    id: str
    arguments: str


@dataclass
class Heartbeat:
    pass


@dataclass
class Reset:
    """Forget the answer so far: the CLI is asking again after a dropped stream (only sent to
    non-streaming requests, where nothing has reached the client yet)."""


@dataclass
class Done:
    stop_reason: str             # Anthropic vocabulary: end_turn, max_tokens, tool_use, ...
    usage: Usage
    stop_sequence: str = None
    whole: bool = True           # False: the client got less than the model wrote (see Sessions)


@dataclass
class Completion:
    text: str = ""
    thinking: str = ""
    signature: str = ""
    tool_calls: list = field(default_factory=list)
    stop_reason: str = "end_turn"
    stop_sequence: str = None
    usage: Usage = field(default_factory=Usage)


def collect(events):
    """Fold an event stream into one Completion (the non-streaming path)."""
    out, text, thought = Completion(), [], []
    for ev in events:
        if isinstance(ev, Reset):
            text, thought, out.tool_calls = [], [], []
        elif isinstance(ev, TextDelta):
            text.append(ev.text)
        elif isinstance(ev, ThinkingDelta):
            thought.append(ev.text)
            out.signature = ev.signature or out.signature
        elif isinstance(ev, ToolCall):
            out.tool_calls.append(ToolCall(ev.id, ev.name, ev.arguments))
        elif isinstance(ev, ToolCallDelta):
            for t in out.tool_calls:
                if t.id == ev.id:
                    t.arguments += ev.arguments
        elif isinstance(ev, Done):
            out.stop_reason, out.usage, out.stop_sequence = ev.stop_reason, ev.usage, ev.stop_sequence
    for t in out.tool_calls:
        t.arguments = t.arguments or "{}"
    out.text, out.thinking = "".join(text), "".join(thought)
    return out


def new_id(prefix, n=24):
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    # os.urandom, not `secrets`: that module pulls in OpenSSL (~4 MB of idle RSS) for nothing
    return prefix + "".join(alphabet[b % 62] for b in os.urandom(n))


def resolve_model(name, default):
    """Map a client's model name to a CLI --model value, or raise a 400 listing the choices."""
    if name is not None and not isinstance(name, str):
        raise BadRequest("model must be a string such as \"sonnet\" or \"claude-sonnet-4-6\".",
                         param="model")
    asked = name if isinstance(name, str) and name.strip() else default
    bare = asked.strip()
    for prefix in MODEL_PREFIXES:
        if bare.lower().startswith(prefix):
            bare = bare[len(prefix):]
    low = bare.lower()
    if low in MODEL_FAMILIES:
        return asked, low
    m = re.fullmatch(r"claude-(?:[0-9][0-9.-]*-)?(opus|sonnet|haiku)(?:-[0-9][0-9a-z.-]*)?", low)
    if m and not low.endswith("-"):
        return asked, low
    raise BadRequest("Unknown model %r. Use one of: %s, a full id such as claude-sonnet-4-6 or "
                     "claude-haiku-4-5-20251001, optionally prefixed with claude-code-cli/, "
                     "openai/ or anthropic/." % (asked, ", ".join(KNOWN_MODELS)), param="model")


def image_block(url_or_data, media_type=None):
    """An Anthropic base64 image block from a data: URL; remote URLs are refused (no SSRF)."""
    if not isinstance(url_or_data, str):
        raise BadRequest("image url must be a string")
    m = re.match(r"data:(image/[a-zA-Z0-9.+-]+);base64,(.*)\Z", url_or_data, re.S)
    if not m:
        if url_or_data.startswith(("http://", "https://")):
            raise BadRequest("Remote image URLs are not fetched by this proxy; send the image "
                             "inline as a data: URL (data:image/png;base64,...).")
        raise BadRequest("image url must be a data:image/...;base64,... URL")
    data = m.group(2).strip()
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image data is not valid base64")
    return {"type": "image", "source": {"type": "base64", "media_type": m.group(1), "data": data}}


def merge_messages(messages):
    """Consecutive same-role messages become one, as the real APIs treat them."""
    out = []
    for m in messages:
        if out and out[-1].role == m.role:
            out[-1].blocks.extend(m.blocks)
        else:
            out.append(Message(m.role, list(m.blocks)))
    return out


def json_depth(obj, limit=MAX_JSON_DEPTH + 1):
    """Nesting depth of parsed JSON, counted up to `limit` (iteratively: no recursion)."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d >= limit:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


# 5. Prompt rendering ############################################################################
# The only code that knows how a conversation becomes CLI input: a system prompt and one user
# turn of content blocks (CLAUDE_PROXY_HISTORY=flat: earlier turns become a JSON transcript in
# it), or, with CLAUDE_PROXY_HISTORY=structured, the earlier messages as turns of their own
# (history_turns) followed by that user turn.

TRANSCRIPT_INTRO = (
    "The conversation so far is below as a JSON array of turns, oldest first. Reply as the "
    "assistant to the last user turn. Write only your reply; do not mention this transcript.")
PREFILL_INTRO = (
    "The conversation so far is below as a JSON array of turns, oldest first. The last turn is "
    "your own reply, cut off: continue it exactly where it stops, writing only the continuation.")


def block_text(block, handler):
    """Text form of a block inside a transcript (images are sent separately)."""
    kind = block.get("type")
    if kind == "text":
        return block.get("text", "")
    if kind == "tool_use":
        return handler.render_call(block["name"], block.get("input", {}), block.get("id"))
    if kind == "tool_result":
        return handler.render_result(block)
    if kind == "image":
        return "[image]"
    return ""


def render_turn(messages, handler, bridge=None):
    """The content blocks of the one user turn the CLI answers (with native tools' `bridge`, a
    user turn of tool results stays real tool_result blocks)."""
    if len(messages) == 1 and messages[0].role == "user":
        if bridge is not None:
            return bridge.turn(messages[0].blocks) or [{"type": "text", "text": ""}]
        blocks = []
        for b in messages[0].blocks:
            if b.get("type") in ("text", "image"):
                blocks.append(b)
            else:
                blocks.append({"type": "text", "text": block_text(b, handler)})
        return blocks or [{"type": "text", "text": ""}]
    turns, images = [], []
    for m in messages:
        parts = [block_text(b, handler) for b in m.blocks if b.get("type") != "thinking"]
        images += [b for b in m.blocks if b.get("type") == "image"]
        turns.append({"role": m.role, "content": "\n\n".join(p for p in parts if p)})
    intro = PREFILL_INTRO if messages[-1].role == "assistant" else TRANSCRIPT_INTRO
    text = intro + "\n\n" + json.dumps(turns, ensure_ascii=False, indent=1)
    return [{"type": "text", "text": text}] + images


def history_turns(messages, handler, bridge=None):
    """The earlier messages as [(role, blocks)], one real turn each, or None when the flat
    transcript has to be used: a single message (nothing earlier), a conversation that ends
    with the assistant (a prefill: the transcript's PREFILL_INTRO asks for a continuation),
    the native handler with no tools offered (tool_choice "none": the upstream refuses tool
    blocks without tool definitions, so that history stays text records), or an earlier
    assistant message with nothing to say once thinking is dropped.

    User messages are rendered as a one-message conversation is (render_turn), so the newest
    message of one request and the same message among the earlier ones of the next request
    reach the CLI identically; assistant messages keep their text, emulated tool calls become
    the handler's ```tool_call text, thinking is dropped (the CLI has no signature for it).
    With native tools (`bridge`), tool calls and results are real tool_use / tool_result
    blocks, as the model made and the client answered them (ToolBridge.turn)."""
    if len(messages) < 2 or messages[-1].role != "user" or \
            (bridge is None and getattr(handler, "native", False)):
        return None
    turns = []
    for m in messages[:-1]:
        if bridge is not None:
            blocks = bridge.turn(m.blocks)
            if not blocks:
                return None
            turns.append((m.role, blocks))
            continue
        if m.role == "user":
            turns.append(("user", render_turn([m], handler)))
            continue
        blocks = []
        for b in m.blocks:
            text = b.get("text", "") if b.get("type") == "text" else \
                block_text(b, handler) if b.get("type") in ("tool_use", "tool_result") else ""
            if text:
                blocks.append({"type": "text", "text": text})
        if not blocks:
            return None
        turns.append(("assistant", blocks))
    return turns


def render_system(req):
    parts = [req.system] if req.system else []
    if req.tools and req.tool_choice != "none":
        parts.append(req.handler.tool_prompt(offered_tools(req), req.tool_choice))
    return "\n\n".join(p for p in parts if p)


def offered_tools(req):
    """The tools the model sees: a named tool_choice offers only that tool, unless the
    upstream request forces it (forced_choice): then all stay, as in the steps before."""
    if isinstance(req.tool_choice, dict) and forced_choice(req) is None:
        return [t for t in req.tools if t.name == req.tool_choice.get("name")]
    return req.tools


# 6. Tool calling (prompt emulation) #############################################################
# Handlers decide how tools reach the model.  Emulated (the default, and modules/): tools are
# described in the system prompt and the model writes fenced ```tool_call blocks, which are parsed
# back into tool calls.  Native (NativeToolCallHandler): real tools through the CLI's MCP bridge,
# whose plumbing is ToolBridge in section 7; only its prompt rules and history text live here.

HANDLERS = {}
MODULE_ERRORS = {}

TOOL_FENCES = ("tool_call", "json", "tool_code", "tool")
_FENCE = "```"
_XML_OPEN = re.compile(r"<(?:antml:)?function_calls>")
_XML_CLOSE = re.compile(r"</(?:antml:)?function_calls>")
_XML_INVOKE = re.compile(r"<(?:antml:)?invoke\s+name=\"([^\"]+)\"\s*>(.*?)</(?:antml:)?invoke>", re.S)
_XML_PARAM = re.compile(r"<(?:antml:)?parameter\s+name=\"([^\"]+)\"\s*>(.*?)</(?:antml:)?parameter>", re.S)
_MARKERS = (_FENCE, "<function_calls>", "<" + "antml:function_calls>")


class BaseToolCallHandler:
    """Prompt building, parsing, refusal detection and the retry nudge for emulated tools.

    Subclass it in modules/NAME.py, set `name`, override what differs, and call register().
    """
    name = "generic"
    description = "fenced ```tool_call blocks; JSON fences and native XML also accepted"
    #: True: the tools are offered to the model as real tools (section 7's ToolBridge), so only
    #: tool_prompt's choice rules and the history rendering below are used, never parse().
    native = False
    refusal_patterns = (
        r"\bI (?:don't|do not|can't|cannot|am unable to|'m unable to|am not able to) "
        r"(?:have )?(?:access|use|call|run|execute|invoke|browse|perform)",
        r"\bI'?m (?:not able|unable) to (?:access|use|call|run|execute|browse)",
        r"\bI (?:don't|do not) have (?:the )?(?:ability|tools?|access|capabilit)",
        r"\b(?:no|not any) (?:tools?|functions?) (?:available|provided)",
        r"\btools? (?:is|are|seems?|appears?) (?:to be )?(?:not available|unavailable|not working|"
        r"broken|down|failing)",
        r"\bthe (?:\w+ )?(?:tool|function|backend|service|api) (?:is not responding|isn't responding|"
        r"timed out|returned an error|is failing)",
        r"\b(?:there was|I got|I received|I encountered) an? (?:\w+ )?(?:tool|function|api) (?:error|failure)",
        r"\bas an AI\b.*\b(?:cannot|can't|unable)",
        r"\bno tengo acceso\b", r"\bno puedo (?:acceder|usar|ejecutar)\b",
        r"\bje n'ai pas accès\b", r"\bje ne peux pas (?:accéder|utiliser|exécuter)\b",
        r"\bich habe keinen zugriff\b", r"\b(?:ich kann|kann ich)\b[^.\n]{0,40}?\b(?:nicht|keine?n?)\b[^.\n]*\b(?:zugreifen|ausführen|verwenden|nutzen)",
        r"\bnão tenho acesso\b", r"\bnão posso (?:acessar|usar)\b",
        r"\bnon ho accesso\b", r"我(?:无法|不能|没有)(?:访问|使用|调用)",
        r"アクセスできません", r"(?:ツール|関数)を(?:使用|実行)できません",
    )
    extra_refusal_patterns = ()

    def __init__(self):
        self._refusal = None      # compiled at first use: ~7 ms a handler, kept off start-up

    # -- prompt building ------------------------------------------------------------------
    def tool_prompt(self, tools, tool_choice):
        specs = [{"name": t.name, "description": t.description, "parameters": t.parameters}
                 for t in tools]
        rules = [
            "# Tools",
            "You can call the tools listed below. To call one, write a fenced block exactly "
            "like this, with the arguments as a JSON object matching the tool's parameters:",
            '```tool_call\n{"name": "TOOL_NAME", "arguments": {"param": "value"}}\n```',
            "Write one block per call; several blocks make parallel calls. After your call "
            "blocks, stop: the results arrive in the next message. Call a tool only when it "
            "helps; otherwise answer normally. The tools are available and working: never "
            "claim you cannot use them.",
        ]
        if tool_choice == "required":
            rules.append("In this reply you MUST call at least one tool.")
        elif isinstance(tool_choice, dict):
            rules.append("In this reply you MUST call the tool %s." % json.dumps(tool_choice["name"]))
        rules.append("Available tools:\n" + json.dumps(specs, ensure_ascii=False, indent=1))
        return "\n\n".join(rules)

    def nudge(self):
        return ("Your previous reply did not call a tool. The tools described in your "
                "instructions are available and working. Call the appropriate tool now by "
                "writing a ```tool_call block.")

    def manifest(self):
        """The MCP handshake's answers given ahead in initialize (sdkMcpServerManifests): the
        CLI then answers its own MCP client's initialize and tools/list from them, and the
        three control round trips before the first upstream call are gone (measured in
        bench/agent_loop.py).  A CLI that asks with another protocol version, or predates the
        field, does the handshake over the control channel as before (_mcp answers it)."""
        return {"initializeResult": {"protocolVersion": MCP_PROTOCOL, "capabilities": {"tools": {}},
                                     "serverInfo": {"name": "claude-proxy", "version": __version__}},
                "toolsListResult": {"tools": self.listing}}

    # -- history ----------------------------------------------------------------------------
    def render_call(self, name, arguments, call_id=None):
        return "```tool_call\n%s\n```" % json.dumps({"name": name, "arguments": arguments},
                                                    ensure_ascii=False)

    def render_result(self, block):
        content = block.get("content")
        if isinstance(content, list):
            content = "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
        out = {"tool_call_id": block.get("tool_use_id"), "name": block.get("name"),
               "content": content if content is not None else ""}
        if block.get("is_error"):
            out["is_error"] = True
        return "```tool_result\n%s\n```" % json.dumps(out, ensure_ascii=False)

    # -- parsing ----------------------------------------------------------------------------
    def is_refusal(self, text):
        if getattr(self, "_refusal", None) is None:
            pats = tuple(self.refusal_patterns) + tuple(self.extra_refusal_patterns)
            self._refusal = re.compile("|".join("(?:%s)" % p for p in pats), re.I)
        return bool(self._refusal.search((text or "").replace("\u2019", "'")))

    def parse(self, text, final=True, names=None):
        """Split text into [("text", s) | ("call", (name, args_dict))] segments.

        Returns (segments, consumed): when final is False, text after `consumed` is still
        undecided (it may be the start of a tool block) and should be offered again with more.
        `names`, when given, are the tool names a ```json fence may call.
        """
        segs, pos, n = [], 0, len(text)
        while pos < n:
            start, marker = self._next_marker(text, pos)
            if start < 0:
                keep = 0 if final else self._partial_marker_tail(text, pos)
                segs.append(("text", text[pos:n - keep]))
                pos = n - keep
                break
            if start > pos:
                segs.append(("text", text[pos:start]))
                pos = start
            if marker == _FENCE:
                result = self._parse_fence(text, start, final, names)
            else:
                result = self._parse_xml(text, start, final)
            if result is None:           # undecided: wait for more text
                break
            calls, end = result
            if calls:
                segs.extend(("call", c) for c in calls)
            else:
                segs.append(("text", text[start:end]))
            pos = end
        merged = []
        for kind, val in segs:
            if kind == "text" and merged and merged[-1][0] == "text":
                merged[-1] = ("text", merged[-1][1] + val)
            elif not (kind == "text" and val == ""):
                merged.append((kind, val))
        return merged, pos

    @staticmethod
    def _next_marker(text, pos):
        best, which = -1, None
        for marker in _MARKERS:
            i = text.find(marker, pos)
            if i >= 0 and (best < 0 or i < best):
                best, which = i, marker
        return best, which

    @staticmethod
    def _partial_marker_tail(text, pos):
        """Length of a suffix of text that could be the start of a marker."""
        longest = 0
        for marker in _MARKERS:
            for k in range(min(len(marker) - 1, len(text) - pos), 0, -1):
                if text.endswith(marker[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def _parse_fence(self, text, start, final, names):
        nl = text.find("\n", start + 3)
        if nl < 0:
            return None if not final else ([], len(text))
        info = text[start + 3:nl].strip().lower()
        if info not in TOOL_FENCES:
            return [], nl + 1              # an ordinary code fence: plain text
        body_start = nl + 1
        search = body_start
        while True:
            close = text.find(_FENCE, search)
            if close < 0:
                return None if not final else ([], len(text))
            calls = self._calls_from_json(text[body_start:close], info, names)
            if calls is not None:
                end = close + 3
                return calls, end
            search = close + 3
            if close == 0 or text[close - 1] == "\n":
                rest = text[close + 3:].lstrip(" \t")
                if rest.startswith("\n") or (final and not rest):
                    return [], close + 3       # a fence alone on its line ends a broken block
                if not rest and not final:
                    return None
            # JSON that never parses stays text once a closing fence follows it
            if text.find(_FENCE, search) < 0 and (final or not text[body_start:close].strip()):
                return [], close + 3

    def _calls_from_json(self, raw, info, names):
        try:
            obj = json.loads(raw, strict=False)
        except (ValueError, RecursionError):
            return None
        items = obj if isinstance(obj, list) else [obj]
        calls = []
        for item in items:
            call = self._call_from_obj(item)
            if call is None:
                return []
            if info == "json" and names is not None and call[0] not in names:
                return []
            calls.append(call)
        return calls

    @staticmethod
    def _call_from_obj(obj):
        if not isinstance(obj, dict):
            return None
        if isinstance(obj.get("function"), dict):       # OpenAI-shaped
            obj = obj["function"]
        name = obj.get("name") or obj.get("tool") or obj.get("tool_name")
        if not isinstance(name, str) or not name:
            return None
        args = obj.get("arguments", obj.get("parameters", obj.get("input", obj.get("args", {}))))
        if isinstance(args, str):
            try:
                args = json.loads(args, strict=False) if args.strip() else {}
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        return name, args

    @staticmethod
    def _parse_xml(text, start, final):
        m = _XML_CLOSE.search(text, start)
        if not m:
            return None if not final else ([], len(text))
        inner = text[start:m.start()]
        calls = []
        for inv in _XML_INVOKE.finditer(inner):
            args = {}
            for p in _XML_PARAM.finditer(inv.group(2)):
                value = p.group(2).strip()
                try:
                    args[p.group(1)] = json.loads(value)
                except (ValueError, RecursionError):
                    args[p.group(1)] = value
            calls.append((inv.group(1), args))
        return calls, m.end()


class NativeToolCallHandler(BaseToolCallHandler):
    """Real tool use: the client's tools reach the model through the CLI's SDK MCP bridge.

    The model sees them as `mcp__client__NAME` with the client's JSON schemas and calls them as
    trained, in tool_use blocks; section 7 hands those calls to the client and stops the turn
    without running anything.  What is left here is the text part: "required" and a named tool
    are also instructions in the system prompt (forced upstream too, section 7's
    forced_choice, unless thinking is shown: then a named tool is the only one offered); with
    parallel_tool_calls=false the calls after the first are dropped.  Earlier calls and results are real tool_use / tool_result turns
    (ToolBridge.turn), or text records where the flat transcript is sent (render_call,
    render_result: CLAUDE_PROXY_HISTORY=flat, a prefill).
    """
    name = "native"
    description = "real tool use through the CLI's MCP bridge; no prompt protocol"
    native = True

    def tool_prompt(self, tools, tool_choice):
        # the same text whatever the history looks like: the system prompt is the start of the
        # upstream prompt cache, so it must not change from one step of an agent loop to the next
        rules = ["A conversation given as a transcript shows earlier tool calls and their "
                 "results as [tool call ...] and [tool result ...] records. Those are history "
                 "only: to call a tool, use your tools, never write such a record yourself."]
        if tool_choice == "required":
            rules.append("In this reply you MUST call at least one of your tools.")
        elif isinstance(tool_choice, dict):
            rules.append("In this reply you MUST call the tool %s."
                         % json.dumps(MCP_PREFIX + mcp_names(tools)[tool_choice["name"]]))
        return "\n\n".join(rules)

    def render_call(self, name, arguments, call_id=None):
        return "[tool call id=%s name=%s arguments=%s]" % (
            json.dumps(call_id), json.dumps(name), json.dumps(arguments, ensure_ascii=False))

    def render_result(self, block):
        content = block.get("content")
        if isinstance(content, list):
            content = "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
        head = "[tool result id=%s name=%s%s]" % (json.dumps(block.get("tool_use_id")),
                                                  json.dumps(block.get("name")),
                                                  " error" if block.get("is_error") else "")
        return "%s\n%s\n[end of tool result]" % (head, content if content is not None else "")


def register(handler_cls):
    """Make a handler class selectable by its `name` (X-Toolcall-Module)."""
    HANDLERS[handler_cls.name] = handler_cls()
    return handler_cls


register(BaseToolCallHandler)
register(NativeToolCallHandler)


def discover_modules(folder=None):
    """Import every modules/*.py beside this file; failures are recorded, not raised."""
    folder = pathlib.Path(folder or pathlib.Path(__file__).resolve().parent / "modules")
    if not folder.is_dir():
        return
    parent = str(folder.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    # handler modules import this file by name; when run as a script that is __main__
    sys.modules.setdefault("claude_openai_proxy", sys.modules[__name__])
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            importlib.import_module("%s.%s" % (folder.name, path.stem))
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not stop the server
            MODULE_ERRORS[path.stem] = "%s: %s" % (type(exc).__name__, exc)


def pick_handler(name, default):
    name = (name or default or "generic").strip()
    if name not in HANDLERS:
        raise BadRequest("Unknown tool-call handler %r (X-Toolcall-Module). Available: %s."
                         % (name, ", ".join(sorted(HANDLERS))))
    return HANDLERS[name]


@dataclass
class Attempt:
    held: list = field(default_factory=list)     # events not yet sent to the client
    text: str = ""
    calls: int = 0
    dropped: int = 0             # calls beyond the first when parallel_tool_calls is off
    holding: bool = True
    done: Done = None


def emulated_tool_events(req, run):
    """Run the request with prompt-emulated tools: text streams, tool blocks become calls.

    `run(messages)` yields CLI events for one attempt.  Text is held back only while it may be
    the start of a tool block, or (first REFUSAL_HOLD_CHARS) a false refusal worth one retry.
    A false refusal (or no call when one is required) is retried once with the handler's
    nudge; the retry is kept only if it produced a call.
    """
    handler = req.handler
    must_call = req.tool_choice == "required" or isinstance(req.tool_choice, dict)
    total = Usage()
    first = yield from _tool_attempt(req, run, req.messages, must_call, total)
    if first.holding and not first.calls and (must_call or handler.is_refusal(first.text)):
        retry = list(req.messages) + [
            Message("assistant", [{"type": "text", "text": first.text or "(no answer)"}]),
            Message("user", [{"type": "text", "text": handler.nudge()}])]
        gen = _tool_attempt(req, run, retry, True, total)
        while True:
            try:
                ev = next(gen)       # hold_all: nothing is yielded but heartbeats
            except StopIteration as stop:
                second = stop.value
                break
            if isinstance(ev, Heartbeat):
                yield ev
        if second.calls:
            first = second
    yield from first.held
    reason = "tool_use" if first.calls else (first.done.stop_reason if first.done else "end_turn")
    yield Done(reason, total, first.done.stop_sequence if first.done else None,
               whole=not first.dropped and (first.done is None or first.done.whole))


def _tool_attempt(req, run, messages, hold_all, total):
    handler, names, a = req.handler, {t.name for t in offered_tools(req)}, Attempt()
    pending, answer = "", []

    def convert(segs):
        for kind, val in segs:
            if kind == "text":
                answer.append(val)
                yield TextDelta(val)
            elif req.parallel_tool_calls or not a.calls:
                a.calls += 1
                yield ToolCall(new_id(req.id_prefix), val[0], json.dumps(val[1], ensure_ascii=False))
            else:
                a.dropped += 1

    for ev in run(messages):
        if isinstance(ev, TextDelta):
            pending += ev.text
            segs, used = handler.parse(pending, final=False, names=names)
            pending = pending[used:]
            out = list(convert(segs))
        elif isinstance(ev, Done):
            out = list(convert(handler.parse(pending, final=True, names=names)[0]))
            total.add(ev.usage)
            a.done = ev
        elif isinstance(ev, (Heartbeat, Start)):
            yield ev
            continue
        elif isinstance(ev, Reset):
            pending, a.calls, a.dropped = "", 0, 0
            answer.clear()
            a.held = []
            out = [ev]
        else:
            out = [ev]
        if not a.holding:
            yield from out
            continue
        a.held.extend(out)
        text = "".join(answer)
        if not hold_all and (a.calls or len(text) > REFUSAL_HOLD_CHARS) and \
                not handler.is_refusal(text):
            a.holding = False
            yield from a.held
            a.held = []
    a.text = "".join(answer)
    return a


# 7. CLI backend #################################################################################
# One CLI process per attempt (or per conversation, while Sessions keeps it), run as a plain
# model: no built-in tools, no CLAUDE.md, no settings, no session files, its own TMPDIR, an
# empty working directory, an allow-listed environment.  Prompts travel on stdin (stream-json),
# never on argv.  Native tools are the only tools it ever sees: the client's, through
# ToolBridge, and never run.

#: efforts a running process accepts per request (apply_flag_settings effortLevel); "max" is
#: session-only in the CLI, so it has to be a launch flag.
RUNTIME_EFFORTS = ("low", "medium", "high", "xhigh")


@dataclass(frozen=True)
class Launch:
    """What must be fixed when a CLI process starts (argv and environment); the pool is keyed
    on it.  System prompt, effort and model aliases are sent per request over the control
    protocol.  A full model id goes on argv: `set_model` with one costs an extra upstream
    probe request (max_tokens 1) on every run, `--model` does not."""
    model: str = ""              # a full id; "" = the default, or an alias set per request
    effort: str = ""             # only "max"
    disable_thinking: bool = False
    max_tokens: int = 0
    tool_choice: str = ""        # native tools: the upstream tool_choice as JSON (forced_choice)


def launch_of(req):
    forced = forced_choice(req)
    return Launch("" if req.cli_model in MODEL_FAMILIES else req.cli_model,
                  "max" if req.effort == "max" else "", req.disable_thinking or bool(forced),
                  req.max_tokens, json.dumps(forced, sort_keys=True) if forced else "")


def forced_choice(req):
    """The upstream tool_choice of a native request that must call a tool ("required" or a
    named tool), or None.  The CLI has no per-request tool_choice, but it merges
    CLAUDE_CODE_EXTRA_BODY into every upstream request body, so it is a launch setting (the
    pool keys processes on it).  The API refuses a forced tool_choice while thinking is on,
    so such a process runs with thinking off; a request that asks to see thinking keeps it,
    and the choice stays an instruction (NativeToolCallHandler.tool_prompt)."""
    if not native_tools(req) or req.thinking or req.tool_choice == "auto":
        return None
    if req.tool_choice == "required":
        choice = {"type": "any"}
    elif isinstance(req.tool_choice, dict) and req.tool_choice.get("name") in \
            {t.name for t in req.tools}:
        choice = {"type": "tool", "name": MCP_PREFIX + mcp_names(req.tools)[req.tool_choice["name"]]}
    else:
        return None
    if not req.parallel_tool_calls:
        choice["disable_parallel_tool_use"] = True
    return choice


def init_request(req, bridge=None):
    """The initialize control request: the per-request settings that go first."""
    init = {"subtype": "initialize", "systemPrompt": render_system(req)}
    if req.json_schema is not None:
        init["jsonSchema"] = req.json_schema
    if bridge is not None:
        init["sdkMcpServers"] = [MCP_SERVER]
        init["sdkMcpServerManifests"] = {MCP_SERVER: bridge.manifest()}
    return init


def control(rid, request):
    return {"type": "control_request", "request_id": rid, "request": request}


def control_lines(req, messages, bridge=None, proc=None, history=None):
    """The stdin lines for one request, the same for a fresh and a pre-started process
    (`proc`: the process; an alias equal to its --model needs no set_model, and an initialize
    it already got from the pool is not sent again).
    With `history` (structured turns) the user lines are left to send_history."""
    init = init_request(req, bridge)
    launched_with = proc.model if proc is not None else None
    lines = [] if proc is not None and proc.preinit == init else [control("init", init)]
    if req.cli_model in MODEL_FAMILIES and req.cli_model != launched_with:
        lines.append(control("model", {"subtype": "set_model", "model": req.cli_model}))
    if req.effort in RUNTIME_EFFORTS:
        lines.append(control("effort", {"subtype": "apply_flag_settings",
                                        "settings": {"effortLevel": req.effort}}))
    if history is None:
        lines.append(user_line(render_turn(messages, req.handler)))
    return lines


def user_line(blocks, query=True):
    """A user turn; with query=False it is only appended to the conversation (the CLI answers
    with a `result` line of num_turns 0 and no upstream call)."""
    line = {"type": "user", "session_id": "default", "parent_tool_use_id": None,
            "message": {"role": "user", "content": blocks}}
    if not query:
        line["shouldQuery"] = False
    return line


def assistant_line(blocks):
    """An earlier assistant turn: appended to the conversation at once, no answer."""
    return {"type": "assistant", "session_id": "default", "parent_tool_use_id": None,
            "message": {"role": "assistant", "content": blocks}}


def send_history(proc, call, first_lines, turns, last_line):
    """Give the CLI the earlier turns, then the querying user line; yields Heartbeats.

    Ordering is the CLI's weak spot: a shouldQuery:false user line is queued, while an
    assistant line is appended at once, so an assistant line sent before the user line ahead
    of it is acknowledged would overtake it (and the two user lines would merge).  So each
    earlier user line is the last line of a write and its acknowledgement (a `result` line)
    is awaited before the next write; assistant lines need no wait of their own and ride
    with the next write.  The first user line goes with the control lines, the last
    assistant line with the querying line: one wait per earlier user message, no more.
    """
    pending = list(first_lines)
    for role, blocks in turns:
        if role == "assistant":
            pending.append(assistant_line(blocks))
            continue
        pending.append(user_line(blocks, query=False))
        proc.send(*pending)
        pending = []
        yield from await_ack(proc, call)
    proc.send(*pending, last_line)


def await_ack(proc, call):
    """Read up to the `result` line that acknowledges a shouldQuery:false user line, handling
    what may arrive meanwhile (the answers to the control lines) as translate does; honours
    the request's deadline and client checks through proc.read."""
    for item in proc.read(call):
        if isinstance(item, Heartbeat):
            yield item
            continue
        if not isinstance(item, dict):
            if item:
                proc.garbage.append(item[:200])
            continue
        kind = item.get("type")
        if kind == "result":
            if item.get("is_error"):
                raise result_error(item, None, proc.rate_limit)
            return
        if kind == "control_request":
            refuse(proc, item.get("request_id"))
        elif kind == "rate_limit_event":
            proc.rate_limit = item.get("rate_limit_info") or proc.rate_limit
        elif kind == "control_response" and (item.get("response") or {}).get("subtype") == "error":
            resp = item["response"]
            raise BadRequest("The claude CLI refused the request settings (%s): %s"
                             % (resp.get("request_id"), scrub(str(resp.get("error")))))
    raise cli_ended(proc)


def launch_model(cfg, launch):
    return launch.model or resolve_model(cfg.default_model, None)[1]


def cli_argv(cfg, launch):
    # --permission-prompt-tool stdio: the CLI asks us (can_use_tool) before running a tool, which
    # native tools need; with no tools offered nothing asks and the upstream request is the same,
    # so every process gets it and the pool serves both modes.
    argv = [cfg.claude_bin, "-p", "--input-format", "stream-json",
            "--output-format", "stream-json", "--verbose", "--include-partial-messages",
            "--tools", "", "--no-session-persistence", "--setting-sources", "",
            "--strict-mcp-config", "--permission-prompt-tool", "stdio",
            "--model", launch_model(cfg, launch)]
    if launch.effort:
        argv += ["--effort", launch.effort]
    return argv


def env_allowed(name):
    if name in ENV_NEVER or name.startswith(ENV_NEVER_PREFIXES):
        return False
    return name in ENV_ALLOW or name.startswith(ENV_ALLOW_PREFIXES)


def cli_env(cfg, launch, tmpdir):
    env = {k: v for k, v in cfg.environ.items() if env_allowed(k)}
    for name in cfg.pass_env:
        if name in cfg.environ and name not in ENV_NEVER and not name.startswith(ENV_NEVER_PREFIXES):
            env[name] = cfg.environ[name]
    env.update(TMPDIR=tmpdir, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               CLAUDE_CODE_DISABLE_CLAUDE_MDS="1", ENABLE_TOOL_SEARCH="false",
               DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_RETRIES=str(max(0, cfg.cli_retries)))
    if launch.disable_thinking:
        env["CLAUDE_CODE_DISABLE_THINKING"] = "1"
    if launch.max_tokens:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(launch.max_tokens)
    if launch.tool_choice:
        try:           # the operator's own CLAUDE_CODE_EXTRA_BODY (CLAUDE_PROXY_PASS_ENV) stays
            extra = json.loads(env.get("CLAUDE_CODE_EXTRA_BODY") or "{}")
        except ValueError:
            extra = None
        extra = extra if isinstance(extra, dict) else {}
        env["CLAUDE_CODE_EXTRA_BODY"] = json.dumps(dict(extra, tool_choice=json.loads(
            launch.tool_choice)))
    return env


_EOF = object()
_SECRET = re.compile(r"(sk-ant-[A-Za-z0-9_-]{4})[A-Za-z0-9_-]+|(Bearer\s+)\S+")


def scrub(text):
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


class CLIProcess:
    """One running CLI: stdin for control/user lines, a reader thread turning stdout into a
    queue of parsed lines, stderr drained into a short tail (a full pipe would block it)."""

    def __init__(self, cfg, launch, workdir):
        self.tmp = tempfile.mkdtemp(prefix="claude-proxy-run-")
        try:
            self.proc = subprocess.Popen(
                cli_argv(cfg, launch), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=workdir, env=cli_env(cfg, launch, self.tmp),
                start_new_session=True)
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise CLIUnavailable("The claude CLI could not be started (CLAUDE_BIN=%r: %s). "
                                 "Install it (npm install -g @anthropic-ai/claude-code) or "
                                 "set CLAUDE_BIN to its path." % (cfg.claude_bin, exc.strerror or exc))
        self.launch = launch
        self.model = launch_model(cfg, launch)
        self.preinit = None          # the initialize request the pool gave it ahead of time
        self.refused = False         # ... and the CLI refused it
        self.born = time.monotonic()
        self.lines = queue.Queue()
        self.stderr_tail = collections.deque(maxlen=20)
        self.garbage = []
        self.stopped = None
        self.rate_limit = None       # the last rate_limit_info the CLI reported
        self.bridge = None           # native tools: the ToolBridge of a turn held open (kept)
        self.seen = 0                # stdout lines read so far
        self._closed = False
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read_stdout(self):
        try:
            for raw in self.proc.stdout:
                try:
                    self.lines.put(json.loads(raw))
                except ValueError:
                    self.lines.put(raw.decode("utf-8", "replace").strip())
        except (OSError, ValueError):
            pass
        self.lines.put(_EOF)

    def _read_stderr(self):
        try:
            for raw in self.proc.stderr:
                self.stderr_tail.append(scrub(raw.decode("utf-8", "replace").rstrip()))
        except (OSError, ValueError):
            pass

    def send(self, *objs):
        try:           # one write for all lines: each is a wake-up of the CLI's reader
            self.proc.stdin.write("".join(json.dumps(o) + "\n" for o in objs).encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass        # the process died; its stdout EOF reports that

    def read(self, call):
        """Yield parsed stdout lines, and HEARTBEAT while silent; checks deadline and client."""
        last_beat = time.monotonic()
        while True:
            try:
                item = self.lines.get(timeout=POLL_SECONDS)
            except queue.Empty:
                call.check()
                if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                    last_beat = time.monotonic()
                    yield Heartbeat()
                continue
            if item is _EOF:
                return
            self.seen += 1
            call.maybe_check()
            yield item

    def interrupt(self, reason="stop_sequence"):
        """End the running turn early; the result line still comes and `reason` becomes the
        stop reason."""
        self.stopped = reason
        self.send(control("stop", {"subtype": "interrupt"}))

    def fresh(self):
        """Alive and silent: a pre-started process that printed anything but the answer to an
        initialize given ahead (taken here) has gone wrong."""
        if self._closed or self.refused or self.proc.poll() is not None:
            return False
        while self.preinit is not None and not self.lines.empty():
            item = self.lines.get_nowait()
            if not (isinstance(item, dict) and item.get("type") == "control_response"):
                return False
            self.refused = (item.get("response") or {}).get("subtype") != "success"
            if self.refused:
                return False
        if not self.lines.empty():
            return False
        try:      # a killed multi-threaded process is a zombie before waitpid can reap it
            with open("/proc/%d/stat" % self.proc.pid, "rb") as f:
                return f.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
        except OSError:
            return True      # no /proc (not Linux): poll() already said it is alive

    def resume(self):
        """Ready a kept process for its conversation's next turn: alive, and nothing it printed
        while it waited is taken for the new answer."""
        if self._closed or self.proc.poll() is not None:
            return False
        while True:
            try:
                if self.lines.get_nowait() is _EOF:
                    return False
            except queue.Empty:
                break
        self.seen, self.stopped, self.garbage, self.rate_limit = 0, None, [], None
        return True

    def exit_status(self, wait=2.0):
        """The exit status once the process has ended (None if it hasn't within `wait`), with
        its stderr read to the end, so an error message can quote it."""
        try:
            status = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return None
        self._stderr_reader.join(timeout=1.0)
        return status

    def close(self):
        """Kill the whole process group and remove the run's TMPDIR; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)


class Gate:
    """Caps running CLI processes with a BoundedSemaphore; waiters are served in arrival order
    and give up after `timeout` seconds with a 429."""

    def __init__(self, capacity, timeout):
        self.capacity, self.timeout = capacity, timeout
        self._sem = threading.BoundedSemaphore(capacity)
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self.running = 0

    @property
    def queued(self):
        return len(self._queue)

    def acquire(self, call=None):
        ticket = object()
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._queue.append(ticket)
            try:
                while True:
                    if self._queue[0] is ticket and self._sem.acquire(blocking=False):
                        self._queue.popleft()
                        self.running += 1
                        self._cond.notify_all()
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RateLimited(
                            "All %d CLI slots are busy and the request waited %gs "
                            "(CLAUDE_PROXY_QUEUE_TIMEOUT). Retry later." % (self.capacity, self.timeout),
                            headers={"Retry-After": "5"})
                    self._cond.wait(min(left, POLL_SECONDS))
                    if call is not None:
                        call.check()
            except BaseException:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                raise

    def release(self):
        with self._cond:
            self.running -= 1
            self._sem.release()
            self._cond.notify_all()


class Pool:
    """Pre-started CLI processes, one request each.  A process boots (~0.7 s) before it reads
    stdin, so one started ahead of time answers several times sooner.

    It keeps `size` processes spread over the launch settings most recently asked for (one
    key: all of them; two keys, e.g. OpenAI defaults and an Anthropic max_tokens: one each),
    hands out only live, silent ones, replaces those idle longer than `max_idle` (so a
    re-login or a CLI upgrade is picked up), and after 3 deaths in a row without a good
    hand-out falls back to cold spawns for a while, which /health reports.

    When the last two requests of a launch key sent the same initialize (system prompt,
    schema), new processes for it get that initialize ahead of time (~50 ms off the request),
    all but one: a request with another system prompt still finds a process that got none.
    A process initialized ahead serves only a request with exactly that initialize, and is
    replaced once another initialize has been asked twice in a row.
    """
    BACKOFF = 60.0

    def __init__(self, backend, size, max_idle):
        self.backend, self.size, self.max_idle = backend, size, max_idle
        self.ready = collections.deque()
        self.recent = collections.OrderedDict([(Launch(), None)])   # most recent last
        self.cond = threading.Condition()
        self.hits = self.misses = self.failures = self.preinit_hits = 0
        self.failures_in_a_row = 0
        self.paused_until = 0.0
        self.closed = False
        #: launch -> (the initialize it was last asked with, how many times in a row)
        self.inits = {}
        if size > 0:
            threading.Thread(target=self._maintain, name="pool", daemon=True).start()

    def take(self, launch, init=None):
        """A ready process for `launch`: one that already got `init` (the request's initialize)
        if there is one, else one that got none; None when neither is ready."""
        if self.size <= 0:
            return None
        with self.cond:
            self.recent[launch] = None
            self.recent.move_to_end(launch)
            while len(self.recent) > self.size:
                self.inits.pop(self.recent.popitem(last=False)[0], None)
            seen, repeats = self.inits.get(launch, (None, 0))
            self.inits[launch] = (init, repeats + 1 if init is not None and init == seen else 1)
            found = None
            for proc in sorted(self.ready, key=lambda p: p.preinit != init):
                if proc.launch == launch and proc.preinit in (None, init):
                    self.ready.remove(proc)
                    if proc.fresh():
                        found = proc
                        break
                    self._unfit(proc)
            if found:
                self.hits += 1
                self.preinit_hits += found.preinit is not None
                self.failures_in_a_row = 0
            else:
                self.misses += 1
            self.cond.notify_all()
        return found

    def _unfit(self, proc):
        """End a ready process that is no longer fit (caller holds the lock).  One whose
        initialize given ahead was refused is not a death, and that initialize is not given
        ahead again until it is asked twice more; any other died."""
        if proc.refused:
            self.inits.pop(proc.launch, None)
            threading.Thread(target=self.backend.discard, args=(proc,), daemon=True).start()
        else:
            self._note_death(proc)

    def _superseded(self, proc):
        """A process initialized ahead for a system prompt that another one has replaced
        (asked twice in a row since), so no request is likely to want it."""
        init, repeats = self.inits.get(proc.launch, (None, 0))
        return proc.preinit is not None and proc.preinit != init and repeats >= 2

    def _note_death(self, proc=None):
        """Count a pooled process that died unused (caller holds the lock)."""
        self.failures += 1
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= 3:
            self.paused_until = time.monotonic() + self.BACKOFF
        if proc is not None:
            threading.Thread(target=self.backend.discard, args=(proc,), daemon=True).start()

    def note_stillborn(self):
        """A handed-out process died before it printed anything (see Backend.run)."""
        with self.cond:
            self._note_death()

    def _targets(self):
        keys = list(reversed(self.recent))
        return collections.Counter(keys[i % len(keys)] for i in range(self.size))

    def _maintain(self):
        while True:
            with self.cond:
                if self.closed:
                    return
                now, want = time.monotonic(), self._targets()
                have = collections.Counter()
                for proc in list(self.ready):
                    if not proc.fresh():
                        self.ready.remove(proc)
                        self._unfit(proc)
                    elif now - proc.born > self.max_idle or have[proc.launch] >= want[proc.launch] \
                            or self._superseded(proc):
                        self.ready.remove(proc)     # stale, or settings nobody asks for now
                        threading.Thread(target=self.backend.discard, args=(proc,), daemon=True).start()
                    else:
                        have[proc.launch] += 1
                short = [k for k in want if have[k] < want[k]]
                if not short or now < self.paused_until:
                    self.cond.wait(1.0)
                    continue
                # asked twice in a row with the same initialize (an agent's fixed system
                # prompt): the new process gets it now, which takes it off the request's path;
                # one process per launch key stays without, for a request with another prompt
                init, repeats = self.inits.get(short[0], (None, 0))
                plain = sum(p.launch == short[0] and p.preinit is None for p in self.ready)
                if repeats < 2 or not plain:
                    init = None
            try:
                proc = self.backend.spawn(short[0])
            except ProxyError:
                with self.cond:
                    self._note_death()
                continue
            if init is not None:      # read while it boots; its answer is taken by fresh()
                proc.send(control("init", init))
                proc.preinit = init
            with self.cond:
                if self.closed:
                    self.backend.discard(proc)
                    return
                self.ready.append(proc)
            time.sleep(0.05)    # let a freshly spawned process show an immediate death

    def status(self):
        with self.cond:
            paused = time.monotonic() < self.paused_until
            return {"size": self.size, "ready": sum(p.fresh() for p in self.ready),
                    "hits": self.hits, "misses": self.misses, "initialized_hits": self.preinit_hits,
                    "start_failures": self.failures,
                    "mode": "off" if self.size == 0 else ("cold-fallback" if paused else "warm")}

    def close(self):
        with self.cond:
            self.closed = True
            procs = list(self.ready)
            self.ready.clear()
            self.cond.notify_all()
        for proc in procs:
            self.backend.discard(proc)


def conversation_hash(req, messages, h=None):
    """What a CLI process that answered `messages` holds, as a running SHA-256: the settings it
    was given (launch, model, effort, system prompt with the tool prompt, handler) and the
    conversation.  An assistant message counts by what a client can echo back of it, its text
    and its tool calls (ids, thinking and block boundaries are dropped or reshaped by clients);
    a user message counts whole.  With `h` (the hash of earlier messages) it goes on from there."""
    if h is None:
        # native tools are definitions, not system prompt text: they count on their own
        tools = [[t.name, t.description, t.parameters] for t in offered_tools(req)] \
            if native_tools(req) else []
        h = hashlib.sha256(json.dumps([repr(launch_of(req)), req.cli_model, req.effort,
                                       render_system(req), req.handler.name, tools],
                                      sort_keys=True).encode())
    for m in messages:
        if m.role == "assistant":
            text = "".join(b.get("text", "") for b in m.blocks if b.get("type") == "text")
            calls = [[b.get("name"), b.get("input")] for b in m.blocks if b.get("type") == "tool_use"]
            part = ["assistant", text.strip(), calls]
        else:
            part = ["user", m.blocks]
        h.update(json.dumps(part, sort_keys=True).encode())     # ASCII: lone surrogates too
    return h


class Sessions:
    """Conversations kept live between turns.  The process that answered a turn holds that
    conversation exactly as the upstream saw it; when the next request is that conversation,
    the answer as the client got it, and one new user message, the message goes to the same
    process: no start-up, no earlier turns to give it again, and the upstream request is the
    previous one plus the new turn, unchanged (the prompt cache's best case).

    A process is only ever continued by the conversation it answered (conversation_hash), so
    nothing of one conversation reaches another.  At most `size` are kept (the oldest is ended
    first), each for `max_idle` seconds (the upstream prompt cache lives 5 minutes).
    """

    def __init__(self, backend, size, max_idle):
        self.backend, self.size, self.max_idle = backend, size, max_idle
        self.kept = collections.OrderedDict()       # key -> (proc, parked at); oldest first
        self.cond = threading.Condition()
        self.hits = self.misses = 0
        self.closed = False
        if size > 0:
            threading.Thread(target=self._expire, name="sessions", daemon=True).start()

    def keep_for(self, req):
        """The request's Keep, or None when its turn is not kept: sessions off, flat history,
        structured output, a prefill, and a first message (most of those are one-shot
        requests; a CLI kept after its turn still works ~0.25 s of CPU, so a conversation is
        kept from its second turn on).  A native turn that ends in tool calls is kept with
        its first call held open (ToolBridge)."""
        messages = req.messages
        if self.size <= 0 or self.backend.cfg.history != "structured" \
                or req.json_schema is not None or messages[-1].role != "user" or len(messages) < 2:
            return None
        return Keep(self, req)

    def take(self, key):
        """The live process that holds conversation `key`, or None."""
        with self.cond:
            proc, _ = self.kept.pop(key, (None, 0))
            if proc is None:
                self.misses += 1
                return None
        if proc.resume():
            with self.cond:
                self.hits += 1
            return proc
        self.backend.discard(proc)
        with self.cond:
            self.misses += 1
        return None

    def note_stillborn(self):
        """The kept process taken died before it answered (see Backend.run): not a hit."""
        with self.cond:
            self.hits -= 1
            self.misses += 1

    def park(self, key, proc):
        with self.cond:
            if self.closed or self.size <= 0:
                ended = [proc]
            else:
                ended = [p for p, _ in [self.kept.pop(key, (None, 0))] if p is not None]
                self.kept[key] = (proc, time.monotonic())
                while len(self.kept) > self.size:
                    ended.append(self.kept.popitem(last=False)[1][0])
        for p in ended:      # not on the request's thread: the answer is still being sent
            threading.Thread(target=self.backend.discard, args=(p,), daemon=True).start()

    def _expire(self):
        while True:
            with self.cond:
                if self.closed:
                    return
                now = time.monotonic()     # waited long enough, or died while waiting
                old = [k for k, (p, at) in self.kept.items()
                       if now - at > self.max_idle or p.proc.poll() is not None]
                ended = [self.kept.pop(k)[0] for k in old]
                if not ended:
                    self.cond.wait(1.0)
            for p in ended:
                self.backend.discard(p)

    def status(self):
        with self.cond:
            return {"size": self.size, "kept": len(self.kept), "hits": self.hits,
                    "misses": self.misses}

    def close(self):
        with self.cond:
            self.closed = True
            procs = [p for p, _ in self.kept.values()]
            self.kept.clear()
            self.cond.notify_all()
        for p in procs:
            self.backend.discard(p)


class Keep:
    """One request's part in Sessions: the conversation it continues (`prior`), and the process
    that answered it, parked under the new conversation once the answer is known to be whole
    (the hash goes on from the request's messages: each is hashed once)."""

    def __init__(self, sessions, req):
        self.sessions, self.req, self.proc = sessions, req, None
        self._hash = conversation_hash(req, req.messages[:-1])
        self.prior = self._hash.hexdigest()
        conversation_hash(req, req.messages[-1:], self._hash)

    def finish(self, answer):
        if self.proc is not None:
            key = conversation_hash(self.req, [answer], self._hash.copy()).hexdigest()
            proc, self.proc = self.proc, None
            self.sessions.park(key, proc)

    def drop(self):
        proc, self.proc = self.proc, None
        if proc is not None:
            self.sessions.backend.discard(proc)


class Backend:
    """Starts CLI processes (or takes pre-started ones), translates their output into events,
    and ends them."""

    def __init__(self, cfg, workdir):
        self.cfg, self.workdir = cfg, workdir
        self.gate = Gate(cfg.max_concurrency, cfg.queue_timeout)
        self.live = set()
        self.lock = threading.Lock()
        self.started = 0
        self.pool = Pool(self, cfg.pool_size, cfg.pool_max_idle)
        self.sessions = Sessions(self, cfg.sessions, cfg.session_idle)

    def spawn(self, launch):
        proc = CLIProcess(self.cfg, launch, self.workdir)
        with self.lock:
            self.live.add(proc)
            self.started += 1
        return proc


    def discard(self, proc):
        proc.close()
        with self.lock:
            self.live.discard(proc)

    def run(self, req, messages, call, keep=None):
        """One CLI turn for `messages`: yields events, ends with Done or raises ProxyError.

        A process that holds the conversation so far (Sessions) gets only the new message.
        A pre-started or kept process can die between hand-out and its first line (a
        multi-threaded process killed a moment ago still looks alive to waitpid); nothing has
        reached the client or the upstream then, so the request goes once to a fresh process.
        With `keep`, a process whose turn ended whole is handed to it instead of being ended.
        """
        if native_tools(req) and req.json_schema is not None:
            raise BadRequest("Structured output (response_format / output_config.format) cannot "
                             "be combined with native tool mode; use the generic handler.")
        launch = launch_of(req)
        proc = self.sessions.take(keep.prior) if keep is not None else None
        held = proc.bridge if proc is not None else None
        results = held.answers(messages[-1]) if held is not None else None
        if held is not None and results is None:     # not the held calls' results: start anew
            self.discard(proc)
            self.sessions.note_stillborn()             # taken, but of no use: not a hit
            proc = None
        resumed = proc is not None
        # native tools' initialize carries the MCP handshake's answers (ToolBridge.manifest),
        # so an agent that sends the same tools again gets a process initialized ahead too
        pooled_init = init_request(req, ToolBridge(req) if native_tools(req) else None)
        proc = proc or self.pool.take(launch, pooled_init)
        while True:
            pooled, proc = proc is not None, proc or self.spawn(launch)
            bridge = ToolBridge(req, hold=keep is not None) if native_tools(req) else None
            try:
                last = user_line(render_turn(messages[-1:], req.handler, bridge))
                turns = history_turns(messages, req.handler, bridge) \
                    if self.cfg.history == "structured" and not resumed else None
                if resumed and held is not None:
                    bridge.continue_turn(proc, held, results)
                    proc.bridge = None
                elif resumed:
                    proc.send(last)
                elif turns is None:
                    proc.send(*control_lines(req, messages, bridge, proc))
                else:
                    yield from send_history(proc, call, control_lines(req, messages, bridge,
                                                                      proc, turns),
                                            turns, last)
                events = translate(proc, call, bridge, structured=req.json_schema is not None,
                                   streaming=req.stream)
                if req.stop:
                    events = cut_at_stops(events, req.stop, proc.interrupt)
                for ev in events:
                    if isinstance(ev, Done) and keep is not None and not proc.stopped:
                        proc.bridge = bridge if bridge is not None and bridge.waiting else None
                        keep.proc, proc = proc, None     # whole: Keep parks or ends it
                    yield ev
                return
            except StillBorn:
                if not pooled:
                    raise
                (self.sessions if resumed else self.pool).note_stillborn()
            finally:
                if proc is not None:
                    self.discard(proc)
            proc = self.pool.take(launch, pooled_init) if resumed else None
            resumed, held = False, None

    def close_all(self):
        self.pool.close()
        self.sessions.close()
        with self.lock:
            procs = list(self.live)
        for proc in procs:
            self.discard(proc)


#: the SDK MCP server that carries the client's tools in native mode; the model sees each tool
#: as MCP_PREFIX + name.  The CLI keeps only [A-Za-z0-9_-] in a name and silently drops a tool
#: whose full name is longer than MCP_NAME_MAX, so mcp_names() makes names it keeps as they are.
MCP_SERVER = "client"
MCP_PREFIX = "mcp__client__"
MCP_NAME_MAX = 128
MCP_PROTOCOL = "2025-11-25"      # the MCP version the CLI's client asks for (2.1.330)
DENY_MESSAGE = "claude-proxy hands this tool call to its API client; it is not run here."


def native_tools(req):
    """True when this request offers its tools to the model as real tools."""
    return bool(getattr(req.handler, "native", False) and req.tools and req.tool_choice != "none")


def mcp_names(tools):
    """{client tool name: MCP tool name}: safe characters, short enough, unique."""
    out, used = {}, set()
    room = MCP_NAME_MAX - len(MCP_PREFIX)
    for t in tools:
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", t.name)
        if len(safe) > room or safe in used:
            safe = "%s_%s" % (safe[:room - 9], hashlib.sha256(t.name.encode()).hexdigest()[:8])
        used.add(safe)
        out[t.name] = safe
    return out


class ToolBridge:
    """Native tools for one request: the client's tools as an SDK MCP server inside the CLI.

    The CLI asks for them over the control protocol (control_request mcp_message carrying
    JSON-RPC initialize, notifications, tools/list; every one must be answered, notifications
    included, or the CLI stalls).  The model's tool_use blocks stream like other blocks and
    become ToolCall + ToolCallDelta events.  Before running a tool the CLI asks can_use_tool,
    as soon as that block ends; answering then would abort the stream and cut off the calls
    still being written, so answers are held until the upstream message ends, then denied with
    interrupt: the turn stops after one upstream call and nothing runs.  A call the CLI rejects
    by itself (a name it does not know) gets no can_use_tool, and the CLI goes straight on to a
    second upstream call that an interrupt request does not stop; then `done` is set at once and
    the request ends with the usage seen in the stream (the process is killed after it).

    A turn that Sessions keeps (`hold`) is not stopped: its calls are allowed, and the CLI's
    tools/call for the first one (it runs them one at a time) is held open while the process
    waits for the conversation's next request.  When that request brings the client's results
    for exactly these calls, the held call is answered with its result, then each further call
    as the CLI asks for it (continue_turn), and the model goes on in the same turn: the
    upstream history is exactly what the model made, plus the client's results.
    """

    def __init__(self, req, hold=False):
        # names over all the client's tools, so a named tool_choice (only that tool offered)
        # leaves the names of the history's calls as they were in the steps before
        self.names = mcp_names(req.tools)
        self.client_name = {MCP_PREFIX + mcp: name for name, mcp in self.names.items()}
        self.listing = []
        for t in offered_tools(req):
            schema = dict(t.parameters)
            if schema.setdefault("type", "object") != "object":
                raise BadRequest("Tool %r: native tool mode needs the parameters to be a JSON "
                                 "schema of type object." % t.name, param="tools")
            self.listing.append({"name": self.names[t.name], "description": t.description,
                                 "inputSchema": schema})
        self.parallel, self.id_prefix = req.parallel_tool_calls, req.id_prefix
        self.blocks = {}         # stream block index -> call id, or None for a dropped call
        self.has_args = set()    # call ids that received argument text
        self.calls = []          # upstream tool_use ids handed to the client
        self.in_message = False  # an upstream message is streaming
        self.held = []           # can_use_tool request ids waiting for the message to end
        self.settled = set()     # tool_use ids the CLI asked about or answered itself
        self.ended = False       # a message with tool calls has ended: the turn must stop
        self.denied = False      # deny+interrupt sent: the CLI's result line ends the turn
        self.done = False        # nothing to wait for: end the request now
        self.usage = Usage()     # of the streamed message, for when `done` cuts the turn short
        self.hold = hold         # a kept turn: allow the calls, hold the first tools/call open
        self.waiting = {}        # tool_use id -> (control request id, JSON-RPC id) held open
        self.exact = False       # held with every call handed over: the process may be kept
        self.allowed = False     # a call was allowed (hold): its tools/call is on the way
        self.results = {}        # tool_use id -> the client's tool_result, in a continued turn

    def manifest(self):
        """The MCP handshake's answers given ahead in initialize (sdkMcpServerManifests): the
        CLI then answers its own MCP client's initialize and tools/list from them, and the
        three control round trips before the first upstream call are gone (measured in
        bench/agent_loop.py).  A CLI that asks with another protocol version, or predates the
        field, does the handshake over the control channel as before (_mcp answers it)."""
        return {"initializeResult": {"protocolVersion": MCP_PROTOCOL, "capabilities": {"tools": {}},
                                     "serverInfo": {"name": "claude-proxy", "version": __version__}},
                "toolsListResult": {"tools": self.listing}}

    # -- history -----------------------------------------------------------------------
    def turn(self, blocks):
        """A message of the conversation as the upstream saw it when it was new: the client's
        tool calls under the MCP names the model used and the ids it gave (_call's mapping,
        reversed), results as real tool_result blocks with is_error and the images they came
        with, placed first in their turn as the API wants; thinking is dropped (the CLI has no
        signature for it), and so are empty text blocks (the API refuses them)."""
        results, rest = [], []
        inner = [i for b in blocks if b.get("type") == "tool_result" for i in b.get("images") or ()]
        for b in blocks:
            kind = b.get("type")
            if kind == "tool_use":
                rest.append({"type": "tool_use", "id": self.upstream_id(b.get("id")),
                             "name": MCP_PREFIX + self.mcp_name(b.get("name") or ""),
                             "input": b.get("input") if isinstance(b.get("input"), dict) else {}})
            elif kind == "tool_result":
                # the form the CLI gives a result of a held call (_answer) to the upstream: a
                # list of blocks, or for an error its text, so a conversation reads the same
                # whether it was continued on its process or given to a new one
                content = b.get("content")
                content = "" if content is None else content
                if not b.get("is_error"):
                    content = ([{"type": "text", "text": content}] if content else []) + \
                        list(b.get("images") or ())
                result = {"type": "tool_result", "tool_use_id": self.upstream_id(b.get("tool_use_id")),
                          "content": content}
                if b.get("is_error"):
                    result["is_error"] = True
                results.append(result)
            elif (kind == "text" and b.get("text")) or (kind == "image" and b not in inner):
                rest.append(b)
        return results + rest

    def mcp_name(self, name):
        """The MCP name of a client tool; one the request no longer offers is made safe alike."""
        return self.names.get(name) or mcp_names([ToolSpec(name, "", {})])[name]

    def upstream_id(self, call_id):
        """The tool_use id the upstream gave a call that the client echoes back: _call handed
        toolu_X out as PREFIX+X.  Other ids (the client's own) are made safe for the API."""
        call_id = str(call_id or "")
        if self.id_prefix != "toolu_" and call_id.startswith(self.id_prefix):
            call_id = "toolu_" + call_id[len(self.id_prefix):]
        return re.sub(r"[^A-Za-z0-9_-]", "_", call_id) or "toolu_"

    # -- stream events -----------------------------------------------------------------
    def on_stream(self, proc, ev):
        """Tool events for one upstream stream event (text and thinking stay with translate)."""
        et = ev.get("type")
        if et == "message_start":
            self.in_message = True
            self.usage = Usage.from_api((ev.get("message") or {}).get("usage"))
        elif et == "message_delta":
            self.usage.output_tokens = int((ev.get("usage") or {}).get("output_tokens") or 0)
        elif et == "content_block_start" and (ev.get("content_block") or {}).get("type") == "tool_use":
            block = ev["content_block"]
            first = block.get("input") or {}
            ev_call = self._call(block.get("id"), block.get("name"),
                                 json.dumps(first, ensure_ascii=False) if first else "")
            self.blocks[ev.get("index")] = ev_call.id if ev_call else None
            if ev_call:
                yield ev_call
        elif et == "content_block_delta" and (ev.get("delta") or {}).get("type") == "input_json_delta":
            cid, text = self.blocks.get(ev.get("index")), ev["delta"].get("partial_json") or ""
            if cid and text:
                self.has_args.add(cid)
                yield ToolCallDelta(cid, text)
        elif et == "content_block_stop":
            cid = self.blocks.pop(ev.get("index"), None)
            if cid and cid not in self.has_args:
                yield ToolCallDelta(cid, "{}")
        elif et == "message_stop":
            self.in_message = False
            if ev.get("abandoned_blocks") and self.calls:
                raise UpstreamError("The upstream stream broke during a tool call; retry the "
                                    "request.")
            if self.calls and not ev.get("abandoned_blocks"):
                self.ended = True
                self._settle(proc)

    def on_block(self, proc, block):
        """A whole tool_use block (the CLI's non-streaming fallback after a dropped stream)."""
        ev_call = self._call(block.get("id"), block.get("name"),
                             json.dumps(block.get("input") or {}, ensure_ascii=False))
        if ev_call:
            yield ev_call
        self.ended = True
        self._settle(proc)

    def _call(self, tool_use_id, name, arguments):
        if not self.parallel and self.calls:
            self.hold = False         # the CLI has a call the client never gets: deny, not kept
            return None
        self.calls.append(tool_use_id)
        if isinstance(tool_use_id, str) and tool_use_id.startswith("toolu_"):
            cid = self.id_prefix + tool_use_id[len("toolu_"):]
        else:
            cid = new_id(self.id_prefix)
        name = name or ""
        client = self.client_name.get(name)
        if client is None:            # not offered (the CLI rejects it): pass the name on
            client = name[len(MCP_PREFIX):] if name.startswith(MCP_PREFIX) else name
        return ToolCall(cid, client, arguments)

    # -- control protocol --------------------------------------------------------------
    def on_control(self, proc, item):
        rid, request = item.get("request_id"), item.get("request") or {}
        sub = request.get("subtype")
        if sub == "mcp_message" and request.get("server_name") == MCP_SERVER:
            msg = request.get("message") or {}
            tid = ((msg.get("params") or {}).get("_meta") or {}).get("claudecode/toolUseId") \
                if msg.get("method") == "tools/call" else None
            if tid in self.results:
                return self._answer(proc, rid, msg.get("id"), self.results.pop(tid))
            if tid is not None and self.hold and tid in self.calls:
                self.waiting[tid] = (rid, msg.get("id"))    # answered by the next request
                self.exact = self.done = True
                return
            reply = self._mcp(msg)
            proc.send({"type": "control_response", "response": {
                "subtype": "success", "request_id": rid, "response": {"mcp_response": reply}}})
        elif sub == "can_use_tool":
            tid = request.get("tool_use_id")
            if tid in self.results:              # a call of the held turn: its result is here
                return self._allow(proc, rid, request.get("input"))
            self.settled.add(tid)
            self.held.append((rid, request.get("input")))
            if not self.in_message:
                self._settle(proc)
        else:
            refuse(proc, rid)

    def on_user(self, proc, item):
        """A user line: the CLI's own tool results (a call it rejected without asking)."""
        for b in (item.get("message") or {}).get("content") or []:
            if isinstance(b, dict) and b.get("type") == "tool_result":
                self.settled.add(b.get("tool_use_id"))
                if b.get("tool_use_id") in self.calls:
                    self.hold = False     # its history has a result the client never sent
        if self.ended:
            self._settle(proc)

    def _settle(self, proc):
        """Deny every held permission request once the message has ended; give up on a turn
        in which the CLI rejected every call itself."""
        if self.in_message:
            return
        for rid, tool_input in self.held:
            if self.hold:
                self._allow(proc, rid, tool_input)
                self.allowed = True
                continue
            proc.send({"type": "control_response", "response": {
                "subtype": "success", "request_id": rid,
                "response": {"behavior": "deny", "message": DENY_MESSAGE, "interrupt": True}}})
            self.denied = True
        self.held = []
        if self.ended and not self.denied and not self.allowed and \
                all(c in self.settled for c in self.calls):
            self.done = True

    @staticmethod
    def _allow(proc, rid, tool_input):
        proc.send({"type": "control_response", "response": {
            "subtype": "success", "request_id": rid,
            "response": {"behavior": "allow", "updatedInput": tool_input or {}}}})

    def _answer(self, proc, rid, mid, block):
        """Answer a tools/call with the client's tool_result (MCP content: text, images)."""
        content = block.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) and content else []
        items += [{"type": "image", "data": i["source"]["data"], "mimeType": i["source"]["media_type"]}
                  for i in block.get("images") or ()]
        result = {"content": items or [{"type": "text", "text": ""}],
                  "isError": bool(block.get("is_error"))}
        proc.send({"type": "control_response", "response": {
            "subtype": "success", "request_id": rid,
            "response": {"mcp_response": {"jsonrpc": "2.0", "id": mid, "result": result}}}})

    # -- a held turn, continued --------------------------------------------------------
    def answers(self, message):
        """The client's results in `message` for the calls this held turn made, by upstream
        id, or None when the message is not exactly those results (then the conversation goes
        to a new process, given as history)."""
        if not self.waiting or message.role != "user":
            return None
        results, images = {}, []
        for b in message.blocks:
            if b.get("type") == "tool_result":
                results[self.upstream_id(b.get("tool_use_id"))] = b
                images += b.get("images") or []
        if set(results) != set(self.calls) or \
                any(b.get("type") != "tool_result" and b not in images for b in message.blocks):
            return None
        return results

    def continue_turn(self, proc, held, results):
        """Go on with the turn that `held` (the bridge of the request before) left open."""
        self.results = dict(results)
        for tid, (rid, mid) in held.waiting.items():
            self._answer(proc, rid, mid, self.results.pop(tid))
        held.waiting = {}

    def _mcp(self, msg):
        """The JSON-RPC answer of the MCP server 'client' to one message."""
        method, mid = msg.get("method"), msg.get("id")
        if mid is None:                       # a notification: acknowledged, nothing to do
            return {"jsonrpc": "2.0", "result": {}}
        if method == "initialize":
            result = dict(self.manifest()["initializeResult"], protocolVersion=(
                msg.get("params") or {}).get("protocolVersion") or MCP_PROTOCOL)
        elif method == "tools/list":
            result = {"tools": self.listing}
        elif method == "tools/call":          # not reached: every call is denied first
            result = {"isError": True, "content": [{"type": "text", "text": DENY_MESSAGE}]}
        elif method == "ping":
            result = {}
        else:
            return {"jsonrpc": "2.0", "id": mid,
                    "error": {"code": -32601, "message": "Method not found: %s" % method}}
        return {"jsonrpc": "2.0", "id": mid, "result": result}


def refuse(proc, request_id):
    proc.send({"type": "control_response", "response": {
        "subtype": "error", "request_id": request_id, "error": "not supported by claude-proxy"}})


def translate(proc, call, bridge=None, structured=False, streaming=True):
    """stream-json lines -> events.  The `result` line is authoritative for errors and usage.

    With a ToolBridge (native tools) the CLI's control requests go to it, and so do tool_use
    blocks; once it has handed calls over, anything the CLI still streams is ignored, and a
    bridge that is `done` ends the request without waiting for the result line.
    With `structured`, the answer is the validated `structured_output` of the result line (the
    CLI's StructuredOutput tool), sent as one text delta; prose around it is dropped.
    """
    started, last_retry, replay = False, None, Replay(streaming)
    live = False             # a streamed upstream message is open (its text comes as deltas)
    for item in proc.read(call):
        if isinstance(item, Heartbeat):
            yield item
            continue
        if not isinstance(item, dict):
            if item:
                proc.garbage.append(item[:200])
            continue
        kind = item.get("type")
        if kind == "stream_event":
            ev = item.get("event") or {}
            et = ev.get("type")
            if proc.stopped:
                continue                         # what follows an interrupt is not the answer
            if bridge is not None and not bridge.ended:
                yield from bridge.on_stream(proc, ev)
            elif bridge is not None and et == "message_start":
                bridge.done = True           # the CLI went on to another upstream call
            if bridge is not None and bridge.ended:
                pass                         # calls handed over: the rest is not the answer
            elif et == "message_start":
                live = True
                if not started:
                    started = True
                    yield Start(Usage.from_api((ev.get("message") or {}).get("usage")))
            elif et == "message_delta" and (ev.get("delta") or {}).get("stop_reason") == "max_tokens":
                # the CLI would ask the model to resume (up to 3 times) and join the pieces;
                # API clients expect the cut-off answer with its stop reason instead
                proc.interrupt("max_tokens")
            elif et == "content_block_delta":
                d = ev.get("delta") or {}
                dt = d.get("type")
                if dt == "text_delta" and d.get("text") and not structured:
                    yield from replay.text(d["text"])
                elif dt == "thinking_delta" and d.get("thinking"):
                    yield from replay.thinking(d["thinking"])
                elif dt == "signature_delta":
                    yield ThinkingDelta("", d.get("signature", ""))
            elif et == "message_stop" and ev.get("abandoned_blocks"):
                yield from replay.restart()
                live = False
        elif kind == "assistant" and replay.retried and not live and \
                (item.get("message") or {}).get("model") != "<synthetic>":
            # the CLI's non-streaming fallback after a dropped stream arrives as whole blocks
            # (a "<synthetic>" message is the CLI's own error text; the result line reports it)
            for block in (item.get("message") or {}).get("content") or []:
                if block.get("type") == "text" and block.get("text") and not structured:
                    yield from replay.text(block["text"])
                elif block.get("type") == "tool_use" and bridge is not None and not bridge.ended:
                    yield from bridge.on_block(proc, block)
        elif kind == "rate_limit_event":
            proc.rate_limit = item.get("rate_limit_info") or proc.rate_limit
        elif kind == "system" and item.get("subtype") == "api_retry":
            last_retry = item
            yield from replay.restart()      # the CLI asks again, from the start
            live = False
        elif kind == "control_request":
            if bridge is not None:
                bridge.on_control(proc, item)
            else:
                # nothing is offered to the CLI in plain-model mode; refuse so it never waits
                refuse(proc, item.get("request_id"))
        elif kind == "user" and bridge is not None:
            bridge.on_user(proc, item)
        elif kind == "control_response":
            resp = item.get("response") or {}
            if resp.get("subtype") == "error":
                raise BadRequest("The claude CLI refused the request settings (%s): %s"
                                 % (resp.get("request_id"), scrub(str(resp.get("error")))))
        elif kind == "result":
            usage = Usage.from_api(item.get("usage"))
            if bridge is not None and bridge.calls and item.get("api_error_status") is None:
                # the turn this proxy stopped reads as an error (aborted_tools): it is the answer,
                # but the process heard denials the client never saw (Sessions must not keep it)
                yield Done("tool_use", usage, whole=False)
                return
            if proc.stopped:
                yield Done(proc.stopped, usage)
                return
            if item.get("is_error") or item.get("subtype") == "error_max_structured_output_retries":
                raise result_error(item, last_retry, proc.rate_limit)
            if structured:
                if "structured_output" not in item:
                    raise UpstreamError("The model did not return JSON matching the schema.")
                yield TextDelta(json.dumps(item["structured_output"], ensure_ascii=False))
                yield Done("end_turn", usage)
                return
            # a re-asked answer shorter than the text already streamed: the client has more
            # than the CLI keeps (Sessions must not continue it)
            yield Done(item.get("stop_reason") or "end_turn", usage,
                       whole=not any(replay.skip.values()))
            return
        if bridge is not None and bridge.done:
            # held open (bridge.exact): the process may wait for the results; else it is ended
            yield Done("tool_use", bridge.usage, whole=bridge.exact)
            return
    raise cli_ended(proc)


def cli_ended(proc):
    """The error for a CLI whose output ended before the line that was awaited."""
    status = proc.exit_status()
    detail = "; ".join(list(proc.stderr_tail)[-3:] or proc.garbage[-3:]) or "no output"
    error = StillBorn if not proc.seen else UpstreamError
    return error("The claude CLI ended without an answer (exit status %s): %s" % (status, detail))


def cut_at_stops(events, stops, interrupt):
    """End the text at the first stop sequence (excluded), as the real APIs do, and stop the
    CLI.  A tail that may be the start of a stop sequence is held back until it is decided."""
    pending, hit, keep = "", None, max(len(s) for s in stops) - 1
    for ev in events:
        if hit is not None:
            if isinstance(ev, Done):
                yield Done("stop_sequence", ev.usage, hit)
                return
            if isinstance(ev, Heartbeat):
                yield ev
            continue
        if not isinstance(ev, TextDelta):
            if isinstance(ev, Done) and pending:
                yield TextDelta(pending)
                pending = ""
            yield ev
            continue
        pending += ev.text
        found = [(pending.find(s), s) for s in stops if s in pending]
        if found:
            i, hit = min(found)
            if i:
                yield TextDelta(pending[:i])
            interrupt()
            continue
        cut = len(pending) - keep
        if cut > 0:
            yield TextDelta(pending[:cut])
            pending = pending[cut:]


class Replay:
    """When the CLI asks again after a dropped stream (`api_retry`, `abandoned_blocks`), the
    answer starts over.  A non-streaming request just forgets what it had (Reset).  A stream
    can't take back what it sent: the new answer continues where the client is if it starts
    with the sent text, and is an error otherwise."""

    def __init__(self, streaming):
        self.streaming = streaming
        self.sent = {"text": [], "thinking": []}
        self.skip = {"text": "", "thinking": ""}
        self.retried = False

    def restart(self):
        self.retried = True
        if not self.streaming:
            if any(self.sent.values()):
                yield Reset()
            self.sent = {"text": [], "thinking": []}
            return
        self.skip = {kind: "".join(parts) for kind, parts in self.sent.items()}

    def _pass(self, kind, piece):
        skip = self.skip[kind]
        if skip:
            n = min(len(piece), len(skip))
            if piece[:n] != skip[:n]:
                raise UpstreamError("The upstream stream broke and the answer asked for again "
                                    "differs from the text already sent; retry the request.")
            piece, self.skip[kind] = piece[n:], skip[n:]
        if piece:
            self.sent[kind].append(piece)
        return piece

    def text(self, piece):
        piece = self._pass("text", piece)
        if piece:
            yield TextDelta(piece)

    def thinking(self, piece):
        piece = self._pass("thinking", piece)
        if piece:
            yield ThinkingDelta(piece)


def limit_headers(info):
    """Rate-limit facts the CLI reports (rate_limit_event, or a 429 result's
    api_error_params.rate_limit_info; subscription logins only) as response headers, in the
    spellings OpenAI and Anthropic clients read."""
    headers = {}
    if not isinstance(info, dict):
        return headers
    resets = info.get("resetsAt")
    if isinstance(resets, (int, float)) and not isinstance(resets, bool):
        resets = resets / 1000 if resets > 1e11 else resets      # seconds or milliseconds
        wait = max(1, int(resets - time.time() + 0.999))
        headers.update({"Retry-After": str(wait), "x-ratelimit-reset-requests": "%ds" % wait,
                        "anthropic-ratelimit-unified-reset": str(int(resets))})
    for key, header in (("status", "anthropic-ratelimit-unified-status"),
                        ("rateLimitType", "anthropic-ratelimit-unified-type"),
                        ("utilization", "anthropic-ratelimit-unified-utilization")):
        if isinstance(info.get(key), (str, int, float)) and not isinstance(info.get(key), bool):
            headers[header] = str(info[key])
    if info.get("status") == "rejected":
        headers["x-ratelimit-remaining-requests"] = "0"
    return headers


def result_error(result, last_retry, rate_limit=None):
    status = result.get("api_error_status")
    text = scrub(str(result.get("result") or "; ".join(result.get("errors") or []) or
                     result.get("terminal_reason") or "unknown error"))
    if status in (401, 403):
        return UpstreamError(
            "The claude CLI on the proxy server could not authenticate (upstream %s: %s). "
            "On the server, run `claude login` (or `claude setup-token` and set "
            "CLAUDE_CODE_OAUTH_TOKEN)." % (status, text))
    if status == 429:
        delay = (last_retry or {}).get("retry_delay_ms")
        after = str(max(1, int(-(-delay // 1000)))) if isinstance(delay, (int, float)) else "30"
        info = (result.get("api_error_params") or {}).get("rate_limit_info") or rate_limit
        return RateLimited("Upstream rate limit: %s" % text,
                           headers=dict({"Retry-After": after}, **limit_headers(info)))
    if status == 529:
        return Overloaded("Upstream overloaded: %s" % text)
    if result.get("subtype") == "error_max_structured_output_retries":
        return UpstreamError("The model did not produce JSON matching the requested schema "
                             "(the CLI gave up after its retries).")
    if status == 400 or "prompt is too long" in text.lower():
        return BadRequest("Upstream rejected the request: %s" % text)
    if status == 404:
        return NotFound("Upstream: %s" % text)
    if status == 413:
        return TooLarge("Upstream: %s" % text)
    if status is None and result.get("terminal_reason") == "api_error":
        return UpstreamError("Could not reach the upstream API: %s" % text)
    return UpstreamError("The claude CLI failed (upstream status %s): %s" % (status, text))


# 8. SSE #########################################################################################

class SSE:
    """Server-sent events over chunked HTTP/1.1: every event is written and flushed at once."""

    def __init__(self, handler):
        self.handler = handler
        self.started = False

    def start(self, headers=()):
        h = self.handler
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("X-Accel-Buffering", "no")
        h.send_header("Transfer-Encoding", "chunked")
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        self.started = True

    def _write(self, data):
        try:
            self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except (OSError, ValueError) as exc:
            raise ClientGone() from exc

    def event(self, data, name=None):
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        head = ("event: %s\n" % name) if name else ""
        self._write(("%sdata: %s\n\n" % (head, payload)).encode())

    def comment(self, text):
        self._write((": %s\n\n" % text).encode())

    def end(self):
        try:
            self.handler.wfile.write(b"0\r\n\r\n")
        except (OSError, ValueError):
            self.handler.close_connection = True


def first_then(events):
    """Pull the first event before the response starts, so early failures keep their status;
    the same events, first one included."""
    it = iter(events)
    first = next(it, None)
    return itertools.chain(() if first is None else (first,), it)


# 9. OpenAI chat completions #####################################################################

def _need(cond, message, param=None):
    if not cond:
        raise BadRequest(message, param=param)


def _text_of(content, where):
    """Plain text of an OpenAI content value (string or list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    _need(isinstance(content, list), "%s.content must be a string or a list of parts" % where, where)
    out = []
    for i, part in enumerate(content):
        _need(isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"),
              "%s.content[%d] must be a text part here" % (where, i), where)
        _need(isinstance(part.get("text"), str), "%s.content[%d].text must be a string" % (where, i))
        out.append(part["text"])
    return "\n".join(out)


def _openai_parts(content, where):
    """OpenAI user content -> Anthropic blocks (text, image from data: URLs)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _need(isinstance(content, list), "%s.content must be a string or a list of parts" % where, where)
    blocks = []
    for i, part in enumerate(content):
        at = "%s.content[%d]" % (where, i)
        _need(isinstance(part, dict), "%s must be an object" % at, at)
        kind = part.get("type")
        if kind in ("text", "input_text"):
            _need(isinstance(part.get("text"), str), "%s.text must be a string" % at, at)
            blocks.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            blocks.append(image_block(url))
        else:
            raise BadRequest("%s has unsupported type %r (supported: text, image_url)" % (at, kind), param=at)
    return blocks


def _openai_tools(body):
    tools, choice = [], body.get("tool_choice", "auto")
    if body.get("functions") is not None and body.get("tools") is None:     # legacy API
        _need(isinstance(body["functions"], list), "functions must be a list", "functions")
        raw = [{"type": "function", "function": f} for f in body["functions"]]
        fc = body.get("function_call", "auto")
        choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
    else:
        raw = body.get("tools") or []
        _need(isinstance(raw, list), "tools must be a list", "tools")
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        _need(isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(fn, dict),
              "tools[%d] must be {\"type\": \"function\", \"function\": {...}}" % i, "tools")
        _need(isinstance(fn.get("name"), str) and re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", fn["name"]),
              "tools[%d].function.name must be 1-128 letters, digits, _ . : or -" % i, "tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        _need(isinstance(params, dict), "tools[%d].function.parameters must be an object" % i, "tools")
        tools.append(ToolSpec(fn["name"], fn.get("description") or "", params))
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        _need(isinstance(name, str), "tool_choice must name a function: "
              "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        _need(any(t.name == name for t in tools), "tool_choice names %r, which is not in tools" % name,
              "tool_choice")
        choice = {"name": name}
    else:
        _need(choice in ("auto", "none", "required"),
              "tool_choice must be auto, none, required or a named function", "tool_choice")
        _need(choice != "required" or tools, "tool_choice is required but no tools were given",
              "tool_choice")
    return tools, choice


def parse_openai_messages(messages, names_by_id=None):
    """OpenAI messages -> (system text, [Message])."""
    _need(isinstance(messages, list) and messages, "messages must be a non-empty list", "messages")
    system, out, names_by_id = [], [], dict(names_by_id or {})
    for i, m in enumerate(messages):
        where = "messages[%d]" % i
        _need(isinstance(m, dict), "%s must be an object" % where, "messages")
        role, content = m.get("role"), m.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, where))
        elif role == "user":
            _need(content is not None, "%s.content is required" % where, "messages")
            out.append(Message("user", _openai_parts(content, where)))
        elif role == "assistant":
            blocks = [{"type": "text", "text": _text_of(content, where)}] if content else []
            calls = m.get("tool_calls") or []
            if m.get("function_call"):
                calls = calls + [{"id": "call_legacy_%d" % i, "function": m["function_call"]}]
            _need(isinstance(calls, list), "%s.tool_calls must be a list" % where, "messages")
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                _need(isinstance(fn, dict) and isinstance(fn.get("name"), str),
                      "%s.tool_calls[%d] needs function.name" % (where, j), "messages")
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    args = {"_raw_arguments": args}
                cid = c.get("id") or "call_%d_%d" % (i, j)
                names_by_id[cid] = fn["name"]
                blocks.append({"type": "tool_use", "id": cid, "name": fn["name"], "input": args})
            if blocks:
                out.append(Message("assistant", blocks))
        elif role in ("tool", "function"):
            cid = m.get("tool_call_id") if role == "tool" else "call_legacy_%d" % (i - 1)
            _need(isinstance(cid, str) or role == "function", "%s.tool_call_id is required" % where, "messages")
            name = names_by_id.get(cid) or m.get("name")
            out.append(Message("user", [{"type": "tool_result", "tool_use_id": cid, "name": name,
                                         "content": _text_of(content, where)}]))
        else:
            raise BadRequest("%s.role %r is not one of system, developer, user, assistant, tool"
                             % (where, role), param="messages")
    _need(out, "messages must contain at least one user or assistant message", "messages")
    return "\n\n".join(s for s in system if s), merge_messages(out)


def _openai_schema(fmt):
    """response_format -> a JSON schema for the CLI's --json-schema, or None for text."""
    if fmt is None:
        return None
    _need(isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object", "json_schema"),
          "response_format.type must be text, json_object or json_schema", "response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "object"}
    spec = fmt.get("json_schema")
    _need(isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict),
          "response_format.json_schema must be {\"name\": ..., \"schema\": {...}}", "response_format")
    return spec.get("schema") or {"type": "object"}


class OpenAIChat:
    name = "openai"
    call_id_prefix = "call_"
    FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
              "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}
    TYPES = {"api_error": "server_error", "overloaded_error": "server_error",
             "timeout_error": "timeout", "request_too_large": "invalid_request_error"}

    def parse(self, body, headers, cfg):
        _need(isinstance(body, dict), "The request body must be a JSON object")
        model, cli_model = resolve_model(body.get("model"), cfg.default_model)
        system, messages = parse_openai_messages(body.get("messages"))
        n = body.get("n", 1)
        _need(n in (None, 1), "n must be 1: the CLI returns one choice per request", "n")
        _need(isinstance(body.get("stream", False), bool), "stream must be true or false", "stream")
        tools, choice = _openai_tools(body)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        _need(isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4,
              "stop must be a string or a list of up to 4 non-empty strings", "stop")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        _need(max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
                                     and max_tokens >= 1),
              "max_tokens must be a positive integer", "max_tokens")
        effort = body.get("reasoning_effort")
        _need(effort in (None, "none", "minimal", "low", "medium", "high", "xhigh", "max"),
              "reasoning_effort must be one of none, minimal, low, medium, high, xhigh, max",
              "reasoning_effort")
        schema = _openai_schema(body.get("response_format"))
        _need(not body.get("logprobs"), "logprobs are not available from the claude CLI", "logprobs")
        opts = body.get("stream_options") or {}
        _need(isinstance(opts, dict), "stream_options must be an object", "stream_options")
        return Request(
            model=model, cli_model=cli_model, messages=messages, system=system,
            stream=bool(body.get("stream")), tools=tools, tool_choice=choice,
            parallel_tool_calls=body.get("parallel_tool_calls") is not False and
            body.get("functions") is None, stop=stop,
            effort={"minimal": "low", "none": ""}.get(effort, effort or ""),
            max_tokens=max_tokens or 0, thinking=effort not in (None, "none"),
            disable_thinking=effort == "none", include_usage=bool(opts.get("include_usage")),
            json_schema=schema)

    @staticmethod
    def usage(u):
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.output_tokens,
                "total_tokens": u.prompt_tokens + u.output_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cache_read},
                "completion_tokens_details": {"reasoning_tokens": 0}}

    def render(self, req, c, body):
        msg = {"role": "assistant", "content": c.text if (c.text or not c.tool_calls) else None,
               "refusal": None}
        if req.thinking and c.thinking:
            msg["reasoning_content"] = c.thinking
        finish = self.FINISH.get(c.stop_reason, "stop")
        if c.tool_calls and body.get("functions") is not None and body.get("tools") is None:
            call = c.tool_calls[0]
            msg["function_call"] = {"name": call.name, "arguments": call.arguments}
            finish = "function_call"
        elif c.tool_calls:
            msg["tool_calls"] = [{"id": t.id, "type": "function",
                                  "function": {"name": t.name, "arguments": t.arguments}}
                                 for t in c.tool_calls]
        return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage(c.usage)}

    def stream(self, req, events, sse, body):
        base = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk",
                "created": int(time.time()), "model": req.model, "system_fingerprint": None}

        def chunk(delta, finish=None):
            d = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}])
            if req.include_usage:
                d["usage"] = None
            sse.event(d)

        chunk({"role": "assistant", "content": ""})
        calls = {}               # tool call id -> index
        try:
            for ev in events:
                if isinstance(ev, TextDelta):
                    if ev.text:
                        chunk({"content": ev.text})
                elif isinstance(ev, ThinkingDelta):
                    if req.thinking and ev.text:
                        chunk({"reasoning_content": ev.text})
                elif isinstance(ev, ToolCall):
                    calls[ev.id] = len(calls)
                    chunk({"tool_calls": [{"index": calls[ev.id], "id": ev.id, "type": "function",
                                           "function": {"name": ev.name, "arguments": ""}}]})
                    if ev.arguments:
                        chunk({"tool_calls": [{"index": calls[ev.id],
                                               "function": {"arguments": ev.arguments}}]})
                elif isinstance(ev, ToolCallDelta):
                    if ev.id in calls:
                        chunk({"tool_calls": [{"index": calls[ev.id],
                                               "function": {"arguments": ev.arguments}}]})
                elif isinstance(ev, Heartbeat):
                    sse.comment("keep-alive")
                elif isinstance(ev, Done):
                    chunk({}, self.FINISH.get(ev.stop_reason, "stop"))
                    if req.include_usage:
                        sse.event(dict(base, choices=[], usage=self.usage(ev.usage)))
        except ProxyError as err:
            sse.event(self.error(err)[1])
        sse.event("[DONE]")

    def error(self, err):
        status = 503 if err.status == 529 else err.status
        return status, {"error": {"message": err.message, "type": self.TYPES.get(err.kind, err.kind),
                                  "param": err.param, "code": err.kind if status >= 500 else None}}


# 10. Anthropic messages #########################################################################

def _anthropic_blocks(content, where, role):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _need(isinstance(content, list), "%s.content must be a string or a list of blocks" % where)
    blocks = []
    for i, b in enumerate(content):
        at = "%s.content.%d" % (where, i)
        _need(isinstance(b, dict), "%s must be an object" % at)
        kind = b.get("type")
        if kind == "text":
            _need(isinstance(b.get("text"), str), "%s.text: Field required" % at)
            blocks.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            src = b.get("source") or {}
            _need(isinstance(src, dict), "%s.source must be an object" % at)
            if src.get("type") == "url":
                image_block(src.get("url"))           # raises the remote-URL error
            _need(src.get("type") == "base64" and isinstance(src.get("data"), str),
                  "%s.source must be {\"type\": \"base64\", \"media_type\": ..., \"data\": ...}" % at)
            blocks.append(image_block("data:%s;base64,%s" % (src.get("media_type"), src["data"])))
        elif kind == "tool_use":
            _need(role == "assistant", "%s: tool_use blocks belong to assistant messages" % at)
            _need(isinstance(b.get("id"), str) and isinstance(b.get("name"), str),
                  "%s needs id and name" % at)
            blocks.append({"type": "tool_use", "id": b["id"], "name": b["name"],
                           "input": b.get("input") if isinstance(b.get("input"), dict) else {}})
        elif kind == "tool_result":
            _need(role == "user", "%s: tool_result blocks belong to user messages" % at)
            _need(isinstance(b.get("tool_use_id"), str), "%s.tool_use_id: Field required" % at)
            inner, images = b.get("content", ""), []
            if isinstance(inner, list):
                inner = _anthropic_blocks(inner, at, "user")
                text = "\n".join(x.get("text", "") for x in inner if x.get("type") == "text")
                images = [x for x in inner if x.get("type") == "image"]
                blocks.extend(images)
                inner = text
            _need(isinstance(inner, str), "%s.content must be a string or blocks" % at)
            blocks.append({"type": "tool_result", "tool_use_id": b["tool_use_id"], "content": inner,
                           "is_error": bool(b.get("is_error"))})
            if images:                   # native tools give them back inside the result
                blocks[-1]["images"] = images
        elif kind in ("thinking", "redacted_thinking"):
            continue                                  # not replayed to the model
        else:
            raise BadRequest("%s.type %r is not supported (text, image, tool_use, tool_result, "
                             "thinking)" % (at, kind))
    return blocks


class AnthropicMessages:
    name = "anthropic"
    call_id_prefix = "toolu_"
    STOP = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"}

    def parse(self, body, headers, cfg, count_only=False):
        _need(isinstance(body, dict), "The request body must be a JSON object")
        _need("model" in body, "model: Field required")
        _need(isinstance(body.get("model"), str), "model: Input should be a valid string")
        model, cli_model = resolve_model(body["model"], cfg.default_model)
        if not count_only:
            mt = body.get("max_tokens")
            _need(mt is not None, "max_tokens: Field required")
            _need(isinstance(mt, int) and not isinstance(mt, bool) and mt >= 1,
                  "max_tokens: Input should be a positive integer")
        msgs = body.get("messages")
        _need(isinstance(msgs, list), "messages: Field required (a list)")
        _need(msgs, "messages: at least one message is required")
        out, names = [], {}
        for i, m in enumerate(msgs):
            _need(isinstance(m, dict), "messages.%d: Input should be an object" % i)
            role = m.get("role")
            _need(role in ("user", "assistant"), "messages.%d.role: Input should be 'user' or "
                  "'assistant'" % i)
            _need("content" in m, "messages.%d.content: Field required" % i)
            blocks = _anthropic_blocks(m["content"], "messages.%d" % i, role)
            for b in blocks:
                if b["type"] == "tool_use":
                    names[b["id"]] = b["name"]
                elif b["type"] == "tool_result":
                    b["name"] = names.get(b["tool_use_id"])
            out.append(Message(role, blocks))
        system = body.get("system", "")
        if isinstance(system, list):
            _need(all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
                      for b in system), "system: blocks must be text blocks")
            system = "\n\n".join(b["text"] for b in system)
        _need(isinstance(system, str), "system: Input should be a string or a list of text blocks")
        tools = []
        raw_tools = body.get("tools") or []
        _need(isinstance(raw_tools, list), "tools: Input should be a list")
        for i, t in enumerate(raw_tools):
            _need(isinstance(t, dict) and isinstance(t.get("name"), str),
                  "tools.%d.name: Field required" % i)
            _need(t.get("type") in (None, "custom"),
                  "tools.%d: server tool %r is not available through the claude CLI" % (i, t.get("type")))
            schema = t.get("input_schema")
            _need(isinstance(schema, dict), "tools.%d.input_schema: Field required" % i)
            tools.append(ToolSpec(t["name"], t.get("description") or "", schema))
        tc = body.get("tool_choice") or {"type": "auto"}
        _need(isinstance(tc, dict) and tc.get("type") in ("auto", "any", "tool", "none"),
              "tool_choice.type must be auto, any, tool or none")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(tc["type"])
        if tc["type"] == "tool":
            _need(any(t.name == tc.get("name") for t in tools),
                  "tool_choice.name %r is not in tools" % tc.get("name"))
            choice = {"name": tc["name"]}
        stop = body.get("stop_sequences") or []
        _need(isinstance(stop, list) and all(isinstance(s, str) and s for s in stop),
              "stop_sequences: Input should be a list of non-empty strings")
        for k in ("temperature", "top_p"):
            v = body.get(k)
            _need(v is None or (isinstance(v, (int, float)) and 0 <= v <= 1),
                  "%s: Input should be a number between 0 and 1" % k)
        think = body.get("thinking") or {"type": "default"}
        _need(isinstance(think, dict) and think.get("type") in ("enabled", "adaptive", "disabled", "default"),
              "thinking.type must be enabled, adaptive or disabled")
        if think["type"] == "enabled":
            bt = think.get("budget_tokens")
            _need(isinstance(bt, int) and bt >= 1024, "thinking.budget_tokens: must be >= 1024")
            _need(count_only or bt < body["max_tokens"],
                  "max_tokens must be greater than thinking.budget_tokens")
        out_cfg = body.get("output_config") or {}
        _need(isinstance(out_cfg, dict), "output_config: Input should be an object")
        fmt = out_cfg.get("format") or body.get("output_format")
        _need(fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and
                              isinstance(fmt.get("schema"), dict)),
              "output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}")
        effort = out_cfg.get("effort") or ""
        _need(effort in ("",) + EFFORTS, "output_config.effort must be one of %s" % ", ".join(EFFORTS))
        _need(isinstance(body.get("stream", False), bool), "stream: Input should be a valid boolean")
        return Request(
            model=model, cli_model=cli_model, messages=merge_messages(out), system=system,
            stream=bool(body.get("stream")), tools=tools, tool_choice=choice,
            parallel_tool_calls=not tc.get("disable_parallel_tool_use"), stop=stop, effort=effort,
            max_tokens=0 if count_only else body["max_tokens"],
            thinking=think["type"] in ("enabled", "adaptive"),
            disable_thinking=think["type"] == "disabled",
            json_schema=fmt["schema"] if fmt else None)

    @staticmethod
    def usage(u):
        return {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                "cache_creation_input_tokens": u.cache_write, "cache_read_input_tokens": u.cache_read}

    def render(self, req, c, body):
        content = []
        if req.thinking and (c.thinking or c.signature):
            content.append({"type": "thinking", "thinking": c.thinking, "signature": c.signature})
        if c.text or not c.tool_calls:
            content.append({"type": "text", "text": c.text})
        for t in c.tool_calls:
            content.append({"type": "tool_use", "id": t.id, "name": t.name,
                            "input": json.loads(t.arguments)})
        return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": req.model,
                "content": content, "stop_reason": c.stop_reason if c.stop_reason in self.STOP else "end_turn",
                "stop_sequence": c.stop_sequence, "usage": self.usage(c.usage)}

    def stream(self, req, events, sse, body):
        state = {"index": -1, "open": None, "started": False}

        def start(usage):
            if not state["started"]:
                state["started"] = True
                sse.event({"type": "message_start", "message": {
                    "id": new_id("msg_"), "type": "message", "role": "assistant", "model": req.model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": dict(self.usage(usage), output_tokens=1)}}, "message_start")

        def open_block(kind, block):
            if state["open"] == kind and kind != "tool_use":
                return
            close_block()
            state["index"] += 1
            state["open"] = kind
            sse.event({"type": "content_block_start", "index": state["index"],
                       "content_block": block}, "content_block_start")

        def close_block():
            if state["open"] is not None:
                sse.event({"type": "content_block_stop", "index": state["index"]}, "content_block_stop")
                state["open"] = None

        def delta(d):
            sse.event({"type": "content_block_delta", "index": state["index"], "delta": d},
                      "content_block_delta")

        try:
            for ev in events:
                if isinstance(ev, Start):
                    start(ev.usage)
                    sse.event({"type": "ping"}, "ping")
                    continue
                start(Usage())
                if isinstance(ev, TextDelta):
                    open_block("text", {"type": "text", "text": ""})
                    delta({"type": "text_delta", "text": ev.text})
                elif isinstance(ev, ThinkingDelta):
                    if not req.thinking:
                        continue
                    open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                    if ev.text:
                        delta({"type": "thinking_delta", "thinking": ev.text})
                    if ev.signature:
                        delta({"type": "signature_delta", "signature": ev.signature})
                elif isinstance(ev, ToolCall):
                    open_block("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
                    if ev.arguments:
                        delta({"type": "input_json_delta", "partial_json": ev.arguments})
                elif isinstance(ev, ToolCallDelta):
                    if state["open"] == "tool_use":
                        delta({"type": "input_json_delta", "partial_json": ev.arguments})
                elif isinstance(ev, Heartbeat):
                    sse.event({"type": "ping"}, "ping")
                elif isinstance(ev, Done):
                    if state["index"] < 0:
                        open_block("text", {"type": "text", "text": ""})
                    close_block()
                    sse.event({"type": "message_delta", "delta": {
                        "stop_reason": ev.stop_reason if ev.stop_reason in self.STOP else "end_turn",
                        "stop_sequence": ev.stop_sequence}, "usage": self.usage(ev.usage)}, "message_delta")
                    sse.event({"type": "message_stop"}, "message_stop")
        except ProxyError as err:
            sse.event(self.error(err)[1], "error")

    def error(self, err):
        return err.status, {"type": "error", "error": {"type": err.kind, "message": err.message}}

    def count_tokens(self, req, body):
        """An estimate (~4 bytes a token): the CLI has no token counter to ask."""
        size = len(json.dumps([body.get("system"), body.get("messages"), body.get("tools")],
                              ensure_ascii=False).encode())
        return {"input_tokens": max(1, size // 4)}


# 11. OpenAI responses ###########################################################################
# POST /v1/responses, stateless.  OpenAI keeps responses server-side so that a later request can
# say `previous_response_id`; this proxy stores nothing it could look up by id (a store of
# conversations would be a second copy of every user's data to secure and expire; Sessions
# only keeps a CLI process, in memory, for a request that resends the same conversation), so
# clients send the whole conversation in `input`, as they do with `store: false`.  Only function
# tools exist here (OpenAI's built-in tools run on OpenAI's servers), and the model's thinking is
# not returned as reasoning items.

def _responses_parts(content, where):
    """Message content (a string or input_text / output_text / refusal / input_image parts)
    -> Anthropic blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _need(isinstance(content, list), "%s.content must be a string or a list of parts" % where, where)
    blocks = []
    for i, part in enumerate(content):
        at = "%s.content[%d]" % (where, i)
        _need(isinstance(part, dict), "%s must be an object" % at, at)
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            _need(isinstance(part.get("text"), str), "%s.text must be a string" % at, at)
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":                   # an earlier assistant refusal, replayed as text
            _need(isinstance(part.get("refusal"), str), "%s.refusal must be a string" % at, at)
            blocks.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image":
            _need(part.get("file_id") is None, "%s: file_id images need OpenAI's Files API; send "
                  "the image inline as image_url: \"data:image/png;base64,...\"" % at, at)
            try:
                blocks.append(image_block(part.get("image_url")))
            except BadRequest as err:            # name the part, so the client can find it
                err.param = at
                raise
        else:
            raise BadRequest("%s has unsupported type %r (supported: input_text, output_text, "
                             "refusal, input_image)" % (at, kind), param=at)
    return blocks


def _responses_output(output, where):
    """A function_call_output's `output` (a string or parts) -> (text, image blocks)."""
    if isinstance(output, str):
        return output, []
    blocks = _responses_parts(output, where)
    text = "\n".join(b["text"] for b in blocks if b["type"] == "text")
    return text, [b for b in blocks if b["type"] == "image"]


def parse_responses_input(value):
    """Responses `input` (a string or a list of items) -> (system text, [Message])."""
    if isinstance(value, str):
        return "", [Message("user", [{"type": "text", "text": value}])]
    _need(isinstance(value, list) and value, "input must be a string or a non-empty list of items",
          "input")
    system, out, names = [], [], {}
    for i, item in enumerate(value):
        at = "input[%d]" % i
        _need(isinstance(item, dict), "%s must be an object" % at, at)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                system.append(_text_of(item.get("content"), at))
            elif role in ("user", "assistant"):
                _need(item.get("content") is not None, "%s.content is required" % at, at)
                out.append(Message(role, _responses_parts(item["content"], at)))
            else:
                raise BadRequest("%s.role %r is not one of user, assistant, system, developer"
                                 % (at, role), param=at)
        elif kind == "function_call":
            cid, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            _need(isinstance(cid, str) and cid, "%s.call_id must be a non-empty string" % at, at)
            _need(isinstance(name, str) and name, "%s.name must be a non-empty string" % at, at)
            _need(isinstance(args, str), "%s.arguments must be a JSON string" % at, at)
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = {"_raw_arguments": args}
            names[cid] = name
            out.append(Message("assistant", [{"type": "tool_use", "id": cid, "name": name,
                                              "input": args if isinstance(args, dict) else
                                              {"_raw_arguments": item["arguments"]}}]))
        elif kind == "function_call_output":
            cid = item.get("call_id")
            _need(isinstance(cid, str) and cid, "%s.call_id must be a non-empty string" % at, at)
            _need(item.get("output") is not None, "%s.output is required" % at, at)
            text, images = _responses_output(item["output"], at)
            result = {"type": "tool_result", "tool_use_id": cid,
                      "name": names.get(cid) or item.get("name"), "content": text}
            if images:                   # native tools give them back inside the result
                result["images"] = images
            out.append(Message("user", [result] + images))
        elif kind == "reasoning":
            continue                       # not replayed, as Anthropic thinking blocks are not
        elif kind == "item_reference":
            raise BadRequest("%s refers to a stored item, but this proxy stores nothing: send the "
                             "item itself." % at, param=at)
        else:
            raise BadRequest("%s has unsupported type %r (supported: message, function_call, "
                             "function_call_output, reasoning)" % (at, kind), param=at)
    _need(out, "input must contain at least one user or assistant message", "input")
    return "\n\n".join(s for s in system if s), merge_messages(out)


def _responses_tools(body):
    """Flat Responses function tools and tool_choice -> ([ToolSpec], neutral choice)."""
    raw = body.get("tools") or []
    _need(isinstance(raw, list), "tools must be a list", "tools")
    tools = []
    for i, t in enumerate(raw):
        at = "tools[%d]" % i
        _need(isinstance(t, dict), "%s must be an object" % at, at)
        _need(t.get("type") == "function", "%s: only function tools are available through the "
              "claude CLI (got type %r)" % (at, t.get("type")), at)
        _need("function" not in t or "name" in t, "%s.name is required: Responses tools are flat "
              "({\"type\": \"function\", \"name\": ..., \"parameters\": ...}), not nested under "
              "\"function\" as in chat completions" % at, at)
        _need(isinstance(t.get("name"), str) and re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", t["name"]),
              "%s.name must be 1-128 letters, digits, _ . : or -" % at, at)
        params = t.get("parameters") or {"type": "object", "properties": {}}
        _need(isinstance(params, dict), "%s.parameters must be an object" % at, at)
        tools.append(ToolSpec(t["name"], t.get("description") or "", params))
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        _need(choice.get("type") == "function" and isinstance(choice.get("name"), str),
              "tool_choice must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
              "tool_choice")
        _need(any(t.name == choice["name"] for t in tools),
              "tool_choice names %r, which is not in tools" % choice["name"], "tool_choice")
        choice = {"name": choice["name"]}
    else:
        _need(choice in ("auto", "none", "required"),
              "tool_choice must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
              "tool_choice")
        _need(choice != "required" or tools, "tool_choice is required but no tools were given",
              "tool_choice")
    return tools, choice


class OpenAIResponses:
    name = "responses"
    call_id_prefix = "call_"
    #: stop reasons that end a response "incomplete", with OpenAI's reason
    INCOMPLETE = {"max_tokens": "max_output_tokens", "refusal": "content_filter"}
    #: ProxyError status -> Response.error.code (the SDK's closed list)
    CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}
    TYPES = OpenAIChat.TYPES
    error = OpenAIChat.error            # errors before the response starts: OpenAI's shape

    def parse(self, body, headers, cfg):
        _need(isinstance(body, dict), "The request body must be a JSON object")
        model, cli_model = resolve_model(body.get("model"), cfg.default_model)
        _need(body.get("previous_response_id") is None,
              "previous_response_id is not supported: this proxy stores no responses. Send the "
              "whole conversation in input instead (earlier output items can be sent back as "
              "input items).", "previous_response_id")
        _need(body.get("conversation") is None, "conversation is not supported: this proxy "
              "stores no conversations. Send the whole conversation in input instead.",
              "conversation")
        _need(not body.get("background"), "background responses are not supported: this proxy "
              "stores nothing to poll later. Use stream: true for long answers.", "background")
        _need(body.get("prompt") is None, "prompt templates are stored by OpenAI and not "
              "available here; send instructions and input instead.", "prompt")
        # `store: true` (OpenAI's default) is accepted and nothing is stored: refusing it would
        # break clients that send it by habit, and the only thing it enables, a later
        # previous_response_id, fails with its own clear 400.  The response says "store": false.
        _need(isinstance(body.get("store", False), bool) or body.get("store") is None,
              "store must be true or false", "store")
        _need(body.get("metadata") is None or isinstance(body["metadata"], dict),
              "metadata must be an object", "metadata")
        instructions = body.get("instructions")
        _need(instructions is None or isinstance(instructions, str),
              "instructions must be a string", "instructions")
        _need("input" in body, "input is required (this proxy has no previous_response_id or "
              "prompt to take it from)", "input")
        system, messages = parse_responses_input(body["input"])
        _need(isinstance(body.get("stream", False), bool), "stream must be true or false", "stream")
        tools, choice = _responses_tools(body)
        max_tokens = body.get("max_output_tokens")
        _need(max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
                                     and max_tokens >= 1),
              "max_output_tokens must be a positive integer", "max_output_tokens")
        reasoning = body.get("reasoning") or {}
        _need(isinstance(reasoning, dict), "reasoning must be an object", "reasoning")
        effort = reasoning.get("effort")
        _need(effort in (None, "none", "minimal", "low", "medium", "high", "xhigh", "max"),
              "reasoning.effort must be one of none, minimal, low, medium, high, xhigh, max",
              "reasoning.effort")
        text = body.get("text") or {}
        _need(isinstance(text, dict), "text must be an object", "text")
        fmt = text.get("format")
        _need(fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"),
              "text.format other than text is not supported yet", "text.format")
        _need(not body.get("top_logprobs"), "logprobs are not available from the claude CLI",
              "top_logprobs")
        _need(isinstance(body.get("parallel_tool_calls", True), bool) or
              body.get("parallel_tool_calls") is None,
              "parallel_tool_calls must be true or false", "parallel_tool_calls")
        return Request(
            model=model, cli_model=cli_model, messages=messages,
            system="\n\n".join(s for s in (instructions, system) if s),
            stream=bool(body.get("stream")), tools=tools, tool_choice=choice,
            parallel_tool_calls=body.get("parallel_tool_calls") is not False,
            effort={"minimal": "low", "none": ""}.get(effort, effort or ""),
            max_tokens=max_tokens or 0, disable_thinking=effort == "none")

    # -- the response object ---------------------------------------------------------------
    @staticmethod
    def usage(u):
        # OpenAI counts cached tokens inside input_tokens; the CLI has no separate count of
        # thinking tokens (they are inside output_tokens), hence reasoning_tokens 0.
        return {"input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cache_read,
                                         "cache_write_tokens": u.cache_write},
                "output_tokens": u.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.output_tokens}

    @staticmethod
    def text_part(text):
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message_item(self, text, status):
        return {"id": new_id("msg_"), "type": "message", "status": status, "role": "assistant",
                "content": [self.text_part(text)] if text is not None else []}

    @staticmethod
    def call_item(call, status):
        return {"id": new_id("fc_"), "type": "function_call", "status": status,
                "arguments": call.arguments, "call_id": call.id, "name": call.name}

    def envelope(self, req, body, rid, created, output, status, usage=None, stop_reason=None,
                 error=None):
        """The Response object around `output`, as create returns it and stream events carry."""
        reason = self.INCOMPLETE.get(stop_reason) if status == "incomplete" else None
        choice = req.tool_choice
        return {
            "id": rid, "object": "response", "created_at": created, "status": status,
            "background": False, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": reason} if reason else None,
            "instructions": body.get("instructions"), "max_output_tokens": req.max_tokens or None,
            "max_tool_calls": None, "metadata": body.get("metadata") or {}, "model": req.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "store": False, "temperature": body.get("temperature"),
            "text": {"format": {"type": "text"}},
            "tool_choice": {"type": "function", "name": choice["name"]} if isinstance(choice, dict)
            else choice,
            # strict: arguments are parsed from the model's text, not constrained to the schema
            "tools": [{"type": "function", "name": t.name, "description": t.description or None,
                       "parameters": t.parameters, "strict": False} for t in req.tools],
            "top_p": body.get("top_p"), "truncation": body.get("truncation") or "disabled",
            "usage": self.usage(usage) if usage is not None else None, "user": body.get("user")}

    def status_of(self, stop_reason):
        return "incomplete" if stop_reason in self.INCOMPLETE else "completed"

    def render(self, req, c, body):
        status = self.status_of(c.stop_reason)
        output = [self.message_item(c.text, status)] if (c.text or not c.tool_calls) else []
        output += [self.call_item(t, "completed") for t in c.tool_calls]
        return self.envelope(req, body, new_id("resp_"), int(time.time()), output, status,
                             c.usage, c.stop_reason)

    # -- streaming ---------------------------------------------------------------------------
    def stream(self, req, events, sse, body):
        rid, created, seq = new_id("resp_"), int(time.time()), itertools.count()
        output = []                      # items so far, mutated as they finish
        state = {"message": None}        # the open message item, while text streams into it

        def emit(kind, **fields):
            sse.event(dict(type=kind, sequence_number=next(seq), **fields), kind)

        def open_message():
            item, part = self.message_item(None, "in_progress"), self.text_part("")
            output.append(item)
            state["message"] = (item, len(output) - 1, part)
            emit("response.output_item.added", output_index=len(output) - 1, item=item)
            item["content"].append(part)
            emit("response.content_part.added", item_id=item["id"], output_index=len(output) - 1,
                 content_index=0, part=part)

        def close_message(status):
            item, index, part = state["message"]
            state["message"] = None
            emit("response.output_text.done", item_id=item["id"], output_index=index,
                 content_index=0, text=part["text"], logprobs=[])
            emit("response.content_part.done", item_id=item["id"], output_index=index,
                 content_index=0, part=part)
            item["status"] = status
            emit("response.output_item.done", output_index=index, item=item)

        def close_call():
            # native tools stream arguments (ToolCallDelta): the item stays open until then
            item, index = state.pop("call")
            emit("response.function_call_arguments.done", item_id=item["id"],
                 output_index=index, arguments=item["arguments"])
            item["status"] = "completed"
            emit("response.output_item.done", output_index=index, item=item)

        emit("response.created", response=self.envelope(req, body, rid, created, [], "in_progress"))
        emit("response.in_progress", response=self.envelope(req, body, rid, created, [], "in_progress"))
        try:
            for ev in events:
                if "call" in state and not isinstance(ev, (ToolCallDelta, Heartbeat)):
                    close_call()
                if isinstance(ev, ToolCallDelta):
                    item, index = state["call"]
                    item["arguments"] += ev.arguments
                    emit("response.function_call_arguments.delta", item_id=item["id"],
                         output_index=index, delta=ev.arguments)
                elif isinstance(ev, TextDelta):
                    if not ev.text:
                        continue
                    if state["message"] is None:
                        open_message()
                    item, index, part = state["message"]
                    part["text"] += ev.text
                    emit("response.output_text.delta", item_id=item["id"], output_index=index,
                         content_index=0, delta=ev.text, logprobs=[])
                elif isinstance(ev, ToolCall):
                    if state["message"] is not None:
                        close_message("completed")
                    item = dict(self.call_item(ev, "in_progress"), arguments=ev.arguments)
                    output.append(item)
                    index = len(output) - 1
                    emit("response.output_item.added", output_index=index,
                         item=dict(item, arguments=""))
                    if ev.arguments:
                        emit("response.function_call_arguments.delta", item_id=item["id"],
                             output_index=index, delta=ev.arguments)
                    state["call"] = (item, index)
                elif isinstance(ev, Heartbeat):
                    sse.comment("keep-alive")
                elif isinstance(ev, Done):
                    status = self.status_of(ev.stop_reason)
                    if state["message"] is None and not output:
                        open_message()          # an empty answer is still one message
                    if state["message"] is not None:
                        close_message(status)
                    emit("response.%s" % status, response=self.envelope(
                        req, body, rid, created, output, status, ev.usage, ev.stop_reason))
        except ProxyError as err:
            # the status line is sent: the failure travels as the terminal response.failed
            # event, carrying what was produced so far; the SDK's stream then ends without a
            # response.completed, as it does for a failure at OpenAI.
            if state["message"] is not None:
                state["message"][0]["status"] = "incomplete"
            _status, detail = self.error(err)
            emit("response.failed", response=self.envelope(
                req, body, rid, created, output, "failed",
                error={"code": self.CODES.get(err.status, "server_error"),
                       "message": err.message, "type": detail["error"]["type"]}))


DIALECTS = {"openai": OpenAIChat(), "anthropic": AnthropicMessages(),
            "responses": OpenAIResponses()}


# 12. Auth, metrics, routes, handler, server ####################################################

def key_digest(key):
    return hashlib.sha256(key.encode()).digest()


def authorized(keys, headers):
    """Constant time: every key is compared (as equal-length digests), no early exit."""
    if not keys:
        return True
    auth = headers.get("Authorization") or ""
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else (headers.get("x-api-key") or "")
    digest, ok = key_digest(given), False
    for k in keys:
        ok |= hmac.compare_digest(digest, k)
    return ok and bool(given)


class Metrics:
    """Counters and histograms, rendered in the Prometheus text format at GET /metrics."""
    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()       # (route, status) -> n
        self.tokens = collections.Counter()         # "in" / "out" -> n
        self.hist = {"ttft": [0] * (len(self.BUCKETS) + 1), "duration": [0] * (len(self.BUCKETS) + 1)}
        self.sums = collections.Counter()

    def observe(self, name, seconds):
        with self.lock:
            i = next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))
            self.hist[name][i] += 1
            self.sums[name] += seconds

    def request(self, route, status, usage):
        with self.lock:
            self.requests[(route, status)] += 1
            if usage:
                self.tokens["in"] += usage.prompt_tokens
                self.tokens["out"] += usage.output_tokens

    def render(self, app):
        gate, out = app.backend.gate, []

        def metric(name, kind, help_, samples):
            out.append("# HELP %s %s" % (name, help_))
            out.append("# TYPE %s %s" % (name, kind))
            out.extend(samples)

        with self.lock:
            metric("claude_proxy_requests_total", "counter", "HTTP requests by route and status",
                   ['claude_proxy_requests_total{route="%s",status="%s"} %d' % (r, st, n)
                    for (r, st), n in sorted(self.requests.items())])
            metric("claude_proxy_in_flight", "gauge", "requests being served",
                   ["claude_proxy_in_flight %d" % app.in_flight])
            metric("claude_proxy_queued", "gauge", "requests waiting for a CLI slot",
                   ["claude_proxy_queued %d" % gate.queued])
            metric("claude_proxy_cli_running", "gauge", "CLI slots in use",
                   ["claude_proxy_cli_running %d" % gate.running])
            metric("claude_proxy_cli_processes_started_total", "counter", "CLI processes started",
                   ["claude_proxy_cli_processes_started_total %d" % app.backend.started])
            pool, kept = app.backend.pool.status(), app.backend.sessions.status()
            for name, status, help_ in (
                    ("pool", pool, "requests served by a pre-started process (hit) or a fresh one "
                                   "(miss)"),
                    ("session", kept, "requests with history continued on the process that "
                                      "answered the turn before (hit) or not (miss)")):
                full = "claude_proxy_%s_requests_total" % name
                metric(full, "counter", help_, ['%s{result="%s"} %d' % (full, r, status[k])
                                                for r, k in (("hit", "hits"), ("miss", "misses"))])
            metric("claude_proxy_pool_ready", "gauge", "pre-started processes waiting",
                   ["claude_proxy_pool_ready %d" % pool["ready"]])
            metric("claude_proxy_sessions_kept", "gauge", "conversations kept for their next turn",
                   ["claude_proxy_sessions_kept %d" % kept["kept"]])
            metric("claude_proxy_tokens_total", "counter", "tokens by direction",
                   ['claude_proxy_tokens_total{direction="in"} %d' % self.tokens["in"],
                    'claude_proxy_tokens_total{direction="out"} %d' % self.tokens["out"]])
            for name, help_ in (("ttft", "seconds to the first content event"),
                                ("duration", "seconds per model request")):
                full = "claude_proxy_%s_seconds" % name
                samples, acc = [], 0
                for b, n in zip(self.BUCKETS + ("+Inf",), self.hist[name]):
                    acc += n
                    samples.append('%s_bucket{le="%s"} %d' % (full, b, acc))
                samples += ["%s_sum %.6f" % (full, self.sums[name]), "%s_count %d" % (full, acc)]
                metric(full, "histogram", help_, samples)
        return "\n".join(out) + "\n"


class App:
    """Everything a request needs: config, backend and counters.  One per server."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.workdir = tempfile.mkdtemp(prefix="claude-proxy-cwd-")
        os.chmod(self.workdir, 0o500)        # stays empty: nothing for the CLI to read or write
        self.backend = Backend(cfg, self.workdir)
        self.metrics = Metrics()
        self.keys = tuple(key_digest(k) for k in cfg.api_keys)
        self.started_at = time.time()
        self.in_flight = 0
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)

    def enter(self):
        with self.lock:
            self.in_flight += 1

    def leave(self):
        with self.lock:
            self.in_flight -= 1
            self.idle.notify_all()

    def drain(self, grace):
        """Wait up to `grace` seconds for in-flight requests; True if none are left."""
        deadline = time.monotonic() + grace
        with self.lock:
            while self.in_flight and time.monotonic() < deadline:
                self.idle.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return not self.in_flight

    def close(self):
        self.backend.close_all()
        try:
            os.chmod(self.workdir, 0o700)
            shutil.rmtree(self.workdir, ignore_errors=True)
        except OSError:
            pass


def model_events(app, req, call):
    """The whole pipeline for one request: a slot, then one CLI turn (or the tool engine).
    A turn that ends whole (the client got all the model wrote), in one CLI run (no refusal
    retry), keeps its process for the conversation's next turn (Sessions)."""
    app.backend.gate.acquire(call)
    keep, runs = None, []
    try:
        keep = app.backend.sessions.keep_for(req)
        def run(messages):
            runs.append(messages)
            return app.backend.run(req, messages, call, keep if len(runs) == 1 else None)
        if req.tools and req.tool_choice != "none" and not req.handler.native:
            events = emulated_tool_events(req, run)
        else:            # no tools, or native tools (the CLI backend's ToolBridge)
            events = run(req.messages)
        text, calls = [], []
        for ev in events:
            if keep is not None:
                if isinstance(ev, TextDelta):
                    text.append(ev.text)
                elif isinstance(ev, ToolCall):
                    calls.append([ev.id, ev.name, ev.arguments])
                elif isinstance(ev, ToolCallDelta):      # native arguments stream in parts
                    for c in calls:
                        c[2] += ev.arguments if c[0] == ev.id else ""
                elif isinstance(ev, Reset):
                    text, calls = [], []
                elif isinstance(ev, Done) and len(runs) == 1 and ev.whole and \
                        ev.stop_reason in ("end_turn", "tool_use"):
                    keep.finish(Message("assistant", [{"type": "text", "text": "".join(text)}] + [
                        {"type": "tool_use", "name": name, "input": json.loads(args or "{}")}
                        for _, name, args in calls]))
            yield ev
    finally:
        if keep is not None:
            keep.drop()
        app.backend.gate.release()


def models_payload(anthropic_shape, only=None):
    ids = [only] if only else list(KNOWN_MODELS)
    if anthropic_shape:
        data = [{"type": "model", "id": m, "display_name": m.replace("-", " ").title(),
                 "created_at": "2025-01-01T00:00:00Z"} for m in ids]
        if only:
            return data[0]
        return {"data": data, "has_more": False, "first_id": ids[0], "last_id": ids[-1]}
    data = [{"id": m, "object": "model", "created": 1735689600, "owned_by": "anthropic"} for m in ids]
    return data[0] if only else {"object": "list", "data": data}


class Call:
    """Per-request state: the deadline and a cheap check whether the client hung up."""

    def __init__(self, sock, deadline_seconds):
        self.sock = sock
        self.deadline = time.monotonic() + deadline_seconds
        self.timeout = deadline_seconds
        self._next = 0.0

    def maybe_check(self):
        now = time.monotonic()
        if now >= self._next:
            self._next = now + POLL_SECONDS
            self.check()

    def check(self):
        if time.monotonic() > self.deadline:
            raise Timeout("The request took longer than CLAUDE_PROXY_TIMEOUT (%gs)." % self.timeout)
        if self.client_gone():
            raise ClientGone()

    def client_gone(self):
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True


#: (method, path without /v1) -> Handler method; every route also answers with a /v1 prefix
ROUTES = {
    ("POST", "/chat/completions"): "chat",
    ("POST", "/responses"): "openai_responses",
    ("POST", "/messages"): "messages",
    ("POST", "/messages/count_tokens"): "count_tokens",
    ("GET", "/models"): "models",
    ("GET", "/health"): "health",
    ("GET", "/metrics"): "metrics",
}
UNVERSIONED = ("/health", "/metrics")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "claude-proxy/" + __version__

    def version_string(self):
        return self.server_version
    def setup(self):
        # seconds to wait for a request line, header or body bytes (slow clients, idle
        # keep-alive); StreamRequestHandler applies it to the socket
        self.timeout = self.server.app.cfg.read_timeout
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    @property
    def app(self):
        return self.server.app

    def log_message(self, fmt, *args):   # the access log below replaces http.server's
        pass

    def do_GET(self):
        self.dispatch()

    def __getattr__(self, name):
        # any other method (PROPFIND, FOO, ...) gets a 405/404 in JSON instead of http.server's 501
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    # -- dispatch ---------------------------------------------------------------------------
    def dispatch(self):
        started = time.monotonic()
        self.status, self.model, self.usage, self.dialect = 0, "-", None, DIALECTS["openai"]
        self._streaming = False
        self.request_id = re.sub(r"[^A-Za-z0-9._:-]", "", self.headers.get("X-Request-Id") or "")[:128] \
            or new_id("req_", 16)
        path = self.path.split("?", 1)[0]
        if path.startswith(("/v1/messages", "/messages")) or self.headers.get("anthropic-version") or \
                self.headers.get("x-api-key"):
            self.dialect = DIALECTS["anthropic"]
        self.app.enter()
        try:
            if self.command == "OPTIONS" and self.cors_origin():
                return self.preflight()
            body = self.read_body()          # first, so an error response leaves keep-alive in sync
            route = self.route(self.command, path)
            if route not in (self.health,) and not authorized(self.app.keys, self.headers):
                raise Unauthorized("Invalid or missing API key: send one of CLAUDE_PROXY_API_KEYS "
                                   "as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
            route(body)
        except ProxyError as err:
            self.send_error_body(err)
        except ClientGone:
            self.close_connection = True
            self.status = self.status or 499
        except Exception as exc:  # noqa: BLE001 - the server never dies, the client gets a 500
            self.log_error("internal error: %s: %s", type(exc).__name__, exc)
            import traceback
            traceback.print_exc(file=sys.stderr)
            self.send_error_body(ProxyError("Internal proxy error; see the proxy's log."))
        finally:
            self.app.leave()
            self.app.metrics.request(self.route_label(path), self.status, self.usage)
            self.access_log(path, started)

    def route_label(self, path):
        bare = path[3:] if path.startswith("/v1/") else path
        if bare.startswith("/models/"):
            return "/v1/models/{id}"
        for _method, known in ROUTES:
            if bare == known:
                return known if known in UNVERSIONED else "/v1" + known
        return "other"

    # -- CORS -------------------------------------------------------------------------------
    def cors_origin(self):
        origin, allowed = self.headers.get("Origin"), self.app.cfg.cors_origins
        if not origin or not allowed:
            return None
        return origin if ("*" in allowed or origin in allowed) else None

    def end_headers(self):
        origin = self.cors_origin() if hasattr(self, "headers") and self.headers else None
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
            self.send_header("Access-Control-Expose-Headers",
                             "X-Request-Id, Retry-After, x-ratelimit-remaining-requests, "
                             "x-ratelimit-reset-requests, anthropic-ratelimit-unified-status, "
                             "anthropic-ratelimit-unified-reset, anthropic-ratelimit-unified-type, "
                             "anthropic-ratelimit-unified-utilization")
        super().end_headers()

    def preflight(self):
        self.status = 204
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers") or
                         "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method) as JSON, not HTML."""
        self.request_id = getattr(self, "request_id", None) or new_id("req_", 16)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":      # unparseable request line: answer in 1.1
            self.request_version = "HTTP/1.1"
        try:
            self.send_json(code, DIALECTS["openai"].error(ProxyError(message or "Bad request", status=code,
                                                                    kind="invalid_request_error"))[1])
        except OSError:
            pass

    def route(self, method, path):
        if path.startswith("/v1/"):
            path = path[3:]
        if (method, path) in ROUTES:
            return getattr(self, ROUTES[(method, path)])
        if method == "GET" and path.startswith("/models/") and len(path) > 8:
            return lambda body: self.model_info(path[8:])
        allowed = sorted(m for m, p in ROUTES if p == path)
        if allowed:
            raise MethodNotAllowed("Method %s is not allowed on %s; use %s."
                                   % (method, self.path.split("?")[0], " or ".join(allowed)),
                                   headers={"Allow": ", ".join(allowed)})
        raise NotFound("No route %s %s. Routes: %s." % (
            method, self.path.split("?")[0],
            ", ".join("%s %s" % (m, p if p in UNVERSIONED else "/v1" + p) for m, p in ROUTES)))

    def read_body(self):
        """The request's JSON body (None for methods without one), or a 4xx."""
        length = self.headers.get("Content-Length")
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if self.command not in ("POST", "PUT", "PATCH"):
            if length and length.isdigit() and int(length) <= self.app.cfg.max_body:
                self.rfile.read(int(length))
            elif length or chunked:
                self.close_connection = True
            return None
        try:
            raw = self.read_chunked() if chunked else self._read_sized(length)
        except TimeoutError:
            self.close_connection = True
            raise ProxyError("The request body did not arrive within %gs "
                             "(CLAUDE_PROXY_READ_TIMEOUT)." % self.app.cfg.read_timeout,
                             status=408, kind="invalid_request_error")
        if not raw.strip():
            raise BadRequest("The request body is empty; send a JSON object.")
        try:
            body = json.loads(raw)
        except UnicodeDecodeError:
            raise BadRequest("The request body is not valid UTF-8.")
        except ValueError as exc:
            raise BadRequest("The request body is not valid JSON: %s" % exc)
        except RecursionError:
            raise BadRequest("The request body nests too deeply.")
        if json_depth(body) > MAX_JSON_DEPTH:
            raise BadRequest("The request body nests deeper than %d levels." % MAX_JSON_DEPTH)
        return body

    def _read_sized(self, length):
        if length is None:
            self.close_connection = True
            raise ProxyError("A Content-Length header is required.", status=411,
                             kind="invalid_request_error")
        if not length.isdigit():
            self.close_connection = True
            raise BadRequest("Content-Length must be a non-negative integer, got %r." % length[:40])
        if int(length) > self.app.cfg.max_body:
            self.close_connection = True          # the body is not read, so the stream is lost
            raise TooLarge("The request body is %s bytes; the limit is %d (CLAUDE_PROXY_MAX_BODY)."
                           % (length, self.app.cfg.max_body))
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            self.close_connection = True
            raise BadRequest("The request body ended before Content-Length bytes arrived.")
        return raw

    def read_chunked(self):
        parts, total = [], 0
        while True:
            line = self.rfile.readline(66)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BadRequest("Malformed chunked request body.")
            total += size
            if total > self.app.cfg.max_body:
                self.close_connection = True
                raise TooLarge("The request body exceeds %d bytes (CLAUDE_PROXY_MAX_BODY)."
                               % self.app.cfg.max_body)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)

    # -- responses --------------------------------------------------------------------------
    def send_json(self, status, obj, headers=()):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", self.request_id)
        if self.close_connection:
            self.send_header("Connection", "close")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_body(self, err):
        if getattr(self, "_streaming", False):
            self.close_connection = True
            return
        status, body = self.dialect.error(err)
        try:
            self.send_json(status, body, list(err.headers.items()))
        except OSError:
            self.close_connection = True

    def access_log(self, path, started):
        ms = (time.monotonic() - started) * 1000
        u = self.usage
        fields = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S"), "id": self.request_id,
                  "method": self.command, "path": path, "status": self.status,
                  "ms": round(ms, 1), "model": self.model,
                  "tokens_in": u.prompt_tokens if u else 0, "tokens_out": u.output_tokens if u else 0}
        if self.app.cfg.log_format == "json":
            line = json.dumps(fields)
        else:
            line = "%(ts)s %(id)s %(method)s %(path)s %(status)s %(ms).0fms model=%(model)s " \
                   "in=%(tokens_in)s out=%(tokens_out)s" % fields
        sys.stderr.write(line + "\n")

    # -- routes -----------------------------------------------------------------------------
    def chat(self, body):
        self.generate(DIALECTS["openai"], body)

    def openai_responses(self, body):    # not `responses`: BaseHTTPRequestHandler's status table
        self.generate(DIALECTS["responses"], body)

    def messages(self, body):
        self.generate(DIALECTS["anthropic"], body)

    def generate(self, dialect, body):
        self.dialect = dialect
        req = dialect.parse(body, self.headers, self.app.cfg)
        req.handler = pick_handler(self.headers.get("X-Toolcall-Module"), self.app.cfg.toolcall_module)
        req.id_prefix = dialect.call_id_prefix
        self.model = req.model
        call = Call(self.connection, self.app.cfg.timeout)
        source = model_events(self.app, req, call)
        events = self._observe(source)
        try:
            if not req.stream:
                c = collect(events)
                return self.send_json(200, dialect.render(req, c, body))
            events_ahead = first_then(events)
            sse = SSE(self)
            sse.start([("X-Request-Id", self.request_id)])
            self.status, self._streaming = 200, True
            dialect.stream(req, events_ahead, sse, body)
            sse.end()
        finally:
            events.close()
            source.close()

    def _observe(self, events):
        """Pass events through, noting time to first content, duration and usage."""
        started, first = time.monotonic(), True
        for ev in events:
            if first and isinstance(ev, (TextDelta, ThinkingDelta, ToolCall)):
                first = False
                self.app.metrics.observe("ttft", time.monotonic() - started)
            elif isinstance(ev, Done):
                self.usage = ev.usage
                self.app.metrics.observe("duration", time.monotonic() - started)
            yield ev

    def count_tokens(self, body):
        d = DIALECTS["anthropic"]
        self.dialect = d
        req = d.parse(body, self.headers, self.app.cfg, count_only=True)
        self.model = req.model
        self.send_json(200, d.count_tokens(req, body))

    def metrics(self, body):
        data = self.app.metrics.render(self.app).encode()
        self.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def models(self, body):
        self.send_json(200, models_payload(self.dialect.name == "anthropic"))

    def model_info(self, model_id):
        try:
            resolve_model(model_id, None)
        except BadRequest:
            raise NotFound("Model %r not found." % model_id)
        self.send_json(200, models_payload(self.dialect.name == "anthropic", model_id))

    def health(self, body):
        app = self.app
        gate = app.backend.gate
        self.send_json(200, {
            "status": "ok", "version": __version__, "uptime_s": round(time.time() - app.started_at, 1),
            "claude_bin": app.cfg.claude_bin, "claude_found": bool(shutil.which(app.cfg.claude_bin)),
            "concurrency": {"capacity": gate.capacity, "running": gate.running, "queued": gate.queued},
            "cli_processes_started": app.backend.started, "history": app.cfg.history,
            "pool": app.backend.pool.status(),
            "sessions": app.backend.sessions.status(),
            "handlers": sorted(HANDLERS), "module_errors": dict(MODULE_ERRORS)})


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, cfg):
        self.app = App(cfg)
        try:
            super().__init__((cfg.host, cfg.port), Handler)
        except OSError:
            self.app.close()
            raise


# 13. main #######################################################################################

def check(cfg):
    """--check: is the CLI there, which version, is it logged in (one tiny request)?"""
    ok = True
    print("claude-proxy %s configuration:" % __version__)
    print(describe_config(cfg))
    found = shutil.which(cfg.claude_bin)
    print("CLI: %s" % (found or "NOT FOUND (set CLAUDE_BIN)"))
    if not found:
        return 1
    try:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
        print("CLI version: %s" % (out.stdout.strip() or out.stderr.strip()))
    except (OSError, subprocess.TimeoutExpired) as exc:
        print("CLI version: failed (%s)" % exc)
        ok = False
    app = App(cfg)
    try:
        req = Request(model=cfg.default_model, cli_model=resolve_model(cfg.default_model, "sonnet")[1],
                      messages=[Message("user", [{"type": "text", "text": "Reply with the word OK."}])],
                      max_tokens=16, handler=HANDLERS["generic"])

        class NoClient:
            deadline = time.monotonic() + 120

            def check(self):
                if time.monotonic() > self.deadline:
                    raise Timeout("no answer within 120 s")

            maybe_check = check

        c = collect(app.backend.run(req, req.messages, NoClient()))
        print("Logged in: yes (model %s answered %r, %d tokens)" % (cfg.default_model, c.text[:40],
                                                                   c.usage.output_tokens))
    except ProxyError as err:
        print("Logged in: NO: %s" % err.message)
        ok = False
    finally:
        app.close()
    for name, err in sorted(MODULE_ERRORS.items()):
        print("Handler module %s failed to load: %s" % (name, err))
        ok = False
    return 0 if ok else 1


def main(argv=None):
    discover_modules()
    cfg, args = load_config(argv)
    if cfg.toolcall_module not in HANDLERS:
        raise SystemExit("error: CLAUDE_PROXY_TOOLCALL_MODULE %r is not a tool-call handler; "
                         "available: %s" % (cfg.toolcall_module, ", ".join(sorted(HANDLERS))))
    if args.check:
        return check(cfg)
    for name, err in sorted(MODULE_ERRORS.items()):
        sys.stderr.write("claude-proxy: handler module %s failed to load: %s\n" % (name, err))
    try:
        server = ProxyServer(cfg)
    except OSError as exc:
        sys.stderr.write("claude-proxy: cannot listen on %s:%s: %s\n" % (cfg.host, cfg.port, exc))
        return 1

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    sys.stderr.write("claude-proxy %s listening on http://%s:%s (CLI: %s, model %s, %d slots)\n"
                     % (__version__, host, port, cfg.claude_bin, cfg.default_model, cfg.max_concurrency))
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()               # stop accepting; in-flight requests go on
        if not server.app.drain(cfg.shutdown_grace):
            sys.stderr.write("claude-proxy: grace period over, ending %d request(s)\n"
                             % server.app.in_flight)
        server.app.close()
        sys.stderr.write("claude-proxy: stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
