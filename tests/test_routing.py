"""Routing on what ccproxy knows: request classes (Claude Code's hint headers), a conversation
kept where its prompt cache is, context windows, and the failover list ordered by measure."""

import json

import pytest

import ccproxy
from conftest import make_config, wait_for
from mock_upstream import MockUpstream
from test_relay import MESSAGE

OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def hints(kind, agent=None, session="sess-1"):
    """The headers Claude Code 2.1.332 sends with CLAUDE_CODE_GATEWAY_HINT_HEADERS=1."""
    found = {"X-Claude-Code-Session-Id": session, "x-claude-code-prompt-id": "p-1"}
    if kind:
        found["x-claude-code-request-class"] = kind
        found["x-claude-1p-request-class"] = kind
    if agent:
        found["x-claude-code-agent-type"] = agent
    return found


class Clock:
    def __init__(self):
        self.now = 1.9e9

    def __call__(self):
        return self.now


def records(proxy, count):
    assert wait_for(lambda: len(proxy.api("GET", "/api/requests")[1]["requests"]) >= count)
    return proxy.api("GET", "/api/requests")[1]["requests"]


# ---- each kind of request to the relay that suits it

def test_routes_match_the_request_class_and_agent_type(proxy_with, upstream, upstream2):
    proxy = proxy_with(Routes={"class=compaction,Auxiliary": "beta",
                               "claude-opus-* class=subagent agent=explore*": "beta"})
    cases = [(hints("compaction"), MESSAGE, "beta"), (hints("auxiliary"), MESSAGE, "beta"),
             (hints("main"), MESSAGE, "alpha"), ({}, MESSAGE, "alpha"),      # without the hints: as before
             (hints("subagent", "Explore"), dict(MESSAGE, model="claude-opus-4-1"), "beta"),
             (hints("subagent", "Plan"), dict(MESSAGE, model="claude-opus-4-1"), "alpha"),
             (hints("subagent", "Explore"), MESSAGE, "alpha")]
    for headers, body, relay in cases:
        status, got, _ = proxy.call("POST", "/v1/messages", body, headers=headers)
        assert (status, got["x-ccproxy-provider"]) == (200, relay), headers
    assert upstream2.requests[0].json["model"] == "glm-4.6"          # beta's own mapping
    found = records(proxy, len(cases))
    newest = found[0]
    assert (newest["class"], newest["agent"]) == ("subagent", "explore")
    assert found[-1]["class"] == "compaction" and found[-1]["note"] == "Routes: class=compaction,Auxiliary to beta"


def test_usage_by_class_says_what_compaction_costs(proxy_with):
    proxy = proxy_with(Pricing={"currency": "USD", "models": {"claude-sonnet-4-5": {"input": 3, "output": 15}}},
                       Routes={"class=compaction": "beta"})
    for kind in ("compaction", "main", "main", None):
        assert proxy.call("POST", "/v1/messages", MESSAGE, headers=hints(kind))[0] == 200
    records(proxy, 4)

    def report():
        return proxy.api("GET", "/api/usage?by=class,provider")[1]
    assert wait_for(lambda: sum(r["requests"] for r in report()["rows"]) == 4)
    rows = {(r["class"], r["provider"]): r for r in report()["rows"]}
    assert set(rows) == {("compaction", "beta"), ("main", "alpha"), (None, "alpha")}
    assert rows[("main", "alpha")]["requests"] == 2 and rows[("main", "alpha")]["cost"] > 0
    status, _, csv = proxy.call("GET", "/api/usage?by=day,class&format=csv")
    assert status == 200 and b",compaction," in csv
    assert proxy.api("GET", "/api/usage?by=class,model")[0] == 400      # model is not kept per class


@pytest.mark.parametrize("routes, code", [({"class=compactoin": "beta"}, "routes_class"),
                                          ({"*haiku* *opus*": "beta"}, "routes_key"),
                                          ({"class=main class=subagent agent=x": "beta"}, "routes_key")])
def test_a_route_rule_with_a_mistake_is_refused_with_what_to_write(routes, code, upstream, upstream2):
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.validate_config(make_config(upstream, upstream2, Routes=routes))
    assert [p.code for p in info.value.said] == [code]


