"""Failover across providers, cooldowns, the signature retry and count_tokens memory."""

import json
import time
import warnings

import pytest

import ccproxy
import mock_upstream

from conftest import APIKEY, KEY_B, SDK_TIMEOUT_S, make_config, start_proxy, wait_for, write_config
from test_relay import MESSAGE, events_of

OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


@pytest.fixture
def failover(proxy_with):
    """proxy_with, beta the fallback of alpha."""
    return lambda **top: proxy_with(**dict({"Fallback": ["beta"]}, **top))


def test_529_moves_to_the_fallback_with_its_own_settings(failover, upstream, upstream2, log_lines):
    proxy = failover()
    upstream.fail_next(status=529, body=OVERLOADED)
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 200 and json.loads(data)["type"] == "message"
    assert headers["x-ccproxy-provider"] == "beta"
    assert headers["x-ccproxy-attempts"] == "alpha 529, beta 200"
    got = upstream2.last
    assert got.path == "/anthropic/v1/messages" and got.headers["authorization"] == "Bearer " + KEY_B
    assert got.json["model"] == "glm-4.6"                     # beta's own model mapping
    assert proxy.store.view.selected == "alpha"               # the selection never changes
    assert wait_for(lambda: "alpha 529 → beta 200" in log_lines.text)


@pytest.mark.parametrize("status", [408, 500, 501, 505, 520, 599])
def test_every_5xx_moves_on(failover, upstream, upstream2, status):
    """README and config.in.json say 5xx: a relay's 501 or 505 is no answer from another relay."""
    proxy = failover()
    upstream.fail_next(status=status, body={"type": "error", "error": {"type": "api_error", "message": "x"}})
    got, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE)
    assert got == 200 and headers["x-ccproxy-attempts"] == "alpha %d, beta 200" % status


def test_a_provider_that_cannot_be_reached_is_named_in_ccproxys_own_error(failover, upstream, upstream2):
    proxy = failover()
    assert proxy.api("POST", "/api/fallback", {"enabled": False})[0] == 200
    upstream.close()
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 502 and headers["x-ccproxy-provider"] == "alpha"
    assert "could not be reached" in json.loads(data)["error"]["message"]
    # ccproxy's own refusals name none
    status, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE, key="sk-wrong-key-123")
    assert status == 401 and "x-ccproxy-provider" not in headers


def test_connection_refused_moves_on(failover):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = failover(providers={"alpha": {"api_base_url": "http://127.0.0.1:%d/v1/messages" % dead}})
    status, headers, _ = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and headers["x-ccproxy-attempts"] == "alpha connection refused, beta 200"


