"""The request log, stats, provider tests and /metrics."""

import json
import os
import socket
import threading

import pytest

import ccproxy
from conftest import make_config, start_proxy, wait_for, write_config
from mock_upstream import USAGE_IN
from test_relay import MESSAGE

USAGE = {"input": USAGE_IN["input_tokens"], "cache_read": USAGE_IN["cache_read_input_tokens"],
         "cache_creation": USAGE_IN["cache_creation_input_tokens"]}


def newest(proxy, count, **query):
    qs = "&".join("%s=%s" % kv for kv in dict(query, limit=count).items())
    assert wait_for(lambda: len(proxy.api("GET", "/api/requests?" + qs)[1]["requests"]) >= count)
    return proxy.api("GET", "/api/requests?" + qs)[1]["requests"]


def test_usage_matches_what_the_upstream_reported(proxy, upstream):
    upstream.words = 9
    proxy.call("POST", "/v1/messages?beta=true", dict(MESSAGE, stream=True))
    proxy.call("POST", "/v1/messages", MESSAGE)
    plain, streamed = newest(proxy, 2)
    assert streamed["usage"] == dict(USAGE, output=9) and streamed["stream"] is True
    assert streamed["stop_reason"] == "end_turn"
    assert plain["usage"] == dict(USAGE, output=7) and plain["stream"] is False
    for rec in (plain, streamed):
        assert rec["provider"] == "alpha" and rec["status"] == 200 and rec["path"] == "/v1/messages"
        assert rec["model"] == "claude-sonnet-4-5" and rec["bytes_in"] > 0 and rec["bytes_out"] > 0
        assert rec["ttfb_ms"] is not None and rec["total_ms"] >= rec["ttfb_ms"]
        assert rec["client"] == "127.0.0.1" and rec["attempts"] == [["alpha", "200", "claude-sonnet-4-5"]]
    stats = proxy.api("GET", "/api/stats")[1]["providers"]["alpha"]
    assert stats["requests"] == 2 and stats["errors"] == 0 and stats["success_pct"] == 100.0
    assert stats["tokens"] == {"input": 22, "output": 16, "cache_read": 10, "cache_creation": 6}
    assert stats["ttfb_p50_ms"] is not None


def test_usage_split_across_chunks():
    usage = ccproxy.Usage()
    stream = b"".join(
        b"event: %s\ndata: %s\n\n" % (e.encode(), json.dumps(d).encode()) for e, d in [
            ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1,
                                                                              "cache_read_input_tokens": 4}}}),
            ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "a \"usage\" word"}}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                               "usage": {"output_tokens": 12}})])
    for i in range(0, len(stream), 7):
        usage.feed(stream[i:i + 7])
    assert usage.as_dict() == {"input": 3, "output": 12, "cache_read": 4, "cache_creation": 0}
    assert usage.stop_reason == "tool_use"


def test_failures_and_attempts_are_recorded(tmp_path, upstream, upstream2):
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream, upstream2, Fallback=["beta"])))
    try:
        upstream.fail_next(status=529, body=b"{}")
        proxy.call("POST", "/v1/messages", MESSAGE)
        rec = newest(proxy, 1)[0]
        assert rec["attempts"] == [["alpha", "529", "claude-sonnet-4-5"], ["beta", "200", "glm-4.6"]] and rec["provider"] == "beta"
        assert rec["model_sent"] == "glm-4.6"
        assert [r["provider"] for r in newest(proxy, 1, provider="alpha")] == ["beta"]
        stats = proxy.api("GET", "/api/stats")[1]["providers"]
        assert stats["alpha"]["errors"] == 1 and stats["beta"]["success_pct"] == 100.0
    finally:
        proxy.stop()


