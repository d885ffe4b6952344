"""Tier 2: the real proxy on port 0 against the mock upstream, over real sockets."""

import http.client
import json
import os
import socket
import struct
import threading
import time

import pytest

import ccproxy
from conftest import APIKEY, KEY_A, KEY_B, make_config, start_proxy, wait_for, write_config

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 64,
           "messages": [{"role": "user", "content": "a secret prompt 7731"}]}
CLAUDE_HEADERS = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
                  "User-Agent": "claude-cli/2.1.197 (external, cli)", "x-app": "cli",
                  "X-Claude-Code-Session-Id": "sess-1", "X-Stainless-Lang": "js",
                  "anthropic-dangerous-direct-browser-access": "true",
                  "Accept-Encoding": "gzip, deflate, br, zstd",
                  "Connection": "keep-alive, X-Hop", "X-Hop": "drop-me", "Keep-Alive": "timeout=5"}


def events_of(data):
    """The SSE events in a body, as (event, parsed data) pairs."""
    out = []
    for block in data.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# -- relaying requests and headers


def test_non_streaming_message_is_relayed_with_headers(proxy, upstream):
    status, headers, data = proxy.call("POST", "/v1/messages?beta=true", MESSAGE, CLAUDE_HEADERS)
    assert status == 200
    assert json.loads(data)["content"][0]["text"] == "hello"
    assert headers["x-ccproxy-provider"] == "alpha" and headers["request-id"] == "req_mock"
    got = upstream.last
    assert got.method == "POST" and got.path == "/v1/messages?beta=true"
    for name, value in CLAUDE_HEADERS.items():
        if name.lower() not in ("accept-encoding", "connection", "x-hop", "keep-alive"):
            assert got.headers[name.lower()] == value
    assert "x-hop" not in got.headers and "keep-alive" not in got.headers
    assert got.headers["accept-encoding"] == "identity"
    assert got.headers["host"] == "127.0.0.1:%d" % upstream.port
    assert got.headers["content-length"] == str(len(got.body))
    # the client's key never reaches the provider: the provider's does, in the client's style
    assert got.headers["x-api-key"] == KEY_A and "authorization" not in got.headers
    assert APIKEY not in json.dumps(got.header_list)


def test_body_is_forwarded_byte_for_byte_when_nothing_changes(proxy, upstream):
    raw = b'{"model": "claude-sonnet-4-5",   "messages": [{"role": "system", "content": "x"}],' \
          b' "future_field": {"a": 1}, "metadata": {"user_id": "{\\"k\\":1}"}, "max_tokens": 5}'
    status, _, _ = proxy.call("POST", "/v1/messages", raw, {"Content-Type": "application/json"})
    assert status == 200
    assert upstream.last.body == raw


def test_bearer_client_gets_bearer_upstream(proxy, upstream):
    status, _, _ = proxy.call("POST", "/v1/messages", MESSAGE,
                              {"Authorization": "Bearer " + APIKEY}, key=None)
    assert status == 200
    assert upstream.last.headers["authorization"] == "Bearer " + KEY_A
    assert "x-api-key" not in upstream.last.headers


def test_other_paths_and_methods_are_relayed_with_query(proxy, upstream):
    status, _, data = proxy.call("POST", "/v1/messages/count_tokens?beta=true", MESSAGE)
    assert status == 200 and json.loads(data) == {"input_tokens": 42}
    assert upstream.last.path == "/v1/messages/count_tokens?beta=true"
    status, _, data = proxy.call("GET", "/v1/files?limit=3")
    assert status == 404 and upstream.last.path == "/v1/files?limit=3"
    assert json.loads(data)["error"]["type"] == "not_found_error"  # the provider's own error


def test_upstream_errors_pass_through_untouched(proxy, upstream):
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    upstream.fail_next(status=529, body=body, headers={"retry-after": "7"})
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 529 and json.loads(data) == body and headers["retry-after"] == "7"


