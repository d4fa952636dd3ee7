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
    POST /v1/responses               OpenAI Responses (stream / non-stream, tools, text.format,
                                     stored: previous_response_id, conversation, background)
    GET  /v1/responses/{id}          a stored response (?stream=true&starting_after=N: events)
    DELETE /v1/responses/{id}        delete it
    GET  /v1/responses/{id}/input_items   its input items (limit, order, after, before)
    POST /v1/responses/{id}/cancel   stop a background response
    POST /v1/responses/input_tokens  the input's token count (an estimate: ~4 bytes a token)
    POST /v1/conversations           a conversation (items, metadata); GET / POST (metadata) /
                                     DELETE /v1/conversations/{id}; GET / POST .../{id}/items;
                                     GET / DELETE .../{id}/items/{item_id}
    POST /v1/messages                Anthropic Messages (stream / non-stream, tools, thinking)
    POST /v1/messages/count_tokens   Anthropic token count (an estimate: ~4 bytes a token)
    GET  /v1/models                  model list (Anthropic shape if anthropic-version/x-api-key)
    GET  /v1/models/{id}             one model
    GET  /v1/usage                   plan limits and tokens per login, keys and their budgets
                                     (a client key: its own); ?since=&until=&group_by=key|model|
                                     login|day[&format=csv]: the usage history and its
                                     API-equivalent value estimate (no secrets)
    GET  /health                     ok | degraded (with reasons), capacity, idle CLI processes,
                                     logins, handlers (no secrets); HTTP 200 either way; to
                                     all but an admin: status, reasons, logins.serving only
    GET  /metrics                    Prometheus text format (an admin key)
    GET  /  and  /dashboard          the status page: a static shell, no data, no key needed
    GET  /dashboard/data             the page's data as JSON (an admin key when keys are set)
  Every /v1/... route also answers without the /v1 prefix.  Every request takes one path
  (section 13): admitted (a bounded number of connections may be sending a head, for a bounded
  time) -> Host (names this server, when no keys are set) -> Origin (no other web page) -> key
  (from the headers; the body is not read without one) -> body type (JSON, not a form) -> body
  (strict framing, CLAUDE_PROXY_MAX_BODY; never read for a GET or a route that takes none) ->
  JSON -> its route.

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
    --pool-size       CLAUDE_PROXY_POOL_SIZE         mem   ready CLI processes (0 = off; max 2 by memory)
    --pool-max-idle   CLAUDE_PROXY_POOL_MAX_IDLE     300   seconds before a waiting one is renewed
    (env only)        CLAUDE_PROXY_API_KEYS          ""    keys clients must send (Bearer/x-api-key)
    --keys-file       CLAUDE_PROXY_KEYS_FILE         ""    named keys: roles, budgets, model/login lists
    --history-days    CLAUDE_PROXY_HISTORY_DAYS      90    days of per-request usage figures kept
    --prices          CLAUDE_PROXY_PRICES            ""    price table (JSON) for the value estimate
    --max-body        CLAUDE_PROXY_MAX_BODY          10 MB largest request body, then 413
    --cors-origins    CLAUDE_PROXY_CORS_ORIGINS      ""    browser origins allowed (or *); others get 403
    --allowed-hosts   CLAUDE_PROXY_ALLOWED_HOSTS     ""    Host names served besides localhost and the
                                                           bound address, or * (checked without keys)
    --max-waiting     CLAUDE_PROXY_MAX_WAITING       256   connections still sending a request head
    --shutdown-grace  CLAUDE_PROXY_SHUTDOWN_GRACE    30    seconds in-flight requests may finish
    --read-timeout    CLAUDE_PROXY_READ_TIMEOUT      60    seconds for a whole request head, and
                                                           for a whole request body (then 408)
    --history         CLAUDE_PROXY_HISTORY     structured  earlier turns: structured | flat
    --sessions        CLAUDE_PROXY_SESSIONS          mem   conversations kept live for their next turn
    --session-idle    CLAUDE_PROXY_SESSION_IDLE      300   seconds a kept conversation waits
    --idle-max        CLAUDE_PROXY_IDLE_MAX          mem   CLI processes running and idle, LRU
    --reuse           CLAUDE_PROXY_REUSE             100   requests per CLI process (0 = one each)
    --recycle-rss     CLAUDE_PROXY_RECYCLE_RSS       400   MB of a CLI's private memory above which
                                                           it is not reused (smaps_rollup Anonymous)
    --memory          CLAUDE_PROXY_MEMORY            ""    memory to size for (1G, 512M); default:
                                                           the least of cgroup limit, MemAvailable
    --web-tools       CLAUDE_PROXY_WEB_TOOLS       search  web tools clients may use: search | all | off
    --log-format      CLAUDE_PROXY_LOG_FORMAT        text  (text | json)
    --extra-usage     CLAUDE_PROXY_EXTRA_USAGE       deny  past the plan's limits: deny | allow
    --accounts        CLAUDE_PROXY_ACCOUNTS          ""    logins: NAME=CONFIG_DIR,NAME=token-file:PATH
    --state-dir       CLAUDE_PROXY_STATE_DIR   (below)   where the state store's file lives
    --store           CLAUDE_PROXY_STORE             on    stored responses, conversations: on | off
    --store-days      CLAUDE_PROXY_STORE_DAYS        30    days stored state is kept
    --store-max-mb    CLAUDE_PROXY_STORE_MAX_MB      1024  MB held at most; the oldest goes first
    --store-busy-timeout  CLAUDE_PROXY_STORE_BUSY_TIMEOUT  10  seconds a write waits while another
                                                           program holds the file locked, then lost
    --instance        CLAUDE_PROXY_INSTANCE   (host:port) this instance's name, in its ids
    --allow-unauthenticated   serve a non-loopback address without keys
    --check                   check the CLI, its login and the config, then exit
  The state directory defaults to $XDG_STATE_HOME/claude-proxy, else ~/.local/state/claude-proxy
  (made 0700; the file claude-proxy.db in it 0600).

Data flow
---------
    HTTP body -> dialect.parse -> Request (neutral) -> prompt rendering -> CLI process
      -> stream-json lines -> events (Start, TextDelta, ThinkingDelta, ToolCall, ToolCallDelta,
         WebSearch, Heartbeat, Reset, Done) -> tool-call engine (emulated tools)
      -> dialect: render (JSON) or its DialectStream (SSE)

Structure: which class does what
--------------------------------
    Handler (13)        http.server's do_*: one request path (Waiting admits the connection,
                        Host/Origin, key, framing, JSON), then a Route of ROUTES: a plain
                        function of the per-request Call.  App holds what every request shares.
    KeyRing, Budgets (13)
                        the keys: who may do what (Principal), and the budgets checked before
                        a request takes a CLI slot.
    generate, model_events, login_events (13)
                        one model request: a login (Logins), a slot (Gate), then one CLI turn
                        (Backend.run) or the tool engine (emulated_tool_events, section 6).
    OpenAIChat, AnthropicMessages, OpenAIResponses (9-11)
                        a dialect: parse -> Request, render a Completion, stream events as SSE
                        through its DialectStream (ChatStream, MessagesStream, ResponsesStream:
                        the stream's state and a handler per event type).
    StateStore (12)     one SQLite file: stored responses and conversations (StatefulResponses,
                        section 11) and the usage history (UsageHistory).
    Backend (7)         one CLI turn: a process from the IdleStore (or a new CLIProcess), the
                        request's stdin lines, its stdout through StreamTranslator into events;
                        a process that ends before its answer reached the client is replaced once.
    IdleStore (7)       every CLI process not running a turn: take (the best that fits: the
                        conversation's own (KeptConversation), one reset after a request with
                        the same settings, one pre-started), give back, evict (one LRU budget).
    PreStarter (7)      its thread keeps processes ready for the launch keys in Demand; backs
                        off after repeated deaths.
    ToolBridge (7)      native tools: the client's tools as the CLI's MCP server; its tool_use
                        blocks come back as ToolCalls, never run.  A client's web search is
                        the CLI's own WebSearch tool (WebSearch events).
    Account, Logins (7) each login's processes and plan windows; the choice of a login.
    Errors are one family (ProxyError, section 2), rendered by the dialect of the route.

Contents
--------
    1. constants          5. prompt rendering        9. OpenAI chat completions
    2. errors             6. tool calling            10. Anthropic messages
    3. config             7. CLI backend             11. OpenAI responses
    4. neutral model      8. SSE                     12. state store
                                                     13. auth, metrics, routes, handler, server
                                                     14. main
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import base64
import binascii
import calendar
import collections
import copy
import csv
import dataclasses
import hashlib
import hmac
import importlib
import io
import ipaddress
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
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
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
MAX_STOP_SEQUENCES = 32       #: Anthropic stop_sequences (each is searched in every text delta)
HISTORY_MODES = ("flat", "structured")
#: CLAUDE_PROXY_WEB_TOOLS -> the CLI tools a client's web search / web fetch may use
WEB_TOOL_MODES = {"off": (), "search": ("WebSearch",), "all": ("WebSearch", "WebFetch")}


# 2. Errors ######################################################################################

class ProxyError(Exception):
    """An error with an HTTP status; rendered in the caller's dialect by the route."""
    status = 500
    error_type = "api_error"    # Anthropic error type; the OpenAI renderer maps it

    code = None                 # OpenAI `code` (rate_limit_exceeded, insufficient_quota, ...)

    def __init__(self, message, status=None, error_type=None, headers=None, param=None, code=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.headers = dict(headers or {})
        self.param = param


class BadRequest(ProxyError):
    status, error_type = 400, "invalid_request_error"


class Unauthorized(ProxyError):
    status, error_type = 401, "authentication_error"


class NotFound(ProxyError):
    status, error_type = 404, "not_found_error"


class MethodNotAllowed(ProxyError):
    status, error_type = 405, "invalid_request_error"


class TooLarge(ProxyError):
    status, error_type = 413, "request_too_large"


class Forbidden(ProxyError):
    """Refused whoever asks: a page or Host this server does not serve, or a key that may not
    do this (its role, or its models and logins lists)."""
    status, error_type = 403, "permission_error"


class RateLimited(ProxyError):
    status, error_type = 429, "rate_limit_error"


class Overloaded(ProxyError):
    status, error_type = 529, "overloaded_error"


class UpstreamError(ProxyError):
    status, error_type = 502, "api_error"


class CLIEnded(UpstreamError):
    """The CLI's output ended before the line that was awaited: it crashed or was killed.  No
    error the upstream gave, so another process may answer instead (Backend.run)."""


class StillBorn(CLIEnded):
    """The CLI ended before printing a single line."""


class LoginFailed(UpstreamError):
    """The upstream refused the login the CLI used (401/403): the server's login, not the
    client's key, so another login may serve the request."""


class CLIStalled(UpstreamError):
    """A CLI stopped reading its input: it was ended, and the request fails."""


class CLIUnavailable(ProxyError):
    status, error_type = 503, "api_error"


class Timeout(ProxyError):
    status, error_type = 504, "timeout_error"


class ClientGone(Exception):
    """The HTTP client went away; nothing more can be sent to it."""
    #: what the access log, /metrics and /dashboard record for it (nginx's "client closed
    #: request"), a stream whose 200 went out included: an abandoned stream is not a served one
    status = 499


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
    allowed_hosts: tuple = ()
    max_waiting: int = 256
    shutdown_grace: float = 30.0
    pool_size: int = None        # None: sized from memory (size_idle), as are sessions, idle_max
    pool_max_idle: float = 300.0
    read_timeout: float = 60.0
    history: str = "structured"
    web_tools: str = "search"
    sessions: int = None
    session_idle: float = 300.0
    idle_max: int = None
    reuse: int = 100
    recycle_rss: int = 400
    #: how pool_size, sessions and idle_max were chosen (start-up log, /health), and which
    #: of them the operator left to size_idle
    sizing: str = ""
    sized: tuple = ()
    #: CLAUDE_PROXY_MEMORY: the bytes the proxy may fill, when the machine cannot tell
    memory: int = None
    #: (bytes, where from) the sizes were chosen from (available_memory), read once
    memory_source: tuple = ()
    extra_usage: str = "deny"
    #: the logins: ((name, "config_dir" | "token_file", path), ...); () = the CLI's own login
    accounts: tuple = ()
    #: an empty directory every CLI runs in (stable name: the CLI quotes it to the model)
    workdir: str = ""
    #: the state store (section 12): its directory ("" = default_state_dir), on | off,
    #: retention in days, size cap in MB
    state_dir: str = ""
    store: str = "on"
    #: this instance's name, in the ids it makes ("" = default_instance)
    instance: str = ""
    store_days: float = 30.0
    store_max_mb: int = 1024
    #: seconds a store write waits for another program's lock on the file (SQLite's busy
    #: timeout) before it fails and is counted lost
    store_busy_timeout: float = 10.0
    #: the named keys (JSON: names, roles, budgets, model and login lists; section 13, keys)
    keys_file: str = ""
    #: days of per-request usage history kept in the state store
    history_days: int = 90
    #: the operator's price table (JSON), replacing PRICES entries by model
    prices_file: str = ""
    #: snapshot of os.environ taken at start-up; nothing reads os.environ later
    environ: dict = field(default_factory=dict, repr=False)


def parse_size(text):
    """"1G", "512M", "1.5GiB", "800000000" -> bytes (binary units); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


parse_size.what = "a size such as 1G or 512M"


def gib(n):
    return "%.1f GiB" % (n / 2 ** 30)


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
    ("--keys-file", "CLAUDE_PROXY_KEYS_FILE", "keys_file", str,
     "named keys with roles, budgets and allowed models/logins (JSON, chmod 600); reloaded on "
     "SIGHUP and when it changes"),
    ("--history-days", "CLAUDE_PROXY_HISTORY_DAYS", "history_days", int,
     "days of per-request usage figures kept in the state store (0 = keep no history)"),
    ("--prices", "CLAUDE_PROXY_PRICES", "prices_file", str,
     "a JSON price table (USD per million tokens by model) replacing the built-in one for the "
     "API-equivalent value estimate"),
    ("--max-body", "CLAUDE_PROXY_MAX_BODY", "max_body", int, "largest request body in bytes (413)"),
    ("--cors-origins", "CLAUDE_PROXY_CORS_ORIGINS", "cors_origins", str,
     "comma-separated browser origins allowed by CORS, or *"),
    ("--allowed-hosts", "CLAUDE_PROXY_ALLOWED_HOSTS", "allowed_hosts", str,
     "comma-separated Host names served besides localhost and the bound address (a reverse "
     "proxy's public name), or *; checked only when no keys are set"),
    ("--max-waiting", "CLAUDE_PROXY_MAX_WAITING", "max_waiting", int,
     "connections still sending a request head (or idle between requests) held at most; at "
     "the bound the one waiting longest is closed"),
    ("--shutdown-grace", "CLAUDE_PROXY_SHUTDOWN_GRACE", "shutdown_grace", float,
     "seconds in-flight requests may finish after SIGTERM/SIGINT"),
    ("--pool-size", "CLAUDE_PROXY_POOL_SIZE", "pool_size", int,
     "pre-started CLI processes kept ready (0 = off; each idle one holds ~100-130 MB of its own)"),
    ("--pool-max-idle", "CLAUDE_PROXY_POOL_MAX_IDLE", "pool_max_idle", float,
     "seconds a pre-started process may wait before it is replaced by a fresh one"),
    ("--read-timeout", "CLAUDE_PROXY_READ_TIMEOUT", "read_timeout", float,
     "seconds a request head may take in all (or a kept-alive connection idle), and a request "
     "body in all (then 408)"),
    ("--history", "CLAUDE_PROXY_HISTORY", "history", str,
     "earlier turns of a conversation: structured (real turns) or flat (one JSON transcript)"),
    ("--sessions", "CLAUDE_PROXY_SESSIONS", "sessions", int,
     "finished conversations whose CLI process is kept for their next turn (structured history; "
     "0 = off; each holds ~100-130 MB of its own)"),
    ("--session-idle", "CLAUDE_PROXY_SESSION_IDLE", "session_idle", float,
     "seconds a kept conversation waits for its next turn before its process is ended"),
    ("--idle-max", "CLAUDE_PROXY_IDLE_MAX", "idle_max", int,
     "CLI processes held at most, running and idle (pool, reused, kept) together; before a "
     "request starts one, the least recently used idle one is ended (a running one never is)"),
    ("--reuse", "CLAUDE_PROXY_REUSE", "reuse", int,
     "requests one CLI process serves, reset in between, before it is replaced (0 = one each)"),
    ("--recycle-rss", "CLAUDE_PROXY_RECYCLE_RSS", "recycle_rss", int,
     "MB of private memory (anonymous, from /proc/PID/smaps_rollup; RSS where that is absent) "
     "above which a CLI process is replaced instead of reused (0 = no limit)"),
    ("--memory", "CLAUDE_PROXY_MEMORY", "memory", parse_size,
     "memory the proxy and its CLIs may fill, e.g. 1G or 512M, when the machine cannot tell "
     "(a container that shows the host's); default: the least of its cgroup's limit and "
     "MemAvailable"),
    ("--extra-usage", "CLAUDE_PROXY_EXTRA_USAGE", "extra_usage", str,
     "once a login's plan limits are used up: deny (429 until the reset) or allow (the CLI goes "
     "on, billed as extra usage where the plan has it)"),
    ("--accounts", "CLAUDE_PROXY_ACCOUNTS", "accounts", str,
     "comma-separated logins NAME=CONFIG_DIR (a dir `claude login` wrote) or "
     "NAME=token-file:PATH (a file holding a `claude setup-token` token); never a token itself"),
    ("--web-tools", "CLAUDE_PROXY_WEB_TOOLS", "web_tools", str,
     "web tools a client may ask for: search (the CLI's WebSearch, run by Anthropic), all "
     "(also WebFetch, which fetches pages from this machine) or off"),
    ("--state-dir", "CLAUDE_PROXY_STATE_DIR", "state_dir", str,
     "directory of the state store (stored responses, conversations); default "
     "$XDG_STATE_HOME/claude-proxy or ~/.local/state/claude-proxy"),
    ("--store", "CLAUDE_PROXY_STORE", "store", str,
     "on, or off: nothing is stored (no file is made; stored responses, previous_response_id, "
     "conversations and background runs answer an error saying so)"),
    ("--instance", "CLAUDE_PROXY_INSTANCE", "instance", str,
     "this instance's name (a-z, 0-9), put in the ids of stored responses and conversations so "
     "a load balancer can route by it; default: made from the host name and port"),
    ("--store-days", "CLAUDE_PROXY_STORE_DAYS", "store_days", float,
     "days stored responses and conversations are kept (a conversation: since its last use)"),
    ("--store-max-mb", "CLAUDE_PROXY_STORE_MAX_MB", "store_max_mb", int,
     "MB of stored responses and conversations held at most; the oldest are removed first"),
    ("--store-busy-timeout", "CLAUDE_PROXY_STORE_BUSY_TIMEOUT", "store_busy_timeout", float,
     "seconds a write to the state store waits while another program (a backup, the sqlite3 "
     "shell) holds the file locked; then it fails and is counted lost (the request goes on)"),
)
LIST_OPTIONS = ("pass_env", "api_keys", "cors_origins", "allowed_hosts", "accounts")
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
        default = getattr(defaults, name)
        p.add_argument(flag, dest=name, default=None,
                       help="%s (env %s%s)" % (help_, env, "" if name == "memory" else
                                               ", default from memory" if default is None
                                               else ", default %r" % (default,)))
    p.epilog = "environment only:\n" + "\n".join(env_only) + "\n\n" + p.epilog
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow a non-loopback --host without keys (CLAUDE_PROXY_KEYS_FILE, "
                        "CLAUDE_PROXY_API_KEYS)")
    p.add_argument("--check", action="store_true",
                   help="check the CLI (found, version, logged in) and the config, then exit")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


def epilog_text():
    lines = ["tool-call handlers: " + ", ".join(sorted(HANDLERS))]
    for name, err in sorted(MODULE_ERRORS.items()):
        lines.append("  module %s failed to load: %s" % (name, err))
    return "\n".join(lines)


def option_values(args, environ):
    """The OPTIONS given, by Config field: a flag wins over its variable; each read by its
    type (SystemExit naming the variable when it cannot be), LIST_OPTIONS split at commas."""
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
            raise SystemExit("error: %s must be %s, got %r"
                             % (env, getattr(type_, "what", type_.__name__), raw))
    for name in LIST_OPTIONS:
        if name in values:
            values[name] = tuple(v.strip() for v in values[name].split(",") if v.strip())
    return values


def load_config(argv=None, environ=None):
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    cfg = Config(environ=environ, allow_unauthenticated=args.allow_unauthenticated,
                 **option_values(args, environ))
    if cfg.max_concurrency < 1:
        raise SystemExit("error: CLAUDE_PROXY_MAX_CONCURRENCY must be at least 1")
    if cfg.max_waiting < 1:
        raise SystemExit("error: CLAUDE_PROXY_MAX_WAITING must be at least 1")
    for i, key in enumerate(cfg.api_keys, 1):
        weak = weak_key(key)
        if weak:
            raise SystemExit("error: CLAUDE_PROXY_API_KEYS key %d %s; make one with: "
                             "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
                             % (i, weak))
    for name, env in (("pool_size", "POOL_SIZE"), ("sessions", "SESSIONS"), ("idle_max", "IDLE_MAX"),
                      ("reuse", "REUSE"), ("recycle_rss", "RECYCLE_RSS")):
        if (getattr(cfg, name) or 0) < 0:
            raise SystemExit("error: CLAUDE_PROXY_%s must be 0 or more" % env)
    cfg = size_idle(cfg)
    try:
        resolve_model(cfg.default_model, None)
    except ProxyError as err:
        raise SystemExit("error: CLAUDE_PROXY_DEFAULT_MODEL: " + err.message)
    if cfg.log_format not in ("text", "json"):
        raise SystemExit("error: CLAUDE_PROXY_LOG_FORMAT must be text or json")
    if cfg.history not in HISTORY_MODES:
        raise SystemExit("error: CLAUDE_PROXY_HISTORY must be structured or flat")
    if cfg.extra_usage not in ("deny", "allow"):
        raise SystemExit("error: CLAUDE_PROXY_EXTRA_USAGE must be deny or allow")
    if cfg.accounts:
        cfg = dataclasses.replace(cfg, accounts=parse_accounts(cfg.accounts))
    if cfg.web_tools not in WEB_TOOL_MODES:
        raise SystemExit("error: CLAUDE_PROXY_WEB_TOOLS must be search, all or off")
    if cfg.store not in ("on", "off"):
        raise SystemExit("error: CLAUDE_PROXY_STORE must be on or off")
    if cfg.store_days <= 0 or cfg.store_max_mb <= 0:
        raise SystemExit("error: CLAUDE_PROXY_STORE_DAYS and CLAUDE_PROXY_STORE_MAX_MB must be "
                         "more than 0 (CLAUDE_PROXY_STORE=off keeps nothing)")
    if not 0 <= cfg.store_busy_timeout <= 3600:        # nan and inf fail too
        raise SystemExit("error: CLAUDE_PROXY_STORE_BUSY_TIMEOUT must be 0 to 3600 seconds")
    if not cfg.state_dir:
        cfg = dataclasses.replace(cfg, state_dir=default_state_dir(environ))
    if not cfg.instance:
        cfg = dataclasses.replace(cfg, instance=default_instance(cfg.port))
    if not re.fullmatch(r"[a-z0-9]{1,32}", cfg.instance):
        raise SystemExit("error: CLAUDE_PROXY_INSTANCE must be 1-32 characters a-z and 0-9")
    if cfg.history_days < 0:
        raise SystemExit("error: CLAUDE_PROXY_HISTORY_DAYS must be 0 or more")
    try:
        KeyRing(cfg)
    except ValueError as exc:
        raise SystemExit("error: CLAUDE_PROXY_KEYS_FILE: %s" % exc)
    try:
        load_prices(cfg.prices_file)
    except ValueError as exc:
        raise SystemExit("error: CLAUDE_PROXY_PRICES: %s" % exc)
    if not cfg.api_keys and not cfg.keys_file and not cfg.allow_unauthenticated and \
            not is_loopback(cfg.host):
        raise SystemExit("error: refusing to listen on %s without keys (CLAUDE_PROXY_KEYS_FILE or "
                         "CLAUDE_PROXY_API_KEYS): anyone who "
                         "reaches it would spend your subscription. Set keys, or pass "
                         "--allow-unauthenticated if something in front checks them." % cfg.host)
    return cfg, args


#: what one more CLI process costs before one has been measured: its private memory (see
#: process_memory), 108-123 MB measured on CLIs that each answered a request (2.1.330), a bit
#: more as it serves more.  Not its RSS (~190 MB): ~80 MB of that is the mapped binary, shared by
#: every CLI and held once.  The store re-sizes from what its own CLIs measure (Backend.measured).
CLI_MEMORY = 130 * 2 ** 20
#: a cgroup v1 "no limit" is a page-rounded 2**63; anything above this is no limit
NO_LIMIT = 2 ** 60


def process_memory(pid, root="/"):
    """{"rss", "pss", "private"} bytes of one process, and "measure": how `private` was read.
    `private` is what the process alone holds: its anonymous memory (heap, JIT code, stacks) from
    /proc/PID/smaps_rollup.  Not Private_Clean: a CLI alone on the machine counts its binary's
    pages as private, though a second CLI shares them.  Where smaps_rollup is absent (kernels
    before 4.14, some sandboxes) all three are VmRSS.  None when the process is gone."""
    proc = os.path.join(root, "proc", str(pid))
    fields = {}
    try:
        with open(os.path.join(proc, "smaps_rollup"), "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"Rss", b"Pss", b"Anonymous"):
                    fields[key.decode()] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        fields = {}
    if len(fields) == 3:
        return {"rss": fields["Rss"], "pss": fields["Pss"], "private": fields["Anonymous"],
                "measure": "smaps_rollup"}
    try:
        with open(os.path.join(proc, "status"), "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    return {"rss": rss, "pss": rss, "private": rss, "measure": "rss"}
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path, key=None):
    """An integer file (memory.max: "max" is None), or one `key value` line of a stat file."""
    try:
        with open(path) as f:
            if key is None:
                text = f.read().strip()
                return None if text == "max" else int(text)
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return None


def cgroup_memory(root="/"):
    """(room, text) under the tightest memory limit of the proxy's own cgroup and its ancestors,
    or None where none is set or none can be read.  The cgroup comes from /proc/self/cgroup (v2:
    the `0::` line, mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified; v1: the memory line, at
    /sys/fs/cgroup/memory); a directory that is not there is skipped (a container sees its own
    cgroup at the mount point).  Room is the limit minus what the cgroup holds, reclaimable page
    cache (inactive_file) not counted, as `docker stats` and the kubelet count it."""
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fs = os.path.join(root, "sys/fs/cgroup")
    tries = []
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            for mount in (fs, os.path.join(fs, "unified")):
                if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                    tries.append(("v2", mount, path, "memory.max", "memory.current",
                                  "inactive_file"))
                    break
        elif "memory" in controllers.split(","):
            tries.append(("v1", os.path.join(fs, "memory"), path, "memory.limit_in_bytes",
                          "memory.usage_in_bytes", "total_inactive_file"))
    best = None
    for version, mount, path, limit_file, usage_file, cache_key in tries:
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            rel = "/" + "/".join(parts[:depth])
            where = os.path.join(mount, *parts[:depth])
            limit = _read_int(os.path.join(where, limit_file))
            usage = _read_int(os.path.join(where, usage_file))
            if limit is None or limit >= NO_LIMIT or usage is None:
                continue
            usage -= _read_int(os.path.join(where, "memory.stat"), cache_key) or 0
            room = max(0, limit - max(0, usage))
            if best is None or room < best[0]:
                best = (room, "cgroup %s %s %s %s (%s free)"
                        % (version, rel, limit_file, gib(limit), gib(room)))
    return best


def available_memory(root="/", override=None):
    """(bytes, where from) the proxy may fill: CLAUDE_PROXY_MEMORY when the operator set it, else
    the least of /proc/meminfo MemAvailable and the room under its cgroup's limit (cgroup_memory);
    (None, "") where nothing can be read."""
    if override is not None:
        return override, "CLAUDE_PROXY_MEMORY %s" % gib(override)
    avail, source = None, ""
    try:
        with open(os.path.join(root, "proc/meminfo")) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    source = "MemAvailable %s" % gib(avail)
    except (OSError, ValueError, IndexError):
        pass
    limited = cgroup_memory(root)
    if limited is not None and (avail is None or limited[0] < avail):
        avail, source = limited
    return avail, source


#: the idle-process sizes the operator may leave to size_idle
SIZED = ("pool_size", "sessions", "idle_max")
#: CLIs beyond the running slots that memory may buy at most: each holds its memory for up to
#: CLAUDE_PROXY_SESSION_IDLE, and a box with room for more usually runs other things too
EXTRA_MAX = 8


def size_idle(cfg, memory=None, cli_memory=None):
    """cfg with the idle-process sizes the operator left unset chosen from memory.

    The `max_concurrency` running CLIs are the operator's choice, so their memory is taken as
    given; a process that finished in one of those slots and waits idle holds no more than it
    did while it ran, so the budget is never below max_concurrency (reuse on the smallest
    machine).  Beyond the slots, `extra` more processes fit in 80 % of the available memory at
    `cli_memory` each (measured, else CLI_MEMORY), at most EXTRA_MAX: the pool is at most 2 of
    them, and the rest, with the slots, is for kept conversations (a bigger box keeps more
    conversations, each a turn's start and its whole prompt cache saved); the budget is the
    slots plus the extra.  The store holds running and idle processes together within the
    budget (IdleStore.make_room)."""
    unset = tuple(n for n in SIZED if getattr(cfg, n) is None)
    avail, source = memory or cfg.memory_source or available_memory(override=cfg.memory)
    per = cli_memory or CLI_MEMORY
    slots = cfg.max_concurrency
    extra = 2 if avail is None else min(EXTRA_MAX, max(0, int((avail * 0.8 - slots * per) // per)))
    pool = min(2, extra) if cfg.pool_size is None else cfg.pool_size
    sessions = max(0, slots + extra - pool) if cfg.sessions is None else cfg.sessions
    budget = max(slots + extra, pool + sessions) if cfg.idle_max is None else cfg.idle_max
    if not unset:
        how = "set by the operator (memory: %s)" % (source or "unknown")
    elif avail is None:
        how = "%s from defaults (memory unknown)" % ", ".join(unset)
    else:
        how = "%s from %s, %d MB a CLI (%s), %d running" % (
            ", ".join(unset), source, per // 2 ** 20, "measured" if cli_memory else "default",
            slots)
    return dataclasses.replace(cfg, pool_size=pool, sessions=sessions, idle_max=budget, sizing=how,
                               sized=unset, memory_source=(avail, source))


TOKEN_NOT_HERE = ("A token never goes into the configuration (the environment and argv are "
                  "readable by others): write it to a file (chmod 600) and give token-file:PATH.")


def parse_accounts(items):
    """CLAUDE_PROXY_ACCOUNTS entries -> ((name, credential, path), ...), credential being
    "config_dir" or "token_file".  An entry is never echoed: whoever pastes a token there by
    mistake must not find it in a log."""
    out, names = [], set()
    for i, item in enumerate(items, 1):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or not value:
            raise SystemExit("error: CLAUDE_PROXY_ACCOUNTS entry %d must be NAME=CONFIG_DIR or "
                             "NAME=token-file:PATH (NAME: letters, digits, _ . -). %s"
                             % (i, TOKEN_NOT_HERE))
        if name in names:
            raise SystemExit("error: CLAUDE_PROXY_ACCOUNTS names %r twice" % name)
        names.add(name)
        if value.startswith("token-file:"):
            credential, path = "token_file", value[len("token-file:"):]
            if not os.path.isfile(path):
                raise SystemExit("error: CLAUDE_PROXY_ACCOUNTS %s: no token file at %s"
                                 % (name, path))
        elif os.path.isdir(value):
            credential, path = "config_dir", value
        elif value.startswith("sk-ant-") or "/" not in value:
            raise SystemExit("error: CLAUDE_PROXY_ACCOUNTS %s is neither a directory nor "
                             "token-file:PATH. %s" % (name, TOKEN_NOT_HERE))
        else:
            raise SystemExit("error: CLAUDE_PROXY_ACCOUNTS %s: no directory %s (log in with "
                             "CLAUDE_CONFIG_DIR=%s claude login)" % (name, value, value))
        out.append((name, credential, os.path.abspath(path)))
    return tuple(out)


def default_instance(port):
    """A short name that stays the same across restarts of one proxy: from the host name and
    port (two proxies on one host differ by port)."""
    digest = hashlib.sha256(("%s:%d" % (socket.gethostname(), port)).encode()).digest()
    return "".join("abcdefghijklmnopqrstuvwxyz0123456789"[b % 36] for b in digest[:6])


#: the placeholder key of claude-proxy.env.example and the README: never a real key
EXAMPLE_KEY = "change-me-to-a-long-random-string"


def weak_key(key):
    """Why `key` may not be used (never the key itself), or None."""
    if key == EXAMPLE_KEY:
        return "is the example's placeholder"
    if len(key) < 16:
        return "is shorter than 16 characters"
    return None


def is_loopback(host):
    try:
        import ipaddress
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def config_items(cfg):
    """The effective config as (env var, text) pairs, secrets masked (--check, the dashboard)."""
    items = []
    for _flag, env, name, _t, _h in OPTIONS:
        value = getattr(cfg, name)
        if name in SECRET_OPTIONS and value:
            value = "%d key(s), masked" % len(value)
        elif name == "accounts":
            value = ",".join("%s=%s" % (n, p if k == "config_dir" else "token-file:" + p)
                             for n, k, p in value)
        elif isinstance(value, tuple):
            value = ",".join(value)
        elif name == "memory":
            value = "not set" if value is None else gib(value)
        items.append((env, str(value)))
    return items


def describe_config(cfg):
    """The effective config as text, secrets masked."""
    return "\n".join("  %-30s %s" % item for item in config_items(cfg))


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
    name: str                    # as the model sees it: NAMESPACE.name inside a namespace tool
    description: str
    parameters: dict             # JSON schema of the call's arguments
    tool_type: str = "function"  # "function" | "custom": free-form text input (CUSTOM_INPUT)
    namespace: str = ""          # the Responses namespace tool it came in (returned on calls)

    @property
    def client_name(self):
        """The name the client knows the tool by (without its namespace)."""
        return self.name[len(self.namespace) + 1:] if self.namespace else self.name


#: a custom tool's free-form input, carried as the one argument of the call the model makes
CUSTOM_INPUT = "input"


def custom_tool_spec(name, description, fmt, namespace=""):
    """A custom tool (free-form text input, optionally a grammar) as a one-argument tool: the
    model writes the raw input as a string, which is handed back as the call's input."""
    hint = "The raw input for this tool, as free-form text."
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        grammar = fmt.get("grammar") if isinstance(fmt.get("grammar"), dict) else fmt
        hint = "The raw input for this tool. It must match this %s grammar:\n%s" % (
            grammar.get("syntax") or "lark", grammar.get("definition") or "")
    return ToolSpec(name, description, {"type": "object", "properties": {
        CUSTOM_INPUT: {"type": "string", "description": hint}}, "required": [CUSTOM_INPUT]},
        "custom", namespace)


def url_citations(text, searches):
    """(start, end, url, title) for each place the text cites a source its searches found: a
    markdown link [title](url) as a whole, or the bare url."""
    out, sources = [], {}
    for s in searches:
        for src in s.sources:
            sources.setdefault(src.get("url"), src.get("title") or "")
    for url, title in sources.items():
        if not url:
            continue
        for m in re.finditer(r"\[[^\]\n]*\]\(%s\)|%s" % (re.escape(url), re.escape(url)), text):
            out.append((m.start(), m.end(), url, title))
    return sorted(out)


def tool_spec(req, name):
    """The offered tool a call names, or None (a name the model made up)."""
    return next((t for t in req.tools if t.name == name), None)


def custom_input(arguments):
    """A custom tool call's raw input from the call's JSON arguments."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return arguments
    if isinstance(args, dict) and isinstance(args.get(CUSTOM_INPUT), str):
        return args[CUSTOM_INPUT]
    return arguments


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
    session: str = ""            # the client says a conversation follows (session_signal)
    web_tools: tuple = ()        # the CLI's own WebSearch / WebFetch, when the client asks for them
    handler: object = None
    id_prefix: str = "call_"     # tool call ids: call_... (OpenAI) or toolu_... (Anthropic)
    json_schema: dict = None     # structured output: the answer must be JSON matching it
    account: str = ""            # the login that serves it (section 7, logins)
    served_by: str = ""          # the kind of CLI process that answered (section 7)
    retried: bool = False        # asked again on another process after its CLI ended (Backend.run)
    #: with keys: the client's key as a digest (hex); its kept conversations are its own
    tenant: str = ""
    response_id: str = ""        # a stored response's id, made before the turn (section 11)


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read: int = 0
    cache_write: int = 0
    web_searches: int = 0

    def add(self, other):
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read += other.cache_read
        self.cache_write += other.cache_write
        self.web_searches += other.web_searches

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
class WebSearch:
    """A web search the CLI ran for the model (its WebSearch tool): the query and the sources
    found, [{"url": ..., "title": ...}]."""
    id: str
    query: str
    sources: list


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
    whole: bool = True           # False: the client got less than the model wrote (KeptConversation)


@dataclass
class Completion:
    text: str = ""
    thinking: str = ""
    signature: str = ""
    tool_calls: list = field(default_factory=list)
    searches: list = field(default_factory=list)
    stop_reason: str = "end_turn"
    stop_sequence: str = None
    usage: Usage = field(default_factory=Usage)


def collect(events):
    """Fold an event stream into one Completion (the non-streaming path)."""
    out, text, thought = Completion(), [], []
    for ev in events:
        if isinstance(ev, Reset):
            text, thought, out.tool_calls, out.searches = [], [], [], []
        elif isinstance(ev, WebSearch):
            out.searches.append(ev)
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


def session_signal(body, headers):
    """What the client sent that says a conversation will follow, in either dialect: header
    X-Session-Id, OpenAI prompt_cache_key / safety_identifier / user, Anthropic
    metadata.user_id (Claude Code puts its session there); "" when none."""
    metadata = body.get("metadata") if isinstance(body, dict) else None
    for value in (headers.get("X-Session-Id"),
                  *(body.get(k) for k in ("prompt_cache_key", "safety_identifier", "user")),
                  metadata.get("user_id") if isinstance(metadata, dict) else None):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


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
    block_type = block.get("type")
    if block_type == "text":
        return block.get("text", "")
    if block_type == "tool_use":
        return handler.render_call(block["name"], block.get("input", {}), block.get("id"))
    if block_type == "tool_result":
        return handler.render_result(block)
    if block_type == "image":
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
        if req.json_schema is not None:
            parts.append(SCHEMA_RULE + json.dumps(req.json_schema, ensure_ascii=False))
    return "\n\n".join(p for p in parts if p)


SCHEMA_RULE = ("When you give your final answer (a reply without tool calls), the whole reply "
               "must be one JSON value matching this JSON schema, with no other text and no "
               "code fence around it:\n")


def cli_schema(req):
    """The JSON schema for the CLI's structured-output mode (its StructuredOutput tool), or
    None.  That mode asks again until the model calls StructuredOutput, so a model that first
    has to call the client's tools could not: with tools offered, the schema is a rule in the
    system prompt instead (render_system), and the final text answer is the JSON."""
    if req.json_schema is None or (req.tools and req.tool_choice != "none"):
        return None
    return req.json_schema


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
_XML_TAIL = len("</" + "antml:function_calls>")
#: the positions among a parse hint's entries (moved when the text before them is dropped)
_HINT_POSITIONS = ("search", "last", "quotes")


def joined_text(segs):
    """Parsed segments with adjacent text segments joined into one and empty ones dropped."""
    merged = []
    for seg_type, val in segs:
        if seg_type == "text" and merged and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + val)
        elif not (seg_type == "text" and val == ""):
            merged.append((seg_type, val))
    return merged


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

    def parse(self, text, final=True, names=None, resume=None):
        """Split text into [("text", s) | ("call", (name, args_dict))] segments.

        Returns (segments, consumed): when final is False, text after `consumed` is still
        undecided (it may be the start of a tool block) and should be offered again with more.
        `names`, when given, are the tool names a ```json fence may call.  `resume` (a dict the
        caller keeps, see ToolTextParser) carries where the search for the end of the undecided
        block stopped, so the next call with the same text and more goes on from there.
        """
        segs, pos, n = [], 0, len(text)
        prior = dict(resume or {})
        if resume is not None:
            resume.clear()
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
            # the block left undecided last time starts the text (the caller dropped what was
            # consumed before it): its search goes on where it stopped
            hint = dict(prior) if start == 0 else {}
            if marker == _FENCE:
                result = self._parse_fence(text, start, final, names, hint)
            else:
                result = self._parse_xml(text, start, final, hint)
            if result is None:           # undecided: wait for more text
                if resume is not None:
                    resume.update({k: v - start if k in _HINT_POSITIONS else v
                                   for k, v in hint.items()})
                break
            calls, end = result
            if calls:
                segs.extend(("call", c) for c in calls)
            else:
                segs.append(("text", text[start:end]))
            pos = end
        return joined_text(segs), pos

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

    def _parse_fence(self, text, start, final, names, hint):
        """(calls, end) for the fence at `start`, or None while undecided.  Every closing fence
        that did not end the block is looked at once: `hint["search"]` is where the next call
        goes on (a closing fence at the very end of the text is tried again with what follows).
        JSON is tried only where it can end: not inside one of its strings (_in_json_string),
        and not after a fence outside its strings has been tried (backticks are not JSON)."""
        nl = text.find("\n", start + 3)
        if nl < 0:
            return None if not final else ([], len(text))
        info = text[start + 3:nl].strip().lower()
        if info not in TOOL_FENCES:
            return [], nl + 1              # an ordinary code fence: plain text
        body_start = nl + 1
        search = max(body_start, hint.get("search", 0))
        while True:
            close = text.find(_FENCE, search)
            if close < 0:
                hint["search"] = max(search, len(text) - 2)   # "``" may become a fence
                if not final:
                    return None
                # JSON that never parses stays text up to the last closing fence after it
                return [], hint["last"] + 3 if "last" in hint else len(text)
            calls = None if hint.get("dead") or self._in_json_string(text, body_start, close, hint) \
                else self._calls_from_json(text[body_start:close], info, names)
            if calls is not None:
                end = close + 3
                return calls, end
            if not hint.get("instring"):
                hint["dead"] = True      # its backticks are outside any string from now on
            search, hint["last"] = close + 3, close
            if close == 0 or text[close - 1] == "\n":
                rest = text[close + 3:].lstrip(" \t")
                if rest.startswith("\n") or (final and not rest):
                    return [], close + 3       # a fence alone on its line ends a broken block
                if not rest and not final:
                    hint["search"] = close
                    return None
            # JSON that never parses stays text once a closing fence follows it
            if text.find(_FENCE, search) < 0 and (final or not text[body_start:close].strip()):
                return [], close + 3

    @staticmethod
    def _in_json_string(text, body_start, close, hint):
        """True when `close` lies inside a JSON string of the body: an odd number of unescaped
        quotes before it.  Valid JSON cannot end there; the quotes are counted once, from
        where the count stopped (hint "quotes", "instring")."""
        pos = max(body_start, hint.get("quotes", body_start))
        inside = hint.get("instring", False)
        while True:
            q = text.find('"', pos, close)
            if q < 0:
                break
            slashes = q
            while slashes > body_start and text[slashes - 1] == "\\":
                slashes -= 1
            if (q - slashes) % 2 == 0:
                inside = not inside
            pos = q + 1
        hint["quotes"], hint["instring"] = close, inside
        return inside

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
    def _parse_xml(text, start, final, hint):
        # a closing tag may have begun at the end of the text searched last time
        m = _XML_CLOSE.search(text, max(start, (hint.get("search") or 0) - _XML_TAIL))
        if not m:
            hint["search"] = len(text)
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


class ToolTextParser:
    """One streamed answer through a handler's parse(), delta by delta, in time linear in its
    size: what parse() consumed is dropped, and the search for the end of an undecided tool
    block goes on where it stopped (parse's `resume`), so a long block with many inner ```
    fences is not read again from its start at every delta (bench/tool_parser.py)."""

    def __init__(self, handler, names):
        self.handler, self.names = handler, names
        self.pending, self.resume = "", {}
        # a module's own parse() may not know `resume`: it is then called as before
        self.resumable = type(handler).parse is BaseToolCallHandler.parse

    def _parse(self, final):
        kw = {"resume": self.resume} if self.resumable else {}
        segs, used = self.handler.parse(self.pending, final=final, names=self.names, **kw)
        self.pending = self.pending[used:]
        return segs

    def feed(self, text):
        """The segments decided once `text` is added."""
        self.pending += text
        return self._parse(False)

    def finish(self):
        """The segments of what is left, at the end of the answer."""
        segs = self._parse(True)
        self.pending, self.resume = "", {}
        return segs


@dataclass
class Attempt:
    unsent: list = field(default_factory=list)   # events not yet sent to the client
    text: str = ""
    calls: int = 0
    dropped: int = 0             # calls beyond the first when parallel_tool_calls is off
    holding: bool = True
    done: Done = None
    chars: int = 0               # of answer text so far
    #: the held text reads as a refusal: it stays one as it grows (not searched again per delta)
    refused: bool = False


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
    yield from first.unsent
    reason = "tool_use" if first.calls else (first.done.stop_reason if first.done else "end_turn")
    yield Done(reason, total, first.done.stop_sequence if first.done else None,
               whole=not first.dropped and (first.done is None or first.done.whole))


def _tool_attempt(req, run, messages, hold_all, total):
    handler, names, a = req.handler, {t.name for t in offered_tools(req)}, Attempt()
    parser, answer = ToolTextParser(req.handler, names), []

    def convert(segs):
        for seg_type, val in segs:
            if seg_type == "text":
                answer.append(val)
                a.chars += len(val)
                yield TextDelta(val)
            elif req.parallel_tool_calls or not a.calls:
                a.calls += 1
                yield ToolCall(new_id(req.id_prefix), val[0], json.dumps(val[1], ensure_ascii=False))
            else:
                a.dropped += 1

    for ev in run(messages):
        if isinstance(ev, TextDelta):
            out = list(convert(parser.feed(ev.text)))
        elif isinstance(ev, Done):
            out = list(convert(parser.finish()))
            total.add(ev.usage)
            a.done = ev
        elif isinstance(ev, (Heartbeat, Start)):
            yield ev
            continue
        elif isinstance(ev, Reset):
            parser, a.calls, a.dropped = ToolTextParser(req.handler, names), 0, 0
            a.chars, a.refused = 0, False
            answer.clear()
            a.unsent = []
            out = [ev]
        else:
            out = [ev]
        if not a.holding:
            yield from out
            continue
        a.unsent.extend(out)
        if hold_all or a.refused or not (a.calls or a.chars > REFUSAL_HOLD_CHARS):
            continue
        a.refused = handler.is_refusal("".join(answer))
        if not a.refused:
            a.holding = False
            yield from a.unsent
            a.unsent = []
    a.text = "".join(answer)
    return a


# 7. CLI backend #################################################################################
# A CLI process serves request after request (reset in between; or holds a conversation: see
# IdleStore), run as a plain model: no built-in tools, no CLAUDE.md, no settings, no session
# files, its own TMPDIR, an empty working directory, an allow-listed environment.  Prompts travel on
# stdin (stream-json), never on argv.  Native tools are the only tools it ever sees: the
# client's, through ToolBridge, and never run (the CLI's own WebSearch only when asked for).
# Sub-sections: process and protocol; the supply of processes; the native tool bridge; stream
# translation; logins.

#: efforts a running process accepts per request (apply_flag_settings effortLevel); "max" is
#: session-only in the CLI, so it has to be a launch flag.
RUNTIME_EFFORTS = ("low", "medium", "high", "xhigh")
#: seconds a finished process may take to rewind its conversation before it is ended instead
RESET_SECONDS = 5.0
#: seconds one write to a CLI's stdin may wait for it to read (at most the request timeout):
#: a CLI that stops reading is ended, not waited on for ever
SEND_SECONDS = 30.0


# -- process and protocol: launch settings, stdin lines, one CLI process --------------------------

@dataclass(frozen=True)
class Launch:
    """What must be fixed when a CLI process starts (argv and environment); the idle store is keyed
    on it.  System prompt, effort and model aliases are sent per request over the control
    protocol.  A full model id goes on argv: `set_model` with one costs an extra upstream
    probe request (max_tokens 1) on every run, `--model` does not."""
    model: str = ""              # a full id; "" = the default, or an alias set per request
    effort: str = ""             # only "max"
    disable_thinking: bool = False
    max_tokens: int = 0
    account: str = ""            # the login (section 7, logins): its own processes
    web_tools: tuple = ()        # the CLI's own tools it may run: WebSearch, WebFetch
    tool_choice: str = ""        # native tools: the upstream tool_choice as JSON (forced_choice)


def launch_of(req):
    forced = forced_choice(req)
    return Launch("" if req.cli_model in MODEL_FAMILIES else req.cli_model,
                  "max" if req.effort == "max" else "", req.disable_thinking or bool(forced),
                  req.max_tokens, req.account, tuple(req.web_tools),
                  json.dumps(forced, sort_keys=True) if forced else "")


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
    if cli_schema(req) is not None:
        init["jsonSchema"] = cli_schema(req)
    if bridge is not None:
        init["sdkMcpServers"] = [MCP_SERVER]
        init["sdkMcpServerManifests"] = {MCP_SERVER: bridge.manifest()}
    return init


def control(rid, request):
    return {"type": "control_request", "request_id": rid, "request": request}


def control_lines(req, messages, bridge=None, proc=None, history=None):
    """The stdin lines for one request, the same for a fresh and a pre-started process
    (`proc`: the process; an alias equal to its --model needs no set_model, and an initialize
    it already got ahead of time is not sent again).
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
            "message": {"role": "user", "content": not_a_command(blocks)}}
    if not query:
        line["shouldQuery"] = False
    return line


def not_a_command(blocks):
    """The blocks of a user line, so that the CLI sends them to the model as they are.

    The CLI takes a user line whose last block is text starting with "/" (spaces first
    included) for one of its commands and runs it instead of asking the model: `/model opus`
    switches the process's model, `/clear` empties it, `/init` sends its own prompt, and the
    shouldQuery:false lines of history too.  `--disable-slash-commands` only makes its
    built-in commands answer "isn't available" locally.  So such a text is sent as two text
    blocks: up to its first character that is neither "/" nor a space, and the rest; the
    upstream gets the same characters in the same order (tests/test_prompt_safety.py)."""
    last = blocks[-1] if blocks else None
    if not (isinstance(last, dict) and last.get("type") == "text" and
            isinstance(last.get("text"), str) and last["text"].lstrip().startswith("/")):
        return blocks
    word = re.search(r"[^\s/]", last["text"])
    if word is None:              # only slashes and spaces: no command name, the model gets it
        return blocks
    i = word.start()
    # anything else on the block (a cache mark) stays on its end
    return blocks[:-1] + [{"type": "text", "text": last["text"][:i]}, dict(last, text=last["text"][i:])]


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
    for item in cli_lines(proc, call):
        if isinstance(item, Heartbeat):
            yield item
            continue
        line_type = item.get("type")
        if line_type == "result":
            proc.note(item)
            if item.get("is_error"):
                raise result_error(item, None, proc.rate_limit, proc.launch.account)
            return
        if line_type == "control_request":
            refuse(proc, item.get("request_id"))
        elif line_type == "rate_limit_event":
            proc.note(item)
        elif line_type == "control_response":
            refused_settings(item)
    raise cli_ended(proc)


def launch_model(cfg, launch):
    return launch.model or resolve_model(cfg.default_model, None)[1]


def cli_argv(cfg, launch):
    # --permission-prompt-tool stdio: the CLI asks us (can_use_tool) before running a tool, which
    # native tools need; with no tools offered nothing asks and the upstream request is the same,
    # so every process gets it and an idle one serves both modes.
    argv = [cfg.claude_bin, "-p", "--input-format", "stream-json",
            "--output-format", "stream-json", "--verbose", "--include-partial-messages",
            "--tools", ",".join(launch.web_tools), "--no-session-persistence",
            "--setting-sources", "", "--strict-mcp-config", "--permission-prompt-tool", "stdio",
            "--disable-slash-commands", "--model", launch_model(cfg, launch)]
    if "WebSearch" in launch.web_tools:     # runs without asking; WebFetch asks (web_fetch_refusal)
        argv += ["--allowedTools", "WebSearch"]
    if "WebFetch" in launch.web_tools:      # also for the documentation hosts it pre-approves
        argv += ["--settings", json.dumps({"permissions": {"ask": ["WebFetch"]}})]
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
               # "@/path" in client text would otherwise attach that file of this server
               CLAUDE_CODE_DISABLE_FILE_MENTIONS="1",
               DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_RETRIES=str(max(0, cfg.cli_retries)))
    if launch.disable_thinking:
        env["CLAUDE_CODE_DISABLE_THINKING"] = "1"
    if launch.max_tokens:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(launch.max_tokens)
    login = next((a for a in cfg.accounts if a[0] == launch.account), None)
    if login is not None:          # this login only: nothing inherited may pick another one
        env.pop("CLAUDE_CONFIG_DIR", None)
        env.pop("CLAUDE_CODE_OAUTH_TOKEN", None)
        name, credential, path = login
        if credential == "config_dir":
            env["CLAUDE_CONFIG_DIR"] = path
        else:
            env["CLAUDE_CODE_OAUTH_TOKEN"] = read_token(name, path)
    if launch.tool_choice:
        try:           # the operator's own CLAUDE_CODE_EXTRA_BODY (CLAUDE_PROXY_PASS_ENV) stays
            extra = json.loads(env.get("CLAUDE_CODE_EXTRA_BODY") or "{}")
        except ValueError:
            extra = None
        extra = extra if isinstance(extra, dict) else {}
        env["CLAUDE_CODE_EXTRA_BODY"] = json.dumps(dict(extra, tool_choice=json.loads(
            launch.tool_choice)))
    return env


def cli_version(cfg, cwd=None):
    """`claude --version` as the proxy runs the CLI (the allow-listed environment), scrubbed;
    None when the CLI is not found or says nothing.  Raises OSError or TimeoutExpired."""
    found = shutil.which(cfg.claude_bin)
    if not found:
        return None
    out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=20,
                         stdin=subprocess.DEVNULL, cwd=cwd,
                         env={k: v for k, v in cfg.environ.items() if env_allowed(k)})
    return scrub((out.stdout.strip() or out.stderr.strip())[:200]) or None


def read_token(name, path):
    """A login's token, read at each start (a renewed file is picked up); never quoted."""
    try:
        token = pathlib.Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise LoginFailed("The token file of login %r (%s) cannot be read: %s"
                          % (name, path, getattr(exc, "strerror", None) or type(exc).__name__))
    if not token or any(c.isspace() for c in token):
        raise LoginFailed("The token file of login %r (%s) must hold one token (from `claude "
                          "setup-token`) and nothing else." % (name, path))
    return token


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
        self.send_seconds = min(SEND_SECONDS, cfg.timeout or SEND_SECONDS)
        os.set_blocking(self.proc.stdin.fileno(), False)     # writes are bounded (send)
        self.preinit = None          # the initialize request it was given ahead of time (PreStarter)
        self.refused = False         # ... and the CLI refused it
        self.born = time.monotonic()
        self.lines = queue.Queue()
        self.stderr_tail = collections.deque(maxlen=20)
        self.garbage = []
        self.stopped = None
        self.rate_limit = None       # the last rate_limit_info the CLI reported
        self.account = None          # its login's Account (set by Backend.spawn)
        self.credentials = None      # that login's credential files when it started (stamp)
        self.model_usage = {}        # the last result's modelUsage (totals since start)
        self.bridge = None           # native tools: the ToolBridge of a turn held open (kept)
        self.seen = 0                # stdout lines read so far
        self.kind = "spawned"        # how it last served, or how it waits (IDLE_KINDS)
        self.settings = None         # the settings lines a reused process was given (IdleStore.take)
        self.conversation = None     # the conversation a kept process holds (conversation_hash)
        self.tenant = ""             # ... and the key it belongs to (Request.tenant)
        self.served = 0              # turns answered
        self.clean = False           # its last turn ended whole, not interrupted nor failed
        self.used = self.born        # when it last served or came back idle
        self.first = False           # kept after a first message only: reset when another
                                     # request takes it (IdleStore.take)
        self.ending = False          # being ended: no longer counted against the budget
        self.memory = None           # its last process_memory() (measure), and when
        self.measured_at = 0.0
        self._users = []             # uuids of the user lines in its conversation (reset)
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

    def note(self, item):
        """A rate_limit_event or result line: what it says about the login goes to its Account.
        A result's modelUsage counts from the start of the process: the turn's share is what
        it adds."""
        spent = {}
        if item.get("type") == "rate_limit_event":
            self.rate_limit = item.get("rate_limit_info") or self.rate_limit
        elif isinstance(item.get("modelUsage"), dict):
            for model, u in item["modelUsage"].items():
                if not isinstance(u, dict):
                    continue
                before = self.model_usage.get(model) or {}
                spent[model] = {k: max(0, int(u.get(key) or 0) - int(before.get(key) or 0))
                                for k, key in TOKEN_KEYS}
            self.model_usage = item["modelUsage"]
        if self.account is not None:
            self.account.note(item, spent)

    def send(self, *objs):
        for o in objs:         # every user line gets a uuid: reset() rewinds to the first
            if o.get("type") == "user":
                o.setdefault("uuid", str(uuid.uuid4()))
                self._users.append(o["uuid"])
        # one write for all lines (each is a wake-up of the CLI's reader), waiting at most
        # send_seconds for the CLI to take it: a CLI that stops reading is ended (CLIStalled)
        data = memoryview("".join(json.dumps(o) + "\n" for o in objs).encode())
        deadline = time.monotonic() + self.send_seconds
        try:
            fd = self.proc.stdin.fileno()
            waiter = select.poll()
            waiter.register(fd, select.POLLOUT)
            while data:
                try:
                    data = data[os.write(fd, data):]
                    continue
                except BlockingIOError:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise CLIStalled("The claude CLI stopped reading its input (%d bytes not "
                                     "taken in %gs); it was ended. Retry the request."
                                     % (len(data), self.send_seconds))
                waiter.poll(min(left, POLL_SECONDS) * 1000)
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

    def reset(self, timeout=RESET_SECONDS):
        """Empty the conversation after a turn that ended cleanly, so that the next request's
        upstream `system` and `messages` are byte for byte what a fresh process with the same
        settings would send (pinned by tests/test_reuse.py).  `rewind_conversation` to the first
        user line does that (~15 ms); the `/clear` command would leave three caveat text
        blocks in the next user message.  The CLI checks that the rewind knows the latest
        user line (`last_seen_user_message_uuid`), else it refuses with stale_target."""
        if not self._users or not self.resume():
            return False
        try:
            self.send(control("rewind", {"subtype": "rewind_conversation",
                                         "target_message_uuid": self._users[0],
                                         "last_seen_user_message_uuid": self._users[-1]}))
        except CLIStalled:
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if item is _EOF:
                return False
            if isinstance(item, dict) and item.get("type") == "control_response":
                resp = item.get("response") or {}
                if resp.get("request_id") == "rewind":
                    ok = resp.get("subtype") == "success" and \
                        (resp.get("response") or {}).get("rewound") is True
                    self._users = [] if ok else self._users
                    return ok and self.resume()

    def measure(self, max_age=0.0):
        """Its memory (process_memory, None once it is gone), kept in `memory`; read again when
        the last figure is older than `max_age` seconds (reading smaps_rollup walks the page
        tables: ~2 ms for a CLI)."""
        if self.memory is None or time.monotonic() - self.measured_at > max_age:
            self.memory, self.measured_at = process_memory(self.proc.pid), time.monotonic()
        return self.memory

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


# -- the supply of processes: the slots, the idle store, kept conversations, the backend ----------

class Gate:
    """Caps running CLI processes with a BoundedSemaphore; waiters are served in arrival order
    and give up after `timeout` seconds with a 429.  A waiter whose owner (a key's name)
    already holds its `share` of the slots lets the waiters behind it pass: one key cannot
    hold every slot while others wait."""

    def __init__(self, capacity, timeout):
        self.capacity, self.timeout = capacity, timeout
        self._sem = threading.BoundedSemaphore(capacity)
        self._cond = threading.Condition()
        self._queue = collections.deque()         # (ticket, owner, share)
        self.running = 0
        self.in_use = collections.Counter()       # owner -> slots in use

    @property
    def queued(self):
        return len(self._queue)

    def _next(self):
        """The first waiter whose owner is under its share, or None."""
        return next((w for w in self._queue if w[1] is None or self.in_use[w[1]] < w[2]), None)

    def acquire(self, call=None, owner=None, share=None):
        me = (object(), owner, share or self.capacity)
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._queue.append(me)
            try:
                while True:
                    if self._next() is me and self._sem.acquire(blocking=False):
                        self._queue.remove(me)
                        self.running += 1
                        self.in_use[owner] += 1
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
                if me in self._queue:
                    self._queue.remove(me)
                    self._cond.notify_all()
                raise

    def release(self, owner=None):
        with self._cond:
            self.running -= 1
            self.in_use[owner] -= 1
            if self.in_use[owner] <= 0:
                del self.in_use[owner]
            self._sem.release()
            self._cond.notify_all()


#: how an idle process waits, best first; what it can serve.  The same names count hits
#: (req.served_by, /health idle, /metrics claude_proxy_idle_*); a process started for the
#: request that it serves is "spawned".
#:   kept         holds a conversation (conversation_hash): that conversation's next turn
#:   reused       answered a request cleanly, then was reset (CLIProcess.reset): a request with
#:                the same settings
#:   initialized  pre-started and given an initialize ahead: a request with that initialize
#:   pool         pre-started, nothing sent yet: any request with its launch key
IDLE_KINDS = ("kept", "reused", "initialized", "pool")
PRESTARTED = ("initialized", "pool")


def ready_for_a_request(proc):
    """Waiting for a request that has no conversation of its own (the pool's `ready`): a
    pre-started or reused process, or a first message's, which such a request takes rewound."""
    return proc.kind in PRESTARTED or proc.kind == "reused" or (proc.kind == "kept" and proc.first)


class IdleStore:
    """Every CLI process that is not running a turn, each with a launch key (Launch), the
    settings it was given and a kind (IDLE_KINDS).  One eviction policy: at most `budget` CLI
    processes in all, running or idle (sized from memory; never below the running slots, so
    the processes that finish in them stay for reuse): the least recently used idle one is
    ended first, before a request or the pre-starter starts another (make_room); at most
    `sessions` kept conversations with history (a kept one ended for room is of the key
    holding the most: _kept_victim).  A kept one ends after `session_idle` (the upstream
    prompt cache's lifetime), a reused one after `max_idle` (a re-login or a CLI upgrade is
    picked up).

    A first message's process (`first`) keeps its conversation without a client signal: its
    next turn continues on it; another request with the same settings takes it as a reused one
    after a reset (~5-15 ms, on that request's path).  Until then it counts as kept but not
    against `sessions`, and is ended for room as a reused one is: one-shot traffic never
    pushes a conversation with history out."""

    def __init__(self, backend, cfg):
        self.backend, self.sizing = backend, cfg.sizing
        self.budget, self.sessions, self.reuse = cfg.idle_max, cfg.sessions, cfg.reuse
        self.max_idle, self.session_idle = cfg.pool_max_idle, cfg.session_idle
        self.recycle_rss = cfg.recycle_rss * 2 ** 20
        self.cli_memory, self.cli_figure = CLI_MEMORY, "default"   #: what sized it (resize)
        self.procs = []               #: least recently used first
        self.resetting = 0            #: processes being reset: counted in the budget
        self.cond = threading.Condition()      #: guards the store (and the PreStarter)
        self.hits = collections.Counter()
        self.misses = self.recycled = self.evicted = 0
        self.closed = False

    def resize(self, cfg, cli_memory):
        """Take the sizes size_idle chose from a measured figure (the pre-starter's pool size
        too); what no longer fits is ended as processes come back (_add) and by the
        pre-starter."""
        with self.cond:
            self.backend.starter.pool_size = cfg.pool_size
            self.sessions, self.budget = cfg.sessions, cfg.idle_max
            self.sizing, self.cli_memory, self.cli_figure = cfg.sizing, cli_memory, "measured"

    def take(self, launch, settings=None, init=None, conversation=None, note=True):
        """(process, kind) for a request: the best idle one that fits, or (None, "spawned").
        `settings` is what a reused process must have been given (None: no reuse), `init` the
        request's initialize, `conversation` the one it continues; `note`: count the request
        among those asked (not when the same request asks again)."""
        starter = self.backend.starter
        with self.cond:
            if note:
                starter.asked(launch, init)
            ranks = {id(p): self._rank(p, launch, settings, init, conversation)
                     for p in self.procs}
            fits = sorted((p for p in self.procs if ranks[id(p)] is not None),
                          key=lambda p: ranks[id(p)])
            found = rewind = None
            for proc in fits:
                self.procs.remove(proc)
                if ranks[id(proc)] == 1.5:   # reset below, outside the lock
                    found = rewind = proc
                    break
                if proc.resume() if proc.kind in ("kept", "reused") else proc.fresh():
                    found = proc
                    break
                if proc.kind in PRESTARTED:
                    starter.unfit(proc)
                else:
                    self.end(proc)
            if found is None:
                self.misses += 1
            elif rewind is None:
                self.hits[found.kind] += 1
                if found.kind in PRESTARTED:
                    starter.served()
            else:
                self.resetting += 1
            self.cond.notify_all()
        if rewind is not None and not self._rewind(rewind):
            return self.take(launch, settings, init, conversation, note=False)
        return (found, found.kind) if found is not None else (None, "spawned")

    def _rank(self, p, launch, settings, init, conversation):
        """How well an idle process fits a request, best first; None: it does not.  1.5: a
        first message's process, reset for the request (_rewind)."""
        if p.launch != launch:
            return None
        reusable = settings is not None and p.settings == settings
        if p.kind == "kept":
            if conversation is not None and p.conversation == conversation:
                return 0
            return 1.5 if p.first and reusable and p.served < self.reuse else None
        if p.kind == "reused":
            return 1 if reusable else None
        if p.kind == "initialized":
            return 2 if init is not None and p.preinit == init else None
        return 3

    def _rewind(self, proc):
        """Reset a first message's kept process for the request that took it, on that
        request's path; False (and ended) when the reset fails."""
        ok = proc.reset()
        with self.cond:
            self.resetting -= 1
            if ok:
                proc.kind, proc.conversation, proc.first = "reused", None, False
                self.hits["reused"] += 1
        if not ok:
            self.end(proc)
        return ok

    def make_room(self):
        """Before a request starts a CLI: end the least recently used idle processes until
        the running and idle ones together leave room for it within `budget` (a finished
        process waits idle only in memory the running ones were allowed).  Ended here, before
        the new one starts, so that their memory is free."""
        ended = []
        with self.cond:     # one at a time: the new one is counted (reserved) before the next
            while self.procs and self.backend.count() >= self.budget:
                self.evicted += 1
                ended.append(self._victim())
                self.procs.remove(ended[-1])
                ended[-1].ending = True
            with self.backend.lock:
                self.backend.starting += 1
        for proc in ended:
            self.backend.discard(proc)

    def give_back(self, proc, conversation=None, first=False):
        """A process whose request is over: kept for `conversation`, reset for reuse (after at
        most `reuse` turns and below `recycle_rss`; never after a failure, an interrupt or a
        turn that did not end), or ended.  Not on the request's thread when it is kept or
        reset: the answer may still be on its way to the client."""
        memory = self.backend.measured(proc)
        fit = proc.clean and not self.closed and self.budget > 0 and \
            not self.backend.logins.get(proc.launch.account).outdated(proc) and \
            not (self.recycle_rss and memory and memory["private"] > self.recycle_rss)
        if fit and conversation is not None and self.sessions > 0:
            proc.kind, proc.conversation, proc.first = "kept", conversation, first
            with self.cond:
                self._add(proc)
        elif fit and proc.served < self.reuse and proc.settings is not None:
            with self.cond:
                self.resetting += 1
            threading.Thread(target=self._reset, args=(proc,), daemon=True).start()
        else:
            if proc.clean and self.reuse > 0 and proc.settings is not None:
                with self.cond:
                    self.recycled += 1      # served its `reuse` turns, or grew too big
            if proc.clean:
                self.end(proc)
            else:
                self.backend.discard(proc)

    def _reset(self, proc):
        ok = proc.reset()
        with self.cond:
            self.resetting -= 1
            if ok and not self.closed:
                proc.kind, proc.conversation, proc.first = "reused", None, False
                self._add(proc)
                return
        self.backend.discard(proc)

    def _add(self, proc):
        """Add an idle process, most recently used; end what the limits leave no room for
        (caller holds the lock)."""
        proc.used = time.monotonic()
        self.procs.append(proc)
        ended = []
        if sum(p.kind == "kept" and not p.first for p in self.procs) > self.sessions:
            ended.append(self._kept_victim())
            self.procs.remove(ended[-1])
        while self.procs and (len(self.procs) + self.resetting > self.budget or
                              self.backend.count() > self.budget):
            ended.append(self._victim())
            self.procs.remove(ended[-1])
            ended[-1].ending = True      # no longer counted
            self.evicted += 1
        for p in ended:
            self.end(p)
        self.cond.notify_all()

    def expire(self, now):
        """End the kept and reused processes that died or waited long enough (caller holds the
        lock; the pre-started ones are the PreStarter's to judge)."""
        for proc in [p for p in self.procs if p.kind in ("kept", "reused")]:
            limit = self.session_idle if proc.kind == "kept" else self.max_idle
            if proc.proc.poll() is not None or now - proc.used > limit:
                self.procs.remove(proc)
                self.end(proc)

    def _victim(self):
        """The idle process to end for room: the least recently used, or if that holds a
        conversation with history, _kept_victim (caller holds the lock)."""
        lru = self.procs[0]
        return lru if lru.kind != "kept" or lru.first else self._kept_victim()

    def _kept_victim(self):
        """The kept process to end for room: the least recently used of the key (tenant)
        holding the most kept conversations, so one key filling the slots ends its own, never
        another key's beyond an equal share (without keys: the least recently used).  First
        messages kept (`first`) are not conversations here."""
        kept = [p for p in self.procs if p.kind == "kept" and not p.first]
        per_tenant = collections.Counter(p.tenant for p in kept)
        most = max(per_tenant.values())
        return next(p for p in kept if per_tenant[p.tenant] == most)

    def end(self, proc):
        """End a process the store no longer holds, on a thread of its own (it may take a
        while to die, and the caller may hold the lock)."""
        proc.ending = True
        threading.Thread(target=self.backend.discard, args=(proc,), daemon=True).start()

    def note_stillborn(self, kind):
        """A process handed out as `kind` died before it printed anything, or turned out to
        be of no use (see Backend.run): not a hit, and a pre-started one counts as a death.
        What serves the request instead is counted when it is taken (or spawned: a miss)."""
        with self.cond:
            self.hits[kind] -= 1
            if kind in PRESTARTED:
                self.backend.starter.note_death()

    def note_spawn(self):
        """A request's retry starts a process of its own: a miss."""
        with self.cond:
            self.misses += 1

    def status(self):
        """One set of figures for /health, /metrics and the dashboard."""
        starter = self.backend.starter
        with self.cond:
            paused = time.monotonic() < starter.paused_until
            waiting = collections.Counter(p.kind for p in self.procs)
            return {"budget": self.budget, "pool_size": starter.pool_size, "sessions": self.sessions,
                    "reuse": self.reuse, "recycle_rss_mb": self.recycle_rss // 2 ** 20,
                    "sized": self.sizing, "cli_mb": self.cli_memory // 2 ** 20,
                    "cli_figure": self.cli_figure,
                    "idle": {k: waiting[k] for k in IDLE_KINDS},
                    "ready": sum(ready_for_a_request(p) and (p.kind not in PRESTARTED or p.fresh())
                                 for p in self.procs),      # as the PreStarter counts them
                    "hits": {k: self.hits[k] for k in IDLE_KINDS}, "misses": self.misses,
                    "recycled": self.recycled, "evicted": self.evicted,
                    "start_failures": starter.failures,
                    "mode": "off" if starter.pool_size == 0 else
                    ("cold-fallback" if paused else "warm")}

    def retire(self, account):
        """End the idle processes of login `account`: its credentials changed on disk."""
        with self.cond:
            gone = [p for p in self.procs if p.launch.account == account]
            self.procs = [p for p in self.procs if p.launch.account != account]
            self.cond.notify_all()
        for proc in gone:
            self.backend.discard(proc)
        return len(gone)

    def close(self):
        with self.cond:
            self.closed = True
            procs = list(self.procs)
            self.procs.clear()
            self.cond.notify_all()
        for proc in procs:
            self.backend.discard(proc)


class Demand:
    """What requests asked the store for lately, so that the PreStarter starts what the next
    one will want: the launch keys most recently asked for (as many as the pool size), and for
    each the initialize its requests sent, and how many times in a row.  An initialize sent
    twice in a row (an agent's fixed system prompt) is given to new processes ahead of time,
    which takes ~50 ms off the request."""

    def __init__(self, first):
        #: most recent last; until a request comes, the first login's default settings
        self.recent = collections.OrderedDict([(first, None)])
        #: launch -> (the initialize it was last asked with, how many times in a row)
        self.inits = {}

    def asked(self, launch, init, size):
        self.recent[launch] = None
        self.recent.move_to_end(launch)
        while len(self.recent) > size:
            self.inits.pop(self.recent.popitem(last=False)[0], None)
        seen, repeats = self.inits.get(launch, (None, 0))
        self.inits[launch] = (init, repeats + 1 if init is not None and init == seen else 1)

    def latest(self):
        """The launch keys asked for, most recent first."""
        return list(reversed(self.recent))

    def ahead(self, launch):
        """The initialize a new process of `launch` should get ahead of time, or None."""
        init, repeats = self.inits.get(launch, (None, 0))
        return init if repeats >= 2 else None

    def superseded(self, proc):
        """Initialized ahead for a system prompt that another one has replaced (asked twice in
        a row since), so no request is likely to want it."""
        init, repeats = self.inits.get(proc.launch, (None, 0))
        return proc.preinit is not None and proc.preinit != init and repeats >= 2

    def refused(self, launch):
        """The CLI refused the initialize given ahead: not again until it is asked twice more."""
        self.inits.pop(launch, None)

    def forget(self, launch):
        """Its login failed to authenticate: start nothing more for it."""
        self.recent.pop(launch, None)


class PreStarter:
    """Keeps `pool_size` processes ready_for_a_request in the IdleStore, spread
    over the launch keys most recently asked for (Demand), one of them plain (pool) per key for
    a request with other settings.  Its thread also sweeps the store every second.  After 3
    deaths in a row of pre-started processes it stops for BACKOFF seconds: requests start their
    own (cold fallback; /health says so).  Shares the store's lock."""
    BACKOFF = 60.0

    def __init__(self, store, backend, cfg):
        self.store, self.backend, self.cond = store, backend, store.cond
        self.pool_size = cfg.pool_size
        self.demand = Demand(Launch(account=backend.logins.first.name))
        self.failures = self.failures_in_a_row = 0
        self.paused_until = 0.0
        threading.Thread(target=self._run, name="idle", daemon=True).start()

    def asked(self, launch, init):
        """A request asked the store for `launch` with `init` (caller holds the lock)."""
        if self.pool_size > 0:
            self.demand.asked(launch, init, self.pool_size)

    def served(self):
        """A pre-started process was handed out alive (caller holds the lock)."""
        self.failures_in_a_row = 0

    def unfit(self, proc):
        """A pre-started process taken out of the store is no longer fit (caller holds the
        lock): one whose initialize given ahead was refused did not die; any other did."""
        if proc.refused:
            self.demand.refused(proc.launch)
            self.store.end(proc)
        else:
            self.note_death(proc)

    def note_death(self, proc=None):
        """Count a pre-started process that died unused (caller holds the lock)."""
        self.failures += 1
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= 3:
            self.paused_until = time.monotonic() + self.BACKOFF
        if proc is not None:
            self.store.end(proc)

    def _targets(self):
        """launch -> how many ready processes it should have: the pool spread over the launch
        keys most recently asked for, but for logins that failed to authenticate."""
        logins = self.backend.logins
        keys = [k for k in self.demand.latest() if logins.get(k.account).healthy] or \
            [Launch(account=a.name) for a in logins.accounts if a.healthy][:1]
        return collections.Counter(keys[i % len(keys)] for i in range(self.pool_size if keys else 0))

    def _sweep(self, now, want):
        """launch -> ready processes, and -> plain ones among them; ends the pre-started ones
        that died, waited longer than `max_idle`, or are not wanted now (caller holds the lock).
        A reused process that comes back does not make a pre-started one spare: it goes out
        again with the next request, and the pool would start one more each time (a CLI
        started and ended per one-shot request)."""
        store = self.store
        ready = collections.Counter(p.launch for p in store.procs
                                    if ready_for_a_request(p) and p.kind not in PRESTARTED)
        prestarted, plain = collections.Counter(), collections.Counter()
        for proc in [p for p in store.procs if p.kind in PRESTARTED]:
            spare = prestarted[proc.launch] >= want[proc.launch] and \
                (proc.kind != "pool" or plain[proc.launch] or not want[proc.launch])
            if not proc.fresh():
                store.procs.remove(proc)
                self.unfit(proc)
            elif now - proc.used > store.max_idle or spare or self.demand.superseded(proc):
                store.procs.remove(proc)     # stale, or settings nobody asks for now
                store.end(proc)
            else:
                ready[proc.launch] += 1
                prestarted[proc.launch] += 1
                plain[proc.launch] += proc.kind == "pool"
        return ready, plain

    def _run(self):
        store = self.store
        while True:
            with self.cond:
                if store.closed:
                    return
                now, want = time.monotonic(), self._targets()
                store.expire(now)
                ready, plain = self._sweep(now, want)
                short = [k for k in want if ready[k] < want[k] or not plain[k]]
                if not short or now < self.paused_until or \
                        len(store.procs) + store.resetting >= store.budget or \
                        self.backend.count() >= store.budget:
                    self.cond.wait(1.0)
                    continue
                # one process per launch key stays plain, for a request with another prompt
                launch = short[0]
                init = self.demand.ahead(launch) if plain[launch] else None
            if not self._start(launch, init):
                return

    def _start(self, launch, init):
        """Start one process for the store; False once the store is closed."""
        try:
            proc = self.backend.spawn(launch)
        except LoginFailed as exc:     # that login's fault, not the CLI's: the others go on
            self.backend.logins.get(launch.account).mark_unhealthy(exc.message)
            with self.cond:
                self.demand.forget(launch)
            return True
        except ProxyError:
            with self.cond:
                self.note_death()
            return True
        proc.kind = "pool"
        if init is not None:      # read while it boots; its answer is taken by fresh()
            try:
                proc.send(control("init", init))
            except CLIStalled:
                with self.cond:
                    self.note_death(proc)
                return True
            proc.preinit, proc.kind = init, "initialized"
        with self.cond:
            if self.store.closed:
                self.backend.discard(proc)
                return False
            self.store.procs.append(proc)
        time.sleep(0.05)    # let a freshly spawned process show an immediate death
        return True


def conversation_hash(req, messages, h=None):
    """What a CLI process that answered `messages` holds, as a running SHA-256: whose it is (the
    client's key, when keys are set: the same conversation sent with another key is not it), the
    settings it was given (launch, model, effort, system prompt with the tool prompt, handler)
    and the conversation.  An assistant message counts by what a client can echo back of it, its text
    and its tool calls (ids, thinking and block boundaries are dropped or reshaped by clients);
    a user message counts whole.  With `h` (the hash of earlier messages) it goes on from there."""
    if h is None:
        # native tools are definitions, not system prompt text: they count on their own
        tools = [[t.name, t.description, t.parameters] for t in offered_tools(req)] \
            if native_tools(req) else []
        h = hashlib.sha256(json.dumps([req.tenant, repr(launch_of(req)), req.cli_model,
                                       req.effort, render_system(req), req.handler.name, tools],
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


class KeptConversation:
    """One request's part in keeping its conversation on a process: the conversation it
    continues (`prior`, what the store knows it by), and the process that answered it
    (`proc`, set by Backend.run), kept under the new conversation once the answer is known to
    be whole, else given back to be reset or ended.  The hash goes on from the request's
    messages, so each message is hashed once."""

    @classmethod
    def of(cls, backend, req):
        """The request's KeptConversation, or None: sessions off, flat history, structured
        output, web tools (the CLI's conversation holds its searches, which the client's does
        not), a prefill.  A first message without a client signal (req.session) is kept
        `first`: as the process another request with its settings would reuse, so no
        different from one reset at once until such a request comes (IdleStore); not in native
        mode, whose processes are never reused.  A native turn that ends in tool calls is kept
        with its first call held open (ToolBridge)."""
        store, messages = backend.idle, req.messages
        first = len(messages) < 2 and not req.session
        if store.sessions <= 0 or backend.cfg.history != "structured" \
                or req.json_schema is not None or req.web_tools or messages[-1].role != "user" \
                or (first and native_tools(req)):
            return None
        return cls(store, req, first)

    def __init__(self, store, req, first=False):
        self.store, self.req, self.proc, self.first = store, req, None, first
        self._hash = conversation_hash(req, req.messages[:-1])
        self.prior = self._hash.hexdigest()
        conversation_hash(req, req.messages[-1:], self._hash)

    def finish(self, answer):
        """The answer went out whole: keep the process for the conversation that ends in it."""
        if self.proc is not None:
            key = conversation_hash(self.req, [answer], self._hash.copy()).hexdigest()
            proc, self.proc = self.proc, None
            proc.tenant = self.req.tenant
            self.store.give_back(proc, key, self.first)

    def drop(self):
        proc, self.proc = self.proc, None
        if proc is not None:
            self.store.give_back(proc)


@dataclass(frozen=True)
class Fit:
    """What a process must fit to serve one request: its launch key, its initialize (native
    tools' carries the MCP handshake's answers, ToolBridge.manifest, so an agent that sends the
    same tools again gets a process initialized ahead too), the settings a reused process must
    have been given (None: no reuse; not with native tools' MCP bridge nor structured output's
    StructuredOutput tool) and the conversation a kept one must hold."""
    launch: Launch
    init: dict
    settings: str = None
    conversation: str = None

    @classmethod
    def of(cls, req, keep=None):
        init = init_request(req, ToolBridge(req) if native_tools(req) else None)
        settings = None if native_tools(req) or cli_schema(req) is not None else \
            json.dumps([init, req.cli_model, req.effort], sort_keys=True)
        return cls(launch_of(req), init, settings, keep.prior if keep is not None else None)


class Hand:
    """One attempt's process (Backend.run): `source`, how it came (one of IDLE_KINDS, or
    "spawned"); for a kept native turn, the ToolBridge `held` open and the client's `results`
    for its calls.  `proc` is None once the process was handed on to a KeptConversation."""

    def __init__(self, proc, source, held=None, results=None):
        self.proc, self.source, self.held, self.results = proc, source, held, results


class Backend:
    """Starts CLI processes (or takes idle ones), translates their output into events, and
    gives them back to the idle store (or ends them)."""

    def __init__(self, cfg, workdir):
        if None in (cfg.pool_size, cfg.sessions, cfg.idle_max):    # a Config not from load_config
            cfg = size_idle(cfg)
        self.cfg, self.workdir = cfg, workdir
        self.gate = Gate(cfg.max_concurrency, cfg.queue_timeout)
        self.live = set()
        self.lock = threading.Lock()
        self.started = 0
        self.starting = 0            #: processes make_room made room for, not started yet
        self.retried = 0             # requests asked again after their CLI ended (run)
        self.logins = Logins(cfg)
        self.idle = IdleStore(self, cfg)
        self.starter = PreStarter(self.idle, self, cfg)
        threading.Thread(target=self._watch_logins, name="logins", daemon=True).start()

    def spawn(self, launch, reserved=False):
        """Start a CLI process; `reserved`: IdleStore.make_room counted it already."""
        account = self.logins.get(launch.account)
        stamp = account.stamp        # before the CLI reads its credentials
        try:
            proc = CLIProcess(self.cfg, launch, self.workdir)
        except BaseException:
            if reserved:
                with self.lock:
                    self.starting -= 1
            raise
        proc.account, proc.credentials = account, stamp
        with self.lock:
            self.live.add(proc)
            self.started += 1
            self.starting -= reserved
        return proc

    def discard(self, proc):
        proc.ending = True
        proc.close()
        with self.lock:
            self.live.discard(proc)

    def count(self):
        """CLI processes running, idle or about to start (make_room), those being ended not
        counted."""
        with self.lock:
            return self.starting + sum(not p.ending for p in self.live)

    def idle_status(self):
        return self.idle.status()

    def measured(self, proc):
        """Measure a process whose turn is over; when the idle sizes come from memory, size
        them again from the largest of this proxy's CLIs that served: they grow as they serve,
        and a budget sized at their average was exceeded by those above it (bench/reuse.py
        mixed); one only pre-started holds less and is not counted."""
        memory = proc.measure()
        if memory is None or not self.cfg.sized:
            return memory
        with self.lock:
            figures = [p.memory["private"] for p in self.live if p.memory and p.served]
        if figures:
            per = max(figures)
            self.idle.resize(size_idle(dataclasses.replace(self.cfg, **dict.fromkeys(self.cfg.sized)),
                                       cli_memory=per), per)
        return memory

    def memory_report(self):
        """/health's `memory`: what the idle sizes were chosen from, and what the proxy and each
        of its CLIs hold now (process_memory, in MB; `total_mb` adds up their PSS, which
        counts shared pages once)."""
        def mb(n):
            return round(n / 2 ** 20, 1)
        with self.lock:
            procs = list(self.live)
        with self.idle.cond:
            waiting = {id(p): p.kind for p in self.idle.procs}
        avail, source = self.cfg.memory_source or (None, "")
        own = process_memory(os.getpid()) or {"rss": 0, "pss": 0, "private": 0, "measure": "none"}
        clis, total = [], own["pss"]
        for proc in procs:            # /health is polled: a figure up to a second old will do
            m = proc.measure(max_age=1.0)
            if m is not None:
                total += m["pss"]
                clis.append({"pid": proc.proc.pid, "state": waiting.get(id(proc), "busy"),
                             "rss_mb": mb(m["rss"]), "pss_mb": mb(m["pss"]),
                             "private_mb": mb(m["private"])})
        return {"available_mb": mb(avail) if avail is not None else None, "from": source,
                "measure": own["measure"],
                "proxy": {"rss_mb": mb(own["rss"]), "pss_mb": mb(own["pss"]),
                          "private_mb": mb(own["private"])},
                "clis": clis, "total_mb": mb(total)}

    def renewed(self, account):
        """True when the credentials of `account` changed on disk since last looked at: its
        idle processes are ended (they hold the old ones), processes running a turn are not
        reused (Account.outdated), and a login marked unable to serve is checked again."""
        if not account.restamp():
            return False
        retired = self.idle.retire(account.name)
        log_line("login %s: its credentials changed on disk; %d idle CLI process(es) ended, "
                 "new ones start with the new credentials" % (account.name, retired))
        if not account.healthy:
            threading.Thread(target=self.check_login, args=(account, True), daemon=True).start()
        return True

    def _watch_logins(self):
        while not self.idle.closed:
            for account in self.logins.accounts:
                self.renewed(account)
            time.sleep(LOGIN_WATCH_SECONDS)

    def check_login(self, account, renewed=False):
        """Can `account` serve, told without a model turn: its credentials file readable, and
        `claude auth status` not saying "not logged in".  Marks it unable to serve, with the
        reason; `renewed` (its credentials changed on disk): marks it able again when the
        check finds nothing wrong.  Returns the reason, or None."""
        reason = unreadable_credentials(self.cfg, account)
        tmp = tempfile.mkdtemp(prefix="claude-proxy-auth-")
        try:
            env = cli_env(self.cfg, Launch(account=account.name), tmp)
            if reason is None:
                out = subprocess.run([self.cfg.claude_bin, "auth", "status", "--json"],
                                     capture_output=True, text=True, timeout=30,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, env=env)
                status = json.loads(out.stdout)
                if isinstance(status, dict) and status.get("loggedIn") is False:
                    reason = "not logged in (`claude auth status` says so)"
        except LoginFailed as exc:
            reason = exc.message
        except (OSError, ValueError, subprocess.SubprocessError):
            pass          # no CLI (its own reason in /health), or one that cannot tell
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if reason is not None:
            account.mark_unhealthy(reason, checked=True)
        elif renewed:
            account.mark_healthy()
        return reason

    def run(self, req, messages, call, keep=None):
        """One CLI turn for `messages`: yields events, ends with Done or raises ProxyError.

        The process comes from the idle store when one fits (req.served_by says which kind),
        else it is started.  A process that ends (crashes, is killed) before the client can
        have seen any of its answer is replaced once per request (req.retried), and the client
        gets a normal answer: a non-streamed request at any point before Done (a Reset tells
        the collector to forget what it had), a stream before its first content event (the
        response's first bytes wait for the first event; a second Start is not passed on).
        Errors the upstream gave (429, 529, 4xx) are the client's to see, as they are.
        A turn that ends whole leaves its process `clean`; with `keep` it is handed to the
        KeptConversation, else given back to the store.
        """
        fit = Fit.of(req, keep)
        self.renewed(self.logins.get(fit.launch.account))      # a stat: never an old token
        hand = self._hand_out(fit, messages[-1])
        shown = started = False      # content went to the consumer; a Start did
        while True:
            req.served_by = hand.source
            try:
                for ev in self._turn(req, messages, call, keep, fit, hand):
                    if isinstance(ev, Start):
                        if started:
                            continue            # the retry's own: the consumer has one
                        started = True
                    elif not isinstance(ev, Heartbeat):
                        shown = True
                    yield ev
                return
            except CLIEnded as exc:
                failure = exc
            finally:
                if hand.proc is not None:
                    self.idle.give_back(hand.proc)
            if req.retried or self.idle.closed or (req.stream and shown):
                raise failure
            req.retried = True
            with self.lock:
                self.retried += 1
            if isinstance(failure, StillBorn) and hand.source != "spawned":
                self.idle.note_stillborn(hand.source)      # handed out dead: not a hit
            log_line("a CLI process (%s) ended before its answer reached the client; asking "
                     "another: %s" % (hand.source, failure.message[:200]))
            if shown:
                yield Reset()
                shown = False
            hand = self._hand_out(fit)

    def _hand_out(self, fit, message=None):
        """The process for one attempt: the best idle one that fits, else a new one.  With
        `message` (a first attempt) a kept native turn held open is continued when `message`
        brings exactly the results of its calls (ToolBridge.answers); else the conversation
        goes to another process as history."""
        proc, source = self.idle.take(fit.launch, fit.settings, fit.init,
                                      fit.conversation if message is not None else None,
                                      note=message is not None)
        held = proc.bridge if source == "kept" else None
        results = held.answers(message) if held is not None else None
        if held is not None and results is None:
            self.idle.note_stillborn(source)             # taken, but of no use: not a hit
            self.discard(proc)
            (proc, source), held = self.idle.take(fit.launch, fit.settings, fit.init,
                                                  note=False), None
        if proc is not None and proc.account.outdated(proc):
            self.discard(proc)        # started just before its login's credentials changed
            proc = None
        if proc is None:
            self.idle.make_room()
            proc, source = self.spawn(fit.launch, reserved=True), "spawned"
        return Hand(proc, source, held, results)

    def _turn(self, req, messages, call, keep, fit, hand):
        """One attempt: the request's lines to the process of `hand`, then its events.  A kept
        process gets only the new message (or, a held native turn, the client's results); a
        reused one only the user lines (it has the request's settings already)."""
        proc = hand.proc
        bridge = ToolBridge(req, hold=keep is not None) if native_tools(req) else None
        proc.settings, proc.clean = fit.settings, False
        if hand.held is not None:
            bridge.continue_turn(proc, hand.held, hand.results)
            proc.bridge = None
        else:
            last = user_line(render_turn(messages[-1:], req.handler, bridge))
            if hand.source == "kept":
                proc.send(last)
            else:
                turns = history_turns(messages, req.handler, bridge) \
                    if self.cfg.history == "structured" else None
                lines = control_lines(req, messages, bridge, proc, turns)
                if hand.source == "reused":
                    lines = [line for line in lines if line["type"] == "user"]
                if turns is None:
                    proc.send(*lines)
                else:
                    yield from send_history(proc, call, lines, turns, last)
        events = translate(proc, call, bridge, structured=cli_schema(req) is not None,
                           streaming=req.stream)
        if req.stop:
            events = cut_at_stops(events, req.stop, proc.interrupt)
        for ev in events:
            if isinstance(ev, Done):
                proc.served += 1
                proc.clean = not proc.stopped
                if keep is not None and proc.clean:
                    proc.bridge = bridge if bridge is not None and bridge.waiting else None
                    keep.proc, hand.proc = proc, None      # kept, or given back by it
            yield ev

    def close_all(self):
        self.idle.close()
        with self.lock:
            procs = list(self.live)
        for proc in procs:
            self.discard(proc)


# -- the native tool bridge -----------------------------------------------------------------------

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
    """Native tools for one request: the client's tools as an SDK MCP server inside the CLI,
    whose tool_use blocks become ToolCall + ToolCallDelta events and are never run here.  Every
    control request of the CLI is answered (notifications too), or it stalls.  Permission
    requests wait for the upstream message to end (_settle); a kept turn (`hold`) is held open
    for the client's results instead (continue_turn)."""

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
        #: the only tools whose permission requests are ever allowed in this turn
        self.offered = {MCP_PREFIX + t["name"] for t in self.listing}
        self.parallel, self.id_prefix = req.parallel_tool_calls, req.id_prefix
        self.blocks = {}         # stream block index -> call id, or None for a dropped call
        self.streaming = req.stream
        #: the calls of the message being streamed: [upstream name, upstream id, call id, the
        #: argument text sent]; of a message the CLI withdrew (abandoned_blocks), the calls a
        #: stream already showed, which the message asked for again must repeat (_replay)
        self.streamed, self.replayed = [], []
        self.skip = {}           # call id -> argument text the client has that is to come again
        self.has_args = set()    # call ids that received argument text
        self.calls = []          # upstream tool_use ids handed to the client
        self.in_message = False  # an upstream message is streaming
        self.permissions = []    # can_use_tool request ids waiting for the message to end
        self.settled = set()     # tool_use ids the CLI asked about or answered itself
        self.ended = False       # a message with tool calls has ended: the turn must stop
        self.whole = None        # the id of a message whose calls came as whole blocks (on_block)
        self.denied = False      # deny+interrupt sent: the CLI's result line ends the turn
        self.broken = False      # a stream broke after a call was asked about: an error (on_stream)
        self.done = False        # nothing to wait for: end the request now
        self.usage = Usage()     # of the streamed message, for when `done` cuts the turn short
        self.hold = hold         # a kept turn: allow the calls, hold the first tools/call open
        self.waiting = {}        # tool_use id -> (control request id, JSON-RPC id) held open
        self.exact = False       # held with every call handed over: the process may be kept
        self.allowed = False     # a call was allowed (hold): its tools/call is on the way
        self.results = {}        # tool_use id -> the client's tool_result, in a continued turn
        #: continues a turn held open: the result line's usage adds up every step of that turn,
        #: of which the earlier steps were reported by their own requests
        self.continued = False

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
            block_type = b.get("type")
            if block_type == "tool_use":
                rest.append({"type": "tool_use", "id": self.upstream_id(b.get("id")),
                             "name": MCP_PREFIX + self.mcp_name(b.get("name") or ""),
                             "input": b.get("input") if isinstance(b.get("input"), dict) else {}})
            elif block_type == "tool_result":
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
            elif (block_type == "text" and b.get("text")) or \
                    (block_type == "image" and b not in inner):
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
            self.in_message, self.streamed = True, []
            self.usage = Usage.from_api((ev.get("message") or {}).get("usage"))
        elif et == "message_delta":
            self.usage.output_tokens = int((ev.get("usage") or {}).get("output_tokens") or 0)
        elif et == "content_block_start" and (ev.get("content_block") or {}).get("type") == "tool_use" \
                and ev["content_block"].get("name") not in CLI_WEB_TOOLS:    # those the CLI runs
            block = ev["content_block"]
            first = block.get("input") or {}
            cid, events = self._call(block.get("id"), block.get("name"),
                                     json.dumps(first, ensure_ascii=False) if first else "")
            self.blocks[ev.get("index")] = cid
            if cid:
                self.streamed.append([block.get("name"), block.get("id"), cid, ""])
            yield from events
        elif et == "content_block_delta" and (ev.get("delta") or {}).get("type") == "input_json_delta":
            cid, text = self.blocks.get(ev.get("index")), ev["delta"].get("partial_json") or ""
            if cid and text:
                self.has_args.add(cid)
                for record in self.streamed:
                    record[3] += text if record[2] == cid else ""
                text = self._pass(cid, text)
                if text:
                    yield ToolCallDelta(cid, text)
        elif et == "content_block_stop":
            cid = self.blocks.pop(ev.get("index"), None)
            self._passed(cid)
            if cid and cid not in self.has_args:
                yield ToolCallDelta(cid, "{}")
        elif et == "message_stop":
            self.in_message = False
            if ev.get("abandoned_blocks"):      # the CLI withdrew the message
                yield from self._abandon()
                if self.permissions:
                    # it asked about a call whose block had ended: it keeps that call, does not
                    # ask again, and would wait for the answer until CLAUDE_PROXY_TIMEOUT
                    self.hold, self.broken = False, True
                    self._settle(proc)
            elif self.calls:
                self.replayed_all()
                self.ended = True
                self._settle(proc)

    def on_block(self, proc, message_id, block):
        """A whole tool_use block (the CLI's non-streaming fallback after a dropped stream).
        The CLI prints one assistant line a block, joined by message id: each block of the
        message whose first call ended the turn is a call of that turn too."""
        if block.get("name") in CLI_WEB_TOOLS or \
                (self.ended and (message_id is None or message_id != self.whole)):
            return
        self.whole = message_id
        cid, events = self._call(block.get("id"), block.get("name"),
                                 json.dumps(block.get("input") or {}, ensure_ascii=False))
        yield from events
        self._passed(cid)
        self.ended = True
        self._settle(proc)

    def _abandon(self):
        """The CLI withdrew the message being streamed (a reset upstream stream) and asks again,
        streaming or not.  Its calls are not calls: a non-streaming request forgets them (Reset);
        a stream already showed them, so the message asked for again must make them again, by
        name and with arguments that go on from the text sent (_replay); those are then not
        shown twice.  The process is not kept: its call ids are not the client's."""
        self.calls = [c for c in self.calls if c not in {r[1] for r in self.streamed}]
        self.blocks, self.has_args = {}, self.has_args - {r[2] for r in self.streamed}
        if not self.streaming:
            if self.streamed:
                yield Reset()
        else:
            self.replayed += self.streamed
            self.hold = self.hold and not self.replayed
        self.streamed = []

    def _replay(self, name, arguments):
        """A call of a message asked for again, for a call a stream showed (replayed): its id,
        and what of its arguments the client does not have."""
        if self.replayed[0][0] != name:
            raise UpstreamError("The upstream stream broke during a tool call and the call made "
                                "when asked again differs from the one already sent; retry the "
                                "request.")
        _, _, cid, sent = self.replayed.pop(0)
        self.skip[cid] = sent
        if sent:
            self.has_args.add(cid)
        return cid, self._pass(cid, arguments)

    def _pass(self, cid, text):
        """`text` of a call's arguments less what the client already has of them (skip)."""
        skip = self.skip.get(cid)
        if not skip:
            return text
        n = min(len(text), len(skip))
        if text[:n] != skip[:n]:
            raise UpstreamError("The upstream stream broke during a tool call and the arguments "
                                "given when asked again differ from those already sent; retry "
                                "the request.")
        self.skip[cid] = skip[n:]
        return text[n:]

    def _passed(self, cid):
        if self.skip.pop(cid, ""):
            raise UpstreamError("The upstream stream broke during a tool call and the arguments "
                                "given when asked again are shorter than those already sent; "
                                "retry the request.")

    def replayed_all(self):
        """Raise when a call a stream showed was not made again by the message asked again."""
        if self.replayed:
            raise UpstreamError("The upstream stream broke during a tool call and the answer "
                                "given when asked again does not make that call; retry the "
                                "request.")

    def _call(self, tool_use_id, name, arguments):
        """(the call id, the events that show it), or (None, ()) for a call not handed over."""
        if not self.parallel and self.calls:
            self.hold = False         # the CLI has a call the client never gets: deny, not kept
            return None, ()
        self.calls.append(tool_use_id)
        if self.replayed:
            cid, rest = self._replay(name or "", arguments)
            return cid, [ToolCallDelta(cid, rest)] if rest else []
        if isinstance(tool_use_id, str) and tool_use_id.startswith("toolu_"):
            cid = self.id_prefix + tool_use_id[len("toolu_"):]
        else:
            cid = new_id(self.id_prefix)
        name = name or ""
        client = self.client_name.get(name)
        if client is None:            # not offered (the CLI rejects it): pass the name on
            client = name[len(MCP_PREFIX):] if name.startswith(MCP_PREFIX) else name
        return cid, [ToolCall(cid, client, arguments)]

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
            if request.get("tool_name") not in self.offered:
                # not one of the client's tools: nothing is allowed, the turn is stopped
                self.hold = False
                self.results.pop(tid, None)
            if tid in self.results:              # a call of the held turn: its result is here
                return self._allow(proc, rid, request.get("input"))
            self.settled.add(tid)
            self.permissions.append((rid, request.get("input")))
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
        """Answer the permission requests once the upstream message has ended: the CLI asks
        as soon as a tool_use block ends, and answering then would abort the stream and cut off
        the calls still being written.  Denied with interrupt, the turn stops after one upstream
        call and nothing runs; allowed in a kept turn (`hold`).  A call the CLI rejects by
        itself (a name it does not know) gets no permission request, and the CLI goes straight
        on to a second upstream call that an interrupt does not stop: when it rejected every
        call, `done` ends the request at once with the usage seen in the stream."""
        if self.in_message:
            return
        for rid, tool_input in self.permissions:
            if self.hold:
                self._allow(proc, rid, tool_input)
                self.allowed = True
                continue
            proc.send({"type": "control_response", "response": {
                "subtype": "success", "request_id": rid,
                "response": {"behavior": "deny", "message": DENY_MESSAGE, "interrupt": True}}})
            self.denied = True
        self.permissions = []
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
        """Go on with the turn that `held` (the bridge of the request before) left open.  A
        kept turn's calls were allowed and the CLI's tools/call for the first one (it runs them
        one at a time) was held open; now it is answered with the client's result, then each
        further call as the CLI asks for it, and the model goes on in the same turn: the
        upstream history is exactly what the model made, plus the client's results."""
        self.results, self.continued = dict(results), True
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


# -- stream translation: stream-json lines -> events; the CLI's errors ----------------------------

#: the CLI's own tools a request may let it run (Launch.web_tools); their calls are the CLI's
CLI_WEB_TOOLS = ("WebSearch", "WebFetch")


def web_search_event(result):
    """A WebSearch event from the CLI's tool_use_result of its WebSearch tool:
    {"query": Q, "results": [{"tool_use_id", "content": [{"title", "url"}]}, "summary text", ...]}."""
    sources = []
    for r in result.get("results") or []:
        if isinstance(r, dict):
            sources += [{"url": c.get("url"), "title": c.get("title") or ""}
                        for c in r.get("content") or [] if isinstance(c, dict) and c.get("url")]
    return WebSearch(new_id("srvtoolu_"), str(result.get("query") or ""), sources)


#: names of cloud metadata services (their addresses are link-local or unique-local anyway)
METADATA_HOSTS = ("metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                  "instance-data.ec2.internal")


def address_refusal(address):
    """Why a WebFetch must not reach this IP address, or None.  Only global unicast addresses
    pass: loopback, private (RFC 1918), link-local (169.254.169.254 metadata too), CGNAT
    (100.64.0.0/10), unique-local v6 (fd00:ec2::254 metadata too), unspecified, multicast,
    documentation and reserved ranges are refused; an IPv4 address inside IPv6 (mapped,
    NAT64) is judged as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "unreadable (%s)" % address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    elif ip.version == 6 and ip in ipaddress.ip_network("64:ff9b::/96"):
        ip = ipaddress.ip_address(int(ip) & 0xFFFFFFFF)
    for test, what in ((ip.is_loopback, "loopback"), (ip.is_link_local, "link-local"),
                       (ip.is_unspecified, "unspecified"), (ip.is_multicast, "multicast"),
                       (ip in ipaddress.ip_network("100.64.0.0/10"), "CGNAT"),
                       (ip.version == 6 and ip in ipaddress.ip_network("fc00::/7"), "unique-local"),
                       (ip.is_private, "private"), (not ip.is_global, "not public")):
        if test:
            return "%s (%s)" % (what, ip)
    return None


def web_fetch_refusal(url, resolve=socket.getaddrinfo):
    """Why the CLI's WebFetch must not fetch `url` from this machine, or None.  The host is
    resolved here and every address it has must be public; a host that resolves nowhere is let
    through (the CLI, asking the same resolver, finds nothing either).  Not covered: a name
    whose address changes between this check and the CLI's own fetch (DNS rebinding), and
    redirects the CLI follows by itself (README, Security)."""
    url = str(url).strip()
    # Python's urlsplit and the CLI's WHATWG URL parser must see the same host: they disagree
    # on a backslash (http://127.0.0.1\@example.com/ is example.com here, 127.0.0.1 in node),
    # on control characters and spaces, and can on userinfo; such URLs are refused outright
    if "\\" in url or any(ord(c) <= 0x20 or ord(c) == 0x7f for c in url):
        return "a URL with a backslash, a space or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "a URL that cannot be read"
    if "@" in parts.netloc:
        return "a URL with a user name or password"
    if parts.scheme.lower() not in ("http", "https"):
        return "the scheme %r (only http and https)" % parts.scheme
    if not host:
        return "a URL without a host"
    if host.rstrip(".").lower() in METADATA_HOSTS:
        return "a cloud metadata host (%s)" % host
    try:
        infos = resolve(host, port or (443 if parts.scheme.lower() == "https" else 80),
                        type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return None
    for info in infos:
        why = address_refusal(str(info[4][0]))
        if why is not None:
            return "the address of %s is %s" % (host, why)
    return None


def web_tool_permission(proc, item):
    """Answer the CLI's can_use_tool for its own WebSearch / WebFetch: only a tool the request
    was launched with (the operator's CLAUDE_PROXY_WEB_TOOLS allows it), and a WebFetch only of
    a public address.  A denial is a tool error the model reads; the turn goes on."""
    request = item.get("request") or {}
    name, tool_input = request.get("tool_name"), request.get("input") or {}
    if name not in proc.launch.web_tools:
        why = "%s is not enabled on this claude-proxy" % name
    elif name == "WebFetch":
        why = web_fetch_refusal(tool_input.get("url"))
        why = why and "claude-proxy does not fetch %s" % why
    else:
        why = None
    answer = {"behavior": "allow", "updatedInput": tool_input} if why is None else \
        {"behavior": "deny", "message": why}
    proc.send({"type": "control_response", "response": {
        "subtype": "success", "request_id": item.get("request_id"), "response": answer}})


def refuse(proc, request_id):
    proc.send({"type": "control_response", "response": {
        "subtype": "error", "request_id": request_id, "error": "not supported by claude-proxy"}})


def translate(proc, call, bridge=None, structured=False, streaming=True):
    """stream-json lines -> events, ending with Done or an error (StreamTranslator)."""
    turn = StreamTranslator(proc, bridge, structured, streaming)
    for item in cli_lines(proc, call):
        if isinstance(item, Heartbeat):
            yield item
            continue
        handler = turn.LINES.get(item.get("type"))
        if handler is not None:
            yield from handler(turn, item) or ()
        if turn.over:
            return
        if bridge is not None and bridge.done:
            bridge.replayed_all()
            # held open (bridge.exact): the process may wait for the results; else it is ended
            yield Done("tool_use", bridge.usage, whole=bridge.exact)
            return
    raise cli_ended(proc)


def cli_lines(proc, call):
    """The CLI's JSON lines and Heartbeats; any other output is kept for an error message."""
    for item in proc.read(call):
        if isinstance(item, (dict, Heartbeat)):
            yield item
        elif item:
            proc.garbage.append(item[:200])


def refused_settings(item):
    """Raise the 400 for a control_response refusing a control request of ours."""
    resp = item.get("response") or {}
    if resp.get("subtype") == "error":
        raise BadRequest("The claude CLI refused the request settings (%s): %s"
                         % (resp.get("request_id"), scrub(str(resp.get("error")))))


class StreamTranslator:
    """One turn's stream-json lines -> events: a handler per line type (LINES) and per upstream
    stream event (STREAM).  The `result` line is authoritative for errors and usage.  With a
    ToolBridge (native tools) the CLI's control requests and tool_use blocks go to it; once it
    has handed calls over, the rest of the stream is not the answer.  With `structured`, the
    answer is the result line's validated `structured_output` (the CLI's StructuredOutput
    tool), sent as one text delta; prose around it is dropped.  A handler returns an iterable
    of events, or None."""

    def __init__(self, proc, bridge, structured, streaming):
        self.proc, self.bridge, self.structured = proc, bridge, structured
        self.replay = Replay(streaming)
        self.started = False         # Start was sent
        self.live = False            # a streamed upstream message is open (text comes as deltas)
        self.last_retry = None       # the CLI's last api_retry line
        self.searches = 0            # WebSearch events sent
        self.over = False            # the result line came: the turn is over

    # -- stream-json lines -----------------------------------------------------------------
    def _stream_event(self, item):
        ev, bridge = item.get("event") or {}, self.bridge
        if self.proc.stopped:
            return None                  # what follows an interrupt is not the answer
        if item.get("abandoned_blocks"):
            # the CLI withdrew the message (a reset stream); it says so on the line, not in the
            # upstream's event
            ev = dict(ev, abandoned_blocks=item["abandoned_blocks"])
        if bridge is None:
            handler = self.STREAM.get(ev.get("type"))
            return handler(self, ev) if handler is not None else None
        return self._bridged_stream_event(ev)

    def _bridged_stream_event(self, ev):
        bridge = self.bridge
        if not bridge.ended:
            yield from bridge.on_stream(self.proc, ev)
        elif ev.get("type") == "message_start":
            bridge.done = True           # the CLI went on to another upstream call
        if not bridge.ended:             # calls handed over: the rest is not the answer
            handler = self.STREAM.get(ev.get("type"))
            yield from (handler(self, ev) if handler is not None else None) or ()

    def _assistant(self, item):
        # the CLI's non-streaming fallback after a dropped stream arrives as whole blocks
        # (a "<synthetic>" message is the CLI's own error text; the result line reports it)
        message = item.get("message") or {}
        if not self.replay.retried or self.live or message.get("model") == "<synthetic>":
            return
        for block in message.get("content") or []:
            if block.get("type") == "text" and block.get("text") and not self.structured:
                yield from self.replay.text(block["text"])
            elif block.get("type") == "tool_use" and self.bridge is not None:
                yield from self.bridge.on_block(self.proc, message.get("id"), block)

    def _rate_limit_event(self, item):
        self.proc.note(item)

    def _system(self, item):
        if item.get("subtype") == "api_retry":
            self.last_retry, self.live = item, False
            return self.replay.restart()        # the CLI asks again, from the start
        return None

    def _control_request(self, item):
        request = item.get("request") or {}
        if request.get("tool_name") in CLI_WEB_TOOLS and request.get("subtype") == "can_use_tool":
            web_tool_permission(self.proc, item)
        elif self.bridge is not None:
            self.bridge.on_control(self.proc, item)
        else:
            # nothing is offered to the CLI in plain-model mode; refuse so it never waits
            refuse(self.proc, item.get("request_id"))

    def _user(self, item):
        result = item.get("tool_use_result")
        if isinstance(result, dict) and "query" in result and not self.proc.stopped:
            self.searches += 1
            return [web_search_event(result)]      # the CLI ran a WebSearch
        if self.bridge is not None:
            self.bridge.on_user(self.proc, item)
        return None

    def _control_response(self, item):
        refused_settings(item)

    def _result(self, item):
        proc, bridge = self.proc, self.bridge
        proc.note(item)
        self.over = True
        # a continued held turn: only its last message is this request's (bridge.usage)
        usage = bridge.usage if bridge is not None and bridge.continued else \
            Usage.from_api(item.get("usage"))
        usage.web_searches = self.searches
        if bridge is not None and bridge.broken:
            raise UpstreamError("The upstream stream broke after the model had made a tool call, "
                                "and the claude CLI does not ask again; retry the request.")
        if bridge is not None and item.get("api_error_status") is None:
            # a message asked again as whole blocks is over only now (one line a block); the
            # turn this proxy stopped (a denied call: is_error, aborted_tools) included
            bridge.replayed_all()
        if bridge is not None and bridge.calls and item.get("api_error_status") is None:
            # the turn this proxy stopped reads as an error (aborted_tools): it is the answer,
            # but the process heard denials the client never saw (it must not be kept)
            return [Done("tool_use", usage, whole=False)]
        if proc.stopped:
            return [Done(proc.stopped, usage)]
        if item.get("is_error") or item.get("subtype") == "error_max_structured_output_retries":
            raise result_error(item, self.last_retry, proc.rate_limit, proc.launch.account)
        if self.structured:
            if "structured_output" not in item:
                raise UpstreamError("The model did not return JSON matching the schema.")
            return [TextDelta(json.dumps(item["structured_output"], ensure_ascii=False)),
                    Done("end_turn", usage)]
        # a stream that broke before its first text is asked again without streaming, and that
        # answer's whole blocks follow a message that never ended (not taken as the answer):
        # the result line holds its text, which must not be lost (bench/soak.py found it)
        text = item.get("result")
        late = list(self.replay.text(text)) if isinstance(text, str) and text and \
            not self.replay.sent["text"] and not any(self.replay.skip.values()) else []
        # a re-asked answer shorter than the text already streamed: the client has more than
        # the CLI keeps (it must not be kept)
        return late + [Done(item.get("stop_reason") or "end_turn", usage,
                            whole=not any(self.replay.skip.values()))]

    LINES = {"stream_event": _stream_event, "assistant": _assistant,
             "rate_limit_event": _rate_limit_event, "system": _system,
             "control_request": _control_request, "user": _user,
             "control_response": _control_response, "result": _result}

    # -- upstream stream events (stream_event lines) -----------------------------------------
    def _message_start(self, ev):
        self.live = True
        if not self.started:
            self.started = True
            return [Start(Usage.from_api((ev.get("message") or {}).get("usage")))]
        return None

    def _message_delta(self, ev):
        if (ev.get("delta") or {}).get("stop_reason") == "max_tokens":
            # the CLI would ask the model to resume (up to 3 times) and join the pieces; API
            # clients expect the cut-off answer with its stop reason instead
            self.proc.interrupt("max_tokens")

    def _content_block_delta(self, ev):
        d = ev.get("delta") or {}
        if d.get("type") == "text_delta" and d.get("text") and not self.structured:
            return self.replay.text(d["text"])
        if d.get("type") == "thinking_delta" and d.get("thinking"):
            return self.replay.thinking(d["thinking"])
        if d.get("type") == "signature_delta":
            return [ThinkingDelta("", d.get("signature", ""))]
        return None

    def _message_stop(self, ev):
        if ev.get("abandoned_blocks"):
            self.live = False
            return self.replay.restart()
        return None

    STREAM = {"message_start": _message_start, "message_delta": _message_delta,
              "content_block_delta": _content_block_delta, "message_stop": _message_stop}


def cli_ended(proc):
    """The error for a CLI whose output ended before the line that was awaited."""
    status = proc.exit_status()
    detail = "; ".join(list(proc.stderr_tail)[-3:] or proc.garbage[-3:]) or "no output"
    error = StillBorn if not proc.seen else CLIEnded
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
        self.skip = {channel: "".join(parts) for channel, parts in self.sent.items()}

    def _pass(self, channel, piece):
        skip = self.skip[channel]
        if skip:
            n = min(len(piece), len(skip))
            if piece[:n] != skip[:n]:
                raise UpstreamError("The upstream stream broke and the answer asked for again "
                                    "differs from the text already sent; retry the request.")
            piece, self.skip[channel] = piece[n:], skip[n:]
        if piece:
            self.sent[channel].append(piece)
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


def result_error(result, last_retry, rate_limit=None, account=""):
    status = result.get("api_error_status")
    text = scrub(str(result.get("result") or "; ".join(result.get("errors") or []) or
                     result.get("terminal_reason") or "unknown error"))
    login = "login %r" % account if account else "its login"
    if status == 401 or (status == 403 and not MODEL_REFUSED.search(text)):
        return LoginFailed(
            "The claude CLI on the proxy server could not authenticate with %s (upstream %s: %s). "
            "On the server, run `claude login` (for a login of CLAUDE_PROXY_ACCOUNTS: "
            "`CLAUDE_CONFIG_DIR=<its dir> claude login`, or a new `claude setup-token` token in "
            "its file)." % (login, status, text))
    if status == 429:
        delay = (last_retry or {}).get("retry_delay_ms")
        info = (result.get("api_error_params") or {}).get("rate_limit_info") or rate_limit
        return limit_error(info or {}, account, said=text, delay_ms=delay)
    if status == 529:
        return Overloaded("Upstream overloaded: %s" % text)
    if result.get("subtype") == "error_max_structured_output_retries":
        return UpstreamError("The model did not produce JSON matching the requested schema "
                             "(the CLI gave up after its retries).")
    if status == 400 or "prompt is too long" in text.lower():
        return BadRequest("Upstream rejected the request: %s" % text)
    if status in (403, 404) and MODEL_REFUSED.search(text):
        return ProxyError("The model is not available to %s: its plan may not include it, or the "
                          "id is wrong; ask for another model. The CLI said: %s" % (login, text),
                          status=status, code="model_not_found",
                          error_type="permission_error" if status == 403 else "not_found_error")
    if status == 404:
        return NotFound("Upstream: %s" % text)
    if status == 413:
        return TooLarge("Upstream: %s" % text)
    if status is None and result.get("terminal_reason") == "api_error":
        return UpstreamError("Could not reach the upstream API: %s" % text)
    return UpstreamError("The claude CLI failed (upstream status %s): %s" % (status, text))


#: the CLI's texts for a model the login cannot use (404: "There's an issue with the selected
#: model (X). It may not exist or you may not have access to it."; a 403 naming the model)
MODEL_REFUSED = re.compile(r"selected model|not have access to (it|this model)|"
                           r"does not (include|have) access to (this|the) model", re.I)
#: plan windows as the CLI names them (rate_limit_info.rateLimitType, unifiedWindows keys)
WINDOW_NAMES = {"five_hour": "5-hour", "seven_day": "weekly", "seven_day_opus": "weekly Opus",
                "seven_day_sonnet": "weekly Sonnet", "overage": "extra usage"}


def unix_seconds(value):
    """A reset time as the CLI gives it (seconds or milliseconds) -> int seconds, or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value / 1000 if value > 1e11 else value)
    return None


def limit_error(info, account, said=None, delay_ms=None, guard=False):
    """The 429 for a login out of plan limits, in words a client can act on: which window,
    when it resets (Retry-After), and whether it is extra usage that was refused.  `guard`:
    the proxy refused it itself, before sending anything (CLAUDE_PROXY_EXTRA_USAGE=deny)."""
    window = info.get("rateLimitType")
    resets = unix_seconds(info.get("resetsAt"))
    login = "Login %r" % account if account else "The login"
    if not window:        # no plan facts (an API-key login, or a plain 429): the upstream's
        msg, code = "%s was rate limited upstream." % login, "rate_limit_exceeded"
    elif info.get("errorCode") == "credits_required" or window == "overage":
        msg, code = ("%s was refused extra usage: its plan limits are used up and no usage "
                     "credits cover more." % login), "insufficient_quota"
    elif guard:
        msg, code = ("%s has used up its %s window (%s); more requests would be billed as extra "
                     "usage, which this proxy refuses (CLAUDE_PROXY_EXTRA_USAGE=deny), so nothing "
                     "was sent." % (login, window, WINDOW_NAMES.get(window, window))), \
            "rate_limit_exceeded"
    else:
        msg, code = ("%s hit its plan limit: the %s window (%s) is used up."
                     % (login, window, WINDOW_NAMES.get(window, window))), "rate_limit_exceeded"
    if resets:
        msg += " It resets at %s UTC." % time.strftime("%Y-%m-%d %H:%M", time.gmtime(resets))
    if said:
        msg += " The CLI said: %s" % said
    after = str(max(1, int(-(-delay_ms // 1000)))) if isinstance(delay_ms, (int, float)) else "30"
    headers = dict({"Retry-After": after}, **limit_headers(info))
    if account:
        headers["X-Claude-Account"] = account
    return RateLimited(msg, headers=headers, code=code)


# -- logins --------------------------------------------------------------------------------------
# Each login (an entry of CLAUDE_PROXY_ACCOUNTS, or the CLI's own, named "default") has its own
# CLI processes (Launch.account) and its own plan: what the CLI last reported of its windows
# (rate_limit_event: subscription logins only), whether its extra usage is in use, tokens per
# model, whether it authenticated.  Requests are routed by that, and the extra-usage guard
# refuses before anything is sent.

WARN_AT = (0.5, 0.75, 0.9, 1.0)   # a window's utilization crossing one of these is logged
AFFINITY_MAX = 4096               # conversations whose login is remembered
RECHECK_SECONDS = 300.0           # then a login that failed to authenticate is tried again
STARTUP_CHECK_WAIT = 10.0         # seconds /health waits for the start-up check at most
LOGIN_WATCH_SECONDS = 2.0         # how often the logins' credential files are looked at
#: the CLI version this proxy is tested with; an older one lacks control requests it relies
#: on (rewind_conversation, sdkMcpServerManifests, apply_flag_settings)
CLI_TESTED = (2, 1, 330)


def cli_version_tuple(text):
    """`claude --version`'s "2.1.330 (Claude Code)" -> (2, 1, 330), or None."""
    m = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(g) for g in m.groups()) if m else None


def credential_files(cfg, account):
    """The files a login's CLI reads its credentials from: a token file, or .credentials.json
    in its config dir (the default login's: CLAUDE_CONFIG_DIR, else ~/.claude)."""
    if account.credential == "token_file":
        return [account.path]
    folder = account.path if account.credential == "config_dir" else \
        cfg.environ.get("CLAUDE_CONFIG_DIR") or \
        os.path.join(cfg.environ.get("HOME") or os.path.expanduser("~"), ".claude")
    return [os.path.join(folder, ".credentials.json")]


def file_stamp(paths):
    """What changes when one of `paths` is written, replaced or removed."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError as exc:
            out.append((path, exc.errno))
    return tuple(out)


def unreadable_credentials(cfg, account):
    """Why an existing credentials file of `account` cannot be read by this process, or None
    (a host ~/.claude mounted into a container owned by another uid reads as "Not logged in")."""
    for path in credential_files(cfg, account):
        if account.credential != "token_file" and not os.path.lexists(path):
            continue               # no file: a token or key in the environment may serve
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            try:
                owner = " (it belongs to uid %d)" % os.stat(path).st_uid
            except OSError:
                owner = ""
            return "its credentials file %s cannot be read by uid %d%s: %s" % (
                path, os.getuid(), owner, exc.strerror or type(exc).__name__)
    return None
TOKEN_KEYS = (("input", "inputTokens"), ("output", "outputTokens"),
              ("cache_read", "cacheReadInputTokens"), ("cache_write", "cacheCreationInputTokens"))


def log_line(text):
    sys.stderr.write("claude-proxy: %s\n" % text)
    sys.stderr.flush()


class Account:
    """One login and what is known of its plan.  All state changes under `lock`."""

    def __init__(self, name, credential="", path="", guard="deny"):
        self.name, self.credential, self.path, self.guard = name, credential, path, guard
        self.lock = threading.Lock()
        self.info = None             # the last rate_limit_info
        self.updated_at = None
        self.windows = {}            # name -> {"utilization", "status", "resets_at"}
        self.marks = {}              # name -> (resets_at, highest WARN_AT step logged)
        self.tokens = {}             # model -> {"input", "output", "cache_read", "cache_write"}
        self.healthy, self.hint, self.failed_at = True, None, 0.0
        self.reason = None           # why a check without a model turn found it cannot serve
        self.stamp = None            # of its credential files (credential_files), when last seen
        self.files = ()              # those files

    def note(self, item, spent=None):
        """A rate_limit_event or result line of one of its CLI processes (`spent`: the result's
        tokens per model for that turn)."""
        with self.lock:
            if item.get("type") == "rate_limit_event":
                self._note_limits(item.get("rate_limit_info") or {})
                return
            for model, counts in (spent or {}).items():
                mine = self.tokens.setdefault(model, dict.fromkeys([k for k, _ in TOKEN_KEYS], 0))
                for k, n in counts.items():
                    mine[k] += n
            if not item.get("is_error"):
                self.healthy, self.hint, self.reason = True, None, None

    def mark_unhealthy(self, why, checked=False):
        """Its CLI could not authenticate (LoginFailed: `why`, already scrubbed), or `checked`:
        a check without a model turn found it cannot (Backend.check_login)."""
        with self.lock:
            if self.healthy or checked:
                log_line("login %s %s; other logins serve until it is logged in again (%s)"
                         % (self.name, "cannot serve" if checked else "failed to authenticate",
                            why[:200]))
            if checked or self.healthy:          # a new failure; a check's reason stays
                self.reason = why if checked else None
            self.healthy, self.failed_at = False, time.time()
            self.hint = ("log in again: CLAUDE_CONFIG_DIR=%s claude login" % self.path
                         if self.credential == "config_dir" else
                         "write a new `claude setup-token` token to %s" % self.path
                         if self.credential == "token_file" else "run `claude login` on the server")

    def mark_healthy(self):
        with self.lock:
            if not self.healthy:
                log_line("login %s: its new credentials pass the check; serving again" % self.name)
            self.healthy, self.hint, self.reason = True, None, None

    def restamp(self):
        """Look at its credential files again; True when they changed since last time."""
        stamp = file_stamp(self.files)
        with self.lock:
            changed, self.stamp = self.stamp is not None and stamp != self.stamp, stamp
        return changed

    def outdated(self, proc):
        """`proc` started with credentials that have changed since: not to be reused."""
        return getattr(proc, "credentials", None) not in (None, self.stamp)

    def _note_limits(self, info):
        was_overage = bool((self.info or {}).get("isUsingOverage"))
        self.info, self.updated_at = info, int(time.time())
        windows = info.get("unifiedWindows")
        if not isinstance(windows, dict):       # the binding window only
            windows = {info["rateLimitType"]: info} if info.get("rateLimitType") else {}
        for name, w in windows.items():
            if not isinstance(w, dict) or name == "overage":
                continue
            u = w.get("utilization")
            u = float(u) if isinstance(u, (int, float)) and not isinstance(u, bool) else \
                (1.0 if w.get("status") == "rejected" else 0.0)
            self.windows[name] = new = {"utilization": u, "status": str(w.get("status") or "allowed"),
                                        "resets_at": unix_seconds(w.get("resetsAt"))}
            period, logged = self.marks.get(name, (None, 0.0))
            if period != new["resets_at"]:
                logged = 0.0                   # a new period of this window
            step = max([t for t in WARN_AT if u >= t] or [0.0])
            if step > logged:
                log_line("login %s: plan window %s at %d%% (%s)%s" % (
                    self.name, name, round(u * 100), new["status"],
                    ", resets %s UTC" % time.strftime("%Y-%m-%d %H:%M", time.gmtime(new["resets_at"]))
                    if new["resets_at"] else ""))
            self.marks[name] = (new["resets_at"], max(step, logged))
        if info.get("isUsingOverage") and not was_overage:
            log_line("login %s: the plan's limits are used up and requests are billed as extra "
                     "usage%s" % (self.name, "; refusing more until the reset "
                                  "(CLAUDE_PROXY_EXTRA_USAGE=deny)" if self.guard == "deny" else ""))

    def exhausted(self, now=None):
        """Known to be out of plan limits until a reset that has not come: a rejected window,
        or requests already billed as extra usage."""
        now = time.time() if now is None else now
        with self.lock:
            info = self.info or {}
            resets = unix_seconds(info.get("resetsAt"))
            return bool(resets and resets > now and
                        (info.get("status") == "rejected" or info.get("isUsingOverage")))

    def limited(self, now=None):
        """The 429 the guard answers for this login without sending anything, or None: it is
        exhausted and its next requests would be billed as extra usage (the CLI goes on past a
        rejected window when the plan's extra usage allows it).  Until the reset it names.
        A login that is out of limits with no extra usage is not refused here: the upstream
        refuses it for free, and knows first when the window has come back."""
        if self.guard != "deny" or not self.exhausted(now):
            return None
        with self.lock:
            info = dict(self.info or {})
        billable = info.get("isUsingOverage") or (
            info.get("overageStatus") in ("allowed", "allowed_warning") and
            info.get("errorCode") != "credits_required" and info.get("rateLimitType") != "overage")
        return limit_error(info, self.name, guard=True) if billable else None

    def headroom(self, now=None):
        """1 - the highest utilization among its windows still running (the binding one)."""
        now = time.time() if now is None else now
        with self.lock:
            used = [w["utilization"] for w in self.windows.values()
                    if not w["resets_at"] or w["resets_at"] > now]
        return 1.0 - max(used or [0.0])

    def report(self):
        with self.lock:
            info = self.info or {}
            return {"name": self.name, "healthy": self.healthy, "hint": self.hint,
                    "reason": self.reason,
                    "windows": {k: dict(v) for k, v in self.windows.items()},
                    "binding_window": info.get("rateLimitType"),
                    "extra_usage": {"status": info.get("overageStatus"),
                                    "in_use": bool(info.get("isUsingOverage"))},
                    "updated_at": self.updated_at,
                    "tokens": {m: dict(t) for m, t in self.tokens.items()}}


class Logins:
    """The logins and the choice among them.  A new conversation goes to the healthy login
    with the most headroom on its binding window; a conversation stays on the login that
    served its first turn (its prompt cache and kept process are there); X-Claude-Account
    pins one."""

    def __init__(self, cfg):
        self.guard = cfg.extra_usage
        self.accounts = [Account(n, k, p, cfg.extra_usage) for n, k, p in cfg.accounts] or \
            [Account("default", guard=cfg.extra_usage)]
        for a in self.accounts:
            a.files = tuple(credential_files(cfg, a))
            a.stamp = file_stamp(a.files)
        self.first = self.accounts[0]
        self.by_name = {a.name: a for a in self.accounts}
        self.affinity = collections.OrderedDict()     # conversation root -> login name
        self.lock = threading.Lock()

    def get(self, name):
        return self.by_name.get(name) or self.first

    @staticmethod
    def root(req):
        """What names a conversation from its first turn on: the system prompt and the first
        message (each later request of it repeats both)."""
        first = req.messages[0] if req.messages else None
        return hashlib.sha256(json.dumps([req.system, first.blocks if first else None],
                                         sort_keys=True).encode()).hexdigest()

    def choose(self, req, pinned=None, tried=(), allowed=()):
        """The login for `req` among `allowed` (a key's list; () = all); raises the 429 of a
        limited login when none can serve it."""
        if allowed and (pinned or not set(allowed) & set(self.by_name)):
            if pinned not in allowed:
                raise Forbidden("This key may use the login(s) %s only."
                                % ", ".join(allowed), param="X-Claude-Account")
        if pinned:
            account = self.by_name.get(pinned)
            if account is None:
                raise BadRequest("Unknown X-Claude-Account %r; the logins you may use: %s."
                                 % (pinned, ", ".join(allowed or self.by_name)),
                                 param="X-Claude-Account")
            err = account.limited()
            if err is not None:
                raise err
            return account
        now, limits = time.time(), []
        usable = []
        for a in self.accounts:
            if a.name in tried or (allowed and a.name not in allowed):
                continue
            err = a.limited(now)
            if err is not None:
                limits.append(err)
            elif a.healthy or now - a.failed_at > RECHECK_SECONDS:
                usable.append(a)
        if not usable:         # only logins that failed to authenticate: one of them may be back
            usable = [a for a in self.accounts if a.name not in tried and not a.healthy
                      and (not allowed or a.name in allowed) and a.limited(now) is None]
            usable.sort(key=lambda a: a.failed_at)
            usable = usable[:1]
        if not usable:
            if limits:
                raise min(limits, key=lambda e: int(e.headers.get("Retry-After", "0")))
            raise CLIUnavailable("No login of this proxy can serve the request.")
        with self.lock:
            name = self.affinity.get(self.root(req))
        for a in usable:
            if a.name == name and a.healthy and not a.exhausted(now):
                return a
        # a login that failed to authenticate gets a new conversation again once RECHECK_SECONDS
        # have passed (it may have been logged in again); if it still fails, the request goes
        # on to the next login
        return max(usable, key=lambda a: (a.healthy or now - a.failed_at > RECHECK_SECONDS,
                                          not a.exhausted(now), a.headroom(now)))

    def remember(self, req, account):
        with self.lock:
            key = self.root(req)
            self.affinity[key] = account.name
            self.affinity.move_to_end(key)
            while len(self.affinity) > AFFINITY_MAX:
                self.affinity.popitem(last=False)

    def report(self):
        return {"accounts": [a.report() for a in self.accounts],
                "guard": {"extra_usage": self.guard}}


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


class DialectStream:
    """One streamed answer in one dialect (ChatStream, MessagesStream, ResponsesStream): the
    neutral events in, the dialect's SSE events out.  A subclass holds the stream's state and
    names a handler per event type in EVENTS (types not in it send nothing).  A ProxyError
    after the status line is the dialect's error event (`fail`): the status is already sent.
    The OpenAI dialects hold a tool call in `call` until its arguments are complete; it closes
    at the first event that is not more of it."""

    EVENTS = {}                  #: event type -> handler(self, event)

    def __init__(self, dialect, req, sse, body):
        self.dialect, self.req, self.sse, self.body = dialect, req, sse, body
        self.call = None         #: the tool call held open (OpenAI dialects), or None

    def run(self, events):
        self.begin()
        try:
            for ev in events:
                self.before(ev)
                handler = self.EVENTS.get(type(ev))
                if handler is not None:
                    handler(self, ev)
        except ProxyError as err:
            self.fail(err)
        self.end()

    def begin(self):
        pass

    def before(self, ev):
        if self.call is not None and not isinstance(ev, (ToolCallDelta, Heartbeat)):
            self.close_call()

    def close_call(self):
        raise NotImplementedError

    def fail(self, err):
        raise NotImplementedError

    def end(self):
        pass

    def on_heartbeat(self, ev):
        self.sse.comment("keep-alive")


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
        part_type = part.get("type")
        if part_type in ("text", "input_text"):
            _need(isinstance(part.get("text"), str), "%s.text must be a string" % at, at)
            blocks.append({"type": "text", "text": part["text"]})
        elif part_type in ("image_url", "input_image"):
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            blocks.append(image_block(url))
        else:
            raise BadRequest("%s has unsupported type %r (supported: text, image_url)"
                             % (at, part_type), param=at)
    return blocks


#: OpenAI's hosted tools (run on OpenAI's servers), by type: None = not offered, the request
#: goes on without it (the client works without it: web search a client marks optional, an
#: image tool beside others); a string = a 400 with that advice (the client relies on what
#: only OpenAI has: its vector stores, its containers, a remote MCP server, a screen).
HOSTED_TOOLS = {
    "web_search": None, "web_search_preview": None, "web_search_2025_08_26": None,
    "web_search_preview_2025_03_11": None, "image_generation": None, "tool_search": None,
    "programmatic_tool_calling": None,
    "file_search": "file_search searches OpenAI vector stores, which this proxy cannot reach; "
                   "offer a function tool that searches your documents instead.",
    "code_interpreter": "code_interpreter runs code in an OpenAI container, which this proxy "
                        "does not have; offer a function tool that runs code where you choose.",
    "mcp": "remote MCP servers are called by OpenAI's servers; connect the MCP server in your "
           "client and offer its tools as function tools instead.",
    "computer_use_preview": "computer use needs OpenAI's computer-use model; offer your screen "
                            "actions as function tools instead.",
    "computer": "computer use needs OpenAI's computer-use model; offer your screen actions as "
                "function tools instead.",
    "local_shell": "local_shell belongs to OpenAI's codex-mini models; offer the shell as a "
                   "function tool (current Codex CLI versions do).",
    "shell": "the hosted shell tool belongs to OpenAI's GPT-5 models; offer the shell as a "
             "function tool instead.",
    "apply_patch": "the apply_patch tool type belongs to OpenAI's GPT-5 models; offer it as a "
                   "custom or function tool instead.",
}
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def parse_openai_tools(raw, flat):
    """OpenAI tools -> [ToolSpec], for chat completions (`flat` False: {"type": "function",
    "function": {...}}) and Responses (`flat`: the fields beside "type").  The one place that
    knows OpenAI's tool types: function and custom tools are offered, a namespace offers the
    tools inside it (their calls carry the namespace back), hosted tools follow HOSTED_TOOLS."""
    _need(isinstance(raw, list), "tools must be a list", "tools")
    tools = [spec for i, t in enumerate(raw) for spec in _openai_tool(t, "tools[%d]" % i, flat)]
    seen = set()
    for t in tools:
        _need(t.name not in seen, "tools: the name %r is offered twice" % t.name, "tools")
        seen.add(t.name)
    return tools


def _openai_tool(t, at, flat):
    """One of the tools -> the ToolSpecs it offers: its own (a function or custom tool), those
    inside it (a namespace), none (a hosted tool the request goes on without)."""
    _need(isinstance(t, dict), "%s must be an object" % at, at)
    tool_type = t.get("type", "function")
    if tool_type in ("function", "custom"):
        return [_openai_tool_spec(t, at, flat)]
    if tool_type == "namespace":
        name, inner = t.get("name"), t.get("tools")
        _need(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name),
              "%s.name must be 1-64 letters, digits, _ or -" % at, at)
        _need(isinstance(inner, list), "%s.tools must be a list of function or custom tools"
              % at, at)
        specs = []
        for j, sub in enumerate(inner):
            _need(isinstance(sub, dict) and sub.get("type", "function") in ("function", "custom"),
                  "%s.tools[%d] must be a function or custom tool" % (at, j), at)
            specs.append(_openai_tool_spec(sub, "%s.tools[%d]" % (at, j), flat, name))
        return specs
    if tool_type in HOSTED_TOOLS:
        _need(HOSTED_TOOLS[tool_type] is None, "%s: %s" % (at, HOSTED_TOOLS[tool_type]), at)
        return []
    raise BadRequest("%s has unknown type %r (function, custom, namespace, or one of "
                     "OpenAI's hosted tools)" % (at, tool_type), param=at)


def _openai_tool_spec(t, at, flat, namespace=""):
    """A function or custom tool (inside `namespace`: named namespace.name, its fields always
    flat) -> its ToolSpec."""
    tool_type = t.get("type", "function")
    spec = t if flat or namespace else t.get(tool_type)
    if flat and not namespace and tool_type == "function":
        _need("function" not in t or "name" in t, "%s.name is required: Responses tools "
              "are flat ({\"type\": \"function\", \"name\": ..., \"parameters\": ...}), "
              "not nested under \"function\" as in chat completions" % at, at)
    _need(isinstance(spec, dict), "%s must be {\"type\": \"%s\", \"%s\": {...}}"
          % (at, tool_type, tool_type), at)
    name = spec.get("name")
    _need(isinstance(name, str) and _TOOL_NAME.fullmatch(name),
          "%s.name must be 1-128 letters, digits, _ . : or -" % at, at)
    full = "%s.%s" % (namespace, name) if namespace else name
    desc = spec.get("description") or ""
    if tool_type == "custom":
        return custom_tool_spec(full, desc, spec.get("format"), namespace)
    params = spec.get("parameters") or {"type": "object", "properties": {}}
    _need(isinstance(params, dict), "%s.parameters must be an object" % at, at)
    return ToolSpec(full, desc, params, "function", namespace)


WEB_SEARCH_TYPES = ("web_search", "web_search_preview", "web_search_2025_08_26",
                    "web_search_preview_2025_03_11")


def openai_web_tools(body):
    """The CLI tools an OpenAI request's web search asks for: WebSearch for a web_search tool
    (or chat's web_search_options), unless the client marks it cached-only
    (external_web_access: false, as Codex does by default): that search is not live anyway."""
    raw = body.get("tools") if isinstance(body.get("tools"), list) else []
    wanted = isinstance(body.get("web_search_options"), dict) or any(
        isinstance(t, dict) and t.get("type") in WEB_SEARCH_TYPES and
        t.get("external_web_access") is not False for t in raw)
    return ("WebSearch",) if wanted else ()


def parse_openai_tool_choice(choice, tools, flat):
    """tool_choice (chat or Responses shapes) -> (tools to offer, neutral choice)."""
    if choice is None:
        return tools, "auto"
    if isinstance(choice, str):
        _need(choice in ("auto", "none", "required"), "tool_choice must be auto, none, "
              "required or a named tool", "tool_choice")
        _need(choice != "required" or tools, "tool_choice is required but no tools were given",
              "tool_choice")
        return tools, choice
    _need(isinstance(choice, dict), "tool_choice must be a string or an object", "tool_choice")
    choice_type = choice.get("type", "function")
    if choice_type == "allowed_tools":
        spec = choice if flat else choice.get("allowed_tools") or {}
        names = _allowed_names(spec.get("tools"), flat)
        return parse_openai_tool_choice(
            {"auto": "auto", "required": "required"}.get(spec.get("mode", "auto"), "auto"),
            [t for t in tools if t.name in names], flat)
    if choice_type in ("function", "custom"):
        named = choice if flat else choice.get(choice_type) or {}
        name = named.get("name") if isinstance(named, dict) else None
        _need(isinstance(name, str), "tool_choice must name a tool: %s" % (
            "{\"type\": \"function\", \"name\": ...}" if flat else
            "{\"type\": \"function\", \"function\": {\"name\": ...}}"), "tool_choice")
        if choice.get("namespace"):
            name = "%s.%s" % (choice["namespace"], name)
        _need(any(t.name == name for t in tools), "tool_choice names %r, which is not in tools"
              % name, "tool_choice")
        return tools, {"name": name}
    if choice_type in WEB_SEARCH_TYPES:
        return tools, "auto"      # the model decides: the CLI cannot force its WebSearch
    if choice_type in HOSTED_TOOLS:
        raise BadRequest("tool_choice requires the hosted tool %r, which this proxy cannot run%s"
                         % (choice_type, ": " + HOSTED_TOOLS[choice_type]
                            if HOSTED_TOOLS[choice_type] else "."),
                         param="tool_choice")
    raise BadRequest("tool_choice type %r is not one of function, custom, allowed_tools"
                     % choice_type, param="tool_choice")


def _allowed_names(allowed, flat):
    """The names of the tools an allowed_tools choice lists (namespace.name in a namespace);
    chat's nest each under its type, Responses' (`flat`) do not."""
    _need(isinstance(allowed, list), "tool_choice.tools must be a list", "tool_choice")
    names = set()
    for a in allowed:
        a = a if not isinstance(a, dict) or flat or a.get("type") not in ("function", "custom") \
            else dict(a, **(a.get(a["type"]) or {}))
        if isinstance(a, dict) and isinstance(a.get("name"), str):
            names.add("%s.%s" % (a["namespace"], a["name"]) if a.get("namespace") else a["name"])
    return names


def _openai_tools(body):
    if body.get("functions") is not None and body.get("tools") is None:     # legacy API
        _need(isinstance(body["functions"], list), "functions must be a list", "functions")
        tools = parse_openai_tools([{"type": "function", "function": f} for f in body["functions"]],
                                   False)
        fc = body.get("function_call", "auto")
        return parse_openai_tool_choice({"type": "function", "function": fc}
                                        if isinstance(fc, dict) else fc, tools, False)
    tools = parse_openai_tools(body.get("tools") or [], False)
    return parse_openai_tool_choice(body.get("tool_choice"), tools, False)


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
            for use in _openai_tool_uses(m, i, where):
                names_by_id[use["id"]] = use["name"]
                blocks.append(use)
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


def _openai_tool_uses(m, i, where):
    """An assistant message's tool_calls (and a legacy function_call) -> tool_use blocks: a
    function's JSON arguments, a custom tool's raw input."""
    calls = m.get("tool_calls") or []
    _need(isinstance(calls, list), "%s.tool_calls must be a list" % where, "messages")
    if m.get("function_call"):
        calls = calls + [{"id": "call_legacy_%d" % i, "function": m["function_call"]}]
    uses = []
    for j, c in enumerate(calls):
        custom = c.get("custom") if isinstance(c, dict) and c.get("type") == "custom" else None
        fn = custom or (c.get("function") if isinstance(c, dict) else None)
        _need(isinstance(fn, dict) and isinstance(fn.get("name"), str),
              "%s.tool_calls[%d] needs function.name" % (where, j), "messages")
        if custom is not None:
            args = {CUSTOM_INPUT: fn.get("input") if isinstance(fn.get("input"), str) else ""}
        else:
            args = fn.get("arguments") or "{}"
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                args = {"_raw_arguments": args}
        uses.append({"type": "tool_use", "id": c.get("id") or "call_%d_%d" % (i, j),
                     "name": fn["name"], "input": args})
    return uses


def _openai_schema(fmt, where="response_format", flat=False):
    """Chat `response_format` (or, `flat`, Responses `text.format`, whose json_schema fields
    sit beside "type") -> a JSON schema for structured output, or None for text."""
    if fmt is None:
        return None
    _need(isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object", "json_schema"),
          "%s.type must be text, json_object or json_schema" % where, where)
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "object"}
    spec = fmt if flat else fmt.get("json_schema")
    _need(isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict),
          "%s must be {%s\"name\": ..., \"schema\": {...}}"
          % (where, "\"type\": \"json_schema\", " if flat else ""), where)
    schema = dict(spec.get("schema") or {"type": "object"})
    # the draft a schema names ($schema, as the AI SDK sends draft-07) is not the CLI's concern:
    # the keywords are the same for what structured output uses
    schema.pop("$schema", None)
    return schema


class ChatStream(DialectStream):
    """One streamed chat completion: chat.completion.chunk events, then [DONE].  A function
    call's arguments stream as they come; a custom tool's call is held (`call`) and sent whole
    once complete, its raw input being inside its JSON arguments."""

    def __init__(self, dialect, req, sse, body):
        super().__init__(dialect, req, sse, body)
        self.head = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": req.model, "system_fingerprint": None}
        self.indexes = {}        #: tool call id -> its index in the message's tool_calls
        self.text = []           #: the text so far and the web searches, for the url_citation
        self.searches = []       #: annotations sent at the end

    def chunk(self, delta, finish=None):
        d = dict(self.head, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}])
        if self.req.include_usage:
            d["usage"] = None
        self.sse.event(d)

    def begin(self):
        self.chunk({"role": "assistant", "content": ""})

    def fail(self, err):
        self.sse.event(self.dialect.error(err)[1])

    def end(self):
        self.sse.event("[DONE]")

    def close_call(self):
        call, self.call = self.call, None
        self.chunk({"tool_calls": [dict(self.dialect.tool_call(self.req, call),
                                        index=self.indexes[call.id])]})

    # -- one handler per event ---------------------------------------------------------------
    def on_text(self, ev):
        if ev.text:
            self.text.append(ev.text)
            self.chunk({"content": ev.text})

    def on_thinking(self, ev):
        if self.req.thinking and ev.text:
            self.chunk({"reasoning_content": ev.text})

    def on_tool_call(self, ev):
        index = self.indexes[ev.id] = len(self.indexes)
        if getattr(tool_spec(self.req, ev.name), "tool_type", "") == "custom":
            self.call = ToolCall(ev.id, ev.name, ev.arguments)
            return
        self.chunk({"tool_calls": [{"index": index, "id": ev.id, "type": "function",
                                    "function": {"name": ev.name, "arguments": ""}}]})
        if ev.arguments:
            self.chunk({"tool_calls": [{"index": index, "function": {"arguments": ev.arguments}}]})

    def on_tool_call_delta(self, ev):
        if self.call is not None and self.call.id == ev.id:
            self.call.arguments += ev.arguments
        elif ev.id in self.indexes:
            self.chunk({"tool_calls": [{"index": self.indexes[ev.id],
                                        "function": {"arguments": ev.arguments}}]})

    def on_web_search(self, ev):
        self.searches.append(ev)

    def on_done(self, ev):
        if self.searches:
            self.chunk({"annotations": self.dialect.annotations("".join(self.text), self.searches)})
        self.chunk({}, self.dialect.FINISH.get(ev.stop_reason, "stop"))
        if self.req.include_usage:
            self.sse.event(dict(self.head, choices=[], usage=self.dialect.usage(ev.usage)))

    EVENTS = {TextDelta: on_text, ThinkingDelta: on_thinking, ToolCall: on_tool_call,
              ToolCallDelta: on_tool_call_delta, WebSearch: on_web_search,
              Heartbeat: DialectStream.on_heartbeat, Done: on_done}


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
            web_tools=openai_web_tools(body), json_schema=schema)

    @staticmethod
    def usage(u):
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.output_tokens,
                "total_tokens": u.prompt_tokens + u.output_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cache_read},
                "completion_tokens_details": {"reasoning_tokens": 0}}

    def render(self, req, c, body):
        msg = {"role": "assistant", "content": c.text if (c.text or not c.tool_calls) else None,
               "refusal": None}
        if c.searches:
            msg["annotations"] = self.annotations(c.text, c.searches)
        if req.thinking and c.thinking:
            msg["reasoning_content"] = c.thinking
        finish = self.FINISH.get(c.stop_reason, "stop")
        if c.tool_calls and body.get("functions") is not None and body.get("tools") is None:
            call = c.tool_calls[0]
            msg["function_call"] = {"name": call.name, "arguments": call.arguments}
            finish = "function_call"
        elif c.tool_calls:
            msg["tool_calls"] = [self.tool_call(req, t) for t in c.tool_calls]
        return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage(c.usage)}

    @staticmethod
    def annotations(text, searches):
        return [{"type": "url_citation", "url_citation": {
            "start_index": start, "end_index": end, "url": url, "title": title}}
            for start, end, url, title in url_citations(text, searches)]

    @staticmethod
    def tool_call(req, call):
        """A message's tool call: a function's JSON arguments, or a custom tool's raw input."""
        spec = tool_spec(req, call.name)
        if spec is not None and spec.tool_type == "custom":
            return {"id": call.id, "type": "custom",
                    "custom": {"name": spec.name, "input": custom_input(call.arguments)}}
        return {"id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def stream(self, req, events, sse, body):
        ChatStream(self, req, sse, body).run(events)

    def error(self, err):
        status = 503 if err.status == 529 else err.status
        return status, {"error": {"message": err.message,
                                  "type": self.TYPES.get(err.error_type, err.error_type),
                                  "param": err.param,
                                  "code": err.code or (err.error_type if status >= 500 else None)}}


# 10. Anthropic messages #########################################################################

def _anthropic_blocks(content, where, role):
    """A message's content (a string or blocks) -> the neutral blocks; thinking is dropped."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _need(isinstance(content, list), "%s.content must be a string or a list of blocks" % where)
    blocks = []
    for i, b in enumerate(content):
        at = "%s.content.%d" % (where, i)
        _need(isinstance(b, dict), "%s must be an object" % at)
        block_type = b.get("type")
        if block_type == "text":
            _need(isinstance(b.get("text"), str), "%s.text: Field required" % at)
            blocks.append({"type": "text", "text": b["text"]})
        elif block_type == "image":
            src = b.get("source") or {}
            _need(isinstance(src, dict), "%s.source must be an object" % at)
            if src.get("type") == "url":
                image_block(src.get("url"))           # raises the remote-URL error
            _need(src.get("type") == "base64" and isinstance(src.get("data"), str),
                  "%s.source must be {\"type\": \"base64\", \"media_type\": ..., \"data\": ...}" % at)
            blocks.append(image_block("data:%s;base64,%s" % (src.get("media_type"), src["data"])))
        elif block_type == "tool_use":
            _need(role == "assistant", "%s: tool_use blocks belong to assistant messages" % at)
            _need(isinstance(b.get("id"), str) and isinstance(b.get("name"), str),
                  "%s needs id and name" % at)
            blocks.append({"type": "tool_use", "id": b["id"], "name": b["name"],
                           "input": b.get("input") if isinstance(b.get("input"), dict) else {}})
        elif block_type == "tool_result":
            _need(role == "user", "%s: tool_result blocks belong to user messages" % at)
            blocks.extend(_anthropic_tool_result(b, at))
        elif block_type in ("thinking", "redacted_thinking"):
            continue                                  # not replayed to the model
        else:
            raise BadRequest("%s.type %r is not supported (text, image, tool_use, tool_result, "
                             "thinking)" % (at, block_type))
    return blocks


def _anthropic_tool_result(b, at):
    """A tool_result block -> its images, then the tool_result with its text (the images also
    inside it: native tools give them back there)."""
    _need(isinstance(b.get("tool_use_id"), str), "%s.tool_use_id: Field required" % at)
    inner, images = b.get("content", ""), []
    if isinstance(inner, list):
        inner = _anthropic_blocks(inner, at, "user")
        text = "\n".join(x.get("text", "") for x in inner if x.get("type") == "text")
        images = [x for x in inner if x.get("type") == "image"]
        inner = text
    _need(isinstance(inner, str), "%s.content must be a string or blocks" % at)
    result = {"type": "tool_result", "tool_use_id": b["tool_use_id"], "content": inner,
              "is_error": bool(b.get("is_error"))}
    if images:
        result["images"] = images
    return images + [result]


def parse_anthropic_messages(msgs):
    """Anthropic messages -> [Message]; a tool_result block is given the name of the tool_use
    it answers."""
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
    return merge_messages(out)


def _anthropic_tools(body):
    """tools and tool_choice -> ([ToolSpec], the CLI's web tools the server tools ask for,
    neutral choice, parallel tool calls allowed)."""
    raw_tools = body.get("tools") or []
    _need(isinstance(raw_tools, list), "tools: Input should be a list")
    tools, web = [], []
    for i, t in enumerate(raw_tools):
        _need(isinstance(t, dict) and isinstance(t.get("name"), str),
              "tools.%d.name: Field required" % i)
        tool_type = str(t.get("type") or "")
        if tool_type.startswith(("web_search_", "web_fetch_")):    # server tools: the CLI's own
            web.append("WebSearch" if tool_type.startswith("web_search_") else "WebFetch")
            continue
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
    return tools, web, choice, not tc.get("disable_parallel_tool_use")


class MessagesStream(DialectStream):
    """One streamed message: message_start (with the input usage when Start brings it), then
    content blocks, one open at a time (text and thinking blocks go on while their kind of
    delta comes; every tool_use is a block of its own), then message_delta and message_stop.
    A failure after the status line is an error event."""

    def __init__(self, dialect, req, sse, body):
        super().__init__(dialect, req, sse, body)
        self.index = -1          #: the index of the last content block opened
        self.open = None         #: the type of the block open, or None
        self.started = False     #: message_start sent

    def start(self, usage):
        if not self.started:
            self.started = True
            self.sse.event({"type": "message_start", "message": {
                "id": new_id("msg_"), "type": "message", "role": "assistant",
                "model": self.req.model, "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": dict(self.dialect.usage(usage), output_tokens=1)}},
                "message_start")

    def before(self, ev):
        if not isinstance(ev, Start):
            self.start(Usage())

    def fail(self, err):
        self.sse.event(self.dialect.error(err)[1], "error")

    def open_block(self, block_type, block):
        if self.open == block_type and block_type != "tool_use":
            return
        self.close_block()
        self.index += 1
        self.open = block_type
        self.sse.event({"type": "content_block_start", "index": self.index,
                        "content_block": block}, "content_block_start")

    def close_block(self):
        if self.open is not None:
            self.sse.event({"type": "content_block_stop", "index": self.index},
                           "content_block_stop")
            self.open = None

    def delta(self, d):
        self.sse.event({"type": "content_block_delta", "index": self.index, "delta": d},
                       "content_block_delta")

    # -- one handler per event ---------------------------------------------------------------
    def on_start(self, ev):
        self.start(ev.usage)
        self.sse.event({"type": "ping"}, "ping")

    def on_text(self, ev):
        self.open_block("text", {"type": "text", "text": ""})
        self.delta({"type": "text_delta", "text": ev.text})

    def on_thinking(self, ev):
        if not self.req.thinking:
            return
        self.open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if ev.text:
            self.delta({"type": "thinking_delta", "thinking": ev.text})
        if ev.signature:
            self.delta({"type": "signature_delta", "signature": ev.signature})

    def on_tool_call(self, ev):
        self.open_block("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
        if ev.arguments:
            self.delta({"type": "input_json_delta", "partial_json": ev.arguments})

    def on_tool_call_delta(self, ev):
        if self.open == "tool_use":
            self.delta({"type": "input_json_delta", "partial_json": ev.arguments})

    def on_web_search(self, ev):
        use, result = self.dialect.search_blocks(ev)
        self.open_block("tool_use", dict(use, input={}))
        self.delta({"type": "input_json_delta", "partial_json": json.dumps(use["input"])})
        self.open_block("tool_use", result)      # results arrive whole, as the API sends them
        self.close_block()

    def on_heartbeat(self, ev):
        self.sse.event({"type": "ping"}, "ping")

    def on_done(self, ev):
        if self.index < 0:
            self.open_block("text", {"type": "text", "text": ""})
        self.close_block()
        stop = ev.stop_reason if ev.stop_reason in self.dialect.STOP else "end_turn"
        self.sse.event({"type": "message_delta", "delta": {
            "stop_reason": stop, "stop_sequence": ev.stop_sequence},
            "usage": self.dialect.usage(ev.usage)}, "message_delta")
        self.sse.event({"type": "message_stop"}, "message_stop")

    EVENTS = {Start: on_start, TextDelta: on_text, ThinkingDelta: on_thinking,
              ToolCall: on_tool_call, ToolCallDelta: on_tool_call_delta,
              WebSearch: on_web_search, Heartbeat: on_heartbeat, Done: on_done}


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
        messages = parse_anthropic_messages(body.get("messages"))
        system = body.get("system", "")
        if isinstance(system, list):
            _need(all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
                      for b in system), "system: blocks must be text blocks")
            system = "\n\n".join(b["text"] for b in system)
        _need(isinstance(system, str), "system: Input should be a string or a list of text blocks")
        tools, web, choice, parallel = _anthropic_tools(body)
        stop = body.get("stop_sequences") or []
        _need(isinstance(stop, list) and all(isinstance(s, str) and s for s in stop),
              "stop_sequences: Input should be a list of non-empty strings")
        _need(len(stop) <= MAX_STOP_SEQUENCES, "stop_sequences: at most %d sequences, got %d"
              % (MAX_STOP_SEQUENCES, len(stop)))
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
            model=model, cli_model=cli_model, messages=messages, system=system,
            stream=bool(body.get("stream")), tools=tools, tool_choice=choice,
            parallel_tool_calls=parallel, stop=stop, effort=effort,
            max_tokens=0 if count_only else body["max_tokens"],
            thinking=think["type"] in ("enabled", "adaptive"),
            disable_thinking=think["type"] == "disabled", web_tools=tuple(web),
            json_schema=fmt["schema"] if fmt else None)

    @staticmethod
    def usage(u):
        out = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
               "cache_creation_input_tokens": u.cache_write, "cache_read_input_tokens": u.cache_read}
        if u.web_searches:
            out["server_tool_use"] = {"web_search_requests": u.web_searches}
        return out

    @staticmethod
    def search_blocks(search):
        """A web search as the API returns it: the server_tool_use block and its results."""
        return [{"type": "server_tool_use", "id": search.id, "name": "web_search",
                 "input": {"query": search.query}},
                {"type": "web_search_tool_result", "tool_use_id": search.id, "content": [
                    {"type": "web_search_result", "url": src["url"], "title": src["title"],
                     "encrypted_content": "", "page_age": None} for src in search.sources]}]

    def render(self, req, c, body):
        content = []
        if req.thinking and (c.thinking or c.signature):
            content.append({"type": "thinking", "thinking": c.thinking, "signature": c.signature})
        for search in c.searches:
            content.extend(self.search_blocks(search))
        if c.text or not c.tool_calls:
            content.append({"type": "text", "text": c.text})
        for t in c.tool_calls:
            content.append({"type": "tool_use", "id": t.id, "name": t.name,
                            "input": json.loads(t.arguments)})
        return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": req.model,
                "content": content, "stop_reason": c.stop_reason if c.stop_reason in self.STOP else "end_turn",
                "stop_sequence": c.stop_sequence, "usage": self.usage(c.usage)}

    def stream(self, req, events, sse, body):
        MessagesStream(self, req, sse, body).run(events)

    def error(self, err):
        return err.status, {"type": "error",
                            "error": {"type": err.error_type, "message": err.message}}

    def count_tokens(self, req, body):
        """An estimate (~4 bytes a token): the CLI has no token counter to ask."""
        size = len(json.dumps([body.get("system"), body.get("messages"), body.get("tools")],
                              ensure_ascii=False).encode())
        return {"input_tokens": max(1, size // 4)}


# 11. OpenAI responses ###########################################################################
# POST /v1/responses, and the state OpenAI keeps for it: stored responses (previous_response_id,
# GET, DELETE, input_items, background runs and cancel) and conversations, in the state store
# (section 12; below, "stored responses").  Tools are read by section 9's parse_openai_tools
# (function, custom, namespace; web search is the CLI's own; the other hosted tools run on
# OpenAI's servers), and the model's thinking is not returned as reasoning items.

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
        part_type = part.get("type")
        if part_type in ("input_text", "output_text"):
            _need(isinstance(part.get("text"), str), "%s.text must be a string" % at, at)
            blocks.append({"type": "text", "text": part["text"]})
        elif part_type == "refusal":              # an earlier assistant refusal, replayed as text
            _need(isinstance(part.get("refusal"), str), "%s.refusal must be a string" % at, at)
            blocks.append({"type": "text", "text": part["refusal"]})
        elif part_type == "input_image":
            _need(part.get("file_id") is None, "%s: file_id images need OpenAI's Files API; send "
                  "the image inline as image_url: \"data:image/png;base64,...\"" % at, at)
            try:
                blocks.append(image_block(part.get("image_url")))
            except BadRequest as err:            # name the part, so the client can find it
                err.param = at
                raise
        else:
            raise BadRequest("%s has unsupported type %r (supported: input_text, output_text, "
                             "refusal, input_image)" % (at, part_type), param=at)
    return blocks


def _responses_output(output, where):
    """A function_call_output's `output` (a string or parts) -> (text, image blocks)."""
    if isinstance(output, str):
        return output, []
    blocks = _responses_parts(output, where)
    text = "\n".join(b["text"] for b in blocks if b["type"] == "text")
    return text, [b for b in blocks if b["type"] == "image"]


def parse_responses_input(value, need_message=True):
    """Responses `input` (a string or a list of items) -> (system text, [Message]);
    `need_message`: at least one user or assistant message (not for conversation items)."""
    if isinstance(value, str):
        return "", [Message("user", [{"type": "text", "text": value}])]
    _need(isinstance(value, list) and (value or not need_message),
          "input must be a string or a non-empty list of items", "input")
    system, out, names = [], [], {}
    for i, item in enumerate(value):
        at = "input[%d]" % i
        _need(isinstance(item, dict), "%s must be an object" % at, at)
        item_type = item.get("type") or ("message" if "role" in item else None)
        if item_type == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                system.append(_text_of(item.get("content"), at))
            elif role in ("user", "assistant"):
                _need(item.get("content") is not None, "%s.content is required" % at, at)
                out.append(Message(role, _responses_parts(item["content"], at)))
            else:
                raise BadRequest("%s.role %r is not one of user, assistant, system, developer"
                                 % (at, role), param=at)
        elif item_type in ("function_call", "custom_tool_call"):
            use = _responses_tool_use(item, item_type, at)
            names[use["id"]] = use["name"]
            out.append(Message("assistant", [use]))
        elif item_type in ("function_call_output", "custom_tool_call_output"):
            out.append(_responses_tool_result(item, at, names))
        elif item_type in ("reasoning", "web_search_call"):
            # not replayed, as Anthropic thinking blocks are not; a search's findings are in
            # the answer that followed it
            continue
        elif item_type == "item_reference":
            raise BadRequest("%s: item references are not supported; send the item itself, or "
                             "continue a stored response with previous_response_id." % at, param=at)
        else:
            raise BadRequest("%s has unsupported type %r (supported: message, function_call, "
                             "function_call_output, custom_tool_call, custom_tool_call_output, "
                             "reasoning, web_search_call)" % (at, item_type), param=at)
    _need(out or not need_message, "input must contain at least one user or assistant message",
          "input")
    return "\n\n".join(s for s in system if s), merge_messages(out)


def _responses_tool_use(item, item_type, at):
    """A function_call or custom_tool_call item -> its tool_use block, named as the tool is
    offered (namespace.name)."""
    cid, name = item.get("call_id"), item.get("name")
    _need(isinstance(cid, str) and cid, "%s.call_id must be a non-empty string" % at, at)
    _need(isinstance(name, str) and name, "%s.name must be a non-empty string" % at, at)
    if item.get("namespace"):
        _need(isinstance(item["namespace"], str), "%s.namespace must be a string" % at, at)
        name = "%s.%s" % (item["namespace"], name)      # as the tool is offered
    if item_type == "custom_tool_call":
        _need(isinstance(item.get("input"), str), "%s.input must be a string" % at, at)
        args = {CUSTOM_INPUT: item["input"]}
    else:
        args = item.get("arguments")
        _need(isinstance(args, str), "%s.arguments must be a JSON string" % at, at)
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            args = {"_raw_arguments": args}
        if not isinstance(args, dict):
            args = {"_raw_arguments": item["arguments"]}
    return {"type": "tool_use", "id": cid, "name": name, "input": args}


def _responses_tool_result(item, at, names):
    """A function_call_output or custom_tool_call_output item -> the user Message of its
    tool_result (named after the call it answers, by `names`) and its images."""
    cid = item.get("call_id")
    _need(isinstance(cid, str) and cid, "%s.call_id must be a non-empty string" % at, at)
    _need(item.get("output") is not None, "%s.output is required" % at, at)
    text, images = _responses_output(item["output"], at)
    result = {"type": "tool_result", "tool_use_id": cid,
              "name": names.get(cid) or item.get("name"), "content": text}
    if images:                   # native tools give them back inside the result
        result["images"] = images
    return Message("user", [result] + images)


def _responses_tools(body):
    """Flat Responses tools and tool_choice -> ([ToolSpec], neutral choice)."""
    tools = parse_openai_tools(body.get("tools") or [], True)
    return parse_openai_tool_choice(body.get("tool_choice"), tools, True)


class ResponsesStream(DialectStream):
    """One streamed Response: the neutral events as OpenAI's response.* SSE events.  Output
    items open as their first event arrives and close when the next kind of event (or the
    end) comes; a failure after the status line travels as the terminal response.failed event,
    carrying what was produced so far (the SDK's stream then ends without a
    response.completed, as it does for a failure at OpenAI)."""

    def __init__(self, dialect, req, sse, body):
        super().__init__(dialect, req, sse, body)
        self.rid, self.created, self.seq = req.response_id or new_id("resp_"), int(time.time()), \
            itertools.count()
        self.output = []             #: items so far, mutated as they finish
        self.message = None          #: (item, index, part) of the message text streams into
        # self.call (DialectStream): (item, index, ToolCall) of a call whose arguments stream
        self.searches = []           #: web searches so far, cited by the text after them

    def begin(self):
        self.emit("response.created", response=self.envelope([], "in_progress"))
        self.emit("response.in_progress", response=self.envelope([], "in_progress"))

    def fail(self, err):
        if self.message is not None:
            self.message[0]["status"] = "incomplete"
        _status, detail = self.dialect.error(err)
        error = {"code": self.dialect.CODES.get(err.status, "server_error"),
                 "message": err.message, "type": detail["error"]["type"]}
        self.emit("response.failed", response=self.envelope(self.output, "failed", error=error))

    def emit(self, event_type, **fields):
        self.sse.event(dict(type=event_type, sequence_number=next(self.seq), **fields), event_type)

    def envelope(self, output, status, **more):
        return self.dialect.envelope(self.req, self.body, self.rid, self.created, output, status,
                                     **more)

    # -- items -------------------------------------------------------------------------------
    def open_message(self):
        item, part = self.dialect.message_item(None, "in_progress"), self.dialect.text_part("")
        self.output.append(item)
        index = len(self.output) - 1
        self.message = (item, index, part)
        self.emit("response.output_item.added", output_index=index, item=item)
        item["content"].append(part)
        self.emit("response.content_part.added", item_id=item["id"], output_index=index,
                  content_index=0, part=part)

    def close_message(self, status):
        (item, index, part), self.message = self.message, None
        self.dialect.annotate(part, self.searches)
        self.emit("response.output_text.done", item_id=item["id"], output_index=index,
                  content_index=0, text=part["text"], logprobs=[])
        self.emit("response.content_part.done", item_id=item["id"], output_index=index,
                  content_index=0, part=part)
        item["status"] = status
        self.emit("response.output_item.done", output_index=index, item=item)

    def close_call(self):
        # native tools stream arguments (ToolCallDelta): the item stays open until then; a
        # custom tool's raw input is inside its JSON arguments, so it is sent once complete
        (item, index, call), self.call = self.call, None
        if item["type"] == "custom_tool_call":
            item["input"] = custom_input(call.arguments)
            if item["input"]:
                self.emit("response.custom_tool_call_input.delta", item_id=item["id"],
                          output_index=index, delta=item["input"])
            self.emit("response.custom_tool_call_input.done", item_id=item["id"],
                      output_index=index, input=item["input"])
        else:
            self.emit("response.function_call_arguments.done", item_id=item["id"],
                      output_index=index, arguments=item["arguments"])
        item["status"] = "completed"
        self.emit("response.output_item.done", output_index=index, item=item)

    # -- one handler per event ---------------------------------------------------------------
    def on_text(self, ev):
        if not ev.text:
            return
        if self.message is None:
            self.open_message()
        item, index, part = self.message
        part["text"] += ev.text
        self.emit("response.output_text.delta", item_id=item["id"], output_index=index,
                  content_index=0, delta=ev.text, logprobs=[])

    def on_tool_call(self, ev):
        if self.message is not None:
            self.close_message("completed")
        item = self.dialect.call_item(self.req, ev, "in_progress")
        self.output.append(item)
        index = len(self.output) - 1
        if item["type"] == "custom_tool_call":
            self.emit("response.output_item.added", output_index=index, item=dict(item, input=""))
        else:
            self.emit("response.output_item.added", output_index=index,
                      item=dict(item, arguments=""))
            if ev.arguments:
                self.emit("response.function_call_arguments.delta", item_id=item["id"],
                          output_index=index, delta=ev.arguments)
        self.call = (item, index, ToolCall(ev.id, ev.name, ev.arguments))

    def on_tool_call_delta(self, ev):
        item, index, call = self.call
        call.arguments += ev.arguments
        if item["type"] == "function_call":
            item["arguments"] += ev.arguments
            self.emit("response.function_call_arguments.delta", item_id=item["id"],
                      output_index=index, delta=ev.arguments)

    def on_web_search(self, ev):
        if self.message is not None:
            self.close_message("completed")
        self.searches.append(ev)
        item, index = self.dialect.search_item(ev, "in_progress"), len(self.output)
        self.output.append(item)
        self.emit("response.output_item.added", output_index=index, item=dict(item))
        for phase in ("in_progress", "searching", "completed"):
            self.emit("response.web_search_call.%s" % phase, item_id=item["id"], output_index=index)
        item["status"] = "completed"
        self.emit("response.output_item.done", output_index=index, item=item)

    def on_done(self, ev):
        status = self.dialect.status_of(ev.stop_reason)
        if self.message is None and not self.output:
            self.open_message()          # an empty answer is still one message
        if self.message is not None:
            self.close_message(status)
        self.emit("response.%s" % status, response=self.envelope(
            self.output, status, usage=ev.usage, stop_reason=ev.stop_reason))

    EVENTS = {TextDelta: on_text, ToolCall: on_tool_call, ToolCallDelta: on_tool_call_delta,
              WebSearch: on_web_search, Heartbeat: DialectStream.on_heartbeat, Done: on_done}


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
        # previous_response_id, conversation, store and background: StatefulResponses.prepare,
        # which puts the stored items ahead of the new ones in `input`
        _need(body.get("prompt") is None, "prompt templates are stored by OpenAI and not "
              "available here; send instructions and input instead.", "prompt")
        _need(body.get("metadata") is None or isinstance(body["metadata"], dict),
              "metadata must be an object", "metadata")
        instructions = body.get("instructions")
        _need(instructions is None or isinstance(instructions, str),
              "instructions must be a string", "instructions")
        _need("input" in body, "input is required", "input")
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
        schema = _openai_schema(text.get("format"), "text.format", flat=True)
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
            max_tokens=max_tokens or 0, disable_thinking=effort == "none",
            web_tools=openai_web_tools(body), json_schema=schema)

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

    @staticmethod
    def annotate(part, searches):
        part["annotations"] = [{"type": "url_citation", "start_index": start, "end_index": end,
                                "url": url, "title": title}
                               for start, end, url, title in url_citations(part["text"], searches)]

    @staticmethod
    def search_item(search, status):
        return {"id": "ws_" + search.id[len("srvtoolu_"):], "type": "web_search_call",
                "status": status, "action": {"type": "search", "query": search.query,
                                             "sources": [{"type": "url", "url": src["url"]}
                                                         for src in search.sources]}}

    def message_item(self, text, status):
        return {"id": new_id("msg_"), "type": "message", "status": status, "role": "assistant",
                "content": [self.text_part(text)] if text is not None else []}

    @staticmethod
    def call_item(req, call, status):
        """The output item of a tool call: a function_call (with its namespace, if it came in
        one), or a custom_tool_call carrying the raw input."""
        spec = tool_spec(req, call.name)
        if spec is not None and spec.tool_type == "custom":
            item = {"id": new_id("ctc_"), "type": "custom_tool_call", "status": status,
                    "call_id": call.id, "name": spec.client_name,
                    "input": custom_input(call.arguments)}
        else:
            item = {"id": new_id("fc_"), "type": "function_call", "status": status,
                    "arguments": call.arguments, "call_id": call.id,
                    "name": spec.client_name if spec is not None else call.name}
        if spec is not None and spec.namespace:
            item["namespace"] = spec.namespace
        return item

    def envelope(self, req, body, rid, created, output, status, usage=None, stop_reason=None,
                 error=None):
        """The Response object around `output`, as create returns it and stream events carry."""
        reason = self.INCOMPLETE.get(stop_reason) if status == "incomplete" else None
        choice, conversation = req.tool_choice, body.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        return {
            "id": rid, "object": "response", "created_at": created, "status": status,
            "background": bool(body.get("background")),
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": reason} if reason else None,
            "instructions": body.get("instructions"), "max_output_tokens": req.max_tokens or None,
            "max_tool_calls": None, "metadata": body.get("metadata") or {}, "model": req.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": body.get("previous_response_id"),
            "conversation": {"id": conversation} if conversation else None,
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "store": bool(req.response_id), "temperature": body.get("temperature"),
            "text": dict((body.get("text") or {}),
                         format=(body.get("text") or {}).get("format") or {"type": "text"}),
            "tool_choice": {"type": "function", "name": choice["name"]} if isinstance(choice, dict)
            else choice,
            # strict: arguments are parsed from the model's text, not constrained to the schema
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p"), "truncation": body.get("truncation") or "disabled",
            "usage": self.usage(usage) if usage is not None else None, "user": body.get("user")}

    def status_of(self, stop_reason):
        return "incomplete" if stop_reason in self.INCOMPLETE else "completed"

    def render(self, req, c, body):
        status = self.status_of(c.stop_reason)
        output = [self.search_item(s, "completed") for s in c.searches]
        if c.text or not c.tool_calls:
            output.append(self.message_item(c.text, status))
            self.annotate(output[-1]["content"][0], c.searches)
        output += [self.call_item(req, t, "completed") for t in c.tool_calls]
        return self.envelope(req, body, req.response_id or new_id("resp_"), int(time.time()),
                             output, status, c.usage, c.stop_reason)

    def stream(self, req, events, sse, body):
        ResponsesStream(self, req, sse, body).run(events)


# -- stored responses, conversations and background runs -------------------------------------
# With the state store open (section 12), a response is saved unless `store` is false, and a
# later request continues it by previous_response_id, or a conversation by its id: the stored
# items come first in the request's input.  The continued conversation then hashes as the one
# its kept CLI process holds (conversation_hash), so when that process is still idle the new
# turn goes to it with only the new items; otherwise the items are replayed as real turns into
# another process.  `instructions` are not inherited, as at OpenAI: a request with other
# instructions or tools hashes differently and is answered by another process.
# A stored id carries the name of the instance that made it (resp_<instance>_...), so several
# instances behind one address can route by it; another instance's id is a 404 that says so.

#: id prefixes of stored items by type (an item the client sent with an id keeps it)
ITEM_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_",
                 "custom_tool_call": "ctc_", "custom_tool_call_output": "ctco_",
                 "web_search_call": "ws_", "reasoning": "rs_"}
MAX_ADDED_ITEMS = 20                # items one conversations call may add, as at OpenAI
UNFINISHED = ("queued", "in_progress")
TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")
RESTARTED = ("The proxy restarted while this background response was running, so it did not "
             "finish; create it again.")
#: background runs live at once beyond CLAUDE_PROXY_MAX_CONCURRENCY (each is a thread waiting
#: for a slot); past that a background create is a 429.  With keys, one key may hold at most
#: half of them, so one client cannot take every place.
BACKGROUND_QUEUE = 8
ENDED_UNFINISHED = ("This background response stopped before it finished (an internal error, or "
                    "the state store failed; the proxy's log says which); create it again.")


def stored_id(prefix, instance):
    return "%s%s_%s" % (prefix, instance, new_id("", 24))


def stored_items(value):
    """Responses `input` (validated) as stored items: a string becomes a user message, a
    message's string content a list of parts, and each item gets an id unless it has one."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    out = []
    for item in value:
        item = dict(item)
        item["type"] = item_type = item.get("type") or "message"
        if item_type == "message":
            assistant = item.get("role") == "assistant"
            content = item.get("content")
            if isinstance(content, str):
                content = [{"type": "output_text" if assistant else "input_text", "text": content}]
            item["content"] = [dict(p, annotations=p.get("annotations") or [])
                               if p.get("type") == "output_text" else p for p in content]
            item.setdefault("status", "completed")
        if not isinstance(item.get("id"), str) or not item["id"]:
            item["id"] = new_id(ITEM_PREFIXES.get(item_type, "item_"))
        out.append(item)
    return out


@dataclass
class StoredTurn:
    """A create request's stateful side (StatefulResponses.prepare)."""
    input: list                  # what the dialect parses: the stored items, then the new ones
    new: list                    # the request's own items, as stored
    rid: str                     # the new response's id when it is stored, else ""
    owner: str
    background: bool = False


class SavingSSE:
    """The encoder's SSE for a stored response.  It is saved in_progress at response.created
    (the client has its id from then on), and its end before the client sees it, so a request
    chained right after it finds it; a stream that stops before its end (the client left) is
    kept as it stood, incomplete (close)."""

    def __init__(self, sse, state, turn, body):
        self.sse, self.state, self.turn, self.body = sse, state, turn, body
        self.response = None         #: the in_progress response saved at response.created
        self.output = {}             #: output_index -> the items done so far
        self.ended = False

    def event(self, data, name=None):
        if name == "response.created" and self.turn.rid:
            self.response = data["response"]
            self.state.finish(self.turn, self.body, self.response)
        elif name == "response.output_item.done":
            self.output[data["output_index"]] = data["item"]
        elif name in TERMINAL_EVENTS:
            self.ended = True
            self.state.finish(self.turn, self.body, data["response"])
        self.sse.event(data, name)

    def comment(self, text):
        self.sse.comment(text)

    def close(self):
        if self.response is None or self.ended:
            return
        try:
            self.state.update(self.turn.rid, dict(
                self.response, status="incomplete",
                output=[self.output[i] for i in sorted(self.output)]))
        except ProxyError:
            pass                         # logged and counted by the store


def list_page(items, query, key="id"):
    """One page of `items` (oldest first) as OpenAI lists them: limit (1-100, default 20),
    order (desc by default), after / before (an id of the list)."""
    def one(name):
        values = query.get(name) or [None]
        return values[-1]
    limit = one("limit") or "20"
    # isdigit() alone takes "²" and other digits int() refuses, and int() refuses 4,300 digits
    _need(limit.isascii() and limit.isdigit() and len(limit) <= 3 and 1 <= int(limit) <= 100,
          "limit must be an integer from 1 to 100", "limit")
    order = one("order") or "desc"
    _need(order in ("asc", "desc"), "order must be asc or desc", "order")
    seq = list(items) if order == "asc" else list(reversed(items))
    ids = [it[key] for it in seq]
    lo, hi = 0, len(seq)
    for name in ("after", "before"):
        mark = one(name)
        if mark is not None:
            _need(mark in ids, "%s: no item %r in this list" % (name, mark), name)
            if name == "after":
                lo = ids.index(mark) + 1
            else:
                hi = ids.index(mark)
    window = seq[lo:hi]
    limit = int(limit)
    data = window[-limit:] if one("before") is not None and one("after") is None else window[:limit]
    return {"object": "list", "data": data, "first_id": data[0][key] if data else None,
            "last_id": data[-1][key] if data else None, "has_more": len(window) > len(data)}


def check_metadata(value, where="metadata"):
    if value is None:
        return {}
    _need(isinstance(value, dict) and len(value) <= 16,
          "%s must be an object of at most 16 pairs" % where, where)
    for k, v in value.items():
        _need(len(k) <= 64 and isinstance(v, str) and len(v) <= 512,
              "%s: keys are at most 64 characters, values strings of at most 512" % where, where)
    return value


class BackgroundRun:
    """A background response running in the proxy.  It is the turn's call (as Call: the
    deadline, and a client that is gone once it is cancelled) and the stream encoder's SSE (the
    events are kept here for followers: the creating request when it streams, and GET
    ?stream=true)."""

    def __init__(self, rid, deadline_seconds, owner=""):
        self.rid, self.timeout, self.owner = rid, deadline_seconds, owner
        self.deadline = time.monotonic() + deadline_seconds
        self.events = []             # the encoder's events, sequence_number = index
        self.cond = threading.Condition()
        self.finished = self.cancelled = False
        self.response = None         # the response object as it stands
        self.queued = None           # the response as the create request stored it
        self.save = None             # save(response, events) -> saved?: before a terminal event
        self.saved = False           # the run's end (a terminal event, a cancel) was saved

    def check(self):
        if self.cancelled:
            raise ClientGone()
        if time.monotonic() > self.deadline:
            raise Timeout("The background response took longer than CLAUDE_PROXY_TIMEOUT (%gs)."
                          % self.timeout)

    maybe_check = check

    def event(self, data, name=None):
        if name in TERMINAL_EVENTS and self.save is not None:
            self.saved = self.save(data["response"], self.events + [data])
        with self.cond:
            self.events.append(data)
            if isinstance(data.get("response"), dict):
                self.response = data["response"]
            self.cond.notify_all()

    def comment(self, text):
        pass                         # followers send their own keep-alives

    def finish(self):
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def follow(self, after):
        """The events after sequence number `after` as they come; None while none comes for
        HEARTBEAT_SECONDS (a keep-alive is due), until the run is over."""
        i = after + 1
        while True:
            with self.cond:
                if i >= len(self.events) and not self.finished:
                    self.cond.wait(HEARTBEAT_SECONDS)
                fresh, done = self.events[i:], self.finished
            i += len(fresh)
            yield from fresh or ((None,) if not done else ())
            if done and i >= len(self.events):
                return


class StatefulResponses:
    """Stored responses, conversations and background runs, on the App's state store."""

    def __init__(self, app):
        self.app, self.store = app, app.store
        self.instance = app.cfg.instance or default_instance(app.cfg.port)
        self.runs = {}               # response id -> BackgroundRun, while it runs
        self.lock = threading.Lock()
        if self.store.enabled:
            self._fail_unfinished()

    # -- ids, owners -----------------------------------------------------------------------
    @staticmethod
    def owner(principal):
        """Whose stored state this is: from the digest of the request's key, or "" when the
        proxy has no keys (one owner)."""
        if not principal.digest:
            return ""
        return hashlib.sha256(b"claude-proxy owner:" + principal.digest).hexdigest()[:32]

    def new_id(self, prefix):
        return stored_id(prefix, self.instance)

    def not_found(self, what, id_, param=None):
        """NotFound for an id this owner cannot see; one another instance made says so."""
        parts = id_.split("_") if isinstance(id_, str) else []
        if len(parts) >= 3 and parts[1] != self.instance and re.fullmatch(r"[a-z0-9]{1,32}", parts[1]):
            return NotFound("%s with id '%s' was made by claude-proxy instance '%s'; this is "
                            "instance '%s'. Send requests for it to that instance (README: "
                            "Several instances)." % (what, id_, parts[1], self.instance),
                            param=param, code="not_found_elsewhere")
        return NotFound("%s with id '%s' not found." % (what, id_), param=param, code="not_found")

    # -- responses ---------------------------------------------------------------------------
    def prepare(self, body, principal):
        """The stateful side of a create request (a StoredTurn); a 404 for a previous response
        or conversation this key cannot see."""
        _need(isinstance(body, dict), "The request body must be a JSON object")
        prev, conv = body.get("previous_response_id"), body.get("conversation")
        store, background = body.get("store", True), body.get("background", False)
        _need(isinstance(store, bool) or store is None, "store must be true or false", "store")
        _need(isinstance(background, bool) or background is None,
              "background must be true or false", "background")
        _need(prev is None or (isinstance(prev, str) and prev),
              "previous_response_id must be a response id", "previous_response_id")
        if isinstance(conv, dict):
            conv = conv.get("id")
        _need(conv is None or (isinstance(conv, str) and conv),
              "conversation must be a conversation id or {\"id\": ...}", "conversation")
        _need(prev is None or conv is None, "previous_response_id and conversation cannot be "
              "used together", "conversation")
        _need(not background or store is not False, "background responses must be stored: "
              "drop store: false", "background")
        _need("input" in body, "input is required", "input")
        parse_responses_input(body["input"])             # errors index the request's own input
        stored = store is not False and self.store.enabled
        if prev is not None or conv is not None or background:
            self.store.require()
        owner = self.owner(principal)
        earlier = self.chain(prev, owner) if prev is not None else \
            self.conversation_items(conv, owner, "conversation") if conv is not None else []
        new = stored_items(body["input"])
        return StoredTurn(earlier + new, new, self.new_id("resp_") if stored else "", owner,
                          bool(background))

    def chain(self, rid, owner):
        """The items of a stored response's conversation: each earlier response's input and
        output, oldest first (one query)."""
        rows = self.store.read(
            "WITH RECURSIVE chain(id, prev, input, body, status, depth) AS ("
            " SELECT id, previous_response_id, input, body, status, 0 FROM responses"
            " WHERE id = ? AND owner = ?"
            " UNION ALL SELECT r.id, r.previous_response_id, r.input, r.body, r.status, c.depth + 1"
            " FROM responses r JOIN chain c ON r.id = c.prev WHERE r.owner = ?)"
            " SELECT id, prev, input, body, status FROM chain ORDER BY depth DESC",
            (rid, owner, owner))
        if not rows:
            raise self.not_found("Previous response", rid, "previous_response_id")
        if rows[-1][4] in UNFINISHED:
            raise BadRequest("Previous response '%s' is still %s; wait for it to finish."
                             % (rid, rows[-1][4]), param="previous_response_id")
        if rows[0][1] is not None:
            raise NotFound("Response '%s', earlier in this chain, was deleted or has expired; "
                           "its conversation cannot be continued." % rows[0][1],
                           param="previous_response_id", code="not_found")
        items = []
        for _id, _prev, input_, body, _status in rows:
            items += json.loads(input_) + json.loads(body)["output"]
        return items

    def save(self, rid, owner, body, new, response, events=None, stored=True):
        """The finished (or queued) response, and for a conversation the turn's items, in one
        transaction."""
        conv = body.get("conversation")
        conv = conv.get("id") if isinstance(conv, dict) else conv
        input_, out = json.dumps(new, ensure_ascii=False), json.dumps(response, ensure_ascii=False)
        evs = json.dumps(events, ensure_ascii=False) if events is not None else None

        def steps(db):
            if stored:
                db.execute("INSERT OR REPLACE INTO responses (id, owner, created_at, status, "
                           "background, previous_response_id, conversation_id, input, body, "
                           "request, events, bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '{}', ?, ?)",
                           (rid, owner, time.time(), response["status"],
                            int(bool(body.get("background"))), body.get("previous_response_id"),
                            conv, input_, out, evs, len(input_) + len(out) + len(evs or "")))
            # a conversation deleted while the turn ran keeps nothing; the response is saved
            if conv and response["status"] in ("completed", "incomplete") and db.execute(
                    "SELECT 1 FROM conversations WHERE id = ?", (conv,)).fetchone():
                self._append(db, conv, new + response["output"])
        self.store.write(steps)

    def finish(self, turn, body, response, events=None):
        """Save a finished response (and a conversation's new items); whether it was saved.  A
        failure to save is logged and counted by the store; the client still gets its answer."""
        if not turn.rid and not body.get("conversation"):
            return True
        try:
            self.save(turn.rid, turn.owner, body, turn.new, response, events,
                      stored=bool(turn.rid))
        except StoreUnavailable:
            return False
        return True

    def run_background(self, run, req, body, turn, pinned, me, figures):
        """The body of a background run's thread: queued until its first event, in_progress,
        then what the encoder's terminal event says; cancelled when the run is.  `figures` (a
        copy of the creating request's Call) takes the run's usage, time to first token and
        status, recorded at its end as a model request's are (metrics, request log, usage
        history) and charged to the key's token budget."""
        dialect, created = DIALECTS["responses"], int(time.time())
        run.save = lambda response, events: self.finish(turn, body, response, events)

        def noted(events):
            try:
                yield from events
            except ProxyError as err:
                figures.status = err.status
                raise

        def failing(err):
            raise err
            yield                        # a generator: the encoder's events end in `err`
        source = model_events(self.app, req, run, pinned, me)
        try:
            try:
                events = first_then(observe(figures, noted(source)))
            except ProxyError as err:
                figures.status = err.status
                # response.created, then response.failed (saved with its events): a follower
                # and a later GET ?stream=true see why, as for a failure after the first event
                dialect.stream(req, failing(err), run, body)
                return
            self.update(turn.rid, dialect.envelope(req, body, turn.rid, created, [], "in_progress"))
            dialect.stream(req, events, run, body)
        except ClientGone:
            figures.status = ClientGone.status
            run.response = dict(run.response or run.queued, status="cancelled")
            run.saved = self.finish(turn, body, run.response, run.events)
        finally:
            source.close()
            self.app.budgets.done(me, budget_tokens(figures.usage))
            ended = (run.response or {}).get("status") in ("completed", "incomplete")
            figures.status = figures.status or (200 if ended else 500)
            self.app.metrics.request(figures.route.path, figures.status, figures.usage)
            record(figures)

    def update(self, rid, response, events=None):
        out = json.dumps(response, ensure_ascii=False)
        evs = json.dumps(events, ensure_ascii=False) if events is not None else None
        self.store.write(lambda db: db.execute(
            "UPDATE responses SET status = ?, body = ?, events = COALESCE(?, events), "
            "bytes = length(input) + ? + COALESCE(length(?), 0) WHERE id = ?",
            (response["status"], out, evs, len(out), evs, rid)))

    def row(self, rid, owner, columns="body"):
        rows = self.store.read("SELECT %s FROM responses WHERE id = ? AND owner = ?" % columns,
                               (rid, owner))
        if not rows:
            raise self.not_found("Response", rid)
        return rows[0]

    def get(self, rid, owner):
        with self.lock:
            run = self.runs.get(rid)
        body = json.loads(self.row(rid, owner)[0])
        return run.response if run is not None and run.response is not None else body

    def delete(self, rid, owner):
        self.row(rid, owner, "id")
        with self.lock:
            run = self.runs.get(rid)
        if run is not None:
            self.cancel(rid, owner)
            with self.lock:
                self.runs.pop(rid, None)         # one kept because its end was not saved
        self.store.write(lambda db: db.execute("DELETE FROM responses WHERE id = ?", (rid,)))
        return {"id": rid, "object": "response", "deleted": True}

    def input_items(self, rid, owner, query):
        return list_page(json.loads(self.row(rid, owner, "input")[0]), query)

    def events(self, rid, owner, after):
        """A stored response's events after `after`: a background run's own (live while it
        runs), or for another response the few events that rebuild it."""
        body, events = self.row(rid, owner, "body, events")
        with self.lock:
            run = self.runs.get(rid)
        if run is not None:
            return run.follow(after)
        if events is not None:
            return iter(json.loads(events)[after + 1:])
        r = json.loads(body)
        evs = [{"type": "response.created", "response": dict(r, status="in_progress", output=[],
                                                             usage=None)},
               {"type": "response.in_progress",
                "response": dict(r, status="in_progress", output=[], usage=None)}]
        for i, item in enumerate(r["output"]):
            evs.append({"type": "response.output_item.added", "output_index": i, "item": item})
            evs.append({"type": "response.output_item.done", "output_index": i, "item": item})
        evs.append({"type": "response.%s" % r["status"], "response": r})
        return iter([dict(e, sequence_number=n) for n, e in enumerate(evs)][after + 1:])

    # -- background runs -----------------------------------------------------------------------
    def reserve(self, run):
        """Take a place for `run` among the live runs (BACKGROUND_QUEUE), or a 429."""
        total = self.app.cfg.max_concurrency + BACKGROUND_QUEUE
        with self.lock:
            live = [r for r in self.runs.values() if not r.finished]
            mine = sum(r.owner == run.owner for r in live)
            if len(live) >= total or (run.owner and mine >= max(1, total // 2)):
                raise RateLimited(
                    "Too many background responses are running or queued (%s); wait for one "
                    "to finish or cancel one." % (
                        "%d for this key" % mine if run.owner and len(live) < total
                        else "%d on this proxy" % len(live)),
                    code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.runs[run.rid] = run

    def release(self, run):
        with self.lock:
            self.runs.pop(run.rid, None)

    def start(self, run, work):
        """Run `work` in a thread of its own (`run` reserved); a thread that cannot start is a
        503 and leaves nothing held."""
        self.app.enter()                   # a graceful shutdown waits for it, as for a request

        def main():
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - a thread's traceback would reach the log
                log_line("background response %s ended in an internal error: %s: %s"
                         % (run.rid, type(exc).__name__, exc))
            finally:
                if self.settle(run):
                    self.release(run)
                run.finish()
                self.app.leave()
        try:
            threading.Thread(target=main, name="background " + run.rid, daemon=True).start()
        except RuntimeError as exc:        # "can't start new thread": out of threads or memory
            self.app.leave()
            raise Overloaded("The proxy could not start the background response (%s); try "
                             "again later." % exc, headers={"Retry-After": "5"})

    def settle(self, run):
        """After a run's thread: True once its end is stored.  A run that ended unfinished (an
        internal error, a store that failed before its end) is failed, and saved so; a run whose
        end could not be saved stays in `runs` with that end, so GET serves it, not a stale
        queued or in_progress row (until a restart marks that row failed)."""
        if run.response is None or run.response["status"] in UNFINISHED:
            run.response = dict(run.response or run.queued, status="failed",
                                error={"code": "server_error", "message": ENDED_UNFINISHED})
            try:
                self.update(run.rid, run.response, run.events)
                run.saved = True
            except ProxyError:
                run.saved = False
        return run.saved

    def cancel(self, rid, owner):
        """Stop a background run (its CLI turn ends: the Call's client is gone); the response
        as it stands.  A finished one is returned as it is."""
        body, background = self.row(rid, owner, "body, background")
        if not background:
            raise BadRequest("Only background responses can be cancelled.", param="response_id")
        with self.lock:
            run = self.runs.get(rid)
        if run is None:
            return json.loads(body)
        run.cancelled = True
        with run.cond:
            while not run.finished:
                run.cond.wait(POLL_SECONDS)
        return self.get(rid, owner)

    def _fail_unfinished(self):
        """At start-up: this instance's background responses that were running when it stopped
        will not finish; say so."""
        rows = self.store.read("SELECT id, body FROM responses WHERE status IN ('queued', "
                               "'in_progress') AND substr(id, 1, ?) = ?",
                               (len(self.instance) + 6, "resp_%s_" % self.instance))
        for rid, body in rows:
            r = dict(json.loads(body), status="failed",
                     error={"code": "server_error", "message": RESTARTED})
            self.update(rid, r)
        if rows:
            log_line("%d background response(s) were running when the proxy stopped; marked "
                     "failed" % len(rows))

    # -- conversations -----------------------------------------------------------------------
    def conversation(self, cid, owner, param=None):
        rows = self.store.read("SELECT id, created_at, metadata FROM conversations "
                               "WHERE id = ? AND owner = ?", (cid, owner))
        if not rows:
            raise self.not_found("Conversation", cid, param)
        return {"id": cid, "object": "conversation", "created_at": int(rows[0][1]),
                "metadata": json.loads(rows[0][2])}

    def conversation_items(self, cid, owner, param=None):
        self.conversation(cid, owner, param)
        return [json.loads(r[0]) for r in self.store.read(
            "SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY seq", (cid,))]

    def _append(self, db, cid, items):
        """Add items at the end of a conversation (inside a write); an id already in it is
        replaced by a new one."""
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM conversation_items "
                         "WHERE conversation_id = ?", (cid,)).fetchone()[0]
        taken = {r[0] for r in db.execute("SELECT item_id FROM conversation_items "
                                          "WHERE conversation_id = ?", (cid,))}
        added = []
        for item in items:
            if item["id"] in taken:
                item = dict(item, id=new_id(ITEM_PREFIXES.get(item.get("type"), "item_")))
            taken.add(item["id"])
            seq += 1
            text = json.dumps(item, ensure_ascii=False)
            db.execute("INSERT INTO conversation_items VALUES (?, ?, ?, ?, ?)",
                       (cid, seq, item["id"], text, len(text)))
            added.append(item)
        db.execute("UPDATE conversations SET used_at = ? WHERE id = ?", (time.time(), cid))
        return added

    def _new_items(self, items):
        _need(isinstance(items, list) and len(items) <= MAX_ADDED_ITEMS,
              "items must be a list of at most %d items" % MAX_ADDED_ITEMS, "items")
        if not items:
            return []
        parse_responses_input(items, need_message=False)
        return stored_items(items)

    def create_conversation(self, body, owner):
        body = body if body is not None else {}
        _need(isinstance(body, dict), "The request body must be a JSON object")
        metadata = check_metadata(body.get("metadata"))
        items = self._new_items(body.get("items") or [])
        cid, now = self.new_id("conv_"), time.time()
        meta = json.dumps(metadata, ensure_ascii=False)

        def steps(db):
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
                       (cid, owner, now, now, meta, len(meta)))
            self._append(db, cid, items)
        self.store.write(steps)
        return self.conversation(cid, owner)

    def update_conversation(self, cid, body, owner):
        self.conversation(cid, owner)
        _need(isinstance(body, dict) and "metadata" in body, "metadata is required", "metadata")
        meta = json.dumps(check_metadata(body["metadata"]), ensure_ascii=False)
        self.store.write(lambda db: db.execute(
            "UPDATE conversations SET metadata = ?, bytes = ?, used_at = ? WHERE id = ?",
            (meta, len(meta), time.time(), cid)))
        return self.conversation(cid, owner)

    def delete_conversation(self, cid, owner):
        self.conversation(cid, owner)
        self.store.write(lambda db: db.execute("DELETE FROM conversations WHERE id = ?", (cid,)))
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    def add_items(self, cid, body, owner):
        self.conversation(cid, owner)
        _need(isinstance(body, dict) and "items" in body, "items is required", "items")
        items = self._new_items(body["items"])
        _need(items, "items must not be empty", "items")
        added = self.store.write(lambda db: self._append(db, cid, items))
        return {"object": "list", "data": added, "first_id": added[0]["id"],
                "last_id": added[-1]["id"], "has_more": False}

    def item(self, cid, item_id, owner):
        self.conversation(cid, owner)
        rows = self.store.read("SELECT item FROM conversation_items WHERE conversation_id = ? "
                               "AND item_id = ?", (cid, item_id))
        if not rows:
            raise NotFound("Item with id '%s' not found in conversation '%s'." % (item_id, cid),
                           code="not_found")
        return json.loads(rows[0][0])

    def delete_item(self, cid, item_id, owner):
        self.item(cid, item_id, owner)
        self.store.write(lambda db: db.execute(
            "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ?",
            (cid, item_id)))
        return self.conversation(cid, owner)


DIALECTS = {"openai": OpenAIChat(), "anthropic": AnthropicMessages(),
            "responses": OpenAIResponses()}


# 12. State store ################################################################################
# The one place state outlives a request: one SQLite file (stdlib sqlite3) in the state
# directory.  Stored responses and conversations (section 11) and the usage history (below)
# live here; the schema grows by
# appending to MIGRATIONS.  A store that cannot be opened costs the stateful features only: the
# proxy still serves, and those routes answer 503 with the reason.

#: schema scripts, applied in order at open inside one transaction each; PRAGMA user_version is
#: how many have been applied.  Append only: a released script never changes (a file it wrote
#: would no longer match), a change is a new script.
MIGRATIONS = [
    # 1: stored responses and conversations (the Responses API, issue 23).  `owner` is the
    # digest of the key that made the row ("" when the proxy has no keys); `bytes` is what the
    # size cap counts; times are Unix seconds.
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        status TEXT NOT NULL,
        background INTEGER NOT NULL DEFAULT 0,
        previous_response_id TEXT,
        conversation_id TEXT,
        input TEXT NOT NULL,            -- JSON list: the input items this request added
        body TEXT NOT NULL,             -- JSON: the response object as GET returns it
        request TEXT NOT NULL,          -- JSON: what a continuation needs (model, tools, ...)
        events TEXT,                    -- JSON list: a background stream's events, for replay
        bytes INTEGER NOT NULL
    );
    CREATE INDEX responses_created ON responses(created_at);
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        used_at REAL NOT NULL,
        metadata TEXT NOT NULL,
        bytes INTEGER NOT NULL
    );
    CREATE INDEX conversations_used ON conversations(used_at);
    CREATE TABLE conversation_items (
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        item_id TEXT NOT NULL,
        item TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, seq)
    );
    CREATE UNIQUE INDEX conversation_items_id ON conversation_items(conversation_id, item_id);
    """,
]

STORE_FILE = "claude-proxy.db"
SWEEP_SECONDS = 600.0             # retention and the size cap are enforced this often,
SWEEP_WRITES = 200                # and after this many writes


class StoreUnavailable(ProxyError):
    """The state store is off or could not be opened: stateful routes cannot answer."""
    status, error_type = 503, "api_error"


def default_state_dir(environ):
    """$XDG_STATE_HOME/claude-proxy, else ~/.local/state/claude-proxy (the XDG base dirs)."""
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "claude-proxy")


class StateStore:
    """One SQLite file, WAL mode, one connection behind a lock.  Every write is one
    transaction, so a crash at any point leaves each row whole or absent.  `error` says why
    the store is unusable (None when open); `lost` counts writes that failed after opening."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = cfg.state_dir or default_state_dir(cfg.environ)
        self.path = None if cfg.store == "off" else os.path.join(self.dir, STORE_FILE)
        self.db = None
        self.error = "the state store is off (CLAUDE_PROXY_STORE=off)" if self.path is None else None
        self.lost = 0
        self.lock = threading.Lock()
        self._next_sweep, self._writes = 0.0, 0
        if self.path is not None:
            try:
                self.db = self._open()
            except (OSError, sqlite3.Error) as exc:
                self.error = "the state store %s cannot be opened: %s" % (self.path, exc)
                log_line(self.error + "; stored responses and conversations are unavailable, "
                         "everything else is served")
            else:
                self.sweep()

    def _open(self):
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))   # 0600 before sqlite sees it
        db = sqlite3.connect(self.path, timeout=self.cfg.store_busy_timeout, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise sqlite3.DatabaseError("it was written by a newer claude-proxy (schema %d, "
                                            "this one knows %d)" % (version, len(MIGRATIONS)))
            for n in range(version, len(MIGRATIONS)):
                try:        # one transaction: a failed migration leaves the previous schema
                    db.executescript("BEGIN IMMEDIATE;\n%s;\nPRAGMA user_version = %d;\nCOMMIT;"
                                     % (MIGRATIONS[n], n + 1))
                except sqlite3.Error:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        return db

    @property
    def enabled(self):
        return self.db is not None

    def require(self):
        """Raise StoreUnavailable unless the store is open (a 400 when the operator turned it
        off: asking again will not help)."""
        if self.path is None:
            raise StoreUnavailable("Stored responses and conversations are off on this proxy "
                                   "(CLAUDE_PROXY_STORE=off): send the whole conversation in "
                                   "input, without previous_response_id, conversation or "
                                   "background.", status=400, error_type="invalid_request_error")
        if self.db is None:
            raise StoreUnavailable("Stored responses and conversations are unavailable: %s."
                                   % self.error)

    def read(self, sql, args=()):
        """All rows of one query (a list of tuples)."""
        self.require()
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def _transaction(self, steps):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = steps(self.db)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:       # some errors (disk full) roll back themselves
                    self.db.execute("ROLLBACK")
                raise
            return result

    def write(self, steps):
        """Run `steps(db)` as one transaction; its result, or StoreUnavailable (counted in
        `lost`) when the write fails.  Sweeps when one is due."""
        self.require()
        try:
            result = self._transaction(steps)
        except sqlite3.Error as exc:
            self.lost += 1
            log_line("state store write failed: %s" % exc)
            raise StoreUnavailable("The state store could not save this: %s." % exc)
        self._writes += 1
        if self._writes % SWEEP_WRITES == 0 or time.monotonic() >= self._next_sweep:
            self.sweep()
        return result

    def size(self):
        """Bytes held, as the size cap counts them."""
        return sum(self.read("SELECT COALESCE(SUM(bytes), 0) FROM %s" % t)[0][0]
                   for t in ("responses", "conversations", "conversation_items"))

    def sweep(self, now=None):
        """Retention, then the size cap: rows older than CLAUDE_PROXY_STORE_DAYS go; while more
        than CLAUDE_PROXY_STORE_MAX_MB is held, the least recently made or used go first."""
        if self.db is None:
            return
        now = time.time() if now is None else now
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        cutoff, cap = now - self.cfg.store_days * 86400, self.cfg.store_max_mb * 2 ** 20

        def steps(db):
            db.execute("DELETE FROM responses WHERE created_at < ? AND status NOT IN "
                       "('queued', 'in_progress')", (cutoff,))
            db.execute("DELETE FROM conversations WHERE used_at < ?", (cutoff,))
            stored = sum(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM %s" % t).fetchone()[0]
                         for t in ("responses", "conversations", "conversation_items"))
            while stored > cap:
                oldest = db.execute(
                    "SELECT 'responses', id, bytes, created_at FROM responses "
                    "WHERE status NOT IN ('queued', 'in_progress') "
                    "UNION ALL SELECT 'conversations', c.id, c.bytes + COALESCE((SELECT "
                    "SUM(bytes) FROM conversation_items i WHERE i.conversation_id = c.id), 0), "
                    "c.used_at FROM conversations c ORDER BY 4 LIMIT 64").fetchall()
                if not oldest:
                    break
                for table, id_, size, _at in oldest:
                    db.execute("DELETE FROM %s WHERE id = ?" % table, (id_,))
                    stored -= size
                    if stored <= cap:
                        break

        try:
            self._transaction(steps)
        except sqlite3.Error as exc:
            self.lost += 1
            log_line("state store housekeeping failed: %s" % exc)

    def report(self):
        """/health's view: where, open or why not, failed writes (no contents)."""
        return {"enabled": self.enabled, "path": self.path, "error": self.error,
                "lost_writes": self.lost}

    def close(self):
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None
                self.error = "the state store is closed"


# -- usage history (issue 24): per-request figures, hourly and daily rollups ----------------------
# Written by one thread from a bounded queue, so a request never waits for the disk; a write
# that fails (disk full, file locked, store not open) or a full queue loses those rows, counted
# in `lost` (/metrics, the dashboard).  Never text: times, names, token counts, status.

#: API prices in USD per million tokens (input, 5-minute cache write, cache read, output), by
#: model id prefix; a bare family (opus, sonnet, haiku) is its newest model, the CLI's alias.
#: Source: Anthropic's pricing page https://platform.claude.com/docs/en/about-claude/pricing
#: and the model overview pages (claude-opus-5-5, claude-sonnet-5-5, claude-haiku-5-5), read
#: 2026-12-03.  Haiku 5.5 is its price for prompts up to 100k tokens.  CLAUDE_PROXY_PRICES
#: replaces entries (the same shape, in JSON).  An estimate: the CLI may write 1-hour cache
#: entries (2x input), priced here as 5-minute ones (1.25x).
PRICES_DATE = "2026-12-03"
PRICES_SOURCE = "https://platform.claude.com/docs/en/about-claude/pricing"
PRICES = {
    "claude-opus-5-5": (4.0, 5.0, 0.20, 20.0),
    "claude-opus-5": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-8": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-7": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-6": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4-5": (5.0, 6.25, 0.50, 25.0),
    "claude-opus-4": (15.0, 18.75, 1.50, 75.0),
    "claude-sonnet-5-5": (2.0, 2.50, 0.20, 10.0),
    "claude-sonnet-5": (2.0, 2.50, 0.20, 10.0),
    "claude-sonnet-4": (3.0, 3.75, 0.30, 15.0),
    "claude-haiku-5-5": (0.10, 0.125, 0.01, 0.50),
    "claude-haiku-4-5": (1.0, 1.25, 0.10, 5.0),
    "claude-haiku-3-5": (0.80, 1.0, 0.08, 4.0),
    "opus": (4.0, 5.0, 0.20, 20.0),
    "sonnet": (2.0, 2.50, 0.20, 10.0),
    "haiku": (0.10, 0.125, 0.01, 0.50),
}
PRICE_KINDS = ("input", "cache_write", "cache_read", "output")
HISTORY_QUEUE = 10000            # rows waiting for the writer at most; beyond, they are lost
HISTORY_BATCH = 500              # rows a transaction writes at most
HISTORY_LINGER = 1.0             # seconds the writer waits for more rows before it writes
GROUPS = ("key", "model", "login", "day")
#: what every cost figure is, said wherever one is shown
ESTIMATE_NOTE = {
    "what": "an estimate of what the same tokens would have cost on Anthropic's API, not what "
            "the subscription charges",
    "currency": "USD", "prices_date": PRICES_DATE, "prices_source": PRICES_SOURCE}


def load_prices(path):
    """PRICES with the operator's file laid over it: {"model": {"input": USD per MTok,
    "cache_write": ..., "cache_read": ..., "output": ...}, ...}; ValueError says what is wrong."""
    prices = dict(PRICES)
    if not path:
        return prices
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError("%s cannot be read as JSON: %s" % (path, exc))
    if not isinstance(data, dict):
        raise ValueError('%s must be an object {"model": {"input": 3, "output": 15, ...}}' % path)
    for model, p in data.items():
        if model in ("comment", "date", "source"):
            continue
        if not isinstance(p, dict) or set(p) - set(PRICE_KINDS) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for v in p.values()) or not {"input", "output"} <= set(p):
            raise ValueError("%s: %r must be {\"input\": N, \"output\": N[, \"cache_write\": N, "
                             "\"cache_read\": N]} in USD per million tokens" % (path, model))
        prices[model.lower()] = (float(p["input"]), float(p.get("cache_write", p["input"] * 1.25)),
                                 float(p.get("cache_read", p["input"] * 0.1)), float(p["output"]))
    return prices


def price_of(prices, model):
    """The price row for a model name: the longest id prefix that ends at a '-', else its
    family; None for a model with no price."""
    low = (model or "").lower()
    best = None
    for name in prices:
        if (low == name or low.startswith(name + "-")) and (best is None or len(name) > len(best)):
            best = name
    if best is None:
        best = next((f for f in MODEL_FAMILIES if re.search(r"(^|-)%s(-|$)" % f, low)), None)
    return prices.get(best) if best else None


def cost_usd(prices, model, tokens):
    """API-equivalent USD of token counts {"input", "cache_write", "cache_read", "output"}."""
    p = price_of(prices, model)
    if p is None:
        return None
    return sum(p[i] * tokens.get(k, 0) for i, k in enumerate(PRICE_KINDS)) / 1e6


MIGRATIONS.append(
    # 2: usage history (issue 24): one row per model request, figures only; rollups per hour
    # and per UTC day by key, login and model (hour, day: Unix time // 3600, // 86400)
    """
    CREATE TABLE usage_requests (
        t REAL NOT NULL,
        key TEXT NOT NULL,
        login TEXT NOT NULL,
        model TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        input INTEGER NOT NULL,
        output INTEGER NOT NULL,
        cache_read INTEGER NOT NULL,
        cache_write INTEGER NOT NULL,
        ttft_ms REAL,
        ms REAL NOT NULL,
        served_by TEXT NOT NULL
    );
    CREATE INDEX usage_requests_t ON usage_requests(t);
    CREATE TABLE usage_hourly (
        hour INTEGER NOT NULL, key TEXT NOT NULL, login TEXT NOT NULL, model TEXT NOT NULL,
        requests INTEGER NOT NULL, errors INTEGER NOT NULL, input INTEGER NOT NULL,
        output INTEGER NOT NULL, cache_read INTEGER NOT NULL, cache_write INTEGER NOT NULL,
        PRIMARY KEY (hour, key, login, model)
    ) WITHOUT ROWID;
    CREATE TABLE usage_daily (
        day INTEGER NOT NULL, key TEXT NOT NULL, login TEXT NOT NULL, model TEXT NOT NULL,
        requests INTEGER NOT NULL, errors INTEGER NOT NULL, input INTEGER NOT NULL,
        output INTEGER NOT NULL, cache_read INTEGER NOT NULL, cache_write INTEGER NOT NULL,
        PRIMARY KEY (day, key, login, model)
    ) WITHOUT ROWID;
    """)

_ROLLUP_UPSERT = (
    "INSERT INTO usage_%s VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
    "requests = requests + excluded.requests, errors = errors + excluded.errors, "
    "input = input + excluded.input, output = output + excluded.output, "
    "cache_read = cache_read + excluded.cache_read, cache_write = cache_write + excluded.cache_write")
_SUMS = ("SUM(requests)", "SUM(errors)", "SUM(input)", "SUM(output)", "SUM(cache_read)",
         "SUM(cache_write)")


class UsageHistory:
    """The usage tables of the state store: `add` queues a finished request's figures, a
    writer thread stores them in batches (one transaction each: a row and its rollups are
    whole or absent), `query` answers /v1/usage, `recent_tokens` seeds the budgets at start."""

    def __init__(self, store, days, prices):
        self.store, self.days, self.prices = store, days, prices
        self.on = bool(days) and store.path is not None     # off: nothing kept, nothing lost
        self.queue = queue.Queue(HISTORY_QUEUE)
        self.lost = 0                #: rows that never reached the file
        self.written = 0
        self.last_error = None
        self._next_sweep = 0.0
        self._thread = None
        if self.on:
            self._thread = threading.Thread(target=self._writer, name="usage-history", daemon=True)
            self._thread.start()

    def add(self, row):
        """Queue one request's figures: (t, key, login, model, route, status, input, output,
        cache_read, cache_write, ttft_ms, ms, served_by).  Never blocks."""
        if not self.on:
            return
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            self.lost += 1

    def _writer(self):
        while True:
            got = [self.queue.get()]
            # linger for more rows: one transaction for a second's requests, not one each
            deadline = time.monotonic() + HISTORY_LINGER
            while len(got) < HISTORY_BATCH and got[-1] is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    got.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            rows = [r for r in got if r is not None]
            if rows:
                self._write(rows)
            for _ in got:
                self.queue.task_done()
            if got[-1] is None:
                return

    def _write(self, rows):
        hourly, daily = {}, {}
        for r in rows:
            figures = (1, int(r[5] >= 400), r[6], r[7], r[8], r[9])
            for table, bucket in ((hourly, int(r[0] // 3600)), (daily, int(r[0] // 86400))):
                k = (bucket, r[1], r[2], r[3])
                table[k] = tuple(a + b for a, b in zip(table.get(k, (0,) * 6), figures))

        def steps(db):
            db.executemany("INSERT INTO usage_requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            for name, table in (("hourly", hourly), ("daily", daily)):
                db.executemany(_ROLLUP_UPSERT % name, [k + v for k, v in table.items()])

        try:
            self.store.write(steps)
        except ProxyError as exc:          # StoreUnavailable: counted, logged by the store
            self.lost += len(rows)
            self.last_error = exc.message
            return
        self.written += len(rows)
        self.last_error = None
        if time.monotonic() >= self._next_sweep:
            self.sweep()

    def sweep(self, now=None):
        """Rows and rollups older than CLAUDE_PROXY_HISTORY_DAYS go (a day is kept whole)."""
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        cutoff = (time.time() if now is None else now) - self.days * 86400
        try:
            self.store.write(lambda db: (
                db.execute("DELETE FROM usage_requests WHERE t < ?", (cutoff,)),
                db.execute("DELETE FROM usage_hourly WHERE hour < ?", (int(cutoff // 3600),)),
                db.execute("DELETE FROM usage_daily WHERE day < ?", (int(cutoff // 86400),))))
        except ProxyError:
            pass

    def flush(self, timeout=5.0):
        """Wait until the rows queued so far are written (or lost); for shutdown and tests."""
        deadline = time.monotonic() + timeout
        while self.on and self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout=5.0):
        if self._thread is not None:
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)

    def report(self):
        return {"on": self.on, "days": self.days, "written": self.written, "lost": self.lost,
                "queued": self.queue.qsize(), "error": self.last_error or
                (self.store.error if self.on and not self.store.enabled else None)}

    def recent_tokens(self, since):
        """(minute, key, tokens a budget counts) since `since`, per key and minute."""
        if not self.on or not self.store.enabled:
            return []
        return self.store.read(
            "SELECT CAST(t / 60 AS INTEGER) * 60, key, SUM(input + cache_write + output) "
            "FROM usage_requests WHERE t >= ? GROUP BY 1, 2", (since,))

    @staticmethod
    def spans(since, until):
        """Where the figures between `since` and `until` are: [(table, its day expression,
        where, args)], whole UTC days in the daily rollup, whole hours at the edges in the
        hourly one, the seconds before and after those in the rows."""
        day0, day1 = -(-int(since) // 86400), int(until) // 86400
        hour0, hour1 = -(-int(since) // 3600), int(until) // 3600
        parts = []
        if day0 < day1:
            parts.append(("usage_daily", "day", "day BETWEEN ? AND ?", (day0, day1 - 1)))
            edges = [(hour0, day0 * 24), (day1 * 24, hour1)]
        else:
            edges = [(hour0, hour1)]
        row_edges = []
        if hour0 < hour1:
            for a, b in edges:
                if a < b:
                    parts.append(("usage_hourly", "hour / 24", "hour BETWEEN ? AND ?", (a, b - 1)))
            row_edges = [(since, hour0 * 3600), (hour1 * 3600, until)]
        else:
            row_edges = [(since, until)]
        for a, b in row_edges:
            if a < b:
                parts.append(("usage_requests", "CAST(t / 86400 AS INTEGER)", "t >= ? AND t < ?",
                              (a, b)))
        return parts

    def query(self, since, until, group_by, key=None):
        """Figures between `since` and `until` (Unix seconds), by `group_by` (key | model |
        login | day) and model, each with its API-equivalent cost.  Whole UTC days come from
        the daily rollup, whole hours at the edges from the hourly one, the rest from rows."""
        self.store.require()
        dim = {"key": "key", "model": "model", "login": "login"}
        groups = {}
        for table, day_expr, where, args in self.spans(since, until):
            group = day_expr if group_by == "day" else dim[group_by]
            sums = _SUMS if table != "usage_requests" else (
                "COUNT(*)", "SUM(status >= 400)", "SUM(input)", "SUM(output)", "SUM(cache_read)",
                "SUM(cache_write)")
            sql = "SELECT %s, model, %s FROM %s WHERE %s%s GROUP BY 1, 2" % (
                group, ", ".join(sums), table, where, " AND key = ?" if key else "")
            for g, model, *n in self.store.read(sql, args + ((key,) if key else ())):
                acc = groups.setdefault((g, model), [0] * 6)
                for i, v in enumerate(n):
                    acc[i] += v or 0
        out = {}
        for (g, model), n in groups.items():
            row = out.setdefault(g, {"requests": 0, "errors": 0, "input": 0, "output": 0,
                                     "cache_read": 0, "cache_write": 0, "cost_usd": 0.0,
                                     "unpriced_models": []})
            for name, v in zip(("requests", "errors", "input", "output", "cache_read",
                                "cache_write"), n):
                row[name] += v
            cost = cost_usd(self.prices, model, dict(zip(
                ("input", "output", "cache_read", "cache_write"), n[2:])))
            if cost is None:
                row["unpriced_models"].append(model)
            else:
                row["cost_usd"] += cost
        rows = []
        for g in sorted(out, key=lambda g: (str(g) if group_by != "day" else g)):
            r = out[g]
            r["cost_usd"] = round(r["cost_usd"], 6)
            label = time.strftime("%Y-%m-%d", time.gmtime(g * 86400)) if group_by == "day" else g
            rows.append(dict({group_by: label}, **r))
        return rows


# 13. Auth, metrics, routes, handler, server ####################################################

# -- keys: principals, roles and budgets ---------------------------------------------------------
# A request's key names a Principal: who it is (the name history and budgets are kept under),
# its role (admin reads the operator's pages and everyone's usage; client uses the models), its
# budgets and the models and logins it may use.  Keys come from CLAUDE_PROXY_KEYS_FILE (named)
# and CLAUDE_PROXY_API_KEYS (unnamed: "key-" + 8 hex digits of the key's SHA-256); with neither, the loopback operator is the
# admin and everyone else an anonymous client.

ROLES = ("admin", "client")
#: budget name -> (seconds of its rolling window, what it counts); "concurrent" has no window
BUDGETS = {"tokens_5h": (5 * 3600, "tokens"), "tokens_day": (86400, "tokens"),
           "tokens_week": (7 * 86400, "tokens"), "requests_per_minute": (60, "requests"),
           "concurrent": (0, "requests")}
KEY_FIELDS = ("name", "key", "sha256", "role", "budgets", "models", "logins")
KEYS_CHECK_SECONDS = 1.0     # how often a request looks whether the keys file changed


def key_digest(key):
    return hashlib.sha256(key.encode()).digest()


def env_key_name(key):
    """A CLAUDE_PROXY_API_KEYS key's name: "key-" and the first 8 hex digits of its SHA-256."""
    return "key-" + key_digest(key).hex()[:8]


@dataclass(frozen=True)
class Principal:
    name: str
    role: str = "client"
    digest: bytes = field(default=b"", repr=False)
    budgets: tuple = ()          #: ((budget name, limit), ...)
    models: tuple = ()           #: allowed models (names or families); () = every model
    logins: tuple = ()           #: allowed logins; () = every login

    @property
    def admin(self):
        return self.role == "admin"

    def allows_model(self, req):
        """A model is allowed when the list names what the client asked, the CLI model it
        resolves to, or its family (opus, sonnet, haiku)."""
        if not self.models:
            return True
        names = {req.model.lower(), req.cli_model.lower()}
        names |= {f for f in MODEL_FAMILIES if re.search(r"(^|-)%s(-|$)" % f, req.cli_model)}
        return bool(names & {m.lower() for m in self.models})


#: no keys at all: the operator on loopback, and anyone else (an --allow-unauthenticated bind)
OPERATOR = Principal("operator", "admin")
ANONYMOUS = Principal("anonymous", "client")


def parse_keys(text, where, env_keys=()):
    """The keys file's JSON (a list of keys, or {"keys": [...]}) plus CLAUDE_PROXY_API_KEYS ->
    (Principal, ...); ValueError naming the entry and field that is wrong, never a key."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError("%s is not valid JSON: %s" % (where, exc))
    if isinstance(data, dict) and set(data) <= {"keys", "comment"}:
        data = data.get("keys")
    if not isinstance(data, list):
        raise ValueError('%s must be a JSON list of keys or {"keys": [...]}' % where)
    if not data and where != "-":
        # no principals means "no keys": open to every peer (ANONYMOUS) on a wildcard bind
        raise ValueError("%s lists no keys: add at least one (an empty file would let anyone "
                         "in), or unset CLAUDE_PROXY_KEYS_FILE" % where)
    out, names, digests = [], set(), set()
    for i, entry in enumerate(data, 1):
        principal = _key_principal(entry, where, i, names, digests)
        names.add(principal.name)
        digests.add(principal.digest)
        out.append(principal)
    for k in env_keys:
        d = key_digest(k)
        if d not in digests:
            digests.add(d)
            # named by the key, not its place in the list: removing one key must not hand its
            # name (history rows, budget use) to the next.  8 hex digits of a SHA-256 of a key
            # of 16+ characters say nothing usable about the key.
            name = env_key_name(k)
            if name in names:
                raise ValueError("%s: the name %r is taken by a key in CLAUDE_PROXY_API_KEYS"
                                 % (where, name))
            names.add(name)
            # the file says who is admin; with no file, these keys are all there is
            out.append(Principal(name, "client" if where != "-" else "admin", d))
    return tuple(out)


def _key_principal(entry, where, i, names, digests):
    """The keys file's entry `i` -> its Principal; ValueError naming the entry (and its name,
    once that is a string), never the key.  `names`, `digests`: the entries' before it."""
    def bad(msg):
        return ValueError("%s key %d%s: %s" % (where, i, " (%s)" % entry.get("name")
                                                if isinstance(entry, dict) and
                                                isinstance(entry.get("name"), str) else "", msg))
    if not isinstance(entry, dict):
        raise bad("must be an object with name, key or sha256, role")
    unknown = sorted(set(entry) - set(KEY_FIELDS) - {"comment"})
    if unknown:
        raise bad("unknown field(s) %s; fields: %s" % (", ".join(unknown), ", ".join(KEY_FIELDS)))
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise bad("name must be 1-64 letters, digits, _ . -")
    if name in names or name in (OPERATOR.name, ANONYMOUS.name):
        raise bad("the name %r is taken" % name)
    digest = _entry_digest(entry, bad)
    if digest in digests:
        raise bad("the same key is listed twice")
    role = entry.get("role", "client")
    if role not in ROLES:
        raise bad("role must be admin or client")
    return Principal(name, role, digest, *_entry_limits(entry, bad))


def _entry_digest(entry, bad):
    """The SHA-256 a keys file entry gives: of its key (checked to be strong enough), or its
    sha256 field."""
    key, hexdigest = entry.get("key"), entry.get("sha256")
    if (key is None) == (hexdigest is None):
        raise bad("give exactly one of key (the key itself) or sha256 (its SHA-256, hex)")
    if key is not None:
        if not isinstance(key, str) or len(key) < 16 or any(c.isspace() for c in key):
            raise bad("key must be a string of 16 or more characters without spaces")
        if weak_key(key):
            raise bad("key " + weak_key(key))
        return key_digest(key)
    if not isinstance(hexdigest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
        raise bad("sha256 must be 64 hex digits (sha256sum of the key, no newline)")
    return bytes.fromhex(hexdigest)


def _entry_limits(entry, bad):
    """A keys file entry's budgets and its lists of models and logins, checked."""
    budgets = entry.get("budgets") or {}
    if not isinstance(budgets, dict):
        raise bad("budgets must be an object such as {\"tokens_day\": 2000000}")
    for b, n in budgets.items():
        if b not in BUDGETS:
            raise bad("unknown budget %r; budgets: %s" % (b, ", ".join(BUDGETS)))
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise bad("budget %s must be a whole number of at least 1" % b)
    lists = {}
    for list_name in ("models", "logins"):
        items = entry.get(list_name) or []
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise bad("%s must be a list of names" % list_name)
        lists[list_name] = tuple(items)
    for m in lists["models"]:
        try:
            resolve_model(m, None)
        except ProxyError:
            raise bad("models: %r is not a model name this proxy accepts" % m)
    return tuple(sorted(budgets.items())), lists["models"], lists["logins"]


class KeyRing:
    """The principals, reloaded when the keys file changes (looked at once a second by the
    next request) or on SIGHUP.  A request keeps the Principal it started with, so a reload
    drops nothing in flight; budgets are kept by name and survive it."""

    def __init__(self, cfg):
        self.path, self.env_keys = cfg.keys_file, cfg.api_keys
        self.lock = threading.Lock()
        self.principals, self._seen, self._looked = (), None, 0.0
        self.error = None            #: why the last reload was refused (the old keys stay)
        self.reload(strict=True)

    def _read(self):
        """(principals, stat) from the file as it is now; ValueError if it is not usable."""
        if not self.path:
            return parse_keys("[]", "-", self.env_keys), None
        st = os.stat(self.path)
        if st.st_mode & 0o077:
            raise ValueError("%s is readable by others (mode %o): chmod 600 %s"
                             % (self.path, st.st_mode & 0o777, self.path))
        with open(self.path, encoding="utf-8") as f:
            return parse_keys(f.read(), self.path, self.env_keys), st

    def reload(self, strict=False):
        """Read the file again; a broken file keeps the keys in force (logged) unless `strict`
        (start-up, --check), where it is an error."""
        try:
            principals, st = self._read()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else "%s cannot be read: %s" % (
                self.path, getattr(exc, "strerror", None) or type(exc).__name__)
            if strict:
                raise ValueError(why)
            with self.lock:
                if why != self.error:
                    log_line("keys file not reloaded, the keys in force stay: " + why)
                self.error = why
                self._seen = self._stamp()
            return False
        with self.lock:
            changed = self.principals and principals != self.principals
            self.principals, self.error = principals, None
            self._seen = self._stamp(st)
        if changed:
            log_line("keys reloaded: %d key(s) (%s)" % (
                len(principals), ", ".join("%s:%s" % (p.name, p.role) for p in principals)))
        return True

    def _stamp(self, st=None):
        if st is None:
            try:
                st = os.stat(self.path)
            except OSError:
                return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def maybe_reload(self):
        if not self.path:
            return
        now = time.monotonic()
        if now - self._looked < KEYS_CHECK_SECONDS:
            return
        self._looked = now
        if self._stamp() != self._seen:
            self.reload()

    @property
    def empty(self):
        return not self.principals

    def authenticate(self, headers, peer):
        """The Principal the request's key names, None for a wrong or missing key.  Constant
        time: every key is compared (as equal-length digests), no early exit."""
        self.maybe_reload()
        principals = self.principals
        if not principals:
            return OPERATOR if is_loopback(peer) else ANONYMOUS
        auth = headers.get("Authorization") or ""
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else (headers.get("x-api-key") or "")
        digest, found = key_digest(given), None
        for p in principals:
            if hmac.compare_digest(digest, p.digest):
                found = p
        return found if given else None

    def get(self, name):
        return next((p for p in self.principals if p.name == name), None)


class Spend:
    """One principal's recent use: token figures and request starts inside each rolling
    window (a deque and running sum per window), and requests running now."""

    def __init__(self):
        self.windows = {b: [collections.deque(), 0] for b, (w, _) in BUDGETS.items() if w}
        self.running = 0

    def add(self, t, tokens=0, request=False):
        for b, pair in self.windows.items():
            if BUDGETS[b][1] == ("requests" if request else "tokens"):
                n = 1 if request else tokens
                if n:
                    pair[0].append((t, n))
                    pair[1] += n

    def used(self, budget, now):
        pair = self.windows[budget]
        events, horizon = pair[0], now - BUDGETS[budget][0]
        while events and events[0][0] <= horizon:
            pair[1] -= events.popleft()[1]
        return pair[1]

    def frees_in(self, budget, limit, now):
        """Seconds until the window holds less than `limit` again (events fall out of it)."""
        pair = self.windows[budget]
        total = pair[1]
        for t, n in pair[0]:
            total -= n
            if total < limit:
                return max(1, int(t + BUDGETS[budget][0] - now) + 1)
        return 1

    def resets_at(self, budget, now):
        """When the oldest figure in the window falls out of it (None: the window is empty)."""
        events = self.windows[budget][0]
        return round(events[0][0] + BUDGETS[budget][0], 1) if events else None


class Budgets:
    """Every principal's Spend, by name, and the admission check run before a request takes a
    CLI slot: over a budget -> 429 naming it, with Retry-After when the window frees up."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spend = collections.defaultdict(Spend)

    def admit(self, p, now=None):
        """Count one request of `p` as started (the caller calls done() after it), or raise."""
        now = time.time() if now is None else now
        with self.lock:
            s = self.spend[p.name]
            for budget, limit in p.budgets:
                if budget == "concurrent":
                    if s.running >= limit:
                        raise RateLimited(
                            "Key %r is over its budget concurrent=%d: %d of its requests are "
                            "running. Retry when one has finished." % (p.name, limit, s.running),
                            headers={"Retry-After": "1"}, code="rate_limit_exceeded")
                    continue
                used = s.used(budget, now)
                if used >= limit:
                    wait = s.frees_in(budget, limit, now)
                    raise RateLimited(
                        "Key %r is over its budget %s=%d (%d %s used in the last %s); it frees "
                        "up in %ds." % (p.name, budget, limit, used, BUDGETS[budget][1],
                                        span_text(BUDGETS[budget][0]), wait),
                        headers={"Retry-After": str(wait)}, code="rate_limit_exceeded")
            s.add(now, request=True)
            s.running += 1

    def done(self, p, tokens, now=None):
        """A request of `p` that admit() let in has ended, having used `tokens`."""
        with self.lock:
            s = self.spend[p.name]
            s.running = max(0, s.running - 1)
            s.add(time.time() if now is None else now, tokens)

    def seed(self, rows):
        """Figures of earlier runs (the usage history): (time, name, tokens) rows."""
        with self.lock:
            for t, name, tokens in sorted(rows):       # the windows are kept in time order
                self.spend[name].add(t, tokens)

    def report(self, p, now=None):
        """`p`'s budgets: limit, used, fill (0-1) and when the window's oldest use falls out."""
        now = time.time() if now is None else now
        out = {}
        with self.lock:
            s = self.spend[p.name]
            for budget in BUDGETS:
                limit = dict(p.budgets).get(budget)
                used = s.running if budget == "concurrent" else s.used(budget, now)
                out[budget] = {"limit": limit, "used": used,
                               "fill": round(used / limit, 4) if limit else None,
                               "window_s": BUDGETS[budget][0] or None,
                               "frees_at": None if budget == "concurrent" else
                               s.resets_at(budget, now)}
        return out


def budget_tokens(usage):
    """What a token budget counts of a request: input, cache writes and output.  Cache reads
    are left out: a long conversation re-reads its whole context every turn at a tenth of the
    price, and counting it would make a budget a limit on context length."""
    if not usage:
        return 0
    return usage.input_tokens + usage.cache_write + usage.output_tokens


def span_text(seconds):
    for unit, n in (("week", 7 * 86400), ("day", 86400), ("hours", 3600), ("minute", 60)):
        if seconds % n == 0:
            k = seconds // n
            return "%d %s" % (k, unit) if k != 1 else unit
    return "%ds" % seconds


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

        def metric(name, metric_type, help_, samples):
            out.append("# HELP %s %s" % (name, help_))
            out.append("# TYPE %s %s" % (name, metric_type))
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
            metric("claude_proxy_retries_total", "counter",
                   "requests asked again on another CLI process after theirs ended",
                   ["claude_proxy_retries_total %d" % app.backend.retried])
            idle = app.backend.idle_status()
            full = "claude_proxy_idle_requests_total"
            metric(full, "counter", "CLI turns by the kind of process that served them",
                   ['%s{served_by="%s"} %d' % (full, k, n)
                    for k, n in list(idle["hits"].items()) + [("spawned", idle["misses"])]])
            metric("claude_proxy_idle_processes", "gauge", "idle CLI processes by kind",
                   ['claude_proxy_idle_processes{kind="%s"} %d' % kv for kv in idle["idle"].items()])
            logins = app.usage_report()["accounts"]
            metric("claude_proxy_login_healthy", "gauge", "1 while the login authenticates",
                   ['claude_proxy_login_healthy{account="%s"} %d' % (a["name"], a["healthy"])
                    for a in logins])
            for name, key, help_ in (
                    ("utilization", "utilization", "share of the plan window used (0-1)"),
                    ("resets_at", "resets_at", "unix time the plan window resets")):
                full = "claude_proxy_plan_window_%s" % name
                metric(full, "gauge", help_, ['%s{account="%s",window="%s"} %s'
                                              % (full, a["name"], w, v[key] or 0)
                                              for a in logins for w, v in sorted(a["windows"].items())])
            metric("claude_proxy_plan_window_rejected", "gauge", "1 while the window refuses",
                   ['claude_proxy_plan_window_rejected{account="%s",window="%s"} %d'
                    % (a["name"], w, v["status"] == "rejected")
                    for a in logins for w, v in sorted(a["windows"].items())])
            metric("claude_proxy_extra_usage_in_use", "gauge",
                   "1 while the login's requests are billed as extra usage",
                   ['claude_proxy_extra_usage_in_use{account="%s"} %d'
                    % (a["name"], a["extra_usage"]["in_use"]) for a in logins])
            metric("claude_proxy_login_tokens_total", "counter", "tokens per login, model and kind",
                   ['claude_proxy_login_tokens_total{account="%s",model="%s",kind="%s"} %d'
                    % (a["name"], m, k, n) for a in logins for m, t in sorted(a["tokens"].items())
                    for k, n in t.items()])
            h = app.history.report()
            metric("claude_proxy_history_rows_total", "counter",
                   "usage history rows by outcome (lost: the queue was full or the write failed)",
                   ['claude_proxy_history_rows_total{outcome="written"} %d' % h["written"],
                    'claude_proxy_history_rows_total{outcome="lost"} %d' % h["lost"]])
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


class RequestLog:
    """The dashboard's memory of traffic, bounded and in memory only: the last `size` requests
    as figures (never a prompt or an answer: ids, route, client, model, status, times,
    tokens) and per-minute aggregates over the last hour for its plots (tokens per login and
    model are the logins' own, Account.tokens).  Operational routes (this page, /health, /metrics) are not recorded:
    their pollers would push the requests that matter out of the ring."""
    QUIET = ("/", "/dashboard", "/dashboard/data", "/health", "/metrics")
    MINUTES = 60
    TTFT_SAMPLES = 500           # per minute; beyond that a minute's percentiles use its first 500

    def __init__(self, size=200):
        self.lock = threading.Lock()
        self.ring = collections.deque(maxlen=size)
        self.minutes = collections.OrderedDict()    # minute (epoch // 60) -> aggregates

    def add(self, entry, usage):
        """Record one finished request (`entry`: the figures the page's table shows)."""
        minute = int(entry["t"] // 60)
        with self.lock:
            self.ring.append(entry)
            m = self.minutes.get(minute)
            if m is None:
                m = self.minutes[minute] = {"requests": 0, "errors": 0, "usage": Usage(),
                                            "ttft": []}
                while len(self.minutes) > self.MINUTES or \
                        next(iter(self.minutes)) <= minute - self.MINUTES:
                    self.minutes.popitem(last=False)
            m["requests"] += 1
            m["errors"] += entry["status"] >= 400
            if entry["ttft_ms"] is not None and len(m["ttft"]) < self.TTFT_SAMPLES:
                m["ttft"].append(entry["ttft_ms"])
            if usage:
                m["usage"].add(usage)

    def recent(self):
        """The ring, newest first."""
        with self.lock:
            return list(reversed(self.ring))

    def per_minute(self, now=None):
        """The last hour, one row a minute (oldest first; minutes without traffic are zeros)."""
        last = int((now or time.time()) // 60)
        rows = []
        with self.lock:
            for minute in range(last - self.MINUTES + 1, last + 1):
                m = self.minutes.get(minute)
                u, ttft = (m["usage"], sorted(m["ttft"])) if m else (Usage(), [])
                rows.append({"t": minute * 60, "requests": m["requests"] if m else 0,
                             "errors": m["errors"] if m else 0,
                             "tokens_in": u.prompt_tokens, "tokens_out": u.output_tokens,
                             "cache_read": u.cache_read,
                             "cache_share": round(u.cache_read / u.prompt_tokens, 4)
                             if u.prompt_tokens else None,
                             "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95)})
        return rows


def percentile(ordered, pct):
    """Nearest-rank percentile of a sorted list (None for an empty one)."""
    if not ordered:
        return None
    return ordered[max(0, -(-len(ordered) * pct // 100) - 1)]


class App:
    """Everything a request needs: config, backend and counters.  One per server."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.workdir = tempfile.mkdtemp(prefix="claude-proxy-cwd-")
        os.chmod(self.workdir, 0o500)        # stays empty: nothing for the CLI to read or write
        self.backend = Backend(cfg, self.workdir)
        self.metrics = Metrics()
        self.requests = RequestLog()
        self._cli_version = (None, 0.0)      # (text, monotonic time it was read)
        self._cli_version_lock = threading.Lock()   # one `claude --version` at a time
        self._cli_version_error = None       # why `claude --version` gave no answer
        #: set once the start-up check (the CLI's version, each login without a model turn)
        #: is done; /health waits for it briefly, so its first answer is already honest
        self.checked = threading.Event()
        threading.Thread(target=self._check_at_start, name="start-check", daemon=True).start()
        self.keys = KeyRing(cfg)
        self.budgets = Budgets()
        #: Host names served when no keys are set (check_host)
        self.host_names = {*LOCAL_NAMES, cfg.host.lower().strip("[]"),
                           *(host_name(h) for h in cfg.allowed_hosts)}
        self.store = StateStore(cfg)
        self.prices = load_prices(cfg.prices_file)
        self.history = UsageHistory(self.store, cfg.history_days, self.prices)
        # rolling token budgets go on counting what earlier runs of the proxy spent
        self.budgets.seed(self.history.recent_tokens(time.time() - BUDGETS["tokens_week"][0]))
        self.started_at = time.time()
        self.in_flight = 0
        self.lock = threading.Lock()
        self.left = threading.Condition(self.lock)     #: notified as each request leaves
        self.stateful = StatefulResponses(self)

    def enter(self):
        with self.lock:
            self.in_flight += 1

    def leave(self):
        with self.lock:
            self.in_flight -= 1
            self.left.notify_all()

    def drain(self, grace):
        """Wait up to `grace` seconds for in-flight requests; True if none are left."""
        deadline = time.monotonic() + grace
        with self.lock:
            while self.in_flight and time.monotonic() < deadline:
                self.left.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return not self.in_flight

    def usage_report(self):
        """The GET /v1/usage body: per login its plan windows, extra usage, health and tokens
        per model since start-up; and the extra-usage guard.  No secrets: names and paths only
        appear as the operator configured them, tokens never."""
        return self.backend.logins.report()

    def key_report(self, p, used=None):
        """One key as /v1/usage and the dashboard show it: role, lists, budgets, and its use
        over the last day and week from the history (`used`: key_usage()); never the key."""
        return {"name": p.name, "role": p.role, "models": list(p.models),
                "logins": list(p.logins), "budgets": self.budgets.report(p),
                "usage": (used or {}).get(p.name, {})}

    def key_usage(self, only=None, now=None):
        """{key name: {"day": figures, "week": figures}} from the history (with the value
        estimate); {} when there is no history."""
        if not self.history.on or not self.store.enabled:
            return {}
        now, out = time.time() if now is None else now, {}
        for span_name, seconds in (("day", 86400), ("week", 7 * 86400)):
            for r in self.history.query(now - seconds, now + 1, "key", key=only):
                out.setdefault(r["key"], {})[span_name] = {k: v for k, v in r.items() if k != "key"}
        return out

    def usage_for(self, p):
        """GET /v1/usage for principal `p`: an admin sees every login and every key; a client
        key its own budgets and use only."""
        if not p.admin:
            return {"key": self.key_report(p, self.key_usage(p.name)), "estimate": ESTIMATE_NOTE}
        keys, used = self.keys.principals or (OPERATOR, ANONYMOUS), self.key_usage()
        return dict(self.usage_report(), keys=[self.key_report(k, used) for k in keys],
                    keys_file={"path": self.cfg.keys_file or None, "error": self.keys.error},
                    estimate=ESTIMATE_NOTE)

    def logins_summary(self):
        """/health's view of usage_report: per login, healthy or not and its binding window;
        `serving`: some login is healthy and not known to be out of limits (a load balancer's
        health check can read it)."""
        out, serving = [], False
        for a in self.backend.logins.accounts:
            r, limited = a.report(), a.limited()
            serving |= r["healthy"] and not a.exhausted()
            binding = max(r["windows"].items(), key=lambda kv: kv[1]["utilization"], default=None)
            out.append({"name": r["name"], "healthy": r["healthy"], "hint": r["hint"],
                        "reason": r["reason"],
                        "limited": limited is not None,
                        "binding": dict(binding[1], window=binding[0]) if binding else None,
                        "extra_usage_in_use": r["extra_usage"]["in_use"]})
        return {"serving": serving, "guard": {"extra_usage": self.cfg.extra_usage},
                "accounts": out}

    def health_report(self, full=True):
        """GET /health: `degraded`, with reasons, when requests are known to fail or be slow
        for a reason the operator has to fix; the HTTP status stays 200 (see the health route).
        Not `full`: status, reasons without names or paths, and `logins.serving` (what a load
        balancer checks): what a caller who is not an admin may see."""
        cfg, gate, backend = self.cfg, self.backend.gate, self.backend
        self.checked.wait(STARTUP_CHECK_WAIT)
        found = shutil.which(cfg.claude_bin)
        idle, logins = backend.idle_status(), self.logins_summary()
        reasons, public = self.health_reasons(found, idle, logins)
        status = "degraded" if reasons else "ok"
        if not full:
            return {"status": status, "reasons": public,
                    "logins": {"serving": logins["serving"]}}
        return {
            "status": status, "reasons": reasons,
            "version": __version__, "uptime_s": round(time.time() - self.started_at, 1),
            "claude_bin": cfg.claude_bin, "claude_found": bool(found),
            "concurrency": {"capacity": gate.capacity, "running": gate.running, "queued": gate.queued},
            "cli_processes_started": backend.started, "retries": backend.retried,
            "history": cfg.history,
            "idle": idle, "memory": backend.memory_report(), "logins": logins,
            "store": self.store.report(),
            "handlers": sorted(HANDLERS), "module_errors": dict(MODULE_ERRORS)}

    def health_reasons(self, found, idle, logins):
        """Why /health says degraded: (reasons for an admin, the same without names, paths or
        hints for anyone else); both empty when nothing is wrong."""
        reasons, public = [], []

        def reason(said, detail=None):    # `detail` (names, paths, hints): admins only
            public.append(said)
            reasons.append(detail or said)
        if not found:
            reason("the claude CLI was not found: every model request fails with 503",
                   "the claude CLI was not found (CLAUDE_BIN=%s): every model request fails "
                   "with 503" % self.cfg.claude_bin)
        elif self.cli_problem():
            reason("the claude CLI may be broken or older than this proxy is tested with",
                   self.cli_problem())
        for a in logins["accounts"]:              # the hint says what to run
            if not a["healthy"] and a["reason"]:
                reason("a login cannot serve",
                       "login %s cannot serve: %s; %s" % (a["name"], a["reason"], a["hint"]))
            elif not a["healthy"]:
                reason("a login failed to authenticate",
                       "login %s failed to authenticate: %s" % (a["name"], a["hint"]))
        if idle.get("mode") == "cold-fallback":
            reason("the pool is in cold fallback: pre-started CLI processes kept dying at start, "
                   "so requests start their own (slower); see the proxy's log")
        return reasons, public

    def cli_version(self):
        """`claude --version`, read at most every 10 minutes (an upgrade shows up)."""
        text, at = self._cli_version
        if (at and time.monotonic() - at < 600) or not self._cli_version_lock.acquire(False):
            return text                  # fresh enough, or being read by another poll
        try:
            return self._read_cli_version()
        finally:
            self._cli_version_lock.release()

    def _read_cli_version(self):
        error = None
        try:
            text = cli_version(self.cfg, self.workdir)
        except (OSError, subprocess.TimeoutExpired) as exc:
            text, error = None, getattr(exc, "strerror", None) or type(exc).__name__
        self._cli_version, self._cli_version_error = (text, time.monotonic()), error
        return text

    def _check_at_start(self):
        """The CLI's version and each login's credentials, without a model turn."""
        try:
            self.cli_version()
            if shutil.which(self.cfg.claude_bin):
                for account in self.backend.logins.accounts:
                    self.backend.check_login(account)
        finally:
            self.checked.set()

    def cli_problem(self):
        """Why the CLI found on the path cannot be trusted to serve, or None."""
        text, error = self._cli_version[0], self._cli_version_error
        if error:
            return "the claude CLI (%s) did not answer `--version` (%s): it may be broken or " \
                   "not the claude CLI" % (self.cfg.claude_bin, error)
        have = cli_version_tuple(text)
        if have is not None and have < CLI_TESTED:
            return "the claude CLI is %s, older than %s, which this proxy is tested with and " \
                   "relies on (npm install -g @anthropic-ai/claude-code@%s)" % (
                       text, ".".join(map(str, CLI_TESTED)), ".".join(map(str, CLI_TESTED)))
        return None

    def dashboard_data(self):
        """GET /dashboard/data: everything the page shows, secrets masked."""
        cfg = self.cfg
        config = [{"name": env, "value": value} for env, value in config_items(cfg)]
        return {"version": __version__, "now": time.time(), "health": self.health_report(),
                "cli": {"path": shutil.which(cfg.claude_bin) or cfg.claude_bin,
                        "found": bool(shutil.which(cfg.claude_bin)), "version": self.cli_version()},
                "config": config, "usage": self.usage_report(),
                "history": self.history.report(),
                "keys": [self.key_report(k) for k in self.keys.principals or (OPERATOR, ANONYMOUS)],
                "usage_history": self.history_summary(),
                "requests": self.requests.recent(), "minutes": self.requests.per_minute()}

    def history_summary(self, now=None):
        """The dashboard's history: the last day and week per key and per model, and the
        last 30 UTC days (every day, zeros included), each with its value estimate."""
        if not self.history.on or not self.store.enabled:
            return {"error": self.history.report()["error"] or (
                "CLAUDE_PROXY_HISTORY_DAYS=0 keeps no history" if not self.cfg.history_days
                else self.store.error), "estimate": ESTIMATE_NOTE}
        now = time.time() if now is None else now
        q = self.history.query
        first = (int(now // 86400) - 29) * 86400
        days = {r["day"]: r for r in q(first, now + 1, "day")}
        empty = {"requests": 0, "errors": 0, "input": 0, "output": 0, "cache_read": 0,
                 "cache_write": 0, "cost_usd": 0.0, "unpriced_models": []}
        out_days = []
        for i in range(30):
            day = time.strftime("%Y-%m-%d", time.gmtime(first + i * 86400))
            out_days.append(days.get(day) or dict(empty, day=day))
        return {"by_key": {"day": q(now - 86400, now + 1, "key"),
                           "week": q(now - 7 * 86400, now + 1, "key")},
                "by_model": {"day": q(now - 86400, now + 1, "model"),
                             "week": q(now - 7 * 86400, now + 1, "model")},
                "days": out_days, "estimate": ESTIMATE_NOTE}

    def close(self):
        self.backend.close_all()
        self.history.close()
        self.store.close()
        try:
            os.chmod(self.workdir, 0o700)
            shutil.rmtree(self.workdir, ignore_errors=True)
        except OSError:
            pass


def model_events(app, req, call, pinned=None, principal=ANONYMOUS):
    """The whole pipeline for one request: a login, a slot, then one CLI turn (or the tool
    engine).  A request its login refuses for limits or authentication before anything went to
    the client is asked once more on the next login that can take it (not when pinned).
    `principal` (the key) limits the logins, and its share of the slots while others wait."""
    logins, tried, allowed = app.backend.logins, [], principal.logins
    account = logins.choose(req, pinned, allowed=allowed)   # the guard's refusal needs no slot
    gate = app.backend.gate
    share = gate.capacity - 1 if gate.capacity > 1 and len(app.keys.principals) > 1 else None
    gate.acquire(call, principal.name, share)
    try:
        while True:
            req.account = account.name
            sent = False
            try:
                for ev in login_events(app, req, call):
                    sent = sent or not isinstance(ev, Heartbeat)    # a keep-alive is no content
                    yield ev
                logins.remember(req, account)
                return
            except (RateLimited, LoginFailed) as exc:
                if isinstance(exc, LoginFailed):
                    account.mark_unhealthy(exc.message)
                tried.append(account.name)
                if sent or pinned or len(tried) > 1:      # one other login, no more
                    raise
                try:
                    account = logins.choose(req, None, tried, allowed)
                except ProxyError:
                    raise exc from None           # the first refusal is the answer
                log_line("login %s refused a request (%s %s); asking login %s"
                         % (tried[-1], exc.status, exc.code or exc.error_type, account.name))
    finally:
        gate.release(principal.name)


def login_events(app, req, call):
    """One CLI turn (or the tool engine) on the login `req.account`.  A turn that ends whole
    (the client got all the model wrote), in one CLI run (no refusal retry), keeps its process
    for the conversation's next turn (KeptConversation)."""
    keep, runs = None, []
    try:
        keep = KeptConversation.of(app.backend, req)
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


def display_name(model_id):
    """Anthropic's display name for a model id: claude-sonnet-4-6 -> Claude Sonnet 4.6."""
    m = re.fullmatch(r"claude-([a-z]+)-([0-9]+(?:-[0-9]{1,2})?)(?:-[0-9]{8})?", model_id)
    if not m:
        return model_id.replace("-", " ").title()
    return "Claude %s %s" % (m.group(1).title(), m.group(2).replace("-", "."))


def models_payload(anthropic_shape, only=None):
    # Anthropic lists full ids only (its clients pick a model from that list); the aliases stay
    # accepted in requests and in the OpenAI-shaped list, where clients expect short names too
    ids = [only] if only else [m for m in KNOWN_MODELS
                               if not anthropic_shape or m not in MODEL_FAMILIES]
    if anthropic_shape:
        data = [{"type": "model", "id": m, "display_name": display_name(m),
                 "created_at": "2025-01-01T00:00:00Z"} for m in ids]
        if only:
            return data[0]
        return {"data": data, "has_more": False, "first_id": ids[0], "last_id": ids[-1]}
    data = [{"id": m, "object": "model", "created": 1735689600, "owned_by": "anthropic"} for m in ids]
    return data[0] if only else {"object": "list", "data": data}


class Call:
    """One request, as its route sees it (bottle's request and response in one small object):
    method, path and path parameters, headers, the parsed body, the dialect errors are
    rendered in, and the figures the access log reports.  The backend sees the deadline and a
    cheap check whether the client hung up."""

    def __init__(self, handler):
        self.handler, self.app, self.sock = handler, handler.server.app, handler.connection
        self.method, self.headers = handler.command, handler.headers
        self.path = handler.path.split("?", 1)[0]
        self.params = {}             #: path parameters of the matched route: {"id": ...}
        self.body = None             #: the parsed JSON body; None for a request without one
        self.body_read = False       #: the body was read whole (keep-alive can go on)
        self.request_id = re.sub(r"[^A-Za-z0-9._:-]", "", self.headers.get("X-Request-Id") or "")[:128] \
            or new_id("req_", 16)
        anthropic = self.path.startswith(("/v1/messages", "/messages")) or \
            self.headers.get("anthropic-version") or self.headers.get("x-api-key")
        self.dialect = DIALECTS["anthropic" if anthropic else "openai"]    #: errors are in it
        self.route = None            #: the matched Route (None: no route, or not looked up yet)
        self.status, self.model, self.usage, self.req, self.ttft = 0, "-", None, None, None
        self.principal = None        #: the key's Principal (None on routes anyone may call)
        self.streaming = False       #: a stream has started: an error can only end it
        self.background = False      #: it started a background run, which records the model use
        self.started = time.monotonic()
        self.timeout = self.app.cfg.timeout
        self.deadline = self.started + self.timeout
        self._next = 0.0

    # -- the backend's view: deadline and liveness ------------------------------------------
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
        """True once the client closed or reset its connection.  poll, not select: select
        fails on descriptors >= 1024, which a busy server reaches."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            ready = poller.poll(0)
            if not ready:
                return False
            if ready[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return True
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    # -- answering --------------------------------------------------------------------------
    def send(self, status, data, content_type, headers=()):
        """A whole response: status, headers (X-Request-Id; Connection: close when the
        connection ends with it) and `data` (bytes; none for HEAD).  A client that hung up
        meanwhile is ClientGone (Handler.end_headers too), not an error of the proxy's."""
        h = self.handler
        self.status = status
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Request-Id", self.request_id)
        if h.close_connection:
            h.send_header("Connection", "close")
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        if self.method != "HEAD":
            try:
                h.wfile.write(data)
            except (OSError, ValueError) as exc:      # ValueError: the socket file is closed
                raise ClientGone() from exc

    def send_json(self, status, obj, headers=()):
        self.send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

    def send_error(self, err):
        """A ProxyError in the request's dialect; a started stream is ended instead (the
        dialect's stream encoder has already sent its error event)."""
        if self.streaming:
            self.handler.close_connection = True
            return
        status, body = self.dialect.error(err)
        try:
            self.send_json(status, body, list(err.headers.items()))
        except ClientGone:
            self.handler.close_connection = True


# -- routes: plain functions of the Call ---------------------------------------------------------

def chat_completions(call):
    generate(call, DIALECTS["openai"])


def create_response(call):
    call.dialect = DIALECTS["responses"]
    turn = call.app.stateful.prepare(call.body, call.principal)
    if turn.background:
        return start_background(call, turn)
    generate(call, DIALECTS["responses"], turn)


def create_message(call):
    generate(call, DIALECTS["anthropic"])


def model_request(call, dialect, turn=None):
    """The neutral Request of a model request; a stored response's turn (StoredTurn) parses
    with the stored items ahead of its input.  Being stored is no session signal: a stored
    first message is kept `first` like any other (its chain's next turn continues on it
    unless a one-shot request took it), so one-shot Responses traffic, stored by default,
    never pushes out a conversation with history (KeptConversation).  With native tools it
    is one: such a process is never reused, so it is kept only as a session."""
    app, body, headers = call.app, call.body, call.headers
    call.dialect = dialect
    req = dialect.parse(body if turn is None else dict(body, input=turn.input), headers, app.cfg)
    req.handler = pick_handler(headers.get("X-Toolcall-Module"), app.cfg.toolcall_module)
    req.id_prefix = dialect.call_id_prefix
    req.session = session_signal(body, headers)
    if turn is not None and turn.rid:
        req.response_id = turn.rid
        if native_tools(req):
            req.session = req.session or turn.rid
    # what the client's web search asks for, as far as the operator allows it
    req.web_tools = tuple(t for t in req.web_tools if t in WEB_TOOL_MODES[app.cfg.web_tools])
    call.model, call.req = req.model, req
    return req


def admit(call, req):
    """The request's key, once it may use the model and its budgets have room (before a slot:
    an over-budget key waits for none)."""
    me = call.principal
    req.tenant = me.digest.hex()        # "" without keys
    if not me.allows_model(req):
        raise Forbidden("Key %r may use the model(s) %s only, not %r."
                        % (me.name, ", ".join(me.models), req.model), param="model")
    call.app.budgets.admit(me)
    return me


def generate(call, dialect, turn=None):
    """A model request in `dialect`: parsed, served by model_events, answered as one JSON
    document or as a stream; a stored response is saved before the client sees its end."""
    app, body = call.app, call.body
    req = model_request(call, dialect, turn)
    me = admit(call, req)
    source = model_events(app, req, call, call.headers.get("X-Claude-Account"), me)
    events = observe(call, source)
    try:
        if not req.stream:
            c = collect(events)
            out = dialect.render(req, c, body)
            if turn is not None:
                app.stateful.finish(turn, body, out)
            return call.send_json(200, out, [("X-Claude-Account", req.account)])
        events_ahead = first_then(events)
        sse = SSE(call.handler)
        sse.start([("X-Request-Id", call.request_id), ("X-Claude-Account", req.account)])
        call.status, call.streaming = 200, True
        saving = None if turn is None else SavingSSE(sse, app.stateful, turn, body)
        try:
            dialect.stream(req, events_ahead, sse if saving is None else saving, body)
        finally:
            if saving is not None:
                saving.close()
        sse.end()
    finally:
        events.close()
        source.close()
        app.budgets.done(me, budget_tokens(call.usage))


# -- stored responses and conversations (section 11) ----------------------------------------

def start_background(call, turn):
    """background: true: the response is stored queued and runs in the proxy; the request
    gets it at once, or with stream: true follows its events (leaving does not stop it)."""
    dialect, state, body = call.dialect, call.app.stateful, call.body
    req = model_request(call, dialect, turn)
    streamed, req.stream = req.stream, True        # a run is kept as its events
    run = BackgroundRun(turn.rid, call.app.cfg.timeout, turn.owner)
    run.queued = queued = dialect.envelope(req, body, turn.rid, int(time.time()), [], "queued")
    state.reserve(run)
    try:
        pinned, me = call.headers.get("X-Claude-Account"), admit(call, req)
    except ProxyError:
        state.release(run)
        raise
    # the run records its own figures (its usage, status); this request records no model use
    figures = copy.copy(call)
    figures.started, figures.ttft, figures.usage, figures.status = time.monotonic(), None, None, 0
    saved = False
    try:
        state.save(turn.rid, turn.owner, body, turn.new, queued)
        saved = True
        state.start(run, lambda: state.run_background(run, req, body, turn, pinned, me, figures))
    except ProxyError:
        state.release(run)
        call.app.budgets.done(me, 0)
        if saved:                          # a queued row no run will ever finish
            try:
                state.store.write(lambda db: db.execute("DELETE FROM responses WHERE id = ?",
                                                        (turn.rid,)))
            except ProxyError:
                pass                       # a restart fails it (_fail_unfinished)
        raise
    call.background = True
    if not streamed:
        return call.send_json(200, queued)
    follow(call, run.follow(-1))


def follow(call, events):
    """Stored or live events of a response as SSE; None is a keep-alive."""
    sse = SSE(call.handler)
    sse.start([("X-Request-Id", call.request_id)])
    call.status, call.streaming = 200, True
    for ev in events:
        if ev is None:
            sse.comment("keep-alive")
        else:
            sse.event(ev, ev["type"])
    sse.end()


def stored(call):
    """(the state, the caller's owner id) for a stored-state route; its errors are OpenAI's."""
    call.dialect = DIALECTS["responses"]
    call.app.store.require()
    return call.app.stateful, call.app.stateful.owner(call.principal)


def query(call):
    return urllib.parse.parse_qs(call.handler.path.partition("?")[2])


def get_response(call):
    state, owner = stored(call)
    q = query(call)
    if (q.get("stream") or ["false"])[-1] == "true":
        after = (q.get("starting_after") or [None])[-1]
        _need(after is None or re.fullmatch(r"\d+", after) is not None,
              "starting_after must be a sequence number (an integer, 0 or more)", "starting_after")
        return follow(call, state.events(call.params["id"], owner,
                                         -1 if after is None else int(after)))
    call.send_json(200, state.get(call.params["id"], owner))


def delete_response(call):
    state, owner = stored(call)
    call.send_json(200, state.delete(call.params["id"], owner))


def response_input_items(call):
    state, owner = stored(call)
    call.send_json(200, state.input_items(call.params["id"], owner, query(call)))


def cancel_response(call):
    state, owner = stored(call)
    call.send_json(200, state.cancel(call.params["id"], owner))


def response_input_tokens(call):
    """An estimate (~4 bytes a token, as count_tokens) of the input the model would get,
    stored items included; the CLI has no counter to ask."""
    d = call.dialect = DIALECTS["responses"]
    body = call.body if isinstance(call.body, dict) else {}
    turn = call.app.stateful.prepare(dict(body, store=False, background=False), call.principal)
    req = d.parse(dict(body, input=turn.input), call.headers, call.app.cfg)
    call.model = req.model
    size = len(json.dumps([req.system, [m.blocks for m in req.messages], body.get("tools")],
                          ensure_ascii=False).encode())
    call.send_json(200, {"object": "response.input_tokens", "input_tokens": max(1, size // 4)})


def compact_response(call):
    call.dialect = DIALECTS["responses"]
    raise BadRequest("POST /v1/responses/compact is not available: its compaction item is "
                     "OpenAI's encrypted format, which only OpenAI's models read. Continue with "
                     "previous_response_id (the proxy keeps the conversation) or a conversation, "
                     "or send a shorter input.")


def create_conversation(call):
    state, owner = stored(call)
    call.send_json(200, state.create_conversation(call.body, owner))


def get_conversation(call):
    state, owner = stored(call)
    call.send_json(200, state.conversation(call.params["id"], owner))


def update_conversation(call):
    state, owner = stored(call)
    call.send_json(200, state.update_conversation(call.params["id"], call.body, owner))


def delete_conversation(call):
    state, owner = stored(call)
    call.send_json(200, state.delete_conversation(call.params["id"], owner))


def list_conversation_items(call):
    state, owner = stored(call)
    call.send_json(200, list_page(state.conversation_items(call.params["id"], owner), query(call)))


def add_conversation_items(call):
    state, owner = stored(call)
    call.send_json(200, state.add_items(call.params["id"], call.body, owner))


def get_conversation_item(call):
    state, owner = stored(call)
    call.send_json(200, state.item(call.params["id"], call.params["item_id"], owner))


def delete_conversation_item(call):
    state, owner = stored(call)
    call.send_json(200, state.delete_item(call.params["id"], call.params["item_id"], owner))


def observe(call, events):
    """Pass events through, noting time to first content, duration and usage.  Until Done
    the usage is Start's (message_start: the input tokens), so a request that ends before
    Done (the client gone, a timeout, an upstream error mid-stream) still counts in budgets
    and history: a client that hangs up early must not get its tokens for free."""
    metrics, started, first = call.app.metrics, time.monotonic(), True
    for ev in events:
        if isinstance(ev, Start):
            call.usage = dataclasses.replace(ev.usage)
        elif first and isinstance(ev, (TextDelta, ThinkingDelta, ToolCall)):
            first = False
            call.ttft = time.monotonic() - started
            metrics.observe("ttft", call.ttft)
        elif isinstance(ev, Done):
            call.usage = ev.usage
            metrics.observe("duration", time.monotonic() - started)
        yield ev


def count_tokens(call):
    d = call.dialect = DIALECTS["anthropic"]
    req = d.parse(call.body, call.headers, call.app.cfg, count_only=True)
    call.model = req.model
    call.send_json(200, d.count_tokens(req, call.body))


def list_models(call):
    call.send_json(200, models_payload(call.dialect.name == "anthropic"))


def get_model(call):
    model_id = call.params["id"]
    try:
        resolve_model(model_id, None)
    except BadRequest:
        raise NotFound("Model %r not found." % model_id)
    call.send_json(200, models_payload(call.dialect.name == "anthropic", model_id))


def plan_usage(call):
    """GET /v1/usage: without a query, plan windows and keys (usage_for); with since, until,
    group_by or format, the usage history (usage_history)."""
    query = urllib.parse.parse_qs(call.handler.path.partition("?")[2], keep_blank_values=True)
    if not query:
        return call.send_json(200, call.app.usage_for(call.principal))
    answer = usage_history(call.app, call.principal, query)
    if answer["format"] != "csv":
        return call.send_json(200, answer["body"])
    call.send(200, answer["csv"].encode(), "text/csv; charset=utf-8",
              [("Content-Disposition", 'attachment; filename="claude-proxy-usage.csv"')])


#: the latest time a query may name (9999-12-31T23:59:59Z): SQLite holds its whole seconds
LATEST_TIME = 253402300799


def when(value, name):
    """A time parameter: Unix seconds, or a UTC date / date-time (2026-12-01, 2026-12-01T10:00),
    from 1970 to 9999."""
    t = None
    try:
        t = float(value)
    except ValueError:
        for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
            try:
                t = float(calendar.timegm(time.strptime(value, fmt)))
                break
            except ValueError:
                continue
    # float() takes nan, inf and 1e400 (inf), which int() then refuses, and 1e300, which SQLite
    # cannot bind; nan fails every comparison, so this one test keeps them all out
    if t is None or not 0 <= t <= LATEST_TIME:
        raise BadRequest("%s must be Unix seconds (0 to %d) or a UTC date such as 2026-12-01 or "
                         "2026-12-01T10:00, got %r." % (name, LATEST_TIME, value[:40]), param=name)
    return t


def usage_history(app, me, query):
    """The history figures a principal may see: a client its own only, an admin every key's
    (or one key's, ?key=NAME).  {"format", "body"} or {"format": "csv", "csv"}."""
    def one(name, default=None):
        values = query.get(name)
        return values[-1] if values else default
    unknown = sorted(set(query) - {"since", "until", "group_by", "format", "key"})
    if unknown:
        raise BadRequest("Unknown /v1/usage parameter(s) %s; use since, until, group_by (%s), "
                         "format (json | csv), key." % (", ".join(unknown), " | ".join(GROUPS)))
    now = time.time()
    until = when(one("until"), "until") if one("until") else now
    since = when(one("since"), "since") if one("since") else until - 7 * 86400
    if since >= until:
        raise BadRequest("since must be before until.", param="since")
    group_by, fmt = one("group_by", "day"), one("format", "json")
    if group_by not in GROUPS:
        raise BadRequest("group_by must be one of %s." % ", ".join(GROUPS), param="group_by")
    if fmt not in ("json", "csv"):
        raise BadRequest("format must be json or csv.", param="format")
    key = one("key") or None
    if not me.admin:
        if key not in (None, me.name):
            raise Forbidden("A client key sees its own usage only (key %r)." % me.name,
                            param="key")
        key = me.name
    history = app.history
    if not history.on or not app.store.enabled:
        raise StoreUnavailable("Usage history is unavailable: %s." % (
            "CLAUDE_PROXY_HISTORY_DAYS=0 keeps none" if not app.cfg.history_days else
            app.store.error))
    rows = history.query(since, until, group_by, key)
    total = {k: sum(r[k] for r in rows) for k in ("requests", "errors", "input", "output",
                                                   "cache_read", "cache_write")}
    total["cost_usd"] = round(sum(r["cost_usd"] for r in rows), 6)
    body = {"object": "usage.history", "since": since, "until": until, "group_by": group_by,
            "key": key, "rows": rows, "total": total, "estimate": ESTIMATE_NOTE,
            "lost_rows": history.lost}
    if fmt == "json":
        return {"format": "json", "body": body}
    return {"format": "csv", "csv": usage_csv(rows, group_by)}


def usage_csv(rows, group_by):
    """History rows as CSV, one line a group; the cost column says it is an estimate."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    cols = [group_by, "requests", "errors", "input", "output", "cache_read", "cache_write",
            "cost_usd"]
    w.writerow(cols[:-1] + ["api_equivalent_usd_estimate"])
    for r in rows:
        w.writerow([r[c] for c in cols])
    return out.getvalue()


def health(call):
    """Everything to an admin key (or, without keys, the operator on loopback); to anyone
    else status and reasons only: no login names, paths or module errors."""
    # 200 for "degraded" too: the process is up and answers, and a restart (what a 503
    # makes Docker or a load balancer do) fixes neither a login nor a missing CLI; alert
    # on the body's status
    me = call.app.keys.authenticate(call.headers, call.handler.client_address[0])
    call.send_json(200, call.app.health_report(full=me is not None and me.admin))


def metrics(call):
    call.send(200, call.app.metrics.render(call.app).encode(), "text/plain; version=0.0.4")


def dashboard(call):
    """The page: a static shell (no data in it), its script and style allowed by a nonce."""
    nonce = base64.b64encode(os.urandom(18)).decode()
    call.send(200, DASHBOARD_HTML.replace("__NONCE__", nonce).encode(), "text/html; charset=utf-8",
              (("Content-Security-Policy", DASHBOARD_CSP % {"nonce": nonce}),
               ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
               ("X-Frame-Options", "DENY"), ("Cache-Control", "no-store")))


def dashboard_data(call):
    call.send_json(200, call.app.dashboard_data(), [("Cache-Control", "no-store")])


@dataclass(frozen=True)
class Route:
    """One line of the route table.  `path` may hold parameters (`{id}`: one path segment,
    given to the function as call.params["id"]); a /v1/... path also answers without /v1,
    and every path with it.  `access`: "anyone" needs no key; "client" needs a key of any
    role (with no keys at all: anyone); "admin" an admin key (with no keys: the loopback
    operator)."""
    method: str
    path: str
    func: object
    access: str = "client"
    #: "json": a POST must carry a JSON body; "optional": one may come; "none": it takes none,
    #: and an announced one is never read (takes_body), as for a GET
    body: str = "json"

    def match(self, path):
        """{name: value} of the path parameters when `path` is this route's, else None."""
        mine, theirs = unversioned(self.path).split("/"), unversioned(path).split("/")
        if len(mine) != len(theirs):
            return None
        params = {}
        for want, got in zip(mine, theirs):
            if want[:1] == "{" and want[-1:] == "}" and got:
                params[want[1:-1]] = urllib.parse.unquote(got)
            elif want != got:
                return None
        return params


def unversioned(path):
    return path[3:] if path.startswith("/v1/") else path


#: the route table: one line a route
ROUTES = (
    Route("POST", "/v1/chat/completions", chat_completions),
    Route("POST", "/v1/responses", create_response),
    Route("POST", "/v1/responses/input_tokens", response_input_tokens),
    Route("POST", "/v1/responses/compact", compact_response),
    Route("GET", "/v1/responses/{id}", get_response),
    Route("DELETE", "/v1/responses/{id}", delete_response),
    Route("GET", "/v1/responses/{id}/input_items", response_input_items),
    Route("POST", "/v1/responses/{id}/cancel", cancel_response, body="none"),
    Route("POST", "/v1/conversations", create_conversation, body="optional"),
    Route("GET", "/v1/conversations/{id}", get_conversation),
    Route("POST", "/v1/conversations/{id}", update_conversation),
    Route("DELETE", "/v1/conversations/{id}", delete_conversation),
    Route("GET", "/v1/conversations/{id}/items", list_conversation_items),
    Route("POST", "/v1/conversations/{id}/items", add_conversation_items),
    Route("GET", "/v1/conversations/{id}/items/{item_id}", get_conversation_item),
    Route("DELETE", "/v1/conversations/{id}/items/{item_id}", delete_conversation_item),
    Route("POST", "/v1/messages", create_message),
    Route("POST", "/v1/messages/count_tokens", count_tokens),
    Route("GET", "/v1/models", list_models),
    Route("GET", "/v1/models/{id}", get_model),
    Route("GET", "/v1/usage", plan_usage),
    Route("GET", "/health", health, access="anyone"),
    Route("GET", "/metrics", metrics, access="admin"),
    Route("GET", "/", dashboard, access="anyone"),          # the shell holds no data
    Route("GET", "/dashboard", dashboard, access="anyone"),
    Route("GET", "/dashboard/data", dashboard_data, access="admin"),
)


def find_route(method, path):
    """(route, params, methods): the route for `method` and `path` (None if there is none)
    and every method the path answers (for a 405's Allow header)."""
    found, methods = (None, {}), []
    for route in ROUTES:
        params = route.match(path)
        if params is not None:
            methods.append(route.method)
            if route.method == method and found[0] is None:
                found = (route, params)
    return found + (sorted(set(methods)),)


def no_route(call, methods):
    """The 405 (the path exists with other methods) or 404 for a request no route takes."""
    if methods:
        return MethodNotAllowed("Method %s is not allowed on %s; use %s."
                                % (call.method, call.path, " or ".join(methods)),
                                headers={"Allow": ", ".join(methods)})
    return NotFound("No route %s %s. Routes: %s." % (
        call.method, call.path, ", ".join("%s %s" % (r.method, r.path) for r in ROUTES)))


# -- the request path ---------------------------------------------------------------------------
# Handler.serve runs these steps in order, each a few lines that refuse (a ProxyError) or move
# on, as http.server's parse_request does: admitted -> no body for GET & co (skip_body) ->
# Host -> Origin -> key -> body type -> body -> JSON -> route.  Until the body is read, a
# refusal closes the connection: the bytes left unread would otherwise be parsed as the next
# request.

#: what a Host header may name when no keys are set (plus the bound address and
#: CLAUDE_PROXY_ALLOWED_HOSTS; a wildcard bind also takes any IP address)
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
#: body types a web page may send anywhere without a CORS preflight
FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def host_name(value):
    """A Host header's name, without its port or IPv6 brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    name, _, port = value.rpartition(":")
    return name if name and port.isdigit() else value.rstrip(":")


def is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def check_host(call):
    """DNS rebinding: a page whose own name resolves to this machine would be same-origin with
    the proxy.  Without keys only Host names that name this server are served; with keys the
    page has no key to send."""
    cfg, hosts = call.app.cfg, call.headers.get_all("Host") or []
    if len(hosts) > 1:
        raise BadRequest("The request has %d Host headers; send one." % len(hosts))
    if not hosts or call.app.keys.principals or "*" in cfg.allowed_hosts:
        return                        # no Host: HTTP/1.0 (health checks); browsers always send it
    name = host_name(hosts[0])
    if name in call.app.host_names or (cfg.host in WILDCARD_ADDRESSES and is_ip(name)):
        return
    raise Forbidden("Host %r does not name this server. A reverse proxy's name goes into "
                    "CLAUDE_PROXY_ALLOWED_HOSTS." % hosts[0][:100])


def cors_origin(cfg, headers):
    """The request's Origin when CLAUDE_PROXY_CORS_ORIGINS allows it, else None."""
    origin, allowed = headers.get("Origin"), cfg.cors_origins
    if not origin or not allowed:
        return None
    return origin if ("*" in allowed or origin in allowed) else None


def check_origin(call):
    """A web page's request (browsers send Origin on every cross-site POST, preflight or not):
    served only from an origin in CLAUDE_PROXY_CORS_ORIGINS or from this server's own pages."""
    origin, host = call.headers.get("Origin"), call.headers.get("Host") or ""
    if origin is None or cors_origin(call.app.cfg, call.headers) or \
            origin.lower() in ("http://" + host.lower(), "https://" + host.lower()):
        return
    raise Forbidden("Requests from the web page at %r are refused; to allow that page, add its "
                    "origin to CLAUDE_PROXY_CORS_ORIGINS." % origin[:100])


def preflight(call):
    """The answer to a CORS preflight (OPTIONS) from an allowed origin."""
    call.status = 204
    h = call.handler
    h.send_response(204)
    h.send_header("Access-Control-Allow-Methods", ", ".join(sorted(
        {r.method for r in ROUTES} | {"OPTIONS"})))
    h.send_header("Access-Control-Allow-Headers",
                  call.headers.get("Access-Control-Request-Headers") or
                  "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta")
    h.send_header("Access-Control-Max-Age", "600")
    h.send_header("Content-Length", "0")
    h.end_headers()


def authenticate(call):
    """The Principal of the request's key, from the headers alone (a caller without one is
    answered before a byte of its body is read), or the 401 / 403 its route's access asks
    for; None on routes anyone may call.  An unknown route asks for a key too."""
    if call.route is not None and call.route.access == "anyone":
        return None
    me = call.app.keys.authenticate(call.headers, call.handler.client_address[0])
    if me is None:
        raise Unauthorized("Invalid or missing API key: send one of this proxy's keys "
                           "(CLAUDE_PROXY_KEYS_FILE, CLAUDE_PROXY_API_KEYS) as "
                           "'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
    if call.route is not None and call.route.access == "admin" and not me.admin:
        raise Forbidden("%s is for admin keys only; key %r is a %s key."
                        % (call.route.path, me.name, me.role))
    return me


def check_body_type(call):
    """A body a web page could send without a preflight (a form type or text/plain) is
    refused, whatever its Origin says; on a POST that takes no body too (a page's form could
    still cancel a response on a proxy without keys)."""
    if call.method not in BODY_METHODS:
        return
    content_type = (call.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES:
        raise ProxyError("Content-Type %s is not accepted (a web page can send it to any "
                         "address); send the JSON body with 'Content-Type: application/json' "
                         "(curl: -H 'Content-Type: application/json'; -d alone sends a form "
                         "type)." % content_type, status=415, error_type="invalid_request_error")


BODY_METHODS = ("POST", "PUT", "PATCH")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


def takes_body(call):
    """Whether the request's body is read: a method with one (BODY_METHODS), on a route that
    takes one (a path no route takes is read, then answered 404/405)."""
    return call.method in BODY_METHODS and (call.route is None or call.route.body != "none")


def skip_body(call):
    """A request that takes no body (GET, HEAD, DELETE, OPTIONS, ..., and a POST route that
    takes none: takes_body) never has one read, not even to skip it: anyone may call GET
    /health, and reading the body it announces would let a caller hold a thread for as long
    as it trickles.  Such a request is answered and its connection closed (the unread bytes
    would be parsed as the next request)."""
    lengths = set(call.headers.get_all("Content-Length") or ()) - {"0"}
    if not takes_body(call) and (lengths or call.headers.get_all("Transfer-Encoding")):
        call.handler.close_connection = True


def read_body(call):
    """The request's body bytes (None for a method without one): framed by one Content-Length
    of ASCII digits or by `Transfer-Encoding: chunked` (hex sizes), at most
    CLAUDE_PROXY_MAX_BODY bytes in all (RFC 9112 6-7), arrived whole within
    CLAUDE_PROXY_READ_TIMEOUT (BodyReader), or a 4xx."""
    h, headers, max_body = call.handler, call.headers, call.app.cfg.max_body
    if not takes_body(call):                      # skip_body: never read
        return None
    lengths = set(headers.get_all("Content-Length") or ())
    codings = headers.get_all("Transfer-Encoding") or []
    chunked = [c.strip().lower() for c in codings] == ["chunked"]
    length = next(iter(lengths)) if len(lengths) == 1 else None
    if codings and (not chunked or lengths):
        raise BadRequest("Transfer-Encoding must be 'chunked' alone, without Content-Length; "
                         "got %r." % ", ".join(codings)[:80])
    if len(lengths) > 1:
        raise BadRequest("The request has several different Content-Length headers.")
    reader = BodyReader(h, call.app.cfg.read_timeout)
    try:
        return read_chunked(reader, max_body) if chunked else read_sized(reader, length, max_body)
    except TimeoutError:
        raise ProxyError("The request body did not arrive whole within %gs "
                         "(CLAUDE_PROXY_READ_TIMEOUT)." % call.app.cfg.read_timeout,
                         status=408, error_type="invalid_request_error")
    except OSError:
        raise ClientGone()
    finally:
        reader.done()


class BodyReader:
    """The handler's rfile against one deadline for the whole body, as Waiting bounds the
    whole head: before each receive the socket's timeout is the time left, so a sender
    trickling a byte at a time is cut off too (TimeoutError); a timeout per receive alone
    would let it hold its thread for ever."""

    def __init__(self, h, seconds):
        self.rfile, self.sock, self.seconds = h.rfile, h.connection, seconds
        self.deadline = time.monotonic() + seconds

    def _arm(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request body's deadline passed")
        self.sock.settimeout(left)

    def read(self, n):
        """n bytes, fewer only at the end of the stream."""
        parts, got = [], 0
        while got < n:
            self._arm()
            data = self.rfile.read1(min(n - got, 65536))    # at most one receive
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def readline(self, limit):
        """A line up to and with its LF, at most `limit` bytes."""
        line = b""
        while len(line) < limit and not line.endswith(b"\n"):
            self._arm()
            ahead = self.rfile.peek(1)[:limit - len(line)]   # at most one receive
            if not ahead:
                break
            end = ahead.find(b"\n")
            line += self.rfile.read(len(ahead) if end < 0 else end + 1)   # from the buffer
        return line

    def done(self):
        """The connection's own timeout again, for the next request head."""
        try:
            self.sock.settimeout(self.seconds)
        except OSError:
            pass


def read_sized(reader, length, max_body):
    if length is None:
        raise ProxyError("A Content-Length header is required.", status=411,
                         error_type="invalid_request_error")
    if not (length.isascii() and length.isdigit()):
        raise BadRequest("Content-Length must be a non-negative integer, got %r." % length[:40])
    if int(length) > max_body:
        raise TooLarge("The request body is %s bytes; the limit is %d (CLAUDE_PROXY_MAX_BODY)."
                       % (length, max_body))
    raw = reader.read(int(length))
    if len(raw) < int(length):
        raise BadRequest("The request body ended before Content-Length bytes arrived.")
    return raw


def read_chunked(reader, max_body):
    """A chunked body; its sizes (and any trailer lines) count against max_body."""
    parts, total = [], 0
    while True:
        line = reader.readline(80)
        size = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\r\n") or not CHUNK_SIZE.fullmatch(size):
            raise BadRequest("Malformed chunked request body: a chunk size must be a hex number "
                             "on a line of its own, got %r." % line[:40].decode("latin-1"))
        total += int(size, 16)
        if total > max_body:
            raise TooLarge("The request body exceeds %d bytes (CLAUDE_PROXY_MAX_BODY)." % max_body)
        if not int(size, 16):
            break
        data = reader.read(int(size, 16))
        if len(data) < int(size, 16) or reader.read(2) != b"\r\n":
            raise BadRequest("Malformed chunked request body: a chunk ended early or without CRLF.")
        parts.append(data)
    while True:                                   # trailer fields, up to the empty line
        line = reader.readline(1024)
        total += len(line)
        if total > max_body:
            raise TooLarge("The request body exceeds %d bytes (CLAUDE_PROXY_MAX_BODY)." % max_body)
        if line == b"\r\n":
            return b"".join(parts)
        if not line.endswith(b"\r\n"):
            raise BadRequest("Malformed chunked request body: it ended before its last line.")


def parse_json(raw):
    """The body as JSON (None without a body), or a 400 saying what is wrong with it."""
    if raw is None:
        return None
    if not raw.strip():
        return None                      # the route says whether it needs one (Route.body)
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


def record(call):
    """The request's figures (no text of it) into the dashboard's RequestLog."""
    req, u = call.req, call.usage
    label = call.route.path if call.route else "other"
    if label in RequestLog.QUIET or call.method == "OPTIONS":
        return
    agent = re.sub(r"[^\x20-\x7e]", "?", call.headers.get("User-Agent") or "")
    call.app.requests.add({
        "t": round(time.time(), 3), "id": call.request_id, "method": call.method,
        "route": label, "client": agent[:120], "model": call.model,
        "account": req.account if req else "", "status": call.status,
        "stream": bool(req and req.stream),
        "ttft_ms": None if call.ttft is None else round(call.ttft * 1000, 1),
        "ms": round((time.monotonic() - call.started) * 1000, 1),
        "in": u.input_tokens if u else 0, "out": u.output_tokens if u else 0,
        "cache_read": u.cache_read if u else 0, "cache_write": u.cache_write if u else 0,
        "served_by": req.served_by if req else "", "retried": bool(req and req.retried),
        "key": call.principal.name if call.principal else ""}, u)
    if req is not None and call.principal is not None and not call.background:
        # a model request: its figures kept (a background run's when the run ends)
        call.app.history.add((
            time.time(), call.principal.name, req.account or "", req.cli_model, label,
            call.status, u.input_tokens if u else 0, u.output_tokens if u else 0,
            u.cache_read if u else 0, u.cache_write if u else 0,
            None if call.ttft is None else round(call.ttft * 1000, 1),
            round((time.monotonic() - call.started) * 1000, 1), req.served_by or ""))


def printable(text):
    """Client text for a log line: anything but printable ASCII as \\xNN (a path must not
    write terminal escapes or fake lines into the log)."""
    return re.sub(r"[^\x21-\x7e]", lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256
                  else "\\u%04x" % ord(m.group()), text)


def log_access(call):
    u = call.usage
    fields = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S"), "id": call.request_id,
              "method": printable(call.method), "path": printable(call.path),
              "status": call.status, "ms": round((time.monotonic() - call.started) * 1000, 1),
              "model": printable(call.model),
              "tokens_in": u.prompt_tokens if u else 0, "tokens_out": u.output_tokens if u else 0}
    if call.app.cfg.log_format == "json":
        line = json.dumps(fields)
    else:
        line = "%(ts)s %(id)s %(method)s %(path)s %(status)s %(ms).0fms model=%(model)s " \
               "in=%(tokens_in)s out=%(tokens_out)s" % fields
    sys.stderr.write(line + "\n")


class Handler(BaseHTTPRequestHandler):
    """http.server's handler: every do_<METHOD> runs `serve`, the one request path."""
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

    def log_message(self, fmt, *args):   # log_access replaces http.server's log
        pass

    def handle_one_request(self):
        # from the first byte of a request head to its end the connection is `waiting`: bounded
        # in number and in time (Waiting), so stalled heads never keep a real request out
        self.server.waiting.enter(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.waiting.leave(self.connection)

    def serve(self):
        """One request, start to end: the steps of the request path, then its route; every
        error is answered in the caller's dialect, and the request is counted and logged."""
        if not self.server.waiting.leave(self.connection):
            self.close_connection = True     # dropped while its head arrived: not served
            return
        app, call = self.server.app, Call(self)
        app.enter()
        try:
            call.route, call.params, methods = find_route(call.method, call.path)
            skip_body(call)
            check_host(call)
            check_origin(call)
            if call.method == "OPTIONS" and cors_origin(app.cfg, call.headers):
                return preflight(call)
            call.principal = authenticate(call)
            check_body_type(call)
            raw = read_body(call)
            call.body_read = True
            call.body = parse_json(raw)
            if call.route is None:
                raise no_route(call, methods)
            if call.body is None and call.route.body == "json" and call.method in BODY_METHODS:
                raise BadRequest("The request body is empty; send a JSON object.")
            call.route.func(call)
        except ProxyError as err:
            if not call.body_read:
                self.close_connection = True  # what was not read would be taken as a request
            call.send_error(err)
        except ClientGone:                   # hung up: before its answer, or while it was sent
            self.close_connection = True
            call.status = ClientGone.status
        except Exception as exc:  # noqa: BLE001 - the server never dies, the client gets a 500
            log_line("request %s: internal error: %s: %s"
                     % (call.request_id, type(exc).__name__, printable(str(exc))[:300]))
            traceback.print_exc(file=sys.stderr)
            call.send_error(ProxyError("Internal proxy error; see the proxy's log."))
        finally:
            app.leave()
            app.metrics.request(call.route.path if call.route else "other", call.status, call.usage)
            record(call)
            log_access(call)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = serve

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too large) as JSON, not HTML;
        a method with no do_<METHOD> (PROPFIND, FOO) is routed: 405 or 404, not a 501."""
        if code == HTTPStatus.NOT_IMPLEMENTED and getattr(self, "headers", None) is not None:
            return self.serve()
        self.close_connection = True
        if self.request_version == "HTTP/0.9":      # unparseable request line: answer in 1.1
            self.request_version = "HTTP/1.1"
        _status, body = DIALECTS["openai"].error(ProxyError(message or "Bad request", status=code,
                                                             error_type="invalid_request_error"))
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Request-Id", new_id("req_", 16))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (OSError, ClientGone):
            pass

    def end_headers(self):
        origin = cors_origin(self.server.app.cfg, self.headers) \
            if getattr(self, "headers", None) else None
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
            self.send_header("Access-Control-Expose-Headers",
                             "X-Request-Id, Retry-After, x-ratelimit-remaining-requests, "
                             "x-ratelimit-reset-requests, X-Claude-Account, "
                             "anthropic-ratelimit-unified-status, "
                             "anthropic-ratelimit-unified-reset, anthropic-ratelimit-unified-type, "
                             "anthropic-ratelimit-unified-utilization")
        try:
            super().end_headers()         # the first write of every answer
        except (OSError, ValueError) as exc:
            raise ClientGone() from exc


# -- the dashboard page (GET / and /dashboard) --------------------------------------------------
# One static shell: everything it shows comes from GET dashboard/data (a relative URL, so the
# page works behind a reverse proxy at a sub-path), polled every 3 s; values are inserted as
# text, never as markup.  No external assets; the CSP allows only this response's own inline
# style and script (a per-response nonce) and requests to this origin.

DASHBOARD_CSP = ("default-src 'none'; script-src 'nonce-%(nonce)s'; style-src 'nonce-%(nonce)s'; "
                 "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                 "frame-ancestors 'none'")

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>claude-proxy</title>
<link rel="icon" href="data:,">
<style nonce="__NONCE__">
:root { --bg: #f5f6f8; --card: #fff; --ink: #1d2330; --dim: #687085; --line: #e1e4ea;
        --ok: #1f9d55; --warn: #d98e04; --bad: #d6336c; --accent: #3b6fd8; --accent2: #8a5cd8; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #14171d; --card: #1d2129; --ink: #e3e6ec; --dim: #98a0b3; --line: #2e3440; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 12px; padding: 12px 20px;
         background: var(--card); border-bottom: 1px solid var(--line); }
header h1 { font-size: 18px; margin: 0; }
main, #keyform, #reasons { padding: 0 20px; }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: var(--dim);
     margin: 18px 0 8px; display: flex; align-items: center; gap: 10px; }
.dim { color: var(--dim); }
.badge { padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 12px;
         background: var(--line); }
.badge.ok { background: var(--ok); color: #fff; }
.badge.degraded, .badge.bad { background: var(--bad); color: #fff; }
.badge.warn { background: var(--warn); color: #fff; }
#updated.stale { color: var(--bad); }
#reasons ul { margin: 10px 0 0; padding: 8px 12px 8px 28px; background: #fde8ef; color: #8a1538;
              border-radius: 6px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 10px 14px; min-width: 0; }
.card h3 { margin: 0 0 6px; font-size: 15px; display: flex; gap: 8px; align-items: center; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; }
dt { color: var(--dim); }
dd { margin: 0; overflow-wrap: anywhere; }
.window { margin: 8px 0; }
.window .label { display: flex; justify-content: space-between; gap: 8px; font-size: 13px; }
.bar { height: 10px; background: var(--line); border-radius: 5px; overflow: hidden;
       margin-top: 3px; }
.bar .fill { height: 100%; background: var(--ok); width: 0; }
.bar .fill.warn { background: var(--warn); }
.bar .fill.bad { background: var(--bad); }
.hint { background: #fff4db; color: #6b4a00; padding: 6px 8px; border-radius: 6px; margin: 6px 0; }
.hint code, td code { font-size: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 14px; }
.plot svg { width: 100%; height: 120px; display: block; }
.plot .legend { font-size: 12px; color: var(--dim); display: flex; gap: 12px; }
.plot .legend i { display: inline-block; width: 10px; height: 3px; vertical-align: middle;
                  margin-right: 4px; background: var(--accent); }
.plot .legend i.s1 { background: var(--accent2); }
.plot .legend i.err { background: var(--bad); }
svg .s0 { stroke: var(--accent); fill: none; stroke-width: 1.6; }
svg .s1 { stroke: var(--accent2); fill: none; stroke-width: 1.6; }
svg .barv { fill: var(--accent); }
svg .barv.err { fill: var(--bad); }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg text { fill: var(--dim); font-size: 10px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line);
         white-space: nowrap; }
th { color: var(--dim); font-weight: 600; position: sticky; top: 0; background: var(--card); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.client { max-width: 220px; overflow: hidden; text-overflow: ellipsis; }
/* a table inside a card scrolls sideways within it rather than spilling over the next card */
.tablewrap { overflow-x: auto; max-width: 100%; }
.card td.wrap { white-space: normal; overflow-wrap: anywhere; }
.note { font-size: 12px; color: var(--dim); margin: 4px 0 8px; }
tr.err td { background: #fde8ef; color: #8a1538; }
.scroll { max-height: 520px; overflow: auto; background: var(--card); border: 1px solid var(--line);
          border-radius: 8px; }
#config td { white-space: normal; overflow-wrap: anywhere; font-size: 12px; padding: 1px 6px; }
#config td:first-child { color: var(--dim); white-space: nowrap; }
#keyform { margin: 16px 0; }
#keyform .card { max-width: 520px; }
input, select, button { font: inherit; }
input[type=password] { padding: 4px 6px; width: 260px; }
#page-errors { color: var(--bad); }
footer { padding: 16px 20px; color: var(--dim); font-size: 12px; }
</style>
</head>
<body data-state="loading" data-errors="0">
<header>
  <h1>claude-proxy</h1>
  <span id="health" class="badge">loading</span>
  <span id="meta" class="dim"></span>
  <span id="updated" class="dim"></span>
</header>
<div id="reasons"></div>
<form id="keyform" hidden>
  <div class="card">
    <h3>API key</h3>
    <p id="keymsg" class="dim"></p>
    <input type="password" id="key" autocomplete="off" placeholder="one of CLAUDE_PROXY_API_KEYS">
    <button type="submit">Show dashboard</button>
    <p class="dim">Kept in this tab's sessionStorage and sent as an Authorization header.</p>
  </div>
</form>
<main id="main" hidden>
  <h2>Plan limits</h2>
  <div class="grid" id="accounts"></div>
  <h2>Keys and budgets</h2>
  <div class="grid" id="keys"></div>
  <h2>Usage history</h2>
  <p class="note" id="estimate-note"></p>
  <div class="plots" id="history-plots"></div>
  <div class="grid">
    <div><h2>Per key</h2><div class="card"><div class="tablewrap">
      <table id="history-keys"></table></div></div></div>
    <div><h2>Per model</h2><div class="card"><div class="tablewrap">
      <table id="history-models"></table></div></div></div>
  </div>
  <h2>Last hour, per minute</h2>
  <div class="plots" id="plots"></div>
  <div class="grid">
    <div><h2>Capacity</h2><div class="card" id="capacity"></div></div>
    <div><h2>CLI and logins</h2><div class="card" id="cli"></div></div>
    <div><h2>Config <span class="dim">(CLAUDE_PROXY_&hellip;)</span></h2>
      <div class="card"><table id="config"></table></div></div>
  </div>
  <h2>Last requests
    <select id="filter" aria-label="filter by status">
      <option value="all">all</option><option value="ok">2xx/3xx</option>
      <option value="errors">errors (4xx/5xx)</option><option value="4xx">4xx</option>
      <option value="5xx">5xx</option>
    </select>
    <select id="keyfilter" aria-label="filter by key"><option value="">all keys</option></select>
    <span id="count" class="dim"></span>
  </h2>
  <div class="scroll">
    <table id="requests">
      <thead><tr><th>time</th><th>request id</th><th>route</th><th>client</th><th>model</th>
        <th>login</th><th class="num">status</th><th class="num">TTFT ms</th><th class="num">ms</th>
        <th class="num">in</th><th class="num">out</th><th class="num">cache read</th>
        <th class="num">cache write</th><th>served by</th><th>key</th></tr></thead>
      <tbody></tbody>
    </table>
  </div>
</main>
<ol id="page-errors" hidden></ol>
<footer>Figures only: the proxy keeps no prompt or answer text.
  <button id="forget" type="button" hidden>Forget key</button></footer>
<script nonce="__NONCE__">
"use strict";
(function () {
  // -- helpers ---------------------------------------------------------------------------------
  var $ = function (id) { return document.getElementById(id); };
  var errorList = $("page-errors");
  function pageError(text) {        // a page that broke says so (and the browser test reads it)
    var li = document.createElement("li");
    li.textContent = String(text).slice(0, 300);
    errorList.appendChild(li);
    errorList.hidden = false;
    document.body.dataset.errors = String(errorList.children.length);
  }
  window.addEventListener("error", function (e) { pageError("error: " + e.message); });
  window.addEventListener("unhandledrejection", function (e) {
    pageError("unhandled: " + (e.reason && e.reason.message || e.reason));
  });
  document.addEventListener("securitypolicyviolation", function (e) {
    pageError("CSP blocked " + e.violatedDirective + " " + e.blockedURI);
  });

  // every value from the server goes in as text, never as markup (clients name themselves)
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function add(parent) {            // append the children, return the parent
    for (var i = 1; i < arguments.length; i++) parent.appendChild(arguments[i]);
    return parent;
  }
  function put(parent, child) {     // append one child, return it
    parent.appendChild(child);
    return child;
  }
  function defs(pairs) {
    var dl = el("dl");
    pairs.forEach(function (p) { add(dl, el("dt", "", p[0]), el("dd", "", p[1])); });
    return dl;
  }
  function num(n) {
    if (n === null || n === undefined) return "-";
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return String(Math.round(n * 10) / 10);
  }
  function span(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    var d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600),
        m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }
  var WINDOW_NAMES = {five_hour: "5-hour", seven_day: "7-day", seven_day_opus: "7-day Opus",
                      seven_day_sonnet: "7-day Sonnet", overage: "extra usage"};
  function level(status, utilization) {
    if (/reject|exceed|block/.test(status || "") || utilization >= 1) return "bad";
    if (/warn/.test(status || "") || utilization >= 0.8) return "warn";
    return "";
  }

  // -- state -----------------------------------------------------------------------------------
  var KEY = "claude-proxy-key", skew = 0, last = null, timer = null;
  function key() { try { return sessionStorage.getItem(KEY) || ""; } catch (e) { return ""; } }
  function now() { return Date.now() / 1000 + skew; }       // the server's clock

  // -- rendering -------------------------------------------------------------------------------
  function renderHealth(d) {
    var h = d.health, badge = $("health");
    badge.textContent = h.status;
    badge.className = "badge " + (h.status === "ok" ? "ok" : "degraded");
    $("meta").textContent = "v" + d.version + " \u00b7 up " + span(h.uptime_s);
    var box = $("reasons");
    box.textContent = "";
    if (h.reasons && h.reasons.length) {
      var ul = put(box, el("ul"));
      h.reasons.forEach(function (r) { add(ul, el("li", "", r)); });
    }
  }

  function renderAccounts(d) {
    var box = $("accounts"), guard = (d.usage.guard || {}).extra_usage;
    box.textContent = "";
    (d.usage.accounts || []).forEach(function (a) {
      var card = put(box, el("div", "card account"));
      card.dataset.account = a.name;
      var title = put(card, el("h3", "", a.name));
      add(title, el("span", "badge " + (a.healthy ? "ok" : "bad"),
                    a.healthy ? "logged in" : "not logged in"));
      if (a.hint) add(card, el("div", "hint", a.hint));
      var names = Object.keys(a.windows || {});
      if (!names.length) {
        add(card, el("p", "dim", "No plan windows reported yet: the CLI reports them with a " +
                                 "subscription login, after its first request."));
      }
      names.forEach(function (name) {
        var w = a.windows[name], pct = Math.max(0, Math.min(1, w.utilization || 0)) * 100;
        var row = put(card, el("div", "window"));
        row.dataset.window = name;
        var label = put(row, el("div", "label"));
        add(label, el("span", "", (WINDOW_NAMES[name] || name) + " \u00b7 " +
                                  Math.round(pct) + "% \u00b7 " + (w.status || "?")));
        var reset = put(label, el("span", "dim reset"));
        reset.dataset.reset = String(w.resets_at || 0);
        var fill = put(put(row, el("div", "bar")),
                       el("div", "fill " + level(w.status, w.utilization)));
        fill.style.width = pct.toFixed(1) + "%";     // CSSOM: allowed by the page's CSP
      });
      var x = a.extra_usage || {};
      add(card, defs([["extra usage", (x.status || "unknown") + (x.in_use ? " (in use now)" : "")],
                      ["guard", guard === "deny" ? "extra usage denied" :
                                guard === "allow" ? "extra usage allowed" : String(guard)],
                      ["reported", a.updated_at ? span(now() - a.updated_at) + " ago" : "never"]]));
      var models = Object.keys(a.tokens || {});
      if (models.length) {
        var t = put(put(card, el("div", "tablewrap")), el("table", "tokens"));
        add(t, add(el("tr"), el("th", "", "model"), el("th", "num", "in"), el("th", "num", "out"),
                   el("th", "num", "cache read"), el("th", "num", "cache write")));
        models.forEach(function (m) {
          var u = a.tokens[m];
          add(t, add(el("tr"), el("td", "", m), el("td", "num", num(u.input)),
                     el("td", "num", num(u.output)), el("td", "num", num(u.cache_read)),
                     el("td", "num", num(u.cache_write))));
        });
      }
    });
    tick();
  }

  function renderCapacity(d) {
    var h = d.health, c = h.concurrency, box = $("capacity");
    box.textContent = "";
    var slots = put(box, el("div", "window"));
    put(put(slots, el("div", "label")), el("span", "", "slots: " + c.running + " of " +
        c.capacity + " running, " + c.queued + " queued"));
    var fill = put(put(slots, el("div", "bar")), el("div", "fill" + (c.queued ? " warn" : "")));
    fill.style.width = (100 * c.running / Math.max(1, c.capacity)).toFixed(1) + "%";
    add(box, defs([["CLI processes started", h.cli_processes_started],
                   ["history", h.history]]));
    // the idle store (IdleStore): what waits now and what served, by kind; then its limits
    var idle = h.idle || {}, waiting = idle.idle || {}, hits = idle.hits || {};
    var KINDS = [["kept", "holding a conversation"], ["reused", "reset after a request"],
                 ["initialized", "pre-started, initialized ahead"], ["pool", "pre-started"]];
    add(box, el("h3", "", "idle CLI processes"));
    var t = put(put(box, el("div", "tablewrap")), el("table", "idle"));
    add(t, add(el("tr"), el("th", "", "kind"), el("th", "num", "waiting"),
               el("th", "num", "requests served")));
    KINDS.forEach(function (k) {
      var tr = put(t, el("tr"));
      tr.dataset.kind = k[0];
      add(tr, el("td", "wrap", k[0] + " (" + k[1] + ")"), el("td", "num", num(waiting[k[0]] || 0)),
          el("td", "num", num(hits[k[0]] || 0)));
    });
    var spawned = put(t, el("tr"));
    spawned.dataset.kind = "spawned";
    add(spawned, el("td", "", "spawned (none fitted)"), el("td", "num", "-"),
        el("td", "num", num(idle.misses || 0)));
    add(box, defs([["mode", idle.mode], ["budget", idle.budget], ["pool size", idle.pool_size],
                   ["kept at most", idle.sessions], ["requests per process", idle.reuse],
                   ["recycled", idle.recycled], ["evicted", idle.evicted],
                   ["start failures", idle.start_failures], ["sized", idle.sized]]));
  }
  function renderCli(d) {
    var box = $("cli"), cli = d.cli;
    box.textContent = "";
    add(box, defs([["path", cli.path], ["found", cli.found ? "yes" : "NO (set CLAUDE_BIN)"],
                   ["version", cli.version || "unknown"],
                   ["handlers", (d.health.handlers || []).join(", ")]]));
    var errs = d.health.module_errors || {};
    Object.keys(errs).forEach(function (m) { add(box, el("div", "hint", m + ": " + errs[m])); });
    add(box, el("h3", "", "logins"));
    (d.usage.accounts || []).forEach(function (a) {
      var row = put(box, el("div", "login"));
      add(row, el("span", "badge " + (a.healthy ? "ok" : "bad"), a.healthy ? "ok" : "failing"));
      add(row, document.createTextNode(" " + a.name));
      if (a.hint) add(box, el("div", "hint", a.hint));
    });
    var t = $("config");
    t.textContent = "";
    d.config.forEach(function (c) {
      var name = el("td", "", c.name.replace(/^CLAUDE_PROXY_/, ""));
      name.title = c.name;
      add(t, add(el("tr"), name, el("td", "", c.value === "" ? "-" : c.value)));
    });
  }

  // -- plots (inline SVG) ----------------------------------------------------------------------
  var SVGNS = "http://www.w3.org/2000/svg", W = 300, H = 110, PAD = 18;
  function svg(tag, attrs) {
    var node = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function plot(title, series, opts) {
    var card = el("div", "card plot");
    card.dataset.plot = opts.id;
    add(card, el("h3", "", title));
    var root = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": title});
    var n = series[0].values.length, max = opts.max || 0;
    series.forEach(function (s) {
      s.values.forEach(function (v) { if (v !== null && v > max) max = v; });
    });
    max = max || 1;
    var x = function (i) { return PAD + (W - PAD - 4) * i / Math.max(1, n - 1); };
    var y = function (v) { return H - PAD - (H - 2 * PAD) * v / max; };
    add(root, svg("line", {"class": "grid", x1: PAD, x2: W - 4, y1: H - PAD, y2: H - PAD}),
        svg("line", {"class": "grid", x1: PAD, x2: W - 4, y1: PAD, y2: PAD}));
    var top = svg("text", {x: PAD, y: PAD - 5});
    top.textContent = opts.fmt(max);
    var left = svg("text", {x: PAD, y: H - 4});
    left.textContent = opts.left || "-60 min";
    var right = svg("text", {x: W - 4, y: H - 4, "text-anchor": "end"});
    right.textContent = opts.right || "now";
    add(root, top, left, right);
    series.forEach(function (s, si) {
      if (s.bars) {
        var bw = Math.max(1, (W - PAD - 4) / n - 1);
        s.values.forEach(function (v, i) {
          if (!v) return;
          var err = s.errors ? s.errors[i] : 0;
          add(root, svg("rect", {"class": "barv", x: x(i) - bw / 2, y: y(v), width: bw,
                                 height: H - PAD - y(v)}));
          if (err) add(root, svg("rect", {"class": "barv err", x: x(i) - bw / 2, y: y(err),
                                          width: bw, height: H - PAD - y(err)}));
        });
        return;
      }
      var d = "", pen = "M";
      s.values.forEach(function (v, i) {
        if (v === null || v === undefined) { pen = "M"; return; }
        d += pen + x(i).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = "L";
      });
      if (d) add(root, svg("path", {"class": "s" + si, d: d}));
      // a lone point (one busy minute) is a dot, not an invisible line
      s.values.forEach(function (v, i) {
        var before = s.values[i - 1], after = s.values[i + 1];
        if (v !== null && v !== undefined && (before === null || before === undefined) &&
            (after === null || after === undefined))
          add(root, svg("circle", {"class": "s" + si, cx: x(i), cy: y(v), r: 1.8}));
      });
    });
    add(card, root);
    var legend = put(card, el("div", "legend"));
    series.forEach(function (s, si) {
      var item = put(legend, el("span"));
      add(item, el("i", "s" + si), document.createTextNode(s.name));
      if (s.errors) { item = put(legend, el("span")); add(item, el("i", "err"),
                                                         document.createTextNode("errors")); }
    });
    return card;
  }
  function renderPlots(d) {
    var m = d.minutes, pick = function (k) { return m.map(function (r) { return r[k]; }); };
    var share = m.map(function (r) { return r.cache_share === null ? null : 100 * r.cache_share; });
    var box = $("plots");
    box.textContent = "";
    add(box,
        plot("Requests per minute", [{name: "requests", values: pick("requests"), bars: true,
                                      errors: pick("errors")}],
             {id: "requests", fmt: num}),
        plot("Time to first token (ms)", [{name: "p50", values: pick("ttft_p50")},
                                          {name: "p95", values: pick("ttft_p95")}],
             {id: "ttft", fmt: num}),
        plot("Tokens per minute", [{name: "in", values: pick("tokens_in")},
                                   {name: "out", values: pick("tokens_out")}],
             {id: "tokens", fmt: num}),
        plot("Cache-read share of input (%)", [{name: "cache read", values: share}],
             {id: "cache", fmt: function (v) { return Math.round(v) + "%"; }, max: 100}));
  }

  // -- keys, budgets and the usage history ------------------------------------------------------
  var BUDGET_NAMES = {tokens_5h: "tokens", tokens_day: "tokens", tokens_week: "tokens",
                      requests_per_minute: "requests", concurrent: "requests running"};
  function usd(v) {
    if (v === null || v === undefined) return "-";
    return "$" + (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toFixed(4));
  }
  function renderKeys(d) {
    var box = $("keys");
    box.textContent = "";
    (d.keys || []).forEach(function (k) {
      var card = put(box, el("div", "card key"));
      card.dataset.key = k.name;
      var title = put(card, el("h3", "", k.name));
      add(title, el("span", "badge" + (k.role === "admin" ? " warn" : ""), k.role));
      add(card, defs([["models", k.models.length ? "models: " + k.models.join(", ") : "every model"],
                      ["logins", k.logins.length ? "logins: " + k.logins.join(", ") : "every login"]]));
      var any = false;
      Object.keys(k.budgets || {}).forEach(function (b) {
        var x = k.budgets[b];
        if (!x.limit) return;
        any = true;
        var pct = Math.max(0, Math.min(1, x.fill || 0)) * 100;
        var row = put(card, el("div", "window"));
        row.dataset.budget = b;
        var label = put(row, el("div", "label"));
        add(label, el("span", "", b + " \u00b7 " + Math.round(100 * (x.fill || 0)) + "% \u00b7 " +
                                  num(x.used) + " of " + num(x.limit) + " " + (BUDGET_NAMES[b] || "")));
        var frees = put(label, el("span", "dim"));
        if (x.frees_at) frees.dataset.frees = String(x.frees_at);
        var fill = put(put(row, el("div", "bar")), el("div", "fill " + level("", x.fill || 0)));
        fill.style.width = pct.toFixed(1) + "%";
      });
      if (!any) add(card, el("p", "dim", "No budgets: limited by the plan and the slots only."));
    });
  }
  function historyTable(id, rows, by) {
    var t = $(id);
    t.textContent = "";
    add(t, add(el("tr"), el("th", "", by), el("th", "num", "requests (7 d)"),
               el("th", "num", "in"), el("th", "num", "out"), el("th", "num", "cache read"),
               el("th", "num", "value 24 h"), el("th", "num", "value 7 d")));
    var day = {};
    rows.day.forEach(function (r) { day[r[by]] = r; });
    rows.week.forEach(function (r) {
      var tr = put(t, el("tr"));
      tr.dataset.row = r[by];
      add(tr, el("td", "wrap", r[by]), el("td", "num", num(r.requests)),
          el("td", "num", num(r.input)), el("td", "num", num(r.output)),
          el("td", "num", num(r.cache_read)),
          el("td", "num", usd(day[r[by]] ? day[r[by]].cost_usd : 0)),
          el("td", "num", usd(r.cost_usd)));
    });
    if (!rows.week.length) add(t, add(el("tr"), el("td", "dim", "no requests in the last 7 days")));
  }
  function renderHistory(d) {
    var h = d.usage_history || {}, e = h.estimate || {};
    $("estimate-note").textContent = "API-equivalent value: " + (e.what || "") + " (prices of " +
        e.prices_date + ", " + e.prices_source + ")." + (d.history && d.history.lost ?
        " " + d.history.lost + " request(s) could not be recorded." : "");
    var plots = $("history-plots");
    plots.textContent = "";
    if (h.error) {
      add(plots, el("p", "hint", "No usage history: " + h.error));
      $("history-keys").textContent = "";
      $("history-models").textContent = "";
      return;
    }
    var pick = function (k) { return h.days.map(function (r) { return r[k]; }); };
    add(plots,
        plot("Requests per day (30 days)", [{name: "requests", values: pick("requests"),
                                            bars: true, errors: pick("errors")}],
             {id: "days", fmt: num, left: "-30 d", right: "today"}),
        plot("Tokens per day", [{name: "in", values: pick("input")},
                                {name: "out", values: pick("output")}],
             {id: "daytokens", fmt: num, left: "-30 d", right: "today"}),
        plot("API-equivalent value per day (estimate)",
             [{name: "USD", values: pick("cost_usd"), bars: true}],
             {id: "dayvalue", fmt: usd, left: "-30 d", right: "today"}));
    historyTable("history-keys", h.by_key, "key");
    historyTable("history-models", h.by_model, "model");
  }
  function keyOptions(d) {          // the key filter lists every key and every key in the log
    var box = $("keyfilter"), want = box.value, names = [];
    (d.keys || []).forEach(function (k) { if (names.indexOf(k.name) < 0) names.push(k.name); });
    d.requests.forEach(function (r) { if (r.key && names.indexOf(r.key) < 0) names.push(r.key); });
    var have = [].map.call(box.options, function (o) { return o.value; }).slice(1);
    if (have.join("\n") === names.join("\n")) return;
    while (box.options.length > 1) box.remove(1);
    names.forEach(function (n) { var o = el("option", "", n); o.value = n; box.appendChild(o); });
    box.value = names.indexOf(want) >= 0 ? want : "";
  }

  // -- the request table -----------------------------------------------------------------------
  function wanted(status, filter) {
    if (filter === "ok") return status > 0 && status < 400;
    if (filter === "errors") return status >= 400 || status === 0;
    if (filter === "4xx") return status >= 400 && status < 500;
    if (filter === "5xx") return status >= 500;
    return true;
  }
  function renderRequests(d) {
    keyOptions(d);
    var filter = $("filter").value, who = $("keyfilter").value;
    var body = $("requests").tBodies[0], shown = 0;
    body.textContent = "";
    d.requests.forEach(function (r) {
      if (!wanted(r.status, filter) || (who && r.key !== who)) return;
      shown++;
      var tr = put(body, el("tr", r.status >= 400 || r.status === 0 ? "err" : ""));
      tr.dataset.status = String(r.status);
      var client = el("td", "client", r.client || "-");
      client.title = r.client || "";
      add(tr, el("td", "", new Date(r.t * 1000).toLocaleTimeString()), el("td", "", r.id),
          el("td", "", r.method + " " + r.route), client, el("td", "", r.model),
          el("td", "", r.account || "default"), el("td", "num", r.status),
          el("td", "num", r.ttft_ms === null ? "-" : num(r.ttft_ms)), el("td", "num", num(r.ms)),
          el("td", "num", num(r["in"])), el("td", "num", num(r.out)),
          el("td", "num", num(r.cache_read)), el("td", "num", num(r.cache_write)),
          el("td", "", (r.served_by || "-") + (r.retried ? " (retried)" : "")),
          el("td", "", r.key || "-"));
      tr.dataset.key = r.key || "";
    });
    $("count").textContent = shown + " of " + d.requests.length;
  }

  function render(d) {
    renderHealth(d);
    renderAccounts(d);
    renderKeys(d);
    renderHistory(d);
    renderCapacity(d);
    renderCli(d);
    renderPlots(d);
    renderRequests(d);
    tick();
  }

  function tick() {                 // reset countdowns move every second between polls
    var nodes = document.querySelectorAll("[data-reset]");
    for (var i = 0; i < nodes.length; i++) {
      var at = Number(nodes[i].dataset.reset);
      nodes[i].textContent = at ? "resets in " + span(at - now()) : "";
    }
    nodes = document.querySelectorAll("[data-frees]");      // rolling budgets: the oldest use
    for (i = 0; i < nodes.length; i++) {
      at = Number(nodes[i].dataset.frees);
      nodes[i].textContent = at ? "frees in " + span(at - now()) : "";
    }
  }

  // -- polling and the key ---------------------------------------------------------------------
  function showKeyForm(message) {
    $("main").hidden = true;
    $("keyform").hidden = false;
    $("keymsg").textContent = message;
    $("health").textContent = "locked";
    $("health").className = "badge";
    document.body.dataset.state = "locked";
  }
  function refresh() {
    clearTimeout(timer);
    var headers = {}, k = key();
    if (k) headers.Authorization = "Bearer " + k;
    fetch("dashboard/data", {headers: headers, cache: "no-store", credentials: "omit"})
      .then(function (r) {
        if (r.status === 401) {
          showKeyForm(k ? "That key was refused." : "This proxy needs one of its API keys.");
          return null;
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (d) {
        if (d) {
          skew = d.now - Date.now() / 1000;
          last = d;
          $("keyform").hidden = true;
          $("main").hidden = false;
          $("forget").hidden = !k;
          render(d);
          $("updated").textContent = "updated " + new Date().toLocaleTimeString();
          $("updated").className = "dim";
          document.body.dataset.state = "ready";
        }
        timer = setTimeout(refresh, document.hidden ? 15000 : 3000);
      })
      .catch(function (e) {
        $("updated").textContent = "update failed (" + e.message + "), retrying";
        $("updated").className = "stale";
        timer = setTimeout(refresh, 5000);
      });
  }
  $("keyform").addEventListener("submit", function (e) {
    e.preventDefault();
    try { sessionStorage.setItem(KEY, $("key").value.trim()); } catch (err) { pageError(err); }
    $("key").value = "";
    refresh();
  });
  $("forget").addEventListener("click", function () {
    try { sessionStorage.removeItem(KEY); } catch (err) { pageError(err); }
    refresh();
  });
  $("filter").addEventListener("change", function () { if (last) renderRequests(last); });
  $("keyfilter").addEventListener("change", function () { if (last) renderRequests(last); });
  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
  setInterval(tick, 1000);
  refresh();
})();
</script>
</body>
</html>
"""


class Waiting:
    """Connections still sending a request head, or idle between requests: at most `bound`
    of them, each for at most `seconds` in all.  At the bound the one waiting longest is
    dropped, so a crowd of stalled connections never keeps a new request out (nor holds a
    thread and a descriptor each for long)."""

    def __init__(self, bound, seconds):
        self.bound, self.seconds = bound, seconds
        self.lock = threading.Lock()
        self.since = collections.OrderedDict()     # socket -> monotonic time, oldest first
        self.dropped = 0

    def enter(self, sock):
        with self.lock:
            self.since.pop(sock, None)
            self.since[sock] = time.monotonic()
            while len(self.since) > self.bound:
                self._drop(self.since.popitem(last=False)[0])

    def leave(self, sock):
        """False if the connection was dropped while it waited."""
        with self.lock:
            return self.since.pop(sock, None) is not None

    def sweep(self):
        """Drop the connections whose head took longer than `seconds` (a slow sender)."""
        now = time.monotonic()
        with self.lock:
            while self.since and now - next(iter(self.since.values())) > self.seconds:
                self._drop(self.since.popitem(last=False)[0])

    def _drop(self, sock):
        self.dropped += 1
        try:
            sock.shutdown(socket.SHUT_RDWR)     # its handler's blocked read returns at once
        except OSError:
            pass


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, cfg):
        self.app = App(cfg)
        self.waiting = Waiting(cfg.max_waiting, cfg.read_timeout)
        try:
            super().__init__((cfg.host, cfg.port), Handler)
        except OSError:
            self.app.close()
            raise

    def service_actions(self):               # serve_forever calls it every poll interval
        self.waiting.sweep()

    def handle_error(self, request, client_address):
        """An exception out of a connection's handler (socketserver prints a traceback): a
        client that reset or left its connection, between requests say, is one line; a
        traceback is for a real bug only."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ClientGone)):
            log_line("connection from %s ended: %s" % (client_address[0], type(exc).__name__))
            return
        log_line("connection from %s: internal error: %s" % (client_address[0], type(exc).__name__))
        traceback.print_exc(file=sys.stderr)


# 14. main #######################################################################################

def describe_keys(ring):
    """--check's view of the keys (the file was read and validated by load_config): who they
    are, their roles, budgets and lists; never a key."""
    if not ring.principals:
        return "Keys: none (the loopback operator is admin; the proxy must stay on loopback)"
    lines = ["Keys: %d%s" % (len(ring.principals), " from %s" % ring.path if ring.path else "")]
    for p in ring.principals:
        extra = [", ".join("%s=%d" % b for b in p.budgets)] if p.budgets else []
        extra += ["models %s" % ", ".join(p.models)] if p.models else []
        extra += ["logins %s" % ", ".join(p.logins)] if p.logins else []
        lines.append("  %-20s %-6s %s" % (p.name, p.role, "; ".join(extra) or "no limits"))
    if not any(p.admin for p in ring.principals):
        lines.append("  note: no admin key: /metrics and /dashboard/data answer 403 to every key")
    return "\n".join(lines)


def check(cfg):
    """--check: is the CLI there, which version, is it logged in (one tiny request)?"""
    ok = True
    print("claude-proxy %s configuration:" % __version__)
    print(describe_config(cfg))
    print("idle CLI sizes: pool %d, sessions %d, budget %d (%s)"
          % (cfg.pool_size, cfg.sessions, cfg.idle_max, cfg.sizing))
    found = shutil.which(cfg.claude_bin)
    print("CLI: %s" % (found or "NOT FOUND (set CLAUDE_BIN)"))
    if not found:
        return 1
    try:
        print("CLI version: %s" % (cli_version(cfg) or ""))
    except (OSError, subprocess.TimeoutExpired) as exc:
        print("CLI version: failed (%s)" % exc)
        ok = False
    app = App(cfg)
    print("State store: %s" % (app.store.path + " (open)" if app.store.enabled else app.store.error))
    ok &= app.store.enabled or cfg.store == "off"
    print("Usage history: %s" % ("kept %d days" % cfg.history_days if app.history.on else
                                 "off (CLAUDE_PROXY_HISTORY_DAYS=0 or CLAUDE_PROXY_STORE=off)"))
    print(describe_keys(app.keys))
    try:
        ok &= check_logins(app, cfg)
        idle = app.backend.idle_status()
        if idle["cli_figure"] == "measured":
            print("a CLI measured %d MB private memory after one request; idle CLI sizes now: "
                  "pool %d, sessions %d, budget %d (%s)" % (
                      idle["cli_mb"], idle["pool_size"], idle["sessions"], idle["budget"],
                      idle["sized"]))
    finally:
        app.close()
    for name, err in sorted(MODULE_ERRORS.items()):
        print("Handler module %s failed to load: %s" % (name, err))
        ok = False
    return 0 if ok else 1


def check_logins(app, cfg):
    """--check's one tiny request through each login; False when one did not answer."""
    class NoClient:
        deadline = time.monotonic() + 120

        def check(self):
            if time.monotonic() > self.deadline:
                raise Timeout("no answer within 120 s")

        maybe_check = check

    ok = True
    for account in app.backend.logins.accounts:
        label = "" if account.name == "default" and not cfg.accounts else \
            " (login %s)" % account.name
        req = Request(model=cfg.default_model,
                      cli_model=resolve_model(cfg.default_model, "sonnet")[1],
                      messages=[Message("user", [{"type": "text",
                                                  "text": "Reply with the word OK."}])],
                      max_tokens=16, handler=HANDLERS["generic"], account=account.name)
        try:
            c = collect(app.backend.run(req, req.messages, NoClient()))
            print("Logged in%s: yes (model %s answered %r, %d tokens)" % (
                label, cfg.default_model, c.text[:40], c.usage.output_tokens))
        except ProxyError as err:
            print("Logged in%s: NO: %s" % (label, err.message))
            ok = False
    return ok


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
        try:        # wakes serve_forever now, not at its next poll; accepts nothing more
            server.socket.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # SIGHUP: read the keys file again now (a change is also seen within a second by itself)
    signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
        target=server.app.keys.reload, daemon=True).start())
    host, port = server.server_address[:2]
    sys.stderr.write("claude-proxy %s listening on http://%s:%s (CLI: %s, model %s, %d slots; "
                     "idle CLIs: pool %d, sessions %d, budget %d, %s)\n"
                     % (__version__, host, port, cfg.claude_bin, cfg.default_model, cfg.max_concurrency,
                        cfg.pool_size, cfg.sessions, cfg.idle_max, cfg.sizing))
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