def test_log_file_survives_a_restart_and_rotates(tmp_path, upstream):
    path = write_config(tmp_path / "config.json", make_config(upstream, REQUEST_LOG_MAX_MB=0.002))
    log_file = str(tmp_path / "requests.jsonl")
    proxy = start_proxy(path)
    for _ in range(3):
        proxy.call("POST", "/v1/messages", MESSAGE)
    newest(proxy, 3)
    proxy.stop()
    with open(log_file, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 3 and all(r["usage"]["output"] == 7 for r in lines)
    proxy = start_proxy(path)
    try:
        assert len(proxy.api("GET", "/api/requests")[1]["requests"]) == 3     # reloaded
        for _ in range(10):
            proxy.call("POST", "/v1/messages", MESSAGE)
        newest(proxy, 13)
    finally:
        proxy.stop()
    assert os.path.getsize(log_file) <= 2100 and os.path.exists(log_file + ".1")
    with open(log_file + ".1", encoding="utf-8") as f:
        assert all(json.loads(line)["method"] == "POST" for line in f)


def test_the_log_carries_no_bodies_or_keys(proxy, upstream):
    proxy.call("POST", "/v1/messages", MESSAGE)
    rec = json.dumps(newest(proxy, 1))
    assert "secret prompt" not in rec and "sk-alpha" not in rec and "sk-ccproxy-test" not in rec


def test_the_ring_is_bounded():
    recorder = ccproxy.Recorder("", 1)
    for i in range(ccproxy.REQUEST_RING + 50):
        recorder.record({"provider": "p", "status": 200, "attempts": [["p", "200"]], "ttfb_ms": 1.0,
                         "usage": None, "n": i})
    assert len(recorder.request_log.ring) == ccproxy.REQUEST_RING
    assert recorder.request_log.newest(1)[0]["n"] == ccproxy.REQUEST_RING + 49
    assert recorder.counters.stats()["providers"]["p"]["requests"] == ccproxy.REQUEST_RING + 50


def test_provider_test_classifies_healthy_slow_and_dead(tmp_path, upstream, upstream2, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = make_config(upstream, upstream2)
    config["Providers"].append({"name": "dead", "api_base_url": "http://127.0.0.1:%d" % dead, "api_key": "k"})
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    # wide margins: "ok" must hold on a busy machine, and "slow" must not depend on luck
    monkeypatch.setattr(ccproxy, "TEST_SLOW_S", 1.5)
    upstream2.first_delay = 3.0
    try:
        status, got = proxy.api("POST", "/api/test", {})
        results = got["results"]
        assert status == 200 and set(results) == {"alpha", "beta", "dead"}
        assert results["alpha"]["status"] == "ok" and results["alpha"]["model"] == "claude-haiku-4-5"
        assert results["alpha"]["tokens"]["output"] == 5 and results["alpha"]["models"] == 3
        assert results["beta"]["status"] == "slow" and "first event after" in results["beta"]["reason"]
        assert results["beta"]["model"] == "glm-4.5-air"                   # its haiku-tier env-model
        assert results["dead"]["status"] == "failing" and results["dead"]["reason"] == "connection refused"
        sent = upstream.requests[-1].json
        assert sent["max_tokens"] <= 16 and sent["stream"] is True and "thinking" not in sent and "tools" not in sent
        upstream.fail_next("status", status=200, body=b"{}")              # models ok, then the message fails
        upstream.fail_next("status", status=401, body=b"<html>no</html>", content_type="text/html")
        result = proxy.api("POST", "/api/test", {"provider": "alpha"})[1]["results"]["alpha"]
        assert result["status"] == "failing" and result["reason"] == "HTTP 401 (HTML page)"
        assert proxy.api("GET", "/api/state")[1]["tests"]["alpha"]["status"] == "failing"
        assert proxy.api("POST", "/api/test", {"provider": "nope"})[0] == 404
    finally:
        proxy.stop()


def test_metrics_parse_as_prometheus_text(proxy, upstream):
    # skipped here, not at the top: the module's other tests need no parser
    prometheus = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is a test-only dependency")
    upstream.event_delay = 0.3
    upstream.words = 4
    thread = threading.Thread(target=proxy.call, args=("POST", "/v1/messages", dict(MESSAGE, stream=True)))
    thread.start()
    assert wait_for(lambda: b"ccproxy_open_streams 1" in proxy.call("GET", "/metrics")[2])
    thread.join()
    upstream.event_delay = 0
    proxy.call("POST", "/v1/messages", MESSAGE)
    assert proxy.call("GET", "/metrics", key=None)[0] == 401
    assert wait_for(lambda: len(proxy.api("GET", "/api/requests")[1]["requests"]) == 2)
    status, headers, data = proxy.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in prometheus.text_string_to_metric_families(data.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("ccproxy_requests_total", (("provider", "alpha"), ("status", "200")))] == 2
    assert samples[("ccproxy_tokens_total", (("kind", "output"), ("provider", "alpha")))] == 11
    assert samples[("ccproxy_ttfb_seconds_count", (("provider", "alpha"),))] == 2
    assert samples[("ccproxy_ttfb_seconds_bucket", (("le", "+Inf"), ("provider", "alpha")))] == 2
    assert samples[("ccproxy_open_streams", ())] == 0
    assert families["ccproxy_ttfb_seconds"].type == "histogram"


def test_the_local_model_list_is_logged_with_its_size(proxy, upstream, log_lines):
    assert proxy.call("GET", "/v1/models?limit=1")[0] == 200
    assert wait_for(lambda: "GET /v1/models" in log_lines.text)
    assert "answered by ccproxy: 1 of " in log_lines.text and "(alpha's and every provider's aliases)" in log_lines.text
    assert not upstream.requests