def test_first_byte_timeout_on_a_stalled_stream(failover, upstream, upstream2):
    proxy = failover(FIRST_BYTE_TIMEOUT_MS=300)
    upstream.fail_next("silent_stream", seconds=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    # the stalled connection was closed, not left to the garbage collector
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert status == 200 and headers["x-ccproxy-provider"] == "beta"
    assert events_of(data)[-1][0] == "message_stop"
    assert headers["x-ccproxy-attempts"] == "alpha no content in 0.3 s, beta 200"


def test_no_retry_once_a_byte_has_gone_out(failover, upstream, upstream2):
    proxy = failover()
    upstream.fail_next("cut", after=3)
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha"
    assert events_of(data)[-1][0] == "error"
    assert not upstream2.requests


class Clock:
    def __init__(self):
        self.now = 1.9e9

    def __call__(self):
        return self.now


def test_cooldown_skips_then_expires(failover, upstream, upstream2):
    proxy = failover(COOLDOWN_MS=400)
    clock = proxy.server.health.clock = Clock()
    upstream.fail_next(status=500, body=b"{}")
    assert proxy.call("POST", "/v1/messages", MESSAGE)[1]["x-ccproxy-provider"] == "beta"
    status, state = proxy.api("GET", "/api/state")
    assert state["cooling"]["alpha"]["reason"] == "500"
    # while alpha cools down, requests go straight to beta
    assert proxy.call("POST", "/v1/messages", MESSAGE)[1]["x-ccproxy-provider"] == "beta"
    assert len(upstream.requests) == 1
    clock.now += 0.3
    assert proxy.call("POST", "/v1/messages", MESSAGE)[1]["x-ccproxy-provider"] == "beta"
    clock.now += 0.2
    # a new conversation goes to alpha again (this one stays on beta while its cache there lasts)
    other = dict(MESSAGE, messages=[{"role": "user", "content": "another conversation"}])
    headers = proxy.call("POST", "/v1/messages", other)[1]
    assert headers["x-ccproxy-provider"] == "alpha" and "x-ccproxy-attempts" not in headers
    assert proxy.api("GET", "/api/state")[1]["cooling"] == {}


@pytest.mark.parametrize("retry_after", ["120", "date"])
def test_retry_after_sets_the_cooldown(failover, upstream, retry_after):
    import email.utils
    proxy = failover(COOLDOWN_MS=1)
    if retry_after == "date":                       # RFC 9110 §10.2.3: an HTTP-date works too
        retry_after = email.utils.formatdate(time.time() + 120, usegmt=True)
    upstream.fail_next(status=429, body=b'{"type":"error"}', headers={"retry-after": retry_after})
    proxy.call("POST", "/v1/messages", MESSAGE)
    until = proxy.api("GET", "/api/state")[1]["cooling"]["alpha"]["until"]
    assert 100 < until - time.time() <= 121


@pytest.fixture
def upstream3():
    from mock_upstream import MockUpstream
    mock = MockUpstream(models=("deepseek-chat",))
    yield mock
    mock.close()


def test_fallback_is_tried_in_its_order(proxy_with, upstream, upstream2, upstream3):
    proxy = proxy_with(Fallback=["gamma", "beta"],
                       added=[{"name": "gamma", "api_base_url": upstream3.url, "api_key": "sk-gamma-1234567890"}])
    for mock in (upstream, upstream3, upstream2):
        mock.fail_next(status=529, body=OVERLOADED)
    status, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 529 and headers["x-ccproxy-attempts"] == "alpha 529, gamma 529, beta 529"
    # gamma recovers first: with alpha and beta cooling, gamma answers
    proxy.server.health.cooling.pop("gamma")
    status, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 200 and headers["x-ccproxy-provider"] == "gamma" and "x-ccproxy-attempts" not in headers
    # the order is the list's, whatever the order of Providers
    proxy.server.health.cooling.clear()
    upstream.fail_next(status=500, body=b"{}")
    upstream3.fail_next(status=503, body=b"{}")
    status, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE)
    assert headers["x-ccproxy-attempts"] == "alpha 500, gamma 503, beta 200"
    assert [len(m.requests) for m in (upstream, upstream3, upstream2)] == [2, 3, 2]


def test_every_candidate_failing_gives_the_last_error_as_it_was(failover, upstream, upstream2):
    proxy = failover()
    upstream.fail_next(status=529, body=OVERLOADED)
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "beta quota"}}
    upstream2.fail_next(status=429, body=body, headers={"retry-after": "9"})
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 429 and json.loads(data) == body and headers["retry-after"] == "9"
    assert headers["x-ccproxy-attempts"] == "alpha 529, beta 429"
    rec = newest_record(proxy)
    assert rec["attempts"] == [["alpha", "529", "claude-sonnet-4-5"], ["beta", "429", "glm-4.6"]] and rec["status"] == 429


def newest_record(proxy):
    assert wait_for(lambda: proxy.api("GET", "/api/requests?limit=1")[1]["requests"])
    return proxy.api("GET", "/api/requests?limit=1")[1]["requests"][0]


def test_a_lone_network_failure_is_one_step_in_the_log(tmp_path, upstream, log_lines):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = make_config(upstream)
    config["Providers"][0]["api_base_url"] = "http://127.0.0.1:%d" % dead
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        status, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE)
        assert status == 502 and "x-ccproxy-attempts" not in headers
        assert newest_record(proxy)["attempts"] == [["alpha", "502", "claude-sonnet-4-5"]]
        assert wait_for(lambda: "→ alpha 502 model" in log_lines.text)
    finally:
        proxy.stop()


