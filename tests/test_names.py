"""Names in any script, end to end: providers named in Chinese or with an emoji relay, fail
over, log, show in /metrics and the request log; nothing a client sends forges a log line."""

import json
import socket
import urllib.parse

import pytest

import ccproxy
from conftest import APIKEY, KEY_A, KEY_B, SDK_TIMEOUT_S, start_proxy, wait_for, write_config
from test_relay import MESSAGE, events_of, raw_exchange, request_bytes

FIRST, SECOND = "中转站A", "🚀备用 relay"
OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def cjk_config(upstream, upstream2, **top):
    config = {"HOST": "127.0.0.1", "PORT": 0, "APIKEY": APIKEY,
              "HeaderOverrides": {"客户端": {"User-Agent": "relay-ua"}},
              "Providers": [
                  {"name": FIRST, "comment": "主力\n第二行", "api_base_url": upstream.url + "/v1/messages",
                   "api_key": KEY_A, "models": ["claude-sonnet-4-5", "模型-快"]},
                  {"name": SECOND, "api_base_url": upstream2.url + "/anthropic", "api_key": KEY_B,
                   "auth": "Bearer", "models": ["glm-4.6"],
                   "env-models": {"ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6"}}],
              "Fallback": [SECOND]}
    config.update(top)
    return config


@pytest.fixture
def cjk(proxy_with):
    return proxy_with(base=cjk_config)


def provider_of(headers):
    return urllib.parse.unquote(headers["x-ccproxy-provider"])


def newest_record(proxy):
    assert wait_for(lambda: proxy.api("GET", "/api/requests?limit=1")[1]["requests"])
    return proxy.api("GET", "/api/requests?limit=1")[1]["requests"][0]


def test_a_chinese_named_provider_relays_plain_and_streamed(cjk, upstream):
    status, headers, data = cjk.call("POST", "/v1/messages", MESSAGE)
    assert status == 200 and json.loads(data)["content"][0]["text"] == "hello"
    assert provider_of(headers) == FIRST
    status, headers, data = cjk.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and provider_of(headers) == FIRST
    assert events_of(data)[-1][0] == "message_stop"
    assert newest_record(cjk)["provider"] == FIRST


def test_the_answer_has_exactly_one_status_line(cjk):
    for stream in (False, True):
        raw = raw_exchange(cjk.port, request_bytes(json.dumps(dict(MESSAGE, stream=stream)).encode()))
        assert raw.count(b"HTTP/1.1 ") == 1 and raw.startswith(b"HTTP/1.1 200 OK\r\n")
        head = raw.partition(b"\r\n\r\n")[0].decode("ascii")        # every header byte is ASCII
        assert "x-ccproxy-provider: %E4%B8%AD%E8%BD%AC%E7%AB%99A\r\n" in head


def test_failover_between_providers_named_in_chinese(cjk, upstream, upstream2, log_lines):
    upstream.fail_next(status=529, body=OVERLOADED)
    status, headers, data = cjk.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and provider_of(headers) == SECOND
    assert urllib.parse.unquote(headers["x-ccproxy-attempts"]) == "%s 529, %s 200" % (FIRST, SECOND)
    assert upstream2.last.json["model"] == "glm-4.6"
    assert upstream2.last.headers["authorization"] == "Bearer " + KEY_B
    rec = newest_record(cjk)
    assert [a[:2] for a in rec["attempts"]] == [[FIRST, "529"], [SECOND, "200"]]
    assert [a[2] for a in rec["attempts"]] == ["claude-sonnet-4-5", "glm-4.6"]
    assert wait_for(lambda: "%s 529 → %s 200" % (FIRST, SECOND) in log_lines.text)
    assert "→ %s claude-sonnet-4-5, %s glm-4.6" % (FIRST, SECOND) in log_lines.text
    # every provider failing: the last answer as it was, with both names in the header
    upstream.fail_next(status=529, body=OVERLOADED)
    upstream2.fail_next(status=529, body=OVERLOADED)
    cjk.server.health.cooling.clear()
    other = dict(MESSAGE, messages=[{"role": "user", "content": "另一个对话"}])    # not kept on SECOND for its cache
    status, headers, data = cjk.call("POST", "/v1/messages", other)
    assert status == 529 and json.loads(data) == OVERLOADED and provider_of(headers) == SECOND