def test_chunked_request_body_is_accepted(proxy, upstream):
    body = json.dumps(MESSAGE).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    head = ("POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/json\r\n\r\n" % APIKEY).encode()
    sock.sendall(head + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:]))
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    assert resp.status == 200 and json.loads(resp.read())["type"] == "message"
    sock.close()
    assert upstream.last.body == body
    assert upstream.last.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in upstream.last.headers


def test_oversized_body_gets_413(tmp_path, upstream):
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, MAX_BODY_MB=0.01)))
    try:
        status, headers, data = proxy.call("POST", "/v1/messages", b"x" * 20000)
        assert status == 413 and json.loads(data)["error"]["type"] == "request_too_large"
        assert not upstream.requests
    finally:
        proxy.stop()


@pytest.mark.parametrize("headers, key", [({}, None), ({}, "wrong"), ({"Authorization": "Basic " + APIKEY}, None)])
def test_wrong_or_missing_key_is_401(proxy, upstream, headers, key):
    status, _, data = proxy.call("POST", "/v1/messages", MESSAGE, headers, key=key)
    assert status == 401
    assert json.loads(data)["error"]["type"] == "authentication_error"
    assert not upstream.requests


def test_probes_answer_without_auth(proxy):
    assert proxy.call("HEAD", "/", key=None)[0] == 200
    for path in ("/api/hello", "/healthz"):
        assert proxy.call("GET", path, key=None)[0] == 200
        assert proxy.call("HEAD", path, key=None)[0] == 200
    status, _, data = proxy.call("GET", "/nowhere", key=None)
    assert status == 404 and json.loads(data)["type"] == "error"


def test_local_model_list(proxy, upstream):
    status, _, data = proxy.call("GET", "/v1/models?limit=1")
    page = json.loads(data)
    assert status == 200 and page["data"][0]["id"] == "claude-sonnet-4-5" and page["has_more"]
    status, _, data = proxy.call("GET", "/v1/models/claude-haiku-4-5")
    assert status == 200 and json.loads(data)["id"] == "claude-haiku-4-5"
    assert proxy.call("GET", "/v1/models/nope")[0] == 404
    assert not upstream.requests


# -- presets, mapping, switching


def test_switching_changes_the_next_requests_upstream(proxy, upstream, upstream2):
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
    proxy.store.select("beta")
    status, headers, data = proxy.call("POST", "/v1/messages?beta=true", MESSAGE)
    assert status == 200 and headers["x-ccproxy-provider"] == "beta"
    got = upstream2.last
    assert got.path == "/anthropic/v1/messages?beta=true"          # the prefix stays
    assert got.headers["authorization"] == "Bearer " + KEY_B      # provider's auth style
    assert "x-api-key" not in got.headers
    assert got.json["model"] == "glm-4.6"                          # mapped: sonnet family
    assert len(upstream.requests) == 1


def test_presets_apply_to_headers_and_body(proxy, upstream):
    proxy.store.set_overrides("alpha", "ua", "nothink")
    body = dict(MESSAGE, thinking={"type": "enabled", "budget_tokens": 1024})
    assert proxy.call("POST", "/v1/messages", body, CLAUDE_HEADERS)[0] == 200
    got = upstream.last
    assert got.headers["user-agent"] == "relay-ua" and "x-app" not in got.headers
    assert "thinking" not in got.json and got.json["metadata"] == {"tag": "x"}
    assert got.headers["content-length"] == str(len(got.body))


def test_model_mapping_can_be_turned_off(tmp_path, upstream, upstream2):
    config = make_config(upstream, upstream2, MODEL_MAPPING=False)
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        proxy.store.select("beta")
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert upstream2.last.json["model"] == "claude-sonnet-4-5"
    finally:
        proxy.stop()