def test_the_page_saves_class_routes(proxy_with):
    proxy = proxy_with()
    routes = {"class=compaction": "beta", "*haiku*": "beta"}

    def put(settings):
        version = proxy.api("GET", "/api/config")[1]["version"]
        status, _, data = proxy.call("PUT", "/api/settings", settings, headers={"If-Match": version})
        return status, json.loads(data)
    assert put({"Routes": routes, "FALLBACK_ORDER": "fastest"})[0] == 200
    status, answer = put({"Routes": {"class=compaction": "beta", "class=nope": "beta"}})
    assert status == 400 and answer["problems"][0]["code"] == "routes_class"
    assert proxy.api("GET", "/api/state")[1]["routes"] == routes
    assert proxy.call("POST", "/v1/messages", MESSAGE, headers=hints("compaction"))[1]["x-ccproxy-provider"] == "beta"


# ---- a conversation stays where its cache is

@pytest.fixture
def kept(proxy_with):
    proxy = proxy_with(Fallback=["beta"], COOLDOWN_MS=1000)
    proxy.server.health.clock = Clock()
    return proxy


def ask(proxy, session, body=MESSAGE):
    """The relay that answered; once the request is recorded, which is after ccproxy noted
    where the conversation is (the test's clock moves only then)."""
    done = len(proxy.api("GET", "/api/requests")[1]["requests"])
    status, headers, _ = proxy.call("POST", "/v1/messages", body, headers=hints("main", session=session))
    assert status == 200
    records(proxy, done + 1)
    return headers["x-ccproxy-provider"]


def test_a_conversation_moved_by_failover_stays_while_its_cache_is_warm(kept, upstream, upstream2):
    clock = kept.server.health.clock
    upstream.fail_next(status=529, body=OVERLOADED)
    assert ask(kept, "conv-a") == "beta"
    clock.now += 2                          # alpha has recovered
    assert ask(kept, "conv-a") == "beta"    # ... but the conversation's cache is on beta
    assert ask(kept, "conv-b") == "alpha"   # a new conversation goes to the selection
    newest = records(kept, 3)
    assert [r["placed"] for r in newest] == ["selected", "kept", "failover"]
    assert newest[1]["note_code"][:2] == ["kept", "beta"]
    assert wait_for(lambda: len(kept.api("GET", "/api/sessions")[1]["sessions"]) == 2)
    where = {s["session"]: s["now"] for s in kept.api("GET", "/api/sessions")[1]["sessions"]}
    assert where["conv-a"]["relay"] == "beta" and where["conv-a"]["why"] == "kept"
    clock.now += ccproxy.CACHE_LIFETIME_S - 1
    assert ask(kept, "conv-a") == "beta"    # each request keeps the cache warm
    clock.now += ccproxy.CACHE_LIFETIME_S   # idle past the cache's lifetime: back to the selection
    assert ask(kept, "conv-a") == "alpha"


def test_an_hour_of_caching_keeps_it_an_hour_and_a_failing_relay_lets_it_go(kept, upstream, upstream2):
    clock = kept.server.health.clock
    hour = dict(MESSAGE, system=[{"type": "text", "text": "你是助手", "cache_control": {"type": "ephemeral", "ttl": "1h"}}])
    upstream.fail_next(status=529, body=OVERLOADED)
    assert ask(kept, "long-cache", hour) == "beta"
    clock.now += 1800
    assert ask(kept, "long-cache", hour) == "beta"
    upstream2.fail_next(status=500, body=OVERLOADED)     # beta fails: the conversation moves on
    assert ask(kept, "long-cache", hour) == "alpha"
    assert ask(kept, "long-cache", hour) == "alpha"


def test_a_conversation_without_a_session_id_is_known_by_its_opening(kept, upstream, upstream2):
    clock = kept.server.health.clock
    first = dict(MESSAGE, system="你是一个中文助手", messages=[{"role": "user", "content": "第一句"}])
    later = dict(first, messages=first["messages"] + [{"role": "assistant", "content": "好"},
                                                      {"role": "user", "content": "第二句"}])
    upstream.fail_next(status=529, body=OVERLOADED)
    assert kept.call("POST", "/v1/messages", first)[1]["x-ccproxy-provider"] == "beta"
    records(kept, 1)
    clock.now += 2
    assert kept.call("POST", "/v1/messages", later)[1]["x-ccproxy-provider"] == "beta"
    other = dict(first, messages=[{"role": "user", "content": "另一个开头"}])
    assert kept.call("POST", "/v1/messages", other)[1]["x-ccproxy-provider"] == "alpha"


