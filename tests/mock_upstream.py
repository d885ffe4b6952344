"""A stdlib mock of the Anthropic Messages API, for tests and the benchmark.

It answers /v1/messages (JSON or SSE, with a delay between events), /v1/messages/count_tokens
and /v1/models (paginated), records every request it receives, counts TCP connections, and
fails on demand: queue actions with `fail_next(...)`.
"""

import http.server
import json
import socket
import threading
import time

USAGE_IN = {"input_tokens": 11, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3}


class Recorded:
    def __init__(self, handler, body):
        self.method = handler.command
        self.path = handler.path
        self.header_list = list(handler.headers.items())
        self.headers = {k.lower(): v for k, v in self.header_list}
        self.body = body
        self.at = time.monotonic()

    @property
    def json(self):
        return json.loads(self.body)


def sse(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data))).encode()


def message_events(model, words, delay=0.0, usage=USAGE_IN):
    """The SSE events of one reply; each after the first is made `delay` seconds later."""
    yield sse("message_start", {"type": "message_start", "message": {
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "usage": dict(usage, output_tokens=1)}})
    yield sse("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
    for i in range(words):
        time.sleep(delay)
        yield sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": "w%d " % i},
                                          "sent_at": time.time()})
    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": words}})
    yield sse("message_stop", {"type": "message_stop"})


class MockHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.mock.connected()

    def do_HEAD(self):
        self.handle_any()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD

    def handle_any(self):
        mock = self.server.mock
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        mock.record(Recorded(self, body))
        action = mock.take_action()
        if action is not None and self.act(action, body):
            return
        path = self.path.partition("?")[0]
        route = mock.balance_routes.get(path) if self.command == "GET" else None
        if route is not None:
            self.send_json(*route(self.headers))
        elif path.endswith("/v1/models"):
            self.models()
        elif path.endswith("/v1/dashboard/billing/subscription") and mock.billing:
            self.send_json(200, {"object": "billing_subscription", "has_payment_method": True,
                                 "hard_limit_usd": mock.billing["hard_limit_usd"],
                                 "soft_limit_usd": mock.billing["hard_limit_usd"], "access_until": 0})
        elif path.endswith("/v1/dashboard/billing/usage") and mock.billing:
            self.send_json(200, {"object": "list", "total_usage": mock.billing["total_usage"]})
        elif path.endswith("/v1/messages/count_tokens"):
            self.send_json(200, {"input_tokens": 42})
        elif path.endswith("/v1/messages"):
            refusal = mock.refusal(body, self.headers)
            if refusal:
                self.send_json(400, mock.wrapped({"type": "error", "error": {"type": "invalid_request_error",
                                                                             "message": refusal}}, body))
            else:
                self.messages(body)
        else:
            self.send_json(404, {"type": "error", "error": {"type": "not_found_error",
                                                            "message": "mock: no " + path}})

    def act(self, action, body):
        """Carry out a queued failure; return True if the request is fully answered."""
        kind, mock = action.get("kind"), self.server.mock
        if kind == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return True
        if kind == "stall":
            time.sleep(action.get("seconds", 5))
            self.close_connection = True
            return True
        if kind == "silent_stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            time.sleep(action.get("seconds", 5))
            self.close_connection = True
            return True
        if kind == "status":
            data = action.get("body", b"")
            if isinstance(data, dict):
                data = json.dumps(mock.wrapped(data, body) if action["status"] >= 400 else data).encode()
            self.send_response(action["status"])
            self.send_header("Content-Type", action.get("content_type", "application/json"))
            for name, value in action.get("headers", {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True
        if kind == "bad_chunk":     # content begins, then framing that is not chunked
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            event = b"".join(list(message_events("m", 1))[:2])
            good, bad = b"%x\r\n%s\r\n" % (len(event), event), b"not a chunk size\r\n"
            if "pause" in action:
                self.wfile.write(good)
                time.sleep(action["pause"])
                self.wfile.write(bad)
            else:
                self.wfile.write(good + bad)    # in one segment
            self.close_connection = True
            return True
        if kind == "slow_body":     # the head at once, the body only once the test releases it
            self.send_response(200)
            self.send_header("Content-Type", action.get("content_type", "application/json"))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            action["release"].wait(action.get("seconds", 10))
            data = action.get("body", b'{"type":"message","content":[]}')
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            return True
        if kind == "early_hints":   # RFC 8297: an interim 103 before the real answer
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            self.wfile.flush()
            return False                # then the ordinary answer
        if kind == "smuggle":       # a whole second answer after the first, on the same connection
            data = json.dumps({"type": "message", "model": "SMUGGLED", "content": []}).encode()
            answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" \
                % (len(data), data)
            self.wfile.write(answer)
            self.wfile.flush()
            time.sleep(action.get("pause", 0.2))     # the second arrives once the first was read
            self.wfile.write(answer)
            return True
        if kind == "huge":          # status, then `size` bytes of body with a Content-Length
            size = action["size"]
            self.send_response(action.get("status", 200))
            self.send_header("Content-Type", action.get("content_type", "application/json"))
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * 65536
            try:
                for _ in range(size // len(block)):
                    self.wfile.write(block)
                self.wfile.write(block[:size % len(block)])
            except (BrokenPipeError, ConnectionResetError):
                mock.aborted.set()
            self.close_connection = True
            return True
        if kind == "drip":          # a chunked JSON answer, `piece` bytes every `every` seconds
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            piece = b"x" * action.get("piece", 100)
            try:
                for _ in range(action.get("count", 1000)):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    time.sleep(action.get("every", 0.1))
            except (BrokenPipeError, ConnectionResetError):
                mock.aborted.set()
            self.close_connection = True
            return True
        if kind == "events":        # a 200 stream of these raw events, then a pause; it ends or is cut
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in action["events"]:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            time.sleep(action.get("pause", 0))
            try:
                if action.get("end", True):
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                mock.aborted.set()
            return True
        if kind == "cut":
            self.messages(body, cut_after=action.get("after", 2))
            return True
        return False

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_mock")
        if self.server.mock.close_connections:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def models(self):
        from urllib.parse import parse_qs, urlsplit
        mock = self.server.mock
        query = parse_qs(urlsplit(self.path).query)
        ids = list(mock.models)
        if mock.models_shape == "openai":
            self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in ids]})
            return
        if "after_id" in query and query["after_id"][0] in ids:
            ids = ids[ids.index(query["after_id"][0]) + 1:]
        page = ids[:mock.models_page]
        self.send_json(200, {"data": [{"type": "model", "id": m, "display_name": m,
                                       "created_at": "2025-01-01T00:00:00Z"} for m in page],
                             "has_more": len(ids) > len(page),
                             "first_id": page[0] if page else None,
                             "last_id": page[-1] if page else None})

    def messages(self, body, cut_after=None):
        mock = self.server.mock
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            self.send_json(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                            "message": "mock: body is not JSON"}})
            return
        model = req.get("model", "unknown")
        time.sleep(mock.first_delay)
        if not req.get("stream"):
            self.send_json(200, {"id": "msg_mock", "type": "message", "role": "assistant",
                                 "model": model, "content": [{"type": "text", "text": "hello"}],
                                 "stop_reason": "end_turn",
                                 "usage": dict(mock.usage, output_tokens=7)})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", "req_mock")
        if mock.close_connections:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            for n, event in enumerate(message_events(model, mock.words, mock.event_delay, mock.usage)):
                if cut_after is not None and n >= cut_after:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            mock.aborted.set()


class MockServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024   # the default of 5 drops connects when 256 arrive at once


class MockUpstream:
    """A running mock provider on 127.0.0.1; close() stops it."""

    def __init__(self, models=("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")):
        self.models = list(models)
        self.models_page = 20
        self.models_shape = "anthropic"
        self.words = 5
        self.event_delay = 0.0
        self.first_delay = 0.0      # before a /v1/messages answer starts
        self.close_connections = False  # answer with Connection: close
        # A relay on an older stack: every /v1/messages request that carries one of these is
        # answered 400 in the words such relays use (refusal()).
        self.refuse_fields = set()      # top-level body fields
        self.refuse_betas = set()       # anthropic-beta tokens
        self.refuse_tool_fields = set()  # keys of a tool ("defer_loading")
        self.refuse_adaptive = False    # "thinking": {"type": "adaptive"}
        self.gate = None                # (required version, model): a client-version gate
        # A relay in front of the origin that wraps the origin's error in its own (wrapped()):
        # None, "ccr" (claude-code-router) or "litellm" (LiteLLM's proxy).
        self.wrap = None
        self.usage = dict(USAGE_IN)     # what each reply reports (output_tokens aside)
        # A NewAPI/OneAPI-style relay: {"hard_limit_usd": 100, "total_usage": cents} answers
        # the billing routes; None leaves them 404, as a relay without them.
        self.billing = None
        self.balance_routes = {}        # path -> f(headers) -> (status, JSON): newapi(), sub2api()
        self.requests = []
        self.connections = 0
        self.actions = []
        self.aborted = threading.Event()
        self.lock = threading.Lock()
        self.server = MockServer(("127.0.0.1", 0), MockHandler)
        self.server.mock = self
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def connected(self):
        with self.lock:
            self.connections += 1

    def record(self, recorded):
        with self.lock:
            self.requests.append(recorded)

    def refusal(self, body, headers):
        """The 400 message this mock relay answers a /v1/messages request with, else None."""
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return None
        for name in sorted(self.refuse_fields & set(req)):
            return "%s: Extra inputs are not permitted" % name
        for index, tool in enumerate(req.get("tools") or []):
            for name in sorted(self.refuse_tool_fields & set(tool)):
                return "tools.%d.custom.%s: Extra inputs are not permitted" % (index, name)
        betas = [t.strip() for t in (headers.get("anthropic-beta") or "").split(",")]
        for token in betas:
            if token in self.refuse_betas:
                return "Unexpected value(s) `%s` for the `anthropic-beta` header. Please consult our " \
                       "documentation at docs.anthropic.com or try again without the header." % token
        if self.refuse_adaptive and (req.get("thinking") or {}).get("type") == "adaptive":
            return "thinking: Input tag 'adaptive' found using 'type' does not match any of the " \
                   "expected tags: 'disabled', 'enabled'"
        if self.gate and req.get("model") == self.gate[1]:
            agent = headers.get("User-Agent") or ""
            sent = agent.partition("claude-cli/")[2].partition(" ")[0] or "0.0.0"
            if tuple(map(int, sent.split("."))) < tuple(map(int, self.gate[0].split("."))):
                return "Claude Code %s does not support this model; version %s or newer is required" % (
                    sent, self.gate[0])
        return None

    def wrapped(self, error, body):
        """An origin's error body as the relay in front of it (self.wrap) answers it. Its own
        words come first, the origin's JSON after them inside a string:
        claude-code-router: {"error": {"message": "Error from provider(NAME,MODEL: 400): {…}",
        "type": "api_error", "code": "provider_response_error"}}; LiteLLM: {"error": {"message":
        "litellm.BadRequestError: AnthropicException - {…}. Received Model Group=…", "type": null,
        "param": null, "code": "400"}}."""
        try:
            model = json.loads(body or b"{}").get("model", "")
        except (ValueError, AttributeError):
            model = ""
        origin = json.dumps(dict(error, request_id="req_011CVorigin7Hq2xNbW"), separators=(",", ":"))
        if self.wrap == "ccr":
            return {"error": {"message": "Error from provider(anthropic-origin-relay,%s: 400): %s" % (model, origin),
                              "type": "api_error", "code": "provider_response_error"}}
        if self.wrap == "litellm":
            return {"error": {"message": "litellm.BadRequestError: AnthropicException - %s. Received Model Group=%s\n"
                                         "Available Model Group Fallbacks=None" % (origin, model),
                              "type": None, "param": None, "code": "400"}}
        return error

    def take_action(self):
        with self.lock:
            return self.actions.pop(0) if self.actions else None

    def fail_next(self, kind="status", **action):
        """Queue a failure for the next request: status (status=, body=, headers=), close,
        stall (seconds=, no answer), silent_stream (seconds=, SSE headers then nothing),
        slow_body (release=Event: the head at once, the body once it is set), bad_chunk,
        early_hints (a 103, then the answer), smuggle (two answers to one request),
        huge (size=, status=: a large body), drip (piece=, every=: a slow chunked answer),
        or cut (after=N events)."""
        with self.lock:
            self.actions.append(dict(action, kind=kind))

    @property
    def last(self):
        return self.requests[-1]

    # -- what a relay panel answers about money, shaped after NewAPI's and sub2api's handlers

    def newapi(self, display="USD", rate=None, per_unit=500000, token=None, credits=None, old=False):
        """Answer as a NewAPI site: the public /api/status with how it shows money (old: the
        older display_in_currency flag instead of quota_display_type); /api/usage/token, for a
        Bearer key only, with this key's figures in raw quota units (token: {"granted", "used"}
        or {"unlimited": True}); /v1/credits with what is left in display units (credits)."""
        status = {"quota_per_unit": per_unit, "version": "v0.9.0"}
        if old:
            status["display_in_currency"] = display != "TOKENS"
        else:
            status["quota_display_type"] = display
            status["usd_exchange_rate"] = rate if rate is not None else 7.3
        self.balance_routes["/api/status"] = lambda h: (200, {"success": True, "message": "", "data": status})
        if token is not None:
            def usage_token(headers):
                auth = headers.get("Authorization") or ""
                if not auth.startswith("Bearer ") or auth.endswith("bad"):
                    return 401, {"success": False, "message": "无效的令牌"}
                granted, used = token.get("granted", 0), token.get("used", 0)
                return 200, {"code": True, "message": "ok", "data": {
                    "object": "token_usage", "name": "Default Token", "total_granted": granted, "total_used": used,
                    "total_available": granted - used, "unlimited_quota": bool(token.get("unlimited")),
                    "model_limits": {}, "model_limits_enabled": False, "expires_at": 0}}
            self.balance_routes["/api/usage/token"] = usage_token
        if credits is not None:
            self.balance_routes["/v1/credits"] = lambda h: (200, {"data": {"total_usage": credits}})

    def sub2api(self, answer):
        """Answer GET /v1/usage as sub2api does (answer: its JSON, see the tests' shapes)."""
        self.balance_routes["/v1/usage"] = lambda h: (200, answer)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
