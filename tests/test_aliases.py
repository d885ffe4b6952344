"""Claude Code's own /model picker: every provider's models under an alias in /v1/models,
and requests for an alias (or a Routes match) relayed to that provider."""

import json
import time

import pytest

import ccproxy
from conftest import APIKEY, make_config, start_proxy, wait_for, write_config
from mock_upstream import MockUpstream
from test_relay import MESSAGE

OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


@pytest.fixture
def upstream3():
    mock = MockUpstream(models=("glm-4.6", "deepseek-chat"))
    yield mock
    mock.close()


@pytest.fixture
def picker(proxy_with, upstream3):
    return proxy_with(Fallback=["beta", "中转站C"], added=[{
        "name": "中转站C", "api_base_url": upstream3.url, "api_key": "sk-c-1234567890",
        "models": ["glm-4.6", "deepseek-chat"]}])


def alias_of(proxy, provider, model):
    for alias, (name, real) in proxy.store.view.aliases.items():
        if (name, real) == (provider, model):
            return alias
    raise AssertionError("no alias for %s %s" % (provider, model))


@pytest.mark.parametrize("names", [["alpha", "a.b", "a_b", "A B", "中转站A", "中转站B", "🚀", ""]])
def test_aliases_start_with_claude_and_are_unique(names):
    tokens = ccproxy.provider_tokens(names)
    assert len(set(tokens.values())) == len(names)
    for name, token in tokens.items():
        alias = ccproxy.model_alias(token, "glm-4.6")
        assert alias.startswith("claude-via-") and alias.endswith("--glm-4.6")
        assert token.isascii() and all(c.isalnum() or c == "-" for c in token)


def test_colliding_hashes_get_longer_tokens(monkeypatch):
    class SameHash:
        def __init__(self, data):
            self.data = data

        def hexdigest(self):
            return "0" * 6 + ("1" if self.data == "中".encode() else "2") * 34   # equal in their first 6
    monkeypatch.setattr(ccproxy.hashlib, "sha1", SameHash)
    tokens = ccproxy.provider_tokens(["中", "文"])            # same slug "p", same first 6 hex
    assert len(set(tokens.values())) == 2


def test_v1_models_lists_every_provider_under_an_alias_with_paging(picker, upstream):
    status, _, data = picker.call("GET", "/v1/models?limit=1000")
    page = json.loads(data)
    ids = [m["id"] for m in page["data"]]
    assert status == 200 and ids[:2] == ["claude-sonnet-4-5", "claude-haiku-4-5"]      # the selected one's
    aliases = page["data"][2:]
    assert [m["display_name"] for m in aliases] == ["claude-sonnet-4-5 · alpha", "claude-haiku-4-5 · alpha",
                                                    "glm-4.6 · beta", "glm-4.6 · 中转站C", "deepseek-chat · 中转站C"]
    assert all(m["id"].startswith("claude-via-") for m in aliases) and len(set(ids)) == len(ids)
    # paging walks all of them, forwards and back
    seen, after = [], None
    while True:
        query = "/v1/models?limit=2" + ("&after_id=" + after if after else "")
        chunk = json.loads(picker.call("GET", query)[2])
        seen += [m["id"] for m in chunk["data"]]
        if not chunk["has_more"]:
            break
        after = chunk["last_id"]
    assert seen == ids
    back = json.loads(picker.call("GET", "/v1/models?limit=2&before_id=" + ids[-1])[2])
    assert [m["id"] for m in back["data"]] == ids[-3:-1]
    alias = alias_of(picker, "中转站C", "glm-4.6")
    status, _, data = picker.call("GET", "/v1/models/" + alias)
    assert status == 200 and json.loads(data)["display_name"] == "glm-4.6 · 中转站C"
    assert not upstream.requests                              # never a call to a relay


def test_a_cooling_or_failing_provider_is_marked(picker):
    picker.server.health.cool_down("beta", 60, "529")
    picker.server.tests["中转站C"] = {"status": "failing"}
    names = {m["id"]: m["display_name"] for m in json.loads(picker.call("GET", "/v1/models?limit=1000")[2])["data"]}
    assert names[alias_of(picker, "beta", "glm-4.6")] == "glm-4.6 · beta (cooling down)"
    assert names[alias_of(picker, "中转站C", "deepseek-chat")] == "deepseek-chat · 中转站C (failing its test)"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens?beta=true"])
