"""Relay compatibility: a relay on an older stack refuses what Claude Code sends; ccproxy learns
the smallest fix, retries once, remembers it per provider, and shows it (and its own check)."""

import json

import pytest

import ccproxy
from conftest import KEY_A, make_config, start_proxy, wait_for, write_config
from test_relay import MESSAGE

FIELD_ID = "field:context_management"
BETA = "context-management-2025-06-27"


@pytest.fixture
def relay(tmp_path, upstream, upstream2):
    """A proxy whose first provider is named 中转站A; start() again on the same files restarts it."""
    config = make_config(upstream, upstream2)
    config["Providers"][0]["name"] = "中转站A"
    config["HeaderOverrides"]["old-cli"] = {"User-Agent": "claude-cli/2.0.14 (external, cli)"}
    path = write_config(tmp_path / "config.json", config)
    running = []

    def start():
        for proxy in running:
            proxy.stop()
        running.append(start_proxy(path))
        return running[-1]
    yield start
    for proxy in running[-1:]:
        proxy.stop()


def provider_state(proxy, name="中转站A"):
    """The provider in /api/state, once every request before has ended (a learned fix is
    written after its answer has gone out)."""
    assert wait_for(lambda: not proxy.server.busy)
    status, state = proxy.api("GET", "/api/state")
    assert status == 200
    return next(p for p in state["providers"] if p["name"] == name), state


# wrap: a relay in front of the origin (claude-code-router, LiteLLM) puts its own words first
@pytest.mark.parametrize("wrap", [None, "ccr", "litellm"])
def test_a_refused_field_is_removed_retried_and_remembered(relay, upstream, log_lines, wrap):
    upstream.refuse_fields = {"context_management"}
    upstream.wrap = wrap
    proxy = relay()
    body = dict(MESSAGE, context_management={"edits": [{"type": "clear_tool_uses_20250919"}]})
    status, headers, data = proxy.call("POST", "/v1/messages", body)
    assert status == 200 and json.loads(data)["type"] == "message"
    first, retry = upstream.requests
    assert "context_management" in first.json and "context_management" not in retry.json
    assert retry.json["messages"] == MESSAGE["messages"]
    provider, _ = provider_state(proxy)
    assert [f["id"] for f in provider["fixes"]] == [FIELD_ID]
    # kept with the origin's own words, not a wrapper's
    assert provider["fixes"][0]["error"] == "model claude-sonnet-4-5: context_management: Extra inputs are not permitted"
    assert "remove the body field context_management" == provider["fixes"][0]["what"]

    assert wait_for(lambda: "fix applied, retried: remove the body field context_management" in log_lines.text)
    record = proxy.api("GET", "/api/requests?limit=1")[1]["requests"][0]
    assert record["note_code"] == ["retried", FIELD_ID]

    # Remembered: the next request goes out fixed at once, also after a restart.
    del upstream.requests[:]
    assert proxy.call("POST", "/v1/messages", body)[0] == 200
    assert len(upstream.requests) == 1 and "context_management" not in upstream.last.json
    assert wait_for(lambda: "fixed for this provider: remove the body field context_management" in log_lines.text)
    assert "a secret prompt" not in log_lines.text
    proxy = relay()
    del upstream.requests[:]
    assert proxy.call("POST", "/v1/messages", dict(body, stream=True))[0] == 200
    assert len(upstream.requests) == 1 and "context_management" not in upstream.last.json

    # Forgotten: the next request is sent as the client sent it, and learns again.
    status, _ = proxy.api("DELETE", "/api/fixes/%E4%B8%AD%E8%BD%AC%E7%AB%99A/" + FIELD_ID)
    assert status == 200
    assert provider_state(proxy)[0]["fixes"] == []
    del upstream.requests[:]
    assert proxy.call("POST", "/v1/messages", body)[0] == 200
    assert len(upstream.requests) == 2
    assert proxy.api("DELETE", "/api/fixes/%E4%B8%AD%E8%BD%AC%E7%AB%99A")[0] == 200
    assert provider_state(proxy)[0]["fixes"] == []
    assert proxy.api("DELETE", "/api/fixes/nobody")[0] == 404


