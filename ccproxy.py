#!/usr/bin/env python3
"""ccproxy: one local endpoint for Claude Code in front of many Anthropic-compatible relays.

Claude Code (or any Anthropic SDK, or curl) sets ANTHROPIC_BASE_URL to this proxy once.
Every request under /v1/ is relayed to the provider selected in the web UI; switching takes
effect on the next request. Answers are relayed piece by piece as they arrive, never held
whole. A provider that fails before its answer shows content is replaced by the next one of
the Fallback list. The proxy does not translate between API formats: providers must speak the
Anthropic Messages API.

A request goes through: Handler.handle_one_request (strict HTTP parsing) -> dispatch ->
find_route (ROUTES) -> cross_site and authenticate (Throttle; a user key's Limits) ->
relay_request -> Relay, over candidates (Routes, the selection, Fallback; Health's
cooldowns), keep_placed (a conversation stays where its cache is) and fitting (context windows)
-> per attempt: headers, auth, presets, map_model, learned fixes -> Pool (kept-alive
connections) -> Response (strictly framed) -> gate (held until content) -> ClientWriter (chunked
to the client) -> Exchange -> exchange_record -> Recorder (its own thread: log line, request log, UsageStore and its
conversations, the cache watch, metrics).

Threads: one per client connection (ThreadingHTTPServer), relaying its answers itself, so a
slow stream holds nothing but its thread; the recorder; the housekeeping thread (other
processes' changes, balances). Shared state is swapped in whole (Store.view) or guarded by its
owner's lock; the pool needs no lock. Sockets keep their timeouts in the kernel (set_timeout)
and are read through SocketStream. Files shared with other ccproxy processes on the host
(config.json, the state file, the request log, the key minute counts) are written under flock
(FileLock, locked); with STORE, hosts share them through PostgreSQL instead (its listener and
writer threads).

Sections, in file order (grep -n '^# ===' ccproxy.py), each for one topic:
  constants — every tunable, and the fixed tables (hop-by-hop fields, model families, places)
  errors — the exceptions answered in Anthropic's error shape; Said, the words for a person
  messages — MESSAGES: everything ccproxy says to a person, by code (the page words it in Chinese)
  config — SETTINGS (every top-level key), config.json checked into a Config (providers, keys)
  files — atomic writes at mode 0600, backups, flock between processes
  shared store — STORE: PostgreSQL for several hosts (Postgres: schema, NOTIFY, listener)
  shared documents — the config and the state in the store (SharedDocuments), --migrate-store
  state — Store: the selection, choices, learned fixes and models (the state file), reloads
  config editing — the page's changes to config.json, import and export
  HTTP messages — strict parsing both ways (RFC 9110/9112), cross-site requests
  Anthropic requests and replies — model mapping, presets, /v1/models, SSE usage
  relay compatibility — what a relay refuses and the smallest fix for it, learned per relay
  upstream client — sockets, the pool, reading a provider's answer, ccproxy's own GETs (provider_get)
  providers: discovery and tests — /v1/models of each relay, provider tests, Check this relay
  routing — Routes rules (model, request class, agent type), FALLBACK_ORDER, context windows
  relay — Relay: one request over its candidates to the client, failover before its content
  observability — Exchange, the log line, the request log, counters, the cache watch
  usage and cost — Pricing, the hourly roll-ups in sqlite, /api/usage
  conversations — a conversation's cost (X-Claude-Code-Session-Id), Claude Code's status line
  balance — each relay's balance by the route it answers, in its own unit
  team keys — user keys, their limits (minutes, days, months), /api/me
  health and failover — cooldowns, candidates in order, the wrong-key throttle
  Claude Code settings — settings.json, managed pricing, /model rows
  web UI API — the routes the page calls
  web page — the page, its manifest and icons
  request handler — Handler: parse, route, authenticate, answer, record
  server factory and CLI — make_server, the housekeeping thread, main

Run:   python3 ccproxy.py [--config config.json] [--host H] [--port P] [--debug]
       (first run creates config.json from config.in.json with a random APIKEY)
Test:  python3 -m pip install -r requirements-dev.txt && python3 -m pytest

Security: binds 127.0.0.1 by default and refuses other addresses while APIKEY is empty or
the placeholder; keys are compared in constant time; logs and the request log never carry
keys, tokens or prompts (bodies are logged only with --debug, truncated and redacted).
Standard library only; runs on Python 3.8 and newer.
"""

import argparse
import base64
import bisect
import concurrent.futures
import contextlib
import csv
import datetime
import email.utils
import errno
import fnmatch
import functools
import hashlib
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import queue
import re
import secrets
import select
import shlex
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections import deque

try:
    import sqlite3
except ImportError:         # a Python built without it: no usage store, all else works
    sqlite3 = None
try:
    import fcntl
except ImportError:         # Windows: one ccproxy process at a time
    fcntl = None

# ============================================================================ constants

VERSION = "1.0.0"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "config.json")
TEMPLATE_CONFIG = os.path.join(HERE, "config.in.json")
WEBUI_FILE = os.path.join(HERE, "webui.html")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3456
PLACEHOLDER_APIKEY = "sk-ccproxy-CHANGE-ME"
APIKEY_MIN_CHARS = 16               # a shorter APIKEY is warned about
DEFAULT_API_TIMEOUT_MS = 600000     # must exceed Claude Code's own 300 s stream watchdog
DEFAULT_MAX_BODY_MB = 64            # Claude Code sends 100 KB to 20 MB (images)
CONNECT_TIMEOUT_S = 10.0
DEFAULT_PROXY_PORT = 8080           # of an http:// proxy URL without a port
CLIENT_TIMEOUT_S = 120.0            # a client socket idle this long is closed
LISTEN_BACKLOG = 1024               # the stdlib default of 5 drops connects under load
RELAY_CHUNK = 65536                 # upper bound for one read1(); it returns what is there
POOL_MAX_IDLE = 32                  # idle upstream connections kept per origin
POOL_IDLE_S = 30.0                  # older idle connections are closed, not reused
REFRESH_TIMEOUT_S = 20.0            # one provider's /v1/models discovery
REFRESH_WORKERS = 16
MODELS_PAGE_LIMIT = 1000
MAX_MODEL_PAGES = 20
MODELS_MAX_BYTES = 8 << 20          # of one /v1/models page a relay sends
MAX_MODELS = 5000                   # kept per provider
MODEL_ID_MAX = 256                  # characters; a longer discovered id is left out
MAX_HEADERS = 100                   # fields in one request, as http.server allows
MAX_LINE = 65536
MAX_HEADER_BLOCK = 65536            # all of a message's header lines together (else 431)
HEADER_DEADLINE_S = 30.0            # a request's head, from its first byte, must be in by then
LINGER_S = 2.0                      # an unread request body is drained this long before closing
LINGER_MAX_BYTES = 1 << 20
CHUNK_SIZE_LINE = 1024              # longest chunk-size line (with extensions) read from a client
API_BODY_MAX = 1 << 20              # a web UI API call's JSON body
ERROR_EXCERPT = 160                 # characters of a provider's answer quoted in a message
TAUGHT_EXCERPT = 300                # characters of the error that taught a learned fix, kept with it
ERROR_HOLD_BYTES = 65536            # of an error answer, read before deciding on failover
MAX_FIXES_PER_REQUEST = 5           # learned fixes tried on one request, one retry each
THINKING_BUDGET = 16000             # budget_tokens when adaptive thinking must become budgeted
USAGE_JSON_MAX = 1 << 20            # a JSON reply is parsed for its usage if no larger
THREAD_JOIN_S = 2.0                 # a stopping thread is waited for this long
POLL_S = 0.05                       # how often shutdown checks that requests have finished
DEFAULT_FIRST_BYTE_TIMEOUT_MS = 60000   # a stream's status + first event, when a fallback remains
DEFAULT_COOLDOWN_MS = 60000         # a failed provider is skipped this long (or its Retry-After)
MAX_COOLDOWN_S = 3600.0
COUNT_TOKENS_MEMORY_S = 3600.0      # how long "this provider has no count_tokens" is remembered
SESSION_MEMORY_S = 86400.0          # how long "this conversation needs its signatures stripped" is
SESSION_MEMORY_MAX = 10000          # conversations remembered at most
SSE_EVENT_MAX_BYTES = 1 << 20       # an SSE event longer than this is not read for its usage
FIRST_CONTENT_MAX_BYTES = 65536     # of a 200 answer held until it shows content (then it is relayed)
DEFAULT_FIRST_CONTENT_TIMEOUT_MS = 90000    # a stream's first content, when a fallback remains
REQUEST_RING = 1000                 # request records kept in memory
REQUEST_TAIL_BYTES = 8 << 20        # of the request log read at most for the newest records (/api/requests)
RECORDER_BATCH_S = 0.02             # records wait this long to be logged together
REQUEST_LOG_NAME = "requests.jsonl"  # beside the config unless REQUEST_LOG says otherwise
DEFAULT_REQUEST_LOG_MAX_MB = 20     # then rotated once to .1
TTFB_SAMPLES = 1000                 # per provider, for the p50/p95 in /api/stats
TTFB_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TEST_TIMEOUT_S = 30.0               # one provider test
TEST_SLOW_S = 5.0                   # a first event later than this is "slow"
TEST_MAX_TOKENS = 8
SHUTDOWN_GRACE_S = 5.0              # in-flight streams get this long on SIGTERM/Ctrl-C
AUTH_FAIL_LIMIT = 10                # different wrong keys from one address within AUTH_FAIL_WINDOW_S
AUTH_GLOBAL_FAIL_LIMIT = 100        # different wrong keys from all addresses within the window
AUTH_FAIL_WINDOW_S = 60.0
AUTH_LOCKOUT_S = 60.0
AUTH_TRUST_S = 86400.0              # a key that worked from an address is let in during its lockout
AUTH_TRACKED_MAX = 10000            # addresses (and trusted keys) kept before pruning
AUTH_SHARED_DIGEST = 8              # bytes of a wrong key's SHA-256 the throttle counts (and hosts tell each other)
DEBUG_BODY_CHARS = 2000
STATE_SUFFIX = ".state.json"
STALE_TEMP_S = 60.0                 # a temp file of write_atomic this old was left by a crash
PRIVATE_MODE = 0o600                # every file ccproxy writes beside the config: its owner's alone
CONFIG_BACKUPS = 5                  # config.json.bak-<time> files kept beside config.json
ANTHROPIC_VERSION = "2023-06-01"
USAGE_DB_NAME = "usage.sqlite3"     # hourly roll-ups, beside the config unless USAGE_DB says otherwise
SQLITE_BUSY_MS = 5000               # another process holding the usage file's write lock
USAGE_TTFB_MS = (100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 20000, 30000, 60000)
USAGE_MAX_DAYS = 400                # one /api/usage query spans at most this many days
USAGE_RETRY_S = 60                  # a usage store that failed is tried again after this long
CACHE_LIFETIME_S = 300.0            # Anthropic's default prompt cache lifetime
CACHE_WINDOW = 20                   # a provider's recent cached requests the cache guard weighs
CACHE_MIN_SAMPLES = 5               # ... and how many it needs before it judges
DEFAULT_CACHE_WARN_PCT = 50
BALANCE_TTL_S = 300.0               # a relay's balance answer is reused this long
BALANCE_MISSING_TTL_S = 3600.0      # "this relay has no billing routes" is remembered this long
BALANCE_TIMEOUT_S = 10.0
BALANCE_MAX_BYTES = 65536
BALANCE_UNLIMITED = 1e8             # NewAPI/OneAPI report an unlimited token as this many USD or more
NEWAPI_QUOTA_PER_UNIT = 500000      # NewAPI's quota units to one unit of money, unless its /api/status says
USER_KEY_PREFIX = "sk-ccp-"         # a user key the web page creates: this and 32 random bytes
KEY_LIMITS = ("rpm", "tokens_per_day", "cost_per_day", "cost_per_month")
KEY_TOTALS_S = 1.0                  # a key's day and month totals are re-read this often at most
KEY_RECENT = 20                     # requests /api/me lists
STATE_POLL_S = 0.5                  # how often another process's change to the state file is looked for
# STORE: PostgreSQL shared by the ccproxy processes of several hosts (the shared store section).
STORE_SCHEMES = ("postgresql", "postgres")   # libpq's URL schemes
STORE_DRIVER_VERSION = (3, 1)       # psycopg: Debian 12's python3-psycopg is 3.1.7
STORE_SCHEMA = 1                    # the schema this ccproxy writes; an older one is migrated forward at start
STORE_CHANNEL = "ccproxy"           # LISTEN/NOTIFY channel of the hosts' changes
STORE_CONNECT_TIMEOUT_S = 5         # a connection attempt to PostgreSQL
STORE_STATEMENT_TIMEOUT_MS = 5000   # one statement (a stopped or partitioned server is given up on)
STORE_RETRY_S = 2.0                 # an unreachable store is tried again after this long
STORE_LISTEN_S = 1.0                # the listener's wait for a notification between looks at stopping
STORE_IDLE = 4                      # idle connections kept for request threads (key minutes) and the page
STORE_HISTORY = 50                  # config versions kept in config_history
STORE_CACHE_SUFFIX = ".store-cache.json"    # the last documents read, to start while the store is away
USAGE_PENDING_MAX = 100000          # usage groups kept while the store cannot be written, then dropped

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
AUTH_STYLES = ("bearer", "x-api-key", "both")
MODEL_VARS = ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
              "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL")
FAMILY_VARS = (("haiku", "ANTHROPIC_DEFAULT_HAIKU_MODEL"), ("sonnet", "ANTHROPIC_DEFAULT_SONNET_MODEL"),
               ("opus", "ANTHROPIC_DEFAULT_OPUS_MODEL"))
ALIAS_PREFIX = "claude-via-"        # every provider's models, as ids Claude Code's /model lists
MODEL_DESCRIPTION_MAX = 100         # Claude Code cuts a /v1/models description here
PRICED_RECENT = 1000                # the recent requests whose model ids modelPricing covers
SESSION_MAX = 100                   # characters kept of a conversation's id
SESSIONS_LIMIT = 200                # conversations GET /api/sessions lists at most
# The Claude model whose profile (context window, effort levels) a relay's own model gets in
# /model when the relay's env-models maps that family to it (modelPicker's behavesAs).
FAMILY_PROFILES = {"haiku": "claude-haiku-4-5", "sonnet": "claude-sonnet-4-5", "opus": "claude-opus-4-5"}
# Where Claude Code reads managed settings (the only source of modelPricing it honours).
MANAGED_SETTINGS = (("linux", "/etc/claude-code/managed-settings.json"),
                    ("macos", "/Library/Application Support/ClaudeCode/managed-settings.json"),
                    ("windows", "C:\\Program Files\\ClaudeCode\\managed-settings.json"))
# Failures that move a request to the next provider, if no byte has reached the client yet.
FAILOVER_STATUSES = frozenset([401, 403, 408, 429] + list(range(500, 600)))    # every 5xx: 529, Cloudflare's 52x
COUNT_TOKENS_MISSING = frozenset([404, 405, 501])
# Claude Code's hint headers (CLAUDE_CODE_GATEWAY_HINT_HEADERS=1): what kind of request this is.
REQUEST_CLASSES = ("main", "subagent", "workflow", "compaction", "auxiliary", "side_reply")
CLASS_MAX = 40                      # characters kept of a request class or agent type
# How a failover list is ordered (FALLBACK_ORDER): as listed, by price, by first content.
FALLBACK_ORDERS = ("listed", "cheapest", "fastest")
FASTEST_WINDOW_S = 1800.0           # "fastest" weighs the first-content times of this long ago
FASTEST_MIN_SAMPLES = 3             # ... of at least this many requests (else the relay comes after)
CACHE_LONG_S = 3600.0               # the prompt cache's lifetime when a request asks for 1-hour caching
AFFINITY_MAX = 10000                # conversations whose relay is remembered at most
# A request's size in tokens, when its conversation has no count yet: its bytes (images left
# out) divided by this. JSON-escaped text runs 3-5 bytes a token, so 5 underestimates: a relay
# is skipped only when the request is surely too large for it.
BYTES_PER_TOKEN = 5
CONTEXT_WINDOW = 200000             # a Claude model's, unless configured (context_window)
LONG_CONTEXT_WINDOW = 1000000       # a [1m] model's, or any asked with the context-1m beta
PROVIDER_KEYS = ("name", "api_base_url", "api_key", "models", "comment", "env-models", "auth", "proxy",
                 "price_multiplier", "balance", "console_url", "context_window", "max_output")
PRICE_KINDS = ("input", "output", "cache_read", "cache_write")
KEY_FIELDS = ("name", "sha256", "enabled", "expires", "providers", "models") + KEY_LIMITS

# RFC 9110 section 7.6.1: hop-by-hop fields, plus every token listed in Connection.
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"))
# Set by the proxy itself, never copied from the client.
REQUEST_OWN = frozenset(("host", "content-length", "accept-encoding", "expect",
                         "x-api-key", "authorization"))
RESPONSE_OWN = frozenset(("content-length",))
# What a header preset may not set: the request's framing and routing are ccproxy's.
PRESET_FORBIDDEN = HOP_BY_HOP | frozenset(("content-length", "host", "expect"))

STATUS_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}

log = logging.getLogger("ccproxy")

# ============================================================================ errors


class Said(str):
    """Words ccproxy says to a person, from MESSAGES: the English (the str itself), and the
    code and values from which the web page says them in its language (webui.html's
    I18N.zh.msg holds every code). Values are texts or numbers, never markup."""

    def __new__(cls, code, **values):
        said = str.__new__(cls, MESSAGES[code].format(**values))
        # a value that is itself Said (a reason inside a sentence) keeps its code too
        said.code, said.values = code, {k: v.as_json() if isinstance(v, Said) else
                                        v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                                        for k, v in values.items()}
        return said

    def as_json(self):
        return {"code": self.code, "values": self.values, "message": str(self)}


class SaidElsewhere(Said):
    """Words another ccproxy host said (a relay's cooldown reason), as it sent them: its code,
    values and English, kept as they are."""

    def __new__(cls, said):
        made = str.__new__(cls, str(said.get("message", "")))
        made.code, made.values = said["code"], said.get("values") if isinstance(said.get("values"), dict) else {}
        return made


def why(reason):
    """A reason as the page words it: Said's code and values, or (a relay's own words) its text."""
    return reason.as_json() if isinstance(reason, Said) else {"message": str(reason)}


class ProxyError(Exception):
    """An error answered to the client in Anthropic's shape; its message is Said, so the
    body carries its code and values beside the English."""

    status = 500
    kind = "api_error"
    retry = True
    headers = ()

    def __init__(self, message, status=None, kind=None, **extra):
        super().__init__(message)
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        self.extra = extra            # more members of the error body: "problems", "version"…
        if isinstance(message, Said):
            self.extra.update(code=message.code, values=message.values)


class ClientError(ProxyError):
    status = 400
    kind = "invalid_request_error"


class AuthError(ProxyError):
    status = 401
    kind = "authentication_error"


class RateLimited(ProxyError):
    status = 429
    kind = "rate_limit_error"

    def __init__(self, message, seconds):
        super().__init__(message)
        self.headers = [("retry-after", str(max(1, math.ceil(seconds))))]


class HeaderSectionError(ProxyError):
    """A request head over the limits (MAX_LINE, MAX_HEADERS, MAX_HEADER_BLOCK), or cut off."""

    status = 431
    kind = "invalid_request_error"


class Forbidden(ProxyError):
    status = 403
    kind = "permission_error"


class NotFound(ProxyError):
    status = 404
    kind = "not_found_error"


class NoProvider(ProxyError):
    """Nothing to relay to: a retry cannot fix it, so Claude Code is told not to retry."""

    retry = False


class Conflict(ProxyError):
    """A change that meets a newer version, or a name already taken."""

    status = 409
    kind = "invalid_request_error"
    retry = False


class VersionRequired(ProxyError):
    """A change to config.json without If-Match (RFC 6585 section 3)."""

    status = 428
    kind = "invalid_request_error"
    retry = False


class TooLarge(ProxyError):
    status = 413
    kind = "request_too_large"


class Unsupported(ProxyError):
    """A request whose framing ccproxy does not take (a transfer coding other than chunked)."""

    status = 501


class StoreUnreadable(ProxyError):
    """The usage store cannot be read (a broken file): 500, and what sqlite said."""


class MethodNotAllowed(ProxyError):
    status = 405
    kind = "invalid_request_error"
    retry = False


class Unavailable(ProxyError):
    """What ccproxy needs for the request (a store) cannot be reached just now: a retry may help."""

    status = 503


class KeyRefused(AuthError):
    """A user key that is known but may not be used: retrying cannot help."""

    retry = False


class KeyLimitReached(RateLimited):
    """A day's or a month's limit: Claude Code is told not to retry (it would wait hours)."""

    retry = False


class UpstreamError(ProxyError):
    status = 502


class UpstreamTimeout(UpstreamError):
    status = 504


class StateError(ProxyError):
    """A change that could not be saved to the state file (or whose config.json could not be
    read), and so was not made."""

    retry = False


class StoreDown(StateError):
    """A change not made because the shared store (STORE) cannot be reached: try again later."""

    status = 503


class ConfigError(Exception):
    """A config file that cannot be used: `said` holds each problem (Said), `problems` the
    same as English lines, each after the file's name ("config.json: PORT must be …")."""

    def __init__(self, said, file=None):
        self.said, self.file = list(said), file
        self.problems = [("%s: %s" % (file, p)) if file else str(p) for p in self.said]
        super().__init__("\n".join(self.problems))

    def as_json(self):
        """Each problem as the page words it: its code, values and English, and the file."""
        return [dict(p.as_json(), file=self.file) for p in self.said]


# Characters that end or disguise a line: C0 and C1 controls, DEL, the Unicode line and
# paragraph separators, and the bidirectional overrides and isolates (which reorder what a
# terminal shows). None may stand in a name; any that a client sends is escaped in logs.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_unprintable(text):
    """text with each unprintable character written as a JSON escape (\\n, \\u2028…)."""
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: json.dumps(m.group())[1:-1], text)


class EscapeUnprintable(logging.Filter):
    """Escapes unprintable characters in every ccproxy log message, so that a value a client
    controls (a model name, a path, a user agent) cannot forge or hide a log line. A
    traceback is added by the formatter, after this, and keeps its lines."""

    def filter(self, record):
        message = record.getMessage()
        if _UNPRINTABLE.search(message):
            record.msg, record.args = escape_unprintable(message), None
        return True


log.addFilter(EscapeUnprintable())

# ============================================================================ messages

# What ccproxy says to a person (an error's message, a config problem, a test's reason), by
# code: English here, with {named} values; webui.html words each code in Chinese too, and a
# test keeps the two tables the same. Said(code, **values) makes one.
MESSAGES = {
    # config.json's problems (--check, Reload, a change made in the page)
    "unprintable_name": "{where} {value} contains an unprintable character ({char}: a line break, tab, NUL or "
        "the like) — names appear in logs, headers and the web page; remove it",
    "unprintable_model": "{where} {value} contains an unprintable character ({char}: a line break, tab, NUL or "
        "the like) — model names appear in logs, headers and the web page; remove it",
    "unprintable_comment": "{where} {value} contains an unprintable character ({char}) — comments may have line "
        "breaks and tabs, nothing else of the kind; remove it",
    "not_str_map": "{where} must be an object of name -> string",
    "not_model_var": "{where}.{key} is not a model variable — use one of {allowed}",
    "not_string": "{where}.{key} must be a string",
    "not_header_value": "{where}.{key} contains a line break, a control character or a character outside "
        "Latin-1, which cannot go into an HTTP header",
    "not_header_name": "{where}: '{key}' is not a valid HTTP header name",
    "not_preset_map": "{where} must be an object of preset name -> preset",
    "header_preset_type": "{where}.{name} must be an object (the preset's headers)",
    "request_preset_type": "{where}.{name} must be an object (the preset's body fields)",
    "preset_forbidden": "{where}.{name}.{field}: a preset cannot set {field} — ccproxy frames each request "
        "itself (the body's length, the connection, the provider's host)",
    "not_object": "{where} must be an object",
    "provider_name_missing": "{where}.name must be a non-empty string",
    "provider_name_taken": "{where}: duplicate provider name — names must be unique",
    "provider_url": "{where}.api_base_url must be an http(s) URL such as https://relay.example/v1/messages",
    "provider_key_chars": "{where}.api_key contains a space, a tab, a line break, a control character or a "
        "character outside Latin-1 — paste the key alone",
    "provider_models": "{where}.models must be a list of model id strings",
    "provider_auth": "{where}.auth must be one of {styles} (any case)",
    "provider_proxy_type": "{where}.proxy must be a string such as http://127.0.0.1:7890",
    "provider_proxy": "{where}.proxy must be an http://host:port proxy URL (CONNECT)",
    "provider_multiplier": "{where}.price_multiplier must be a number of 0 or more: the relay's price as a "
        "share of Pricing's (0.3 for a relay that sells at 30% of list)",
    "provider_balance": "{where}.balance must be true (ask the relay for its balance), false (never), or an "
        "object of options: unit, route, low",
    "balance_field_unknown": "{where}.balance.{field} is not a balance option — use unit, route or low",
    "balance_unit": "{where}.balance.unit must be a short name such as USD, CNY or 元",
    "balance_route": "{where}.balance.route must be one of {routes}",
    "balance_low": "{where}.balance.low must be a number of 0 or more, in the relay's own unit",
    "provider_console": "{where}.console_url must be an http(s) URL (the relay's console, for top-ups and "
        "check-in)",
    "apikey_type": "APIKEY must be a string — set it to a long random secret, or start ccproxy.py, which puts a "
        "random one in",
    "apikey_empty": "APIKEY is empty, which would let any program here and any web page you open use your "
        "relays — set it to a long random secret, or start ccproxy.py, which puts a random one in",
    "apikey_placeholder": "APIKEY is still the template's placeholder, which would let any program here and any "
        "web page you open use your relays — set it to a long random secret, or start ccproxy.py, which puts a "
        "random one in",
    "apikey_chars": "APIKEY contains a space, a line break, a control character or a character outside Latin-1, "
        "which a client cannot send in a header — use letters, digits, - and _",
    "fallback_type": "Fallback must be a list of provider names",
    "fallback_unknown": "Fallback[{index}]: '{name}' is not a provider with an api_base_url",
    "fallback_twice": "Fallback names a provider twice",
    "routes_type": "Routes must be an object of model glob -> provider name, such as {{\"*haiku*\": "
        "\"cheap-relay\"}}",
    "routes_unknown": "Routes.{glob}: '{name}' is not a provider with an api_base_url",
    "context_too_large": "prompt is too long: about {tokens} tokens (max_tokens {max_tokens}), more than any "
        "relay can take: {relays} — run /compact, or give a relay with a larger context_window",
    "select_when": "\"when\" must be \"now\" or \"idle\"",
    "routes_key": "Routes: '{key}' must be a model glob, class=… and agent=…, each at most once, separated by spaces",
    "routes_class": "Routes: '{key}' names the request class {value}; Claude Code sends {classes}",
    "provider_limit": "{where}.{key} must be a number of tokens, or an object of model glob -> tokens",
    "fallback_order": "FALLBACK_ORDER must be one of {orders}",
    "top_level": "the top level must be a JSON object",
    "host_type": "HOST must be a string such as 127.0.0.1",
    "port_range": "PORT must be a whole number from 0 to 65535",
    "log_level": "LOG_LEVEL must be one of {levels}",
    "not_positive": "{key} must be a positive number",
    "request_log_type": "REQUEST_LOG must be a file name (\"\" turns the request log file off)",
    "not_bool": "{key} must be true or false",
    "usage_db_type": "USAGE_DB must be a file name (\"\" turns the usage store off)",
    "cache_warn_range": "CACHE_WARN_PCT must be a number from 0 to 100 (0 turns the cache warning off)",
    "low_balance_range": "LOW_BALANCE must be a number of 0 or more, in the relays' balance unit (0 = off)",
    "trusted_proxies": "TRUSTED_PROXIES must be a list of IP addresses, such as [\"127.0.0.1\"] for nginx on "
        "this host",
    "providers_type": "Providers must be a list of provider objects",
    "config_missing": "no such file — copy config.in.json to it, or run ccproxy.py once without --config to "
        "create it",
    "config_unreadable": "cannot be read ({reason})",
    "config_not_utf8": "is not UTF-8 text",
    "config_bad_json": "line {line} column {column}: invalid JSON ({reason})",
    "listen_in_use": "cannot listen on {address}: another program has this port (claude-code-router uses 3456 "
        "too; ./run.sh status, or ss -ltnp, shows which) — stop it, or start with --port {next} (or set PORT "
        "in config.json) and put that port in ANTHROPIC_BASE_URL",
    "listen_denied": "cannot listen on {address}: permission denied — use a port above 1023",
    "listen_no_address": "cannot listen on {address}: this machine has no such address — use 127.0.0.1 (this "
        "machine only) or 0.0.0.0 (every interface)",
    "listen_failed": "cannot listen on {address}: {reason}",
    "pricing_type": "Pricing must be an object such as {{\"currency\": \"USD\", \"models\": "
        "{{\"claude-sonnet-*\": {{\"input\": 3, \"output\": 15}}}}}}",
    "pricing_currency": "Pricing.currency must be a short name such as USD, CNY or 元",
    "pricing_currency_chars": "Pricing.currency contains an unprintable character",
    "pricing_models_type": "Pricing.models must be an object of model id or glob -> prices",
    "price_type": "{where} must be an object of prices per million tokens: input, output, cache_read, "
        "cache_write",
    "price_missing": "{where} needs {kind} (the price per million tokens)",
    "price_unknown": "{where}.{kind} is not a price — use {kinds}",
    "price_negative": "{where}.{kind} must be a number of 0 or more (per million tokens)",
    "keys_type": "Keys must be a list of keys such as {{\"name\": \"小王\", \"sha256\": \"<64 hex digits>\"}}",
    "key_no_name": "{where} must be an object with a non-empty name",
    "key_name_taken": "{where}: another key has this name — names must be unique",
    "key_sha256": "{where}.sha256 must be the SHA-256 of the key's secret, 64 lowercase hex digits (the web "
        "page creates keys and stores only this)",
    "key_same_secret": "{where}: the same secret as another key",
    "key_field_unknown": "{where}.{field} is not a key field — use {fields}",
    "key_expires": "{where}.expires must be a date such as 2026-12-31 (the last day it works), or null",
    "key_providers_type": "{where}.providers must be a list of provider names, or null for every provider",
    "key_provider_unknown": "{where}.providers: '{name}' is not a provider with an api_base_url",
    "key_models_type": "{where}.models must be a list of model ids or globs such as \"claude-sonnet-*\", or "
        "null for every model",
    "key_limit": "{where}.{limit} must be a positive number, or null for no limit",
    "key_limit_whole": "{where}.{limit} must be a positive whole number, or null for no limit",
    "keys_need_usage_db": "Keys: limits are counted in the usage store, and USAGE_DB is empty — set it "
        "(usage.sqlite3) or remove the limits",
    "config_invalid": "config.json would not be valid:\n{problems}",
    "store_url": "STORE must be a PostgreSQL URL such as postgresql://ccproxy@db.example:5432/ccproxy, or \"\" "
        "for the files beside config.json",
    "store_driver": "STORE names PostgreSQL, and this Python lacks its driver, psycopg 3.1 or newer: apt-get "
        "install python3-psycopg (Debian 12, Ubuntu 24.04) or python3 -m pip install --upgrade 'psycopg[binary]'; "
        "or unset STORE to keep the files beside config.json",
    "store_unreachable_start": "STORE: PostgreSQL cannot be reached ({reason}) and this host has no copy of the "
        "shared config yet ({file}) — start it once while the database is up",
    "store_failed": "STORE: PostgreSQL at {where} could not be used ({reason})",
    "store_schema_newer": "STORE: the database has schema {found}, newer than this ccproxy's {known} — a newer "
        "ccproxy wrote it; upgrade this host's ccproxy.py (a schema is never migrated backward)",
    "store_down": "the shared store (PostgreSQL) cannot be reached ({reason}), so this change was not made — "
        "try again when it is back; requests are still relayed meanwhile",
    "store_has_config": "the store already holds a config (changed {when} by {by}) that differs from {file} — "
        "add --force to replace it (the old one is kept in its config history)",
    # the API, the relay, keys and limits
    "state_not_saved": "ccproxy could not save this change to {file} ({reason}), so it was not made — free some "
        "disk space or fix the file's permissions, then try again",
    "config_not_json": "{file} cannot be read as JSON ({reason}) — fix it by hand, then Reload",
    "version_missing": "send If-Match: <version> (from GET /api/config) with every change",
    "stale_version": "config.json changed since you loaded it (another tab, or a hand edit) — load it again and "
        "redo the change",
    "config_not_saved": "ccproxy could not write {file} ({reason}), so nothing was changed",
    "separator_not_usable": "provider '{name}' has no api_base_url (a separator), so it cannot be used",
    "no_provider_named": "no provider named '{name}' — names are listed by GET /api/state",
    "example_key": "provider {name} still has the example api_key of config.in.json — put its real key in first "
        "(Edit in the web page, or config.json)",
    "no_preset": "no {kind} preset named '{name}'",
    "provider_not_object": "the provider must be a JSON object",
    "providers_not_list": "Providers in config.json is not a list — fix the file by hand first",
    "name_taken": "there is already a provider named '{name}'",
    "no_provider_in_config": "no provider named '{name}' in config.json",
    "name_missing": "name must be the copy's name, a non-empty string",
    "order_incomplete": "names must list every provider of config.json once, in the new order",
    "settings_not_object": "the settings must be a JSON object",
    "setting_not_editable": "{key} cannot be edited here — the page edits {editable}; HOST, PORT, APIKEY and "
        "REQUEST_LOG are changed in config.json",
    "import_not_json": "not JSON: {reason}",
    "import_top_level": "not a config: the top level is not a JSON object",
    "import_not_config": "no Providers list and no env block: not a ccproxy, claude-code-router or Claude Code "
        "settings file",
    "duplicate_body": "send {{}} or {{\"name\": <the copy's name>}}",
    "import_body": "send {{\"text\": <the file's content>}}",
    "coding_unsupported": "Transfer-Encoding {coding} is not supported — send the body with Content-Length or "
        "as chunked",
    "chunk_line": "malformed chunked request body: a chunk size line is cut off or too long",
    "chunk_bad": "malformed chunked request body: {reason}",
    "body_too_large": "request body exceeds MAX_BODY_MB ({limit} MB)",
    "body_too_large_sized": "request body of {size} MB exceeds MAX_BODY_MB ({limit} MB)",
    "chunk_short": "malformed chunked request body: a chunk ended early or without CRLF",
    "chunk_trailer": "malformed chunked request body: its trailer section is cut off or too long",
    "body_short": "request body ended early",
    "body_not_json": "the request body is not valid JSON",
    "body_not_object": "the request body must be a JSON object",
    "field_missing": "missing field '{name}'",
    "field_not_string": "field '{name}' must be a string",
    "field_not_string_or_null": "field '{name}' must be a string or null",
    "field_enabled": "field 'enabled' must be true or false",
    "field_fallback": "field 'providers' must be a list of provider names, or null for config.json's",
    "dot_segment": "the path has a . or .. segment (perhaps percent-encoded): not relayed",
    "method_not_allowed": "{method} is not allowed on {path} — use {allowed}",
    "no_route": "no route for {method} {path}",
    "http_refused": "{reason}",
    "internal": "ccproxy internal error — see its log",
    "models_limit": "limit must be a whole number from 1 to 1000",
    "no_count_tokens": "provider {name} does not offer count_tokens",
    "model_unknown": "model {model} is not offered by provider {name}, nor an alias of another",
    "usage_dates": "from and to must be dates such as 2026-01-31",
    "usage_range": "from must be on or before to, and at most {days} days before it",
    "usage_by": "by must be one or more of {groups}, separated by commas",
    "usage_off": "the usage store is off (USAGE_DB is empty in config.json)",
    "usage_unreadable": "the usage store cannot be read: {reason}",
    "requests_limit": "limit must be a whole number",
    "upstream_timeout": "provider {name} did not answer in time ({reason})",
    "gate_failed": "provider {name} answered 200 without content ({gate}): {excerpt}",
    "gate_error_event": "error event before content",
    "gate_empty": "stream ended empty",
    "gate_no_content": "no content in {seconds} s",
    "gate_error_body": "an error in a 200",
    "gate_not_message": "not a message",
    "upstream_unreachable": "provider {name} at {address} could not be reached: {reason}",
    "no_provider_example": "provider {name} still has the example key of config.in.json, and no provider has a "
        "real one, so ccproxy contacted none — add your relay (Add provider in the web UI, or Providers in "
        "config.json, then Reload config) with its real api_key; it is used at once",
    "no_provider": "ccproxy has no provider to relay to — add your relay (Add provider in the web UI, or "
        "Providers in config.json, then Reload config) with its api_base_url and api_key",
    "no_provider_selected": "ccproxy has no provider selected — add one to {file}",
    "key_models_refused": "key {name} may use the models {models}, not {model}",
    "key_providers_refused": "key {name} may use the providers {providers}; none of them is selected or in the "
        "failover list",
    "key_rpm": "key {name} has made its {rpm} requests this minute (rpm) — it frees up in {wait}",
    "key_tokens_day": "key {name} has used its {limit} tokens today (tokens_per_day) — it frees up in {wait}",
    "key_cost_day": "key {name} has used its {limit} of cost today (cost_per_day) — it frees up in {wait}",
    "key_cost_month": "key {name} has used its {limit} of cost this month (cost_per_month) — it frees up in "
        "{wait}",
    "key_not_object": "the key must be a JSON object",
    "key_field_refused": "{field} is not a field a key can be given — use {fields} (a new secret comes from "
        "POST /api/keys/NAME/rekey)",
    "keys_not_list": "Keys in config.json is not a list — fix the file by hand first",
    "key_name_exists": "there is already a key named '{name}'",
    "no_key_named": "no key named '{name}' in config.json",
    "key_limits_no_store": "key {name} has limits, and this ccproxy keeps no usage store to count them in "
        "(USAGE_DB, or a Python without sqlite3)",
    "wrong_keys": "too many wrong API keys — wait {seconds} s. Clients that used the right key from this "
        "address before are still let in.",
    "key_invalid": "invalid API key — send ccproxy's APIKEY as x-api-key or Authorization: Bearer (it is in "
        "config.json and in the web UI)",
    "key_missing": "missing API key — send ccproxy's APIKEY as x-api-key or Authorization: Bearer (it is in "
        "config.json and in the web UI)",
    "key_disabled": "key {name} is disabled — ask whoever runs this ccproxy",
    "key_expired": "key {name} expired on {expires} — ask whoever runs this ccproxy for a new date",
    "user_key": "this is the user key {name}: it relays (/v1/...) and reads its own usage (/api/me); ccproxy's "
        "APIKEY manages ccproxy",
    "cross_origin": "cross-origin request refused ({reason}): ccproxy answers Claude Code, SDKs, curl and its "
        "own page, never another site's page",
    "preflight": "a CORS preflight, {reason}",
    "page_missing": "webui.html is missing beside ccproxy.py",
    # reasons: a provider's test, its models, its balance, a failed connection
    "net_timeout": "timed out",
    "net_no_host": "host name not found",
    "net_tls_untrusted": "TLS certificate not trusted ({reason})",
    "net_tls": "TLS error ({reason})",
    "net_refused": "connection refused",
    "net_closed": "connection closed by the provider",
    "net_bad_http": "bad HTTP from the provider ({reason})",
    "net_other": "{reason}",
    "placeholder_key": "not contacted: its api_key is still the example of config.in.json — put the real key in "
        "config.json",
    "test_http_html": "HTTP {status} (HTML page)",
    "test_http": "HTTP {status}: {detail}",
    "test_no_sse": "HTTP 200 but no SSE events",
    "test_slow": "first event after {seconds} s",
    "test_ok": "first event in {ms} ms",
    "models_too_large": "the model list is larger than {mb} MB",
    "models_http_html": "HTTP {status} (HTML page, not JSON)",
    "models_http": "HTTP {status}",
    "models_html": "an HTML page instead of JSON",
    "models_not_list": "not a model list ({reason})",
    "models_none": "the provider listed no models",
    "models_none_kept": "the provider listed no models that could be kept: {dropped} left out (ids over "
        "{max_len} characters, with unprintable characters, or past {max_models})",
    "models_found": "{count} models in {ms} ms",
    "models_found_dropped": "{count} models in {ms} ms; {dropped} left out (ids over {max_len} characters, with "
        "unprintable characters, or past {max_models})",
    "balance_off": "switched off (balance: false)",
    "balance_refused": "the relay refused the key on {route} (HTTP {status})",
    "balance_no_route": "the relay has no {route} (HTTP {status})",
    "balance_no_route_page": "the relay has no {route} (it answered a web page)",
    "balance_no_route_json": "the relay has no {route} (it answered no JSON object)",
    "balance_none": "the relay answers none of the balance routes ccproxy knows ({routes})",
    "balance_no_limit": "the relay's subscription answer has no hard_limit_usd",
    "balance_no_usage": "the usage answer has no total_usage",
}

# ============================================================================ config


_PLACEHOLDER_KEY = re.compile(r"(?i)your[-_][a-z_-]*key|change[-_]?me|^<[^>]*>$")


class Provider:
    """One entry of Providers[], validated. A provider without a URL is a separator."""

    __slots__ = ("name", "api_base_url", "base_url", "api_key", "models", "comment",
                 "env_models", "auth", "proxy", "placeholder_key", "price_multiplier", "balance",
                 "console_url", "context_window", "max_output")

    def __init__(self, name, api_base_url, api_key, models, comment, env_models, auth, proxy,
                 price_multiplier=1.0, balance=None, console_url="", context_window=None, max_output=None):
        self.name = name
        self.api_base_url = api_base_url
        self.base_url = derive_base_url(api_base_url) if api_base_url else ""
        self.api_key = api_key
        self.models = tuple(models)
        self.comment = comment
        self.env_models = env_models
        self.auth = auth
        self.proxy = proxy
        # config.in.json's example keys ("sk-ant-your-key-here"): sent to the real host they
        # only earn a 401, which Claude Code retries ten times.
        self.placeholder_key = bool(_PLACEHOLDER_KEY.search(api_key))
        self.price_multiplier = price_multiplier   # the relay's price as a share of Pricing's
        self.balance = {} if balance is None else balance   # False: never ask the relay; else its options
        # The relay's console (top-ups, check-in): as configured, else the site's root.
        parts = urllib.parse.urlsplit(self.base_url)
        self.console_url = console_url or ("%s://%s/" % (parts.scheme, parts.netloc.rsplit("@", 1)[-1])
                                           if self.base_url else "")
        # Its models' limits in tokens, as configured: {model glob: tokens} ("*" for all), or {}.
        self.context_window = context_window or {}
        self.max_output = max_output or {}

    @property
    def usable(self):
        return bool(self.base_url)


class Config:
    """A validated, read-only snapshot of config.json."""

    def __init__(self, path, raw, providers):
        self.path = path
        self.raw = raw
        def get(key):
            return raw.get(key, SETTING[key].default)
        here = os.path.dirname(os.path.abspath(path))
        self.host = get("HOST")
        self.port = get("PORT")
        self.apikey = get("APIKEY")
        self.log_level = get("LOG_LEVEL")
        self.api_timeout_s = get("API_TIMEOUT_MS") / 1000.0
        self.max_body_bytes = int(get("MAX_BODY_MB") * 1024 * 1024)
        self.model_mapping = get("MODEL_MAPPING")
        self.fallback = tuple(get("Fallback"))
        # Routes: a rule (a model glob, class=, agent=) -> the provider that serves it, in the file's order.
        self.routes = tuple(Rule(key, name) for key, name in strip_comments(get("Routes")).items())
        self.fallback_order = get("FALLBACK_ORDER")
        self.first_byte_timeout_s = get("FIRST_BYTE_TIMEOUT_MS") / 1000.0
        self.first_content_timeout_s = get("FIRST_CONTENT_TIMEOUT_MS") / 1000.0
        self.cooldown_s = get("COOLDOWN_MS") / 1000.0
        self.request_log = os.path.join(here, get("REQUEST_LOG")) if get("REQUEST_LOG") else ""
        self.request_log_max = int(get("REQUEST_LOG_MAX_MB") * 1024 * 1024)
        self.env_models = strip_comments(get("env-models"))
        self.header_presets = strip_comments(get("HeaderOverrides"))
        self.request_presets = strip_comments(get("RequestOverrides"))
        self.providers = tuple(providers)
        self.by_name = {p.name: p for p in providers}
        self.pricing = Pricing(strip_comments(get("Pricing")), self.by_name)
        self.usage_db = os.path.join(here, get("USAGE_DB")) if get("USAGE_DB") else ""
        self.cache_warn_pct = get("CACHE_WARN_PCT")
        self.low_balance = get("LOW_BALANCE")
        self.low_balance_last = get("LOW_BALANCE_LAST")
        self.keys = tuple(UserKey(entry) for entry in get("Keys"))
        self.key_by_hash = {key.sha256: key for key in self.keys}
        # Requests from these addresses (nginx in front) are from the X-Forwarded-For they name.
        self.trusted_proxies = frozenset(get("TRUSTED_PROXIES"))
        self.store = store_url(raw)     # PostgreSQL shared by several hosts, or ""
        self.loaded_at = time.time()
        self.version = None             # of the file it was read from (config_version)

    def secrets(self):
        return [s for s in [self.apikey] + [p.api_key for p in self.providers] if s]

    def route_for(self, model, kind=None, agent=None):
        """The first Routes rule that a request for this model, of this class and agent type
        (Claude Code's hint headers) matches, or None."""
        for rule in self.routes:
            if rule.matches(model, kind, agent):
                return rule
        return None


def store_url(raw):
    """The shared store's URL: CCPROXY_STORE from the environment, else STORE; "" for none."""
    return os.environ.get("CCPROXY_STORE") or raw.get("STORE") or ""


def strip_comments(obj):
    return {k: v for k, v in obj.items() if not k.startswith("_")}


# Control characters: none may appear in a request line (it is forwarded as it came), and none
# but a tab in a header value that ccproxy sends.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# RFC 9110 section 5.1: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_safe(text):
    """Whether text can go into an HTTP header as it is: Latin-1, no control character but tab."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not _CONTROL.search(text.replace("\t", " "))


def sendable_secret(text):
    """Whether a key can go into a header as one token: header_safe, and no space or tab."""
    return header_safe(text) and not re.search(r"\s", text)


def _check_name(value, where, problems, kind="name"):
    """A name users give (provider, preset, model id): any Unicode, but nothing unprintable.
    kind: name, model or comment (MESSAGES' unprintable_<kind>)."""
    found = _UNPRINTABLE.search(value)
    if found:
        problems.append(Said("unprintable_" + kind, where=where, value=json.dumps(value, ensure_ascii=False),
                             char="U+%04X" % ord(found.group())))


def _check_str_map(value, where, problems, allowed=None, header=False):
    if not isinstance(value, dict):
        problems.append(Said("not_str_map", where=where))
        return
    for key, val in value.items():
        if key.startswith("_"):
            continue
        if allowed is not None and key not in allowed:
            problems.append(Said("not_model_var", where=where, key=key, allowed=", ".join(allowed)))
        elif not isinstance(val, str):
            problems.append(Said("not_string", where=where, key=key))
        elif not header:
            _check_name(val, "%s.%s" % (where, key), problems, "model")
        elif not header_safe(val):
            problems.append(Said("not_header_value", where=where, key=key))
        elif header and not _TOKEN.fullmatch(key):
            problems.append(Said("not_header_name", where=where, key=key))


def _check_presets(value, where, problems, header):
    if not isinstance(value, dict):
        problems.append(Said("not_preset_map", where=where))
        return
    for name, preset in value.items():
        if name.startswith("_"):
            continue
        _check_name(name, "%s: the preset name" % where, problems)
        if not isinstance(preset, dict):
            problems.append(Said("header_preset_type" if header else "request_preset_type", where=where, name=name))
        elif header:
            _check_str_map(preset, "%s.%s" % (where, name), problems, header=True)
            for field in preset:
                if field.lower() in PRESET_FORBIDDEN:
                    problems.append(Said("preset_forbidden", where=where, name=name, field=field))


def _check_provider(index, entry, names, problems):
    where = "Providers[%d]" % index
    if not isinstance(entry, dict):
        problems.append(Said("not_object", where=where))
        return None
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(Said("provider_name_missing", where=where))
        return None
    _check_name(name, "%s.name" % where, problems)
    where = "Providers[%d] (%s)" % (index, escape_unprintable(name))
    if name in names:
        problems.append(Said("provider_name_taken", where=where))
    names.add(name)
    url = entry.get("api_base_url", "")
    if not isinstance(url, str):
        problems.append(Said("not_string", where=where, key="api_base_url"))
        url = ""
    elif url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(Said("provider_url", where=where))
    for key in ("api_key", "comment"):
        if not isinstance(entry.get(key, ""), str):
            problems.append(Said("not_string", where=where, key=key))
    comment = entry.get("comment", "")
    if isinstance(comment, str):
        _check_name(comment.replace("\n", " ").replace("\t", " "), where + ".comment", problems, "comment")
    api_key = entry.get("api_key", "")
    if isinstance(api_key, str) and not sendable_secret(api_key.strip()):
        problems.append(Said("provider_key_chars", where=where))
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        problems.append(Said("provider_models", where=where))
        models = []
    for model in models:
        _check_name(model, where + ".models: the model id", problems, "model")
    _check_str_map(entry.get("env-models", {}), where + ".env-models", problems, MODEL_VARS)
    auth = entry.get("auth")
    if isinstance(auth, str):
        auth = auth.strip().lower()         # "Bearer" as the header itself writes it
    if auth is not None and auth not in AUTH_STYLES:
        problems.append(Said("provider_auth", where=where, styles=", ".join(AUTH_STYLES)))
        auth = None
    proxy = entry.get("proxy", "")
    if not isinstance(proxy, str):
        problems.append(Said("provider_proxy_type", where=where))
        proxy = ""
    elif proxy and urllib.parse.urlsplit(proxy).scheme != "http":
        problems.append(Said("provider_proxy", where=where))
    multiplier = entry.get("price_multiplier", 1)
    if not _is_number(multiplier) or multiplier < 0:
        problems.append(Said("provider_multiplier", where=where))
        multiplier = 1
    balance = _check_balance(entry.get("balance", True), where, problems)
    console = entry.get("console_url", "")
    if not isinstance(console, str) or (console and urllib.parse.urlsplit(console).scheme not in ("http", "https")):
        problems.append(Said("provider_console", where=where))
        console = ""
    env_models = entry.get("env-models", {})
    return Provider(name, url.strip(), str(api_key).strip(), [m for m in models if m],
                    str(entry.get("comment", "")),
                    strip_comments(env_models) if isinstance(env_models, dict) else {}, auth, proxy,
                    float(multiplier), balance, console.strip(),
                    _check_limit(entry.get("context_window"), where, "context_window", problems),
                    _check_limit(entry.get("max_output"), where, "max_output", problems))


def _check_balance(value, where, problems):
    """A provider's balance: true (ask the relay by every route), false (never), or options:
    unit (a unit the relay's answer does not say right), route (one of BALANCE_ROUTES only),
    low (the low-balance threshold, in that unit). False, or a dict of the options."""
    if value is True or value is False:
        return {} if value else False
    if not isinstance(value, dict):
        problems.append(Said("provider_balance", where=where))
        return {}
    options = strip_comments(value)
    for key in options:
        if key not in ("unit", "route", "low"):
            problems.append(Said("balance_field_unknown", where=where, field=key))
    unit = options.get("unit", "USD")
    if not isinstance(unit, str) or not unit.strip() or len(unit) > 16 or _UNPRINTABLE.search(unit):
        problems.append(Said("balance_unit", where=where))
    if options.get("route", "billing") not in BALANCE_ROUTES:
        problems.append(Said("balance_route", where=where, routes=", ".join(BALANCE_ROUTES)))
    low = options.get("low", 0)
    if not _is_number(low) or low < 0:
        problems.append(Said("balance_low", where=where))
    return options


def _is_address(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_apikey(value, problems):
    """The APIKEY guards the relays' money and the web page. Empty or the template's, any
    program on the machine and any web page its user opens could use them."""
    if not isinstance(value, str):
        problems.append(Said("apikey_type"))
    elif value in ("", PLACEHOLDER_APIKEY):
        problems.append(Said("apikey_empty" if not value else "apikey_placeholder"))
    elif not sendable_secret(value):
        problems.append(Said("apikey_chars"))
    elif len(value) < APIKEY_MIN_CHARS:
        log.warning("APIKEY is only %d characters: a short key is quick to guess — make it %d or more "
                    "(python3 -c 'import secrets;print(secrets.token_urlsafe(24))')", len(value), APIKEY_MIN_CHARS)


def _check_fallback(value, providers, problems):
    usable = {p.name for p in providers if p.usable}
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        problems.append(Said("fallback_type"))
        return
    for index, name in enumerate(value):
        if name not in usable:
            problems.append(Said("fallback_unknown", index=index, name=name))
    if len(set(value)) != len(value):
        problems.append(Said("fallback_twice"))


def _check_routes(value, providers, problems):
    usable = {p.name for p in providers if p.usable}
    if not isinstance(value, dict):
        problems.append(Said("routes_type"))
        return
    for glob, name in value.items():
        if glob.startswith("_"):
            continue
        if name not in usable:
            problems.append(Said("routes_unknown", glob=glob, name=name))
        else:
            Rule(glob, name).check(problems)


def _check_limit(value, where, key, problems):
    """A provider's context_window or max_output: tokens, or {model glob: tokens}. The dict."""
    if value is None:
        return {}
    found = {"*": value} if _is_number(value) else strip_comments(value) if isinstance(value, dict) else None
    if found is None or not all(_is_number(v) and v >= 1 for v in found.values()):
        problems.append(Said("provider_limit", where=where, key=key))
        return {}
    return {glob.lower(): int(v) for glob, v in found.items()}


def _positive(key, value, problems, *context):
    if not _is_number(value) or value <= 0:
        problems.append(Said("not_positive", key=key))


def _bool(key, value, problems, *context):
    if not isinstance(value, bool):
        problems.append(Said("not_bool", key=key))


def _said_unless(test, code, **values):
    """A check: the problem `code` (with values) unless test(value)."""
    def check(key, value, problems, *context):
        if not test(value):
            problems.append(Said(code, **values))
    return check


def _check_providers(key, entries, problems, raw, providers):
    if not isinstance(entries, list):
        problems.append(Said("providers_type"))
        return []
    names, found = set(), []
    for index, entry in enumerate(entries):
        provider = _check_provider(index, entry, names, problems)
        if provider is not None:
            found.append(provider)
    return found


class Setting:
    """One top-level key of config.json: its default, its check (check(key, value, problems,
    raw, providers) adds what is wrong to problems), whether Reload applies it (else the next
    start does), whether the page's Settings edit it, whether it is the host's own (with STORE it
    stays in each host's config.json; the rest is shared), and a line of help (config.in.json's
    _comment_ of the key says it at length; a test keeps both, and README's table, in step)."""

    __slots__ = ("key", "default", "check", "reload", "page", "host", "help")

    def __init__(self, key, default, check, help, reload=True, page=False, host=False):
        self.key, self.default, self.check, self.help = key, default, check, help
        self.reload, self.page, self.host = reload, page, host


# Every top-level key, in README's order. Config reads its values (and
# their defaults) from here, validate_config checks each, the page edits those marked page.
SETTINGS = (
    Setting("HOST", DEFAULT_HOST, _said_unless(lambda v: isinstance(v, str), "host_type"),
            "address to listen on", reload=False, host=True),
    Setting("PORT", DEFAULT_PORT, _said_unless(lambda v: isinstance(v, int) and not isinstance(v, bool)
                                               and 0 <= v <= 65535, "port_range"), "port to listen on", reload=False,
            host=True),
    Setting("APIKEY", "", lambda key, value, problems, *context: _check_apikey(value, problems),
            "the key clients send, and the web page's password", host=True),
    Setting("LOG_LEVEL", "INFO", _said_unless(lambda v: v in LOG_LEVELS, "log_level", levels=", ".join(LOG_LEVELS)),
            "DEBUG, INFO, WARNING or ERROR", page=True),
    Setting("API_TIMEOUT_MS", DEFAULT_API_TIMEOUT_MS, _positive, "longest silence from a provider", page=True),
    Setting("MAX_BODY_MB", DEFAULT_MAX_BODY_MB, _positive, "largest request body", page=True),
    Setting("MODEL_MAPPING", True, _bool, "map model names per provider", page=True),
    Setting("env-models", {}, lambda key, value, problems, *context: _check_str_map(value, key, problems, MODEL_VARS),
            "model names per family", page=True),
    Setting("HeaderOverrides", {}, lambda key, value, problems, *context: _check_presets(value, key, problems, True),
            "named header presets", page=True),
    Setting("RequestOverrides", {}, lambda key, value, problems, *context: _check_presets(value, key, problems, False),
            "named request-body presets", page=True),
    Setting("Providers", [], _check_providers, "the relays, in display order"),
    Setting("Fallback", [], lambda key, value, problems, raw, providers: _check_fallback(value, providers, problems),
            "providers to fail over to, in order", page=True),
    Setting("FIRST_BYTE_TIMEOUT_MS", DEFAULT_FIRST_BYTE_TIMEOUT_MS, _positive,
            "with a fallback left: a stream's status and first event", page=True),
    Setting("FIRST_CONTENT_TIMEOUT_MS", DEFAULT_FIRST_CONTENT_TIMEOUT_MS, _positive,
            "with a fallback left: a stream's first content, from being sent", page=True),
    Setting("COOLDOWN_MS", DEFAULT_COOLDOWN_MS, _positive, "how long a failed provider is skipped", page=True),
    Setting("REQUEST_LOG", REQUEST_LOG_NAME, _said_unless(lambda v: isinstance(v, str), "request_log_type"),
            "the request log file", reload=False, host=True),
    Setting("REQUEST_LOG_MAX_MB", DEFAULT_REQUEST_LOG_MAX_MB, _positive, "size at which the request log rotates",
            reload=False, page=True),
    Setting("Routes", {}, lambda key, value, problems, raw, providers: _check_routes(value, providers, problems),
            "rules -> the provider that serves them", page=True),
    Setting("FALLBACK_ORDER", "listed", _said_unless(lambda v: v in FALLBACK_ORDERS, "fallback_order",
                                                     orders=", ".join(FALLBACK_ORDERS)),
            "the order of the Fallback list", page=True),
    Setting("USAGE_DB", USAGE_DB_NAME, _said_unless(lambda v: isinstance(v, str), "usage_db_type"),
            "the usage store", reload=False, host=True),
    Setting("Pricing", {}, lambda key, value, problems, *context: _check_pricing(value, problems),
            "prices per million tokens", page=True),
    Setting("CACHE_WARN_PCT", DEFAULT_CACHE_WARN_PCT, _said_unless(lambda v: _is_number(v) and 0 <= v <= 100,
                                                                   "cache_warn_range"),
            "warn under this cache hit rate", page=True),
    Setting("LOW_BALANCE", 0, _said_unless(lambda v: _is_number(v) and v >= 0, "low_balance_range"),
            "mark a relay with less than this left", page=True),
    Setting("LOW_BALANCE_LAST", False, _bool, "try such relays last in failover", page=True),
    Setting("Keys", [], lambda key, value, problems, raw, providers: _check_keys(
        value, providers, raw.get("USAGE_DB", USAGE_DB_NAME) or store_url(raw), problems), "user keys"),
    Setting("TRUSTED_PROXIES", [], _said_unless(lambda v: isinstance(v, list) and all(
        isinstance(a, str) and _is_address(a) for a in v), "trusted_proxies"),
            "addresses whose X-Forwarded-For gives the client's", host=True),
    Setting("STORE", "", _said_unless(lambda v: v == "" or isinstance(v, str) and v.split("://")[0] in STORE_SCHEMES,
                                      "store_url"), "PostgreSQL shared by several hosts", reload=False, host=True),
)
SETTING = {setting.key: setting for setting in SETTINGS}
TOP_KEYS = tuple(SETTING)
HOST_KEYS = tuple(setting.key for setting in SETTINGS if setting.host)


def validate_config(raw, path="config.json"):
    """Return a Config for a parsed config object, or raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([Said("top_level")], file_name(path))
    problems, providers = [], []
    for setting in SETTINGS:            # Providers first: the checks after it name providers
        value = raw.get(setting.key, setting.default)
        found = setting.check(setting.key, value, problems, raw, providers)
        if setting.key == "Providers":
            providers = found
    if problems:
        raise ConfigError(problems, file_name(path))
    for key in raw:
        if not key.startswith("_") and key not in TOP_KEYS:
            log.warning("%s: unknown key %s is ignored", path, key)
    return Config(path, raw, providers)


def file_name(path):
    """How ccproxy names one of its files in what it says: by its name, never its full path,
    since a browser sees these messages (the path is in the start-up log and --check)."""
    return os.path.basename(path)


def read_config(path):
    """(text, parsed JSON) of a config file; ConfigError with one readable line if unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")     # as bytes: config_version() hashes them as they are
        raw = json.loads(text)
    except FileNotFoundError:
        raise ConfigError([Said("config_missing")], file_name(path))
    except OSError as exc:
        raise ConfigError([Said("config_unreadable", reason=exc.strerror or exc)], file_name(path))
    except UnicodeDecodeError:
        raise ConfigError([Said("config_not_utf8")], file_name(path))
    except json.JSONDecodeError as exc:
        raise ConfigError([Said("config_bad_json", line=exc.lineno, column=exc.colno, reason=exc.msg)], file_name(path))
    return text, raw


def load_config(path):
    """Read and validate a config file; raise ConfigError with one readable line per problem."""
    text, raw = read_config(path)
    config = validate_config(raw, path)
    config.version = config_version(text.encode("utf-8"))
    return config


# ============================================================================ files
#
# What ccproxy keeps beside config.json: the state file, backups, the request log, the usage
# store and their locks. Every one is its owner's alone (mode 0600): they hold keys, usage and
# who asked what. Writes are atomic; several processes on one host share them under flock().


def write_atomic(path, text):
    """Write text to path so that a crash leaves either the old or the new file, never half.
    The file is its owner's alone (mode 0600, as mkstemp makes it): what ccproxy and its tools
    write beside the config holds keys."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is done
    finally:
        os.close(dir_fd)


def open_private(path, flags):
    """os.open() of a file ccproxy keeps beside the config (request log, lock, usage store),
    created with mode 0600; one found readable by others (an older ccproxy made it, or a
    loose umask) is narrowed to its owner."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_MODE)
    narrow(path)
    return fd


def narrow(path):
    """Take group and other permissions off a file, if it exists and has any."""
    try:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except OSError:
        pass            # gone, or not ours: the write that follows says what is wrong


def backup_config(path, data):
    """Keep a config file about to be replaced as <name>.bak-<time>, the newest CONFIG_BACKUPS
    (the web page's edits, a first start that gives it an APIKEY, tools/ccp_update_model.py)."""
    directory, base = os.path.split(os.path.abspath(path))
    now = time.time()
    stamp = "%s-%06d" % (time.strftime("%Y%m%d-%H%M%S", time.localtime(now)), int(now % 1 * 1e6))
    write_atomic(os.path.join(directory, "%s.bak-%s" % (base, stamp)), data.decode("utf-8"))   # sorts by time
    older = sorted(n for n in os.listdir(directory) if n.startswith(base + ".bak-"))
    for name in older[:-CONFIG_BACKUPS]:
        os.unlink(os.path.join(directory, name))


def remove_stale_temp_files(path):
    """Remove what write_atomic left beside path when a crash cut a write short. Only files
    older than STALE_TEMP_S: another process on the same files may be writing one now."""
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(r"\.%s\.[a-z0-9_]{8}\Z" % re.escape(base))
    try:
        names = [n for n in os.listdir(directory) if pattern.match(n)]
    except OSError:
        return
    for name in names:
        temp = os.path.join(directory, name)
        try:
            if time.time() - os.stat(temp).st_mtime > STALE_TEMP_S:
                os.unlink(temp)
                log.info("removed %s, left by a write that was cut short", temp)
        except OSError:
            pass    # gone already, or not ours to remove


def beside(config_path, suffix):
    """A file of ccproxy's beside the config: config.json -> config<suffix>."""
    root, ext = os.path.splitext(os.path.abspath(config_path))
    return root + suffix


def state_path_for(config_path):
    return beside(config_path, STATE_SUFFIX)


def file_signature(path):
    """What changes whenever a file is replaced or written: (inode, mtime, size); None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def flocked(f):
    """An exclusive flock() on an open file, between the ccproxy processes of one host; none
    where there is no flock (Windows: run one process there)."""
    if fcntl is None:
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class FileLock:
    """An exclusive lock between the ccproxy processes of one host: flock() on a file beside
    the config. Taken under Store.lock, so the thread that holds it may take it again. Where
    there is no flock (Windows), nothing: run one process there."""

    def __init__(self, path):
        self.path = path
        self.fd = None
        self.depth = 0

    def __enter__(self):
        if self.depth == 0 and fcntl is not None:
            if self.fd is None:
                try:
                    self.fd = open_private(self.path, os.O_WRONLY)
                except OSError as exc:      # the write that follows will say what is wrong
                    log.warning("%s: cannot lock (%s)", self.path, exc.strerror or exc)
            if self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.depth += 1
        return self

    def __exit__(self, *exc_info):
        self.depth -= 1
        if self.depth == 0 and self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


# ============================================================================ shared store
#
# STORE names a PostgreSQL database that several hosts' ccproxy processes share, each behind
# the same balancer: the config (less each host's own keys, HOST_KEYS) and the state are two
# documents there (the next section), changed in one transaction each and announced with
# NOTIFY, so every host takes a change at once; usage, key minutes, cooldowns, balances and
# the wrong-key throttle go there too (later sections). The
# driver, psycopg 3, is the one import outside the standard library, made only when STORE is
# set: it is libpq's (URLs, PGPASSWORD, ~/.pgpass, sslmode as every PostgreSQL tool takes
# them), hands notifications to a handler (add_notify_handler), has binary wheels on PyPI, and
# Debian 12 and Ubuntu 24.04 package it (python3-psycopg): a server may need no pip at all.
# The schema and the documents' SQL are here; the rest beside the classes they extend, which
# come later in the file: UsageStore's portable statements (SharedUsage runs them, and keeps
# the requests table), SharedLimits' minutes.

# Each schema version's statements, run in order on a database that has an older one. Tables
# live in the schema "ccproxy" (search_path): a database shared with other programs is fine.
STORE_MIGRATIONS = {
    1: ("CREATE TABLE documents (name text PRIMARY KEY, body text NOT NULL, version bigint NOT NULL, "
        "changed_at double precision NOT NULL, changed_by text NOT NULL)",
        "CREATE TABLE config_history (id bigserial PRIMARY KEY, body text NOT NULL, "
        "replaced_at double precision NOT NULL, replaced_by text NOT NULL)",
        "CREATE TABLE usage (hour text NOT NULL, provider text NOT NULL, model text NOT NULL, "
        "key_name text NOT NULL DEFAULT '', {sums}, PRIMARY KEY (hour, provider, model, key_name))",
        "CREATE INDEX usage_by_key ON usage (key_name, hour)",
        "CREATE TABLE conversations (session text NOT NULL, provider text NOT NULL, key_name text NOT NULL "
        "DEFAULT '', first_seen double precision NOT NULL, last_seen double precision NOT NULL, "
        "model text NOT NULL DEFAULT '', {sums}, PRIMARY KEY (session, provider))",
        "CREATE INDEX conversations_by_time ON conversations (last_seen)",
        "CREATE TABLE classes (hour text NOT NULL, class text NOT NULL, provider text NOT NULL, {sums}, "
        "PRIMARY KEY (hour, class, provider))",
        "CREATE TABLE minutes (key_name text NOT NULL, minute bigint NOT NULL, count integer NOT NULL, "
        "PRIMARY KEY (key_name, minute))",
        "CREATE TABLE requests (id bigserial PRIMARY KEY, at double precision NOT NULL, key_name text NOT NULL, "
        "providers text[] NOT NULL, body text NOT NULL)",
        "CREATE INDEX requests_by_time ON requests (at)",
        "CREATE TABLE cooldowns (name text PRIMARY KEY, until double precision NOT NULL, reason text NOT NULL)"),
}
STORE_LOCK = 0x63637078             # pg_advisory_xact_lock's key while a host migrates the schema


def import_psycopg():
    """psycopg 3.1 or newer, or a ConfigError that says which package to install."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError([Said("store_driver")])
    if tuple(int(n) for n in re.findall(r"\d+", psycopg.__version__)[:2]) < STORE_DRIVER_VERSION:
        raise ConfigError([Said("store_driver")])
    return psycopg


def store_where(url):
    """A store's URL as the log may show it: no password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username + "@" if parts.username else ""
    return "%s://%s%s%s" % (parts.scheme, user, host, parts.path)


class Postgres:
    """The connection to the shared store: connections made as libpq makes them (keepalives,
    timeouts, the schema on the search path), the schema migrated forward on start, whether
    the store is reachable (said once in the log when that changes, and on the page), the
    listener of the other hosts' notifications, and a writer thread for what this host
    announces (publish)."""

    def __init__(self, url, psycopg=None):
        self.url = url
        self.psycopg = psycopg or import_psycopg()
        self.Error = self.psycopg.Error
        self.host_name = socket.gethostname()
        self.host_id = "%s/%d/%s" % (self.host_name, os.getpid(), secrets.token_hex(3))
        self.lock = threading.Lock()
        self.down = None                # None, or (since, reason) while the store cannot be reached
        self.probe_at = 0.0             # while it is down: when a request may ask it again (usable)
        self.idle = queue.SimpleQueue()     # connections of request threads and the page, not in use
        self.outbox = queue.SimpleQueue()   # (kind, payload) to announce
        self.handlers = {}              # notification kind -> callable(payload)

        class Numbers(self.psycopg.adapt.Loader):
            """SUM() of bigint is numeric, which psycopg gives as Decimal: ccproxy's sums are
            int (tokens, requests) or float (cost)."""

            def load(self, data):
                text = bytes(data).decode("ascii")
                return int(text) if text.lstrip("-").isdigit() else float(text)
        self.numbers = Numbers

    def connect(self):
        """A new autocommit connection (transactions are explicit: with conn.transaction())."""
        conn = self.psycopg.connect(
            self.url, autocommit=True, connect_timeout=STORE_CONNECT_TIMEOUT_S, application_name="ccproxy",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
            tcp_user_timeout=STORE_STATEMENT_TIMEOUT_MS,        # a server gone silent, not only one that refuses
            options="-c search_path=ccproxy -c statement_timeout=%d" % STORE_STATEMENT_TIMEOUT_MS)
        conn.adapters.register_loader("numeric", self.numbers)
        return conn

    def usable(self):
        """Whether a request should ask the store now: while it answers, yes; while it does
        not, one request every STORE_RETRY_S (which finds it back), the others go on without
        it at once rather than wait on a connection attempt each."""
        if self.down is None:
            return True
        with self.lock:
            if time.monotonic() < self.probe_at:
                return False
            self.probe_at = time.monotonic() + STORE_RETRY_S
            return True

    def reached(self):
        """The store answered: if it was down, say that it is back."""
        if self.down is not None:
            with self.lock:
                down, self.down = self.down, None
            if down is not None:        # not said already by another thread
                log.warning("STORE %s is reachable again after %.0f s: shared limits, usage and changes resume",
                            store_where(self.url), time.time() - down[0])

    def failed(self, exc):
        """The store did not answer: said once until it is back (the page shows it too). An
        error of the statement itself (not of the connection) is only logged: the store is up."""
        reason = self.reason(exc)
        if not isinstance(exc, (self.psycopg.OperationalError, self.psycopg.InterfaceError)):
            log.error("STORE %s refused a statement: %s", store_where(self.url), reason)
            return
        with self.lock:
            first, self.down = self.down is None, self.down or (time.time(), reason)
        self.close()        # the idle connections went with it: new ones once it is back
        if first:
            log.error("STORE %s cannot be reached (%s): relaying goes on with what this host has; key limits "
                      "are counted per host and usage is kept here until it is back", store_where(self.url), reason)

    def reason(self, exc):
        """What went wrong, in one line, for the log and the page: never the URL's password,
        which libpq may quote back in a message about the URL."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = urllib.parse.urlsplit(self.url).password
        return redact(text, [password, urllib.parse.quote(password, safe="")]) if password else text

    def status(self):
        """The store as /api/state shows it."""
        down = self.down
        return {"where": store_where(self.url), "ok": down is None, "since": down and down[0],
                "reason": down and down[1]}

    @contextlib.contextmanager
    def borrowed(self):
        """An idle connection for one short use (made if there is none), kept for the next
        unless it failed; psycopg's errors are the caller's to catch."""
        try:
            conn = self.idle.get_nowait()
        except queue.Empty:
            conn = self.connect()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        if conn.closed or self.idle.qsize() >= STORE_IDLE:
            conn.close()
        else:
            self.idle.put(conn)

    def migrate(self, conn):
        """Bring the schema up to STORE_SCHEMA, one host at a time (an advisory lock); refuse a
        newer one, which a newer ccproxy wrote."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (STORE_LOCK,))
            conn.execute("CREATE SCHEMA IF NOT EXISTS ccproxy")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            found = int(row[0]) if row else 0
            if found > STORE_SCHEMA:
                raise ConfigError([Said("store_schema_newer", found=found, known=STORE_SCHEMA)])
            sums = ", ".join("%s %s NOT NULL DEFAULT 0" % (c, "double precision" if c == "cost" else "bigint")
                             for c in UsageStore.SUMS)
            for version in range(found + 1, STORE_SCHEMA + 1):
                for statement in STORE_MIGRATIONS[version]:
                    conn.execute(statement.format(sums=sums))
                log.info("STORE: schema %d made", version)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', %s) ON CONFLICT (key) "
                         "DO UPDATE SET value = excluded.value", (str(STORE_SCHEMA),))

    def publish(self, kind, payload):
        """Announce something to the other hosts (a cooldown): off the caller's thread."""
        self.outbox.put((kind, payload))

    def notify(self, conn, kind, **payload):
        """NOTIFY the other hosts, within the caller's transaction (sent as it commits)."""
        payload.update(kind=kind, host=self.host_id)
        conn.execute("SELECT pg_notify(%s, %s)", (STORE_CHANNEL, json.dumps(payload, ensure_ascii=False, default=str)))

    def start(self, stopping):
        threading.Thread(target=self.listen, args=(stopping,), name="ccproxy-store-listener", daemon=True).start()
        threading.Thread(target=self.announce, args=(stopping,), name="ccproxy-store-writer", daemon=True).start()

    def listen(self, stopping):
        """LISTEN for the other hosts' notifications and hand each to its kind's handler; after
        a (re)connection, handlers get None first: what was announced meanwhile is lost, so they
        read what they keep afresh."""
        while not stopping.is_set():
            conn = None
            try:
                conn = self.connect()
                conn.add_notify_handler(lambda note: self.heard(note.payload))
                conn.execute("LISTEN " + STORE_CHANNEL)
                self.reached()
                for handler in list(self.handlers.values()):
                    self.hand(handler, None)
                while not stopping.is_set():
                    # Something to read is a notification (or the server going away): a query
                    # takes it in, and hands each notification to heard(). Idle, nothing is sent.
                    readable = select.select([conn.fileno()], [], [], STORE_LISTEN_S)[0]
                    if readable or self.down is not None:
                        conn.execute("SELECT 1")
                        self.reached()      # another use may have failed meanwhile: this one answers
            except self.Error as exc:
                if stopping.is_set():
                    break
                self.failed(exc)
                stopping.wait(STORE_RETRY_S)
            finally:
                if conn is not None:
                    conn.close()

    def keep(self, conn, kind, payload):
        """What of an announcement a host started later needs: the relays cooling down."""
        if kind == "cool":
            conn.execute("INSERT INTO cooldowns (name, until, reason) VALUES (%s, %s, %s) ON CONFLICT (name) DO "
                         "UPDATE SET until = excluded.until, reason = excluded.reason WHERE cooldowns.until < excluded.until",
                         (payload["name"], payload["until"], json.dumps(payload["reason"], ensure_ascii=False)))
        elif kind == "recovered":
            conn.execute("DELETE FROM cooldowns WHERE name = %s", (payload["name"],))

    def cooldowns(self):
        """The relays cooling down now, as "cool" announcements: what a host that starts, or
        that was cut off from the store, missed."""
        try:
            with self.borrowed() as conn:
                found = conn.execute("SELECT name, until, reason FROM cooldowns WHERE until > %s", (time.time(),)).fetchall()
        except self.Error as exc:
            self.failed(exc)
            return []
        return [{"kind": "cool", "name": name, "until": until, "reason": json.loads(reason)} for name, until, reason in found]

    def close(self):
        """Close the idle connections (the threads close their own as they stop)."""
        while True:
            try:
                self.idle.get_nowait().close()
            except queue.Empty:
                return

    def heard(self, payload):
        try:
            message = json.loads(payload)
        except ValueError:
            return
        handler = self.handlers.get(message.get("kind")) if isinstance(message, dict) else None
        if handler is not None and message.get("host") != self.host_id:
            self.hand(handler, message)

    def hand(self, handler, message):
        """One notification to its handler: a handler's bug is logged, and the listener goes on."""
        try:
            handler(message)
        except Exception:
            log.exception("STORE: a notification could not be taken")

    def announce(self, stopping):
        """The writer of publish(): one NOTIFY each; what cannot be sent while the store is
        down is dropped (a cooldown is over by the time it is back)."""
        conn = None
        while not stopping.is_set():
            try:
                kind, payload = self.outbox.get(timeout=STORE_LISTEN_S)
            except queue.Empty:
                continue
            try:
                if conn is None or conn.closed:
                    conn = self.connect()
                with conn.transaction():
                    self.keep(conn, kind, payload)
                    self.notify(conn, kind, **payload)
            except self.Error as exc:
                log.debug("STORE: not announced (%s): %s", kind, exc)
                if conn is not None:
                    conn.close()
                    conn = None


# ============================================================================ shared documents
#
# With STORE, the config (less each host's own keys) and the state live in the store as two
# documents; a host's config.json keeps what it starts with. --migrate-store copies a host's
# files in, --check reaches the store and validates what it shares.


def shared_part(raw):
    """A config without the keys each host keeps in its own config.json (HOST_KEYS)."""
    return {k: v for k, v in raw.items() if k not in HOST_KEYS}


class SharedDocuments:
    """The config and the state as the shared store keeps them: two rows of `documents`, each
    a JSON text (so the config keeps its key order and comments, and If-Match its version)
    and a counter that every change raises. A change is one transaction on both rows, locked
    (SELECT … FOR UPDATE) and announced (NOTIFY) as it commits; every host's listener then
    syncs its Store. The config in force is the shared document with this host's own keys
    (HOST_KEYS of its config.json) over it. What was last read is kept beside config.json
    (STORE_CACHE_SUFFIX), so that a host starts while the store is away."""

    shared = True

    def __init__(self, config_path, pg):
        self.config_path = config_path
        self.pg = pg
        self.cache_path = beside(config_path, STORE_CACHE_SUFFIX)
        self.conn = None                # the documents' connection, used under Store.lock
        self.in_transaction = False
        self.rows = {}                  # name -> (body, version) as last read or written
        self.seen = {}                  # name -> version this host runs
        self.heard = True               # a notification came (or the listener reconnected): sync
        remove_stale_temp_files(self.cache_path)

    def connection(self):
        if self.conn is None or self.conn.closed:
            self.conn = self.pg.connect()
        return self.conn

    def close(self):
        with contextlib.suppress(self.pg.Error):
            if self.conn is not None:
                self.conn.close()
        self.pg.close()

    def fetch(self, lock=False):
        """Read both documents ({name: (body, version)}) and keep them in the cache file."""
        found = {name: (body, version) for name, body, version in self.connection().execute(
            "SELECT name, body, version FROM documents WHERE name IN ('config', 'state')"
            + (" FOR UPDATE" if lock else ""))}
        self.pg.reached()
        if found != self.rows:
            self.rows = found
            self.save_cache()
        return found

    def save_cache(self):
        try:
            write_atomic(self.cache_path, json.dumps({n: {"body": b, "version": v} for n, (b, v) in self.rows.items()},
                                                     ensure_ascii=False) + "\n")
        except OSError as exc:
            log.warning("%s: cannot keep the store's documents here (%s)", self.cache_path, exc.strerror or exc)

    def read_cache(self):
        try:
            with open(self.cache_path, encoding="utf-8") as f:
                found = json.load(f)
            self.rows = {n: (d["body"], d["version"]) for n, d in found.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.rows = {}
        return self.rows

    def open(self, seed=None):
        """At start: migrate the schema and read the documents; an empty store gets seed()'s
        (config text, state) first (a tool, without seed, reads only). With the store away, the
        cached documents, or ConfigError."""
        try:
            conn = self.connection()
            self.pg.migrate(conn)
            with conn.transaction():
                conn.execute("LOCK TABLE documents IN EXCLUSIVE MODE")  # two hosts seeding at once
                if "config" not in self.fetch() and seed is not None:
                    text, state = seed()
                    if any(not key.startswith("_") for key in json.loads(text)):
                        self.put(conn, "config", text)
                        self.put(conn, "state", json.dumps(state, ensure_ascii=False, indent=1))
                        log.warning("STORE %s was empty: it now holds %s's config and state",
                                    store_where(self.pg.url), file_name(self.config_path))
                    else:       # this host's file has nothing to share: it takes the first one shared
                        log.warning("STORE %s holds no config yet: start the first host with its whole %s, or "
                                    "run --migrate-store there", store_where(self.pg.url), file_name(self.config_path))
            self.fetch()
        except self.pg.Error as exc:
            self.pg.failed(exc)
            if "config" not in self.read_cache():
                raise ConfigError([Said("store_unreachable_start", reason=self.pg.down[1],
                                        file=file_name(self.cache_path))])
            log.warning("STORE: starting with the documents last read (%s)", file_name(self.cache_path))

    def put(self, conn, name, body):
        """Write a document within the caller's transaction and announce it; its new version."""
        version = conn.execute(
            "INSERT INTO documents (name, body, version, changed_at, changed_by) VALUES (%s, %s, 1, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET body = excluded.body, version = documents.version + 1, "
            "changed_at = excluded.changed_at, changed_by = excluded.changed_by RETURNING version",
            (name, body, time.time(), self.pg.host_id)).fetchone()[0]
        self.pg.notify(conn, "documents", name=name, version=version)
        self.rows[name] = (body, version)
        self.seen[name] = version
        return version

    @contextlib.contextmanager
    def locked(self):
        """One transaction with both documents locked (FOR UPDATE) and read; a failure of the
        store is a StateError (503) that says so, and nothing is changed."""
        if self.in_transaction:
            yield
            return
        try:
            conn = self.connection()
            with conn.transaction():
                self.in_transaction = True
                try:
                    self.fetch(lock=True)
                    yield
                finally:
                    self.in_transaction = False
            self.save_cache()
        except self.pg.Error as exc:
            self.pg.failed(exc)
            if self.conn is not None and self.conn.broken:
                self.conn = None
            raise StoreDown(Said("store_down", reason=self.pg.down[1] if self.pg.down else exc))

    def may_have_changed(self):
        """Whether the listener heard of a change (or reconnected) since the last look."""
        return self.heard

    def state_changed(self):
        """Under Store.lock: whether the state or the config changed since this host read
        them (asked of the store, unless this is within a change, which read them)."""
        if not self.in_transaction:
            if not self.pg.usable():
                return False            # away: the listener says when it is back
            self.heard = False
            try:
                self.fetch()
            except self.pg.Error as exc:
                self.pg.failed(exc)
                self.heard = True       # the listener says when it is back; then look again
                return False
        return any(self.rows.get(n, (None, None))[1] != self.seen.get(n) for n in ("config", "state"))

    def read_state(self):
        body, version = self.rows.get("state", ("{}", None))
        self.seen["state"] = version
        try:
            return json.loads(body)
        except ValueError:
            return {}

    def config_wanted(self, state):
        body, version = self.rows.get("config", ("", None))
        return None if version == self.seen.get("config") else config_version(body.encode("utf-8"))

    def write_state(self, state):
        self.put(self.conn, "state", json.dumps(state, ensure_ascii=False, indent=1))

    def config_document(self):
        body = self.rows.get("config", ("{}", None))[0]
        data = body.encode("utf-8")
        try:
            return data, json.loads(body)
        except ValueError as exc:
            raise StateError(Said("config_not_json", file="STORE", reason=exc))

    def host_config(self):
        """(this host's config.json parsed, its HOST_KEYS)."""
        text, raw = read_config(self.config_path)
        if not isinstance(raw, dict):
            raise ConfigError([Said("top_level")], file_name(self.config_path))
        return raw, {k: raw[k] for k in HOST_KEYS if k in raw}

    def whole(self, raw):
        """The shared document with this host's own keys over it: the config in force."""
        whole = shared_part(raw)
        whole.update(self.host_config()[1])
        return whole

    def write_config(self, data, text):
        conn = self.conn
        conn.execute("INSERT INTO config_history (body, replaced_at, replaced_by) VALUES (%s, %s, %s)",
                     (data.decode("utf-8"), time.time(), self.pg.host_id))
        conn.execute("DELETE FROM config_history WHERE id <= (SELECT max(id) FROM config_history) - %s",
                     (STORE_HISTORY,))
        self.put(conn, "config", text)

    def load_config(self):
        """The config in force: the shared document (re-read unless the store is away, or this
        is within a change) with this host's keys over it; its version is the document's."""
        if not self.in_transaction:
            try:
                self.fetch()
            except self.pg.Error as exc:
                self.pg.failed(exc)
        body, version = self.rows.get("config", ("{}", None))
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise ConfigError([Said("config_bad_json", line=exc.lineno, column=exc.colno, reason=exc.msg)], "STORE")
        config = validate_config(self.whole(raw) if isinstance(raw, dict) else raw, self.config_path)
        config.version = config_version(body.encode("utf-8"))
        self.seen["config"] = version
        return config


def migrate_store(config_path, force=False):
    """--migrate-store: copy a host's files into the store named by its STORE: the shared part
    of config.json (refused if the store holds a different one, unless force; the old one goes
    to config_history), its state file unless the store has a state (the hosts' own, newer),
    and the usage roll-ups of its sqlite store (a row the store already has is kept, so a
    second run adds nothing twice). What was copied, in a line."""
    config = load_config(config_path)
    if not config.store:
        raise ConfigError([Said("store_url")], file_name(config_path))
    docs = SharedDocuments(config_path, Postgres(config.store))
    text, state = seed_documents(config_path)
    try:
        conn = docs.connection()
        docs.pg.migrate(conn)
        with conn.transaction():
            conn.execute("LOCK TABLE documents IN EXCLUSIVE MODE")
            rows = docs.fetch()
            held = rows.get("config")
            if held and held[0] != text:
                if not force:
                    when, by = conn.execute("SELECT changed_at, changed_by FROM documents WHERE name = 'config'").fetchone()
                    raise ConfigError([Said("store_has_config", file=file_name(config_path), by=by,
                                            when=time.strftime("%Y-%m-%d %H:%M", time.localtime(when)))])
                docs.write_config(held[0].encode("utf-8"), text)
            elif not held:
                docs.put(conn, "config", text)
            if "state" not in rows:
                docs.put(conn, "state", json.dumps(state, ensure_ascii=False, indent=1))
            copied = copy_usage(config.usage_db, conn) if config.usage_db and os.path.exists(config.usage_db) else {}
    except docs.pg.Error as exc:
        raise ConfigError([Said("store_failed", where=store_where(docs.pg.url), reason=docs.pg.reason(exc))])
    finally:
        docs.close()
    return "copied %s into %s: its config (%d providers, %d keys), %s%s" % (
        file_name(config_path), store_where(config.store), len(config.providers), len(config.keys),
        "its state" if "state" not in rows else "not its state (the store's is kept)",
        "".join(", %d %s rows of usage" % (n, table) for table, n in copied.items()))


def check_store(config_path, url):
    """--check with STORE: the store is reached and the config it shares, with this host's
    keys, is valid (ConfigError otherwise); what was found, as words after "OK"."""
    docs = SharedDocuments(config_path, Postgres(url))
    try:
        conn = docs.connection()
        found = conn.execute("SELECT value FROM ccproxy.meta WHERE key = 'schema'").fetchone() \
            if conn.execute("SELECT to_regclass('ccproxy.meta')").fetchone()[0] else None
        config = docs.load_config() if found and "config" in docs.fetch() else None
    except docs.pg.Error as exc:
        raise ConfigError([Said("store_failed", where=store_where(docs.pg.url), reason=docs.pg.reason(exc))])
    finally:
        docs.close()
    if found is None:
        return "; STORE %s reached, empty: the first start makes its tables and shares this file's config" % (
            store_where(url))
    if config is None:
        return "; STORE %s reached, and it holds no config yet" % store_where(url)
    return "; STORE %s reached (schema %s): %d providers, %d keys" % (
        store_where(url), found[0] if found else "-", len(config.providers), len(config.keys))


def copy_usage(path, conn):
    """Copy the usage roll-ups of a sqlite store into the shared one, within the caller's
    transaction; a row the store has already is left as it is. {table: rows copied}."""
    source = open_store(path)
    copied = {}
    try:
        for table in ("usage", "classes", "conversations"):
            cursor = source.execute("SELECT * FROM %s" % table)
            columns = [d[0] for d in cursor.description]
            statement = "INSERT INTO %s (%s) VALUES (%s) ON CONFLICT DO NOTHING" % (
                table, ", ".join(columns), ", ".join(["%s"] * len(columns)))
            copied[table] = 0
            for row in cursor:
                copied[table] += conn.execute(statement, row).rowcount
    finally:
        source.close()
    return copied


def seed_documents(config_path):
    """What a host's files hold for an empty store: (the shared part of its config.json as
    text, its state file's state)."""
    text, raw = read_config(config_path)
    shared = shared_part(raw) if isinstance(raw, dict) else raw
    text = json.dumps(shared, ensure_ascii=False, indent=file_indent(text)) + "\n"
    return text, FileDocuments(config_path).read_state()


# ============================================================================ state


class Target:
    """Everything a request needs about one provider, resolved once per change of state."""

    __slots__ = ("provider", "name", "scheme", "host", "port", "prefix", "netloc", "models",
                 "model_set", "env_models", "header_preset", "header_preset_name",
                 "request_preset", "request_preset_name", "proxy", "pool_key",
                 "refresh", "models_source", "fixes", "learned", "check")

    def __init__(self, config, provider, choices, discovered, learned=(), check=None):
        self.provider = provider
        # the fixes this provider proved it needs (LEARNED_FIXES), made before every request;
        # `learned` as the state file keeps them (id, what, when, the error), those this
        # ccproxy knows (a state file may be newer or hand-edited)
        self.learned = [entry for entry in learned if isinstance(entry, dict) and Fix.known(entry.get("id"))]
        self.fixes = tuple(Fix.from_id(entry["id"]) for entry in self.learned)
        self.check = check              # the last "Check a relay" result
        self.name = provider.name
        parts = urllib.parse.urlsplit(provider.base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.netloc = parts.netloc.rsplit("@", 1)[-1]
        found = discovered.get(provider.name) or {}
        models = found.get("models")
        self.models_source = "discovered" if models else "config"
        self.models = tuple(models) if models else provider.models
        self.model_set = frozenset(self.models)
        self.refresh = found.get("result")
        self.env_models = effective_env_models(config.env_models, provider.env_models)
        self.header_preset_name = choices.get("header_override")
        self.request_preset_name = choices.get("request_override")
        self.header_preset = config.header_presets.get(self.header_preset_name)
        self.request_preset = config.request_presets.get(self.request_preset_name)
        self.proxy = provider.proxy or env_proxy_for(self.scheme, self.host)
        self.pool_key = (self.scheme, self.host, self.port, self.proxy)


class View:
    """What one request reads: the config and the resolved targets, swapped in whole."""

    __slots__ = ("config", "targets", "selected", "fallback", "fallback_enabled", "aliases", "model_ids")

    def __init__(self, config, targets, selected, fallback=(), fallback_enabled=True):
        self.config = config
        self.targets = targets
        self.selected = selected
        self.fallback = fallback
        self.fallback_enabled = fallback_enabled
        # /v1/models: the selected provider's models, then every provider's under its alias.
        self.aliases = alias_catalog(targets)
        own = targets[selected].models if selected in targets else ()
        self.model_ids = tuple(own) + tuple(self.aliases)

    @property
    def target(self):
        return self.targets.get(self.selected)


def first_real(targets, chosen):
    """The provider to relay to: the one chosen, unless it is gone or still has an example
    key (it would only ever be answered locally), in which case the first with a real key.
    The first run's config.in.json selects its example; the relay a user then adds is the one
    meant."""
    if chosen in targets and not targets[chosen].provider.placeholder_key:
        return chosen
    real = [name for name, target in targets.items() if not target.provider.placeholder_key]
    if real:
        return real[0]
    return chosen if chosen in targets else next(iter(targets), None)


def provider_tokens(names):
    """A short ASCII token per provider name for its model aliases: a readable slug and a hash
    of the exact name, so that 中转站A, a.b and a_b all get one of their own."""
    tokens, length = {}, 6
    while True:
        for name in names:
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24]
            tokens[name] = "%s-%s" % (slug or "p", hashlib.sha1(name.encode("utf-8")).hexdigest()[:length])
        if len(set(tokens.values())) == len(tokens) or length >= 40:
            return tokens
        length += 4                     # two hashes collided: longer ones for all


def model_alias(token, model):
    """claude-via-<provider token>--<model id>: an id that starts with "claude" (Claude Code's
    gateway discovery keeps only those) and names one provider's model."""
    return "%s%s--%s" % (ALIAS_PREFIX, token, model)


def alias_catalog(targets):
    """{alias: (provider name, model id)} for every model of every provider, in config order."""
    tokens = provider_tokens(list(targets))
    return {model_alias(tokens[name], model): (name, model)
            for name, target in targets.items() for model in target.models}


class FileDocuments:
    """Where one host keeps the config and the state: config.json and the state file beside
    it, shared by the host's ccproxy processes under flock (FileLock). A change of either is
    seen by its file's signature (inode, mtime, size); the state says which config.json a
    process runs (its "config" version), so that the others reload it too."""

    shared = False

    def __init__(self, config_path):
        self.config_path = config_path
        self.state_path = state_path_for(config_path)
        self.lock = FileLock(self.state_path + ".lock")
        for path in (self.config_path, self.state_path):
            remove_stale_temp_files(path)
        self.seen = None                # file_signature of the state file as last read or written

    def locked(self):
        return self.lock

    def state_changed(self):
        return file_signature(self.state_path) != self.seen

    may_have_changed = state_changed

    def read_state(self):
        self.seen = file_signature(self.state_path)
        try:
            with open(self.state_path, "r", encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable state file ignored (%s)", self.state_path, exc)
            return {}

    def config_wanted(self, state):
        """The config version another process put in force, as its state says; None if none."""
        return state.get("config")

    def write_state(self, state):
        try:
            write_atomic(self.state_path, json.dumps(state, ensure_ascii=False, indent=1) + "\n")
            self.seen = file_signature(self.state_path)
        except OSError as exc:
            log.error("%s: cannot save the state (%s); the change was not made",
                      self.state_path, exc.strerror or exc)
            raise StateError(Said("state_not_saved", file=file_name(self.state_path), reason=exc.strerror or exc))

    def config_document(self):
        """config.json as it is on disk: (its bytes, parsed)."""
        try:
            with open(self.config_path, "rb") as f:
                data = f.read()
            return data, json.loads(data.decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise StateError(Said("config_not_json", file=file_name(self.config_path), reason=exc))

    def whole(self, raw):
        """The config to validate for an edited document: here the document is the whole file."""
        return raw

    def write_config(self, data, text):
        """Replace config.json (data, its bytes now) with text, the old one kept as a backup."""
        try:
            backup_config(self.config_path, data)
            write_atomic(self.config_path, text)
        except OSError as exc:
            raise StateError(Said("config_not_saved", file=file_name(self.config_path), reason=exc.strerror or exc))

    def load_config(self):
        return load_config(self.config_path)


class Store:
    """The proxy's shared mutable state, guarding itself with one lock.

    Requests read `store.view` once (an attribute read of an immutable object); every change
    builds a new View under the lock and swaps it in, once its documents have it.

    The documents (docs) are the config and the state: the files beside config.json
    (FileDocuments), or, with STORE, PostgreSQL's (SharedDocuments). A change is made under
    their lock on the newest state (another process's or host's, read first if it changed), and
    each process takes the others' changes (sync): within STATE_POLL_S from the files, at once
    from the store (its listener).
    """

    def __init__(self, config, docs=None):
        self.lock = threading.RLock()
        self.docs = docs or FileDocuments(config.path)
        self.config_path = config.path
        self.state_path = getattr(self.docs, "state_path", None)
        self.started = config           # what the settings that a reload cannot apply were at start
        self.reload_error = None
        self.on_config = None           # called with each config that a reload or an edit puts in force
        self.state = self._read_state()
        self.view = None
        self._install(config)

    def _read_state(self):
        state = self.docs.read_state()
        if not isinstance(state, dict):
            state = {}
        for key in ("choices", "discovered", "fixes", "checks"):
            if not isinstance(state.get(key), dict):
                state[key] = {}
        return state

    def _install(self, config):
        state = self.state
        targets = {}
        for provider in config.providers:
            if provider.usable:
                choices = state["choices"].get(provider.name) or {}
                targets[provider.name] = Target(config, provider, choices, state["discovered"],
                                                state["fixes"].get(provider.name) or (),
                                                state["checks"].get(provider.name))
        selected = first_real(targets, state.get("selected"))
        if self.view is not None and selected != self.view.selected and selected != state.get("selected"):
            log.info("selected provider %s: the first with a real api_key", selected)
        # The web UI's edited fallback list, if any, else config.json's Fallback.
        edited = state.get("fallback") or {}
        names = edited.get("providers")
        names = config.fallback if names is None else [n for n in names if n in targets]
        self.view = View(config, targets, selected, tuple(names), edited.get("enabled", True))

    def use(self, config):
        """Put a new config in force (under self.lock), and tell on_config."""
        waiting = self.restart_needed(config)
        if waiting and waiting != self.restart_needed(self.view.config):
            log.warning("%s changed in config.json: it takes effect when ccproxy is started again", ", ".join(waiting))
        self._install(config)
        if self.on_config is not None:
            self.on_config(config)

    def restart_needed(self, config=None):
        """The settings a reload cannot apply (Setting.reload) whose value in config differs
        from the one this process started with."""
        now, then = (config or self.view.config).raw, self.started.raw
        return [s.key for s in SETTINGS if not s.reload and now.get(s.key, s.default) != then.get(s.key, s.default)]

    def _change(self, apply):
        """Apply a change to a copy of the state, save that in the documents, and only then
        make it the running state: if it cannot be saved, nothing changes and the caller gets
        a StateError that says why (a change kept only in memory would be gone at the next
        restart, or differ between hosts, without anyone knowing)."""
        with self.lock:
            with self.docs.locked():
                self.take_newer_state()
                state = json.loads(json.dumps(self.state))
                state["selected"] = self.view.selected
                apply(state)
                self.docs.write_state(state)
            self.state = state
            self._install(self.view.config)

    def take_newer_state(self):
        """Under self.lock: if another process or host saved the state since this one read or
        wrote it, take its state, and the config it put in force. True if there was one."""
        if not self.docs.state_changed():
            return False
        self.state = self._read_state()
        version = self.docs.config_wanted(self.state)
        if not (version and version != self.view.config.version) or self.reload(tell=False):
            self._install(self.view.config)     # the same config (or one that would not load)
        return True

    def sync(self):
        """Take another process's (or host's) change, if there is one."""
        if self.docs.may_have_changed():
            with self.lock:
                try:
                    if self.take_newer_state():
                        log.debug("took the state another ccproxy process saved")
                except StateError as exc:       # the store went away: its listener catches up later
                    log.debug("cannot take the shared state now: %s", exc)

    def tell(self, config):
        """Say in the state file which config.json this process now runs, for the others
        (the shared store says it by the config document's own version)."""
        if self.docs.shared:
            return
        try:
            self._change(lambda state: state.update(config=config.version))
        except StateError as exc:
            log.error("other ccproxy processes will not see this config until their own reload: %s", exc)

    def reload(self, tell=True):
        """Re-read the config; on error keep the running config and return the ConfigError."""
        try:
            with self.lock:
                config = self.docs.load_config()
        except ConfigError as exc:
            with self.lock:
                self.reload_error = exc.as_json()
            log.error("reload failed, running config kept (%d problems):", len(exc.problems))
            for problem in exc.problems:
                log.error("  %s", problem)
            return exc
        with self.lock:
            self.reload_error = None
            self.use(config)
        log.info("config reloaded: %d providers", len(config.providers))
        if tell:
            self.tell(config)
        return None

    def config_file(self):
        """The editable config as it is saved (config.json, or the store's document): (its
        bytes, parsed)."""
        with self.lock:
            return self.docs.config_document()

    def edit(self, if_match, change, copies=False):
        """Change the config: change(raw) edits the parsed document in place and may return
        {old name: new name} for renamed providers (with copies, for copied ones). Made only
        on the version the editor saw (If-Match), validated as --check validates, saved
        (config.json: atomically at mode 0600, the previous file kept as a backup; the store:
        in one transaction, the previous version kept in its history), then swapped in as
        Reload does. The new version."""
        with self.lock:
            with self.docs.locked():
                data, raw = self.docs.config_document()
                version = config_version(data)
                if not if_match:
                    raise VersionRequired(Said("version_missing"), version=version)
                if if_match.strip().strip('"') != version:
                    raise Conflict(Said(CODE_STALE), version=version)
                renames = change(raw) or {}
                try:
                    config = validate_config(self.docs.whole(raw), self.config_path)
                except ConfigError as exc:
                    raise ClientError(Said("config_invalid", problems="\n".join(exc.problems)),
                                      problems=exc.as_json())
                text = json.dumps(raw, ensure_ascii=False, indent=file_indent(data.decode("utf-8"))) + "\n"
                self.docs.write_config(data, text)
            self.reload_error = None
            config.version = config_version(text.encode("utf-8"))
            self.use(config)
        self.follow(renames, config.version, copies)
        log.info("config changed from the web page: %d providers", len(config.providers))
        return config.version

    def follow(self, renames, version, copies=False):
        """After an edit of the config: carry the state of renamed providers over (selection,
        presets, models, fallback edit), or give copies the presets, models, learned fixes and
        checks of their original (a copy is the same relay); and say which config.json runs
        now (tell)."""
        selected = self.state.get("selected")      # as saved: the view fell back meanwhile

        def apply(state):
            state["config"] = version
            if selected in renames and not copies:
                state["selected"] = renames[selected]
            for old, new in renames.items():
                for key in ("choices", "discovered", "fixes", "checks"):
                    if old in state[key]:
                        state[key][new] = json.loads(json.dumps(state[key][old])) if copies else state[key].pop(old)
                edited = (state.get("fallback") or {}).get("providers")
                if edited and not copies:
                    state["fallback"]["providers"] = [new if n == old else n for n in edited]
        try:
            self._change(apply)
        except StateError as exc:
            log.error("renamed providers lost their selection or presets, and other ccproxy processes "
                      "will not see this config until their own reload: %s", exc)

    def learn_fixes(self, name, fixes):
        """Remember fixes that made a provider answer (LEARNED_FIXES), as (fix, the error that
        taught it) pairs; later requests to it go out fixed."""
        def apply(state):
            known = state["fixes"].setdefault(name, [])
            ids = {entry.get("id") for entry in known}
            for fix, error in fixes:
                if fix.id not in ids:
                    known.append({"id": fix.id, "what": fix.describe(), "at": time.time(), "error": error})
        self._change(apply)
        log.warning("provider %s needs: %s (learned, remembered)", name, "; ".join(f.describe() for f, _ in fixes))

    def forget_fixes(self, name, fix_id=None):
        self.require(name)

        def apply(state):
            if fix_id is None:
                state["fixes"].pop(name, None)
            else:
                state["fixes"][name] = [e for e in state["fixes"].get(name, []) if e.get("id") != fix_id]
        self._change(apply)

    def record_check(self, name, result):
        self._change(lambda state: state["checks"].update({name: result}))

    def require(self, name):
        if name not in self.view.targets:
            if name in self.view.config.by_name:
                raise ClientError(Said("separator_not_usable", name=name))
            raise NotFound(Said("no_provider_named", name=name))

    def select(self, name):
        self.require(name)
        if self.view.targets[name].provider.placeholder_key:
            raise ClientError(Said("example_key", name=name))
        self._change(lambda state: state.update(selected=name))
        log.info("selected provider %s", name)

    def set_overrides(self, name, header_override, request_override):
        config = self.view.config
        for preset, presets, kind in ((header_override, config.header_presets, "HeaderOverrides"),
                                      (request_override, config.request_presets, "RequestOverrides")):
            if preset is not None and preset not in presets:
                raise NotFound(Said("no_preset", kind=kind, name=preset))
        self.require(name)
        self._change(lambda state: state["choices"].update({name: {"header_override": header_override,
                                                                    "request_override": request_override}}))

    def set_fallback(self, enabled, names):
        """Save the web UI's fallback list (names None = back to config.json's Fallback)."""
        if names is not None:
            for name in names:
                self.require(name)
            if len(set(names)) != len(names):
                raise ClientError(Said("fallback_twice"))
        self._change(lambda state: state.update(fallback={
            "enabled": bool(enabled), "providers": None if names is None else list(names)}))

    def set_discovered(self, results):
        """Store refresh results: {name: (models or None, result dict)}."""
        def apply(state):
            discovered = state["discovered"]
            for name, (models, result) in results.items():
                entry = discovered.get(name) or {}
                entry["result"] = result
                if models:
                    entry["models"] = models
                discovered[name] = entry
        self._change(apply)


# ============================================================================ config editing
#
# The web page edits config.json itself, which stays the one source of truth a person may also
# edit by hand. Every edit names the version it was made on (If-Match: the hash of the file's
# bytes), is applied to the parsed file (key order, _comment keys and unknown keys kept), is
# validated exactly as --check validates, and is written atomically with the previous file
# kept as a backup; then it is swapped in as Reload does (Store.edit).

EDITABLE_SETTINGS = tuple(setting.key for setting in SETTINGS if setting.page)
CODE_STALE = "stale_version"


def config_version(data):
    """The version of a config file: a hash of its bytes, so a hand edit changes it too."""
    return hashlib.sha256(data).hexdigest()[:16]


def file_indent(text):
    """The indentation a JSON file uses (its first indented line's), to write it back alike."""
    match = re.search(r"\n([ \t]+)\S", text)
    if match is None:
        return 2
    found = match.group(1)
    return "\t" if found.startswith("\t") else len(found)


def redacted_config(raw):
    """The config for the web page: every key replaced by its hint (and "has_key")."""
    out = json.loads(json.dumps(raw))
    if out.get("APIKEY"):
        out["APIKEY"] = key_hint(out["APIKEY"])
    for entry in out.get("Providers") or []:
        if isinstance(entry, dict) and entry.get("api_key"):
            entry["api_key"] = key_hint(str(entry["api_key"]))
            entry["has_key"] = True
    return out


def provider_index(raw, name):
    for index, entry in enumerate(raw.get("Providers") or []):
        if isinstance(entry, dict) and entry.get("name") == name:
            return index
    return None


def put_provider(raw, name, fields):
    """Create or change provider `name` in raw (in place): fields are merged into its entry
    (null removes one; an absent api_key keeps the stored key), so keys the page does not know
    stay. A "name" different from `name` renames it, in Fallback too. Returns the new name."""
    if not isinstance(fields, dict):
        raise ClientError(Said("provider_not_object"))
    fields = {k: v for k, v in fields.items() if k not in ("has_key", "key_hint")}
    new_name = fields.get("name", name)
    providers = raw.setdefault("Providers", [])
    if not isinstance(providers, list):
        raise ClientError(Said("providers_not_list"))
    index = provider_index(raw, name)
    if new_name != name and provider_index(raw, new_name) is not None:
        raise Conflict(Said("name_taken", name=new_name))
    entry = providers[index] if index is not None else {}
    if index is None:
        providers.append(entry)
    entry["name"] = new_name
    for key, value in fields.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    if new_name != name:
        rename_in_lists(raw, lambda n: new_name if n == name else n)
    return new_name


def duplicate_provider(raw, name, new_name=None):
    """Copy provider `name`, its key included, to just below it, as new_name or else the
    first free "NAME (copy)", "NAME (copy 2)"…; the copy's name."""
    index = provider_index(raw, name)
    if index is None:
        raise NotFound(Said("no_provider_in_config", name=name))
    if new_name is None:
        new_name, n = name + " (copy)", 1
        while provider_index(raw, new_name) is not None:
            n += 1
            new_name = "%s (copy %d)" % (name, n)
    elif not isinstance(new_name, str) or not new_name.strip():
        raise ClientError(Said("name_missing"))
    elif provider_index(raw, new_name) is not None:
        raise Conflict(Said("name_taken", name=new_name))
    copy = json.loads(json.dumps(raw["Providers"][index]))
    copy["name"] = new_name
    raw["Providers"].insert(index + 1, copy)
    return new_name


def rename_in_lists(raw, rename):
    """Rename (or with None, remove) providers in Fallback and in each key's providers."""
    lists = [(raw, "Fallback")] + [(k, "providers") for k in raw.get("Keys") or [] if isinstance(k, dict)]
    for holder, field in lists:
        if isinstance(holder.get(field), list):
            holder[field] = [m for m in map(rename, holder[field]) if m is not None]


def delete_provider(raw, name):
    index = provider_index(raw, name)
    if index is None:
        raise NotFound(Said("no_provider_in_config", name=name))
    del raw["Providers"][index]
    rename_in_lists(raw, lambda n: None if n == name else n)


def order_providers(raw, names):
    providers = raw.get("Providers") or []
    current = [entry.get("name") for entry in providers if isinstance(entry, dict)]
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(map(str, current)) \
            or len(set(names)) != len(names):
        raise ClientError(Said("order_incomplete"))
    by_name = {entry.get("name"): entry for entry in providers}
    raw["Providers"] = [by_name[name] for name in names]


def put_settings(raw, settings):
    if not isinstance(settings, dict):
        raise ClientError(Said("settings_not_object"))
    for key, value in settings.items():
        if key not in EDITABLE_SETTINGS:
            raise ClientError(Said("setting_not_editable", key=key, editable=", ".join(EDITABLE_SETTINGS)))
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value


def exported_config(raw, with_keys):
    """What Export gives: the providers and the settings the page edits, never the APIKEY;
    provider keys only when asked for."""
    out = {"_comment": "ccproxy %s export, %s%s" % (VERSION, time.strftime("%Y-%m-%d %H:%M"),
                                                    " — it holds provider keys: keep it private" if with_keys else
                                                    " — without keys")}
    for key in EDITABLE_SETTINGS + ("Providers",):
        if key in raw:
            out[key] = json.loads(json.dumps(raw[key]))
    for entry in out.get("Providers") or []:
        if isinstance(entry, dict) and not with_keys:
            entry.pop("api_key", None)
    return out


# claude-code-router's Router: which request kinds go where ("provider,model"). background
# takes the haiku family (Claude Code's small, fast requests), which Routes can say; the
# others route on what a request holds (thinking, its length, a tool), which Routes cannot.
CCR_ROUTER_UNSUPPORTED = ("think", "longContext", "longContextThreshold", "webSearch", "image")
# A URL path that is not the Anthropic Messages API: OpenAI's chat and responses, Gemini's.
_OTHER_API_PATH = re.compile(r"/(chat/completions|completions|responses|v1beta/models)(/|:|$)", re.I)


OTHER_API_WORDS = {"url": "its URL is an OpenAI- or Gemini-format endpoint (%s)",
                   "protocol": "its protocol is %s",
                   "transformer": "claude-code-router translates it with the %s transformer"}


def other_api(entry):
    """Why an imported provider speaks another API than Anthropic's Messages (claude-code-router
    translates for such providers, ccproxy does not): (what shows it, its value), or None."""
    path = urllib.parse.urlsplit(str(entry.get("api_base_url") or "")).path
    if _OTHER_API_PATH.search(path):
        return "url", path
    protocol = entry.get("protocol")
    if isinstance(protocol, str) and not protocol.lower().startswith("anthropic"):
        return "protocol", protocol
    use = (entry.get("transformer") or {}).get("use") if isinstance(entry.get("transformer"), dict) else None
    if isinstance(use, list) and use:
        names = [u[0] if isinstance(u, list) and u else u for u in use]
        if not any(isinstance(n, str) and n.lower() == "anthropic" for n in names):
            return "transformer", ", ".join(map(str, names))
    return None


def imported_providers(text):
    """What a user pastes or uploads, as an import: a ccproxy config or export, a
    claude-code-router config.json (its Providers, and its Router where Routes and env-models
    can say the same), or a Claude Code settings.json (its env block). A dict: format,
    providers (entries), refused ({name: (what shows it, value)}: another API), routes
    ({glob: name}) and notes (what was not carried over, each with a code for the page).
    ClientError if it is none of these."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ClientError(Said("import_not_json", reason=exc))
    if not isinstance(obj, dict):
        raise ClientError(Said("import_top_level"))
    found = {"providers": [], "refused": {}, "routes": {}, "notes": []}
    env = obj.get("env")
    if isinstance(env, dict) and env.get("ANTHROPIC_BASE_URL"):
        base = str(env["ANTHROPIC_BASE_URL"])
        entry = {"name": urllib.parse.urlsplit(base).hostname or "imported", "api_base_url": base}
        if env.get("ANTHROPIC_API_KEY"):
            entry.update(api_key=str(env["ANTHROPIC_API_KEY"]), auth="x-api-key")
        elif env.get("ANTHROPIC_AUTH_TOKEN"):
            entry.update(api_key=str(env["ANTHROPIC_AUTH_TOKEN"]), auth="bearer")
        models = {var: str(env[var]) for var in MODEL_VARS if env.get(var)}
        if models:
            entry["env-models"] = models
        return dict(found, format="Claude Code settings.json", providers=[entry])
    providers = obj.get("Providers")
    if not isinstance(providers, list):
        raise ClientError(Said("import_not_config"))
    ccr = "Router" in obj or any(isinstance(p, dict) and ("transformer" in p or "protocol" in p) for p in providers)
    for item in providers:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        if ccr:
            reason = other_api(item)
            if reason:
                found["refused"][item["name"]] = reason
            item = {k: item[k] for k in ("name", "api_base_url", "api_key", "models") if k in item}
        found["providers"].append({k: v for k, v in item.items() if k != "has_key"})
    if ccr and isinstance(obj.get("Router"), dict):
        ccr_router(obj["Router"], found)
    return dict(found, format="claude-code-router config" if ccr else "ccproxy config")


def ccr_router(router, found):
    """claude-code-router's Router, in ccproxy's words where it has them: default's model for
    the sonnet and opus families of that provider, background's for its haiku family (and
    a Routes entry "*haiku*" when background is another provider). The rest becomes notes."""
    entries = {e["name"]: e for e in found["providers"] if e["name"] not in found["refused"]}
    families = (("default", ("ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL")),
                ("background", ("ANTHROPIC_DEFAULT_HAIKU_MODEL",)))
    default = None
    for field, variables in families:
        value = router.get(field)
        if not value:
            continue
        name, _, model = str(value).partition(",")
        if name not in entries or not model:
            found["notes"].append({"code": "router_unknown", "field": field, "value": str(value),
                                   "message": "Router.%s (%s) names no provider imported here" % (field, value)})
            continue
        mapping = entries[name].setdefault("env-models", {})
        for variable in variables:
            mapping.setdefault(variable, model)
        if field == "default":
            default = name
            found["notes"].append({"code": "router_default", "field": field, "value": str(value),
                                   "message": "Router.default: select %s in the page to use it (an import does "
                                              "not change the selection); its sonnet and opus requests go out as %s"
                                              % (name, model)})
        elif name != default:
            found["routes"]["*haiku*"] = name
    for field in CCR_ROUTER_UNSUPPORTED:
        if router.get(field) not in (None, ""):
            found["notes"].append({"code": "router_unsupported", "field": field, "value": str(router[field]),
                                   "message": "Router.%s is not carried over: ccproxy routes by model name "
                                              "(Routes), not by %s" % (field, field)})


def import_plan(raw, imported):
    """For each imported provider: add, change (which fields), same, or refused (why), with
    keys hidden; and the Routes entries it would add."""
    plan = []
    for entry in imported["providers"]:
        index = provider_index(raw, entry["name"])
        refused = imported["refused"].get(entry["name"])
        if refused:
            action, changed = "refused", []
        elif index is None:
            action, changed = "add", sorted(k for k in entry if k != "name")
        else:
            old = raw["Providers"][index]
            changed = sorted(k for k, v in entry.items() if k != "name" and old.get(k) != v)
            action = "change" if changed else "same"
        shown = dict(entry)
        if shown.get("api_key"):
            shown["api_key"] = key_hint(str(shown["api_key"]))
        item = {"name": entry["name"], "action": action, "fields": changed, "provider": shown}
        if refused:
            via, value = refused
            item.update(code="import_other_api", via=via, value=value,
                        reason="not imported: ccproxy relays the Anthropic Messages API only, and "
                               + OTHER_API_WORDS[via] % value)
        plan.append(item)
    return plan


def import_routes(raw, routes, names, notes):
    """Add the imported Routes entries whose provider exists after the import; an entry that
    Routes already has with another provider stays as it is, and a note says so."""
    current = raw.get("Routes")
    if not isinstance(current, dict):
        current = {}
    for glob, name in routes.items():
        if name not in names:
            continue
        if current.get(glob, name) != name:
            notes.append({"code": "route_kept", "field": glob, "value": current[glob],
                          "message": "Routes already sends %s to %s; kept" % (glob, current[glob])})
            continue
        current[glob] = name
        raw["Routes"] = current


def api_config(handler, params):
    """The whole config.json for the editor, keys replaced by their hints, and its version."""
    data, raw = handler.server.store.config_file()
    version = config_version(data)
    handler.send_json(200, {"version": version, "config": redacted_config(raw),
                            "editable": list(EDITABLE_SETTINGS)}, [("ETag", '"%s"' % version)])
    return None


def edited(handler, change):
    """Run a change through Store.edit with the request's If-Match; the new version and state."""
    version = handler.server.store.edit(handler.headers.get("If-Match"), change)
    return 200, {"version": version, "state": api_state(handler)[1]}


def api_put_provider(handler, params):
    name = urllib.parse.unquote(params["name"])
    fields = handler.json_body()

    def change(raw):
        new = put_provider(raw, name, fields)
        return {name: new} if new != name else None
    result = edited(handler, change)
    new_name = fields.get("name", name) if isinstance(fields, dict) else name
    if new_name != name and name in handler.server.tests:
        handler.server.tests[new_name] = handler.server.tests.pop(name)
    return result


def api_duplicate_provider(handler, params):
    """A copy of the provider with its key, just below it; {"name": …} names it (the page sends
    the name in its language), else "NAME (copy)". The answer says the copy's name."""
    name = urllib.parse.unquote(params["name"])
    body = handler.json_body()
    if not isinstance(body, dict):
        raise ClientError(Said("duplicate_body"))
    made = []

    def change(raw):
        made.append(duplicate_provider(raw, name, body.get("name")))
        return {name: made[0]}
    version = handler.server.store.edit(handler.headers.get("If-Match"), change, copies=True)
    return 200, {"version": version, "name": made[0], "state": api_state(handler)[1]}


def api_delete_provider(handler, params):
    name = urllib.parse.unquote(params["name"])
    result = edited(handler, lambda raw: delete_provider(raw, name))
    handler.server.tests.pop(name, None)
    return result


def api_order(handler, params):
    body = handler.json_body()
    names = body.get("names") if isinstance(body, dict) else None
    return edited(handler, lambda raw: order_providers(raw, names))


def api_settings(handler, params):
    settings = handler.json_body()
    return edited(handler, lambda raw: put_settings(raw, settings))


def api_export(handler, params):
    """The providers and settings as a file to download; keys only with ?keys=1."""
    with_keys = handler.query_params().get("keys", ["0"])[0] in ("1", "true", "yes")
    raw = handler.server.store.config_file()[1]
    data = json.dumps(exported_config(raw, with_keys), ensure_ascii=False, indent=2).encode("utf-8") + b"\n"
    handler.send_bytes(200, data, "application/json",
                       [("Content-Disposition", 'attachment; filename="ccproxy-export%s.json"'
                         % ("-with-keys" if with_keys else "")), ("Cache-Control", "no-store")])
    return None


def import_request(handler):
    body = handler.json_body()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise ClientError(Said("import_body"))
    return body, imported_providers(text)


def api_import_preview(handler, params):
    _, imported = import_request(handler)
    raw = handler.server.store.config_file()[1]
    return 200, {"format": imported["format"], "providers": import_plan(raw, imported),
                 "routes": imported["routes"], "notes": imported["notes"]}


def api_import(handler, params):
    """Add or change the imported providers (all, or those in "names"), by the same write
    path; one that speaks another API is never imported. Routes entries of the import follow
    their provider."""
    body, imported = import_request(handler)
    names = body.get("names")
    chosen = [e for e in imported["providers"]
              if (names is None or e["name"] in names) and e["name"] not in imported["refused"]]
    notes = list(imported["notes"])

    def change(raw):
        for entry in chosen:
            fields = dict(entry)
            if not fields.get("api_key"):
                fields.pop("api_key", None)     # an export without keys keeps the stored ones
            put_provider(raw, entry["name"], fields)
        present = {e.get("name") for e in raw.get("Providers") or [] if isinstance(e, dict)}
        import_routes(raw, imported["routes"], present, notes)
    status, result = edited(handler, change)
    refused = [name for name in imported["refused"] if names is None or name in names]
    result.update(imported=[e["name"] for e in chosen], notes=notes, refused=refused)
    return status, result


# ============================================================================ HTTP messages

_MESSAGES_TAIL = re.compile(r"/v1/messages/?$")


def derive_base_url(api_base_url):
    """The provider's origin plus any path prefix: only a trailing /v1/messages is removed.

    https://api.deepseek.com/anthropic/v1/messages -> https://api.deepseek.com/anthropic
    """
    url = api_base_url.strip()
    url = _MESSAGES_TAIL.sub("", url)
    return url.rstrip("/")


class Headers(list):
    """A message's header fields in order, as (name, value) pairs, with case-insensitive get().

    Replaces http.server's email-package parser, which costs ~0.2 ms a request in profiles.
    get() answers from an index of lowercased names made on its first call (a request asks
    for half a dozen fields): the fields are not changed once parsed.
    """

    index = None

    def get(self, name, default=None):
        if self.index is None:
            self.index = {}
            for key, value in self:
                self.index.setdefault(key.lower(), value)
        return self.index.get(name.lower(), default)

    def items(self):
        return self

    def get_all(self, name, default=None):
        name = name.lower()
        found = [value for key, value in self if key.lower() == name]
        return found or default


def parse_header_lines(lines):
    """Headers from raw header lines (bytes, without the blank line), or ValueError.

    Obsolete line folding (RFC 9112 §5.2) is unfolded into the previous field.
    """
    headers = Headers()
    for raw in lines:
        line = raw.decode("iso-8859-1").rstrip("\r\n")
        if _CONTROL.search(line.replace("\t", " ")):
            raise ValueError("a control character inside a header line")     # RFC 9110 section 5.5
        if line[:1] in (" ", "\t"):
            if not headers:
                raise ValueError("a folded line before any header")
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            # A name that is not a token ("X Foo") ends the header block early for lenient
            # parsers downstream, which then take the body for the next request.
            raise ValueError("malformed header line (the field name must be a token)")
        headers.append((name, value.strip(" \t")))
    return headers


# Printable ASCII but "%": what a header value of ccproxy's own may carry as it is.
_NOT_HEADER_TEXT = re.compile(r"[^\x20-\x24\x26-\x7e]")


def header_text(text):
    """A name (provider, model…) made fit for a header value of ccproxy's own.

    Header values are Latin-1 at best and control characters would end the field, so any
    character but printable ASCII, and "%" itself, is percent-encoded as UTF-8 (RFC 3986
    section 2.1): 中转站A -> %E4%B8%AD%E8%BD%AC%E7%AB%99A. urllib.parse.unquote() or
    decodeURIComponent() gives the name back. ASCII names stay as they are.
    """
    if not _NOT_HEADER_TEXT.search(text):
        return text
    return _NOT_HEADER_TEXT.sub(lambda m: urllib.parse.quote(m.group(), safe=""), text)


def message_head(start_line, fields):
    """A request or status line and its header block, as bytes that leave in one write.

    Values are known to be free of control characters: the client's and the provider's by
    parse_header_lines, the config's by validate_config, ccproxy's own by header_text. A value
    outside Latin-1 raises UnicodeEncodeError here, before anything is written.
    """
    lines = [start_line]
    lines.extend("%s: %s" % field for field in fields)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def request_head(method, target, headers):
    return message_head("%s %s HTTP/1.1" % (method, target), headers)


def response_head(status, fields):
    return message_head("HTTP/1.1 %d %s" % (status, STATUS_PHRASES.get(status, "")), fields)


def body_framing(headers):
    """(chunked, length) of a request body from its header fields (RFC 9112 section 6.3).

    What a server and the next hop could read differently is refused: a transfer coding other
    than chunked (501), Transfer-Encoding beside Content-Length, and a Content-Length that is
    not one run of digits in one field (ValueError, answered 400).
    """
    codings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if codings:
        if lengths:
            raise ValueError("Transfer-Encoding and Content-Length together")
        if ",".join(codings).strip().lower() != "chunked":
            raise Unsupported(Said("coding_unsupported", coding=",".join(codings)[:ERROR_EXCERPT]))
        return True, 0
    if not lengths:
        return False, 0
    return False, content_length(lengths)


def content_length(values):
    """The length one Content-Length field states: one run of digits (RFC 9110 §8.6);
    ValueError for anything else. +98, 0x62, -1 and 9_8 are what int() would take and another
    parser would not; a second field or a list ("98, 98"), which RFC 9110 lets a recipient
    either refuse or fold, is refused too: never guess what a message's framing is."""
    if len(values) != 1 or "," in values[0]:
        raise ValueError("Content-Length is given more than once")
    value = values[0].strip(" \t")
    if not _DIGITS.fullmatch(value):
        raise ValueError("Content-Length %r is not a number" % value[:ERROR_EXCERPT])
    return int(value)


def has_dot_segment(path):
    """Whether a path has a "." or ".." segment, also percent-encoded, once or twice: a relay
    that resolves it (RFC 3986 §5.2.4) would serve a path outside the one ccproxy checked."""
    for _ in range(3):
        if any(segment in (".", "..") for segment in re.split(r"[/\\]", path)):
            return True
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True


def connection_tokens(headers):
    tokens = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(","))
    return tokens


def end_to_end(headers, own):
    """Drop hop-by-hop headers (and those named in Connection) and the ones we set ourselves."""
    drop = HOP_BY_HOP | own | connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def cross_site(headers):
    """Why a request comes from a web page of another origin, or None. Browsers say where a
    request comes from on every fetch (Sec-Fetch-Site, Fetch Metadata) and on every request
    but a plain GET (Origin, RFC 6454 section 7); a page on any site the user opens can send
    requests to 127.0.0.1, so neither may name anything but ccproxy's own page. Claude Code,
    the SDKs and curl send neither. A port is part of an origin: another program's page on
    localhost is "same-site", and refused too."""
    site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
    if site in ("cross-site", "same-site"):
        return "Sec-Fetch-Site: " + site
    origin = headers.get("Origin")
    if origin is None:
        return None
    parts = urllib.parse.urlsplit(origin.strip().lower())
    default = {"http": ":80", "https": ":443"}.get(parts.scheme)
    host = (headers.get("Host") or "").strip().lower()
    if default is None or _strip_suffix(parts.netloc, default) != _strip_suffix(host, default):
        return "Origin: " + origin[:ERROR_EXCERPT]
    return None


def _strip_suffix(text, suffix):
    return text[:-len(suffix)] if text.endswith(suffix) else text


def client_key(headers):
    """The key a client sent and the style it used: (key, 'x-api-key'|'bearer'|None)."""
    for name, value in headers:
        lname = name.lower()
        if lname == "x-api-key" and value:
            return value.strip(), "x-api-key"
        if lname == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip(), "bearer"
    return "", None


def auth_headers(key, style):
    if style == "bearer":
        return [("Authorization", "Bearer " + key)]
    if style == "both":
        return [("x-api-key", key), ("Authorization", "Bearer " + key)]
    return [("x-api-key", key)]


def retry_after_seconds(value, now=None):
    """Seconds from a Retry-After header (delay-seconds or HTTP-date, RFC 9110 §10.2.3), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


_DIGITS = re.compile(r"[0-9]{1,18}")


def chunk_size(line):
    """The size of a chunk from its size line, extensions ignored; ValueError unless the size
    is hex digits alone (int() would also take "+1a", "0x1a", "1_a" and "-1")."""
    size = line.split(b";", 1)[0].rstrip(b"\r\n").rstrip(b" \t")     # BWS before an extension
    if not _HEX.fullmatch(size):
        raise ValueError("chunk size %r is not hex digits" % size[:20])
    return int(size, 16)


class ChunkDecoder:
    """A chunked message body (RFC 9112 section 7.1) decoded as it arrives: feed() takes any
    piece of the wire bytes and returns the payload it completes, however many chunks that
    spans. `done` once the last chunk and the trailer section are in; `extra` if bytes
    followed them. Malformed framing raises ValueError.
    """

    __slots__ = ("left", "crlf", "line", "last", "done", "extra")

    def __init__(self):
        self.left = 0           # payload bytes of the current chunk still to come
        self.crlf = b""         # the part of the CRLF after a chunk's payload still to come
        self.line = b""         # a size or trailer line cut off by the end of a piece
        self.last = False       # the zero-size chunk has been seen: trailer lines follow
        self.done = False
        self.extra = False

    def feed(self, data):
        out = []
        pos, end = 0, len(data)
        while pos < end:
            if self.done:
                self.extra = True
                break
            if self.left:
                take = min(self.left, end - pos)
                out.append(data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.crlf = b"\r\n"
                continue
            if self.crlf:
                take = data[pos:pos + len(self.crlf)]
                if not self.crlf.startswith(take):
                    raise ValueError("no CRLF after a chunk")
                self.crlf = self.crlf[len(take):]
                pos += len(take)
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.line += data[pos:]
                if len(self.line) > CHUNK_SIZE_LINE:
                    raise ValueError("chunk size line too long")
                break
            line = self.line + data[pos:newline]
            self.line = b""
            pos = newline + 1
            if len(line) > CHUNK_SIZE_LINE:
                raise ValueError("chunk size line too long")
            if self.last:
                self.done = not line.strip()        # trailer fields until the empty line
                continue
            size = chunk_size(line)
            self.left = size
            self.last = not size
        return b"".join(out)


def read_chunked(rfile, limit):
    """A chunked request body (RFC 9112 section 7.1) read line by line, so that nothing of a
    pipelined next request is taken; the limit applies to the decoded total."""
    parts, total = [], 0
    while True:
        line = rfile.readline(CHUNK_SIZE_LINE + 1)
        if not line.endswith(b"\n"):
            raise ClientError(Said("chunk_line"))
        try:
            size = chunk_size(line)
        except ValueError as exc:
            raise ClientError(Said("chunk_bad", reason=exc))
        if not size:
            break
        total += size
        if total > limit:
            raise TooLarge(Said("body_too_large", limit=limit >> 20))
        data = rfile.read(size)
        if len(data) != size or rfile.read(2) != b"\r\n":
            raise ClientError(Said("chunk_short"))
        parts.append(data)
    for _ in range(MAX_HEADERS + 1):    # trailer fields, dropped
        line = rfile.readline(MAX_LINE + 1)
        if line in (b"\r\n", b"\n"):
            return b"".join(parts)
        if not line.endswith(b"\n"):
            break
    raise ClientError(Said("chunk_trailer"))


def error_body(kind, message, extra=None):
    """Anthropic's error shape; `extra` members (a machine-readable "code" the web page
    translates, "problems", "version"…) go beside "error", where clients ignore them."""
    body = {"type": "error", "error": {"type": kind, "message": message}}
    body.update(extra or {})
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def sse_error(kind, message):
    return b"event: error\ndata: " + error_body(kind, message) + b"\n\n"


def env_proxy_for(scheme, host):
    """The proxy URL from HTTPS_PROXY/HTTP_PROXY for this host, honouring NO_PROXY, or ''."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme, "")
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return ""
    return url if "://" in url else "http://" + url


# ============================================================================ Anthropic requests and replies

def apply_header_preset(headers, preset):
    """Set each header of the preset (replacing any of the same name); "" removes it."""
    if not preset:
        return headers
    names = {k.lower() for k in preset}
    out = [(k, v) for k, v in headers if k.lower() not in names]
    out.extend((k, v) for k, v in preset.items() if v != "" and not k.startswith("_"))
    return out


def effective_env_models(global_env, provider_env):
    """Global env-models overlaid by the provider's own; empty values count as unset."""
    merged = {k: v for k, v in global_env.items() if v}
    merged.update((k, v) for k, v in provider_env.items() if v)
    return merged


_MODEL_SUFFIX = re.compile(r"\[[^\[\]]*\]$")


def map_model(model, models, env_models):
    """The model to send for a requested one, given the provider's models and env-models.

    A [1m]-style suffix is removed (relays reject it). A model the provider does not list is
    replaced by the env-models entry for its family (haiku/sonnet/opus), else ANTHROPIC_MODEL.
    """
    bare = _MODEL_SUFFIX.sub("", model)
    if bare in models:
        return bare
    lower = bare.lower()
    for family, var in FAMILY_VARS:
        if family in lower and env_models.get(var):
            return env_models[var]
    return env_models.get("ANTHROPIC_MODEL") or bare


# Claude Code sends "model" as the body's first key. Anchored at the start, this can only match
# that top-level key, so mapping can read and replace it without parsing megabytes of JSON.
_FIRST_KEY_MODEL = re.compile(rb'\s*\{\s*"model"\s*:\s*("(?:[^"\\]|\\.)*")')


def requested_model(body):
    """The "model" a Messages request body asks for, or None; the first-key fast path first."""
    first = _FIRST_KEY_MODEL.match(body)
    try:
        model = json.loads(first.group(1)) if first is not None else json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def prepare_body(view, target, path, body, real_model=None):
    """(body bytes, model requested, model sent). Parses JSON only if something may change.
    real_model: the model an alias named, sent as it is (no family mapping on top)."""
    config = view.config
    if real_model is not None:
        mapped = lambda model: real_model                                       # noqa: E731
    elif config.model_mapping:
        mapped = lambda model: map_model(model, target.model_set, target.env_models)  # noqa: E731
    else:
        mapped = None
    if not body or not path.startswith("/v1/messages") or not (mapped or target.request_preset):
        return body, None, None
    first = None if target.request_preset else _FIRST_KEY_MODEL.match(body)
    if first is not None:
        try:
            requested = json.loads(first.group(1))
        except ValueError:
            requested = None
        if isinstance(requested, str):
            sent = mapped(requested)
            if sent != requested:
                body = body[:first.start(1)] + json.dumps(sent, ensure_ascii=False).encode("utf-8") + \
                    body[first.end(1):]
            return body, requested, sent
    # Edited in place (patch_json): every byte ccproxy does not change stays as it was sent.
    try:
        text = body.decode("utf-8")
        requested = model_of(text)
        if target.request_preset:
            text = patch_json(text, target.request_preset)
        sent = model_of(text)
        if mapped and isinstance(sent, str):
            sent, before = mapped(sent), sent
            if sent != before:
                text = patch_json(text, {"model": Replace(sent)})
    except (UnicodeDecodeError, ValueError):
        return body, None, None  # not ours to judge: the provider answers it
    return text.encode("utf-8"), requested, sent


def model_of(text):
    """The top-level "model" of a JSON object's text, or None."""
    for key, _, start, end in json_members(text)[0]:
        if key == "model":
            model = json.loads(text[start:end])
            return model if isinstance(model, str) else None
    return None


def upstream_headers(client_headers, target, body):
    key, style = client_key(client_headers)
    headers = end_to_end(client_headers, REQUEST_OWN)
    headers.append(("Host", target.netloc))
    headers.extend(auth_headers(target.provider.api_key, target.provider.auth or style or "x-api-key"))
    headers = apply_header_preset(headers, target.header_preset)
    headers.append(("Accept-Encoding", "identity"))
    if body:
        headers.append(("Content-Length", str(len(body))))
    return headers


def without_thinking(body):
    """strip_thinking() on a request body's bytes; None if it is not a Messages request."""
    try:
        return json.dumps(strip_thinking(json.loads(body)), ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
    except (ValueError, AttributeError, TypeError):
        return None


def strip_thinking(body):
    """A copy of a Messages request without thinking blocks or signatures in assistant turns.

    Signatures are only valid for the provider that made them; after a switch they are
    rejected. An assistant turn left empty keeps a short text block (empty content is invalid).
    """
    messages = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if message.get("role") != "assistant" or not isinstance(content, list):
            messages.append(message)
            continue
        blocks = []
        for block in content:
            if isinstance(block, dict):
                if block.get("type") in ("thinking", "redacted_thinking"):
                    continue
                block = {k: v for k, v in block.items() if k != "signature"}
            blocks.append(block)
        messages.append(dict(message, content=blocks or [{"type": "text", "text": "(thinking omitted)"}]))
    return dict(body, messages=messages)


class Usage:
    """Token usage seen in a reply, read from the bytes as they are relayed, never altering them.

    SSE: message_start carries input and cache tokens, message_delta the output tokens and the
    stop reason. A JSON reply carries "usage" and "stop_reason" at its top level.
    """

    __slots__ = ("input", "output", "cache_read", "cache_creation", "stop_reason", "tail")

    def __init__(self):
        self.input = self.output = self.cache_read = self.cache_creation = 0
        self.stop_reason = None
        self.tail = b""

    def feed(self, data):
        """Take the next relayed piece of an SSE stream."""
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf[-SSE_EVENT_MAX_BYTES:]
            return
        self.tail = buf[end + 2:]
        if b'"usage"' not in buf and b"stop_reason" not in buf:
            return                      # the common case: text deltas, nothing to read
        for event in buf[:end].split(b"\n\n"):
            if b'"usage"' in event or b"stop_reason" in event:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        self.take_event(line[5:])

    def take_event(self, data):
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("type") == "message_start" and isinstance(obj.get("message"), dict):
            self.take(obj["message"])
        elif obj.get("type") == "message_delta":
            self.take(obj)
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]

    def take(self, obj):
        """Take a JSON reply (or an event object) with a "usage" member."""
        usage = obj.get("usage")
        if isinstance(usage, dict):
            for field, attr in (("input_tokens", "input"), ("output_tokens", "output"),
                                ("cache_read_input_tokens", "cache_read"),
                                ("cache_creation_input_tokens", "cache_creation")):
                value = usage.get(field)
                if isinstance(value, int) and value >= getattr(self, attr):
                    setattr(self, attr, value)
        if obj.get("stop_reason"):
            self.stop_reason = obj["stop_reason"]

    def as_dict(self):
        return {"input": self.input, "output": self.output, "cache_read": self.cache_read,
                "cache_creation": self.cache_creation}


def key_hint(key):
    """Enough of a key to tell it from another: at most its last 4 characters and an "sk-"
    prefix, and never more than a quarter of the key."""
    if not key:
        return ""
    tail = min(4, len(key) // 4)
    head = "sk-" if key.startswith("sk-") and 3 + tail <= len(key) // 4 else ""
    return head + "…" + (key[-tail:] if tail else "")


_SECRETISH = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+")


def redact(text, secret_values=()):
    """Remove every configured secret and anything shaped like an API key from text."""
    for value in secret_values:
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _SECRETISH.sub(r"\1***", text)


def parse_model_list(obj):
    """Model ids from Anthropic's {"data":[{"id"}]} or OpenAI's {"object":"list","data":[…]}."""
    if isinstance(obj, dict):
        items = obj.get("data")
    elif isinstance(obj, list):
        items = obj
    else:
        items = None
    if not isinstance(items, list):
        raise ValueError("the JSON has no \"data\" list of models")
    ids, seen = [], set()
    for item in items:
        model_id = item.get("id") if isinstance(item, dict) else item
        if isinstance(model_id, str) and model_id and model_id not in seen:
            seen.add(model_id)
            ids.append(model_id)
    return ids


def sane_model_id(model_id):
    """Whether a discovered model id is one to keep: a relay may list anything."""
    return len(model_id) <= MODEL_ID_MAX and not _UNPRINTABLE.search(model_id)


def model_page(models, query, display=None, describe=None):
    """Anthropic's GET /v1/models list shape for our models, honouring limit/after_id/before_id;
    display(id) gives a model's display_name (its id by default), describe(id) its description
    (Claude Code shows it under the row in /model)."""
    params = urllib.parse.parse_qs(query)
    try:
        limit = max(1, min(1000, int(params.get("limit", ["20"])[0])))
    except ValueError:
        raise ClientError(Said("models_limit"))
    ids = list(models)
    after, before = params.get("after_id", [None])[0], params.get("before_id", [None])[0]
    if after in ids:
        ids = ids[ids.index(after) + 1:]
    if before in ids:
        ids = ids[:ids.index(before)][-limit:]
    page = ids[:limit]
    return {"data": [model_object(m, display(m) if display else m, describe(m) if describe else None) for m in page],
            "has_more": len(ids) > len(page),
            "first_id": page[0] if page else None, "last_id": page[-1] if page else None}


def model_object(model_id, display_name=None, description=None):
    found = {"type": "model", "id": model_id, "display_name": display_name or model_id,
             "created_at": "1970-01-01T00:00:00Z"}
    if description:
        found["description"] = description[:MODEL_DESCRIPTION_MAX]
    return found


class Exchange:
    """Facts about one relayed request, for the log line and the request log."""

    __slots__ = ("provider", "model_in", "model_out", "status", "bytes_in", "bytes_out", "ttfb_ms",
                 "note", "note_code", "attempts", "stream", "usage", "midstream_error", "client_gone", "key",
                 "kind", "agent", "conversation", "placed")

    def __init__(self):
        self.provider = self.model_in = self.model_out = self.note = self.note_code = self.key = None
        self.kind = self.agent = self.conversation = None     # Claude Code's hint headers; the conversation
        self.placed = None          # why the relay that answered was the one (Relay.why, or failover)
        self.status = self.bytes_in = self.bytes_out = 0
        self.ttfb_ms = None
        self.attempts = []          # (provider, label, model sent) of each failed attempt, in order
        self.stream = self.midstream_error = self.client_gone = False
        self.usage = Usage()

    def chain(self):
        return ["%s %s" % a[:2] for a in self.attempts]

    def say(self, code, text, *args, shown=None):
        """The request's note: text % args for the log, and [code, *args] (or `shown` for
        args) for the page to say it in its own language."""
        self.note = text % args if args else text
        self.note_code = [code] + [a.as_json() if isinstance(a, Said) else str(a)      # a reason keeps its code
                                   for a in (args if shown is None else shown)]


# ============================================================================ relay compatibility
#
# Claude Code adds request fields and betas every few weeks, and relays on older stacks answer
# them with a 400 that Claude Code does not retry. Anthropic's gateway guidance is to pass
# everything through untouched, so ccproxy changes a request only for a relay that proved it
# must: a 400 that matches a pattern of LEARNED_FIXES gets the smallest change that avoids it,
# and one retry on the same provider; if that works, the fix is remembered for the provider
# (the state file) and later requests go out fixed at once. Body edits keep every other byte
# as it was sent (patch_json).

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class Replace:
    """In a patch_json change: set this value as it is, never merged into an object."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def json_members(text, start=0):
    """The members of the JSON object at text[start:] as (key, start, value start, value end),
    and the index of its closing brace; ValueError if it is not an object."""
    pos = _WS.match(text, start).end()
    if text[pos:pos + 1] != "{":
        raise ValueError("not a JSON object")
    members = []
    pos = _WS.match(text, pos + 1).end()
    if text[pos:pos + 1] == "}":
        return members, pos
    while True:
        key, after = _DECODER.raw_decode(text, pos)
        colon = _WS.match(text, after).end()
        if not isinstance(key, str) or text[colon:colon + 1] != ":":
            raise ValueError("not a JSON object member")
        value_start = _WS.match(text, colon + 1).end()
        _, value_end = _DECODER.raw_decode(text, value_start)
        members.append((key, pos, value_start, value_end))
        pos = _WS.match(text, value_end).end()
        if text[pos:pos + 1] == ",":
            pos = _WS.match(text, pos + 1).end()
        elif text[pos:pos + 1] == "}":
            return members, pos
        else:
            raise ValueError("not a JSON object")


def patch_json(text, changes):
    """The JSON object text with changes made in place, in a request preset's terms: null
    removes a member, an object merges into an object member, anything else (or a Replace)
    sets it. Every character not changed stays as it was: key order, spacing, number
    formatting and escapes (a parse and dump would change them). ValueError if not an object."""
    for key, value in changes.items():
        if key.startswith("_"):
            continue
        members, close = json_members(text)
        found = [m for m in members if m[0] == key]
        index = members.index(found[-1]) if found else None
        if value is None:
            if index is None:
                continue
            _, start, _, end = members[index]
            if index + 1 < len(members):
                end = members[index + 1][1]         # up to the next member: its comma goes too
            elif index:
                start = members[index - 1][3]       # from the previous value: its comma goes
            text = text[:start] + text[end:]
        elif index is not None:
            _, _, start, end = members[index]
            if isinstance(value, dict) and text[start] == "{":
                new = patch_json(text[start:end], value)
            else:
                new = json.dumps(value.value if isinstance(value, Replace) else value, ensure_ascii=False)
            text = text[:start] + new + text[end:]
        else:
            member = "%s: %s" % (json.dumps(key, ensure_ascii=False),
                                 json.dumps(value.value if isinstance(value, Replace) else value, ensure_ascii=False))
            at = members[-1][3] if members else close
            text = text[:at] + (", " if members else "") + member + text[at:]
    return text


# Words with which relays refuse a request field they do not know (Pydantic, OpenAI-style
# gateways, Go and Node validators).
_REFUSAL = re.compile(r"extra inputs are not permitted|unknown (field|parameter|key)|unrecognized|"
                      r"not permitted|unexpected (field|keyword|property)|not supported|"
                      r"additional propert|invalid (field|parameter)")
# Fields Claude Code sends that a relay may not know; the core of a Messages request never goes.
CORE_FIELDS = frozenset(("model", "messages", "max_tokens", "system", "tools", "tool_choice", "stream",
                         "temperature", "top_p", "top_k", "stop_sequences"))
# What every tool may have; a relay refusing one of these is not fixed by removing it.
CORE_TOOL_KEYS = frozenset(("name", "description", "input_schema", "type", "cache_control"))
_GATE = re.compile(r"claude code ([0-9][0-9.]*) does not support this model; version ([0-9][0-9.]*) or newer", re.I)


class Fix:
    """One learned fix: `kind` ("field", "beta", "thinking", "signatures") and its `param`."""

    __slots__ = ("kind", "param")

    def __init__(self, kind, param=""):
        self.kind, self.param = kind, param

    @property
    def id(self):
        return "%s:%s" % (self.kind, self.param) if self.param else self.kind

    TEXT = {"field": "remove the body field %s", "tool_field": "remove %s from every tool",
            "beta": "remove %s from anthropic-beta",
            "thinking": "turn adaptive thinking into budgeted thinking%s", "signatures": "strip thinking signatures%s"}

    def describe(self):
        return self.TEXT[self.kind] % self.param

    @staticmethod
    def known(fix_id):
        """Whether fix_id names a kind of fix this ccproxy makes (a state file may be older or hand-edited)."""
        return isinstance(fix_id, str) and fix_id.partition(":")[0] in Fix.TEXT

    @classmethod
    def from_id(cls, fix_id):
        kind, _, param = fix_id.partition(":")
        return cls(kind, param)


def match_fix(message, body, headers):
    """The LEARNED_FIXES entry that a provider's 400 message calls for, given what the request
    sent, or None. The table, in the order it is tried:
      - signatures: thinking blocks signed by another provider (after a switch);
      - thinking: adaptive thinking ("type": "adaptive") the relay does not know;
      - beta: an anthropic-beta token the message names;
      - field: a top-level body field the message names with words of refusal;
      - tool_field: a key of the request's tools (not one every tool has) named so.
    A 400 that matches nothing passes through unchanged."""
    text = message.lower()
    if "signature" in text and "thinking" in text:
        return Fix("signatures")
    try:
        members = {m[0]: m for m in json_members(body)[0]}
    except ValueError:
        members = {}
    if "thinking" in members and "adaptive" in text and \
            '"adaptive"' in body[members["thinking"][2]:members["thinking"][3]]:
        return Fix("thinking")
    betas = [t.strip() for t in (headers.get("anthropic-beta") or "").split(",") if t.strip()]
    for token in betas:
        if token.lower() in text and "beta" in text:
            return Fix("beta", token)
    if _REFUSAL.search(text):
        for name in members:
            if name not in CORE_FIELDS and re.search(r"(?<![\w.])%s(?![\w])" % re.escape(name.lower()), text):
                return Fix("field", name)
        for name in tool_keys(body, members.get("tools")) - CORE_TOOL_KEYS:
            if re.search(r"(?<![\w])%s(?![\w])" % re.escape(name.lower()), text):
                return Fix("tool_field", name)
    return None


def json_elements(text):
    """(start, end) of each value of the JSON array text; ValueError if it is not an array."""
    pos = _WS.match(text).end()
    if text[pos:pos + 1] != "[":
        raise ValueError("not a JSON array")
    spans = []
    pos = _WS.match(text, pos + 1).end()
    while text[pos:pos + 1] != "]":
        _, end = _DECODER.raw_decode(text, pos)
        spans.append((pos, end))
        pos = _WS.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = _WS.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise ValueError("not a JSON array")
    return spans


def tool_keys(body, member):
    """The keys that the request's tools (the "tools" member of json_members) have."""
    keys = set()
    if member is not None:
        tools = json.loads(body[member[2]:member[3]])
        for tool in tools if isinstance(tools, list) else ():
            keys.update(tool if isinstance(tool, dict) else ())
    return keys


def without_tool_keys(text, names):
    """The request body text with the keys names taken out of every tool, in place."""
    members = {m[0]: m for m in json_members(text)[0]}
    if "tools" not in members:
        return text
    _, _, start, end = members["tools"]
    tools = text[start:end]
    for first, last in reversed(json_elements(tools)):
        if tools[first] == "{":
            tools = tools[:first] + patch_json(tools[first:last], dict.fromkeys(names)) + tools[last:]
    return text[:start] + tools + text[end:]


def next_fix(message, body, headers, applied):
    """match_fix() for a request body in bytes, unless that fix was applied already."""
    try:
        fix = match_fix(message, body.decode("utf-8"), headers)
    except UnicodeDecodeError:
        return None
    return None if fix is None or fix.id in {f.id for f in applied} else fix


def fix_changes(fixes, body):
    """The patch_json changes that body fixes make to the JSON text body."""
    changes = {}
    for fix in fixes:
        if fix.kind == "field":
            changes[fix.param] = None
        elif fix.kind == "thinking":
            try:
                members = {m[0]: m for m in json_members(body)[0]}
                max_tokens = json.loads(body[members["max_tokens"][2]:members["max_tokens"][3]])
            except (ValueError, KeyError):
                max_tokens = 0
            budget = min(THINKING_BUDGET, int(max_tokens) - 1) if isinstance(max_tokens, int) else 0
            # Budgeted thinking needs at least 1024 tokens below max_tokens; else none at all.
            changes["thinking"] = Replace({"type": "enabled", "budget_tokens": budget}) if budget >= 1024 else None
    return changes


def fixed_body(fixes, body):
    """The request body with the fixes made, in place (patch_json)."""
    if any(f.kind in ("field", "thinking", "tool_field") for f in fixes):
        try:
            text = body.decode("utf-8")
            text = patch_json(text, fix_changes(fixes, text))
            tool_fields = [f.param for f in fixes if f.kind == "tool_field"]
            body = (without_tool_keys(text, tool_fields) if tool_fields else text).encode("utf-8")
        except (UnicodeDecodeError, ValueError):
            pass
    if any(f.kind == "signatures" for f in fixes):
        body = without_thinking(body) or body
    return body


def fixed_headers(fixes, headers):
    """The upstream header fields with the beta tokens that fixes drop taken out."""
    drop = {f.param.lower() for f in fixes if f.kind == "beta"}
    if not drop:
        return headers
    out = []
    for name, value in headers:
        if name.lower() == "anthropic-beta":
            value = ",".join(t for t in value.split(",") if t.strip().lower() not in drop)
            if not value:
                continue
        out.append((name, value))
    return out


def version_gate(message):
    """(client version, required version) of a "Claude Code X does not support this model;
    version Y or newer is required" answer, else None."""
    match = _GATE.search(message)
    return match.groups() if match else None


def version_tuple(text):
    return tuple(int(p) for p in re.findall(r"\d+", text)[:4])


# ============================================================================ upstream client

_TLS = ssl.create_default_context()

# Plain sockets keep their timeouts in the kernel (SO_RCVTIMEO/SO_SNDTIMEO) where struct
# timeval is known. A Python timeout makes every recv and send a poll() and then the call: two
# GIL round trips instead of one, and under 256 streams those round trips were what the relay
# spent its time on. TLS sockets keep Python's timeout: the ssl module retries EAGAIN itself.
KERNEL_TIMEOUTS = sys.platform.startswith(("linux", "darwin", "freebsd")) and hasattr(socket, "SO_RCVTIMEO")


def set_timeout(sock, seconds):
    """Make each receive and each send on sock give up (socket.timeout) after seconds."""
    if not KERNEL_TIMEOUTS or isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, max(1, int((seconds - whole) * 1e6)))   # 0 would mean never
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class SocketStream(io.RawIOBase):
    """A connected socket as a raw stream, for sockets timed by set_timeout.

    socket.makefile() answers EAGAIN, which is how a kernel timeout ends a blocking recv, with
    None, and io.BufferedReader takes that for the end of the stream: a stalled peer would
    look like one that had finished. Here it is socket.timeout, as with a Python timeout.
    """

    deadline = None         # a monotonic time after which no more is read (a request's head, a stream's content)
    retimed = False         # the socket's timeout was cut to meet the deadline

    def __init__(self, sock, timeout=None):
        super().__init__()
        self.sock = sock
        self.timeout = timeout  # the socket's own (set_timeout), given back after a deadline

    def readable(self):
        return True

    def writable(self):
        return True

    def readinto(self, buf):
        if self.deadline is not None:
            # A wait is cut to what is left: a head that trickles in, or stops halfway, is given
            # up at the deadline, not after the socket's idle timeout.
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("past its deadline")
            if self.timeout is None or left < self.timeout:
                set_timeout(self.sock, left)
                self.retimed = True
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            raise socket.timeout("timed out")

    def end_deadline(self):
        """No more deadline; the socket's own timeout back, if it was cut."""
        self.deadline = None
        if self.retimed:
            self.retimed = False
            set_timeout(self.sock, self.timeout)

    def write(self, data):
        try:
            self.sock.sendall(data)
        except BlockingIOError:
            raise socket.timeout("timed out")
        return len(data)


class UpstreamProtocolError(http.client.HTTPException):
    """A provider's answer that breaks HTTP/1.1's rules: it is not relayed, and its
    connection is closed, never pooled."""


_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([^\r\n]*))?\r?\n\Z")


def read_header_block(reader, error=UpstreamProtocolError):
    """The raw field lines of a header section, up to its blank line; `error` if the section
    is cut off, has a line over MAX_LINE, or passes MAX_HEADERS lines or MAX_HEADER_BLOCK bytes."""
    lines, size = [], 0
    while True:
        line = reader.readline(MAX_LINE + 1)
        if line in (b"\r\n", b"\n"):
            return lines
        if not line.endswith(b"\n"):
            raise error("the header section is cut off or has a line over %d bytes" % MAX_LINE)
        size += len(line)
        if len(lines) >= MAX_HEADERS or size > MAX_HEADER_BLOCK:
            raise error("the header section is larger than %d fields or %d bytes" % (MAX_HEADERS, MAX_HEADER_BLOCK))
        lines.append(line)


class Response:
    """A provider's answer on one connection, read by ccproxy itself (no http.client
    internals): the status line and header fields parsed strictly, every interim 1xx skipped
    (RFC 9110 §15.2: 103 Early Hints comes before the real answer; 101 is refused, nothing
    asked for an upgrade), and the body's framing decided once by response_framing(). The
    body is then read with pieces() or read(), or discarded with the connection."""

    def __init__(self, reader, method):
        self.reader = reader
        while True:
            line = reader.readline(MAX_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("the provider closed the connection without an answer")
            match = _STATUS_LINE.match(line)
            if match is None:
                raise UpstreamProtocolError("not an HTTP/1.x status line: %r" % line[:40])
            try:
                headers = parse_header_lines(read_header_block(reader))
            except ValueError as exc:
                raise UpstreamProtocolError("bad response header: %s" % exc)
            status = int(match.group(2))
            if status == 101:
                raise UpstreamProtocolError("101 Switching Protocols to a request that asked for no upgrade")
            if not 100 <= status < 200:
                break
        self.status = status
        self.reason = (match.group(3) or b"").decode("iso-8859-1")
        self.headers = headers
        try:
            self.length, self.chunked, self.will_close = response_framing(
                method, status, 10 if match.group(1) == b"0" else 11, headers)
        except ValueError as exc:
            raise UpstreamProtocolError(str(exc))
        self.complete = self.length == 0     # the body has been read to its end

    def getheader(self, name, default=None):
        return self.headers.get(name, default)

    def getheaders(self):
        return list(self.headers)

    def pieces(self):
        """Yield (piece, last) as the body arrives: each piece is all the payload that is
        there (at most RELAY_CHUNK), last says the body is complete. A body cut short raises
        IncompleteRead; broken chunked framing, UpstreamProtocolError."""
        if self.complete:
            yield b"", True
            return
        if self.chunked:
            yield from self._chunked_pieces()
            return
        left = self.length                  # None: until the connection closes
        while True:
            piece = self.reader.read1(RELAY_CHUNK if left is None else min(left, RELAY_CHUNK))
            if not piece:
                if left:
                    raise http.client.IncompleteRead(b"", left)
                self.complete = True
                yield b"", True
                return
            if left is not None:
                left -= len(piece)
                if not left:
                    self.complete = True
                    yield piece, True
                    return
            yield piece, False

    def _chunked_pieces(self):
        # Decoded here rather than a chunk at a time: an answer's closing events arrive
        # together and leave in one write. The wait is in peek(), which receives into the
        # reader's own buffer; read1() on an empty buffer would allocate its size for every
        # waiting stream.
        decoder = ChunkDecoder()
        peek, read1 = self.reader.peek, self.reader.read1
        while True:
            if not peek(1):
                raise http.client.IncompleteRead(b"")
            try:
                piece = decoder.feed(read1(RELAY_CHUNK))
            except ValueError as exc:
                raise UpstreamProtocolError("bad chunked framing: %s" % exc)
            if decoder.done:
                self.complete = True
                if decoder.extra:
                    self.will_close = True      # bytes after the end: nothing more is read from it
                yield piece, True
                return
            if piece:
                yield piece, False

    def hold_until(self, deadline):
        """Give up reading the body (socket.timeout) at this monotonic time; end_hold() undoes it."""
        self.reader.raw.deadline = deadline

    def end_hold(self):
        self.reader.raw.end_deadline()

    def read(self):
        """The whole body (for ccproxy's own small requests: model lists, tests)."""
        return collect(self.pieces())[0]


def collect(pieces, limit=None, until=None):
    """Read from a pieces() generator until the body ends, `limit` bytes are in, or the bytes
    contain `until`: (bytes, whether the body ended)."""
    out, size = [], 0
    for piece, last in pieces:
        out.append(piece)
        size += len(piece)
        if last:
            return b"".join(out), True
        if (limit is not None and size >= limit) or (until is not None and until(b"".join(out))):
            break
    return b"".join(out), False


def response_framing(method, status, version, headers):
    """(length, chunked, will_close) of an answer's body by RFC 9112 §6.3; length None means
    "until the connection closes". ValueError for framing that two parsers could read
    differently: a transfer coding other than chunked, or a bad Content-Length."""
    tokens = connection_tokens(headers)
    close = "close" in tokens or (version == 10 and "keep-alive" not in tokens)
    if method == "HEAD" or status in (204, 304) or status < 200:
        return 0, False, close
    codings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if codings:
        if ",".join(codings).strip().lower() != "chunked":
            raise ValueError("Transfer-Encoding %r is not chunked" % ",".join(codings)[:ERROR_EXCERPT])
        # Content-Length beside it is ignored, and the connection is not trusted again.
        return None, True, close or bool(lengths)
    if lengths:
        return content_length(lengths), False, close
    return None, False, True


def open_connection(scheme, host, port, proxy, timeout):
    """A connected http.client connection to host:port, tunnelled through proxy if given.
    Only its connecting (proxy tunnel, TLS), its socket and close() are used: requests are
    written and answers read by ccproxy (send_request, Response)."""
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    kwargs = {"context": _TLS} if scheme == "https" else {}
    if proxy:
        parts = urllib.parse.urlsplit(proxy)
        conn = cls(parts.hostname, parts.port or DEFAULT_PROXY_PORT, timeout=CONNECT_TIMEOUT_S, **kwargs)
        tunnel_headers = {}
        if parts.username:
            creds = "%s:%s" % (urllib.parse.unquote(parts.username),
                               urllib.parse.unquote(parts.password or ""))
            tunnel_headers["Proxy-Authorization"] = \
                "Basic " + base64.b64encode(creds.encode()).decode()
        conn.set_tunnel(host, port, headers=tunnel_headers)
    else:
        conn = cls(host, port, timeout=CONNECT_TIMEOUT_S, **kwargs)
    conn.connect()                      # which also sets TCP_NODELAY
    set_timeout(conn.sock, timeout)
    conn.timeout = timeout
    return conn


def retime(conn, seconds):
    """Give an open connection another timeout (a system call only if it changes)."""
    if conn.timeout != seconds:
        set_timeout(conn.sock, seconds)
        conn.timeout = seconds


def send_request(conn, method, target, headers, body=b""):
    """Send one request on conn, head and body in one write; its Response once the status
    line and headers of the final answer have arrived."""
    head = request_head(method, target, headers)
    if len(body) <= RELAY_CHUNK:
        conn.sock.sendall(head + body)
    else:
        conn.sock.sendall(head)         # not copied into one buffer: it may be 64 MB
        conn.sock.sendall(body)
    return Response(io.BufferedReader(SocketStream(conn.sock, conn.timeout)), method)


def quiet(sock):
    """Whether an idle connection has nothing to say. A pooled connection that is readable
    before a request was sent has either been closed by the provider or carries bytes that
    belong to no request (an answer's unframed leftovers): either way it is not reused."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class Pool:
    """Idle keep-alive upstream connections, per origin (and proxy), safe across threads.

    No lock: deque.append and deque.pop are atomic in CPython, and a lock here convoys
    every request behind whichever thread the GIL switched away from while holding it.
    """

    def __init__(self):
        self.idle = {}
        self.opened = 0

    def get(self, key, timeout):
        """(connection, reused) — an idle one if fresh and quiet, else a new one."""
        stack = self.idle.get(key)
        now = time.monotonic()
        while stack:
            try:
                conn, since = stack.pop()
            except IndexError:
                break       # another thread took the last one
            if now - since < POOL_IDLE_S and quiet(conn.sock):
                retime(conn, timeout)
                return conn, True
            conn.close()
        conn = open_connection(key[0], key[1], key[2], key[3], timeout)
        self.opened += 1    # a statistic: a lost increment under a race does no harm
        return conn, False

    def put(self, key, conn):
        stack = self.idle.get(key)
        if stack is None:
            stack = self.idle.setdefault(key, deque())
        if len(stack) < POOL_MAX_IDLE:
            stack.append((conn, time.monotonic()))
        else:
            conn.close()

    def request(self, target, method, path, headers, body, timeout):
        """Send one request on a pooled connection: (connection, Response) once the final
        answer's head has arrived. A pooled connection the provider closed meanwhile is
        retried once on a new one: nothing reached the provider in that case."""
        url = target.prefix + path
        for attempt in (0, 1):
            conn, reused = self.get(target.pool_key, timeout)
            try:
                return conn, send_request(conn, method, url, headers, body)
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                conn.close()
                if not reused or attempt:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def release(self, target, conn, resp):
        """Put a connection back if its answer was read to its end and may be followed by
        another; close it otherwise."""
        if resp is not None and resp.complete and not resp.will_close:
            self.put(target.pool_key, conn)
        else:
            conn.close()

    def close(self):
        stacks, self.idle = self.idle, {}
        for stack in stacks.values():
            while stack:
                stack.pop()[0].close()


def provider_get(provider, path, timeout, max_bytes, with_key=True):
    """GET path from a provider, with its key (both ways: x-api-key and Bearer) unless
    with_key is false, as ccproxy's own call (not a client's): (status, Content-Type, body
    bytes, at most max_bytes + 1)."""
    parts = urllib.parse.urlsplit(provider.base_url)
    scheme, host = parts.scheme, parts.hostname
    port = parts.port or (443 if scheme == "https" else 80)
    headers = [("Host", parts.netloc.rsplit("@", 1)[-1]), ("anthropic-version", ANTHROPIC_VERSION),
               ("Accept", "application/json"), ("Accept-Encoding", "identity"),
               ("User-Agent", "ccproxy/" + VERSION)]
    if provider.api_key and with_key:
        headers.extend(auth_headers(provider.api_key, "both"))
    conn = open_connection(scheme, host, port, provider.proxy or env_proxy_for(scheme, host), timeout)
    try:
        resp = send_request(conn, "GET", path, headers)
        return resp.status, resp.getheader("Content-Type", ""), collect(resp.pieces(), max_bytes + 1)[0]
    finally:
        conn.close()


def describe_network_error(exc):
    """A short reason in words for a failed upstream connection."""
    if isinstance(exc, TIMEOUT_ERRORS):
        return Said("net_timeout")
    if isinstance(exc, socket.gaierror):
        return Said("net_no_host")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Said("net_tls_untrusted", reason=exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        return Said("net_tls", reason=exc.reason or exc)
    if isinstance(exc, ConnectionRefusedError):
        return Said("net_refused")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                        http.client.IncompleteRead)):
        return Said("net_closed")
    if isinstance(exc, http.client.HTTPException):
        return Said("net_bad_http", reason=str(exc)[:ERROR_EXCERPT] or type(exc).__name__)
    return Said("net_other", reason=exc.strerror if isinstance(exc, OSError) and exc.strerror
                else str(exc) or type(exc).__name__)


NETWORK_ERRORS = (OSError, http.client.HTTPException)
# BlockingIOError: a send on a plain upstream socket that outlasted its kernel timeout.
TIMEOUT_ERRORS = (socket.timeout, TimeoutError, BlockingIOError)


# ============================================================================ providers: discovery and tests

PLACEHOLDER_REASON = Said("placeholder_key")


def fetch_models(provider, timeout=REFRESH_TIMEOUT_S):
    """Discover a provider's models from <base>/v1/models: (ids, None, dropped) or
    (None, reason, 0). dropped counts the ids left out: longer than MODEL_ID_MAX, with an
    unprintable character, or past MAX_MODELS. What is read is capped (MODELS_MAX_BYTES a page)."""
    if provider.placeholder_key:
        return None, PLACEHOLDER_REASON, 0
    path = urllib.parse.urlsplit(provider.base_url).path.rstrip("/") + "/v1/models?"
    ids, seen, dropped, after = [], set(), 0, None
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_MODEL_PAGES):
            query = {"limit": MODELS_PAGE_LIMIT}
            if after:
                query["after_id"] = after
            status, kind, raw = provider_get(provider, path + urllib.parse.urlencode(query),
                                             max(0.1, deadline - time.monotonic()), MODELS_MAX_BYTES)
            if len(raw) > MODELS_MAX_BYTES:
                return None, Said("models_too_large", mb=MODELS_MAX_BYTES >> 20), 0
            looks_html = "html" in kind or raw.lstrip()[:1] == b"<"
            if status != 200:
                return None, Said("models_http_html" if looks_html else "models_http", status=status), 0
            if looks_html:
                return None, Said("models_html"), 0
            try:
                obj = json.loads(raw)
                page = parse_model_list(obj)
            except ValueError as exc:
                return None, Said("models_not_list", reason=str(exc)[:ERROR_EXCERPT]), 0
            for model_id in page:
                if model_id in seen:
                    continue
                seen.add(model_id)
                if len(ids) < MAX_MODELS and sane_model_id(model_id):
                    ids.append(model_id)
                else:
                    dropped += 1
            if not (isinstance(obj, dict) and obj.get("has_more") and obj.get("last_id")):
                break
            after = obj["last_id"]
    except NETWORK_ERRORS as exc:
        return None, describe_network_error(exc), 0
    if not ids:
        if dropped:
            return None, Said("models_none_kept", dropped=dropped, max_len=MODEL_ID_MAX, max_models=MAX_MODELS), dropped
        return None, Said("models_none"), dropped
    return ids, None, dropped


def test_model(target):
    """The cheapest model to test a provider with: its haiku tier, else its first model."""
    haiku = target.env_models.get("ANTHROPIC_DEFAULT_HAIKU_MODEL")
    if haiku:
        return haiku
    for model in target.models:
        if "haiku" in model.lower():
            return model
    return target.models[0] if target.models else "claude-haiku-4-5"


def probe(target, path, body, timeout=TEST_TIMEOUT_S, extra_headers=()):
    """One small request of ccproxy's own to a provider, as the relay would send it (its key,
    its auth style, its header preset): (status, body bytes, ms to the first byte)."""
    extra = {name.lower() for name, _ in extra_headers}
    headers = [field for field in (
        ("Host", target.netloc), ("anthropic-version", ANTHROPIC_VERSION), ("Content-Type", "application/json"),
        ("Accept-Encoding", "identity"), ("User-Agent", "ccproxy/" + VERSION), ("Content-Length", str(len(body))))
        if field[0].lower() not in extra] + list(extra_headers)
    headers = apply_header_preset(headers + auth_headers(target.provider.api_key, target.provider.auth or "both"),
                                  target.header_preset)
    started = time.monotonic()
    conn = open_connection(target.scheme, target.host, target.port, target.proxy, timeout)
    try:
        resp = send_request(conn, "POST", target.prefix + path, headers, body)
        pieces = resp.pieces()
        first = next(pieces)[0]
        ttfb = int((time.monotonic() - started) * 1000)
        return resp.status, first + collect(pieces, ERROR_HOLD_BYTES)[0], ttfb
    finally:
        conn.close()


def test_provider(target, timeout=TEST_TIMEOUT_S):
    """Measure a provider: its /v1/models round trip and a minimal real streaming message
    (max_tokens TEST_MAX_TOKENS, no thinking, no tools). Classified ok / slow / failing."""
    started = time.monotonic()
    if target.provider.placeholder_key:
        return {"at": time.time(), "status": "failing", "reason": PLACEHOLDER_REASON, "why": why(PLACEHOLDER_REASON), "model": None,
                "models_ms": None, "models": None, "models_error": PLACEHOLDER_REASON,
                "ttfb_ms": None, "total_ms": None, "tokens": None}
    models, models_error, _ = fetch_models(target.provider, timeout)
    result = {"at": time.time(), "models_ms": int((time.monotonic() - started) * 1000),
              "models": len(models) if models else None, "models_error": models_error,
              "model": test_model(target), "ttfb_ms": None, "total_ms": None, "tokens": None}
    body = json.dumps({"model": result["model"], "max_tokens": TEST_MAX_TOKENS, "stream": True,
                       "messages": [{"role": "user", "content": "Reply with the word ok."}]}).encode()
    started = time.monotonic()
    usage = Usage()

    def classified(status, reason):
        return dict(result, status=status, reason=reason, why=why(reason))
    try:
        status, data, result["ttfb_ms"] = probe(target, "/v1/messages", body, timeout)
    except NETWORK_ERRORS as exc:
        return classified("failing", describe_network_error(exc))
    result["total_ms"] = int((time.monotonic() - started) * 1000)
    if status != 200:
        if data.lstrip()[:1] == b"<":
            return classified("failing", Said("test_http_html", status=status))
        return classified("failing", Said("test_http", status=status, detail=excerpt(error_message(data))))
    usage.feed(data + b"\n\n")
    if b"event:" not in data and b"data:" not in data:
        return classified("failing", Said("test_no_sse"))
    result["tokens"] = usage.as_dict()
    seconds = result["ttfb_ms"] / 1000.0
    if seconds > TEST_SLOW_S:
        return classified("slow", Said("test_slow", seconds="%.1f" % seconds))
    return classified("ok", Said("test_ok", ms=result["ttfb_ms"]))


def check_cases(model):
    """The battery of "Check a relay": what Claude Code sends that relays trip over, each in
    a request of at most TEST_MAX_TOKENS tokens. (name, path, body, extra header fields)."""
    user = [{"role": "user", "content": "Reply with the word ok."}]
    base = {"model": model, "max_tokens": TEST_MAX_TOKENS, "messages": user}
    cached = [{"role": "user", "content": [{"type": "text", "text": "Reply with the word ok.",
                                            "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]
    return [
        ("stream", "/v1/messages", dict(base, stream=True), ()),
        ("count_tokens", "/v1/messages/count_tokens", {"model": model, "messages": user}, ()),
        ("context_management", "/v1/messages",
         dict(base, context_management={"edits": [{"type": "clear_tool_uses_20250919"}]}),
         (("anthropic-beta", "context-management-2025-06-27"),)),
        ("output_config", "/v1/messages", dict(base, output_config={"effort": "low"}), ()),
        ("adaptive_thinking", "/v1/messages", dict(base, thinking={"type": "adaptive"}), ()),
        ("cache_ttl_1h", "/v1/messages", dict(base, messages=cached), ()),
        ("safeguards", "/v1/messages", dict(base, safeguards={"mode": "auto"}), ()),
        ("model_1m", "/v1/messages", dict(base, model=model + "[1m]"), ()),
    ]


def check_provider(target, agent=None, timeout=TEST_TIMEOUT_S):
    """Check a relay: each case of check_cases() sent to it at once, as Claude Code's `agent`
    (User-Agent) when one went through ccproxy; per case "ok", "rejected" (its status and
    reason, and the learned fix that would avoid it) or "not tested" (it could not be reached)."""
    model = test_model(target)
    agent_field = (("User-Agent", agent),) if agent else ()
    if target.provider.placeholder_key:
        return {"at": time.time(), "model": model, "user_agent": agent, "results": {
            name: {"result": "not tested", "reason": PLACEHOLDER_REASON, "why": why(PLACEHOLDER_REASON)}
            for name, _, _, _ in check_cases(model)}}

    def one(case):
        name, path, body, extra = case
        raw = json.dumps(body).encode()
        try:
            status, data, _ = probe(target, path, raw, timeout, agent_field + extra)
        except NETWORK_ERRORS as exc:
            reason = describe_network_error(exc)
            return name, {"result": "not tested", "reason": reason, "why": why(reason)}
        if 200 <= status < 300:
            return name, {"result": "ok"}
        message = error_message(data)
        fix = match_fix(message, raw.decode("utf-8"), Headers(extra))
        reason = "HTTP %d: %s" % (status, redact(excerpt(message), (target.provider.api_key,)))
        return name, {"result": "rejected", "reason": reason,
                      "fix": fix.describe() if fix else None, "fix_id": fix.id if fix else None}
    cases = check_cases(model)
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as executor:
        results = dict(executor.map(one, cases))
    return {"at": time.time(), "model": model, "user_agent": agent, "results": results}


def error_message(data):
    """The message of an Anthropic-shaped error body, else the body, whole: what a relay says
    is matched against LEARNED_FIXES as it came (a relay in front of a relay puts its own words
    first: claude-code-router 127 characters, LiteLLM 119), and cut only to be shown (excerpt)."""
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    text = message if isinstance(message, str) else data.decode("utf-8", "replace")
    return escape_unprintable(text.strip())


_INNER_MESSAGE = re.compile(r'"message"\s*:\s*"')


def excerpt(message, limit=ERROR_EXCERPT):
    """A relay's error message as it is shown: the innermost message of an error that another
    relay wrapped in its own ('Error from provider(…): {"type":"error","error":{…"message":…}}'
    from claude-code-router, 'litellm.BadRequestError: AnthropicException - {…}' from LiteLLM),
    at most limit characters."""
    found = None
    for found in _INNER_MESSAGE.finditer(message):
        pass
    if found is not None:
        try:
            inner = _DECODER.raw_decode(message, found.end() - 1)[0]
        except ValueError:
            inner = None
        if isinstance(inner, str) and inner.strip():
            message = escape_unprintable(inner.strip())
    return message if len(message) <= limit else message[:limit - 1] + "…"


def discover_all(providers, timeout=REFRESH_TIMEOUT_S):
    """Discover several providers' models concurrently: {name: (ids or None, result)}.

    result = {"ok", "count", "dropped", "ms", "at", "message"}; message is "N models in M ms" or the
    reason in words.
    """
    def one(provider):
        started = time.monotonic()
        models, reason, dropped = fetch_models(provider, timeout)
        ms = int((time.monotonic() - started) * 1000)
        message = reason
        if models and dropped:
            message = Said("models_found_dropped", count=len(models), ms=ms, dropped=dropped, max_len=MODEL_ID_MAX,
                           max_models=MAX_MODELS)
        elif models:
            message = Said("models_found", count=len(models), ms=ms)
        result = {"ok": models is not None, "ms": ms, "at": time.time(), "count": len(models) if models else 0,
                  "dropped": dropped, "message": message, "why": why(message)}
        return provider.name, models, result

    results = {}
    if providers:
        with concurrent.futures.ThreadPoolExecutor(min(REFRESH_WORKERS, len(providers))) as executor:
            for name, models, result in executor.map(one, providers):
                results[name] = (models, result)
    return results


def refresh_models(store, names=None, timeout=REFRESH_TIMEOUT_S):
    """Discover models for the named providers (all usable ones if None) and keep them."""
    providers = [t.provider for n, t in store.view.targets.items() if names is None or n in names]
    results = discover_all(providers, timeout)
    if results:
        store.set_discovered(results)
    return {name: result for name, (models, result) in results.items()}


def filter_models(models, spec):
    """Models matching any comma-separated keyword of spec (case-insensitive); all if empty."""
    words = [w.strip().lower() for w in (spec or "").split(",") if w.strip()]
    return [m for m in models if not words or any(w in m.lower() for w in words)]


# ============================================================================ routing
#
# Which relays a request goes to, in which order, beyond the selection: Routes rules (a model
# glob, Claude Code's request class and agent type), the failover list as FALLBACK_ORDER says,
# a conversation's size against each relay's context window. Relay.route, keep_placed and
# fitting apply them; Health remembers where each conversation is.


class Rule:
    """One Routes entry: its key holds a model glob, "class=" (a comma list of REQUEST_CLASSES)
    and "agent=" (an agent-type glob), separated by spaces, each optional and all of them
    required to match; any case. {"*haiku*": "A", "class=compaction,auxiliary": "B",
    "claude-opus-* class=subagent agent=Explore": "C"}."""

    __slots__ = ("key", "provider", "model", "kinds", "agent")

    def __init__(self, key, provider):
        self.key, self.provider = key, provider
        self.model = self.kinds = self.agent = None
        for term in key.split():
            name, _, value = term.partition("=")
            if name.lower() == "class" and value:
                self.kinds = frozenset(value.lower().split(","))
            elif name.lower() == "agent" and value:
                self.agent = value.lower()
            else:
                self.model = term.lower()

    def check(self, problems):
        """Add what is wrong with the key to problems."""
        terms = self.key.split()
        kinds = [t for t in terms if re.match(r"(?i)class=.", t)]
        models = [t for t in terms if not re.match(r"(?i)(class|agent)=.", t)]
        if not terms or len(models) > 1 or len(kinds) > 1 or len(terms) - len(models) - len(kinds) > 1:
            problems.append(Said("routes_key", key=self.key))
            return
        unknown = sorted((self.kinds or frozenset()) - set(REQUEST_CLASSES))
        if unknown:
            problems.append(Said("routes_class", key=self.key, value=", ".join(unknown),
                                 classes=", ".join(REQUEST_CLASSES)))

    def matches(self, model, kind, agent):
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.agent is not None and not (agent and fnmatch.fnmatchcase(agent.lower(), self.agent)):
            return False
        return self.model is None or (isinstance(model, str) and fnmatch.fnmatchcase(model.lower(), self.model))


# Claude Code's hint headers (CLAUDE_CODE_GATEWAY_HINT_HEADERS=1).
CLASS_HEADER = "x-claude-code-request-class"
AGENT_HEADER = "x-claude-code-agent-type"
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*([0-9]{1,9})\b')
_OPENING = (re.compile(rb'"system"\s*:\s*'), re.compile(rb'"messages"\s*:\s*\[\s*'))
_BODY_KEYS = re.compile(rb'"(data|ttl)"\s*:\s*"')
OPENING_MAX = 16384                 # bytes of a system prompt or first message read to know a conversation
BASE64_MIN = 1024                   # a "data" string this long is an image's or a document's bytes


def hint(headers, name):
    """A hint header's value, lower case, printable and short, or None."""
    value = (headers.get(name) or "").strip().lower()
    return escape_unprintable(value)[:CLASS_MAX] or None


def conversation_of(request):
    """The conversation a Messages request belongs to: Claude Code's X-Claude-Code-Session-Id,
    else a hash of its system prompt and first message (what every later turn repeats)."""
    session = session_of(request.headers)
    if session:
        return session
    # Read where they stand in the bytes, each at most OPENING_MAX far (a body may be 64 MB of
    # images; parsing it whole would cost the relay more than the rest of its work).
    digest, body = hashlib.sha256(), request.body
    for pattern in _OPENING:
        found = pattern.search(body)
        if found is None:
            continue
        window = body[found.end():found.end() + OPENING_MAX].decode("utf-8", "replace")
        try:
            value = _DECODER.raw_decode(window)[0]
            digest.update(json.dumps(value, sort_keys=True).encode("utf-8", "replace"))
        except ValueError:
            digest.update(window.encode("utf-8", "replace"))     # longer than the window: its start
    return "sha256:" + digest.hexdigest()[:24]


def requested_max_tokens(body):
    found = _MAX_TOKENS.search(body)
    return int(found.group(1)) if found else None


def body_facts(body):
    """(its bytes without its images' and documents' base64 data — a "data" string of BASE64_MIN
    bytes or more, which stands for far fewer tokens than its length —, and whether it asks for
    1-hour caching) of a request body, by one search through its bytes, never parsed: a base64
    string is stepped over at memchr's speed."""
    size, hour, at = len(body), False, 0
    while True:
        found = _BODY_KEYS.search(body, at)
        if found is None:
            return size, hour
        if found.group(1) == b"ttl":
            hour = hour or body.startswith(b'1h"', found.end())
            at = found.end()
            continue
        end = body.find(b'"', found.end())
        if end < 0:
            return size, hour
        if end - found.end() >= BASE64_MIN:
            size -= end - found.end() + 1
        at = end + 1


def limit_for(limits, model):
    """The tokens a provider's {model glob: tokens} (context_window, max_output) allows this model, or None."""
    if limits and isinstance(model, str):
        lower = model.lower()
        for glob, tokens in limits.items():
            if fnmatch.fnmatchcase(lower, glob):
                return tokens
    return None


def context_window(provider, model, beta=""):
    """The context window of a model on a provider: as configured, else a Claude model's
    (LONG_CONTEXT_WINDOW for a [1m] model or one asked with the context-1m beta), else None
    (unknown: never skipped)."""
    found = limit_for(provider.context_window, model)
    if found is not None or not isinstance(model, str) or not model.lower().startswith("claude"):
        return found
    return LONG_CONTEXT_WINDOW if "[1m]" in model.lower() or "context-1m" in beta else CONTEXT_WINDOW


def model_for(view, target, model):
    """The model id a request for `model` goes to this provider as (env-models, MODEL_MAPPING)."""
    if model is None or not view.config.model_mapping:
        return model
    return map_model(model, target.model_set, target.env_models)


def candidates(view, health, model=None):
    """The providers to try in order: the selected one, then the fallback list (in the order
    FALLBACK_ORDER says, for this model), skipping any that still has a placeholder key and any
    that is cooling down; fallbacks whose balance is low come last (LOW_BALANCE_LAST). If all
    are cooling down, the first of them is tried anyway."""
    fallback = [n for n in (view.fallback if view.fallback_enabled else ()) if n != view.selected]
    order = view.config.fallback_order
    if order == "cheapest":
        def price_of(name):
            target = view.targets.get(name)
            rates = view.config.pricing.rates_on(name, model_for(view, target, model)) if target and model else None
            return (0, rates) if rates is not None else (1, ())
        fallback.sort(key=price_of)
    elif order == "fastest":
        def speed_of(name):
            ms = health.first_content_ms(name)
            return (0, ms) if ms is not None else (1, 0)
        fallback.sort(key=speed_of)
    if health.low_balance:
        fallback.sort(key=health.low_balance.__contains__)     # stable: the rest keep their order
    names = [view.selected] + fallback
    usable = [view.targets[n] for n in names if n in view.targets and not view.targets[n].provider.placeholder_key]
    now = health.clock()
    chosen = [t for t in usable if not health.is_cooling(t.name, now)]
    return chosen or usable[:1]


def no_candidate(view):
    """The NoProvider error that says what to edit when candidates() found nothing."""
    target = view.target
    if target is not None and target.provider.placeholder_key:
        return NoProvider(Said("no_provider_example", name=target.name))
    return NoProvider(Said("no_provider"))


# ============================================================================ relay


# A write to a client that has gone away, or stopped reading, fails with one of these.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, socket.timeout, TimeoutError)


class ClientRequest:
    """What the handler parsed of a request to relay."""

    __slots__ = ("method", "path", "headers", "body", "http10")

    def __init__(self, method, path, headers, body, http10=False):
        self.method = method
        self.path = path
        self.headers = headers          # Headers
        self.body = body
        self.http10 = http10            # an HTTP/1.0 client gets a close-delimited stream


class ClientWriter:
    """The answer to one client request. head() queues the status line and header block; they
    leave with the body's first write, or with flush(), in one send(). Once head() was called
    no other status line may follow (`started`). `send` is the socket's sendall, or a test's
    list.append."""

    __slots__ = ("send", "pending", "started")

    def __init__(self, send):
        self.send = send
        self.pending = b""
        self.started = False

    def head(self, status, fields):
        self.pending = response_head(status, fields)
        self.started = True

    def write(self, data):
        if self.pending:
            data, self.pending = self.pending + data, b""
        if data:
            self.send(data)

    def flush(self):
        self.write(b"")


class Answer:
    """A provider's answer whose head has arrived: the part of its body read ahead (`held`,
    all of it if `ended`) and the rest, still to be read from `pieces` (Response.pieces())."""

    __slots__ = ("conn", "resp", "pieces", "held", "ended")

    def __init__(self, conn, resp, pieces, held, ended):
        self.conn, self.resp, self.pieces, self.held, self.ended = conn, resp, pieces, held, ended


class Failure:
    """Why one provider could not answer a request. A failure with an `answer` (a 529, say)
    keeps it, read only ERROR_HOLD_BYTES far, so that it can still be relayed as it was if no
    other provider takes over; one without has the ProxyError to answer instead."""

    __slots__ = ("label", "error", "cooldown_s", "answer")

    def __init__(self, label, error=None, cooldown_s=None, answer=None):
        self.label = label            # for x-ccproxy-attempts and the log: "529", "timeout"…
        self.error = error
        self.cooldown_s = cooldown_s
        self.answer = answer


_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')


# A stream is the client's once it shows real content: a block begins or grows, or an empty
# message ends. An error event before that is a relay failing, not an answer.
CONTENT_EVENTS = frozenset((b"content_block_start", b"content_block_delta", b"message_stop"))
REQUEST_ERRORS = (b'"invalid_request_error"', b'"request_too_large"')
_EVENT_SPLIT = re.compile(rb"\r?\n\r?\n")
_EVENT_FIELD = re.compile(rb"^event:[ \t]*([^\r\n]*)", re.M)
_DATA_TYPE = re.compile(rb'^data:[ \t]*\{\s*"type"\s*:\s*"([^"]*)"', re.M)


def stream_verdict(held):
    """What the complete events at a stream's start say: "commit" once one is content (or an
    error about the request itself, which no other relay would take either), "fail" for any
    other error event before content, None while only message_start, pings and the like came."""
    for event in _EVENT_SPLIT.split(held)[:-1]:
        found = _EVENT_FIELD.search(event) or _DATA_TYPE.search(event)
        name = found.group(1).strip() if found else b""
        if name in CONTENT_EVENTS:
            return "commit"
        if name == b"error":
            return "commit" if any(kind in event for kind in REQUEST_ERRORS) else "fail"
    return None


def body_verdict(held, content_type):
    """What a whole 200 answer to a non-streamed /v1/messages says: "commit" for a message,
    else the gate it fails: gate_error_body (an error object), gate_not_message (anything else:
    an HTML page, JSON that is no message)."""
    try:
        reply = json.loads(held) if "json" in content_type else None
    except ValueError:
        reply = None
    kind = reply.get("type") if isinstance(reply, dict) else None
    return "commit" if kind == "message" else "gate_error_body" if kind == "error" else "gate_not_message"


class Relay:
    """One client request relayed: to the selected provider and, on a failure before any byte
    reached the client, to the next candidate (candidates()).

    It reads providers through `pool` (Pool.request and Pool.release) and writes the client's
    answer through `out` (a ClientWriter); tests give it stand-ins for both, so every decision
    here runs without sockets. `exchange` collects what the log line and request log show.
    """

    def __init__(self, view, health, pool, out, exchange, recorder, debug=False, store=None, user=None):
        self.view = view
        self.store = store              # remembers learned fixes (Store.learn_fixes)
        self.user = user                # a user key: only its providers and models (permitted)
        self.recorder = recorder        # Counters: the open streams (stream_opened, stream_closed)
        self.config = view.config
        self.health = health
        self.pool = pool
        self.out = out
        self.exchange = exchange
        self.debug = debug
        self.started = time.monotonic()
        self.request = None
        self.model = None               # the model the request asks for
        self.size, self.hour = 0, False     # its body_facts(): text bytes, asks 1-hour caching
        self.real_model = None          # the model a model alias names
        self.close = False              # the client connection must close after the answer
        self.gated = False              # a 200 is held until it shows content (gate())
        self.why = "selected"           # how the first candidate was chosen: selected, route, alias, kept, idle
        self.lessons = []               # (provider, [(fix, the error it was learned from)]): learn()

    def run(self, request):
        self.request = request
        exchange, health = self.exchange, self.health
        agent = request.headers.get("User-Agent")
        if agent and agent.startswith("claude-cli/"):
            health.client_agent = agent
        exchange.kind, exchange.agent = hint(request.headers, CLASS_HEADER), hint(request.headers, AGENT_HEADER)
        chain = self.route(request)
        if not chain:
            raise no_candidate(self.view)
        if self.user is not None:
            try:
                chain = permitted(self.user, self.view, chain, request.body)
            except ProxyError:
                exchange.model_in = requested_model(request.body)     # for the record of the refusal
                raise
        if request.path.startswith("/v1/messages/count_tokens") and health.lacks_count_tokens(chain[0].name):
            # Claude Code 2.1.332 estimates by itself after a 404: the relay is spared /context's burst.
            exchange.provider = chain[0].name
            raise NotFound(Said("no_count_tokens", name=chain[0].name))
        # Anthropic's JSON escapes quotes inside strings, so this only matches a real "stream" key.
        stream = exchange.stream = bool(_STREAM_FLAG.search(request.body))
        self.gated = request.method == "POST" and request.path.partition("?")[0] == "/v1/messages"
        exchange.bytes_in = len(request.body)
        first = chain[0].name
        if self.gated:
            health.last_model = self.model
            exchange.conversation = conversation_of(request)
            chain = self.fitting(self.keep_placed(chain, first))
        try:
            self.over(chain, first, stream)
        finally:
            if self.lessons:
                self.learn()

    def over(self, chain, first, stream):
        """Try the candidates in turn until one answers, or answer the last one's failure."""
        exchange, health = self.exchange, self.health
        for index, target in enumerate(chain):
            exchange.provider = target.name
            last = index == len(chain) - 1
            failure = self.attempt(target, stream, last)
            if failure is None:
                health.recovered(target.name)
                if self.gated and exchange.status == 200:
                    self.placed(target, first, self.request)
                return
            exchange.attempts.append((target.name, failure.label, exchange.model_out))
            if self.view.fallback_enabled and self.view.fallback:
                health.cool_down(target.name, failure.cooldown_s, failure.label)
            if last:
                self.answer_failure(target, failure)
                return
            if failure.answer is not None:
                failure.answer.conn.close()     # its answer was not read to its end

    def route(self, request):
        """The providers to try, in order. A model alias (alias_catalog) goes to its provider
        with the real model id, then to the providers of the failover list that list the same
        id; a Routes match to its provider, then the failover list; anything else to the
        selection, then the failover list (candidates()). The selection itself never changes."""
        view, health = self.view, self.health
        model = self.model = requested_model(request.body) if request.path.startswith("/v1/messages") else None
        if model in view.aliases:
            name, self.real_model = view.aliases[model]
            now = health.clock()
            same = [view.targets[n] for n in view.fallback if view.fallback_enabled and n != name
                    and n in view.targets and self.real_model in view.targets[n].model_set
                    and not health.is_cooling(n, now)]
            self.exchange.say("alias", "model alias: %s of %s", self.real_model, name)
            self.why = "alias"
            return [t for t in [view.targets[name]] + same if not t.provider.placeholder_key]
        chain = candidates(view, health, model)
        exchange = self.exchange
        rule = view.config.route_for(model, exchange.kind, exchange.agent)
        routed = rule.provider if rule is not None else None
        if routed in view.targets and not view.targets[routed].provider.placeholder_key:
            exchange.say("routes", "Routes: %s to %s", rule.key, routed)
            self.why = "route"
            return [view.targets[routed]] + [t for t in chain if t.name != routed]
        return chain

    def keep_placed(self, chain, first):
        """The chain with the relay that answered this conversation last put first, while its
        prompt cache there is warm and it is not cooling down (Health.placed_on): a conversation
        that failover moved, or that a switch left until it goes idle, stays where its cache is."""
        health, exchange = self.health, self.exchange
        found = health.placed_on(exchange.conversation, first)
        if found is None or found[0] == first:
            return chain
        target = self.view.targets.get(found[0])
        if target is None or target.provider.placeholder_key or health.is_cooling(target.name, health.clock()):
            return chain
        if self.user is not None and target not in chain:
            try:
                permitted(self.user, self.view, [target], self.request.body)
            except ProxyError:
                return chain
        self.why = "idle" if found[1] == "idle" else "kept"
        exchange.say("kept", "kept on %s, where its prompt cache is", target.name)
        return [target] + [t for t in chain if t is not target]

    def fitting(self, chain):
        """The candidates whose context window (and max_output) can take this request, by its
        size in tokens (Health.tokens_of); a 400 naming each relay's limit when none can."""
        request, exchange = self.request, self.exchange
        self.size, self.hour = body_facts(request.body)
        tokens = self.health.tokens_of(exchange.conversation, self.size)
        wanted = requested_max_tokens(request.body)
        beta = request.headers.get("anthropic-beta") or ""
        fit, refused = [], []
        for target in chain:
            model = self.real_model or model_for(self.view, target, self.model)
            window = context_window(target.provider, model, beta)
            most = limit_for(target.provider.max_output, model)
            if window is not None and tokens > window:
                refused.append("%s (%s: %d)" % (target.name, model, window))
            elif most is not None and wanted is not None and wanted > most:
                refused.append("%s (%s: max_output %d)" % (target.name, model, most))
            else:
                fit.append(target)
        if not refused:
            return chain
        if not fit:
            raise ClientError(Said("context_too_large", tokens=tokens, max_tokens=wanted or "-",
                                   relays=", ".join(refused)))
        exchange.say("too_large", "skipped, too small for this request: %s", ", ".join(refused))
        if fit[0] is not chain[0]:
            self.why = "too_large"
        return fit

    def placed(self, target, first, request):
        """Remember where this conversation was answered, why, for how long its cache there
        lasts, and its size in tokens; and the first-content time, for FALLBACK_ORDER fastest."""
        exchange, health = self.exchange, self.health
        why = "failover" if exchange.attempts else self.why
        if exchange.conversation:
            lifetime = CACHE_LONG_S if self.hour else CACHE_LIFETIME_S
            health.place(exchange.conversation, first, target.name, why, lifetime)
            usage = exchange.usage
            if usage.input or usage.cache_read or usage.cache_creation:
                health.note_size(exchange.conversation, usage.input + usage.cache_read + usage.cache_creation,
                                 self.size)
        exchange.placed = why
        if exchange.ttfb_ms is not None:
            health.note_first(target.name, exchange.ttfb_ms)

    def attempt(self, target, stream, last):
        """Try one provider. None once its answer has gone to the client, or the Failure that
        should move the request on (nothing has been sent to the client then)."""
        exchange, health, request = self.exchange, self.health, self.request
        prepared, exchange.model_in, exchange.model_out = prepare_body(self.view, target, request.path,
                                                                       request.body, self.real_model)
        fixes = list(target.fixes)          # what this provider proved it needs (LEARNED_FIXES)
        known = {f.id for f in fixes}
        fixes += [f for f in health.unsaved.get(target.name, ()) if f.id not in known]
        # After a switch, a conversation's old thinking blocks carry another provider's
        # signatures; once a strip was needed on this provider, later turns go out stripped.
        session = request.headers.get("X-Claude-Code-Session-Id")
        if session and health.strips_signatures(session, target.name):
            fixes.append(Fix("signatures"))
            exchange.say("strip_again", "thinking signatures stripped, as earlier in this conversation")
        elif fixes:
            exchange.say("fixed", "fixed for this provider: %s", "; ".join(f.describe() for f in fixes),
                         shown=[f.id for f in fixes])
        learned, helped, taught = [], [], {}     # taught: the error each fix was learned from
        while True:
            body = fixed_body(fixes, prepared)
            headers = fixed_headers(fixes, upstream_headers(request.headers, target, body))
            answer = self.ask(target, body, headers, stream, last)
            if isinstance(answer, Failure):
                return answer
            status = answer.resp.status
            fix, message = self.fix_for(target, answer, prepared, fixes) if status == 400 else (None, "")
            if fix is not None and learned:
                helped.append(learned[-1])  # the relay got past it, to something else it refuses
            if fix is None or len(learned) >= MAX_FIXES_PER_REQUEST:
                break
            taught[fix.id] = message
            self.pool.release(target, answer.conn, answer.resp)
            fixes.append(fix)
            learned.append(fix)
            exchange.say("retried", "thinking signatures stripped, retried" if fix.kind == "signatures" else
                         "fix applied, retried: " + fix.describe(), shown=[fix.id])
        if status < 400:
            helped = learned
        if helped:
            self.remember(target, session, helped, taught)
        if status in COUNT_TOKENS_MISSING and request.path.startswith("/v1/messages/count_tokens"):
            health.remember_no_count_tokens(target.name)
        if status in FAILOVER_STATUSES:
            wait = retry_after_seconds(answer.resp.getheader("Retry-After"), health.clock())
            return Failure(str(status), cooldown_s=self.config.cooldown_s if wait is None else wait, answer=answer)
        extra = []
        if exchange.attempts:
            chain = exchange.chain() + ["%s %d" % (target.name, status)]
            extra.append(("x-ccproxy-attempts", header_text(", ".join(chain))))
        self.deliver(target, answer, extra)
        return None

    def fix_for(self, target, answer, body, applied):
        """(the LEARNED_FIXES entry a 400 calls for that was not tried yet, or None; its error
        message); a client-version gate is noted on the way (Health.gates)."""
        message = error_message(answer.held) if answer.ended else answer.held.decode("utf-8", "replace")
        gate = version_gate(message)
        if gate:
            self.health.note_gate(target.name, self.exchange.model_out, gate, self.request.headers.get("User-Agent"))
        return next_fix(message, body, self.request.headers, applied), message

    def remember(self, target, session, learned, taught):
        """Fixes that got the provider past what it refused (it answered, or refused something
        else next): a signature strip for this conversation at once, the others for the
        provider once the answer has gone out (learn()). A fix after which it still refused the
        same, or gave up, is not kept."""
        if any(f.kind == "signatures" for f in learned) and session:
            self.health.remember_strip(session, target.name)
        lasting = [f for f in learned if f.kind != "signatures"]
        if lasting and self.store is not None:
            self.health.learning(target.name, lasting)
            self.lessons.append((target.name, [(f, "model %s: %s" % (
                self.exchange.model_out, redact(excerpt(taught[f.id], TAUGHT_EXCERPT), self.config.secrets())))
                for f in lasting]))

    def learn(self):
        """Write what was learned to the state file (Store.learn_fixes: an fsync), after the
        answer: the client never waits on the disk for it. Meanwhile other requests to the
        provider go out fixed already (Health.learning)."""
        for name, fixes in self.lessons:
            try:
                self.store.learn_fixes(name, fixes)
            except StateError as exc:
                log.error("%s", exc)
            finally:
                self.health.learned(name, [f for f, _ in fixes])
        self.lessons = []

    def ask(self, target, body, headers, stream, last):
        """Send the request to one provider and read its answer as far as the decision needs:
        an error answer ERROR_HOLD_BYTES far, a 200 to /v1/messages until it shows content
        (gate()), anything else not at all. An Answer, or the Failure of a provider that could
        not be reached in time or answered 200 without content."""
        config, request = self.config, self.request
        # A stream must show its head soon when another provider could take over; a lone
        # provider (or a non-streamed reply, whose head may come after the whole answer) gets
        # the long idle timeout.
        timeout = config.first_byte_timeout_s if stream and not last else config.api_timeout_s
        if self.debug:
            log.debug("-> %s %s body: %s", target.name, request.path,
                      redact(body[:DEBUG_BODY_CHARS].decode("utf-8", "replace"), config.secrets()))
        conn = None
        sent = time.monotonic()
        try:
            conn, resp = self.pool.request(target, request.method, request.path, headers, body, timeout)
            pieces = resp.pieces()
            if resp.status in FAILOVER_STATUSES or resp.status in COUNT_TOKENS_MISSING or resp.status == 400:
                held, ended = collect(pieces, ERROR_HOLD_BYTES)
            elif resp.status == 200 and self.gated:
                return self.ready(self.gate(target, Answer(conn, resp, pieces, b"", False), stream,
                                            None if last else sent + config.first_content_timeout_s))
            else:
                held, ended = b"", resp.complete
            return self.ready(Answer(conn, resp, pieces, held, ended))
        except TIMEOUT_ERRORS as exc:
            if conn is not None:
                conn.close()            # timed out mid-answer: not reusable
            if self.gated and conn is not None and resp.status == 200:
                # The head came, content did not: FIRST_CONTENT_TIMEOUT_MS, or a silence past the idle timeout.
                gate = Said("gate_no_content", seconds=round(time.monotonic() - sent, 1))
                return Failure(gate, UpstreamTimeout(Said("gate_failed", name=target.name, gate=gate, excerpt="-")),
                               config.cooldown_s)
            return Failure("timeout", UpstreamTimeout(Said("upstream_timeout", name=target.name,
                                                           reason=describe_network_error(exc))), config.cooldown_s)
        except NETWORK_ERRORS as exc:
            if conn is not None:
                conn.close()
            reason = describe_network_error(exc)
            return Failure(reason, UpstreamError(Said("upstream_unreachable", name=target.name, address=target.netloc,
                                                      reason=reason)), config.cooldown_s)

    def ready(self, outcome):
        """An answer as far as the decision read it, its connection given the idle timeout
        for the rest (API_TIMEOUT_MS, where a fallback gave it the shorter first-byte one):
        whatever of it is relayed (deliver) is read without another system call."""
        answer = outcome.answer if isinstance(outcome, Failure) else outcome
        if answer is not None and answer.conn is not None:
            retime(answer.conn, self.config.api_timeout_s)
        return outcome

    def gate(self, target, answer, stream, deadline):
        """Hold a 200 answer to /v1/messages until it shows content: a stream its first content
        event (stream_verdict), within FIRST_CONTENT_MAX_BYTES and, when another provider could
        take over, by `deadline` (FIRST_CONTENT_TIMEOUT_MS); any other answer, that it is a
        message. The Answer to relay, or the Failure of a relay that said 200 but sent an error
        event, a stream that ended empty, an error body or a page."""
        resp = answer.resp
        content_type = resp.headers.get("content-type", "").lower()
        if stream and "text/event-stream" in content_type:
            if deadline is not None:
                resp.hold_until(deadline)
            answer.held, answer.ended = collect(answer.pieces, FIRST_CONTENT_MAX_BYTES, stream_verdict)
            if deadline is not None:
                resp.end_hold()
            verdict = stream_verdict(answer.held)
            if verdict == "fail":
                return Failure(Said("gate_error_event"), cooldown_s=self.config.cooldown_s, answer=answer)
            if verdict is None and answer.ended:
                return self.gate_failed(target, answer, Said("gate_empty"))
            return answer           # content, or FIRST_CONTENT_MAX_BYTES without a verdict: the client's
        resp.hold_until(self.started + self.config.api_timeout_s)   # a body that drips never ends
        answer.held, answer.ended = collect(answer.pieces, FIRST_CONTENT_MAX_BYTES)
        resp.end_hold()
        if not answer.ended and "json" in content_type:
            return answer           # longer than any error body: a message
        verdict = body_verdict(answer.held, content_type) if answer.ended else "gate_not_message"
        if verdict == "commit":
            return answer
        return self.gate_failed(target, answer, Said(verdict))

    def gate_failed(self, target, answer, gate):
        """The Failure of a 200 without content; its connection released (or closed, if unread)."""
        self.pool.release(target, answer.conn, answer.resp)
        text = excerpt(error_message(answer.held)) if answer.held else "-"
        return Failure(gate, UpstreamError(Said("gate_failed", name=target.name, gate=gate,
                                                excerpt=redact(text, self.config.secrets()))), self.config.cooldown_s)

    def answer_failure(self, target, failure):
        """Every candidate failed: the client gets the last provider's answer as it was, so its
        own retry logic sees the real status; ccproxy's own error for a network failure."""
        exchange = self.exchange
        chain = ", ".join(exchange.chain())
        exchange.attempts.pop()             # the last attempt is the outcome, not a step on the way
        if failure.answer is None:
            if exchange.attempts:
                failure.error.headers = [("x-ccproxy-attempts", header_text(chain))]
            raise failure.error
        status = failure.answer.resp.status
        if status in (401, 403):
            # Claude Code shows "Invalid API key" alike for ccproxy's key and the provider's.
            exchange.say("key_rejected", "provider %s rejected its api_key (HTTP %s) — check it in config.json",
                         target.name, status)
        extra = [("x-ccproxy-attempts", header_text(chain))] if exchange.attempts else []
        self.deliver(target, failure.answer, extra)

    def deliver(self, target, answer, extra):
        """Relay a provider's answer to the client. Its connection goes back to the pool only
        if the answer was read to its end, as soon as it was (a client's next request finds it)."""
        self.exchange.status = answer.resp.status
        try:
            self.relay_body(target, answer, extra)
        finally:
            self.give_back(target, answer)

    def give_back(self, target, answer):
        """Release the answer's connection (Pool.release), once."""
        if answer.conn is not None:
            self.pool.release(target, answer.conn, answer.resp)
            answer.conn = None

    def answer_head(self, target, resp, extra):
        """The header fields of the answer to the client, and whether its body is re-framed
        chunked: a body of known length keeps it, a stream or any body of unknown length is
        chunked for an HTTP/1.1 client (the connection stays reusable) and close-delimited
        for an HTTP/1.0 one."""
        fields = end_to_end(resp.getheaders(), RESPONSE_OWN)
        fields.append(("x-ccproxy-provider", header_text(target.name)))
        fields.extend(extra)
        if self.request.method == "HEAD" or resp.status in (204, 304):
            length = resp.headers.get("content-length")     # describes the GET's body
            if length is not None:
                fields.append(("Content-Length", length))
            return fields, False
        if resp.length is not None:
            fields.append(("Content-Length", str(resp.length)))
            return fields, False
        if self.request.http10:
            self.close = True
            return fields, False
        fields.append(("Transfer-Encoding", "chunked"))
        return fields, True

    def relay_body(self, target, answer, extra):
        """The head now (or with the first piece), then the held bytes and the rest of the
        body as it arrives, each piece in one write the moment it is there."""
        exchange, out, resp = self.exchange, self.out, answer.resp
        fields, chunked = self.answer_head(target, resp, extra)
        out.head(resp.status, fields)
        if not answer.held and resp.length is None:
            out.flush()         # the head goes now, not with a first piece that may be long in coming
        content_type = resp.headers.get("content-type", "")
        is_sse = "text/event-stream" in content_type
        feed = exchange.usage.feed if is_sse else None
        keep = [] if resp.status == 200 and "json" in content_type else None    # for the usage
        # A non-streamed answer must end within API_TIMEOUT_MS whatever a provider drips.
        deadline = None if is_sse else self.started + self.config.api_timeout_s
        pieces, data, last = answer.pieces, answer.held, answer.ended
        self.recorder.stream_opened()
        try:
            while True:
                if last:    # all read: the connection is free before the client has the end
                    self.give_back(target, answer)
                if data:
                    if exchange.ttfb_ms is None:
                        exchange.ttfb_ms = (time.monotonic() - self.started) * 1000
                    exchange.bytes_out += len(data)
                    if feed:
                        feed(data)
                    elif keep is not None and exchange.bytes_out <= USAGE_JSON_MAX:
                        keep.append(data)
                    if chunked:     # the closing chunk goes in the same write as the last piece
                        data = b"%x\r\n%s\r\n%s" % (len(data), data, b"0\r\n\r\n" if last else b"")
                    out.write(data)
                elif last:
                    out.write(b"0\r\n\r\n" if chunked else b"")
                if last:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    self.broken_off(target, "the answer took longer than API_TIMEOUT_MS", is_sse, chunked)
                    return
                try:
                    data, last = next(pieces)
                except NETWORK_ERRORS as exc:
                    self.broken_off(target, describe_network_error(exc), is_sse, chunked)
                    return
        except CLIENT_GONE:
            exchange.say("client_gone", "client went away mid-answer")
            exchange.client_gone = self.close = True
            return
        finally:
            self.recorder.stream_closed()
        if keep:
            try:
                reply = json.loads(b"".join(keep))
            except ValueError:
                reply = None
            if isinstance(reply, dict):
                exchange.usage.take(reply)

    def broken_off(self, target, reason, is_sse, chunked):
        """The provider failed after the head went out. An SSE stream ends with an error event
        (Claude Code then re-sends without streaming) and, if chunked, a clean end; any other
        body is left unfinished and the connection closed, so that the client sees it was cut
        short rather than taking part of an answer for all of it."""
        exchange = self.exchange
        exchange.say("broken", "upstream failed mid-answer: %s", reason)
        exchange.midstream_error = True
        if is_sse:
            event = sse_error("api_error", "ccproxy: provider %s broke off the stream: %s" % (target.name, reason))
            try:
                self.out.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event) if chunked else event)
            except CLIENT_GONE:
                exchange.client_gone = True
            if chunked and not exchange.client_gone:
                return
        self.close = True


# ============================================================================ observability


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def failure_kind(label):
    """The /metrics kind of a failed attempt: http_<status>, timeout or connect."""
    if label.isdigit():
        return "http_" + label
    return "timeout" if label == "timeout" else "connect"


def log_line(rec):
    """The one log line of a relayed request, from its record: metadata only. After a failover
    to providers that map the model differently, each attempt's model is named."""
    model = rec["model"] or "-"
    sent = [a[2] for a in rec["attempts"] if len(a) > 2 and a[2]]
    if len(set(sent)) > 1:
        model = "%s → %s" % (model, ", ".join("%s %s" % (a[0], a[2]) for a in rec["attempts"] if len(a) > 2 and a[2]))
    elif rec["model_sent"] and rec["model_sent"] != rec["model"]:
        model = "%s → %s" % (rec["model"], rec["model_sent"])
    ttfb = rec["ttfb_ms"]
    cost = " cost %.4f %s" % (rec["cost"], rec["currency"]) if rec.get("cost") is not None else ""
    return "%s %s %s → %s model %s %dB ttfb %s total %dms%s%s" % (
        rec["client"], rec["method"], rec["path"], " → ".join("%s %s" % (a[0] or "-", a[1]) for a in rec["attempts"]),
        model, rec["bytes_out"], "-" if ttfb is None else "%dms" % ttfb, rec["total_ms"], cost,
        " (%s)" % rec["note"] if rec["note"] else "")


class RequestLog:
    """The request records: a bounded ring in memory and the request log file (REQUEST_LOG),
    which several processes may share; written by the recorder's thread (Recorder)."""

    def __init__(self, path, max_bytes):
        self.lock = threading.Lock()
        self.ring = deque(maxlen=REQUEST_RING)
        self.path = path
        self.max_bytes = max_bytes
        self.file = None
        self.expected = None          # the log's size after this process's last write
        self.shared = False           # another process writes the same log (then newest() reads it)
        self.everyone = None          # with STORE: newest(limit, provider, key) of every host (SharedUsage)
        self.write_lock = threading.Lock()
        if path:
            found = file_signature(path)
            self.expected = found[2] if found else 0
            self._load_tail()

    def _load_tail(self):
        """The newest records of the previous run, so the Requests panel survives a restart."""
        try:
            with open(self.path, "rb") as f:
                lines = f.readlines()[-REQUEST_RING:]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s: cannot read the request log (%s)", self.path, exc.strerror or exc)
            return
        for line in lines:
            try:
                self.ring.append(json.loads(line))
            except ValueError:
                continue   # a line cut by a crash

    def add(self, rec):
        with self.lock:
            self.ring.append(rec)

    def write(self, lines):
        """Append lines to the request log, rotating it to .1 before it would pass max_bytes.
        Several ccproxy processes may share the file: what fits is written at once to a file
        opened for appending, under an flock, which also keeps two processes from both
        rotating it; a process that finds it rotated opens the new one."""
        if not self.path or not lines:
            return
        pending = list(lines)
        try:
            for _ in range(len(pending) + 3):
                if self.file is None:
                    self.file = os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND), "ab", buffering=0)
                with self.write_lock, flocked(self.file):
                    current = os.path.exists(self.path) and os.path.samestat(os.stat(self.path),
                                                                             os.fstat(self.file.fileno()))
                    if current:
                        size, count = os.fstat(self.file.fileno()).st_size, 0
                        if self.expected is not None and size != self.expected:
                            self.shared = True      # another process appends to it too
                        for line in pending:
                            if size and size + len(line) > self.max_bytes:
                                break
                            size += len(line)
                            count += 1
                        self.file.write(b"".join(pending[:count]))
                        self.expected = size
                        del pending[:count]
                        if pending:
                            os.replace(self.path, self.path + ".1")    # the rest starts a new file
                if pending or not current:
                    self.shared |= not current      # rotated by another process
                    self.file.close()
                    self.file = None
                    self.expected = None
                if not pending:
                    return
            log.error("%s: the request log keeps being rotated by another process; %d records were "
                      "not written", self.path, len(pending))
        except OSError as exc:
            log.error("%s: cannot write the request log (%s)", self.path, exc.strerror or exc)
            if self.file is not None:
                self.file.close()
            self.file = None

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def newest(self, limit, provider=None, key=None):
        """The newest records, newest first (of one provider, or one user key): from this
        process's ring, or once another process was seen writing the request log too, from
        the log, where every process's records are."""
        def wanted(rec):
            return (provider is None or rec.get("provider") == provider or
                    any(a[0] == provider for a in rec.get("attempts", []))) and \
                (key is None or rec.get("key") == key)
        found = self.everyone(limit, provider, key) if self.everyone is not None else None
        if found is not None:
            return found
        out = []
        if self.path and not self.shared:
            with self.write_lock:           # not while this process writes it: then it is ours
                found = file_signature(self.path)
                self.shared = found is not None and self.expected is not None and found[2] != self.expected
        if self.path and self.shared:
            try:
                for rec in self.logged_backwards():
                    if wanted(rec):
                        out.append(rec)
                        if len(out) >= limit:
                            break
                return out
            except OSError:
                out = []
        with self.lock:
            records = list(self.ring)
        for rec in reversed(records):
            if wanted(rec):
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def logged_backwards(self):
        """The request log's records, newest first (then its rotated .1), read from the end in
        pieces, REQUEST_TAIL_BYTES at most. OSError if the log cannot be opened."""
        left = REQUEST_TAIL_BYTES
        for index, path in enumerate((self.path, self.path + ".1")):
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                if index:
                    return
                raise
            with f:
                pos, carry = f.seek(0, os.SEEK_END), b""
                while pos > 0 and left > 0:
                    step = min(RELAY_CHUNK, pos, left)
                    pos -= step
                    left -= step
                    f.seek(pos)
                    lines = (f.read(step) + carry).split(b"\n")
                    carry = lines.pop(0) if pos else b""
                    for line in reversed(lines):
                        try:
                            yield json.loads(line)
                        except ValueError:
                            continue        # the blank after the last line, or a line cut by a crash


class Counters:
    """Per-provider rollups since start and the Prometheus counters (/api/stats, /metrics),
    and the answers being relayed right now (stream_opened, stream_closed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.providers = {}           # name -> rollup
        self.requests = {}            # (provider, status) -> count
        self.errors = {}              # (provider, kind) -> count
        self.tokens = {}              # (provider, kind) -> count
        self.ttfb = {}                # provider -> [bucket counts..., +Inf], sum
        self.costs = {}               # (provider, currency) -> cost since start
        self.by_key = {}              # (key name, series, label) -> count: requests by status, tokens, cost
        self.open_streams = 0

    def stream_opened(self):
        with self.lock:
            self.open_streams += 1

    def stream_closed(self):
        with self.lock:
            self.open_streams -= 1

    def _rollup(self, name):
        roll = self.providers.get(name)
        if roll is None:
            roll = self.providers[name] = {"requests": 0, "errors": 0, "ttfb": deque(maxlen=TTFB_SAMPLES),
                                           "tokens": {"input": 0, "output": 0, "cache_read": 0,
                                                      "cache_creation": 0}}
        return roll

    def count(self, rec):
        """Take one (priced) record into the rollups and the counters."""
        with self.lock:
            if rec.get("key"):
                self.count_key(rec)
            if rec.get("cost") is not None and rec["provider"] is not None:
                key = (rec["provider"], rec["currency"])
                self.costs[key] = self.costs.get(key, 0.0) + rec["cost"]
            for name, label in (a[:2] for a in rec["attempts"][:-1]):
                roll = self._rollup(name)
                roll["requests"] += 1
                roll["errors"] += 1
                key = (name, label if label.isdigit() else "error")
                self.requests[key] = self.requests.get(key, 0) + 1
                key = (name, failure_kind(label))
                self.errors[key] = self.errors.get(key, 0) + 1
            name, status = rec["provider"], rec["status"]
            if name is not None:
                roll = self._rollup(name)
                roll["requests"] += 1
                failed = status >= 400 or status == 0 or bool(rec.get("midstream_error"))
                roll["errors"] += failed
                key = (name, str(status))
                self.requests[key] = self.requests.get(key, 0) + 1
                if rec.get("midstream_error"):
                    key = (name, "midstream")
                    self.errors[key] = self.errors.get(key, 0) + 1
                if rec["ttfb_ms"] is not None:
                    roll["ttfb"].append(rec["ttfb_ms"])
                    buckets = self.ttfb.setdefault(name, [0] * (len(TTFB_BUCKETS_S) + 1) + [0.0])
                    seconds = rec["ttfb_ms"] / 1000.0
                    for i, bound in enumerate(TTFB_BUCKETS_S):
                        if seconds <= bound:
                            buckets[i] += 1
                    buckets[-2] += 1
                    buckets[-1] += seconds
                for kind, count in (rec.get("usage") or {}).items():
                    roll["tokens"][kind] += count
                    key = (name, kind)
                    self.tokens[key] = self.tokens.get(key, 0) + count

    def count_key(self, rec):
        """A user key's requests, tokens and cost, for /metrics. Under self.lock."""
        counts, key = self.by_key, rec["key"]
        series = [("requests", str(rec["status"]), 1)]
        series += [("tokens", kind, n) for kind, n in (rec.get("usage") or {}).items()]
        if rec.get("cost") is not None:
            series.append(("cost", rec["currency"], rec["cost"]))
        for kind, label, amount in series:
            counts[(key, kind, label)] = counts.get((key, kind, label), 0) + amount

    def stats(self):
        with self.lock:
            rolls = {n: dict(r, ttfb=sorted(r["ttfb"]), tokens=dict(r["tokens"])) for n, r in self.providers.items()}
        out = {}
        for name, roll in rolls.items():
            samples = roll["ttfb"]
            pick = (lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]) if samples else (lambda q: None)
            ok = roll["requests"] - roll["errors"]
            out[name] = {"requests": roll["requests"], "errors": roll["errors"],
                         "success_pct": round(100.0 * ok / roll["requests"], 1) if roll["requests"] else None,
                         "ttfb_p50_ms": pick(0.5), "ttfb_p95_ms": pick(0.95), "tokens": roll["tokens"]}
        return {"since": self.started, "providers": out}

    def metrics_text(self, cache):
        """The counters in Prometheus' text exposition format (version 0.0.4), with `cache`
        (CacheWatch.status())."""
        with self.lock:
            requests, errors, tokens = dict(self.requests), dict(self.errors), dict(self.tokens)
            ttfb = {n: list(b) for n, b in self.ttfb.items()}
            open_streams, costs, by_key = self.open_streams, dict(self.costs), dict(self.by_key)
        out = ["# HELP ccproxy_requests_total Requests sent to each provider, by the status it answered.",
               "# TYPE ccproxy_requests_total counter"]
        out += ['ccproxy_requests_total{provider="%s",status="%s"} %d' % (_label(p), _label(st), n)
                for (p, st), n in sorted(requests.items())]
        out += ["# HELP ccproxy_upstream_errors_total Failed provider attempts, by kind.",
                "# TYPE ccproxy_upstream_errors_total counter"]
        out += ['ccproxy_upstream_errors_total{provider="%s",kind="%s"} %d' % (_label(p), _label(k), n)
                for (p, k), n in sorted(errors.items())]
        out += ["# HELP ccproxy_tokens_total Tokens reported by the providers' replies, by kind.",
                "# TYPE ccproxy_tokens_total counter"]
        out += ['ccproxy_tokens_total{provider="%s",kind="%s"} %d' % (_label(p), _label(k), n)
                for (p, k), n in sorted(tokens.items())]
        out += ["# HELP ccproxy_ttfb_seconds Time from the request to the first byte relayed to the client.",
                "# TYPE ccproxy_ttfb_seconds histogram"]
        for name, buckets in sorted(ttfb.items()):
            label = _label(name)
            for bound, count in zip(TTFB_BUCKETS_S, buckets):
                out.append('ccproxy_ttfb_seconds_bucket{provider="%s",le="%s"} %d' % (label, bound, count))
            out.append('ccproxy_ttfb_seconds_bucket{provider="%s",le="+Inf"} %d' % (label, buckets[-2]))
            out.append('ccproxy_ttfb_seconds_sum{provider="%s"} %.6f' % (label, buckets[-1]))
            out.append('ccproxy_ttfb_seconds_count{provider="%s"} %d' % (label, buckets[-2]))
        out += ["# HELP ccproxy_open_streams Answers being relayed to clients right now, streams included.",
                "# TYPE ccproxy_open_streams gauge", "ccproxy_open_streams %d" % open_streams]
        out += ["# HELP ccproxy_cost_total What the priced requests cost, from Pricing and price_multiplier.",
                "# TYPE ccproxy_cost_total counter"]
        out += ['ccproxy_cost_total{provider="%s",currency="%s"} %.8f' % (_label(p), _label(c), n)
                for (p, c), n in sorted(costs.items())]
        for kind, label, text in (("requests", "status", "Requests relayed for each user key, by status."),
                                  ("tokens", "kind", "Tokens of each user key's requests, by kind."),
                                  ("cost", "currency", "What each user key's priced requests cost.")):
            out += ["# HELP ccproxy_key_%s_total %s" % (kind, text), "# TYPE ccproxy_key_%s_total counter" % kind]
            out += ['ccproxy_key_%s_total{key="%s",%s="%s"} %s' % (kind, _label(k), label, _label(v), round(n, 8))
                    for (k, series, v), n in sorted(by_key.items()) if series == kind]
        out += ["# HELP ccproxy_cache_hit_ratio Cache reads over prompt tokens, a provider's recent cached requests.",
                "# TYPE ccproxy_cache_hit_ratio gauge"]
        out += ['ccproxy_cache_hit_ratio{provider="%s"} %.4f' % (_label(p), c["hit_rate_pct"] / 100.0)
                for p, c in sorted(cache.items()) if c["hit_rate_pct"] is not None]
        out += ["# HELP ccproxy_cache_low 1 while a provider's cache hit rate is under CACHE_WARN_PCT.",
                "# TYPE ccproxy_cache_low gauge"]
        out += ['ccproxy_cache_low{provider="%s"} %d' % (_label(p), c["low"]) for p, c in sorted(cache.items())]
        return "\n".join(out) + "\n"




class CacheWatch:
    """The cache guard: each provider's hit rate over its recent cached requests (CACHE_WARN_PCT),
    and the conversations each answered lately (what a switch would write to a new cache)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cache = {}               # provider -> its recent cached requests' (cache_read, prompt)
        self.cache_low = set()        # providers whose cache hit rate is under CACHE_WARN_PCT
        self.contexts = {}            # provider -> {model: (time, prompt tokens)} of its last answer

    def watch(self, name, rec, threshold):
        """The cache guard: a provider's hit rate over its recent cached requests, and a log
        line when it falls under CACHE_WARN_PCT (or is back over it)."""
        with self.lock:
            self._watch(name, rec, threshold)

    def _watch(self, name, rec, threshold):
        usage = rec["usage"]
        prompt = usage["input"] + usage["cache_read"] + usage["cache_creation"]
        self.contexts.setdefault(name, {})[rec.get("model") or "-"] = (rec["time"], prompt)
        if not (usage["cache_read"] or usage["cache_creation"]):
            return                  # not a cached request (a title, a count): says nothing
        window = self.cache.setdefault(name, deque(maxlen=CACHE_WINDOW))
        window.append((usage["cache_read"], prompt))
        rate = hit_rate(sum(r for r, _ in window), sum(p for _, p in window))
        low = bool(threshold) and len(window) >= CACHE_MIN_SAMPLES and rate is not None and rate < threshold
        if low and name not in self.cache_low:
            self.cache_low.add(name)
            log.warning("provider %s: cache hit rate %.0f%% over its last %d cached requests is under "
                        "CACHE_WARN_PCT (%s%%) — the relay may not keep Claude Code's prompt cache, and "
                        "every request then pays for cache writes", escape_unprintable(name), rate,
                        len(window), threshold)
        elif not low and name in self.cache_low:
            self.cache_low.discard(name)
            log.info("provider %s: cache hit rate back to %.0f%%", escape_unprintable(name), rate)

    def status(self):
        """Each provider's recent cache hit rate, for the page and /metrics."""
        with self.lock:
            return {n: {"hit_rate_pct": hit_rate(sum(r for r, _ in w), sum(p for _, p in w)),
                        "samples": len(w), "low": n in self.cache_low} for n, w in self.cache.items()}

    def active_context(self, name, now):
        """(model, prompt tokens, age in s) of the largest conversation answered by provider
        within the prompt cache's lifetime, or None: what a switch would write to a new cache."""
        with self.lock:
            recent = [(tokens, model, now - at) for model, (at, tokens) in self.contexts.get(name, {}).items()
                      if now - at < CACHE_LIFETIME_S]
        if not recent:
            return None
        tokens, model, age = max(recent)
        return model, tokens, age


class Recorder:
    """Every relayed request, once, off the request path: its own thread takes each record
    (submit) into the request log (RequestLog), the counters (Counters), the cache watch
    (CacheWatch) and the usage store (UsageStore), and writes its log line."""

    def __init__(self, path, max_bytes, config=lambda: None, usage=None):
        self.config = config          # the running Config: secrets to redact, Pricing, CACHE_WARN_PCT
        self.usage = usage            # a UsageStore, or None
        self.request_log = RequestLog(path, max_bytes)
        self.counters = Counters()
        self.cache_watch = CacheWatch()
        self.queue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, name="ccproxy-recorder", daemon=True)
        self.writer.start()

    def submit(self, rec):
        """Called by the request thread: the rest (log line, rollups, file) happens off it."""
        self.queue.put(rec)

    def _write_loop(self):
        while True:
            try:
                batch = [self.queue.get(timeout=self.usage.retry_s if self.usage and self.usage.waiting() else None)]
            except queue.Empty:         # idle, and usage waits for its store: try it again
                self.usage.add([])
                continue
            # Under load, waking once per request costs more than the work; a short wait
            # lets records gather into one batch (one file write, one wake-up).
            time.sleep(RECORDER_BATCH_S)
            while len(batch) < REQUEST_RING:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            lines, done = [], []
            config = self.config()
            secrets = config.secrets() if config is not None else ()
            for rec in batch:
                if rec is None:
                    break
                self.record(rec, config)
                log.info("%s", redact(log_line(rec), secrets))
                lines.append((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                done.append(rec)
            self.request_log.write(lines)
            if self.usage is not None:
                self.usage.add(done)
            if len(done) < len(batch):
                return

    def record(self, rec, config=None):
        """Take one record into the request log, the counters and the cache watch; with a
        config, price it first (rec["cost"], None for a model without a price)."""
        usage, name = rec.get("usage"), rec["provider"]
        if usage and name is not None and config is not None:
            if "cost" not in rec:
                price(rec, config.pricing)
            self.cache_watch.watch(name, rec, config.cache_warn_pct)
        self.request_log.add(rec)
        self.counters.count(rec)

    def close(self):
        """Write what is queued, then stop the writer."""
        if self.writer is not None:
            self.queue.put(None)
            self.writer.join(THREAD_JOIN_S)
            self.writer = None
        self.request_log.close()


# ============================================================================ usage and cost


def _check_pricing(value, problems):
    """Pricing: {"currency": "USD", "models": {model id or glob: {input, output[, cache_read,
    cache_write]}}}, prices per million tokens."""
    if not isinstance(value, dict):
        problems.append(Said("pricing_type"))
        return
    currency = value.get("currency", "USD")
    if not isinstance(currency, str) or not currency.strip() or len(currency) > 16:
        problems.append(Said("pricing_currency"))
    elif _UNPRINTABLE.search(currency):
        problems.append(Said("pricing_currency_chars"))
    models = value.get("models", {})
    if not isinstance(models, dict):
        problems.append(Said("pricing_models_type"))
        return
    for glob, prices in models.items():
        if glob.startswith("_"):
            continue
        where = "Pricing.models.%s" % escape_unprintable(glob)
        _check_name(glob, where, problems, "model")
        if not isinstance(prices, dict):
            problems.append(Said("price_type", where=where))
            continue
        for kind in ("input", "output"):
            if kind not in prices:
                problems.append(Said("price_missing", where=where, kind=kind))
        for kind, price in prices.items():
            if kind.startswith("_"):
                continue
            if kind not in PRICE_KINDS:
                problems.append(Said("price_unknown", where=where, kind=kind, kinds=", ".join(PRICE_KINDS)))
            elif not _is_number(price) or price < 0:
                problems.append(Said("price_negative", where=where, kind=kind))


class Pricing:
    """config.json's Pricing: prices per million tokens for a model id or a glob, any case, in
    one currency. An exact id wins, else the matching glob with the most literal characters
    (the most specific one; on a tie, the first in the file). A provider's price_multiplier
    scales the price. A model without a price has no cost: never a guessed one."""

    def __init__(self, raw, providers):
        currency = raw.get("currency", "USD")
        self.currency = currency.strip() if isinstance(currency, str) else "USD"
        self.exact, self.globs = {}, []
        for glob, prices in (raw.get("models") or {}).items():
            if glob.startswith("_") or not isinstance(prices, dict):
                continue
            base = prices.get("input", 0)
            # Anthropic's own rule when a cache price is left out: reads 0.1x, writes 1.25x input.
            rates = (base, prices.get("output", 0), prices.get("cache_read", base * 0.1),
                     prices.get("cache_write", base * 1.25))
            if re.search(r"[*?\[]", glob):
                self.globs.append((-len(re.sub(r"[*?\[\]!]", "", glob)), glob.lower(), rates))
            else:
                self.exact[glob.lower()] = rates
        self.globs.sort(key=lambda entry: entry[0])        # stable: file order among equals
        self.multipliers = {name: p.price_multiplier for name, p in providers.items()}
        self.found = {}             # model -> rates or None, as looked up

    def rates(self, model):
        """(input, output, cache_read, cache_write) per million tokens, or None."""
        key = (model or "").lower()
        if key in self.found:
            return self.found[key]
        rates = self.exact.get(key)
        if rates is None:
            rates = next((r for _, glob, r in self.globs if fnmatch.fnmatchcase(key, glob)), None)
        if len(self.found) < MAX_MODELS:
            self.found[key] = rates
        return rates

    def rates_on(self, provider, model):
        """The model's rates on a provider (its price_multiplier applied), or None."""
        rates = self.rates(model)
        return None if rates is None else tuple(r * self.multipliers.get(provider, 1.0) for r in rates)

    def cost(self, provider, model, usage):
        """What a request's usage cost on provider, or None when the model has no price."""
        rates = self.rates_on(provider, model)
        if rates is None:
            return None
        tokens = (usage.get("input", 0), usage.get("output", 0), usage.get("cache_read", 0),
                  usage.get("cache_creation", 0))
        return sum(n * r for n, r in zip(tokens, rates)) / 1e6


def price(rec, pricing):
    """Set a record's cost (None: its model has no price) and currency."""
    cost = pricing.cost(rec["provider"], rec.get("model_sent") or rec.get("model"), rec["usage"])
    rec["cost"] = None if cost is None else round(cost, 8)
    rec["currency"] = pricing.currency


def hit_rate(cache_read, prompt):
    """The cache hit rate in percent: cache_read / (input + cache_read + cache_write)."""
    return round(100.0 * cache_read / prompt, 1) if prompt else None


def outcomes(rec):
    """(provider, model sent, failed, final) of each provider a record's request went to."""
    for attempt in rec["attempts"][:-1]:
        yield attempt[0], attempt[2] if len(attempt) > 2 else None, True, False
    if rec["provider"] is not None:
        failed = rec["status"] >= 400 or rec["status"] == 0 or bool(rec.get("midstream_error"))
        yield rec["provider"], rec.get("model_sent") or rec.get("model"), failed, True


class UsageStore:
    """Hourly roll-ups of the request records in one sqlite3 file beside the config (WAL mode):
    kept across restarts and request-log rotation, and shared by every ccproxy process on the
    host, each adding its own requests under the file's lock. Written by the recorder's thread,
    one transaction a batch, never on a request's path. Hours are the machine's local time."""

    SUMS = ("requests", "errors", "input", "output", "cache_read", "cache_write", "cost", "priced",
            "unpriced") + tuple("t%d" % i for i in range(len(USAGE_TTFB_MS) + 1))
    GROUPS = {"provider": "provider", "model": "model", "day": "substr(hour, 1, 10)", "hour": "hour",
              "key": "key_name"}

    retry_s = USAGE_RETRY_S         # after a failure, the store is left alone this long
    upsert = False                  # one writer at a time (the file's lock): update, else insert

    def __init__(self, path):
        self.path = path
        self.Error = sqlite3.Error
        self.conn = None            # the writer's connection (the recorder thread's)
        self.retry_at = 0.0
        self.pending = ({}, {}, {})     # usage, classes, conversations not yet written: kept, merged

    def connect(self):
        return open_store(self.path)

    @contextlib.contextmanager
    def transaction(self, conn):
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            yield

    @contextlib.contextmanager
    def reader(self):
        """A connection for one query (the page's, a status line's); an unreadable store is
        a StoreUnreadable that says why."""
        conn = None
        try:
            conn = self.connect()
            yield conn
        except self.Error as exc:
            raise StoreUnreadable(Said("usage_unreadable", reason=exc))
        finally:
            if conn is not None:
                conn.close()

    def failed(self, exc):
        log.error("%s: cannot add to the usage store (%s); the usage is kept here and added when it can be, "
                  "tried again in %d s", self.path, exc, self.retry_s)

    def written(self):
        pass

    def add_records(self, conn):
        """Within the batch's transaction: the records themselves, where a store keeps them."""

    def waiting(self):
        """Whether usage waits to be written (the recorder then tries again when idle)."""
        return bool(self.pending[0])

    @staticmethod
    def rows_of(rec):
        """((hour, provider, model, key name), sums) for each provider the record's request went to."""
        hour = time.strftime("%Y-%m-%d %H", time.localtime(rec["time"]))
        key = rec.get("key") or ""
        for provider, model, failed, final in outcomes(rec):
            sums = dict.fromkeys(UsageStore.SUMS, 0)
            sums["requests"], sums["errors"] = 1, int(failed)
            usage = rec.get("usage") if final else None
            if usage:
                sums.update(input=usage["input"], output=usage["output"], cache_read=usage["cache_read"],
                            cache_write=usage["cache_creation"])
                if rec.get("cost") is None:
                    sums["unpriced"] = 1
                else:
                    sums.update(cost=rec["cost"], priced=1)
            if final and rec.get("ttfb_ms") is not None:
                sums["t%d" % bisect.bisect_left(USAGE_TTFB_MS, rec["ttfb_ms"])] = 1
            yield (hour, provider, model or "-", key), sums

    def add(self, records):
        """Add a batch of records to what waits, and write all of it: one transaction. A
        failure is logged (once until it is written again), never raised, and what waits is
        kept for the next try."""
        rows = [(rec, list(self.rows_of(rec))) for rec in records]
        usage, kinds, talks = self.pending
        for rec, found in rows:
            for (hour, provider, model, key), sums in found:
                add_to(usage.setdefault((hour, provider, model, key), dict.fromkeys(self.SUMS, 0)), sums)
                # what each kind of request costs: (hour, class, provider)
                add_to(kinds.setdefault((hour, rec.get("class") or "", provider), dict.fromkeys(self.SUMS, 0)), sums)
        conversation_batch(rows, talks)
        if not usage or time.monotonic() < self.retry_at:
            if len(usage) + len(talks) > USAGE_PENDING_MAX:
                log.error("%s: %d groups of usage could not be written and are dropped", self.path, len(usage))
                self.pending = ({}, {}, {})
            return
        try:
            if self.conn is None:
                self.conn = self.connect()
            with self.transaction(self.conn):
                add_sums(self.conn, "usage", ("hour", "provider", "model", "key_name"), usage, self.upsert)
                add_sums(self.conn, "classes", ("hour", "class", "provider"), kinds, self.upsert)
                add_conversations(self.conn, talks, self.upsert)
                self.add_records(self.conn)
        except self.Error as exc:
            # Once a minute at most (a file) or every few seconds (the shared store): a
            # broken store must not fill the log, nor be asked at every batch.
            if not self.retry_at:
                self.failed(exc)
            self.retry_at = time.monotonic() + self.retry_s
            if self.conn is not None:
                with contextlib.suppress(self.Error):
                    self.conn.close()
                self.conn = None
            return
        self.pending, self.retry_at = ({}, {}, {}), 0.0
        self.written()

    def query(self, first_day, last_day, by):
        """[(group values, sums)] of the hours from first_day to last_day (YYYY-MM-DD), grouped;
        by class (and provider, day, hour) from the classes table."""
        table, groups = ("classes", CLASS_GROUPS) if "class" in by else ("usage", self.GROUPS)
        columns = [groups[b] for b in by]
        sql = "SELECT %s FROM %s WHERE hour BETWEEN ? AND ?" % (", ".join(
            columns + ["SUM(%s)" % c for c in self.SUMS]), table)
        if columns:
            sql += " GROUP BY %s ORDER BY %s" % (", ".join(columns), ", ".join(columns))
        with self.reader() as conn:
            found = conn.execute(sql, (first_day + " 00", last_day + " 23")).fetchall()
        return [(row[:len(by)], dict(zip(self.SUMS, row[len(by):]))) for row in found if row[len(by)]]


# /api/usage?by=class: Claude Code's request classes (hint headers), "" when a request had none.
CLASS_GROUPS = {"class": "class", "provider": "provider", "day": "substr(hour, 1, 10)", "hour": "hour"}


def add_to(total, sums):
    for column, value in sums.items():
        total[column] += value


class SharedUsage(UsageStore):
    """The usage roll-ups in the shared store: UsageStore's statements on PostgreSQL
    (SqlConnection), written by the recorder's thread in batches; while the store is away the
    batches wait here, merged, and are written when it is back (every STORE_RETRY_S)."""

    retry_s = STORE_RETRY_S
    upsert = True                   # several hosts may make the same new group at once

    def __init__(self, pg):
        super().__init__("STORE")
        self.pg = pg
        self.Error = pg.Error
        self.records = deque(maxlen=REQUEST_RING)      # records not yet in the requests table

    def add(self, records):
        for rec in records:         # which host answered: the Requests panel lists every host's
            rec["host"] = self.pg.host_name
        self.records.extend(records)
        super().add(records)

    def add_records(self, conn):
        """The request records, for every host's Requests panel: the newest REQUEST_RING."""
        if not self.records:
            return
        with conn.conn.cursor() as cursor:
            cursor.executemany("INSERT INTO requests (at, key_name, providers, body) VALUES (%s, %s, %s, %s)", [
                (rec["time"], rec.get("key") or "", [a[0] for a in rec.get("attempts", [])[:-1]] + [rec["provider"] or ""],
                 json.dumps(rec, ensure_ascii=False)) for rec in self.records])
        conn.execute("DELETE FROM requests WHERE id <= (SELECT max(id) FROM requests) - ?", (REQUEST_RING,))

    def written(self):
        self.records.clear()
        self.pg.reached()

    def newest(self, limit, provider=None, key=None):
        """The newest records of every host, newest first (of one provider, or one user key);
        None when the store cannot be read (this host's own are shown then)."""
        if not self.pg.usable():
            return None
        try:
            with self.pg.borrowed() as conn:
                found = conn.execute("SELECT body FROM requests WHERE (%s::text IS NULL OR %s = ANY(providers)) AND "
                                     "(%s::text IS NULL OR key_name = %s) ORDER BY at DESC LIMIT %s",
                                     (provider, provider, key, key, limit)).fetchall()
        except self.Error as exc:
            self.pg.failed(exc)
            return None
        return [json.loads(body) for body, in found]

    def connect(self):
        return SqlConnection(self.pg.connect())

    def transaction(self, conn):
        return conn.conn.transaction()

    @contextlib.contextmanager
    def reader(self):
        if not self.pg.usable():
            raise StoreUnreadable(Said("usage_unreadable", reason=self.pg.down[1]))
        try:
            with self.pg.borrowed() as conn:
                yield SqlConnection(conn)
        except self.Error as exc:
            self.pg.failed(exc)
            raise StoreUnreadable(Said("usage_unreadable", reason=self.pg.down[1] if self.pg.down else exc))

    def failed(self, exc):
        self.pg.failed(exc)


def store_metrics_lines(pg, usage):
    """/metrics with STORE: whether the store answers, and the usage groups waiting for it."""
    return ["# HELP ccproxy_store_up Whether the shared store (STORE) answered its last use.",
            "# TYPE ccproxy_store_up gauge", "ccproxy_store_up %d" % (pg.down is None),
            "# HELP ccproxy_store_waiting_usage Usage groups kept on this host until the store takes them.",
            "# TYPE ccproxy_store_waiting_usage gauge", "ccproxy_store_waiting_usage %d" % len(usage.pending[0])]


class SqlConnection:
    """A psycopg connection that runs UsageStore's statements as they are written for sqlite3:
    ? placeholders (none of them has a % or a ? of its own)."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def close(self):
        self.conn.close()


def add_sums(conn, table, columns, batch, upsert=False):
    """Add each group's SUMS of batch ({values of columns: sums}) to its row of table, made if
    new; within the caller's transaction. upsert: in one statement, as several hosts writing
    the same new group at once need (sqlite's store has one writer at a time, and a sqlite
    older than 3.24 has no upsert)."""
    if upsert:
        adding = ", ".join("%s = %s.%s + excluded.%s" % (c, table, c, c) for c in UsageStore.SUMS)
        for group, sums in batch.items():
            conn.execute("INSERT INTO %s (%s, %s) VALUES (%s) ON CONFLICT (%s) DO UPDATE SET %s" % (
                table, ", ".join(columns), ", ".join(UsageStore.SUMS), ", ".join("?" * (len(columns) + len(sums))),
                ", ".join(columns), adding), list(group) + [sums[c] for c in UsageStore.SUMS])
        return
    adding = ", ".join("%s = %s + ?" % (c, c) for c in UsageStore.SUMS)
    where = " AND ".join("%s = ?" % c for c in columns)
    for group, sums in batch.items():
        values = [sums[c] for c in UsageStore.SUMS]
        if not conn.execute("UPDATE %s SET %s WHERE %s" % (table, adding, where), values + list(group)).rowcount:
            conn.execute("INSERT INTO %s (%s, %s) VALUES (%s)" % (
                table, ", ".join(columns), ", ".join(UsageStore.SUMS), ", ".join("?" * (len(columns) + len(values)))),
                list(group) + values)


def open_store(path, check_same_thread=True):
    """A connection to the usage store (WAL mode: readers never wait for the writer, and
    several processes share it), its table of hourly roll-ups made if new."""
    # Made here, at mode 0600, rather than by sqlite at the umask's: sqlite gives the -wal and
    # -shm files it makes beside it the database file's permissions.
    os.close(open_private(path, os.O_RDWR))
    for companion in ("-wal", "-shm"):
        narrow(path + companion)
    conn = sqlite3.connect(path, timeout=SQLITE_BUSY_MS / 1000.0, isolation_level=None,
                           check_same_thread=check_same_thread)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA cache_size=-256")          # KiB: the roll-ups are small, memory is not
    sums = ", ".join("%s %s NOT NULL DEFAULT 0" % (c, "REAL" if c == "cost" else "INTEGER") for c in UsageStore.SUMS)
    conn.execute("CREATE TABLE IF NOT EXISTS usage (hour TEXT NOT NULL, provider TEXT NOT NULL, "
                 "model TEXT NOT NULL, key_name TEXT NOT NULL DEFAULT '', %s, "
                 "PRIMARY KEY (hour, provider, model, key_name))" % sums)
    conn.execute("CREATE INDEX IF NOT EXISTS usage_by_key ON usage (key_name, hour)")
    # A conversation's figures per relay (add_conversations): a table of its own, so a store
    # made by an older ccproxy gains it as it is opened.
    conn.execute("CREATE TABLE IF NOT EXISTS conversations (session TEXT NOT NULL, provider TEXT NOT NULL, "
                 "key_name TEXT NOT NULL DEFAULT '', first_seen REAL NOT NULL, last_seen REAL NOT NULL, "
                 "model TEXT NOT NULL DEFAULT '', %s, PRIMARY KEY (session, provider))" % sums)
    conn.execute("CREATE INDEX IF NOT EXISTS conversations_by_time ON conversations (last_seen)")
    # Each kind of request (Claude Code's request class) per hour and relay: also a table of its own.
    conn.execute("CREATE TABLE IF NOT EXISTS classes (hour TEXT NOT NULL, class TEXT NOT NULL, "
                 "provider TEXT NOT NULL, %s, PRIMARY KEY (hour, class, provider))" % sums)
    return conn


def ttfb_quantile(sums, q):
    """The TTFB under which a share q of the requests got their first byte, to the bucket's
    upper bound (USAGE_TTFB_MS; past the last, its value)."""
    counts = [sums["t%d" % i] or 0 for i in range(len(USAGE_TTFB_MS) + 1)]
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for bound, count in zip(USAGE_TTFB_MS + (USAGE_TTFB_MS[-1],), counts):
        seen += count
        if seen >= q * total:
            return bound
    return USAGE_TTFB_MS[-1]


def usage_row(sums, currency):
    """The figures /api/usage gives for one group of roll-ups."""
    prompt = sums["input"] + sums["cache_read"] + sums["cache_write"]
    return {"requests": sums["requests"], "errors": sums["errors"], "input": sums["input"],
            "output": sums["output"], "cache_read": sums["cache_read"], "cache_write": sums["cache_write"],
            "hit_rate_pct": hit_rate(sums["cache_read"], prompt),
            "cost": None if sums["unpriced"] and not sums["priced"] else round(sums["cost"] or 0.0, 6),
            "unpriced": sums["unpriced"], "currency": currency,
            "ttfb_p50_ms": ttfb_quantile(sums, 0.5), "ttfb_p95_ms": ttfb_quantile(sums, 0.95)}


def usage_report(store, currency, query):
    """/api/usage's answer for its query parameters: rows grouped as ?by= says, and the total."""
    def one(name, default):
        return query.get(name, [default])[0]
    try:
        last = datetime.date.fromisoformat(one("to", datetime.date.today().isoformat()))
        first = datetime.date.fromisoformat(one("from", (last - datetime.timedelta(days=6)).isoformat()))
    except ValueError:
        raise ClientError(Said("usage_dates"))
    if first > last or (last - first).days >= USAGE_MAX_DAYS:
        raise ClientError(Said("usage_range", days=USAGE_MAX_DAYS))
    by = [b for b in one("by", "provider").split(",") if b]
    # by session: conversations; by class: the classes table
    groups = CONVERSATION_GROUPS if "session" in by else CLASS_GROUPS if "class" in by else UsageStore.GROUPS
    if not by or any(b not in groups for b in by) or len(set(by)) != len(by):
        raise ClientError(Said("usage_by", groups=", ".join(groups)))
    if store is None:
        raise NotFound(Said("usage_off"))
    found = conversation_sums(store, first, last, by) if "session" in by else \
        store.query(first.isoformat(), last.isoformat(), by)
    total = dict.fromkeys(UsageStore.SUMS, 0)
    for _, sums in found:
        for column in UsageStore.SUMS:
            total[column] += sums[column] or 0
    # key: null is the administrator's APIKEY
    rows = [dict(zip(by, [None if b in ("key", "class") and not v else v for b, v in zip(by, values)]), **usage_row(sums, currency))
            for values, sums in found]
    return {"from": first.isoformat(), "to": last.isoformat(), "by": by, "currency": currency,
            "rows": rows, "total": usage_row(total, currency)}


# The CSV's header row in Chinese (?lang=zh, the page's language); without it, the JSON's keys.
USAGE_CSV_ZH = {"provider": "供应商", "model": "模型", "day": "日期", "hour": "小时", "key": "密钥",
                "session": "对话", "class": "请求种类", "requests": "请求", "errors": "错误", "input": "输入",
                "output": "输出", "cache_read": "缓存读取", "cache_write": "缓存写入", "hit_rate_pct": "命中率 %",
                "cost": "费用", "unpriced": "无价格的请求", "currency": "币种", "ttfb_p50_ms": "首字节 中位数 ms",
                "ttfb_p95_ms": "首字节 p95 ms"}


def usage_csv(report, lang="en"):
    """The rows of a usage report as CSV for a spreadsheet: UTF-8 with a byte order mark, which
    is how Excel knows to read Chinese names as UTF-8; the header row in English (the JSON's
    keys) or, with lang "zh", in Chinese."""
    out = io.StringIO()
    columns = report["by"] + ["requests", "errors", "input", "output", "cache_read", "cache_write",
                              "hit_rate_pct", "cost", "unpriced", "currency", "ttfb_p50_ms", "ttfb_p95_ms"]
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([USAGE_CSV_ZH[c] for c in columns] if lang == "zh" else columns)
    for row in report["rows"]:
        # A cell that starts like a formula is read as text, not run: a name such as "=1+1".
        writer.writerow(["" if row[c] is None else "'" + row[c] if isinstance(row[c], str) and row[c][:1] in "=+-@"
                         else row[c] for c in columns])
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def switch_estimate(server, view):
    """What switching away from the selected provider now would cost: a conversation it answered
    within the prompt cache's lifetime is written to the new relay's cache in full on its next
    request. Its prompt tokens, and their cache-write price on each other provider (None: no price)."""
    found = server.recorder.cache_watch.active_context(view.selected, time.time())
    if found is None:
        return None
    model, tokens, age = found
    pricing, costs = view.config.pricing, {}
    for name, target in view.targets.items():
        if name != view.selected:
            sent = map_model(model, target.model_set, target.env_models) if view.config.model_mapping else model
            rates = pricing.rates(sent)
            costs[name] = None if rates is None else round(
                tokens * rates[3] * pricing.multipliers.get(name, 1.0) / 1e6, 6)
    return {"from": view.selected, "model": model, "tokens": tokens, "age_s": round(age),
            "currency": pricing.currency, "costs": costs}


def api_usage(handler, params):
    """Usage and cost over days from the usage store: JSON, or CSV with ?format=csv (&lang=zh:
    its header row in Chinese)."""
    query = handler.query_params()
    report = usage_report(handler.server.recorder.usage, handler.server.store.view.config.pricing.currency, query)
    if query.get("format", ["json"])[0] == "csv":
        handler.send_bytes(200, usage_csv(report, query.get("lang", ["en"])[0]), "text/csv; charset=utf-8",
                           [("Content-Disposition", 'attachment; filename="ccproxy-usage-%s-%s.csv"'
                             % (report["from"], report["to"])), ("Cache-Control", "no-store")])
        return None
    return 200, report


# ============================================================================ conversations
#
# Claude Code sends X-Claude-Code-Session-Id with every request of a conversation. The usage
# store keeps a conversation's figures per relay (the conversations table), so the page lists
# what each conversation cost, and Claude Code's status line says it as it goes.


def session_of(headers):
    """The conversation a request belongs to (its X-Claude-Code-Session-Id, printable, cut to
    SESSION_MAX), or None."""
    value = (headers.get("X-Claude-Code-Session-Id") or "").strip()
    return escape_unprintable(value)[:SESSION_MAX] or None


def conversation_batch(rows, batch):
    """Add a batch of records, each with its UsageStore.rows_of, to batch: {(conversation,
    provider): {"sums", "first", "last", "key", "model"}}."""
    for rec, found in rows:
        if not rec.get("session"):
            continue
        for (_, provider, model, key), sums in found:
            entry = batch.setdefault((rec["session"], provider), {"sums": dict.fromkeys(UsageStore.SUMS, 0),
                                                                  "first": rec["time"], "key": key})
            add_to(entry["sums"], sums)
            entry.update(last=rec["time"], model=model)
    return batch


def add_conversations(conn, batch, upsert=False):
    """Add a conversation_batch to the conversations table, within the caller's transaction
    (upsert: in one statement each, as add_sums)."""
    if upsert:
        adding = ", ".join("%s = conversations.%s + excluded.%s" % (c, c, c) for c in UsageStore.SUMS)
        for (session, provider), entry in batch.items():
            conn.execute("INSERT INTO conversations (session, provider, key_name, first_seen, last_seen, model, %s) "
                         "VALUES (?, ?, ?, ?, ?, ?, %s) ON CONFLICT (session, provider) DO UPDATE SET %s, "
                         "last_seen = CASE WHEN conversations.last_seen > excluded.last_seen THEN conversations.last_seen "
                         "ELSE excluded.last_seen END, model = excluded.model" % (
                             ", ".join(UsageStore.SUMS), ", ".join("?" * len(UsageStore.SUMS)), adding),
                         [session, provider, entry["key"], entry["first"], entry["last"], entry["model"]] +
                         [entry["sums"][c] for c in UsageStore.SUMS])
        return
    adding = ", ".join("%s = %s + ?" % (c, c) for c in UsageStore.SUMS)
    for (session, provider), entry in batch.items():
        values = [entry["sums"][c] for c in UsageStore.SUMS]
        if not conn.execute("UPDATE conversations SET %s, last_seen = CASE WHEN last_seen > ? THEN last_seen ELSE ? END, "
                            "model = ? WHERE session = ? AND provider = ?" % adding,
                            values + [entry["last"], entry["last"], entry["model"], session, provider]).rowcount:
            conn.execute("INSERT INTO conversations (session, provider, key_name, first_seen, last_seen, model, %s) "
                         "VALUES (?, ?, ?, ?, ?, ?, %s)" % (", ".join(UsageStore.SUMS), ", ".join("?" * len(UsageStore.SUMS))),
                         [session, provider, entry["key"], entry["first"], entry["last"], entry["model"]] + values)


def conversations(store, currency, limit=SESSIONS_LIMIT, key=None, session=None):
    """The newest conversations (or one), each with its relays and its figures (usage_row):
    [{"session", "first", "last", "relays", "key", "model", …}]."""
    with store.reader() as conn:
        where, args = [], []
        for column, value in (("key_name", key), ("session", session)):
            if value is not None:
                where.append("%s = ?" % column)
                args.append(value)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        sessions = [row[0] for row in conn.execute(
            "SELECT session FROM conversations%s GROUP BY session ORDER BY MAX(last_seen) DESC LIMIT ?" % clause,
            args + [limit])]
        rows = conn.execute("SELECT session, provider, key_name, first_seen, last_seen, model, %s FROM conversations "
                            "WHERE session IN (%s) ORDER BY last_seen" % (", ".join(UsageStore.SUMS), ", ".join("?" * len(sessions))),
                            sessions).fetchall() if sessions else []
    found = {s: {"session": s, "relays": [], "first": None, "last": None,
                 "sums": dict.fromkeys(UsageStore.SUMS, 0)} for s in sessions}
    for row in rows:
        entry = found[row[0]]
        entry["relays"].append(row[1])
        entry.update(key=row[2] or None, model=row[5], first=min(entry["first"] or row[3], row[3]), last=max(entry["last"] or 0, row[4]))
        for column, value in zip(UsageStore.SUMS, row[6:]):
            entry["sums"][column] += value or 0
    return [dict(usage_row(e.pop("sums"), currency), **e) for e in (found[s] for s in sessions)]


# /api/usage?by=session: what the conversations table can be grouped by.
CONVERSATION_GROUPS = {"session": "session", "provider": "provider", "key": "key_name"}


def conversation_sums(store, first, last, by):
    """[(group values, sums)] of the conversations last used from day first to day last, grouped
    by CONVERSATION_GROUPS, the most recent first."""
    columns = [CONVERSATION_GROUPS[b] for b in by]
    start = time.mktime(first.timetuple())
    end = time.mktime((last + datetime.timedelta(days=1)).timetuple())
    with store.reader() as conn:
        found = conn.execute("SELECT %s, %s FROM conversations WHERE last_seen >= ? AND last_seen < ? GROUP BY %s "
                             "ORDER BY MAX(last_seen) DESC" % (", ".join(columns), ", ".join("SUM(%s)" % c for c in UsageStore.SUMS),
                                                               ", ".join(columns)), (start, end)).fetchall()
    return [(row[:len(by)], dict(zip(UsageStore.SUMS, row[len(by):]))) for row in found]


def api_sessions(handler, params):
    """GET /api/sessions: the newest conversations (?limit=, at most SESSIONS_LIMIT)."""
    store = handler.server.recorder.usage
    if store is None:
        raise NotFound(Said("usage_off"))
    try:
        limit = max(1, min(SESSIONS_LIMIT, int(handler.query_params().get("limit", [SESSIONS_LIMIT])[0])))
    except ValueError:
        raise ClientError(Said("requests_limit"))
    found = conversations(store, handler.server.store.view.config.pricing.currency, limit)
    placed = handler.server.health.where(entry["session"] for entry in found)
    for entry in found:     # where its next request goes while its cache is warm, and why
        entry["now"] = placed.get(entry["session"])
    return 200, {"sessions": found}


# Claude Code's status line, in the language its command asked for.
STATUS_WORDS = {"en": {"conversation": "this chat %s", "today": "today %s", "balance": "%s left", "down": "ccproxy ?"},
                "zh": {"conversation": "本次 %s", "today": "今日 %s", "balance": "余额 %s", "down": "ccproxy ?"}}


def api_status_line(handler, params):
    """POST /api/status-line with the JSON Claude Code gives its status-line command: one line,
    the relay · this conversation's cost · today's · the relay's balance (a user key: its own
    today and its limits left). Only what ccproxy has at hand: it answers at once."""
    words = STATUS_WORDS.get(handler.query_params().get("lang", ["en"])[0], STATUS_WORDS["en"])
    try:
        body = handler.json_body()
    except ClientError:
        body = {}                   # a line still: what ccproxy knows without the conversation
    session = body.get("session_id") if isinstance(body, dict) else None
    server, view = handler.server, handler.server.store.view
    currency, user = view.config.pricing.currency, handler.user
    money = lambda v: "%s %s" % (amount_text(v), currency)            # noqa: E731
    store = server.recorder.usage
    found = conversations(store, currency, 1, session=str(session)[:SESSION_MAX]) if store and session else []
    # where its next request goes: the relay its cache is kept on, else the selection
    session = str(session)[:SESSION_MAX] if session else None
    relay = (server.health.where([session]).get(session) or {}).get("relay") or view.selected
    parts = [user.name if user else relay or "ccproxy"]
    if found and found[0]["cost"] is not None:
        parts.append(words["conversation"] % money(found[0]["cost"]))
    if user is not None:
        report = key_report(server, user, time.time())
        spent = report["used"].get("cost_per_day")
        limit = report.get("cost_per_day")
        if spent is not None:
            parts.append(words["today"] % (money(spent) + (" / " + amount_text(limit) if limit else "")))
    elif store is not None:
        day = time.strftime("%Y-%m-%d")
        today = store.query(day, day, [])         # no grouping: one row, or none before the first request
        cost = usage_row(today[0][1], currency)["cost"] if today else None
        if cost is not None:
            parts.append(words["today"] % money(cost))
        balance = server.balances.cached([relay]).get(relay) or {}
        if balance.get("remaining") is not None:
            parts.append(words["balance"] % " ".join(filter(None, (amount_text(balance["remaining"]), balance.get("unit")))))
    handler.send_bytes(200, (" · ".join(parts) + "\n").encode("utf-8"), "text/plain; charset=utf-8",
                       [("Cache-Control", "no-store")])
    return None


def amount_text(value):
    """An amount of money as a status line shows it: cents, or the digits a small one needs
    (a single request often costs a fraction of a cent)."""
    return "%.2f" % value if value >= 1 or value == 0 else "%.3f" % value if value >= 0.01 else "%.5f" % value


def status_line_settings(base_url, key, lang):
    """Claude Code's statusLine setting: a curl command (macOS, Linux, Windows 10+ have it) that
    gives ccproxy the status JSON on stdin and prints its line; a short mark when ccproxy is down."""
    command = ("curl -sf -m 2 --data-binary @- -H 'Content-Type: application/json' -H 'x-api-key: %s' "
               "'%s/api/status-line?lang=%s' || echo 'ccproxy ?'" % (key, base_url, lang))
    return {"statusLine": {"type": "command", "command": command, "padding": 0}}


# ============================================================================ balance


class BalanceRoute:
    """One way of asking a relay what is left, with the relay's key. answer() returns the
    balance found, or raises Unanswered: the relay has no such route (missing: ask it again
    only after a while), or refused the key there."""

    name = ""
    path = ""

    def __init__(self, provider, site):
        self.provider, self.site = provider, site

    def url(self):
        prefix = urllib.parse.urlsplit(self.provider.base_url).path.rstrip("/")
        return (prefix if self.path.startswith("/v1/") else "") + self.path     # /api/ is at the site's root

    def get(self, path=None, with_key=True):
        """The JSON object a route answers with, or Unanswered."""
        route = path or self.url()
        status, kind, raw = provider_get(self.provider, route, BALANCE_TIMEOUT_S, BALANCE_MAX_BYTES, with_key)
        if status in (401, 403):
            raise Unanswered(Said("balance_refused", route=route, status=status), False)
        if status != 200:
            raise Unanswered(Said("balance_no_route", route=route, status=status), status in (404, 405, 501))
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            page = "html" in kind or raw.lstrip()[:1] == b"<"
            raise Unanswered(Said("balance_no_route_page" if page else "balance_no_route_json", route=route), True)
        return obj

    def no_route(self):
        return Unanswered(Said("balance_no_route_json", route=self.url()), True)


class Unanswered(Exception):
    def __init__(self, reason, missing):
        super().__init__(reason)
        self.reason, self.missing = reason, missing


class NewAPISite:
    """How a NewAPI (or OneAPI) site shows money, from its public /api/status: quota units per
    unit of money (quota_per_unit, 500000 unless it says), and the display type — USD, CNY
    (× usd_exchange_rate), a CUSTOM currency, or TOKENS (raw quota); older builds say
    display_in_currency instead. Asked once per balance check, and only when a route needs it."""

    def __init__(self, provider):
        self.provider, self.found = provider, None

    def display(self):
        """(unit, quota units per unit, units per USD or None); unit None: the site does not say."""
        if self.found is None:
            self.found = self.ask()
        return self.found

    def ask(self):
        try:
            obj = BalanceRoute(self.provider, self).get("/api/status", with_key=False)
        except (Unanswered, *NETWORK_ERRORS):
            return None, NEWAPI_QUOTA_PER_UNIT, None
        data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
        per_unit = data.get("quota_per_unit")
        per_unit = per_unit if _is_number(per_unit) and per_unit > 0 else NEWAPI_QUOTA_PER_UNIT
        kind = str(data.get("quota_display_type") or "").upper()
        if not kind and isinstance(data.get("display_in_currency"), bool):
            kind = "USD" if data["display_in_currency"] else "TOKENS"
        rate = data.get("usd_exchange_rate")
        if kind == "CNY" and _is_number(rate) and rate > 0:
            return "CNY", per_unit / rate, rate
        custom = data.get("custom_currency_exchange_rate")
        if kind == "CUSTOM" and _is_number(custom) and custom > 0:
            return str(data.get("custom_currency_symbol") or "CUSTOM")[:16], per_unit / custom, custom
        if kind == "TOKENS":
            return "quota", 1, None
        return ("USD", per_unit, 1) if kind == "USD" else (None, per_unit, None)

    def money(self, quota):
        return round(quota / self.display()[1], 4) if _is_number(quota) else None


class NewAPIToken(BalanceRoute):
    """NewAPI's GET /api/usage/token: always this key's own figures, in raw quota units."""

    name, path = "newapi_token", "/api/usage/token"

    def answer(self):
        obj = self.get()
        data = obj.get("data")
        if not (isinstance(data, dict) and data.get("object") == "token_usage"):
            raise self.no_route()
        unit, _, rate = self.site.display()
        found = {"scope": "key", "unit": unit or "USD", "unit_guessed": unit is None, "usd_rate": rate,
                 "unlimited": bool(data.get("unlimited_quota"))}
        if not found["unlimited"]:
            found.update(remaining=self.site.money(data.get("total_available")),
                         limit=self.site.money(data.get("total_granted")), used=self.site.money(data.get("total_used")))
        return found


class NewAPICredits(BalanceRoute):
    """Newer NewAPI's GET /v1/credits: {"data": {"total_usage": what is left}} (misnamed), in the
    site's display unit."""

    name, path = "credits", "/v1/credits"

    def answer(self):
        data = self.get().get("data")
        left = data.get("total_usage") if isinstance(data, dict) else None
        if not _is_number(left):
            raise self.no_route()
        unit, _, rate = self.site.display()
        return {"scope": "account", "unit": unit, "usd_rate": rate, "remaining": round(left, 4)}


class Sub2APIUsage(BalanceRoute):
    """sub2api's GET /v1/usage: a key with its own quota (quota_limited: limit, used, left), or
    one drawing on a subscription or a wallet (unrestricted: what is left, its plan)."""

    name, path = "sub2api", "/v1/usage"

    def answer(self):
        obj = self.get()
        if obj.get("isValid") is False:
            raise Unanswered(Said("balance_refused", route=self.url(), status=200), False)
        if obj.get("isValid") is not True or obj.get("mode") not in ("quota_limited", "unrestricted"):
            raise self.no_route()
        quota = obj.get("quota") if isinstance(obj.get("quota"), dict) else {}
        if obj["mode"] == "quota_limited" and _is_number(quota.get("remaining")):
            return {"scope": "key", "unit": str(quota.get("unit") or obj.get("unit") or "") or None,
                    "remaining": quota["remaining"], "limit": quota.get("limit"), "used": quota.get("used")}
        if not _is_number(obj.get("remaining")):
            raise self.no_route()
        return {"scope": "account", "unit": str(obj.get("unit") or "") or None, "remaining": obj["remaining"],
                "plan": str(obj.get("planName") or "")[:60] or None}


class BillingPair(BalanceRoute):
    """The OpenAI-style pair NewAPI, OneAPI and their kin answer: subscription's hard_limit_usd
    is the limit, usage's total_usage (in cents) what is used — both in the site's display unit
    (dollars, yuan or raw quota, despite the names), and for the whole account unless the site
    counts per key."""

    name, path = "billing", "/v1/dashboard/billing/subscription"

    def answer(self):
        sub = self.get()
        if not _is_number(sub.get("hard_limit_usd")):
            raise Unanswered(Said("balance_no_limit"), True)
        try:
            usage = self.get(self.url().replace("/subscription", "/usage"))
        except Unanswered as exc:
            usage, reason = {}, exc.reason
        else:
            reason = Said("balance_no_usage")
        limit, cents = sub["hard_limit_usd"], usage.get("total_usage")
        used = round(cents / 100.0, 4) if _is_number(cents) else None
        unit, _, rate = self.site.display()
        if limit >= BALANCE_UNLIMITED:
            return {"scope": "account", "unit": unit, "usd_rate": rate, "unlimited": True}
        return {"scope": "account", "unit": unit, "usd_rate": rate, "limit": limit, "used": used,
                "remaining": None if used is None else round(limit - used, 4),
                "reason": None if used is not None else reason}


BALANCE_ROUTES = {route.name: route for route in (NewAPIToken, NewAPICredits, Sub2APIUsage, BillingPair)}


def fetch_balance(provider, first=None):
    """A relay's balance by the first of BALANCE_ROUTES that answers (the one that answered
    last time, `first`, is asked first; a provider's balance.route asks that one only): what
    is left in the relay's own unit, whether it is the key's or the account's. A relay with
    none of them is "not available", not an error. balance.unit overrides a unit guessed wrong."""
    options = provider.balance
    if options is False:
        return {"available": False, "reason": Said("balance_off"), "checked_at": None}
    if provider.placeholder_key:
        return {"available": False, "reason": PLACEHOLDER_REASON, "checked_at": None}
    now, site = time.time(), NewAPISite(provider)
    names = [options["route"]] if "route" in options else \
        sorted(BALANCE_ROUTES, key=lambda n: n != first)        # stable: the rest keep their order
    reason, missing = None, True
    for name in names:
        try:
            found = BALANCE_ROUTES[name](provider, site).answer()
        except Unanswered as exc:
            # a refusal says more than "no such route": keep the first one
            if reason is None or missing and not exc.missing:
                reason, missing = exc.reason, exc.missing
            continue
        except NETWORK_ERRORS as exc:
            return {"available": False, "reason": describe_network_error(exc), "checked_at": now}
        found = dict({"limit": None, "used": None, "remaining": None, "unlimited": False, "reason": None}, **found,
                     available=True, route=name, checked_at=now)
        if "unit" in options:
            found.update(unit=options["unit"], unit_guessed=False)
        return found
    if missing and len(names) > 1:
        reason = Said("balance_none", routes=", ".join(BALANCE_ROUTES[n].path for n in names))
    return {"available": False, "reason": reason, "checked_at": now, "missing": missing}


def balance_low(result, provider, config):
    """Whether a relay's balance is under its threshold, compared in the relay's own unit:
    its balance.low, else LOW_BALANCE (in Pricing's currency) — as it is when the units are
    the same (or the relay's is not known), converted when the relay says its rate to the
    dollar and Pricing is in dollars, not compared otherwise (raw quota, another currency)."""
    left = result.get("remaining")
    if left is None:
        return False
    if provider.balance and "low" in provider.balance:
        return left < provider.balance["low"]
    threshold, unit = config.low_balance, result.get("unit")
    if not threshold:
        return False
    if unit is None or unit == config.pricing.currency:
        return left < threshold
    if config.pricing.currency == "USD" and result.get("usd_rate"):
        return left < threshold * result["usd_rate"]
    return False


class Balances:
    """The relays' balances, each fetched at most every BALANCE_TTL_S (a relay without any
    balance route: every BALANCE_MISSING_TTL_S), several at once; the route that answered is
    remembered per relay and asked first next time."""

    share = None        # with STORE: callable(kind, payload) that tells the other hosts (Postgres.publish)

    def __init__(self):
        self.lock = threading.Lock()
        self.known = {}             # provider name -> (monotonic time it expires, result)
        self.routes = {}            # provider name -> the route that answered

    def get(self, providers, refresh=False):
        now = time.monotonic()
        stale = [p for p in providers if refresh or self.known.get(p.name, (0,))[0] <= now]
        if stale:
            with concurrent.futures.ThreadPoolExecutor(min(REFRESH_WORKERS, len(stale))) as executor:
                results = list(executor.map(lambda p: fetch_balance(p, self.routes.get(p.name)), stale))
            with self.lock:
                for provider, result in zip(stale, results):
                    ttl = BALANCE_MISSING_TTL_S if result.pop("missing", False) else BALANCE_TTL_S
                    result["why"] = result["reason"] and why(result["reason"])
                    if result.get("route"):
                        self.routes[provider.name] = result["route"]
                    self.known[provider.name] = (now + ttl, result)
            if self.share is not None:
                for provider, result in zip(stale, results):
                    self.share("balance", {"name": provider.name, "ttl": self.known[provider.name][0] - now,
                                           "result": result})
        return self.cached([p.name for p in providers])

    def heard(self, message):
        """Another host's answer from a relay: kept as if fetched here (fetched once for all)."""
        if message is None or not isinstance(message.get("name"), str) or not isinstance(message.get("result"), dict):
            return
        ttl = message.get("ttl")
        if not _is_number(ttl):
            return
        result = message["result"]
        with self.lock:
            if result.get("route"):
                self.routes[message["name"]] = result["route"]
            self.known[message["name"]] = (time.monotonic() + min(ttl, BALANCE_MISSING_TTL_S), result)


    def cached(self, names):
        with self.lock:
            return {n: self.known[n][1] for n in names if n in self.known}

    def low(self, targets, config):
        """The providers (of targets: name -> Target) whose known balance is low (balance_low)."""
        with self.lock:
            return frozenset(n for n, (_, r) in self.known.items()
                             if n in targets and balance_low(r, targets[n].provider, config))

    def metrics_lines(self):
        with self.lock:
            known = {n: r for n, (_, r) in self.known.items() if r.get("remaining") is not None}
        out = ["# HELP ccproxy_balance_remaining What a relay says is left, in its own unit.",
               "# TYPE ccproxy_balance_remaining gauge"]
        return out + ['ccproxy_balance_remaining{provider="%s",unit="%s",scope="%s"} %s'
                      % (_label(n), _label(r["unit"] or "unknown"), r.get("scope", "account"), r["remaining"])
                      for n, r in sorted(known.items())]


def api_balance(handler, params):
    """Every provider's balance (or why it is not available), asked of the relays that have not
    been asked within BALANCE_TTL_S; ?refresh=1 asks them all now."""
    query = handler.query_params()
    refresh = query.get("refresh", ["0"])[0] in ("1", "true", "yes")
    view = handler.server.store.view
    names = [p.name for p in view.config.providers if p.usable]
    if "provider" in query:
        handler.server.store.require(query["provider"][0])
        names = [query["provider"][0]]
    return 200, {"balances": handler.server.check_balances(names, refresh),
                 "low_balance": view.config.low_balance, "low": sorted(handler.server.health.low_balance)}


# ============================================================================ team keys
#
# The APIKEY is the administrator's: the web page and every /api/ route. Keys (config.json)
# are the users': each relays (/v1/...) and reads its own usage (/api/me), nothing else. A
# key's secret is kept only as its SHA-256, which is enough for a long random secret.


class UserKey:
    """One entry of Keys, validated: who may relay with which secret, until when, to which
    providers and models, within which limits (None: no limit)."""

    __slots__ = KEY_FIELDS + ("expires_at",)

    def __init__(self, entry):
        for field in KEY_FIELDS:
            setattr(self, field, entry.get(field))
        self.enabled = entry.get("enabled", True)
        # "expires": "2026-12-31" keeps the key working to the end of that day, local time.
        self.expires_at = None
        if self.expires:
            day = datetime.date.fromisoformat(self.expires) + datetime.timedelta(days=1)
            self.expires_at = time.mktime(day.timetuple())

    @property
    def limited(self):
        return any(getattr(self, limit) for limit in KEY_LIMITS)

    def summary(self):
        """The key as the page and /api/me show it: everything but its hash."""
        return {field: getattr(self, field) for field in KEY_FIELDS if field != "sha256"}


def key_sha256(secret):
    """The SHA-256 of a key as Keys stores it: key_digest's, in hex."""
    return key_digest(secret).hex()


def new_user_secret():
    return USER_KEY_PREFIX + secrets.token_urlsafe(32)


def _check_keys(value, providers, usage_db, problems):
    if not isinstance(value, list):
        problems.append(Said("keys_type"))
        return []
    names, hashes, keys = set(), set(), []
    known = {p.name for p in providers if p.usable}
    for index, entry in enumerate(value):
        where = "Keys[%d]" % index
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            problems.append(Said("key_no_name", where=where))
            continue
        _check_name(entry["name"], where + ".name", problems)
        where = "Keys[%d] (%s)" % (index, escape_unprintable(entry["name"]))
        count = len(problems)
        if entry["name"] in names:
            problems.append(Said("key_name_taken", where=where))
        names.add(entry["name"])
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            problems.append(Said("key_sha256", where=where))
        elif digest in hashes:
            problems.append(Said("key_same_secret", where=where))
        hashes.add(digest)
        for field in entry:
            if field not in KEY_FIELDS and not field.startswith("_"):
                problems.append(Said("key_field_unknown", where=where, field=field, fields=", ".join(KEY_FIELDS)))
        if not isinstance(entry.get("enabled", True), bool):
            problems.append(Said("not_bool", key=where + ".enabled"))
        expires = entry.get("expires")
        try:
            if expires is not None:
                datetime.date.fromisoformat(expires)
        except (TypeError, ValueError):
            problems.append(Said("key_expires", where=where))
        allowed = entry.get("providers")
        if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(n, str) for n in allowed)):
            problems.append(Said("key_providers_type", where=where))
        elif allowed:
            problems.extend(Said("key_provider_unknown", where=where, name=n) for n in allowed if n not in known)
        globs = entry.get("models")
        if globs is not None and (not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs)):
            problems.append(Said("key_models_type", where=where))
        for limit in KEY_LIMITS:
            amount = entry.get(limit)
            if amount is not None and (not _is_number(amount) or amount <= 0 or
                                       (limit in ("rpm", "tokens_per_day") and amount != int(amount))):
                problems.append(Said("key_limit" if limit.startswith("cost") else "key_limit_whole", where=where, limit=limit))
        if len(problems) == count:
            keys.append(UserKey(entry))
    if any(k.limited for k in keys) and not usage_db:
        problems.append(Said("keys_need_usage_db"))
    return keys


def permitted(user, view, chain, body):
    """The providers of chain this user key may use, for the model the request asks for (an
    alias's real model); a 403 that says what the key allows if nothing is left. A list left
    out (null) allows all; an empty one, none."""
    model = requested_model(body) if user.models is not None else None
    if model is not None:
        model = view.aliases.get(model, (None, model))[1]
        if not any(fnmatch.fnmatchcase(model.lower(), glob.lower()) for glob in user.models):
            raise Forbidden(Said("key_models_refused", name=user.name, models=", ".join(user.models) or "-", model=model))
    if user.providers is None:
        return chain
    allowed = [t for t in chain if t.name in user.providers]
    if not allowed:
        raise Forbidden(Said("key_providers_refused", name=user.name, providers=", ".join(user.providers) or "-"))
    return allowed


def visible_models(user, view):
    """The ids of /v1/models a user key may use: the selected provider's and the aliases of
    its providers, whose real model its globs allow."""
    def allowed(model_id):
        name, model = view.aliases.get(model_id, (view.selected, model_id))
        return (user.providers is None or name in user.providers) and \
            (user.models is None or any(fnmatch.fnmatchcase(model.lower(), g.lower()) for g in user.models))
    return [m for m in view.model_ids if allowed(m)]


def seconds_until(now, days=0, months=0):
    """Seconds from now to the next local midnight (days=1) or the first of the next month."""
    today = datetime.date.fromtimestamp(now)
    if months:
        day = datetime.date(today.year + today.month // 12, today.month % 12 + 1, 1)
    else:
        day = today + datetime.timedelta(days=days)
    return time.mktime(day.timetuple()) - now


class Limits:
    """Per-key limits, counted where every ccproxy process on the host shares them. Requests
    per minute exactly, in fixed minutes, in a file beside the usage store. Tokens and cost
    per day and month from the usage roll-ups, which the recorder adds a moment after each
    answer; a process re-reads a key's totals every KEY_TOTALS_S, and counts its own answers
    in them at once (spent)."""

    def __init__(self, path):
        self.path = path
        self.Error = sqlite3.Error
        self.idle = queue.SimpleQueue()     # sqlite connections not in use, any thread's
        self.lock = threading.Lock()
        self.totals = {}                    # key name -> (read at, day, month, tokens today, cost today, cost this month)
        self.fd = None                      # the file of this minute's request counts (count_request)
        self.size = 0                       # of its content, as last read
        self.minute = (None, "")            # (minutes since the epoch, its local "YYYY-MM-DD HH:MM")

    def admit(self, user, now):
        if user.rpm:
            self.count_request(user, now)
        if user.tokens_per_day or user.cost_per_day or user.cost_per_month:
            _, _, _, tokens, cost_day, cost_month = self.used(user.name, now)
            reached = ((user.tokens_per_day, tokens, "key_tokens_day", 1, 0),
                       (user.cost_per_day, cost_day, "key_cost_day", 1, 0),
                       (user.cost_per_month, cost_month, "key_cost_month", 0, 1))
            for limit, used, code, days, months in reached:
                if limit and used >= limit:
                    wait = seconds_until(now, days, months)
                    raise KeyLimitReached(Said(code, name=user.name, limit=limit, wait=describe_wait(wait)), wait)

    @contextlib.contextmanager
    def reader(self):
        """A connection to the usage store for one read, kept for the next."""
        try:
            conn = self.idle.get_nowait()
        except queue.Empty:
            conn = open_store(self.path, check_same_thread=False)
        try:
            yield conn
        except sqlite3.Error:
            conn.close()
            raise
        self.idle.put(conn)

    def unreadable(self, exc, name, found, now, day, month):
        """The totals when the store cannot be read: none (503)."""
        raise Unavailable(Said("usage_unreadable", reason=exc))

    def count_request(self, user, now):
        """Count a request of the key in the current minute (fixed minutes), or refuse it: in a
        small file beside the usage store that every process reads and rewrites under an
        flock (a few system calls: a sqlite transaction here would wait on the recorder's)."""
        minute, wait = self.minute_of(now), 60 - int(now % 60)     # the next minute frees it
        with self.lock:
            counts = self.minutes(write=True)
            try:
                entry = counts.get(user.name)
                count = entry[1] if isinstance(entry, list) and entry[:1] == [minute] else 0
                if count >= user.rpm:
                    raise RateLimited(Said("key_rpm", name=user.name, rpm=user.rpm, wait=describe_wait(wait)), wait)
                counts = {k: v for k, v in counts.items() if isinstance(v, list) and v[:1] == [minute]}
                counts[user.name] = [minute, count + 1]
                self.save_minutes(counts)
            finally:
                self.unlock_minutes()

    def minute_of(self, now):
        """"YYYY-MM-DD HH:MM", local time; the same for a whole minute (time zones are whole
        minutes from UTC), so it is made once a minute."""
        if int(now // 60) != self.minute[0]:
            self.minute = (int(now // 60), time.strftime("%Y-%m-%d %H:%M", time.localtime(now)))
        return self.minute[1]

    def minutes(self, write=False):
        """The per-key counts of the current minute, locked (flock) until unlock_minutes()."""
        if self.fd is None:
            self.fd = open_private(self.path + ".minutes", os.O_RDWR)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        try:
            data = os.pread(self.fd, 1 << 20, 0)
        except AttributeError:          # Windows: no pread
            os.lseek(self.fd, 0, os.SEEK_SET)
            data = os.read(self.fd, 1 << 20)
        try:
            counts = json.loads(data or b"{}")
        except ValueError:
            counts = {}                 # cut by a crash: the minute's counts start again
        self.size = len(data)
        return counts if isinstance(counts, dict) else {}

    def save_minutes(self, counts):
        # Padded with spaces to the length it had (JSON allows them): no truncate to make.
        data = json.dumps(counts, ensure_ascii=False).encode("utf-8").ljust(self.size)
        try:
            os.pwrite(self.fd, data, 0)
        except AttributeError:
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, data)

    def unlock_minutes(self):
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def used(self, name, now, fresh=False):
        """(read at, day, month, tokens today, cost today, cost this month) of a key."""
        day, month = time.strftime("%Y-%m-%d", time.localtime(now)), time.strftime("%Y-%m", time.localtime(now))
        found = self.totals.get(name)
        if not fresh and found and found[1] == day and now - found[0] < KEY_TOTALS_S:
            return found
        try:
            with self.reader() as conn:
                today = conn.execute("SELECT SUM(input + output + cache_read + cache_write), SUM(cost) FROM usage "
                                     "WHERE key_name = ? AND hour BETWEEN ? AND ?", (name, day + " 00", day + " 23")).fetchone()
                this_month = conn.execute("SELECT SUM(cost) FROM usage WHERE key_name = ? AND hour BETWEEN ? AND ?",
                                          (name, month + "-01 00", month + "-31 23")).fetchone()
        except self.Error as exc:
            return self.unreadable(exc, name, found, now, day, month)
        found = (now, day, month, today[0] or 0, today[1] or 0.0, this_month[0] or 0.0)
        with self.lock:
            self.totals[name] = found
        return found

    def spent(self, rec, pricing):
        """Count a key's answered request in this process's totals at once (the usage store
        has it a moment later): the key's next request is judged with it."""
        if rec.get("usage") and rec["provider"] is not None:
            price(rec, pricing)
            with self.lock:
                found = self.totals.get(rec["key"])
                if found is not None:
                    tokens = sum(rec["usage"].values())
                    cost = rec["cost"] or 0.0
                    self.totals[rec["key"]] = found[:3] + (found[3] + tokens, found[4] + cost, found[5] + cost)

    def minute_count(self, name, now):
        with self.lock:
            minute = self.minute_of(now)
            try:
                entry = self.minutes().get(name)
            finally:
                self.unlock_minutes()
        return entry[1] if isinstance(entry, list) and entry[:1] == [minute] else 0


class SharedLimits(Limits):
    """The key limits of several hosts, counted in the shared store: a request per minute is
    one statement (count it unless the minute is full), so a key's rpm holds across all hosts;
    its day and month from the shared usage. While the store is away each host counts in its
    own file (Limits) and judges by the totals it had, and says so (Postgres.failed)."""

    def __init__(self, pg, path):
        super().__init__(path)
        self.pg = pg
        self.Error = pg.Error

    def count_request(self, user, now):
        minute = int(now // 60)             # the same minute on every host: UTC, whole minutes
        if not self.pg.usable():
            return super().count_request(user, now)
        try:
            with self.pg.borrowed() as conn:
                # Old minutes go in the same round trip: the table holds a minute or two of keys.
                row = conn.execute(
                    "WITH gone AS (DELETE FROM minutes WHERE minute < %s) "
                    "INSERT INTO minutes (key_name, minute, count) VALUES (%s, %s, 1) ON CONFLICT (key_name, minute) "
                    "DO UPDATE SET count = minutes.count + 1 WHERE minutes.count < %s RETURNING count",
                    (minute - 1, user.name, minute, user.rpm)).fetchone()
        except self.Error as exc:
            self.pg.failed(exc)
            return super().count_request(user, now)
        self.pg.reached()
        if row is None:
            wait = 60 - int(now % 60)
            raise RateLimited(Said("key_rpm", name=user.name, rpm=user.rpm, wait=describe_wait(wait)), wait)

    def minute_count(self, name, now):
        if not self.pg.usable():
            return super().minute_count(name, now)
        try:
            with self.pg.borrowed() as conn:
                row = conn.execute("SELECT count FROM minutes WHERE key_name = %s AND minute = %s",
                                   (name, int(now // 60))).fetchone()
        except self.Error as exc:
            self.pg.failed(exc)
            return super().minute_count(name, now)
        return row[0] if row else 0

    @contextlib.contextmanager
    def reader(self):
        if not self.pg.usable():
            raise self.Error("the store is unreachable (%s)" % self.pg.down[1])
        with self.pg.borrowed() as conn:
            yield SqlConnection(conn)

    def unreadable(self, exc, name, found, now, day, month):
        """The totals this host had (with what it counted since), while the store is away;
        asked of the store again after KEY_TOTALS_S."""
        self.pg.failed(exc)
        if found is None or found[1] != day:
            found = (now, day, month, 0, 0.0, 0.0 if found is None or found[2] != month else found[5])
        found = (now,) + tuple(found[1:])
        with self.lock:
            self.totals[name] = found
        return found


def describe_wait(seconds):
    if seconds < 120:
        return "%d s" % math.ceil(seconds)
    if seconds < 7200:
        return "%d min" % math.ceil(seconds / 60)
    return "%.1f h" % (seconds / 3600)


def key_report(server, user, now):
    """What a key may do, what it has used and what is left: /api/me, and the page's Keys list."""
    limits = server.limits
    out = dict(user.summary(), currency=server.store.view.config.pricing.currency, used={}, left={})
    if limits is None:
        return out
    _, _, _, tokens, cost_day, cost_month = limits.used(user.name, now, fresh=True)
    used = {"rpm": limits.minute_count(user.name, now), "tokens_per_day": tokens,
            "cost_per_day": round(cost_day, 6), "cost_per_month": round(cost_month, 6)}
    out["used"] = used
    out["left"] = {k: (None if getattr(user, k) is None or used[k] is None
                       else max(0, round(getattr(user, k) - used[k], 6))) for k in KEY_LIMITS}
    return out


def api_me(handler, params):
    """A user key's own page: its limits, what is left, its recent requests (never its secret)."""
    user = handler.user
    if user is None:
        return 200, {"name": None, "admin": True}
    report = key_report(handler.server, user, time.time())
    report["recent"] = handler.server.recorder.request_log.newest(KEY_RECENT, key=user.name)
    return 200, report


def put_key(raw, name, fields, secret=None, create=False):
    """Create (create=True) or change key `name` in raw, in place: fields are merged into its
    entry (null removes one; another "name" renames it). A secret replaces its hash: the
    secret itself is never written."""
    if not isinstance(fields, dict):
        raise ClientError(Said("key_not_object"))
    for field in fields:
        if field not in KEY_FIELDS or field == "sha256":
            raise ClientError(Said("key_field_refused", field=field, fields=", ".join(f for f in KEY_FIELDS if f != "sha256")))
    keys = raw.setdefault("Keys", [])
    if not isinstance(keys, list):
        raise ClientError(Said("keys_not_list"))
    found = [k for k in keys if isinstance(k, dict) and k.get("name") == name]
    new_name = fields.get("name", name)
    if (create and found) or (new_name != name and any(isinstance(k, dict) and k.get("name") == new_name for k in keys)):
        raise Conflict(Said("key_name_exists", name=new_name))
    if not create and not found:
        raise NotFound(Said("no_key_named", name=name))
    entry = found[0] if found else {"name": name, "enabled": True}
    if not found:
        keys.append(entry)
    for field, value in fields.items():
        if value is None and field != "name":
            entry.pop(field, None)
        else:
            entry[field] = value
    if secret is not None:
        entry["sha256"] = key_sha256(secret)


def delete_key(raw, name):
    keys = raw.get("Keys")
    if not isinstance(keys, list) or not any(isinstance(k, dict) and k.get("name") == name for k in keys):
        raise NotFound(Said("no_key_named", name=name))
    raw["Keys"] = [k for k in keys if not (isinstance(k, dict) and k.get("name") == name)]


def api_keys(handler, params):
    now = time.time()
    config = handler.server.store.view.config
    return 200, {"keys": [key_report(handler.server, key, now) for key in config.keys],
                 "currency": config.pricing.currency, "limits_counted": handler.server.limits is not None}


def with_secret(handler, name, secret, change):
    """Save a change that gives key `name` a new secret; the answer shows the secret, once,
    with a settings.json for its user. Only its hash is kept."""
    status, result = edited(handler, change)
    config = handler.server.store.view.config
    result.update(name=name, key=secret, settings=claude_settings(handler.proxy_url(), secret,
                                                                  effective_env_models(config.env_models, {}),
                                                                  gateway=True))
    return status, result


def api_create_key(handler, params):
    fields = handler.json_body()
    name = _field(fields, "name")
    secret = new_user_secret()
    return with_secret(handler, name, secret, lambda raw: put_key(raw, name, fields, secret, create=True))


def api_put_key(handler, params):
    name = urllib.parse.unquote(params["name"])
    fields = handler.json_body()
    return edited(handler, lambda raw: put_key(raw, name, fields))


def api_rekey(handler, params):
    name = urllib.parse.unquote(params["name"])
    secret = new_user_secret()
    return with_secret(handler, name, secret, lambda raw: put_key(raw, name, {}, secret))


def api_delete_key(handler, params):
    name = urllib.parse.unquote(params["name"])
    return edited(handler, lambda raw: delete_key(raw, name))


# ============================================================================ health and failover


class Health:
    """Which providers are cooling down after a failure, which lack count_tokens, and which
    conversations need their thinking signatures stripped on which provider."""

    def __init__(self, clock=time.time):
        self.clock = clock            # wall-clock seconds: the web UI shows "until" times; injectable for tests
        self.lock = threading.Lock()
        self.cooling = {}             # name -> (until, reason)
        self.no_count_tokens = {}     # name -> until
        self.strip_for = {}           # (conversation, provider) -> when a signature strip helped
        self.gates = {}               # provider -> the last client-version gate it answered
        self.client_agent = None      # the last Claude Code User-Agent relayed (Check a relay sends it)
        self.low_balance = frozenset()  # providers under LOW_BALANCE, tried last (LOW_BALANCE_LAST)
        # (conversation, first choice) -> (relay that answered, why, when, cache lifetime, epoch)
        self.placements = {}
        self.epoch = 0                # a switch "now" moves every conversation: older placements lapse
        self.sizes = {}               # conversation -> (its prompt in tokens, its body in bytes), last answered
        self.firsts = {}              # provider -> deque of (when, first-content ms), for FALLBACK_ORDER fastest
        self.last_model = None        # the model of the last Messages request (the page's "order now")
        self.unsaved = {}             # provider -> fixes learned whose answer is still going out (Relay.learn)

    share = None        # with STORE: callable(kind, payload) that tells the other hosts (Postgres.publish)

    def cool_down(self, name, seconds, reason):
        until = self.clock() + min(seconds, MAX_COOLDOWN_S)
        with self.lock:
            self.cooling[name] = (until, reason)
        if self.share is not None:
            self.share("cool", {"name": name, "until": until, "reason": why(reason)})

    def recovered(self, name):
        if name in self.cooling:
            with self.lock:
                self.cooling.pop(name, None)
            if self.share is not None:
                self.share("recovered", {"name": name})

    def heard(self, message):
        """Another host's cooldown of a relay, or its recovery (the shared store's listener;
        None after a reconnection: cooldowns are short, nothing is read back)."""
        if message is None or not isinstance(message.get("name"), str):
            return
        name = message["name"]
        if message.get("kind") == "recovered":
            with self.lock:
                self.cooling.pop(name, None)
            return
        until, reason = message.get("until"), message.get("reason")
        if not _is_number(until) or not isinstance(reason, dict):
            return
        reason = SaidElsewhere(reason) if reason.get("code") in MESSAGES else str(reason.get("message", ""))
        with self.lock:
            if self.cooling.get(name, (0,))[0] < until:
                self.cooling[name] = (min(until, self.clock() + MAX_COOLDOWN_S), reason)
        log.info("provider %s cools down until %s: another host's failure (%s)", name,
                 time.strftime("%H:%M:%S", time.localtime(until)), reason)

    def is_cooling(self, name, now):
        entry = self.cooling.get(name)
        return entry is not None and entry[0] > now

    def snapshot(self):
        now = self.clock()
        with self.lock:
            return {n: {"until": u, "reason": r, "why": why(r)} for n, (u, r) in self.cooling.items() if u > now}

    def strips_signatures(self, session, name):
        """Whether this conversation needed its thinking signatures stripped on this provider."""
        when = self.strip_for.get((session, name))
        return when is not None and self.clock() - when < SESSION_MEMORY_S

    def remember_strip(self, session, name):
        with self.lock:
            prune(self.strip_for, SESSION_MEMORY_MAX)
            self.strip_for[(session, name)] = self.clock()

    def note_gate(self, name, model, gate, user_agent):
        """A provider answered "Claude Code X does not support this model; version Y or newer
        is required": kept for the page, and a warning in the log."""
        sent, required = gate
        self.gates[name] = {"model": model, "required": required, "sent": sent, "at": self.clock(),
                            "user_agent": user_agent}
        log.warning("provider %s: model %s needs Claude Code %s or newer (it was told %s) — update Claude "
                    "Code, or the User-Agent of a header preset", name, model, required, sent)

    def learning(self, name, fixes):
        with self.lock:
            self.unsaved[name] = tuple(self.unsaved.get(name, ())) + tuple(fixes)

    def learned(self, name, fixes):
        """The fixes are in the state file now (or could not be written): no longer kept here."""
        saved = {f.id for f in fixes}
        with self.lock:
            left = tuple(f for f in self.unsaved.get(name, ()) if f.id not in saved)
            if left:
                self.unsaved[name] = left
            else:
                self.unsaved.pop(name, None)

    def placed_on(self, conversation, first):
        """(relay, why, when, lifetime, epoch) of the conversation's last answer when its first
        choice was `first`, while the prompt cache there lasts; else None."""
        found = self.placements.get((conversation, first)) if conversation else None
        if found is None or found[4] != self.epoch or self.clock() - found[2] >= found[3]:
            return None
        return found

    def place(self, conversation, first, relay, why, lifetime):
        with self.lock:
            prune(self.placements, AFFINITY_MAX)
            self.placements[(conversation, first)] = (relay, why, self.clock(), lifetime, self.epoch)

    def switched(self, old, new, when_idle):
        """The selection moved from old to new. Now: every conversation follows at its next
        request. When idle: a conversation whose cache on old is warm stays there (as the first
        choice `new` would have been) until it has gone idle for the cache's lifetime."""
        with self.lock:
            if not when_idle:
                self.epoch += 1
                return 0
            now, kept = self.clock(), 0
            for (conversation, first), found in list(self.placements.items()):
                if first == old and found[0] == old and found[4] == self.epoch and now - found[2] < found[3]:
                    self.placements[(conversation, new)] = (old, "idle") + found[2:]
                    kept += 1
            return kept

    def where(self, conversations):
        """{conversation: {relay, why, until}} of each one's newest warm placement (one pass
        over the placements, however many conversations are asked about)."""
        now, wanted, found = self.clock(), set(conversations), {}
        for (name, _), entry in list(self.placements.items()):
            if name in wanted and entry[4] == self.epoch and now - entry[2] < entry[3] and \
                    (name not in found or entry[2] >= found[name][2]):
                found[name] = entry
        return {name: {"relay": e[0], "why": e[1], "until": e[2] + e[3]} for name, e in found.items()}

    def note_size(self, conversation, tokens, size):
        with self.lock:
            prune(self.sizes, AFFINITY_MAX)
            self.sizes[conversation] = (tokens, size)

    def tokens_of(self, conversation, size):
        """A request's size in tokens from its body_facts(): its conversation's last count and
        what it grew since, else its size alone (BYTES_PER_TOKEN: an underestimate)."""
        found = self.sizes.get(conversation) if conversation else None
        if found is None:
            return size // BYTES_PER_TOKEN
        return found[0] + max(0, size - found[1]) // BYTES_PER_TOKEN

    def note_first(self, name, ms):
        samples = self.firsts.get(name)
        if samples is None:
            samples = self.firsts.setdefault(name, deque(maxlen=TTFB_SAMPLES))
        samples.append((self.clock(), ms))

    def first_content_ms(self, name):
        """The median first-content time of the provider's requests within FASTEST_WINDOW_S, or
        None with fewer than FASTEST_MIN_SAMPLES."""
        since = self.clock() - FASTEST_WINDOW_S
        recent = sorted(ms for when, ms in list(self.firsts.get(name, ())) if when >= since)
        return recent[len(recent) // 2] if len(recent) >= FASTEST_MIN_SAMPLES else None

    def lacks_count_tokens(self, name):
        until = self.no_count_tokens.get(name)
        return until is not None and until > self.clock()

    def remember_no_count_tokens(self, name):
        with self.lock:
            self.no_count_tokens[name] = self.clock() + COUNT_TOKENS_MEMORY_S


def prune(memory, most):
    """Make room in a dict that remembers per conversation: its oldest half goes when it is full."""
    if len(memory) >= most:
        for key in list(memory)[:most // 2]:
            memory.pop(key, None)


# ============================================================================ Claude Code settings
#
# What ccproxy writes for Claude Code to read: the settings.json env that points it here, the
# managed settings that make its spend figures the relays' (modelPricing), and /model rows
# labelled by relay (modelPicker). Shapes as Claude Code 2.1.332 reads them.


def claude_settings(base_url, key, env_models, auth=None, gateway=False):
    """A Claude Code settings object ({"env": …}) that talks to base_url; empty values left out.

    A provider that wants x-api-key gets ANTHROPIC_API_KEY (sent as x-api-key), any other
    ANTHROPIC_AUTH_TOKEN (sent as Authorization: Bearer). gateway: the settings for ccproxy
    itself, with Claude Code's gateway model discovery on, so its /model lists every
    provider's models (their aliases), and its hint headers, so Routes can match a request's
    class (compaction, subagent…).
    """
    env = {"ANTHROPIC_BASE_URL": base_url,
           "ANTHROPIC_API_KEY" if auth == "x-api-key" else "ANTHROPIC_AUTH_TOKEN": key}
    if gateway:
        env["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] = "1"
        env["CLAUDE_CODE_GATEWAY_HINT_HEADERS"] = "1"
    env.update(env_models)
    return {"env": {k: v for k, v in env.items() if v}}


def relay_prices(pricing, provider, model):
    """modelPricing's prices of a model on a relay (Pricing × its multiplier), or None."""
    rates = pricing.rates_on(provider.name, model)
    return None if rates is None else dict(zip(("input", "output", "cacheRead", "cacheWrite"),
                                               (round(r, 6) for r in rates)))


def relay_summaries(server, names):
    """Each relay in a few words for a /model row: its balance and its first-byte median."""
    balances, stats = server.balances.cached(list(names)), server.recorder.counters.stats()["providers"]
    found = {}
    for name in names:
        balance, p50 = balances.get(name) or {}, (stats.get(name) or {}).get("ttfb_p50_ms")
        parts = [name]
        if balance.get("unlimited"):
            parts.append("unlimited")
        elif balance.get("remaining") is not None:
            parts.append(" ".join(filter(None, (amount_text(balance["remaining"]), balance.get("unit"), "left"))))
        if p50 is not None:
            parts.append("p50 %d ms" % p50)
        found[name] = " · ".join(parts)[:MODEL_DESCRIPTION_MAX]
    return found


def pricing_overrides(server, view):
    """modelPricing.overrides: each relay's models under their aliases, at the relay's price;
    and the ids Claude Code asks for by name — the selected relay's models, the env-models it
    is told to use, Pricing's exact Claude ids, the ids seen in recent requests — at the price
    of what ccproxy sends for them, on the relay that serves them (a Routes entry, else the
    selected one). Claude Code matches a key exactly (a Claude id covers its dated spellings)."""
    config, overrides = view.config, {}
    tokens = provider_tokens(list(view.targets))
    for name, target in view.targets.items():
        for model in target.models:
            prices = relay_prices(config.pricing, target.provider, model)
            if prices:
                overrides[model_alias(tokens[name], model)] = prices
    seen = [rec.get("model") for rec in server.recorder.request_log.newest(PRICED_RECENT)]
    asked = (list(view.target.models) if view.target else []) + list(effective_env_models(config.env_models, {}).values()) \
        + [m for m in config.pricing.exact if m.startswith("claude-")] + [m for m in seen if m]
    for model in asked:
        rule = config.route_for(model)
        target = view.targets.get(rule.provider if rule else view.selected)
        if target is None or model.startswith(ALIAS_PREFIX) or model in overrides:
            continue
        sent = map_model(model, target.model_set, target.env_models) if config.model_mapping else model
        prices = relay_prices(config.pricing, target.provider, sent)
        if prices:
            overrides[model] = prices
    return dict(sorted(overrides.items()))


def model_picker(server, view):
    """modelPicker: a /model row per relay and model, "glm-4.6 · 中转站A", its alias as the id; a
    model that is not Claude's behaves as the Claude family its relay maps to it."""
    tokens, options = provider_tokens(list(view.targets)), []
    summaries = relay_summaries(server, view.targets)
    for name, target in view.targets.items():
        families = {model: family for family, var in FAMILY_VARS
                    for model in [target.env_models.get(var)] if model}
        for model in target.models:
            option = {"model": model_alias(tokens[name], model), "label": "%s · %s" % (model, name),
                      "description": summaries[name]}
            if not model.startswith("claude") and model in families:
                option["behavesAs"] = FAMILY_PROFILES[families[model]]
            options.append(option)
    return {"modelPicker": {"options": options, "replaceBuiltInOptions": False}}


def api_claude_code(handler, params):
    """The managed settings that make Claude Code's spend figures the relays' prices, where
    each system keeps them and how to put them there; and the /model rows by relay."""
    view = handler.server.store.view
    managed = {"modelPricing": {"overrides": pricing_overrides(handler.server, view)}}
    text = json.dumps(managed, ensure_ascii=False, separators=(",", ":"))       # one line: one command
    return 200, {"managed": managed, "currency": view.config.pricing.currency, "selected": view.selected,
                 "paths": dict(MANAGED_SETTINGS), "install": {system: install_command(system, path, text)
                                                              for system, path in MANAGED_SETTINGS},
                 "picker": model_picker(handler.server, view)}


def install_command(system, path, text):
    """One line that writes text (one line of JSON) to path: administrator rights, and it
    replaces the file. PowerShell (as administrator) on Windows, sh with sudo elsewhere."""
    if system == "windows":
        folder = path.rsplit("\\", 1)[0]        # UTF-8 without a byte-order mark, as the JSON is
        return ("New-Item -ItemType Directory -Force '%s' | Out-Null; [IO.File]::WriteAllText('%s', '%s')"
                % (folder, path, text.replace("'", "''")))
    folder = path.rsplit("/", 1)[0]
    return "sudo mkdir -p %s && printf '%%s\\n' %s | sudo tee %s >/dev/null" % (shlex.quote(folder), shlex.quote(text),
                                                                              shlex.quote(path))


# ============================================================================ web UI API


class Throttle:
    """Slows down the guessing of the APIKEY without locking out the clients that hold it.

    - A request without a key is refused but not counted: any web page can send those to
      127.0.0.1 (fetch with mode "no-cors"), and they must not lock Claude Code out.
    - A wrong key counts once per address, however often it comes: Claude Code retries a 401
      up to 10 times, and two sessions with a stale key are not an attack.
    - AUTH_FAIL_LIMIT different wrong keys from one address (an IPv6 address: its /64) within
      AUTH_FAIL_WINDOW_S lock that address out for AUTH_LOCKOUT_S; AUTH_GLOBAL_FAIL_LIMIT from
      all addresses together lock every address out, against a guesser that rotates through
      127.0.0.0/8 or a /64.
    - During a lockout, a key that authenticated from the same address within AUTH_TRUST_S
      is still let in, so the sessions that work keep working. Only a digest of it is kept.
    The clock is injectable for tests.
    """

    share = None        # with STORE: callable(kind, payload) that tells the other hosts (Postgres.publish)

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.lock = threading.Lock()
        self.failures = {}            # address group -> {key digest: time of its last failure}
        self.recent = deque()         # times of every new (group, digest) failure, for the global cap
        self.locked_until = {}        # address group -> time
        self.all_locked_until = 0.0
        self.trusted = {}             # (address group, key digest) -> time it last authenticated

    def admit(self, addr, key, valid):
        """Return if the request may go on, else raise AuthError (401) or RateLimited (429)."""
        now = self.clock()
        group = address_group(addr)
        until = max(self.locked_until.get(group, 0.0), self.all_locked_until)
        if until > now:
            if valid and now - self.trusted.get((group, key_digest(key)), -AUTH_TRUST_S) < AUTH_TRUST_S:
                self.trusted[(group, key_digest(key))] = now
                return
            raise RateLimited(Said("wrong_keys", seconds=math.ceil(until - now)), until - now)
        if valid:
            self.trust(group, key, now)
            return
        if key:
            digest = key_digest(key)[:AUTH_SHARED_DIGEST]
            self.failed(group, digest, now)
            if self.share is not None:
                self.share("wrong_key", {"group": group, "digest": digest.hex()})
            raise AuthError(Said("key_invalid"))
        raise AuthError(Said("key_missing"))

    def heard(self, message):
        """Another host's wrong key: counted here as if it came here (a guesser gets one
        throttle, not one per host)."""
        if message is None or not isinstance(message.get("group"), str):
            return
        try:
            digest = bytes.fromhex(message.get("digest", ""))
        except (TypeError, ValueError):
            return
        self.failed(message["group"], digest, self.clock())

    def trust(self, group, key, now):
        entry = (group, key_digest(key))
        if now - self.trusted.get(entry, -AUTH_TRUST_S) < 1.0:
            return                      # the common case: one dict read per request
        with self.lock:
            if len(self.trusted) > AUTH_TRACKED_MAX:
                self.trusted = {k: t for k, t in self.trusted.items() if now - t < AUTH_TRUST_S}
            self.trusted[entry] = now

    def failed(self, group, digest, now):
        with self.lock:
            if len(self.failures) > AUTH_TRACKED_MAX:
                self.failures = {g: keys for g, keys in self.failures.items()
                                 if any(now - t <= AUTH_FAIL_WINDOW_S for t in keys.values())}
            keys = self.failures.setdefault(group, {})
            for old in [d for d, t in keys.items() if now - t > AUTH_FAIL_WINDOW_S]:
                del keys[old]
            new = digest not in keys
            keys[digest] = now
            if len(keys) >= AUTH_FAIL_LIMIT:
                self.locked_until[group] = now + AUTH_LOCKOUT_S
                del self.failures[group]
            if new:
                self.recent.append(now)
                while self.recent and now - self.recent[0] > AUTH_FAIL_WINDOW_S:
                    self.recent.popleft()
                if len(self.recent) >= AUTH_GLOBAL_FAIL_LIMIT:
                    self.all_locked_until = now + AUTH_LOCKOUT_S
                    self.recent.clear()
            for old in [g for g, t in self.locked_until.items() if t <= now]:
                del self.locked_until[old]


def key_digest(key):
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@functools.lru_cache(maxsize=4096)
def address_group(addr):
    """The unit the throttle counts: an IPv4 address, or an IPv6 address's /64 (one host
    commonly holds all of it)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def provider_summary(target, provider):
    out = {"name": provider.name, "comment": provider.comment,
           "api_base_url": provider.api_base_url, "base_url": provider.base_url,
           "separator": target is None, "key_hint": key_hint(provider.api_key),
           "has_key": bool(provider.api_key), "placeholder_key": provider.placeholder_key,
           "auth": provider.auth, "proxy": bool(provider.proxy),
           "price_multiplier": provider.price_multiplier, "balance": provider.balance,
           "console_url": provider.console_url}
    if target is not None:
        out.update(fixes=target.learned, check=target.check,
                   models=list(target.models), models_source=target.models_source,
                   header_override=target.header_preset_name,
                   request_override=target.request_preset_name,
                   env_models=target.env_models, refresh=target.refresh)
    return out


def api_state(handler, params=None):
    view = handler.server.store.view
    config = view.config
    tokens = provider_tokens(list(view.targets))
    return 200, {
        "version": VERSION,
        "selected": view.selected,
        "proxy_url": handler.proxy_url(),
        "loaded_at": config.loaded_at,
        "reload_error": handler.server.store.reload_error,
        "restart_needed": handler.server.store.restart_needed(),
        # with STORE: where it is, and whether it can be reached (else limits count per host)
        "store": handler.server.store.docs.pg.status() if handler.server.store.docs.shared else None,
        "model_mapping": config.model_mapping,
        "env_models": effective_env_models(config.env_models, {}),
        "proxy_settings": claude_settings(handler.proxy_url(), "", effective_env_models(config.env_models, {}),
                                          gateway=True),
        # the page puts the key ({key}) and its language ({lang}) in
        "status_line": status_line_settings(handler.proxy_url(), "{key}", "{lang}"),
        "header_overrides": config.header_presets,
        "request_overrides": config.request_presets,
        "providers": [dict(provider_summary(view.targets.get(p.name), p),
                           alias_prefix=model_alias(tokens[p.name], "") if p.name in tokens else None)
                      for p in config.providers],
        "routes": {rule.key: rule.provider for rule in config.routes},
        "gates": handler.server.health.gates,
        "outdated_presets": outdated_presets(config, handler.server.health.gates),
        "fallback": {"enabled": view.fallback_enabled, "providers": list(view.fallback),
                     "edited": (handler.server.store.state.get("fallback") or {}).get("providers") is not None,
                     "order": config.fallback_order, "model": handler.server.health.last_model,
                     # who a request for the last model asked would be tried by now, in order
                     "now": [t.name for t in candidates(view, handler.server.health, handler.server.health.last_model)]},
        "cooling": handler.server.health.snapshot(),
        "stats": handler.server.recorder.counters.stats()["providers"],
        "tests": handler.server.tests,
        "currency": config.pricing.currency,
        "cache": handler.server.recorder.cache_watch.status(),
        "cache_warn_pct": config.cache_warn_pct,
        "switch": switch_estimate(handler.server, view),
        "balances": {n: dict(r, low=balance_low(r, view.targets[n].provider, config))
                     for n, r in handler.server.balances.cached(list(view.targets)).items()},
        "low_balance": config.low_balance,
    }


def _field(body, name, required=True, nullable=False):
    if not isinstance(body, dict):
        raise ClientError(Said("body_not_object"))
    if name not in body:
        if required:
            raise ClientError(Said("field_missing", name=name))
        return None
    value = body[name]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ClientError(Said("field_not_string_or_null" if nullable else "field_not_string", name=name))
    return value


def api_select(handler, params):
    """Select a provider: at once ("when": "now", the default: every conversation moves at its
    next request), or "idle" (a conversation whose cache is warm on the old one stays there
    until it goes idle; new ones go to the new one at once)."""
    body = handler.json_body()
    name, when = _field(body, "provider"), _field(body, "when", required=False) or "now"
    if when not in ("now", "idle"):
        raise ClientError(Said("select_when"))
    server = handler.server
    old = server.store.view.selected
    server.store.select(name)
    if name != old:
        server.health.switched(old, name, when == "idle")
    return api_state(handler)


def api_reload(handler, params):
    error = handler.server.store.reload()
    if error:
        raise ClientError(Said("config_invalid", problems="\n".join(error.problems)),
                         problems=error.as_json())
    return api_state(handler)


def api_overrides(handler, params):
    body = handler.json_body()
    name = _field(body, "provider")
    header = _field(body, "header_override", required=False, nullable=True)
    request = _field(body, "request_override", required=False, nullable=True)
    handler.server.store.set_overrides(name, header, request)
    return api_state(handler)


def api_fallback(handler, params):
    body = handler.json_body()
    enabled = body.get("enabled", True) if isinstance(body, dict) else None
    if not isinstance(enabled, bool):
        raise ClientError(Said("field_enabled"))
    if "providers" in body:
        names = body["providers"]
    else:       # not given: the list stays as it is (null, given, goes back to config.json's)
        names = (handler.server.store.state.get("fallback") or {}).get("providers")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ClientError(Said("field_fallback"))
    handler.server.store.set_fallback(enabled, names)
    return api_state(handler)


def api_requests(handler, params):
    query = handler.query_params()
    try:
        limit = max(1, min(REQUEST_RING, int(query.get("limit", ["100"])[0])))
    except ValueError:
        raise ClientError(Said("requests_limit"))
    provider = query.get("provider", [None])[0]
    return 200, {"requests": handler.server.recorder.request_log.newest(limit, provider)}


def api_stats(handler, params):
    return 200, handler.server.recorder.counters.stats()


def api_test(handler, params):
    """Test one provider (or all, concurrently): a few tokens each, never more."""
    name = _field(handler.json_body(), "provider", required=False, nullable=True)
    view = handler.server.store.view
    if name is not None:
        handler.server.store.require(name)
    targets = [t for n, t in view.targets.items() if name is None or n == name]
    with concurrent.futures.ThreadPoolExecutor(max(1, min(REFRESH_WORKERS, len(targets)))) as executor:
        results = dict(zip([t.name for t in targets], executor.map(test_provider, targets)))
    handler.server.tests.update(results)
    return 200, {"results": results}


def api_refresh(handler, params):
    name = _field(handler.json_body(), "provider", required=False, nullable=True)
    store = handler.server.store
    if name is not None:
        store.require(name)
    results = refresh_models(store, None if name is None else [name])
    return 200, {"results": results}


def api_check(handler, params):
    """Check a relay: the battery of check_cases(), a few tokens each; kept in the state file."""
    store = handler.server.store
    name = _field(handler.json_body(), "provider")
    store.require(name)
    result = check_provider(store.view.targets[name], handler.server.health.client_agent)
    try:
        store.record_check(name, result)
    except StateError as exc:
        result["saved"] = str(exc)
    return 200, result


def api_forget_fixes(handler, params):
    """Forget one learned fix of a provider ({id}), or all of them."""
    name = urllib.parse.unquote(params["name"])
    fix_id = urllib.parse.unquote(params["id"]) if params.get("id") else None
    handler.server.store.forget_fixes(name, fix_id)
    return api_state(handler)


def outdated_presets(config, gates):
    """Header presets whose User-Agent claims a Claude Code older than a provider's gate asked for."""
    needed = max((version_tuple(g["required"]) for g in gates.values()), default=None)
    flagged = []
    for name, preset in config.header_presets.items():
        agent = next((v for k, v in preset.items() if k.lower() == "user-agent"), "")
        match = re.search(r"claude-cli/([0-9][0-9.]*)", agent)
        if needed and match and version_tuple(match.group(1)) < needed:
            flagged.append(name)
    return flagged


def api_key(handler, params):
    """One provider's key, and a settings.json that talks to it directly."""
    name = urllib.parse.unquote(params["name"])
    view = handler.server.store.view
    target = view.targets.get(name)
    if target is None:
        handler.server.store.require(name)
    provider = target.provider
    return 200, {"name": name, "api_key": provider.api_key,
                 "settings": claude_settings(provider.base_url, provider.api_key, target.env_models,
                                             provider.auth)}


def selected_target(handler):
    view = handler.server.store.view
    if view.target is None:
        raise NoProvider(Said("no_provider_selected", file=file_name(view.config.path)))
    return view.target


def alias_display(server, view):
    """display_name for the models /v1/models lists: "glm-4.6 · 中转站A" for an alias, marked
    while its provider cools down or failed its last test; a plain id for the selected one's."""
    now = server.health.clock()

    def display(model_id):
        found = view.aliases.get(model_id)
        if found is None:
            return model_id
        name, model = found
        mark = " (cooling down)" if server.health.is_cooling(name, now) else \
            " (failing its test)" if (server.tests.get(name) or {}).get("status") == "failing" else ""
        return "%s · %s%s" % (model, name, mark)
    return display


def list_models(handler, params):
    """The selected provider's models, then every provider's under its alias, in Anthropic's
    list shape, from the lists ccproxy keeps: never a call to a provider."""
    target = selected_target(handler)
    view = handler.server.store.view
    ids = view.model_ids if handler.user is None else visible_models(handler.user, view)
    summaries = relay_summaries(handler.server, view.targets)

    def describe(model_id):         # the relay that answers it, its balance and first-byte median
        return summaries.get(view.aliases.get(model_id, (view.selected,))[0])
    page = model_page(ids, handler.query, alias_display(handler.server, view), describe)
    exchange = params["exchange"]
    exchange.status = 200
    exchange.say("models", "answered by ccproxy: %s of %s models (%s's and every provider's aliases)",
                 len(page["data"]), len(ids), target.name)
    return 200, page


def get_model(handler, params):
    target = selected_target(handler)
    view = handler.server.store.view
    model_id = urllib.parse.unquote(params["id"])
    params["exchange"].status = 200
    if model_id not in target.model_set and model_id not in view.aliases:
        raise NotFound(Said("model_unknown", model=model_id, name=target.name))
    return 200, model_object(model_id, alias_display(handler.server, view)(model_id))


def hello(handler, params):
    return 200, {"ok": True, "service": "ccproxy", "version": VERSION}


def metrics(handler, params):
    recorder, store = handler.server.recorder, handler.server.store
    text = recorder.counters.metrics_text(recorder.cache_watch.status()) + "\n".join(handler.server.balances.metrics_lines()) + "\n"
    if store.docs.shared:
        text += "\n".join(store_metrics_lines(store.docs.pg, recorder.usage)) + "\n"
    handler.send_bytes(200, text.encode("utf-8"),
                       "text/plain; version=0.0.4; charset=utf-8")
    return None


class CrossOrigin(Forbidden):
    """A request from another site's web page (cross_site): it spends the user's relays."""

    retry = False

    def __init__(self, reason):
        super().__init__(Said("cross_origin", reason=reason))


def refuse_cross_origin(handler, params):
    # No CORS: a page on another origin must not drive this API (its preflight fails).
    raise CrossOrigin(Said("preflight", reason=cross_site(handler.headers) or "OPTIONS"))


# ============================================================================ web page


def serve_page(handler, params):
    if handler.command == "HEAD":
        handler.send_bytes(200, b"", "text/html; charset=utf-8")
        return None
    try:
        with open(WEBUI_FILE, "rb") as f:
            page = f.read()
    except OSError:
        raise NotFound(Said("page_missing"))
    handler.send_bytes(200, page, "text/html; charset=utf-8",
                       [("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"),
                        ("Content-Security-Policy", "default-src 'self'; style-src 'self' "
                         "'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data:")])
    return None


# The page installs on a phone's home screen (a web app manifest and its icons), so the relay
# switcher opens like an app. All are drawn here: no file beside ccproxy.py to lose.
ICON_COLOUR = (0xb1, 0x4c, 0x26)         # the page's --accent
# Two arrows, one each way (a switch), on a rounded square; units of a 64-unit square.
ICON_STROKES = (((14, 24), (48, 24)), ((48, 24), (38, 14)), ((50, 40), (16, 40)), ((16, 40), (26, 50)))
ICON_STROKE_HALF = 3.5
ICON_SIZES = (192, 512)
ICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">'
            '<rect width="64" height="64" rx="14" fill="#%02x%02x%02x"/>' % ICON_COLOUR
            + '<path d="%s" fill="none" stroke="#fff" stroke-width="%g" stroke-linecap="round"/></svg>'
            % ("".join("M%d %dL%d %d" % (a + b) for a, b in ICON_STROKES), ICON_STROKE_HALF * 2)).encode()


def segment_distance(px, py, ax, ay, bx, by):
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / float(dx * dx + dy * dy)))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


@functools.lru_cache(maxsize=None)
def icon_png(size):
    """ICON_SVG as a PNG of size × size (RGBA, edges smoothed by distance), for the browsers and
    home screens that want pixels."""
    unit, rows, reach = 64.0 / size, [], ICON_STROKE_HALF + 1
    for y in range(size):
        row = bytearray(b"\0")                  # filter type 0 for the row (PNG section 9)
        py = (y + 0.5) * unit
        near = [a + b for a, b in ICON_STROKES if min(a[1], b[1]) - reach <= py <= max(a[1], b[1]) + reach]
        for x in range(size):
            px = (x + 0.5) * unit
            # the rounded square (radius 14): outside its corner circles is transparent
            cx, cy = min(max(px, 14), 50), min(max(py, 14), 50)
            inside = 1.0 if px == cx or py == cy else \
                max(0.0, min(1.0, (14 - math.hypot(px - cx, py - cy)) / unit + 0.5))
            ink = 0.0
            if near:
                gap = min(segment_distance(px, py, *line) for line in near)
                ink = max(0.0, min(1.0, (ICON_STROKE_HALF - gap) / unit + 0.5))
            row += bytes(round(c + (255 - c) * ink) for c in ICON_COLOUR) + bytes((round(255 * inside),))
        rows.append(bytes(row))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    head = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)       # 8 bits, RGBA
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
            + chunk(b"IEND", b""))


def web_manifest():
    icons = [{"src": "icon.svg", "sizes": "any", "type": "image/svg+xml"}]
    icons += [{"src": "icon-%d.png" % n, "sizes": "%dx%d" % (n, n), "type": "image/png"} for n in ICON_SIZES]
    return {"name": "ccproxy", "short_name": "ccproxy", "start_url": "./#relays", "scope": "./",
            "display": "standalone", "background_color": "#f6f7f9", "theme_color": "#%02x%02x%02x" % ICON_COLOUR,
            "icons": icons}


APP_FILES = ("manifest.webmanifest", "icon.svg") + tuple("icon-%d.png" % n for n in ICON_SIZES)


def serve_app_file(handler, params):
    """The manifest and the icons (APP_FILES): public, like the page, the same for every ccproxy."""
    name = handler.path.partition("?")[0].lstrip("/")
    if name == "manifest.webmanifest":
        data, kind = json.dumps(web_manifest()).encode(), "application/manifest+json"
    elif name == "icon.svg":
        data, kind = ICON_SVG, "image/svg+xml"
    else:
        data, kind = icon_png(int(name[5:-4])), "image/png"
    handler.send_bytes(200, data, kind, [("Cache-Control", "max-age=86400")])
    return None


# ============================================================================ request handler


class Handler(http.server.BaseHTTPRequestHandler):
    """Thin: read a request, authenticate, route it through ROUTES; the work is done by the
    functions above.

    http.server's loop calls handle_one_request() until close_connection is set. Each
    connection is served by its own thread (ThreadingHTTPServer) on a SocketStream with kernel
    timeouts; answers leave through a ClientWriter, head and first body bytes in one send().
    """

    protocol_version = "HTTP/1.1"
    server_version = "ccproxy/" + VERSION
    timeout = CLIENT_TIMEOUT_S

    # Set per request by parse_request() and dispatch():
    expects_continue = False    # the client waits for 100 Continue before sending its body
    chunked = False             # the request body's framing, from body_framing()
    length = 0
    body_pending = False        # the request has a body that has not been read
    query = ""
    out = None
    user = None                 # the UserKey a request came with; None for the APIKEY

    def setup(self):
        """StreamRequestHandler.setup(), on a SocketStream with kernel timeouts (set_timeout)."""
        self.connection = self.request
        # Without TCP_NODELAY, Nagle's algorithm holds a small SSE write until the client's
        # delayed ACK (40 ms on Linux) arrives.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_timeout(self.connection, self.timeout)
        self.wfile = SocketStream(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.wfile)
        self.server.track(self.connection)

    def finish(self):
        self.server.untrack(self.connection)
        super().finish()

    def handle_one_request(self):
        """One request: wait for its first byte as long as an idle keep-alive connection may
        wait (CLIENT_TIMEOUT_S), then give its whole head HEADER_DEADLINE_S, so that a client
        trickling its head cannot hold a thread; then dispatch it."""
        self.close_connection = True
        self.out = ClientWriter(self.wfile.write)
        try:
            if not self.rfile.peek(1):
                return                              # the client closed between requests
            self.wfile.deadline = time.monotonic() + HEADER_DEADLINE_S
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if len(self.raw_requestline) > MAX_LINE:
                self.send_error(414, "the request line is longer than %d bytes" % MAX_LINE)
            elif self.parse_request():
                self.wfile.end_deadline()
                self.dispatch()
            self.out.flush()
            if self.body_pending:
                self.linger()
        except TIMEOUT_ERRORS:
            self.close_connection = True            # a silent client, or a head past its deadline
        except CLIENT_GONE:
            self.close_connection = True
        finally:
            self.wfile.deadline = None

    def linger(self):
        """Before closing on a body that was not read (a 413, a refused request), read and drop
        what the client still sends, a while: closing with unread bytes makes the kernel send a
        reset, and the client may then lose the answer it was sent."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            set_timeout(self.connection, LINGER_S)
            deadline, left = time.monotonic() + LINGER_S, LINGER_MAX_BYTES
            while left > 0 and time.monotonic() < deadline:
                data = self.connection.recv(min(left, RELAY_CHUNK))
                if not data:
                    break
                left -= len(data)
        except (OSError, ValueError):
            pass        # gone already: nothing to protect

    def parse_request(self):
        """The request line and header fields, parsed strictly (RFC 9112); False after
        answering what cannot be served."""
        self.command = None
        self.headers = Headers()
        # Errors about the request line itself are answered in HTTP/1.1; http.server would
        # answer them as HTTP/0.9, a bare body without a status line.
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        self.body_pending = self.expects_continue = False
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split(" ")
        if len(words) != 3 or not _TOKEN.fullmatch(words[0]) or not words[1] or _CONTROL.search(self.requestline):
            self.send_error(400, "Bad request line %r" % self.requestline[:ERROR_EXCERPT])
            return False
        if words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            self.send_error(505, "HTTP version %r is not supported — use HTTP/1.1" % words[2][:ERROR_EXCERPT])
            return False
        self.command, self.path, self.request_version = words
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")   # as http.server does: not a network path
        try:
            self.headers = parse_header_lines(read_header_block(self.rfile, HeaderSectionError))
            self.chunked, self.length = body_framing(self.headers)
        except ValueError as exc:
            self.send_error(400, "Bad header: %s" % exc)
            return False
        except ProxyError as exc:
            self.send_error(exc.status, str(exc))
            return False
        self.body_pending = self.chunked or self.length > 0
        tokens = connection_tokens(self.headers)
        self.close_connection = "close" in tokens if self.request_version == "HTTP/1.1" \
            else "keep-alive" not in tokens
        self.expects_continue = (self.headers.get("Expect") or "").lower() == "100-continue"
        return True

    def dispatch(self):
        started = time.monotonic()
        path, _, self.query = self.path.partition("?")
        exchange = None
        busy = self.server.busy
        busy.add(self.connection)
        try:
            route, params = find_route(self.command, path)
            if route.recorded:
                exchange = params["exchange"] = Exchange()
            self.user = None
            foreign = cross_site(self.headers)
            # Following a link from another site to the page is fine; nothing else from there is.
            if foreign and not (route.access == "public" and self.command in ("GET", "HEAD") and
                                (self.headers.get("Sec-Fetch-Mode") or "").lower() == "navigate"):
                raise CrossOrigin(foreign)
            if route.access != "public":
                self.user = self.authenticate(route.access)
                if exchange is not None and self.user is not None:
                    exchange.key = self.user.name
            result = route.func(self, params)
            if result is not None:
                self.send_json(*result)
        except ProxyError as exc:
            if exchange is not None:
                exchange.status = exc.status
                exchange.say("said", "%s", exc.args[0])      # a Said keeps its code for the page
            self.send_error_json(exc, exchange)
        except CLIENT_GONE:
            self.close_connection = True
        except Exception:
            # The one place an unexpected error is reported: once, with its traceback.
            log.exception("internal error on %s %s", self.command, path)
            if exchange is not None:
                exchange.status = 500
            self.send_error_json(ProxyError(Said("internal")), exchange)
        finally:
            busy.discard(self.connection)
            if exchange is not None:
                rec = self.exchange_record(exchange, started)
                if self.user is not None and self.user.limited and self.server.limits is not None:
                    self.server.limits.spent(rec, self.server.store.view.config.pricing)
                self.server.recorder.submit(rec)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (an unknown method, say) and parse_request's, in
        Anthropic's error shape like every other error; the connection is closed after it."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.send_error_json(ProxyError(Said("http_refused", reason=message or STATUS_PHRASES.get(code, "error")), code,
                                        "invalid_request_error" if code < 500 else "api_error"))

    # -- reading the request

    def authenticate(self, access):
        """Who sent the request: None for the APIKEY (the administrator), else the user key
        (Keys) whose secret it is. A wrong key meets the throttle; a user key on an "admin"
        route gets 403, a disabled or expired one 401 saying so."""
        config = self.server.store.view.config
        key, _ = client_key(self.headers.items())
        admin = bool(key) and hmac.compare_digest(key.encode("utf-8", "surrogateescape"),
                                                  config.apikey.encode("utf-8"))
        user = config.key_by_hash.get(key_sha256(key)) if key and not admin and config.keys else None
        self.server.throttle.admit(self.client_ip(), key, admin or user is not None)
        if user is None:
            return None
        # Refused keys first: their holder learns why on any route, the page's login included.
        if not user.enabled:
            raise KeyRefused(Said("key_disabled", name=user.name))
        if user.expires_at is not None and time.time() >= user.expires_at:
            raise KeyRefused(Said("key_expired", name=user.name, expires=user.expires))
        if access == "admin":
            raise Forbidden(Said("user_key", name=user.name))
        return user

    def client_ip(self):
        """The client's address: the peer's, or for a peer in TRUSTED_PROXIES (nginx in front)
        the last address of the X-Forwarded-For it sends."""
        peer = self.client_address[0]
        if peer in self.server.store.view.config.trusted_proxies:
            forwarded = (self.headers.get("X-Forwarded-For") or "").rsplit(",", 1)[-1].strip()
            if forwarded and _is_address(forwarded):
                return forwarded
        return peer

    def read_body(self, limit):
        """The request body (as parse_request framed it), at most limit bytes, else 413.
        A client that waits for 100 Continue gets it now: it has passed authentication."""
        if self.expects_continue:
            self.expects_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.chunked:
            body = read_chunked(self.rfile, limit)
        elif self.length > limit:
            raise TooLarge(Said("body_too_large_sized", size=self.length >> 20, limit=limit >> 20))
        else:
            body = self.rfile.read(self.length) if self.length else b""
            if len(body) != self.length:
                raise ClientError(Said("body_short"))
        self.body_pending = False       # only now: a body refused half-read closes the connection
        return body

    def json_body(self):
        """An API call's JSON body, {} if empty."""
        raw = self.read_body(API_BODY_MAX)
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ClientError(Said("body_not_json"))

    def query_params(self):
        return urllib.parse.parse_qs(self.query)

    # -- answering

    def proxy_url(self):
        host = self.headers.get("Host")
        if not host:
            host = "%s:%d" % self.server.server_address[:2]
        return "http://" + host

    def send_head(self, status, fields):
        """Queue the status line and header block (ClientWriter.head): after this no other
        status line may follow for the request."""
        if self.body_pending:
            self.close_connection = True    # an unread body would be taken for the next request
        fields = [("Server", self.version_string()), ("Date", self.date_time_string())] + fields
        if self.close_connection:
            fields.append(("Connection", "close"))
        self.out.head(status, fields)

    def send_bytes(self, status, data, content_type, extra=()):
        self.send_head(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))]
                       + list(extra))
        self.out.write(data if self.command != "HEAD" else b"")

    def send_json(self, status, obj, extra=()):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_bytes(status, data, "application/json", extra)

    def send_error_json(self, exc, exchange=None):
        """ccproxy's own error answer; it names the provider the request was on, if any (a
        502 for one that could not be reached, say), as a provider's answer does."""
        if self.out.started:
            # Part of the answer is out: a second status line would be read as body bytes.
            self.close_connection = True
            return
        extra = list(exc.headers) + ([] if exc.retry else [("x-should-retry", "false")])
        if exchange is not None and exchange.provider is not None:
            extra.append(("x-ccproxy-provider", header_text(exchange.provider)))
        try:
            self.send_bytes(exc.status, error_body(exc.kind, str(exc), getattr(exc, "extra", None)),
                            "application/json", extra)
        except CLIENT_GONE:
            self.close_connection = True

    # -- logging: metadata only; the default access log is replaced

    def exchange_record(self, exchange, started):
        """The request log's record: metadata and token counts only, never bodies or keys."""
        usage = exchange.usage
        return {
            "time": time.time(), "client": self.client_ip(), "key": exchange.key, "method": self.command,
            "path": self.path.partition("?")[0], "provider": exchange.provider,
            "attempts": [list(a) for a in exchange.attempts] + [[exchange.provider, str(exchange.status),
                                                                 exchange.model_out]],
            # each failed attempt's reason with its code, for the page to word (null: a status)
            "attempts_why": [a[1].as_json() if isinstance(a[1], Said) else None for a in exchange.attempts] + [None],
            "model": exchange.model_in, "model_sent": exchange.model_out, "stream": exchange.stream,
            "status": exchange.status, "ttfb_ms": None if exchange.ttfb_ms is None else round(exchange.ttfb_ms, 1),
            "total_ms": round((time.monotonic() - started) * 1000, 1),
            "bytes_in": exchange.bytes_in, "bytes_out": exchange.bytes_out,
            "usage": usage.as_dict() if (usage.input or usage.output) else None,
            "stop_reason": usage.stop_reason, "midstream_error": exchange.midstream_error,
            "note": exchange.note, "note_code": exchange.note_code, "session": session_of(self.headers),
            "class": exchange.kind, "agent": exchange.agent, "placed": exchange.placed}

    def log_request(self, code="-", size="-"):
        pass

    def log_message(self, format, *args):
        log.warning("%s %s", self.client_address[0],
                    redact(format % args, self.server.store.view.config.secrets()))


def relay_request(handler, params):
    """Everything else under /v1/ goes to the providers (Relay)."""
    if has_dot_segment(handler.path.partition("?")[0]):
        # /v1/../admin must not reach the provider, with its key, outside /v1/.
        raise ClientError(Said("dot_segment"))
    server = handler.server
    view = server.store.view
    # A key's limits count what is billed: not count_tokens, which is free, and which Claude
    # Code's /context sends about 17 at once.
    if handler.user is not None and handler.user.limited and not handler.path.startswith("/v1/messages/count_tokens"):
        if server.limits is None:
            raise Unavailable(Said("key_limits_no_store", name=handler.user.name))
        server.limits.admit(handler.user, time.time())
    request = ClientRequest(handler.command, handler.path, handler.headers,
                            handler.read_body(view.config.max_body_bytes),
                            handler.request_version == "HTTP/1.0")
    relay = Relay(view, server.health, server.pool, handler.out, params["exchange"], server.recorder.counters,
                  server.debug, server.store, handler.user)
    try:
        relay.run(request)
    finally:
        if relay.close:
            handler.close_connection = True
    return None


class Route:
    """One line of ROUTES: the methods, a path pattern ({name} is one segment, {name*} the
    rest), who may call it ("public"; "user": the APIKEY or a user key; "admin": the APIKEY)
    and whether the request log records it."""

    __slots__ = ("methods", "pattern", "regex", "access", "func", "recorded")

    def __init__(self, methods, pattern, access, func, recorded=False):
        self.methods = frozenset(methods.split())
        self.pattern = pattern
        regex = re.sub(r"\{(\w+)\*\}", r"(?P<\1>.*)", pattern)
        self.regex = re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex) + r"\Z")
        self.access = access
        self.func = func
        self.recorded = recorded


ROUTES = (
    Route("OPTIONS", "{any*}", "public", refuse_cross_origin),
    Route("GET HEAD", "/", "public", serve_page),
    Route("GET HEAD", "/index.html", "public", serve_page),
    *[Route("GET HEAD", "/" + name, "public", serve_app_file) for name in APP_FILES],
    Route("GET HEAD", "/api/hello", "public", hello),
    Route("GET HEAD", "/healthz", "public", hello),
    Route("GET HEAD", "/metrics", "admin", metrics),
    Route("GET HEAD", "/v1/models", "user", list_models, recorded=True),
    Route("GET HEAD", "/v1/models/{id}", "user", get_model, recorded=True),
    Route("GET HEAD POST PUT PATCH DELETE", "/v1/{rest*}", "user", relay_request, recorded=True),
    Route("GET", "/api/me", "user", api_me),
    Route("GET", "/api/state", "admin", api_state),
    Route("POST", "/api/select", "admin", api_select),
    Route("POST", "/api/reload", "admin", api_reload),
    Route("POST", "/api/overrides", "admin", api_overrides),
    Route("POST", "/api/fallback", "admin", api_fallback),
    Route("POST", "/api/refresh-models", "admin", api_refresh),
    Route("POST", "/api/test", "admin", api_test),
    Route("POST", "/api/check", "admin", api_check),
    Route("DELETE", "/api/fixes/{name}", "admin", api_forget_fixes),
    Route("DELETE", "/api/fixes/{name}/{id}", "admin", api_forget_fixes),
    Route("GET", "/api/requests", "admin", api_requests),
    Route("GET", "/api/stats", "admin", api_stats),
    Route("GET", "/api/usage", "admin", api_usage),
    Route("GET", "/api/sessions", "admin", api_sessions),
    Route("POST", "/api/status-line", "user", api_status_line),
    Route("GET", "/api/balance", "admin", api_balance),
    Route("GET", "/api/keys", "admin", api_keys),
    Route("POST", "/api/keys", "admin", api_create_key),
    Route("PUT", "/api/keys/{name}", "admin", api_put_key),
    Route("POST", "/api/keys/{name}/rekey", "admin", api_rekey),
    Route("DELETE", "/api/keys/{name}", "admin", api_delete_key),
    Route("GET", "/api/providers/{name}/key", "admin", api_key),
    Route("GET", "/api/config", "admin", api_config),
    Route("GET", "/api/claude-code", "admin", api_claude_code),
    Route("PUT", "/api/providers/{name}", "admin", api_put_provider),
    Route("DELETE", "/api/providers/{name}", "admin", api_delete_provider),
    Route("POST", "/api/providers/{name}/duplicate", "admin", api_duplicate_provider),
    Route("POST", "/api/providers-order", "admin", api_order),
    Route("PUT", "/api/settings", "admin", api_settings),
    Route("GET", "/api/export", "admin", api_export),
    Route("POST", "/api/import/preview", "admin", api_import_preview),
    Route("POST", "/api/import", "admin", api_import),
)


def find_route(method, path):
    """(route, path parameters) of the first line of ROUTES that matches; NotFound, or 405
    with Allow when the path is known but not the method."""
    allowed = set()
    for route in ROUTES:
        match = route.regex.match(path)
        if match is None:
            continue
        if method in route.methods:
            return route, match.groupdict()
        allowed |= route.methods
    allowed.discard("OPTIONS")          # answered for every path, only to refuse it
    if allowed:
        error = MethodNotAllowed(Said("method_not_allowed", method=method, path=path, allowed=", ".join(sorted(allowed))))
        error.headers = [("Allow", ", ".join(sorted(allowed)))]
        raise error
    raise NotFound(Said("no_route", method=method, path=path))


# ============================================================================ server factory and CLI


class ProxyServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer, a thread per connection, that knows its open connections: on
    SIGTERM the requests in flight get SHUTDOWN_GRACE_S to finish, then every connection is
    cut, so that no thread is left blocked on a socket."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    recorder = None

    def __init__(self, address, store, debug=False):
        self.stopping = threading.Event()
        self.conn_lock = threading.Lock()
        self.connections = set()  # every open client socket
        self.busy = set()         # the sockets in the middle of a request
        self.pool = Pool()
        # Bound before any thread starts: a port that cannot be had leaves none behind.
        super().__init__(address, Handler)
        self.store = store
        self.debug = debug
        self.throttle = Throttle()
        self.health = Health()
        config = store.view.config
        usage = self.limits = None
        if store.docs.shared:
            usage = SharedUsage(store.docs.pg)
            # while the store is away, each host counts key minutes in a file of its own
            self.limits = SharedLimits(store.docs.pg, config.usage_db or os.path.join(
                os.path.dirname(os.path.abspath(config.path)), USAGE_DB_NAME))
        elif config.usage_db and sqlite3 is None:
            log.warning("this Python has no sqlite3 module: usage over time is not kept (USAGE_DB)")
        elif config.usage_db:
            usage = UsageStore(config.usage_db)
            self.limits = Limits(config.usage_db)
        self.recorder = Recorder(config.request_log, config.request_log_max, lambda: self.store.view.config, usage)
        self.balances = Balances()
        self.tests = {}               # provider -> last test result
        if store.docs.shared:
            self.share(store.docs.pg)
        threading.Thread(target=self.housekeeping, name="ccproxy-housekeeping", daemon=True).start()

    def housekeeping(self):
        """Every STATE_POLL_S: take what other ccproxy processes changed (Store.sync). Every
        BALANCE_TTL_S with LOW_BALANCE_LAST set: ask the relays of the failover order for their
        balance, so a low one moves to its end (LOW_BALANCE_LAST) with the page closed."""
        balances_at = time.monotonic()
        while not self.stopping.wait(STATE_POLL_S):
            try:
                self.store.sync()
                if time.monotonic() - balances_at >= BALANCE_TTL_S:
                    balances_at = time.monotonic()
                    if self.store.view.config.low_balance_last:
                        self.check_balances()
            except Exception:
                log.exception("housekeeping failed; trying again")

    def share(self, pg):
        """With STORE: take the other hosts' changes as they announce them."""
        docs = self.store.docs

        def documents(message):
            docs.heard = True
            self.store.sync()
        pg.handlers["documents"] = documents
        def cooling(message):
            for one in pg.cooldowns() if message is None else [message]:
                self.health.heard(one)
        pg.handlers["cool"] = pg.handlers["recovered"] = cooling
        pg.handlers["wrong_key"] = self.throttle.heard
        pg.handlers["balance"] = self.balances.heard
        self.health.share = self.throttle.share = self.balances.share = pg.publish
        self.recorder.request_log.everyone = self.recorder.usage.newest
        pg.start(self.stopping)

    def check_balances(self, names=None, refresh=False):
        """The balances of the named providers (None: the selected one and the failover list),
        fetched when stale; updates which ones are low."""
        view = self.store.view
        if names is None:
            names = [view.selected] + list(view.fallback)
        found = self.balances.get([view.targets[n].provider for n in names if n in view.targets], refresh)
        config = view.config
        self.health.low_balance = self.balances.low(view.targets, config) if config.low_balance_last else frozenset()
        return found

    def track(self, conn):
        with self.conn_lock:
            self.connections.add(conn)

    def untrack(self, conn):
        with self.conn_lock:
            self.connections.discard(conn)

    def shutdown_request(self, request):
        """Close a client connection. socketserver first calls shutdown(SHUT_WR), because a
        socket with makefile() readers open is only closed when they are; ours has none
        (SocketStream), so close() alone sends the FIN, one system call sooner."""
        self.close_request(request)

    def close_connections(self, grace=0.0):
        """Wait up to grace seconds for requests in flight to finish, then cut every connection."""
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            time.sleep(POLL_S)
        with self.conn_lock:
            remaining = list(self.connections)
        for sock in remaining:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the other side
        deadline = time.monotonic() + THREAD_JOIN_S
        while self.connections and time.monotonic() < deadline:
            time.sleep(POLL_S / 5)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, socket.timeout, TimeoutError)):
            log.debug("%s: connection dropped (%s)", client_address[0], type(exc).__name__)
        else:
            log.exception("internal error serving %s", client_address[0])

    def server_close(self):
        self.stopping.set()
        super().server_close()
        self.close_connections()
        self.pool.close()
        if self.recorder is not None:       # None: the address could not be had
            self.recorder.close()
        if self.store.docs.shared:
            self.store.docs.close()


def make_server(config_path, host=None, port=None, debug=False, log_level=None):
    """Build (not start) the proxy server. ConfigError for an unusable config, or an address
    it cannot listen on. The root logger follows LOG_LEVEL, now and at every reload, unless
    log_level (--log-level; DEBUG with --debug) fixes it."""
    config = load_config(config_path)
    host = config.host if host is None else host
    port = config.port if port is None else port
    docs = None
    if config.store:
        docs = SharedDocuments(config_path, Postgres(config.store))
        docs.open(lambda: seed_documents(config_path))
        config = docs.load_config()
        unused = [k for k, v in shared_part(load_config(config_path).raw).items()
                  if not k.startswith("_") and config.raw.get(k) != v]
        if unused:
            log.warning("%s: %s not used: STORE's are (edit them in the web page; --migrate-store --force "
                        "copies this file's into the store)", file_name(config_path), ", ".join(unused))
    store = Store(config, docs)
    fixed = "DEBUG" if debug else log_level
    store.on_config = lambda config: logging.getLogger().setLevel(fixed or config.log_level)
    store.on_config(config)
    ProxyServer.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return ProxyServer((host, port), store, debug)
    except OSError as exc:
        raise ConfigError([listen_problem(host, port, exc)])


def listen_problem(host, port, exc):
    """What to do when host:port cannot be listened on, in one line."""
    where = "%s:%s" % ("[%s]" % host if ":" in host else host, port)
    if exc.errno == errno.EADDRINUSE:
        return Said("listen_in_use", address=where, next=port + 1 if port else DEFAULT_PORT)
    if exc.errno == errno.EACCES:
        return Said("listen_denied", address=where)
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return Said("listen_no_address", address=where)
    return Said("listen_failed", address=where, reason=exc.strerror or exc)


def new_apikey():
    return "sk-ccproxy-" + secrets.token_urlsafe(24)


def ensure_apikey(path):
    """Give the config at path a random APIKEY if it has none (missing, empty or the template's
    placeholder), and on the first run create it from config.in.json. Only that member
    changes (patch_json); a file that had a key is kept as a backup first. The new key, or
    None: the file has a key, or cannot be read (loading it next says why)."""
    created = not os.path.exists(path)
    try:
        text, raw = read_config(TEMPLATE_CONFIG if created else path)
    except ConfigError:
        if created:
            raise
        return None
    if not isinstance(raw, dict) or raw.get("APIKEY", "") not in ("", PLACEHOLDER_APIKEY):
        return None
    key = new_apikey()
    if not created:
        backup_config(path, text.encode("utf-8"))
    write_atomic(path, patch_json(text, {"APIKEY": key}))
    return key


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="ccproxy.py",
        description="Relay Claude Code's Anthropic API calls to the provider selected in the web UI.")
    parser.add_argument("--config", default=os.environ.get("CCPROXY_CONFIG", DEFAULT_CONFIG),
                        help="config file (default: config.json beside ccproxy.py, or $CCPROXY_CONFIG);"
                             " created from config.in.json with a random APIKEY if missing")
    parser.add_argument("--host", help="address to bind, overrides HOST (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind, overrides PORT (default 3456)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="overrides LOG_LEVEL")
    parser.add_argument("--debug", action="store_true",
                        help="log request bodies too (truncated, keys redacted); for troubleshooting")
    parser.add_argument("--check", action="store_true",
                        help="validate the config file, print the problems, and exit (0 = valid)")
    parser.add_argument("--migrate-store", action="store_true",
                        help="copy this host's config (less its host keys), state and usage into STORE, then exit")
    parser.add_argument("--force", action="store_true",
                        help="with --migrate-store: replace a different config the store already holds")
    parser.add_argument("--version", action="version", version="ccproxy " + VERSION)
    return parser.parse_args(argv)


def key_notice(path, key, created):
    """What the first run (or a start that gave the config an APIKEY) says about the new key.
    The key itself only to a terminal: under run.sh or systemd this is a log file."""
    what = ("created %s from config.in.json with a new random APIKEY" % path if created else
            "%s had no APIKEY (empty, or the template's): it now has a random one, and the previous "
            "file is kept as %s.bak-<time>" % (path, os.path.basename(path)))
    shown = key if sys.stdout.isatty() else "see the APIKEY line of %s (not printed here: this may be a log)" % path
    return "ccproxy: %s.\n  APIKEY (the web UI password, and Claude Code's key): %s" % (what, shown)


def banner(server, path, new_key):
    """The start-up lines: where ccproxy listens and, until a relay with a real key is in the
    config, Claude Code's settings and what to do next, in English and Chinese."""
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = "http://%s:%d" % ("[%s]" % shown if ":" in shown else shown, port)
    view, path = server.store.view, os.path.abspath(path)
    lines = ["ccproxy %s listening on %s (config %s)" % (VERSION, url, path),
             "  web UI: %s/   provider: %s" % (url, view.selected or "(none configured)")]
    if new_key or view.target is None or view.target.provider.placeholder_key:
        key = view.config.apikey if sys.stdout.isatty() else "<APIKEY from %s>" % os.path.basename(path)
        settings = json.dumps(claude_settings(url, key, {}, gateway=True), indent=2)
        lines += ["  Claude Code ~/.claude/settings.json:", settings,
                  "  next: add your relay in the web UI (log in with the APIKEY, Add provider), or in Providers of",
                  "        %s (name, api_base_url, api_key) and press Reload config. The first relay" % path,
                  "        with a real key is used at once; example keys are never sent anywhere.",
                  "  下一步：在网页上添加你的中转站（用 APIKEY 登录，点“添加供应商”），或写进",
                  "        %s 的 Providers（name、api_base_url、api_key）再点“重载配置”。" % path,
                  "        第一个有真实密钥的中转站立即启用；示例密钥不会发往任何地方。"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        level=logging.INFO)
    # What the format does not show is not collected (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if args.check:
        try:
            config = load_config(args.config)
            shared = check_store(args.config, config.store) if config.store else ""
        except ConfigError as exc:
            print("%s cannot be used:\n%s" % (os.path.abspath(args.config), "\n".join(exc.problems)), file=sys.stderr)
            return 2
        print("%s: OK%s" % (args.config, shared))
        return 0
    if args.migrate_store:
        try:
            print(migrate_store(args.config, args.force))
        except ConfigError as exc:
            print("%s cannot be copied into the store:\n%s" % (os.path.abspath(args.config), "\n".join(exc.problems)),
                  file=sys.stderr)
            return 2
        return 0
    created = not os.path.exists(args.config)
    try:
        new_key = ensure_apikey(args.config)
    except (ConfigError, OSError) as exc:
        print("ccproxy: cannot give %s an APIKEY: %s" % (args.config, getattr(exc, "strerror", None) or exc),
              file=sys.stderr)
        return 2
    if new_key:
        print(key_notice(args.config, new_key, created), flush=True)    # said even if the port is taken
    try:
        server = make_server(args.config, args.host, args.port, args.debug, args.log_level)
    except ConfigError as exc:
        print("%s cannot be used:\n%s" % (os.path.abspath(args.config), "\n".join(exc.problems)), file=sys.stderr)
        return 2
    # Signals first: once the banner is out, a supervisor may send SIGHUP or SIGTERM at once,
    # and their default actions would kill the process.
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
            target=server.store.reload, daemon=True).start())
    print(banner(server, args.config, new_key), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    log.info("stopping: waiting up to %.0f s for open requests", SHUTDOWN_GRACE_S)
    server.close_connections(SHUTDOWN_GRACE_S)
    server.server_close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
