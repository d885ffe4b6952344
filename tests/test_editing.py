"""Relays managed from the page: GET /api/config and every write path (If-Match, validation,
atomic write with backups, state following a rename), import and export."""

import json
import os
import urllib.parse

import pytest

import ccproxy
from conftest import APIKEY, KEY_A, KEY_B, make_config, start_proxy


@pytest.fixture
def edit_proxy(tmp_path, upstream, upstream2):
    config = make_config(upstream, upstream2, Fallback=["beta"])
    config["Providers"][0]["_note"] = "kept by every edit"
    config["x-unknown"] = {"kept": [1, 2]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, ensure_ascii=False, indent=4), encoding="utf-8")
    os.chmod(path, 0o644)
    proxy = start_proxy(str(path))
    proxy.path = str(path)
    yield proxy
    proxy.stop()


def version(proxy):
    status, body = proxy.api("GET", "/api/config")
    assert status == 200
    return body["version"]


def write(proxy, method, path, body, if_match="current"):
    headers = {}
    if if_match == "current":
        headers["If-Match"] = version(proxy)
    elif if_match is not None:
        headers["If-Match"] = if_match
    status, _, data = proxy.call(method, path, body, headers)
    return status, json.loads(data)


def on_disk(proxy):
    with open(proxy.path, encoding="utf-8") as f:
        return f.read()


def test_the_config_is_served_without_any_key(edit_proxy):
    status, headers, data = edit_proxy.call("GET", "/api/config")
    body = json.loads(data)
    assert status == 200 and headers["etag"] == '"%s"' % body["version"]
    text = data.decode()
    for secret in (APIKEY, KEY_A, KEY_B):
        assert secret not in text
    alpha = body["config"]["Providers"][0]
    assert alpha["has_key"] is True and alpha["api_key"] == ccproxy.key_hint(KEY_A)
    assert body["config"]["x-unknown"] == {"kept": [1, 2]} and "HOST" not in body["editable"]


def test_create_edit_and_keep_the_key(edit_proxy, upstream):
    status, body = write(edit_proxy, "PUT", "/api/providers/" + urllib.parse.quote("新中转"),
                         {"api_base_url": upstream.url + "/v1/messages", "api_key": "sk-new-key-1234567890",
                          "comment": "第一行\n第二行", "models": ["claude-sonnet-4-5"]})
    assert status == 200 and "新中转" in [p["name"] for p in body["state"]["providers"]]
    assert json.loads(on_disk(edit_proxy))["Providers"][-1]["api_key"] == "sk-new-key-1234567890"
    # an edit without api_key keeps the key; null removes a field
    status, body = write(edit_proxy, "PUT", "/api/providers/" + urllib.parse.quote("新中转"),
                         {"comment": None, "auth": "bearer"})
    entry = json.loads(on_disk(edit_proxy))["Providers"][-1]
    assert status == 200 and entry["api_key"] == "sk-new-key-1234567890" and "comment" not in entry
    assert edit_proxy.store.view.targets["新中转"].provider.auth == "bearer"
    assert edit_proxy.call("POST", "/v1/messages", {"model": "m", "max_tokens": 1, "messages": []})[0] == 200


