"""The relay's decisions without sockets: Relay reads canned provider answers (Response over
bytes) through a stand-in pool and writes through a ClientWriter into a list."""

import io
import json

import pytest

import ccproxy

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def answer(status, body=b"", headers=(), chunked=False):
    lines = ["HTTP/1.1 %d X" % status] + ["%s: %s" % h for h in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


SSE = (b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n"
       b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},"
       b"\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")


BLOCK = b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0}\n\n"
REPLY = b'{"type":"message","content":[{"type":"text","text":"hi"}]}'


class FakeSocket:
    def gettimeout(self):
        return None

    def settimeout(self, seconds):
        pass

    def setsockopt(self, *args):
        pass


class FakeConn:
    def __init__(self):
        self.sock = FakeSocket()
        self.timeout = None
        self.closed = False

    def close(self):
        self.closed = True


class Scripted(io.RawIOBase):
    """A provider's bytes arriving in the given pieces, one per receive (a deadline is noted,
    as SocketStream takes it, and never reached)."""

    deadline = None

    def end_deadline(self):
        self.deadline = None

    def __init__(self, pieces):
        super().__init__()
        self.pieces = list(pieces)

    def readable(self):
        return True

    def readinto(self, buf):
        if not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        size = min(len(buf), len(piece))
        buf[:size] = piece[:size]
        if size < len(piece):
            self.pieces.insert(0, piece[size:])
        return size


class FakePool:
    """Pool.request and Pool.release over canned answers: {provider: [answer]}, an answer being
    raw bytes, a list of the pieces they arrive in, or an exception to raise."""

    def __init__(self, answers):
        self.answers = answers
        self.sent = []                  # (provider, method, path, headers, body)
        self.pooled = []                # providers whose connection went back to the pool
        self.conns = []

    def request(self, target, method, path, headers, body, timeout):
        self.sent.append((target.name, method, target.prefix + path, dict((k.lower(), v) for k, v in headers), body))
        raw = self.answers[target.name].pop(0)
        if isinstance(raw, Exception):
            raise raw
        conn = FakeConn()
        self.conns.append(conn)
        return conn, ccproxy.Response(io.BufferedReader(Scripted(raw if isinstance(raw, list) else [raw])), method)

    def release(self, target, conn, resp):
        if resp is not None and resp.complete and not resp.will_close:
            self.pooled.append(target.name)
        else:
            conn.close()


class Streams:
    def stream_opened(self):
        pass

    def stream_closed(self):
        pass


def view(fallback=("beta",), **top):
    raw = {"APIKEY": "sk-ccproxy-core-0123456789", "Providers": [
        {"name": "alpha", "api_base_url": "https://a.example/v1/messages", "api_key": "sk-a-1234567890",
         "models": ["claude-sonnet-4-5"]},
        {"name": "beta", "api_base_url": "https://b.example/anthropic", "api_key": "sk-b-1234567890",
         "auth": "bearer", "models": ["glm-4.6"], "env-models": {"ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6"}}],
        "Fallback": list(fallback)}
    raw.update(top)
    config = ccproxy.validate_config(raw)
    targets = {p.name: ccproxy.Target(config, p, {}, {}) for p in config.providers}
    return ccproxy.View(config, targets, "alpha", tuple(fallback), True)


def run(answers, body=None, method="POST", path="/v1/messages", fallback=("beta",), headers=(), **top):
    pool, sent = FakePool(answers), []
    exchange = ccproxy.Exchange()
    relay = ccproxy.Relay(view(fallback, **top), ccproxy.Health(), pool, ccproxy.ClientWriter(sent.append),
                          exchange, Streams())
    request_headers = ccproxy.Headers([("x-api-key", "client-key"), ("Content-Type", "application/json")]
                                      + list(headers))
    body = json.dumps(MESSAGE).encode() if body is None else body
    relay.run(ccproxy.ClientRequest(method, path, request_headers, body))
    return pool, sent, exchange, relay