def test_a_state_file_with_an_unknown_fix_still_relays(relay, upstream, tmp_path):
    """A state file written by a newer ccproxy, or edited by hand: what it does not know is skipped."""
    state = {"fixes": {"中转站A": [{"id": "rename:x"}, {"id": 7}, "junk", {"id": "field:context_management"}]}}
    with open(str(tmp_path / "config.state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, ensure_ascii=False)
    proxy = relay()
    body = dict(MESSAGE, context_management={"edits": []})
    assert proxy.call("POST", "/v1/messages", body)[0] == 200
    assert "context_management" not in upstream.last.json
    assert [f["id"] for f in provider_state(proxy)[0]["fixes"]] == ["field:context_management"]


def test_a_fixed_body_keeps_every_other_byte(relay, upstream):
    """Only the refused member goes; spacing, key order, escapes, number formats and unknown
    fields stay exactly as the client wrote them."""
    upstream.refuse_fields = {"safeguards"}
    proxy = relay()
    head = ('{"model":"claude-sonnet-4-5",  "max_tokens":64,"temperature":1.0E0,'
            '"messages":[{"role":"user","content":"\\u4e2d\\u6587 \u00e9 \\"q\\""}],'
            '"metadata":{"user_id":"u-1"},"future_field":{"a":[1,2.50,-0.0]}')
    raw = head + ', "safeguards" : {"mode":"auto"}\n}'
    status, _, _ = proxy.call("POST", "/v1/messages", raw.encode("utf-8"),
                              headers={"Content-Type": "application/json"})
    assert status == 200
    assert upstream.requests[0].body == raw.encode("utf-8")
    assert upstream.requests[1].body == (head + "\n}").encode("utf-8")


def test_model_mapping_and_a_request_preset_keep_every_other_byte(relay, upstream2):
    """beta maps sonnet to glm-4.6 (env-models) and gets the request preset nothink (thinking
    removed, metadata merged): only those values change."""
    proxy = relay()
    assert proxy.api("POST", "/api/select", {"provider": "beta"})[0] == 200
    assert proxy.api("POST", "/api/overrides", {"provider": "beta", "request_override": "nothink"})[0] == 200
    raw = ('{ "model" :"claude-sonnet-4-5","max_tokens":64,"temperature":1.0E0,'
           '"messages":[{"role":"user","content":"\u4e2d\u6587 é"}],"thinking":{"type":"adaptive"},'
           '"metadata":{"user_id":"u-1"},"safeguards":{"mode":"auto","n":1.50}}')
    status, _, _ = proxy.call("POST", "/v1/messages", raw.encode("utf-8"), headers={"Content-Type": "application/json"})
    assert status == 200
    assert upstream2.last.body.decode("utf-8") == (
        '{ "model" :"glm-4.6","max_tokens":64,"temperature":1.0E0,'
        '"messages":[{"role":"user","content":"\u4e2d\u6587 é"}],'
        '"metadata":{"user_id":"u-1", "tag": "x"},"safeguards":{"mode":"auto","n":1.50}}')


def test_a_refused_tool_key_is_taken_out_of_every_tool(relay, upstream):
    """Claude Code 2.1.332 marks a tool "defer_loading"; a relay on an older schema refuses it
    by its path (tools.3.custom.defer_loading). Everything else in the tools stays as sent."""
    upstream.refuse_tool_fields = {"defer_loading"}
    proxy = relay()
    head = '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}],'
    raw = (head + '"tools":[ {"name":"Bash","description":"\u8fd0\u884c","input_schema":{"type":"object"}},'
           '{"name":"Find","defer_loading" : true,"input_schema":{"type":"object","x":1.50}},"odd"],'
           '"metadata":{"defer_loading":1}}')
    status, _, _ = proxy.call("POST", "/v1/messages", raw.encode("utf-8"), headers={"Content-Type": "application/json"})
    assert status == 200 and len(upstream.requests) == 2
    assert upstream.requests[1].body.decode("utf-8") == (
        head + '"tools":[ {"name":"Bash","description":"\u8fd0\u884c","input_schema":{"type":"object"}},'
        '{"name":"Find","input_schema":{"type":"object","x":1.50}},"odd"],"metadata":{"defer_loading":1}}')
    assert [f["id"] for f in provider_state(proxy)[0]["fixes"]] == ["tool_field:defer_loading"]
    # A refusal naming a key every tool has is not something to remove.
    upstream.refuse_tool_fields = set()
    refused = {"type": "error", "error": {"type": "invalid_request_error",
                                          "message": "tools.0.custom.input_schema: Extra inputs are not permitted"}}
    upstream.fail_next(status=400, body=refused)
    del upstream.requests[:]
    status, _, data = proxy.call("POST", "/v1/messages", raw.encode("utf-8"), headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(data) == refused and len(upstream.requests) == 1


def test_a_refused_beta_token_is_taken_out_of_the_header(relay, upstream):
    upstream.refuse_betas = {BETA}
    proxy = relay()
    status, _, _ = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True),
                              headers={"anthropic-beta": "claude-code-20250219, %s,oauth-2025-04-20" % BETA})
    assert status == 200
    assert BETA in upstream.requests[0].headers["anthropic-beta"]
    assert upstream.requests[1].headers["anthropic-beta"] == "claude-code-20250219,oauth-2025-04-20"
    assert [f["id"] for f in provider_state(proxy)[0]["fixes"]] == ["beta:" + BETA]
    # A request with only that token goes out without the header at all.
    del upstream.requests[:]
    assert proxy.call("POST", "/v1/messages", MESSAGE, headers={"anthropic-beta": BETA})[0] == 200
    assert len(upstream.requests) == 1 and "anthropic-beta" not in upstream.last.headers


def test_adaptive_thinking_becomes_budgeted_thinking(relay, upstream):
    upstream.refuse_adaptive = True
    proxy = relay()
    body = dict(MESSAGE, max_tokens=32000, thinking={"type": "adaptive"})
    assert proxy.call("POST", "/v1/messages", body)[0] == 200
    assert upstream.requests[1].json["thinking"] == {"type": "enabled", "budget_tokens": 16000}
    # Too few tokens for a thinking budget (1024 at least): no thinking at all.
    del upstream.requests[:]
    assert proxy.call("POST", "/v1/messages", dict(body, max_tokens=1000))[0] == 200
    assert len(upstream.requests) == 1 and "thinking" not in upstream.last.json


def test_several_fixes_in_one_request_are_bounded_and_progress_is_kept(relay, upstream):
    """Claude Code 2.1.332 sends four things an old relay refuses one at a time; a relay that
    refuses more than MAX_FIXES_PER_REQUEST gets them over two requests."""
    fields = ["f%d_extra" % n for n in range(7)]
    upstream.refuse_fields = set(fields)
    proxy = relay()
    body = dict(MESSAGE, **{f: 1 for f in fields})
    status, _, data = proxy.call("POST", "/v1/messages", body)
    assert status == 400 and "f5_extra: Extra inputs are not permitted" in json.loads(data)["error"]["message"]
    assert len(upstream.requests) == 6              # the request, then MAX_FIXES_PER_REQUEST retries
    # each of the five got the relay past a refusal: kept, each with its own error
    fixes = provider_state(proxy)[0]["fixes"]
    assert [f["id"] for f in fixes] == ["field:f%d_extra" % n for n in range(5)]
    assert all("f%d_extra: Extra" % n in f["error"] for n, f in enumerate(fixes))
    del upstream.requests[:]
    assert proxy.call("POST", "/v1/messages", body)[0] == 200
    assert len(upstream.requests) == 3
    assert len(provider_state(proxy)[0]["fixes"]) == 7
    del upstream.requests[:]
    assert proxy.call("POST", "/v1/messages", body)[0] == 200
    assert len(upstream.requests) == 1


def test_every_kind_of_fix_in_one_request(relay, upstream):
    """What Claude Code 2.1.332 sends to a relay that knows none of it, learned in one go."""
    upstream.refuse_fields = {"context_management", "output_config"}
    upstream.refuse_betas = {BETA}
    upstream.refuse_adaptive = True
    proxy = relay()
    upstream.refuse_tool_fields = {"defer_loading"}
    body = dict(MESSAGE, max_tokens=32000, thinking={"type": "adaptive", "display": "omitted"},
                context_management={"edits": []}, output_config={"effort": "high"},
                tools=[{"name": "Bash", "input_schema": {"type": "object"}},
                       {"name": "ToolSearch", "defer_loading": True, "input_schema": {"type": "object"}}])
    status, _, _ = proxy.call("POST", "/v1/messages?beta=true", dict(body, stream=True),
                              headers={"anthropic-beta": "claude-code-20250219," + BETA})
    assert status == 200 and len(upstream.requests) == 6
    assert sorted(f["id"] for f in provider_state(proxy)[0]["fixes"]) == [
        "beta:" + BETA, "field:context_management", "field:output_config", "thinking", "tool_field:defer_loading"]


def test_a_fix_that_does_not_help_is_not_kept(relay, upstream):
    refused = {"type": "error", "error": {"type": "invalid_request_error",
                                          "message": "output_config: Extra inputs are not permitted"}}
    other = {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: too long"}}
    upstream.fail_next(status=400, body=refused)
    upstream.fail_next(status=400, body=other)
    proxy = relay()
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, output_config={"effort": "low"}))
    assert status == 400 and json.loads(data) == other
    assert len(upstream.requests) == 2
    assert provider_state(proxy)[0]["fixes"] == []