def test_other_client_errors_do_not_fail_over(failover, upstream, upstream2):
    proxy = failover()
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens"}}
    upstream.fail_next(status=400, body=body)
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 400 and json.loads(data) == body and not upstream2.requests


def test_without_fallback_errors_pass_through_and_nothing_cools(proxy, upstream):
    upstream.fail_next(status=529, body=OVERLOADED)
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 529 and json.loads(data) == OVERLOADED and "x-ccproxy-attempts" not in headers
    # nothing cools: a cooldown would be shown here (a lone provider is still tried while it
    # cools, so the next request's success alone would not show it)
    assert proxy.api("GET", "/api/state")[1]["cooling"] == {}
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
    # the same with a Fallback list that is switched off
    proxy.api("POST", "/api/fallback", {"enabled": False, "providers": ["beta"]})
    upstream.fail_next(status=529, body=OVERLOADED)
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 529
    assert proxy.api("GET", "/api/state")[1]["cooling"] == {}


THINKING_TURNS = {"model": "claude-sonnet-4-5", "max_tokens": 9, "messages": [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig-from-other-relay"},
        {"type": "redacted_thinking", "data": "xyz"},
        {"type": "text", "text": "hello", "signature": "x"}]},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "only", "signature": "s"}]},
    {"role": "user", "content": "again"}]}


def test_signature_error_strips_thinking_and_retries_once(failover, upstream, upstream2):
    proxy = failover()
    upstream.fail_next(status=400, body={"type": "error", "error": {
        "type": "invalid_request_error", "message": "messages.1.content.0: Invalid `signature` in `thinking` block"}})
    status, headers, _ = proxy.call("POST", "/v1/messages", THINKING_TURNS)
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha"
    first, second = upstream.requests[-2:]
    assert first.json == THINKING_TURNS
    assert second.json["messages"][1]["content"] == [{"type": "text", "text": "hello"}]
    assert second.json["messages"][2]["content"] == [{"type": "text", "text": "(thinking omitted)"}]
    assert second.json["messages"][3] == {"role": "user", "content": "again"}
    assert not upstream2.requests


def test_signature_retry_happens_only_once(failover, upstream):
    proxy = failover()
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "Invalid signature in thinking block"}}
    upstream.fail_next(status=400, body=error)
    upstream.fail_next(status=400, body=error)
    status, _, data = proxy.call("POST", "/v1/messages", THINKING_TURNS)
    assert status == 400 and json.loads(data) == error and len(upstream.requests) == 2


def test_count_tokens_missing_is_remembered(failover, upstream):
    proxy = failover()
    upstream.fail_next(status=404, body={"type": "error", "error": {"type": "not_found_error", "message": "no"}})
    assert proxy.call("POST", "/v1/messages/count_tokens?beta=true", MESSAGE)[0] == 404
    for _ in range(5):
        status, headers, data = proxy.call("POST", "/v1/messages/count_tokens?beta=true", MESSAGE)
        assert status == 404 and json.loads(data)["error"]["type"] == "not_found_error"
        assert headers["x-ccproxy-provider"] == "alpha"             # answered locally, for alpha
    assert len(upstream.requests) == 1
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200   # messages still go there


def test_fallback_api(failover, upstream, upstream2):
    proxy = failover()
    status, state = proxy.api("POST", "/api/fallback", {"enabled": False, "providers": ["beta"]})
    assert status == 200 and state["fallback"] == {"enabled": False, "providers": ["beta"], "edited": True,
                                                   "order": "listed", "model": None, "now": ["alpha"]}
    upstream.fail_next(status=529, body=OVERLOADED)
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 529        # disabled: no failover
    assert proxy.api("POST", "/api/fallback", {"providers": ["nope"]})[0] == 404
    assert proxy.api("POST", "/api/fallback", {"providers": ["beta", "beta"]})[0] == 400
    assert proxy.api("POST", "/api/fallback", {"enabled": "yes"})[0] == 400
    status, state = proxy.api("POST", "/api/fallback", {"enabled": True, "providers": None})
    found = {k: state["fallback"][k] for k in ("enabled", "providers", "edited", "now")}
    assert found == {"enabled": True, "providers": ["beta"], "edited": False, "now": ["alpha", "beta"]}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sdk_sees_one_clean_answer_in_each_recoverable_case(failover, upstream, upstream2):
    # skipped here, not at the top: the module's other tests need no SDK
    anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is a test-only dependency")
    proxy = failover(FIRST_BYTE_TIMEOUT_MS=300)
    with anthropic.Anthropic(base_url=proxy.url, api_key=APIKEY, max_retries=0, timeout=SDK_TIMEOUT_S) as client:
        upstream.fail_next(status=529, body=OVERLOADED)
        msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        assert msg.content[0].text == "hello"
        time.sleep(0.05)
        proxy.server.health.cooling.clear()
        upstream.fail_next("silent_stream", seconds=2)
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=8,
                                    messages=[{"role": "user", "content": "x"}]) as stream:
            assert "".join(stream.text_stream).startswith("w0 ")
        proxy.server.health.cooling.clear()
        upstream.fail_next("close")
        msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        assert msg.stop_reason == "end_turn"