def test_a_network_failure_of_a_chinese_named_provider(tmp_path, upstream, upstream2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = cjk_config(upstream, upstream2)
    config["Providers"][1]["api_base_url"] = "http://127.0.0.1:%d" % dead
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        upstream.fail_next(status=529, body=OVERLOADED)
        status, headers, data = proxy.call("POST", "/v1/messages", MESSAGE)
        assert status == 502 and SECOND in json.loads(data)["error"]["message"]
        assert urllib.parse.unquote(headers["x-ccproxy-attempts"]) == "%s 529, %s connection refused" % (FIRST, SECOND)
    finally:
        proxy.stop()


def test_metrics_carry_the_names_as_prometheus_labels(cjk, upstream):
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is a test-only dependency")
    upstream.fail_next(status=529, body=OVERLOADED)
    cjk.call("POST", "/v1/messages", MESSAGE)
    assert wait_for(lambda: len(cjk.api("GET", "/api/requests?limit=5")[1]["requests"]) == 1)
    status, headers, data = cjk.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].endswith("charset=utf-8")
    samples = [s for family in parser.text_string_to_metric_families(data.decode("utf-8")) for s in family.samples]
    requests = {(s.labels["provider"], s.labels["status"]): s.value for s in samples
                if s.name == "ccproxy_requests_total"}
    assert requests == {(FIRST, "529"): 1, (SECOND, "200"): 1}


def test_the_page_state_and_key_route_take_chinese_names(cjk):
    status, state = cjk.api("GET", "/api/state")
    assert [p["name"] for p in state["providers"]] == [FIRST, SECOND]
    assert state["providers"][0]["comment"] == "主力\n第二行"
    status, key = cjk.api("GET", "/api/providers/%s/key" % urllib.parse.quote(SECOND))
    assert status == 200 and key["api_key"] == KEY_B and key["name"] == SECOND
    assert cjk.api("POST", "/api/select", {"provider": SECOND})[0] == 200
    assert cjk.api("POST", "/api/overrides", {"provider": SECOND, "header_override": "客户端"})[0] == 200
    assert cjk.store.view.targets[SECOND].header_preset == {"User-Agent": "relay-ua"}


def test_the_provider_test_and_refresh_take_chinese_names(cjk, upstream2):
    status, body = cjk.api("POST", "/api/test", {"provider": SECOND})
    assert status == 200 and body["results"][SECOND]["status"] == "ok"
    status, body = cjk.api("POST", "/api/refresh-models", {"provider": SECOND})
    assert status == 200 and body["results"][SECOND]["ok"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_sdk_reads_answers_from_a_chinese_named_provider(cjk, upstream):
    anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is a test-only dependency")
    with anthropic.Anthropic(base_url=cjk.url, api_key=APIKEY, max_retries=0, timeout=SDK_TIMEOUT_S) as client:
        raw = client.messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "你好"}])
        assert urllib.parse.unquote(raw.headers["x-ccproxy-provider"]) == FIRST
        assert raw.parse().content[0].text == "hello"
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=8,
                                    messages=[{"role": "user", "content": "你好"}]) as stream:
            assert "".join(stream.text_stream).startswith("w0 ")
        upstream.fail_next(status=529, body=OVERLOADED)
        msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=8,
                                     messages=[{"role": "user", "content": "你好"}])
        assert msg.content[0].text == "hello"


def test_an_error_after_the_head_closes_instead_of_a_second_status_line(cjk, monkeypatch, log_lines):
    def broken(self, obj):
        raise RuntimeError("a bug after the answer went out")
    monkeypatch.setattr(ccproxy.Usage, "take", broken)
    raw = raw_exchange(cjk.port, request_bytes(close=False))      # keep-alive asked for, yet closed
    assert raw.count(b"HTTP/1.1 ") == 1 and raw.startswith(b"HTTP/1.1 200 ")
    assert b'"hello"' in raw and b"internal error" not in raw
    assert wait_for(lambda: log_lines.text.count("Traceback") == 1)


@pytest.mark.parametrize("field, value", [
    ("model", "claude\nINFO 127.0.0.1 forged line"),
    ("model", "claude\r\x1b[2Kforged"),
    ("model", "claude\u2028forged"),
])
def test_client_values_cannot_forge_log_lines(proxy, upstream, log_lines, field, value):
    proxy.call("POST", "/v1/messages", dict(MESSAGE, **{field: value}))
    assert wait_for(lambda: "POST /v1/messages" in log_lines.text)
    for record in log_lines.records:
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message and "\x1b" not in message and "\u2028" not in message
    assert "forged" in log_lines.text                     # escaped, not dropped