def test_model_mapping_is_logged(proxy, upstream2, log_lines):
    proxy.store.select("beta")
    proxy.call("POST", "/v1/messages", dict(MESSAGE, model="claude-3-5-haiku[1m]"))
    assert upstream2.last.json["model"] == "glm-4.5-air"
    assert wait_for(lambda: "model claude-3-5-haiku[1m] → glm-4.5-air" in log_lines.text)
    proxy.call("POST", "/v1/messages", dict(MESSAGE, model="claude-opus-4-1"))
    assert upstream2.last.json["model"] == "glm-4.6-plus"


# -- streaming


def read_events_with_arrival(resp):
    """Read an SSE response piece by piece: [(arrival time, event, data)]."""
    buf, out = b"", []
    while True:
        piece = resp.read1(65536)
        if not piece:
            return out
        buf += piece
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for event, data in events_of(block + b"\n\n"):
                out.append((time.time(), event, data))


def test_stream_events_arrive_as_the_upstream_sends_them(proxy, upstream):
    upstream.event_delay = 0.3
    upstream.words = 4
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", "/v1/messages?beta=true", json.dumps(dict(MESSAGE, stream=True)),
                 {"x-api-key": APIKEY, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Type") == "text/event-stream"
    events = read_events_with_arrival(resp)
    conn.close()
    assert [e for _, e, _ in events][:2] == ["message_start", "content_block_start"]
    assert events[-1][1] == "message_stop"
    deltas = [(at, data["sent_at"]) for at, event, data in events if event == "content_block_delta"]
    assert len(deltas) == 4
    # each event reached the client before the upstream even sent the next one (0.3 s later)
    for (arrived, _), (_, next_sent) in zip(deltas, deltas[1:]):
        assert arrived < next_sent


def test_keep_alive_works_both_ways(proxy, upstream):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    hdrs = {"x-api-key": APIKEY, "Content-Type": "application/json"}
    for stream in (True, False, True, False):
        conn.request("POST", "/v1/messages", json.dumps(dict(MESSAGE, stream=stream)), hdrs)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()
    assert upstream.connections == 1        # one pooled upstream connection served all four
    assert proxy.server.pool.opened == 1


def test_upstream_dying_mid_stream_gives_an_sse_error(proxy, upstream):
    upstream.fail_next("cut", after=3)
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    events = events_of(data)
    assert [e for e, _ in events][:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
    assert events[-1][1]["error"]["type"] == "api_error"
    # the proxy stays usable afterwards
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_broken_chunked_framing_from_the_provider_ends_in_an_sse_error(proxy, upstream):
    upstream.fail_next("bad_chunk", pause=0.3)
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    events = events_of(data)        # http.client read the proxy's own framing without complaint
    assert status == 200 and events[0][0] == "message_start"
    assert events[-1][0] == "error" and "bad chunked framing" in events[-1][1]["error"]["message"]
    # broken before the first event was passed on: nothing was sent, so it is a clean 502
    upstream.fail_next("bad_chunk")
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 502 and "bad HTTP from the provider" in json.loads(data)["error"]["message"]
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_client_leaving_mid_stream_closes_the_upstream_at_once(proxy, upstream):
    upstream.event_delay = 0.1
    upstream.words = 100          # 10 s of stream if nobody stops it
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    body = json.dumps(dict(MESSAGE, stream=True)).encode()
    sock.sendall(request_bytes(body, close=False))
    got = b""
    while b"content_block_delta" not in got:
        got += sock.recv(4096)
    sock.close()
    assert upstream.aborted.wait(5), "the proxy kept reading the upstream after the client left"
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert upstream.connections == 2      # the broken connection was not reused


# -- failures the proxy answers itself


def test_unreachable_provider_is_502(tmp_path, upstream):
    config = make_config(upstream)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    config["Providers"][0]["api_base_url"] = "http://127.0.0.1:%d/v1/messages" % dead_port
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
        err = json.loads(data)["error"]
        assert status == 502 and err["type"] == "api_error" and "connection refused" in err["message"]
    finally:
        proxy.stop()


def test_silent_provider_is_504(tmp_path, upstream):
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, API_TIMEOUT_MS=300)))
    try:
        upstream.fail_next("stall", seconds=2)
        status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
        assert status == 504 and "did not answer in time" in json.loads(data)["error"]["message"]
    finally:
        proxy.stop()