SIGNATURE_ERROR = {"type": "error", "error": {"type": "invalid_request_error",
                                              "message": "messages.1.content.0: Invalid `signature` in `thinking` block"}}


def test_a_conversation_that_needed_the_strip_is_stripped_before_sending(failover, upstream, log_lines):
    proxy = failover()
    session = {"X-Claude-Code-Session-Id": "3f1c-sess-1"}
    upstream.fail_next(status=400, body=SIGNATURE_ERROR)
    assert proxy.call("POST", "/v1/messages", THINKING_TURNS, session)[0] == 200
    assert len(upstream.requests) == 2                      # the failed round trip, once
    for turn in range(3):                                   # later turns: one request each, stripped
        status, _, _ = proxy.call("POST", "/v1/messages", THINKING_TURNS, session)
        assert status == 200 and len(upstream.requests) == 3 + turn
        assert upstream.last.json["messages"][1]["content"] == [{"type": "text", "text": "hello"}]
    assert wait_for(lambda: "as earlier in this conversation" in log_lines.text)
    # another conversation, and the same one on another provider, go out as they came
    proxy.call("POST", "/v1/messages", THINKING_TURNS, {"X-Claude-Code-Session-Id": "other"})
    assert upstream.last.json == THINKING_TURNS
    assert not proxy.server.health.strips_signatures("3f1c-sess-1", "beta")


def test_a_strip_that_did_not_help_is_not_remembered(failover, upstream):
    proxy = failover()
    session = {"X-Claude-Code-Session-Id": "s2"}
    upstream.fail_next(status=400, body=SIGNATURE_ERROR)
    upstream.fail_next(status=400, body=SIGNATURE_ERROR)
    assert proxy.call("POST", "/v1/messages", THINKING_TURNS, session)[0] == 400
    proxy.call("POST", "/v1/messages", THINKING_TURNS, session)
    assert upstream.last.json == THINKING_TURNS             # sent as it came


def test_a_provider_with_the_example_key_is_never_contacted(failover, upstream, upstream2):
    proxy = failover(providers={"alpha": {"api_key": "sk-ant-your-key-here"}})
    # the first provider with a real key is the one in use, not the example
    assert proxy.api("GET", "/api/state")[1]["selected"] == "beta"
    status, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 200 and headers["x-ccproxy-provider"] == "beta"
    assert proxy.api("POST", "/api/select", {"provider": "alpha"})[0] == 400
    result = proxy.api("POST", "/api/test", {"provider": "alpha"})[1]["results"]["alpha"]
    assert result["status"] == "failing" and "not contacted" in result["reason"]
    result = proxy.api("POST", "/api/refresh-models", {"provider": "alpha"})[1]["results"]["alpha"]
    assert not result["ok"] and "not contacted" in result["message"]
    assert proxy.api("GET", "/api/state")[1]["providers"][0]["placeholder_key"] is True
    assert upstream.requests == []
    # every provider with an example key: Claude Code is told what to do, and not to retry
    del upstream2.requests[:]
    proxy = failover(providers={"alpha": {"api_key": "sk-ant-your-key-here"}, "beta": {"api_key": "sk-your-relay-key"}})
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    error = json.loads(data)["error"]
    assert status == 500 and headers["x-should-retry"] == "false"
    assert "beta still has the example key" in error["message"] and "Add provider" in error["message"]
    assert upstream.requests == upstream2.requests == []