def test_a_400_that_names_nothing_passes_through_untouched(relay, upstream):
    refused = {"type": "error", "error": {"type": "invalid_request_error",
                                          "message": "max_tokens: must be at most 8192"}}
    upstream.fail_next(status=400, body=refused)
    proxy = relay()
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, max_tokens=64000, metadata={"a": 1}))
    assert status == 400 and json.loads(data) == refused
    assert len(upstream.requests) == 1


def test_an_unknown_stream_event_passes_through_byte_for_byte(relay, upstream):
    sse = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":1}}}\n\n'
           b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":'
           b'{"type":"tool_use","id":"toolu_01A\\u00e9","name":"Bash","input":{}}}\n\n'
           b'event: future_event_2027\ndata: {"type":"future_event_2027","x":[1,2.50]}\n\n'
           b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
           b'"safeguard_results":[{"verdict":"pass"}],"usage":{"output_tokens":3}}\n\n'
           b': a comment line\n\n'
           b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    upstream.fail_next(status=200, body=sse, content_type="text/event-stream")
    proxy = relay()
    status, _, data = proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200 and data == sse


def test_a_client_version_gate_is_shown_with_the_presets_it_outdates(relay, upstream):
    upstream.gate = ("2.1.0", "claude-sonnet-4-5")
    proxy = relay()
    status, _, data = proxy.call("POST", "/v1/messages", MESSAGE,
                                 headers={"User-Agent": "claude-cli/2.0.14 (external, cli)"})
    assert status == 400 and "2.1.0 or newer" in json.loads(data)["error"]["message"]
    assert len(upstream.requests) == 1              # a gate is not something a retry fixes
    _, state = provider_state(proxy)
    gate = state["gates"]["中转站A"]
    assert (gate["required"], gate["sent"], gate["model"]) == ("2.1.0", "2.0.14", "claude-sonnet-4-5")
    assert state["outdated_presets"] == ["old-cli"]