@pytest.mark.parametrize("when", ["now", "idle"])
def test_a_switch_moves_now_or_as_each_conversation_goes_idle(kept, when):
    clock = kept.server.health.clock
    assert ask(kept, "ongoing") == "alpha"
    assert kept.api("POST", "/api/select", {"provider": "beta", "when": when})[0] == 200
    assert ask(kept, "new-conv") == "beta"
    assert ask(kept, "ongoing") == ("beta" if when == "now" else "alpha")
    if when == "idle":
        assert wait_for(lambda: len(kept.api("GET", "/api/sessions")[1]["sessions"]) == 2)
        where = {s["session"]: s["now"] for s in kept.api("GET", "/api/sessions")[1]["sessions"]}
        assert where["ongoing"]["relay"] == "alpha" and where["ongoing"]["why"] == "idle"
        clock.now += ccproxy.CACHE_LIFETIME_S + 1
        assert ask(kept, "ongoing") == "beta"
    assert kept.api("POST", "/api/select", {"provider": "alpha", "when": "later"})[0] == 400


# ---- relays that cannot take the request are skipped

def test_a_relay_whose_context_window_is_too_small_is_skipped(proxy_with, upstream, upstream2):
    proxy = proxy_with(Fallback=["beta"], providers={"alpha": {"context_window": 1000}})
    big = dict(MESSAGE, messages=[{"role": "user", "content": "长" * 4000}])     # 12 KB: about 2400 tokens
    status, headers, _ = proxy.call("POST", "/v1/messages", big)
    assert status == 200 and headers["x-ccproxy-provider"] == "beta" and not upstream.requests
    assert records(proxy, 1)[0]["note_code"][0] == "too_large"
    assert proxy.call("POST", "/v1/messages", MESSAGE)[1]["x-ccproxy-provider"] == "alpha"


def test_when_no_relay_can_take_it_the_client_gets_a_clear_400(proxy_with, upstream, upstream2):
    proxy = proxy_with(Fallback=["beta"], providers={"alpha": {"context_window": {"claude-*": 1000}},
                                                     "beta": {"max_output": 4096}})
    big = dict(MESSAGE, max_tokens=8192, messages=[{"role": "user", "content": "x" * 20000}])
    status, _, data = proxy.call("POST", "/v1/messages", big)
    answer = json.loads(data)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["code"] == "context_too_large" and answer["error"]["message"].startswith("prompt is too long")
    assert "alpha (claude-sonnet-4-5: 1000)" in answer["values"]["relays"]
    assert "beta (glm-4.6: max_output 4096)" in answer["values"]["relays"]
    assert not upstream.requests and not upstream2.requests


def test_a_conversations_size_comes_from_its_last_count(proxy_with, upstream, upstream2):
    """The relay's own count of the last turn, plus what the body grew by: not the bytes alone."""
    proxy = proxy_with(Fallback=["beta"], providers={"alpha": {"context_window": 4000}})
    upstream.usage = {"input_tokens": 3000, "cache_read_input_tokens": 1500, "cache_creation_input_tokens": 0}
    assert ask(proxy, "big") == "alpha"          # a short body: about 20 tokens by its bytes
    assert ask(proxy, "big") == "beta"           # 4500 counted last time
    assert ask(proxy, "small") == "alpha"