def test_an_alias_goes_to_its_provider_with_the_real_model(picker, upstream, upstream3, path, log_lines):
    alias = alias_of(picker, "中转站C", "deepseek-chat")
    status, headers, _ = picker.call("POST", path, dict(MESSAGE, model=alias))
    assert status == 200 and headers["x-ccproxy-provider"] == "%E4%B8%AD%E8%BD%AC%E7%AB%99C"
    assert upstream3.last.json["model"] == "deepseek-chat" and not upstream.requests
    assert picker.store.view.selected == "alpha"               # the selection stays
    assert wait_for(lambda: "model alias: deepseek-chat of 中转站C" in log_lines.text)


def test_an_alias_bypasses_family_mapping(picker, upstream2):
    # beta maps the sonnet family to glm-4.6; its alias of claude-sonnet-4-5 does not exist, but
    # alpha's does: it must reach alpha as claude-sonnet-4-5, never glm-4.6
    picker.store.select("beta")
    alias = alias_of(picker, "alpha", "claude-haiku-4-5")
    status, headers, _ = picker.call("POST", "/v1/messages", dict(MESSAGE, model=alias))
    assert status == 200 and headers["x-ccproxy-provider"] == "alpha"
    assert not upstream2.requests


def test_an_alias_fails_over_only_to_providers_that_list_the_same_model(picker, upstream2, upstream3):
    upstream2.fail_next(status=529, body=OVERLOADED)
    status, headers, _ = picker.call("POST", "/v1/messages", dict(MESSAGE, model=alias_of(picker, "beta", "glm-4.6")))
    assert status == 200 and headers["x-ccproxy-attempts"] == "beta 529, %E4%B8%AD%E8%BD%AC%E7%AB%99C 200"
    assert upstream3.last.json["model"] == "glm-4.6"
    # deepseek-chat is only 中转站C's: nothing to fail over to
    picker.server.health.cooling.clear()
    upstream3.fail_next(status=529, body=OVERLOADED)
    status, headers, _ = picker.call("POST", "/v1/messages",
                                     dict(MESSAGE, model=alias_of(picker, "中转站C", "deepseek-chat")))
    assert status == 529 and "x-ccproxy-attempts" not in headers


def test_routes_send_a_family_to_a_provider(tmp_path, upstream, upstream2):
    config = make_config(upstream, upstream2, Routes={"*HAIKU*": "beta"})
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        status, headers, _ = proxy.call("POST", "/v1/messages", dict(MESSAGE, model="claude-haiku-4-5-20251001"))
        assert status == 200 and headers["x-ccproxy-provider"] == "beta"
        assert upstream2.last.json["model"] == "glm-4.5-air"           # beta's own mapping for haiku
        status, headers, _ = proxy.call("POST", "/v1/messages", MESSAGE)  # sonnet: the selection
        assert headers["x-ccproxy-provider"] == "alpha"
        assert proxy.api("GET", "/api/state")[1]["routes"] == {"*HAIKU*": "beta"}      # as written, matched in any case
    finally:
        proxy.stop()


@pytest.mark.parametrize("routes, problem", [({"*haiku*": "nope"}, "Routes.*haiku*: 'nope' is not a provider"),
                                             (["*haiku*"], "Routes must be an object")])
def test_routes_are_validated(routes, problem):
    raw = {"APIKEY": APIKEY, "Providers": [{"name": "a", "api_base_url": "https://a.example"}], "Routes": routes}
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.validate_config(raw)
    assert any(problem in p for p in info.value.problems)


def test_the_copied_settings_turn_gateway_discovery_on(picker):
    state = picker.api("GET", "/api/state")[1]
    assert state["proxy_settings"]["env"]["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] == "1"
    assert state["proxy_settings"]["env"]["CLAUDE_CODE_GATEWAY_HINT_HEADERS"] == "1"
    prefix = {p["name"]: p["alias_prefix"] for p in state["providers"] if not p["separator"]}
    assert prefix["中转站C"] + "glm-4.6" == alias_of(picker, "中转站C", "glm-4.6")
    # a provider's own settings (straight to the relay) do not
    assert "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY" not in picker.api("GET", "/api/providers/beta/key")[1]["settings"]["env"]


def test_fifty_relays_of_two_hundred_models_list_quickly_enough_to_build(tmp_path):
    """Not a timing goal (that is tests/bench.py's): the catalog is built once per change."""
    config = {"APIKEY": APIKEY, "Providers": [{"name": "中转站%02d" % i, "api_base_url": "https://r%d.example" % i,
                             "models": ["model-%03d" % m for m in range(200)]} for i in range(50)]}
    started = time.monotonic()
    parsed = ccproxy.validate_config(config)
    targets = {p.name: ccproxy.Target(parsed, p, {}, {}) for p in parsed.providers}
    view = ccproxy.View(parsed, targets, "中转站00")
    assert len(view.aliases) == 10000 and len(view.model_ids) == 10200
    assert time.monotonic() - started < 30                   # a bound against a runaway, not a goal