def test_check_a_relay(relay, upstream):
    upstream.refuse_fields = {"context_management", "safeguards"}
    upstream.refuse_adaptive = True
    proxy = relay()
    status, check = proxy.api("POST", "/api/check", {"provider": "中转站A"})
    assert status == 200
    results = check["results"]
    assert {n for n, r in results.items() if r["result"] == "ok"} == {
        "stream", "count_tokens", "output_config", "cache_ttl_1h", "model_1m"}
    assert results["context_management"]["fix"] == "remove the body field context_management"
    assert results["safeguards"]["reason"].startswith("HTTP 400: safeguards: Extra inputs")
    assert results["adaptive_thinking"]["fix"] == "turn adaptive thinking into budgeted thinking"
    # Each case is a small real request, with the provider's key.
    assert all(r.json.get("max_tokens", 1) <= 16 for r in upstream.requests)
    assert all(r.headers["x-api-key"] for r in upstream.requests)
    assert {r.headers["user-agent"] for r in upstream.requests} == {"ccproxy/" + ccproxy.VERSION}
    # Kept in the state file: shown after a restart.
    proxy = relay()
    assert provider_state(proxy)[0]["check"]["results"] == results
    # A checked relay learns nothing: fixes come only from real traffic.
    assert provider_state(proxy)[0]["fixes"] == []