def parse(sent):
    """(status, headers, body) of what the client was sent."""
    resp = ccproxy.Response(io.BufferedReader(io.BytesIO(b"".join(sent))), "POST")
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_a_529_moves_on_with_the_next_providers_own_settings():
    ok = answer(200, b'{"type":"message"}', [("Content-Type", "application/json")])
    pool, sent, exchange, _ = run({"alpha": [answer(529, b'{"type":"error"}')], "beta": [ok]})
    status, headers, body = parse(sent)
    assert status == 200 and body == b'{"type":"message"}'
    assert headers["x-ccproxy-provider"] == "beta" and headers["x-ccproxy-attempts"] == "alpha 529, beta 200"
    (_, _, _, alpha_headers, _), (_, _, path, beta_headers, beta_body) = pool.sent
    assert alpha_headers["x-api-key"] == "sk-a-1234567890" and beta_headers["authorization"] == "Bearer sk-b-1234567890"
    assert path == "/anthropic/v1/messages" and json.loads(beta_body)["model"] == "glm-4.6"
    assert pool.conns[0].closed and pool.pooled == ["beta"]     # the failed answer's connection is not reused
    assert exchange.attempts == [("alpha", "529", "claude-sonnet-4-5")]


def test_the_head_and_the_body_leave_in_one_write():
    ok = answer(200, b'{"type":"message"}', [("Content-Type", "application/json")])
    _, sent, _, _ = run({"alpha": [ok]})
    assert len(sent) == 1 and sent[0].startswith(b"HTTP/1.1 200 OK\r\n") and sent[0].endswith(b'{"type":"message"}')


def test_a_stream_holds_its_first_event_then_relays_the_rest_chunked():
    sse = answer(200, SSE, [("Content-Type", "text/event-stream")], chunked=True)
    _, sent, exchange, _ = run({"alpha": [sse]}, body=json.dumps(dict(MESSAGE, stream=True)).encode())
    status, headers, body = parse(sent)
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body == SSE
    assert exchange.stream and exchange.usage.as_dict()["output"] == 2 and exchange.usage.stop_reason == "end_turn"


def test_the_last_failure_is_answered_as_it_was_even_when_it_is_larger_than_what_is_held():
    big = b'{"type":"error","error":{"type":"overloaded_error","message":"' + b"x" * 200000 + b'"}}'
    pool, sent, exchange, _ = run({"alpha": [answer(529, big, [("retry-after", "3")])]}, fallback=())
    status, headers, body = parse(sent)
    assert status == 529 and body == big and headers["retry-after"] == "3"
    assert "x-ccproxy-attempts" not in headers and exchange.attempts == []


def test_a_network_failure_on_every_candidate_is_ccproxys_own_502():
    pool = None
    with pytest.raises(ccproxy.UpstreamError) as info:
        pool, _, _, _ = run({"alpha": [ConnectionRefusedError()], "beta": [ConnectionRefusedError()]})
    assert info.value.status == 502 and "connection refused" in str(info.value)
    assert dict(info.value.headers)["x-ccproxy-attempts"] == "alpha connection refused, beta connection refused"


def test_bad_framing_from_a_provider_moves_on_and_is_never_relayed():
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz"
    ok = answer(200, REPLY, [("Content-Type", "application/json")])
    pool, sent, _, _ = run({"alpha": [bad], "beta": [ok]})
    status, headers, _ = parse(sent)
    assert status == 200 and headers["x-ccproxy-attempts"].startswith("alpha bad HTTP from the provider")


@pytest.mark.parametrize("interim", [b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
                                     b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"])
def test_interim_answers_are_skipped(interim):
    ok = answer(200, REPLY, [("Content-Type", "application/json")])
    pool, sent, _, _ = run({"alpha": [interim + ok]})
    assert parse(sent)[:1] == (200,) and parse(sent)[2] == REPLY and pool.pooled == ["alpha"]


@pytest.mark.parametrize("raw, pooled", [
    (answer(200, b"{}", chunked=True) + b"EXTRA", False),           # bytes after the last chunk
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}", False),    # until the close
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", False),
    (answer(200, b"{}", [("Connection", "close")]), False),
    (answer(200, b"{}"), True),
])
def test_a_connection_is_pooled_only_when_its_framing_is_certain(raw, pooled):
    pool, sent, _, _ = run({"alpha": [raw]}, path="/v1/messages/count_tokens")
    assert parse(sent)[0] == 200 and (pool.pooled == ["alpha"]) is pooled


def test_a_stream_broken_mid_way_ends_with_an_sse_error_event():
    start = SSE.split(b"\n\n")[0] + b"\n\n" + BLOCK
    broken = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" +
              b"%x\r\n%s\r\n" % (len(start), start), b"zz\r\n"]        # then framing that is not chunked
    pool, sent, exchange, relay = run({"alpha": [broken]}, body=json.dumps(dict(MESSAGE, stream=True)).encode())
    status, _, body = parse(sent)
    assert status == 200 and body.startswith(start) and b"event: error" in body
    assert exchange.midstream_error and not relay.close and pool.conns[0].closed


