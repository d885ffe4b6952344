"""HTTP framing, strictly, in both directions (RFC 9110/9112): what is ambiguous is refused
before anything reaches a provider, and no client ever receives another client's answer."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import ccproxy
from conftest import APIKEY, ROOT, make_config, start_proxy, wait_for, write_config
from test_relay import MESSAGE, raw_exchange

BODY = json.dumps(MESSAGE).encode()
KEY = b"x-api-key: " + APIKEY.encode() + b"\r\n"


def post(head_lines=b"", body=BODY, length=True, path=b"/v1/messages", version=b"HTTP/1.1"):
    head = b"POST " + path + b" " + version + b"\r\nHost: x\r\n" + KEY + head_lines
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def chunked(*chunks, trailer=b""):
    return b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"


SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + KEY + b"\r\n"

# (what, raw request, status the client must get)
CASES = [
    ("a field name with a space", post(b"X Foo: bar\r\n"), 400),
    ("a field name with a colon before it", post(b": bar\r\n"), 400),
    ("a field name with a non-token character", post(b"X(Foo): bar\r\n"), 400),
    ("a control character in a value", post(b"X-Foo: a\x01b\r\n"), 400),
    ("a bare CR in a value", post(b"X-Foo: a\rInjected: 1\r\n"), 400),
    ("NUL in a value", post(b"X-Foo: a\x00b\r\n"), 400),
    ("Transfer-Encoding gzip", post(b"Transfer-Encoding: gzip\r\n", length=False), 501),
    ("Transfer-Encoding gzip, chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", chunked(b"5\r\nhello\r\n"),
                                             length=False), 501),
    ("Transfer-Encoding beside Content-Length",
     post(b"Transfer-Encoding: chunked\r\n", chunked(b"5\r\nhello\r\n")), 400),
    ("Content-Length +98", post(b"Content-Length: +98\r\n", length=False), 400),
    ("Content-Length 9_8", post(b"Content-Length: 9_8\r\n", length=False), 400),
    ("Content-Length 0x62", post(b"Content-Length: 0x62\r\n", length=False), 400),
    ("Content-Length -1", post(b"Content-Length: -1\r\n", length=False), 400),
    ("Content-Length with NBSP", post(b"Content-Length: \xa098\r\n", length=False), 400),
    ("two different Content-Lengths", post(b"Content-Length: 5\r\n"), 400),
    ("a Content-Length list that disagrees", post(b"Content-Length: 98, 99\r\n", length=False), 400),
    ("a Content-Length list that agrees", post(b"Content-Length: 98, 98\r\n", length=False), 400),
    ("the same Content-Length twice", post(b"Content-Length: 98\r\nContent-Length: 98\r\n", length=False), 400),
    ("a chunk size 0x10", post(b"Transfer-Encoding: chunked\r\n", chunked(b"0x10\r\n" + b"a" * 16 + b"\r\n"),
                               length=False), 400),
    ("a negative chunk size", post(b"Transfer-Encoding: chunked\r\n", chunked(b"-5\r\nhello\r\n"), length=False), 400),
    ("a chunk size 1_0", post(b"Transfer-Encoding: chunked\r\n", chunked(b"1_0\r\n" + b"a" * 16 + b"\r\n"),
                              length=False), 400),
    ("no CRLF after a chunk's data", post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n", length=False),
     400),
    ("a trailer section without end", post(b"Transfer-Encoding: chunked\r\n",
                                           chunked(b"5\r\nhello\r\n", trailer=b"X-T: 1\r\n" * 200), length=False), 400),
    ("a header block over 64 KB", post(b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))), 431),
    ("a header line over 64 KB", post(b"X-Long: " + b"v" * 70000 + b"\r\n"), 431),
    ("more than 100 fields", post(b"".join(b"X-F%d: v\r\n" % i for i in range(120))), 431),
    ("a method that is not a token", b"PO(ST /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("HTTP/2.0 on HTTP/1 framing", post(version=b"HTTP/2.0"), 505),
    ("HTTP/1.2", post(version=b"HTTP/1.2"), 505),
    ("/v1/../ in the path", post(path=b"/v1/../api/state"), 400),
    ("an encoded dot segment", post(path=b"/v1/%2e%2e/admin"), 400),
    ("a twice-encoded dot segment", post(path=b"/v1/%252e%252e/admin"), 400),
    ("a dot segment with an encoded slash", post(path=b"/v1/messages/..%2F..%2Fadmin"), 400),
    ("a single dot segment", post(path=b"/v1/./messages"), 400),
]


@pytest.mark.parametrize("what, request_bytes, status", CASES, ids=[c[0] for c in CASES])
def test_ambiguous_requests_are_refused_and_reach_no_provider(proxy, upstream, what, request_bytes, status):
    answer = raw_exchange(proxy.port, request_bytes + SMUGGLED)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head[:200]
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"          # and the connection is closed
    assert answer.count(b"HTTP/1.1 ") == 1                          # nothing after it was taken as a request
    assert json.loads(body.split(b"\r\n\r\n")[0])["type"] == "error"
    assert upstream.requests == []


@pytest.mark.parametrize("framing", [b"Transfer-Encoding: Chunked\r\n", b"Content-Length:  98 \r\n"])
def test_unambiguous_variants_are_accepted(proxy, upstream, framing):
    body = b'{"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "xyzw"}]}'
    assert len(body) == 98
    if b"Chunked" in framing:
        body = chunked(b"%x\r\n%s\r\n" % (len(body), body))
    head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + KEY + framing + b"Connection: close\r\n\r\n"
    answer = raw_exchange(proxy.port, head + body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert len(upstream.requests) == 1 and upstream.last.body.startswith(b'{"model"')


@pytest.mark.parametrize("path", [b"/healthz", b"/api/hello", b"/api/state", b"/v1/models", b"/metrics", b"/"])
def test_a_body_the_route_does_not_read_is_not_taken_for_the_next_request(proxy, upstream, path):
    body = SMUGGLED
    request = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + KEY + b"Content-Length: %d\r\n\r\n" % len(body) + body
    answer = raw_exchange(proxy.port, request)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b"\r\nConnection: close\r\n" in answer.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert upstream.requests == []


def test_an_unknown_method_is_405_with_allow(proxy, upstream):
    status, headers, data = proxy.call("BREW", "/v1/messages")
    assert status == 405 and "POST" in headers["allow"] and json.loads(data)["type"] == "error"
    assert upstream.requests == []


def test_100_continue_comes_only_after_the_key_was_accepted(proxy, upstream):
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.settimeout(5)
    try:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: wrong\r\nContent-Length: %d\r\n"
                     b"Expect: 100-continue\r\n\r\n" % len(BODY))
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in answer
    finally:
        sock.close()
    assert upstream.requests == []


def test_a_trickled_head_is_cut_at_its_deadline(proxy, upstream, monkeypatch):
    monkeypatch.setattr(ccproxy, "HEADER_DEADLINE_S", 0.5)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.settimeout(10)
    started = time.monotonic()
    try:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\n")
        closed = False
        for _ in range(60):             # a byte every 0.1 s: each receive alone is quick
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        if not closed:
            closed = sock.recv(100) == b""
        assert closed and time.monotonic() - started < 5
    finally:
        sock.close()
    assert upstream.requests == []
    assert proxy.call("GET", "/healthz")[0] == 200


def test_a_head_that_stops_halfway_is_cut_at_its_deadline(proxy, upstream, monkeypatch):
    """Part of a head, then silence: given up at HEADER_DEADLINE_S, not after the idle timeout
    (CLIENT_TIMEOUT_S, 120 s); and the connection before it keeps its idle timeout."""
    monkeypatch.setattr(ccproxy, "HEADER_DEADLINE_S", 0.5)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.settimeout(20)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(1.0)                     # idle between requests: longer than the head's deadline
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")     # and then nothing more
        assert sock.recv(100) == b"" and time.monotonic() - started < 10
    finally:
        sock.close()
    assert upstream.requests == []


# -- answers that must never reach the wrong client


def client_gets_its_own_answer(proxy, tag):
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, model="claude-sonnet-4-5-" + tag))
    return status == 200 and json.loads(data)["model"] == "claude-sonnet-4-5-" + tag


def test_a_request_smuggled_past_a_lenient_provider_reaches_no_one(proxy, upstream):
    """The mock provider is Python's http.server, which stops reading headers at a line it
    cannot parse and would take the body for the next request on the pooled connection."""
    smuggled_body = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    attack = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + KEY + b"X Foo: bar\r\nContent-Length: %d\r\n\r\n" \
        % len(smuggled_body) + smuggled_body
    assert raw_exchange(proxy.port, attack).startswith(b"HTTP/1.1 400 ")
    for tag in ("victim1", "victim2", "victim3"):
        assert client_gets_its_own_answer(proxy, tag)
    assert [r.path for r in upstream.requests] == ["/v1/messages"] * 3


def test_103_early_hints_do_not_leave_the_real_answer_in_the_pool(proxy, upstream):
    upstream.fail_next("early_hints")
    for tag in ("first", "second", "third"):
        assert client_gets_its_own_answer(proxy, tag)
        # back in the pool before the client had the answer's end: its next request finds it
        assert sum(len(stack) for stack in proxy.server.pool.idle.values()) == 1
    assert proxy.server.pool.opened == 1                     # the connection was reused, cleanly


def test_a_second_answer_to_one_request_is_never_given_to_the_next(proxy, upstream):
    upstream.fail_next("smuggle")
    status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 200 and json.loads(data)["model"] == "SMUGGLED"    # the first answer, as sent
    time.sleep(0.4)                 # the second one is now waiting on the idle pooled connection
    for tag in ("next1", "next2", "next3"):
        assert client_gets_its_own_answer(proxy, tag)


def test_answers_with_bad_framing_are_not_relayed_and_not_pooled(proxy, upstream):
    upstream.fail_next("status", status=200, body=b"{}", headers={"Transfer-Encoding": "gzip"})
    status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 502 and "bad HTTP from the provider" in json.loads(data)["error"]["message"]
    assert client_gets_its_own_answer(proxy, "after")


# -- hostile relays: memory stays bounded, time too


def proxy_process(tmp_path, upstream, **top):
    path = write_config(tmp_path / "config.json", make_config(upstream, **top))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().split("http://127.0.0.1:")[1].split()[0])
    return proc, port


def peak_rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the proxy's peak RSS from /proc")
@pytest.mark.parametrize("status", [200, 529])
def test_a_huge_answer_passes_through_in_bounded_memory(tmp_path, upstream, status):
    size = 150 << 20
    proc, port = proxy_process(tmp_path, upstream)
    try:
        upstream.fail_next("huge", status=status, size=size)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/messages", json.dumps(MESSAGE), {"x-api-key": APIKEY})
        resp = conn.getresponse()
        assert resp.status == status and int(resp.getheader("Content-Length")) == size
        got = 0
        while True:
            piece = resp.read(1 << 20)
            if not piece:
                break
            got += len(piece)
        conn.close()
        assert got == size
        assert peak_rss_mb(proc.pid) < 80, "the proxy held the answer in memory"
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the proxy's peak RSS from /proc")
def test_a_huge_error_body_is_read_only_as_far_as_needed_before_failover(tmp_path, upstream, upstream2):
    path = write_config(tmp_path / "config.json", make_config(upstream, upstream2, Fallback=["beta"]))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split("http://127.0.0.1:")[1].split()[0])
        upstream.fail_next("huge", status=529, size=300 << 20)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/messages", json.dumps(MESSAGE), {"x-api-key": APIKEY})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("x-ccproxy-provider") == "beta"
        resp.read()
        conn.close()
        assert upstream.aborted.wait(10)                    # the 529's body was not read to its end
        assert peak_rss_mb(proc.pid) < 80
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_a_dripping_answer_ends_at_api_timeout(tmp_path, upstream):
    """Past FIRST_CONTENT_MAX_BYTES the answer is the client's, and cut at API_TIMEOUT_MS."""
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, API_TIMEOUT_MS=1000)))
    try:
        upstream.fail_next("drip", piece=8000, every=0.02, count=3000)      # a minute of answer
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
        conn.request("POST", "/v1/messages", json.dumps(MESSAGE), {"x-api-key": APIKEY})
        resp = conn.getresponse()
        started = time.monotonic()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):      # cut, never passed off as complete
            resp.read()
        assert time.monotonic() - started < 10
        conn.close()
        assert upstream.aborted.wait(10)
    finally:
        proxy.stop()


def test_a_dripping_answer_that_shows_no_message_ends_in_a_504(tmp_path, upstream):
    """Within FIRST_CONTENT_MAX_BYTES nothing reaches the client before the body is a message:
    one that drips on for ever is given up at API_TIMEOUT_MS, with ccproxy's own error."""
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, API_TIMEOUT_MS=1000)))
    try:
        upstream.fail_next("drip", piece=100, every=0.1, count=600)
        status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
        answer = json.loads(data)
        assert status == 504 and answer["code"] == "gate_failed" and answer["values"]["gate"]["code"] == "gate_no_content"
        assert upstream.aborted.wait(10)
    finally:
        proxy.stop()


def test_a_client_leaving_a_non_streamed_answer_stops_the_upstream_read(proxy, upstream):
    upstream.fail_next("drip", piece=8000, every=0.05, count=2000)    # past FIRST_CONTENT_MAX_BYTES at once
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(post(b"Connection: close\r\n"))
    sock.settimeout(5)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    sock.close()
    assert upstream.aborted.wait(10), "the proxy kept reading for a client that had left"
    assert wait_for(lambda: proxy.call("GET", "/healthz")[0] == 200)