def test_check_a_relay_as_the_claude_code_that_used_it(relay, upstream):
    """A relay that gates on the client's version: the check goes as the last Claude Code seen,
    not as ccproxy (which such a relay would turn away), and a header preset still wins."""
    upstream.gate = ("2.1.0", "claude-haiku-4-5")
    proxy = relay()
    agent = "claude-cli/2.1.332 (external, cli)"
    assert proxy.call("POST", "/v1/messages", MESSAGE, headers={"User-Agent": agent})[0] == 200
    del upstream.requests[:]
    check = proxy.api("POST", "/api/check", {"provider": "中转站A"})[1]
    assert check["model"] == "claude-haiku-4-5" and check["user_agent"] == agent
    assert {r["result"] for r in check["results"].values()} == {"ok"}
    assert {r.headers["user-agent"] for r in upstream.requests} == {agent}
    assert proxy.api("POST", "/api/overrides", {"provider": "中转站A", "header_override": "old-cli"})[0] == 200
    check = proxy.api("POST", "/api/check", {"provider": "中转站A"})[1]
    assert "2.1.0 or newer" in check["results"]["stream"]["reason"]


def test_check_a_relay_errors(relay, upstream):
    proxy = relay()
    # a relay that echoes the key in its error: the check keeps no key
    upstream.fail_next(status=400, body={"type": "error", "error": {
        "type": "invalid_request_error", "message": "key %s is not allowed" % KEY_A}})
    check = proxy.api("POST", "/api/check", {"provider": "中转站A"})[1]
    assert "key *** is not allowed" in json.dumps(check)
    with open(proxy.store.state_path, encoding="utf-8") as f:
        assert KEY_A not in f.read()
    assert proxy.api("POST", "/api/check", {"provider": "无此中转"})[0] == 404
    assert proxy.api("POST", "/api/check", {})[0] == 400
    upstream.close()
    status, check = proxy.api("POST", "/api/check", {"provider": "中转站A"})
    assert status == 200
    assert {r["result"] for r in check["results"].values()} == {"not tested"}


# -- relays behind relays: claude-code-router and LiteLLM put their own words first


@pytest.mark.parametrize("wrap", ["ccr", "litellm"])
def test_the_words_that_matter_are_past_what_is_shown(upstream, wrap):
    """What the two wrappers put in front pushes the origin's refusal past ERROR_EXCERPT: a
    match on the shown excerpt would find nothing (as ccproxy did before)."""
    upstream.wrap = wrap
    refusal = {"type": "error", "error": {"type": "invalid_request_error",
                                          "message": "context_management: Extra inputs are not permitted"}}
    message = ccproxy.error_message(json.dumps(upstream.wrapped(refusal, json.dumps(MESSAGE))).encode())
    assert "Extra inputs are not permitted" not in message[:ccproxy.ERROR_EXCERPT]
    body = json.dumps(dict(MESSAGE, context_management={}))
    assert ccproxy.match_fix(message, body, ccproxy.Headers()).id == FIELD_ID
    assert ccproxy.excerpt(message) == "context_management: Extra inputs are not permitted"


@pytest.mark.parametrize("wrap", ["ccr", "litellm"])
def test_a_wrapped_signature_error_is_stripped_and_retried(relay, upstream, wrap):
    """Behind claude-code-router, Claude Code exited after six 400s: the strip never fired."""
    from test_failover import SIGNATURE_ERROR, THINKING_TURNS
    upstream.wrap = wrap
    proxy = relay()
    upstream.fail_next(status=400, body=SIGNATURE_ERROR)
    status, _, _ = proxy.call("POST", "/v1/messages", THINKING_TURNS, {"X-Claude-Code-Session-Id": "9b1d-wrapped"})
    assert status == 200 and len(upstream.requests) == 2
    assert "signature" not in upstream.last.body.decode() and "thinking" not in upstream.last.json["messages"][1]


@pytest.mark.parametrize("wrap", ["ccr", "litellm"])
def test_check_a_relay_behind_another_relay(relay, upstream, wrap):
    upstream.refuse_fields = {"safeguards"}
    upstream.wrap = wrap
    proxy = relay()
    result = proxy.api("POST", "/api/check", {"provider": "中转站A"})[1]["results"]["safeguards"]
    assert result["fix_id"] == "field:safeguards"
    assert result["reason"] == "HTTP 400: safeguards: Extra inputs are not permitted"