def test_a_sized_answer_cut_short_closes_instead_of_passing_for_complete():
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\""
    pool, sent, exchange, relay = run({"alpha": [cut]}, path="/v1/messages/count_tokens")
    assert b"".join(sent).endswith(b'{"partial"') and relay.close and exchange.midstream_error


def test_a_signature_error_is_stripped_and_retried_once_on_the_same_provider():
    error = b'{"type":"error","error":{"type":"invalid_request_error","message":"Invalid signature in thinking block"}}'
    turns = dict(MESSAGE, messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "t", "signature": "other"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"}])
    ok = answer(200, REPLY, [("Content-Type", "application/json")])
    pool, sent, exchange, _ = run({"alpha": [answer(400, error), ok]}, body=json.dumps(turns).encode(),
                                  headers=[("X-Claude-Code-Session-Id", "s1")])
    assert parse(sent)[0] == 200 and [s[0] for s in pool.sent] == ["alpha", "alpha"]
    assert json.loads(pool.sent[1][4])["messages"][1]["content"] == [{"type": "text", "text": "b"}]
    assert exchange.note == "thinking signatures stripped, retried"


def test_head_requests_keep_the_providers_content_length():
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n"
    _, sent, _, _ = run({"alpha": [raw]}, body=b"", method="HEAD", path="/v1/files")
    assert b"\r\nContent-Length: 1234\r\n" in sent[0] and sent[0].endswith(b"\r\n\r\n")


@pytest.mark.parametrize("held, verdict", [
    (b"", None),
    (b"event: message_start\ndata: {}\n\nevent: ping\ndata: {}\n\n", None),
    (b"event: message_start\ndata: {}\n\nevent: content_block_start\ndata: {}", None),    # not complete yet
    (b"event: message_start\r\ndata: {}\r\n\r\nevent: content_block_start\r\ndata: {}\r\n\r\n", "commit"),
    (b'data: {"type":"content_block_delta","delta":{}}\n\n', "commit"),           # no event: lines
    (b"event: message_stop\ndata: {}\n\n", "commit"),                             # an empty message ends
    (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n', "fail"),
    (b'data: {"type": "error", "error": {"type": "api_error"}}\n\n', "fail"),
    (b'event: error\ndata: {"type":"error","error":{"type":"invalid_request_error"}}\n\n', "commit"),
    (b': keep-alive comment\n\n', None),
])
def test_stream_verdict(held, verdict):
    assert ccproxy.stream_verdict(held) == verdict


def test_a_stream_is_not_relayed_before_its_content_nor_after_an_error_event():
    start = SSE.split(b"\n\n")[0] + b"\n\n"
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
    failing = [head % len(start + error) + start, error]
    fine = [head % len(start + BLOCK + SSE) + start, BLOCK + SSE]
    pool, sent, exchange, _ = run({"alpha": [failing], "beta": [fine]}, body=json.dumps(dict(MESSAGE, stream=True)).encode())
    status, headers, body = parse(sent)
    assert status == 200 and body == start + BLOCK + SSE and headers["x-ccproxy-provider"] == "beta"
    assert exchange.attempts[0][:2] == ("alpha", "error event before content") and pool.pooled == ["beta"]


def test_a_learned_fix_is_written_after_the_answer_and_used_meanwhile():
    """The state file's fsync is not on the answer's path; until it is done, other requests to
    the provider go out fixed from memory."""
    refused = b'{"type":"error","error":{"type":"invalid_request_error","message":"context_management: Extra inputs are not permitted"}}'
    ok = answer(200, REPLY, [("Content-Type", "application/json")])
    seen, sent, health = [], [], ccproxy.Health()

    class Store:
        def learn_fixes(self, name, fixes):
            seen.append((name, [f.id for f, _ in fixes], parse(sent)[2], health.unsaved.get(name)))

    body = json.dumps(dict(MESSAGE, context_management={"edits": []})).encode()
    relay = ccproxy.Relay(view(), health, FakePool({"alpha": [answer(400, refused), ok]}),
                          ccproxy.ClientWriter(sent.append), ccproxy.Exchange(), Streams(), store=Store())
    relay.run(ccproxy.ClientRequest("POST", "/v1/messages", ccproxy.Headers([("x-api-key", "k")]), body))
    name, ids, answered, meanwhile = seen[0]
    assert (name, ids, answered) == ("alpha", ["field:context_management"], REPLY)     # the client had it all
    assert [f.id for f in meanwhile] == ["field:context_management"]
    assert health.unsaved == {}