def test_the_file_keeps_comments_unknown_keys_order_indentation_and_gets_mode_0600(edit_proxy):
    before = json.loads(on_disk(edit_proxy))
    assert write(edit_proxy, "PUT", "/api/providers/alpha", {"comment": "changed"})[0] == 200
    text = on_disk(edit_proxy)
    after = json.loads(text)
    assert list(after) == list(before) and after["_comment"] == "test" and after["x-unknown"] == {"kept": [1, 2]}
    alpha = after["Providers"][0]
    assert list(alpha)[:3] == list(before["Providers"][0])[:3] and alpha["_note"] == "kept by every edit"
    assert text.startswith('{\n    "_comment"')                   # 4 spaces, as the file had
    assert oct(os.stat(edit_proxy.path).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("if_match, status, code", [(None, 428, "version_missing"), ("0123abcd", 409, "stale_version")])
def test_a_write_without_the_current_version_changes_nothing(edit_proxy, if_match, status, code):
    before = on_disk(edit_proxy)
    got, body = write(edit_proxy, "PUT", "/api/providers/alpha", {"comment": "x"}, if_match=if_match)
    assert got == status and body["code"] == code and body["version"] == version(edit_proxy)
    assert on_disk(edit_proxy) == before


def test_a_hand_edit_meanwhile_makes_the_page_s_version_stale(edit_proxy):
    seen = version(edit_proxy)
    with open(edit_proxy.path, "a", encoding="utf-8") as f:
        f.write("\n")
    status, body = write(edit_proxy, "PUT", "/api/providers/alpha", {"comment": "x"}, if_match=seen)
    assert status == 409 and body["version"] != seen


@pytest.mark.parametrize("method, path, body, problem", [
    ("PUT", "/api/providers/alpha", {"api_base_url": "not a url"}, "api_base_url must be an http(s) URL"),
    ("PUT", "/api/providers/x", {"name": "bad\nname", "api_base_url": "https://x.example"}, "unprintable"),
    ("PUT", "/api/settings", {"HeaderOverrides": {"p": {"Content-Length": "5"}}}, "a preset cannot set Content-Length"),
    ("PUT", "/api/settings", {"Fallback": ["nope"]}, "is not a provider"),
])
def test_an_invalid_result_is_400_with_the_problems_and_nothing_is_written(edit_proxy, method, path, body, problem):
    before = on_disk(edit_proxy)
    status, answer = write(edit_proxy, method, path, body)
    assert status == 400 and answer["code"] == "config_invalid"
    assert any(problem in p["message"] and p["code"] and p["file"] == "config.json" for p in answer["problems"]), answer["problems"]
    assert on_disk(edit_proxy) == before


def test_backups_are_kept_and_rotated(edit_proxy):
    for i in range(ccproxy.CONFIG_BACKUPS + 2):
        assert write(edit_proxy, "PUT", "/api/providers/alpha", {"comment": "edit %d" % i})[0] == 200
    directory = os.path.dirname(edit_proxy.path)
    backups = sorted(n for n in os.listdir(directory) if n.startswith("config.json.bak-"))
    assert len(backups) == ccproxy.CONFIG_BACKUPS
    with open(os.path.join(directory, backups[-1]), encoding="utf-8") as f:
        assert json.load(f)["Providers"][0]["comment"] == "edit %d" % ccproxy.CONFIG_BACKUPS
    assert all(oct(os.stat(os.path.join(directory, n)).st_mode & 0o777) == "0o600" for n in backups)


def test_a_rename_carries_the_providers_state(edit_proxy, upstream2):
    store = edit_proxy.store
    store.select("beta")
    store.set_overrides("beta", "ua", None)
    store.set_fallback(True, ["beta"])
    upstream2.models = ["glm-4.6", "glm-5"]
    edit_proxy.api("POST", "/api/refresh-models", {"provider": "beta"})
    status, body = write(edit_proxy, "PUT", "/api/providers/beta", {"name": "贝塔"})
    assert status == 200
    view = store.view
    assert view.selected == "贝塔" and view.fallback == ("贝塔",)
    assert view.targets["贝塔"].header_preset_name == "ua" and view.targets["贝塔"].models == ("glm-4.6", "glm-5")
    assert json.loads(on_disk(edit_proxy))["Fallback"] == ["贝塔"]
    assert write(edit_proxy, "PUT", "/api/providers/alpha", {"name": "贝塔"})[0] == 409     # taken


def test_duplicate_keeps_the_key_and_lands_under_the_original(edit_proxy, upstream2):
    """The copy is made on the server: the key comes along (the page never has it), the copy
    goes right below its original, and it has the original's presets, models and learned fixes
    (the same relay) but neither the selection nor a place in the failover list."""
    store = edit_proxy.store
    store.select("beta")
    store.set_overrides("beta", "ua", None)
    upstream2.models = ["glm-4.6", "glm-5"]
    edit_proxy.api("POST", "/api/refresh-models", {"provider": "beta"})
    status, body = write(edit_proxy, "POST", "/api/providers/beta/duplicate", {"name": "贝塔（副本）"})
    assert status == 200 and body["name"] == "贝塔（副本）"
    providers = json.loads(on_disk(edit_proxy))["Providers"]
    assert [p["name"] for p in providers] == ["alpha", "----", "beta", "贝塔（副本）"]
    original, copy = providers[2], providers[3]
    assert copy == dict(original, name="贝塔（副本）") and copy["api_key"] == KEY_B
    view = store.view
    assert view.selected == "beta" and view.fallback == ("beta",)
    copied = view.targets["贝塔（副本）"]
    assert copied.header_preset_name == "ua" and copied.models == ("glm-4.6", "glm-5")

    # Without a name: "NAME (copy)", then "NAME (copy 2)"; a taken name is refused.
    assert write(edit_proxy, "POST", "/api/providers/alpha/duplicate", {})[1]["name"] == "alpha (copy)"
    assert write(edit_proxy, "POST", "/api/providers/alpha/duplicate", None)[1]["name"] == "alpha (copy 2)"
    names = [p["name"] for p in json.loads(on_disk(edit_proxy))["Providers"]]
    assert names[:3] == ["alpha", "alpha (copy 2)", "alpha (copy)"]
    status, body = write(edit_proxy, "POST", "/api/providers/alpha/duplicate", {"name": "beta"})
    assert status == 409 and body["code"] == "name_taken"
    assert write(edit_proxy, "POST", "/api/providers/nope/duplicate", {})[0] == 404
    assert write(edit_proxy, "POST", "/api/providers/alpha/duplicate", {}, if_match=None)[0] == 428

    # The copy relays with the original's key.
    status, _ = edit_proxy.api("POST", "/api/select", {"provider": "贝塔（副本）"})
    assert status == 200
    assert edit_proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": "hi"}]})[0] == 200
    assert upstream2.last.headers["authorization"] == "Bearer " + KEY_B


def test_delete_and_order(edit_proxy):
    names = [p["name"] for p in json.loads(on_disk(edit_proxy))["Providers"]]
    status, _ = write(edit_proxy, "POST", "/api/providers-order", {"names": names[::-1]})
    assert status == 200 and [p.name for p in edit_proxy.store.view.config.providers] == names[::-1]
    assert write(edit_proxy, "POST", "/api/providers-order", {"names": names[:1]})[0] == 400
    status, _ = write(edit_proxy, "DELETE", "/api/providers/beta", None)
    assert status == 200 and "beta" not in edit_proxy.store.view.targets
    assert json.loads(on_disk(edit_proxy)).get("Fallback") == []
    assert write(edit_proxy, "DELETE", "/api/providers/beta", None)[0] == 404


def test_settings(edit_proxy):
    status, _ = write(edit_proxy, "PUT", "/api/settings",
                      {"env-models": {"ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air"}, "COOLDOWN_MS": 5000})
    assert status == 200 and edit_proxy.store.view.config.cooldown_s == 5.0
    assert write(edit_proxy, "PUT", "/api/settings", {"COOLDOWN_MS": None})[0] == 200
    assert "COOLDOWN_MS" not in json.loads(on_disk(edit_proxy))
    for key in ("HOST", "PORT", "APIKEY"):
        status, body = write(edit_proxy, "PUT", "/api/settings", {key: "x"})
        assert status == 400 and "cannot be edited here" in body["error"]["message"]


def test_export_without_and_with_keys_never_the_apikey(edit_proxy):
    status, headers, data = edit_proxy.call("GET", "/api/export")
    assert status == 200 and "attachment" in headers["content-disposition"]
    assert KEY_A.encode() not in data and APIKEY.encode() not in data
    exported = json.loads(data)
    assert [p["name"] for p in exported["Providers"]] == ["alpha", "----", "beta"]
    status, _, data = edit_proxy.call("GET", "/api/export?keys=1")
    assert KEY_A.encode() in data and APIKEY.encode() not in data


CCR = {"LOG": False, "Providers": [{"name": "ccr-relay", "api_base_url": "https://ccr.example/v1/messages",
                                     "api_key": "sk-ccr-1", "models": ["glm-4.6"],
                                     "transformer": {"use": ["Anthropic"]}}],
       "Router": {"default": "ccr-relay,glm-4.6"}}
SETTINGS = {"env": {"ANTHROPIC_BASE_URL": "https://relay.example/api", "ANTHROPIC_API_KEY": "sk-settings-2",
                    "ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air"}}


@pytest.mark.parametrize("source, kind, name", [(CCR, "claude-code-router config", "ccr-relay"),
                                                (SETTINGS, "Claude Code settings.json", "relay.example")])
def test_import_previews_then_applies(edit_proxy, source, kind, name):
    text = json.dumps(source)
    status, preview = edit_proxy.api("POST", "/api/import/preview", {"text": text})
    assert status == 200 and preview["format"] == kind
    (entry,) = preview["providers"]
    assert entry["name"] == name and entry["action"] == "add"
    assert "sk-ccr-1" not in json.dumps(preview) and "sk-settings-2" not in json.dumps(preview)
    status, body = write(edit_proxy, "POST", "/api/import", {"text": text})
    assert status == 200 and body["imported"] == [name]
    provider = edit_proxy.store.view.config.by_name[name]
    assert provider.api_key in ("sk-ccr-1", "sk-settings-2")
    if source is SETTINGS:
        assert provider.auth == "x-api-key" and provider.env_models == {"ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air"}
    assert "transformer" not in json.loads(on_disk(edit_proxy))["Providers"][-1]


# A claude-code-router config as users have them: Anthropic-format relays beside OpenAI-format
# ones ccr translates for, and a Router for each kind of request.
CCR_MIXED = {"Providers": [
    {"name": "中转站A", "api_base_url": "https://a.example/v1/messages", "api_key": "sk-a-1",
     "models": ["glm-4.6"], "transformer": {"use": ["Anthropic"]}},
    {"name": "便宜站", "api_base_url": "https://cheap.example/v1/messages", "api_key": "sk-cheap-1",
     "models": ["glm-4.5-air"], "protocol": "anthropic_messages"},
    {"name": "deepseek", "api_base_url": "https://api.deepseek.com/chat/completions", "api_key": "sk-ds-1",
     "models": ["deepseek-chat"], "transformer": {"use": ["deepseek"]}},
    {"name": "openrouter", "api_base_url": "https://openrouter.ai/api/v1/x", "api_key": "sk-or-1",
     "models": ["m"], "transformer": {"use": [["openrouter", {"provider": {"only": ["x"]}}]]}},
    {"name": "gemini", "api_base_url": "https://generativelanguage.googleapis.com/v1beta/models/",
     "api_key": "g", "models": ["gemini-2.5-pro"], "transformer": {"use": ["gemini"]}}],
    "Router": {"default": "中转站A,glm-4.6", "background": "便宜站,glm-4.5-air", "think": "deepseek,deepseek-reasoner",
               "longContext": "gemini,gemini-2.5-pro", "longContextThreshold": 60000}}


def test_a_ccr_import_refuses_other_apis_and_carries_its_router(edit_proxy):
    text = json.dumps(CCR_MIXED, ensure_ascii=False)
    status, preview = edit_proxy.api("POST", "/api/import/preview", {"text": text})
    assert status == 200
    plan = {p["name"]: p for p in preview["providers"]}
    assert {n: p["action"] for n, p in plan.items()} == {"中转站A": "add", "便宜站": "add", "deepseek": "refused",
                                                        "openrouter": "refused", "gemini": "refused"}
    assert plan["deepseek"]["code"] == "import_other_api" and "/chat/completions" in plan["deepseek"]["reason"]
    assert "openrouter transformer" in plan["openrouter"]["reason"] and "v1beta" in plan["gemini"]["reason"]
    assert plan["中转站A"]["provider"]["api_base_url"] == "https://a.example/v1/messages"     # the URL, shown
    assert preview["routes"] == {"*haiku*": "便宜站"}
    notes = {n["field"]: n["code"] for n in preview["notes"]}
    assert notes == {"default": "router_default", "think": "router_unsupported",
                     "longContext": "router_unsupported", "longContextThreshold": "router_unsupported"}

    # Ticking a refused one does not import it.
    status, body = write(edit_proxy, "POST", "/api/import", {"text": text, "names": ["中转站A", "便宜站", "deepseek"]})
    assert status == 200 and body["imported"] == ["中转站A", "便宜站"] and body["refused"] == ["deepseek"]
    config = json.loads(on_disk(edit_proxy))
    names = [p["name"] for p in config["Providers"]]
    assert "deepseek" not in names and "gemini" not in names
    assert config["Routes"] == {"*haiku*": "便宜站"}
    view = edit_proxy.store.view.config
    assert view.by_name["中转站A"].env_models == {"ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6",
                                                  "ANTHROPIC_DEFAULT_OPUS_MODEL": "glm-4.6"}
    assert view.by_name["便宜站"].env_models == {"ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air"}
    assert view.route_for("claude-haiku-4-5").provider == "便宜站"

    # Imported again with Routes sending haiku elsewhere: that entry is kept, and said.
    assert write(edit_proxy, "PUT", "/api/settings", {"Routes": {"*haiku*": "beta"}})[0] == 200
    status, body = write(edit_proxy, "POST", "/api/import", {"text": text})
    assert status == 200 and json.loads(on_disk(edit_proxy))["Routes"] == {"*haiku*": "beta"}
    assert {"code": "route_kept", "field": "*haiku*", "value": "beta"}.items() <= \
        [n for n in body["notes"] if n["code"] == "route_kept"][0].items()


def test_an_export_without_keys_imports_back_keeping_the_stored_keys(edit_proxy):
    exported = json.loads(edit_proxy.call("GET", "/api/export")[2])
    exported["Providers"][0]["comment"] = "changed by import"
    text = json.dumps(exported)
    plan = {p["name"]: p for p in edit_proxy.api("POST", "/api/import/preview", {"text": text})[1]["providers"]}
    assert plan["alpha"]["action"] == "change" and plan["alpha"]["fields"] == ["comment"]
    assert plan["beta"]["action"] == "same"
    assert write(edit_proxy, "POST", "/api/import", {"text": text})[0] == 200
    alpha = edit_proxy.store.view.config.by_name["alpha"]
    assert alpha.comment == "changed by import" and alpha.api_key == KEY_A


@pytest.mark.parametrize("text", ["not json", "[1]", '{"something": 1}'])
def test_an_unknown_import_is_refused_in_words(edit_proxy, text):
    status, body = edit_proxy.api("POST", "/api/import/preview", {"text": text})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("method, path", [("GET", "/api/config"), ("PUT", "/api/providers/alpha"),
                                          ("DELETE", "/api/providers/alpha"), ("POST", "/api/providers-order"),
                                          ("PUT", "/api/settings"), ("GET", "/api/export"),
                                          ("POST", "/api/import/preview"), ("POST", "/api/import")])
def test_every_editing_route_needs_the_key(edit_proxy, method, path):
    status, _, _ = edit_proxy.call(method, path, {}, key=None)
    assert status == 401


def test_log_level_is_applied_by_every_reload_unless_a_flag_fixed_it(edit_proxy):
    """LOG_LEVEL is offered in the page's Settings: a change there (or Reload, or SIGHUP, which
    reloads) takes effect at once."""
    import logging
    root = logging.getLogger()
    before = root.level
    try:
        assert root.level == logging.INFO                           # make_config's LOG_LEVEL
        assert write(edit_proxy, "PUT", "/api/settings", {"LOG_LEVEL": "WARNING"})[0] == 200
        assert root.level == logging.WARNING
        raw = json.loads(on_disk(edit_proxy))
        raw["LOG_LEVEL"] = "DEBUG"
        with open(edit_proxy.path, "w", encoding="utf-8") as f:
            json.dump(raw, f)
        assert edit_proxy.api("POST", "/api/reload")[0] == 200
        assert root.level == logging.DEBUG
        fixed = ccproxy.make_server(edit_proxy.path, "127.0.0.1", 0, log_level="ERROR")   # --log-level ERROR
        try:
            assert root.level == logging.ERROR
            fixed.store.reload()
            assert root.level == logging.ERROR
        finally:
            fixed.server_close()
    finally:
        root.setLevel(before)