def test_a_claude_model_has_its_window_by_default_and_the_1m_beta_widens_it(proxy_with, upstream, upstream2):
    proxy = proxy_with(Fallback=["beta"])
    def huge(tag):      # 1.1 MB: over 200k tokens; each a conversation of its own
        return dict(MESSAGE, messages=[{"role": "user", "content": tag + "word " * 220000}])
    status, headers, _ = proxy.call("POST", "/v1/messages", huge("一"), timeout=30)
    assert status == 200 and headers["x-ccproxy-provider"] == "beta"      # glm-4.6's window is not known
    status, headers, _ = proxy.call("POST", "/v1/messages", huge("二"), timeout=30,
                                    headers={"anthropic-beta": "context-1m-2025-08-07"})
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha"
    image = dict(MESSAGE, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD" * 300000}}]}])
    assert proxy.call("POST", "/v1/messages", image, timeout=30)[1]["x-ccproxy-provider"] == "alpha"


def test_a_bad_limit_is_a_config_problem(upstream, upstream2):
    config = make_config(upstream, upstream2)
    config["Providers"][0]["context_window"] = {"claude-*": "big"}
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.validate_config(config)
    assert [p.code for p in info.value.said] == ["provider_limit"]


# ---- the failover list in the order measured

@pytest.fixture
def three(proxy_with):
    third = MockUpstream(models=("claude-sonnet-4-5",))
    yield lambda **top: proxy_with(Fallback=["beta", "丙站"], **top, added=[{
        "name": "丙站", "api_base_url": third.url, "api_key": "sk-third-0123456789",
        "models": ["claude-sonnet-4-5"], "price_multiplier": 0.2}])
    third.close()


def test_cheapest_tries_the_cheapest_relay_first(three, upstream):
    proxy = three(FALLBACK_ORDER="cheapest", Pricing={"currency": "USD", "models": {
        "claude-sonnet-4-5": {"input": 3, "output": 15}, "glm-4.6": {"input": 1, "output": 2}}})
    upstream.fail_next(status=529, body=OVERLOADED)
    headers = proxy.call("POST", "/v1/messages", MESSAGE)[1]
    assert headers["x-ccproxy-attempts"] == "alpha 529, %E4%B8%99%E7%AB%99 200"       # 丙站: 0.2 × 3
    state = proxy.api("GET", "/api/state")[1]["fallback"]
    assert state["order"] == "cheapest" and state["now"] == ["丙站", "beta"]      # alpha cools down


def test_fastest_tries_the_relay_with_the_quickest_first_content(three, upstream):
    proxy = three(FALLBACK_ORDER="fastest")
    health = proxy.server.health
    for _ in range(3):
        health.note_first("beta", 300.0)
        health.note_first("丙站", 900.0)
    assert proxy.api("GET", "/api/state")[1]["fallback"]["now"] == ["alpha", "beta", "丙站"]
    for _ in range(5):
        health.note_first("丙站", 100.0)
    assert proxy.api("GET", "/api/state")[1]["fallback"]["now"] == ["alpha", "丙站", "beta"]
    upstream.fail_next(status=529, body=OVERLOADED)
    assert proxy.call("POST", "/v1/messages", MESSAGE)[1]["x-ccproxy-attempts"].endswith("%E4%B8%99%E7%AB%99 200")


def test_listed_is_the_default_and_a_relay_with_no_measure_comes_after(three, upstream):
    proxy = three()
    assert proxy.api("GET", "/api/state")[1]["fallback"]["now"] == ["alpha", "beta", "丙站"]
    with pytest.raises(ccproxy.ConfigError):
        ccproxy.validate_config(dict(make_config(upstream), FALLBACK_ORDER="random"))


def test_an_image_pasted_into_a_conversation_does_not_count_as_text(proxy_with, upstream):
    proxy = proxy_with(Fallback=["beta"])
    assert ask(proxy, "pasted") == "alpha"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO" * 750000}}
    turn = dict(MESSAGE, messages=[{"role": "user", "content": [image, {"type": "text", "text": "这张图里有什么？"}]}])
    assert ask(proxy, "pasted", turn) == "alpha"        # 3 MB more, but an image's: still far under 200k tokens
    assert len(upstream.requests[-1].body) > 3000000


@pytest.mark.parametrize("body, size, hour", [
    (b'{"messages":[{"content":"hi"}]}', 31, False),
    (b'{"source":{"data": "' + b"A" * 5000 + b'"},"text":"x"}', 20 + 14 - 1, False),    # its bytes and a quote
    (b'{"data":"short","x":1}', 22, False),
    (b'{"data": ' + b"1" * 5000, 5009, False),              # no string after "data": nothing left out
    (b'{"cache_control":{"type":"ephemeral","ttl":"1h"}}', 49, True),
    (b'{"cache_control":{"type":"ephemeral","ttl": "5m"}}', 50, False),
])
def test_body_facts_leaves_out_base64_data_and_sees_an_hour_of_caching(body, size, hour):
    assert ccproxy.body_facts(body) == (size, hour)