@pytest.mark.parametrize("key, placeholder", [
    ("sk-ant-your-key-here", True), ("sk-your-relay-key", True), ("YOUR_API_KEY", True), ("<key>", True),
    ("sk-CHANGE-ME", True), ("sk-ant-api03-Yx7your0key", False), ("sk-1234567890abcdef", False), ("", False),
])
def test_placeholder_keys(key, placeholder):
    provider = ccproxy.validate_config({"APIKEY": APIKEY, "Providers": [{"name": "p", "api_base_url": "https://x",
                                                                         "api_key": key}]})
    assert provider.providers[0].placeholder_key is placeholder


def test_a_provider_rejecting_its_key_is_said_so(proxy, upstream, log_lines):
    upstream.fail_next(status=401, body={"type": "error", "error": {"type": "authentication_error",
                                                                    "message": "invalid x-api-key"}})
    status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
    assert status == 401 and json.loads(data)["error"]["message"] == "invalid x-api-key"   # as it was
    assert wait_for(lambda: "provider alpha rejected its api_key (HTTP 401)" in log_lines.text)
    assert newest_record(proxy)["note"].startswith("provider alpha rejected its api_key")
    # ccproxy's own key refused: a different note, no provider
    proxy.call("POST", "/v1/messages", MESSAGE, key="sk-wrong-0000000000")
    assert wait_for(lambda: len(proxy.api("GET", "/api/requests?limit=5")[1]["requests"]) == 2)
    rec = newest_record(proxy)
    assert rec["provider"] is None and rec["status"] == 401 and "ccproxy's APIKEY" in rec["note"]


# ---- the content gate: a 200 is the client's only once it shows content

START = b"".join(list(mock_upstream.message_events("claude-sonnet-4-5", 1))[:1])
BLOCK = b"".join(list(mock_upstream.message_events("claude-sonnet-4-5", 1))[1:2])
PING = mock_upstream.sse("ping", {"type": "ping"})
OVERLOADED_EVENT = mock_upstream.sse("error", OVERLOADED)


@pytest.mark.parametrize("failure, gate, whole", [      # the gate of a stream, and of a non-streamed request
    (dict(kind="events", events=[START, PING, OVERLOADED_EVENT]), "error event before content", "not a message"),
    (dict(kind="events", events=[OVERLOADED_EVENT.replace(b"event: error\n", b"")]), "error event before content",
     "not a message"),
    (dict(kind="events", events=[START, PING]), "stream ended empty", "not a message"),
    (dict(kind="events", events=[]), "stream ended empty", "not a message"),
    (dict(kind="status", status=200, content_type="text/html; charset=utf-8",
          body="<html><body>维护中 maintenance</body></html>".encode()), "not a message", "not a message"),
    (dict(kind="status", status=200, body=OVERLOADED), "an error in a 200", "an error in a 200"),
    (dict(kind="events", events=[START, PING], pause=3, end=False), "no content in", "connection closed"),
    (dict(kind="events", events=[START], end=False), "connection closed by the provider", "connection closed"),
])
@pytest.mark.parametrize("stream", [True, False])
def test_a_200_without_content_fails_over_and_the_client_sees_one_clean_answer(
        failover, upstream, upstream2, failure, gate, whole, stream):
    gate = gate if stream else whole
    proxy = failover(FIRST_CONTENT_TIMEOUT_MS=500)
    upstream.fail_next(**failure)
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=stream))
    assert status == 200 and headers["x-ccproxy-provider"] == "beta"
    assert headers["x-ccproxy-attempts"].startswith("alpha " + gate) and headers["x-ccproxy-attempts"].endswith(", beta 200")
    if stream:      # exactly one answer: beta's, from its message_start to its message_stop
        names = [name for name, _ in events_of(data)]
        assert names.count("message_start") == 1 and names[-1] == "message_stop" and "error" not in names
    else:
        assert json.loads(data)["type"] == "message"
    assert wait_for(lambda: proxy.api("GET", "/api/requests")[1]["requests"])
    record = proxy.api("GET", "/api/requests")[1]["requests"][0]
    assert record["attempts"][0][:2] == ["alpha", headers["x-ccproxy-attempts"].split(", ")[0][len("alpha "):]]
    assert proxy.api("GET", "/api/state")[1]["cooling"]["alpha"]["why"]["code"].startswith(
        ("gate_", "net_"))