def test_no_provider_tells_what_to_fix_and_stops_retries(tmp_path, upstream):
    config = make_config(upstream)
    config["Providers"] = [{"name": "only a separator", "api_base_url": ""}]
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
        assert status == 500 and headers["x-should-retry"] == "false"
        assert "api_base_url" in json.loads(data)["error"]["message"]
    finally:
        proxy.stop()


def test_cross_origin_preflight_is_refused(proxy):
    status, headers, _ = proxy.call("OPTIONS", "/api/state", key=None,
                                    headers={"Origin": "https://evil.example",
                                             "Access-Control-Request-Method": "POST"})
    assert status == 403 and not any(h.startswith("access-control-allow") for h in headers)


# -- concurrency, cleanup, logs


def test_256_concurrent_streams_all_complete(proxy, upstream):
    upstream.event_delay = 0.02
    results = []
    threads_before = threading.active_count()

    def one():
        try:
            status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True), timeout=60)
            ok = status == 200 and events_of(data)[-1][0] == "message_stop"
            results.append(True if ok else (status, data[-300:]))
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(256)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert results.count(True) == 256, [r for r in results if r is not True][:3]
    # the connections were closed: their threads end with them (the mock provider keeps one
    # thread for each connection the proxy pools, POOL_MAX_IDLE at most)
    assert wait_for(lambda: not proxy.server.connections, 10)
    assert wait_for(lambda: threading.active_count() <= threads_before + ccproxy.POOL_MAX_IDLE + 2, 10)


def _socket_fds():
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except FileNotFoundError:
            continue  # the listing's own descriptor, gone already
        if target.startswith("socket:"):
            found.add(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count sockets")
def test_a_run_leaves_no_thread_or_socket_behind(config_file, upstream):
    before_fds = _socket_fds()
    proxy = start_proxy(config_file)
    idle = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    idle.request("GET", "/healthz")
    idle.getresponse().read()              # left open: an idle keep-alive client
    for stream in (True, False):
        proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=stream))
    proxy.stop()
    idle.close()
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "ccproxy-conn"]
    assert proxy.server.pool.idle == {}
    assert _socket_fds() - before_fds == set()


def test_logs_never_carry_keys_or_prompts(proxy, upstream, upstream2, log_lines):
    proxy.call("POST", "/v1/messages?beta=true", MESSAGE)
    proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    proxy.call("POST", "/v1/messages", MESSAGE, key="sk-wrong-key-123456789")
    proxy.store.select("beta")
    proxy.call("POST", "/v1/messages", MESSAGE)
    upstream2.fail_next("cut", after=2)
    proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert wait_for(lambda: log_lines.text.count("POST /v1/messages") == 5)
    text = log_lines.text
    assert "POST /v1/messages → alpha" in text and "→ beta" in text
    for secret in (APIKEY, KEY_A, KEY_B, "sk-wrong-key-123456789", "secret prompt 7731"):
        assert secret not in text


def test_debug_logs_bodies_but_still_no_keys(config_file, upstream, log_lines):
    proxy = start_proxy(config_file, debug=True)
    try:
        body = dict(MESSAGE, system="use key %s please" % KEY_A)
        proxy.call("POST", "/v1/messages", body)
        assert wait_for(lambda: "POST /v1/messages" in log_lines.text)
    finally:
        proxy.stop()
    assert "secret prompt 7731" in log_lines.text
    assert KEY_A not in log_lines.text and APIKEY not in log_lines.text


def test_an_unexpected_error_is_answered_500_and_logged_once(proxy, upstream, log_lines, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(ccproxy, "prepare_body", broken)
    status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 500 and json.loads(data)["error"]["type"] == "api_error"
    assert wait_for(lambda: log_lines.text.count("Traceback") == 1)
    monkeypatch.undo()
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_http10_client_gets_a_close_delimited_stream(proxy, upstream):
    body = json.dumps(dict(MESSAGE, stream=True)).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(("POST /v1/messages HTTP/1.0\r\nx-api-key: %s\r\nContent-Length: %d\r\n\r\n"
                  % (APIKEY, len(body))).encode() + body)
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            break                       # the proxy closes: that is how the body ends
        data += piece
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    # an HTTP/1.1 server names its own version (RFC 9110 §2.5); the body must not be chunked
    assert head.split()[1] == b"200" and b"chunked" not in head.lower()
    assert events_of(rest)[-1][0] == "message_stop"


def test_head_is_relayed_without_a_body(proxy, upstream):
    status, headers, data = proxy.call("HEAD", "/v1/files")
    assert status == 404 and data == b"" and upstream.last.method == "HEAD"
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200      # the connection pool is fine after


def test_a_silent_client_is_disconnected(proxy, monkeypatch):
    monkeypatch.setattr(ccproxy.Handler, "timeout", 0.3)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")     # and then nothing more
    sock.settimeout(5)
    started = time.monotonic()
    assert sock.recv(1024) == b""                                   # closed by the proxy
    assert time.monotonic() - started < 4
    sock.close()


def read_until_closed(sock):
    got = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            sock.close()
            return got
        got += piece


def raw_exchange(port, data, timeout=5):
    """Send raw bytes on a new connection; everything the proxy answers until it closes."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    sock.sendall(data)
    return read_until_closed(sock)


def request_bytes(body=None, close=True, path=b"/v1/messages"):
    body = json.dumps(MESSAGE).encode() if body is None else body
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, APIKEY.encode(), len(body), b"Connection: close\r\n" if close else b"", body))


def test_client_connections_get_nodelay_and_the_client_timeout(proxy, upstream):
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        sock.sendall(request_bytes(close=False))
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 200 and b'"hello"' in resp.read()
        (served,) = proxy.server.connections
        assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if ccproxy.KERNEL_TIMEOUTS:
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                seconds, _ = struct.unpack("ll", served.getsockopt(socket.SOL_SOCKET, option, 16))
                assert seconds == int(ccproxy.CLIENT_TIMEOUT_S)
        else:
            assert served.gettimeout() == ccproxy.CLIENT_TIMEOUT_S
    finally:
        sock.close()


def test_a_pause_inside_a_request_keeps_the_connection(proxy, upstream):
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.settimeout(5)
    first = request_bytes(close=False)
    sock.sendall(first[:30])
    time.sleep(0.2)
    sock.sendall(first[30:])
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    assert resp.status == 200 and b'"hello"' in resp.read()
    time.sleep(0.2)                         # an idle keep-alive connection, then a request
    sock.sendall(request_bytes())
    assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")


def test_expect_100_continue_is_answered_before_the_body(proxy, upstream):
    body = json.dumps(MESSAGE).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.settimeout(5)      # a 100 Continue held back would leave both sides waiting
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\nContent-Length: %d\r\n"
                 b"Expect: 100-continue\r\nConnection: close\r\n\r\n" % (APIKEY.encode(), len(body)))
    assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n")
    sock.sendall(body)
    data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and b'"hello"' in data
    assert upstream.last.body == body


@pytest.mark.parametrize("request_head", [
    b"POST /v1/mess\x01ages HTTP/1.1\r\nHost: x\r\n\r\n",              # control character in the target
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Evil: a\rInjected: 1\r\n\r\n",   # bare CR in a value
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Evil: a\x00b\r\n\r\n",            # NUL in a value
])
def test_control_characters_in_a_request_are_refused(proxy, upstream, request_head):
    answer = raw_exchange(proxy.port, request_head)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []                              # nothing reached the provider


@pytest.mark.parametrize("request_line, status", [(b"GARBAGE\r\n", 400), (b"GET / HTTP/2.0\r\n", 505)])
def test_a_broken_request_line_gets_a_status_line_and_a_json_error(proxy, request_line, status):
    head, _, body = raw_exchange(proxy.port, request_line + b"\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)      # http.server alone answers these as HTTP/0.9
    assert json.loads(body)["type"] == "error"


def test_a_provider_closing_each_connection_is_followed(proxy, upstream):
    upstream.close_connections = True
    for stream in (False, True, False):
        status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=stream))
        assert status == 200 and (b"message_stop" in data if stream else b'"hello"' in data)
    assert upstream.connections == 3 and proxy.server.pool.opened == 3    # none reused after a close
    assert not proxy.server.pool.idle.get(next(iter(proxy.server.pool.idle), None))


def test_a_stall_on_a_pooled_connection_is_a_timeout_not_a_retry(tmp_path, upstream):
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, API_TIMEOUT_MS=300)))
    try:
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200        # pools the connection
        upstream.fail_next("stall", seconds=2)
        status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
        assert status == 504 and "did not answer in time" in json.loads(data)["error"]["message"]
        assert len(upstream.requests) == 2          # the stalled request was not sent again
    finally:
        proxy.stop()


# -- holes a rebuild of the relay core could open


def test_a_chunked_body_over_the_limit_gets_413(tmp_path, upstream):
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, MAX_BODY_MB=0.01)))
    try:
        chunk = b"x" * 4000
        head = ("POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\nTransfer-Encoding: chunked\r\n"
                "Content-Type: application/json\r\n\r\n" % APIKEY).encode()
        answer = raw_exchange(proxy.port, head + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 4 + b"0\r\n\r\n")
        status_line, _, body = answer.partition(b"\r\n\r\n")
        assert status_line.startswith(b"HTTP/1.1 413 ")
        assert json.loads(body)["error"]["type"] == "request_too_large"
        assert not upstream.requests
    finally:
        proxy.stop()


def idle_connections(proxy, upstream, requests):
    """The upstream connections the proxy's pool holds for this mock, once the proxy has
    finished with `requests` requests (it pools a connection after the answer went out)."""
    assert wait_for(lambda: len(proxy.server.recorder.request_log.newest(requests)) >= requests)
    return sum(len(stack) for key, stack in proxy.server.pool.idle.items() if key[2] == upstream.port)


def test_no_connection_is_pooled_after_a_first_event_timeout(tmp_path, upstream, upstream2):
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, upstream2, Fallback=["beta"],
                                                                      FIRST_BYTE_TIMEOUT_MS=300)))
    try:
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert idle_connections(proxy, upstream, 1) == 1        # a good answer leaves one to reuse
        upstream.fail_next("silent_stream", seconds=2)
        status, headers, _ = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
        assert status == 200 and headers["x-ccproxy-provider"] == "beta"
        assert idle_connections(proxy, upstream, 2) == 0        # the timed-out one was not put back
    finally:
        proxy.stop()


@pytest.mark.parametrize("failure", [{"kind": "cut", "after": 3}, {"kind": "bad_chunk", "pause": 0.2}])
def test_no_connection_is_pooled_after_a_broken_stream(proxy, upstream, failure):
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert idle_connections(proxy, upstream, 1) == 1
    upstream.fail_next(**failure)
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and events_of(data)[-1][0] == "error"
    assert idle_connections(proxy, upstream, 2) == 0
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200   # and a new one works


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
def test_the_status_reaches_the_client_before_a_slow_body(proxy, upstream, content_type):
    """A non-streamed answer of unknown length: the head must not wait for the first piece.
    The mock holds the body until the client has the status line, so a head held back
    would leave both waiting (and the client's read time out). (A 200 to /v1/messages is
    held until it shows a message: test_failover's gate tests.)"""
    release = threading.Event()
    upstream.fail_next("slow_body", release=release, content_type=content_type, body=b'{"late": true}')
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.settimeout(5)
    try:
        sock.sendall(request_bytes(path=b"/v1/messages/count_tokens"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 ")
        release.set()
        rest = read_until_closed(sock)
        assert b'{"late": true}' in head + rest
    finally:
        release.set()
        sock.close()