def test_content_then_a_cut_never_fails_over(failover, upstream, upstream2):
    proxy = failover(FIRST_CONTENT_TIMEOUT_MS=500)
    upstream.fail_next("events", events=[START, BLOCK], end=False)
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha" and "x-ccproxy-attempts" not in headers
    assert [n for n, _ in events_of(data)] == ["message_start", "content_block_start", "error"]
    assert not upstream2.requests


def test_a_request_error_event_is_the_clients_not_a_failover(failover, upstream, upstream2):
    """An error about the request itself would meet the same answer anywhere."""
    proxy = failover()
    invalid = mock_upstream.sse("error", {"type": "error", "error": {"type": "invalid_request_error",
                                                                      "message": "prompt is too long"}})
    upstream.fail_next("events", events=[START, invalid])
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha" and not upstream2.requests
    assert events_of(data)[-1][0] == "error"


def test_the_last_relay_without_content_is_answered_plainly(failover, upstream, upstream2):
    """No relay left: an error event goes to the client as the relay sent it (Claude Code
    re-sends without streaming); a page or an empty stream becomes ccproxy's 502 naming the gate."""
    proxy = failover()
    assert proxy.api("POST", "/api/fallback", {"enabled": False})[0] == 200
    upstream.fail_next("events", events=[START, OVERLOADED_EVENT])
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and data.endswith(OVERLOADED_EVENT)
    upstream.fail_next(status=200, content_type="text/html", body=b"<html>maintenance</html>")
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    answer = json.loads(data)
    assert status == 502 and answer["code"] == "gate_failed" and answer["values"]["gate"]["code"] == "gate_not_message"
    assert "<html>maintenance</html>" in answer["error"]["message"]
    upstream.fail_next("events", events=[START])
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 502 and json.loads(data)["values"]["gate"]["code"] == "gate_empty"
    assert not upstream2.requests


def test_a_stream_is_held_no_further_than_its_first_content(failover, upstream, upstream2):
    """The head and the first content go to the client while the rest is still being written."""
    proxy = failover()
    upstream.words, upstream.event_delay = 3, 1.0
    conn = ccproxy.http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    started = time.monotonic()
    conn.request("POST", "/v1/messages", json.dumps(dict(MESSAGE, stream=True)), {"x-api-key": APIKEY})
    resp = conn.getresponse()
    first = resp.read1(65536)
    assert b"content_block_start" in first and time.monotonic() - started < 0.9
    conn.close()


def test_a_stream_is_held_at_most_64_kb_then_it_is_the_clients(failover, upstream, upstream2):
    """Memory a held stream may take is bounded: past FIRST_CONTENT_MAX_BYTES without content
    the stream is relayed as it is, and no longer fails over."""
    proxy = failover()
    pings = [PING] * (ccproxy.FIRST_CONTENT_MAX_BYTES // len(PING) + 10)
    upstream.fail_next("events", events=[START] + pings, pause=0.5)      # and then it ends, still without content
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha" and not upstream2.requests
    names = [n for n, _ in events_of(data)]
    assert names[0] == "message_start" and names.count("ping") == len(pings)


def test_a_stream_past_its_first_content_waits_as_long_as_api_timeout(failover, upstream, upstream2):
    """FIRST_BYTE_TIMEOUT_MS bounds the wait for the head while a fallback remains; once the
    answer is the client's, its pauses are judged by API_TIMEOUT_MS (Relay.ready)."""
    proxy = failover(FIRST_BYTE_TIMEOUT_MS=300)
    upstream.event_delay = 0.5          # each event after the first, longer than the first-byte timeout
    status, headers, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha"
    assert "x-ccproxy-attempts" not in headers
    assert events_of(data)[-1][0] == "message_stop"
    assert not upstream2.requests
