"""A small team on one ccproxy: per-user keys (Keys), their limits and permissions, attribution,
and the administrator's APIKEY staying the only key that manages ccproxy."""

import datetime
import hashlib
import json
import time
from urllib.parse import quote

import pytest

import ccproxy
from conftest import APIKEY, KEY_A, KEY_B, start_proxy, wait_for, write_config
from test_relay import MESSAGE
from test_usage import PRICING, usage

MAIN, SPARE = "中转站A", "备用🚀"
WANG, LI = "小王", "李四"
SECRET_WANG = "sk-ccp-wang-0123456789abcdefghijklmnopqrstuvwxyz"
SECRET_LI = "sk-ccp-li-zyxwvutsrqponmlkjihgfedcba9876543210"


def sha(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def team_config(upstream, upstream2, keys=(), **top):
    config = {"HOST": "127.0.0.1", "PORT": 0, "APIKEY": APIKEY, "Pricing": PRICING, "Fallback": [SPARE],
              "Providers": [{"name": MAIN, "api_base_url": upstream.url + "/v1/messages", "api_key": KEY_A,
                             "models": ["claude-sonnet-4-5", "claude-haiku-4-5"]},
                            {"name": SPARE, "api_base_url": upstream2.url + "/v1/messages", "api_key": KEY_B,
                             "models": ["glm-4.6"], "env-models": {"ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6"}}],
              "Keys": [dict({"name": WANG, "sha256": sha(SECRET_WANG)}, **keys[0]) if keys else
                       {"name": WANG, "sha256": sha(SECRET_WANG)},
                       {"name": LI, "sha256": sha(SECRET_LI)}]}
    config.update(top)
    return config


@pytest.fixture
def team(tmp_path, upstream, upstream2):
    """start(**wang's fields) -> a running proxy with the keys 小王 (those fields) and 李四."""
    started = []

    def start(**fields):
        path = write_config(tmp_path / "config.json", team_config(upstream, upstream2, [fields]))
        proxy = start_proxy(path)
        proxy.config_path = path
        started.append(proxy)
        return proxy
    yield start
    for proxy in started:
        proxy.stop()


def same_minute(seconds=15):
    """Wait, if need be, until `seconds` are left in the current minute: requests per minute
    are counted in fixed minutes, and a test of a limit must not straddle two."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.05)


def relay(proxy, secret, body=MESSAGE):
    return proxy.call("POST", "/v1/messages", body, key=secret)


def error_of(response):
    status, headers, body = response
    return status, headers, json.loads(body)["error"]


def version(proxy):
    return proxy.api("GET", "/api/config")[1]["version"]


def test_a_key_is_created_in_the_page_shown_once_and_stored_as_a_hash(team):
    proxy = team()
    status, headers, body = proxy.call("POST", "/api/keys", {"name": "王五", "rpm": 10, "models": ["claude-*"]},
                                       headers={"If-Match": version(proxy)})
    created = json.loads(body)
    assert status == 200 and created["name"] == "王五" and created["key"].startswith("sk-ccp-")
    secret = created["key"]
    env = created["settings"]["env"]
    assert env["ANTHROPIC_AUTH_TOKEN"] == secret and env["ANTHROPIC_BASE_URL"] == proxy.url
    with open(proxy.config_path, encoding="utf-8") as f:
        text = f.read()
    assert secret not in text and sha(secret) in text
    entry = [k for k in json.loads(text)["Keys"] if k["name"] == "王五"][0]
    assert entry == {"name": "王五", "enabled": True, "rpm": 10, "models": ["claude-*"], "sha256": sha(secret)}
    listed = proxy.api("GET", "/api/keys")[1]["keys"]
    assert [k["name"] for k in listed] == [WANG, LI, "王五"]
    assert secret not in json.dumps(listed) and "sha256" not in json.dumps(listed)
    assert relay(proxy, secret)[0] == 200                                  # it works at once
    # The same name again: refused; a key's hash is never taken from the page.
    assert proxy.call("POST", "/api/keys", {"name": "王五"}, headers={"If-Match": version(proxy)})[0] == 409
    status, _, err = error_of(proxy.call("PUT", "/api/keys/" + quote("王五"), {"sha256": "0" * 64},
                                         headers={"If-Match": version(proxy)}))
    assert status == 400 and "rekey" in err["message"]


def test_rekey_disable_and_delete(team):
    proxy = team()
    assert relay(proxy, SECRET_WANG)[0] == 200
    status, _, body = proxy.call("POST", "/api/keys/%s/rekey" % quote(WANG), headers={"If-Match": version(proxy)})
    fresh = json.loads(body)["key"]
    assert status == 200 and fresh != SECRET_WANG
    status, _, err = error_of(relay(proxy, SECRET_WANG))
    assert status == 401 and "invalid API key" in err["message"]          # the old secret is gone
    assert relay(proxy, fresh)[0] == 200
    assert proxy.call("PUT", "/api/keys/" + quote(WANG), {"enabled": False}, headers={"If-Match": version(proxy)})[0] == 200
    status, headers, err = error_of(relay(proxy, fresh))
    assert status == 401 and "key 小王 is disabled" in err["message"] and headers["x-should-retry"] == "false"
    for path in ("/api/me", "/api/state"):          # the page's login says why too, not "wrong key"
        status, _, data = proxy.call("GET", path, key=fresh)
        assert status == 401 and json.loads(data)["code"] == "key_disabled" and json.loads(data)["values"]["name"] == WANG
    assert proxy.call("DELETE", "/api/keys/" + quote(WANG), headers={"If-Match": version(proxy)})[0] == 200
    assert relay(proxy, fresh)[0] == 401
    answer = proxy.api("GET", "/api/keys")
    assert [k["name"] for k in answer[1]["keys"]] == [LI], answer


def test_an_expired_key_says_so(team):
    proxy = team(expires=(datetime.date.today() - datetime.timedelta(days=1)).isoformat())
    status, headers, err = error_of(relay(proxy, SECRET_WANG))
    assert status == 401 and "expired on" in err["message"] and headers["x-should-retry"] == "false"
    answer = json.loads(proxy.call("GET", "/api/state", key=SECRET_WANG)[2])
    assert answer["code"] == "key_expired" and answer["values"]["expires"] == (datetime.date.today() - datetime.timedelta(days=1)).isoformat()
    assert relay(proxy, SECRET_LI)[0] == 200
    tomorrow = team(expires=datetime.date.today().isoformat())             # works to the end of today
    assert relay(tomorrow, SECRET_WANG)[0] == 200


def test_user_keys_relay_and_read_their_own_usage_nothing_else(team):
    proxy = team()
    assert relay(proxy, SECRET_WANG)[0] == 200
    assert proxy.call("GET", "/v1/models", key=SECRET_WANG)[0] == 200
    me = proxy.api("GET", "/api/me", key=SECRET_WANG)[1]
    assert me["name"] == WANG and "sha256" not in me
    for method, path in (("GET", "/api/state"), ("POST", "/api/select"), ("GET", "/api/keys"),
                         ("GET", "/api/config"), ("GET", "/metrics"), ("GET", "/api/usage"),
                         ("GET", "/api/providers/%s/key" % quote(MAIN)), ("POST", "/api/keys")):
        status, _, err = error_of(proxy.call(method, path, {} if method == "POST" else None, key=SECRET_WANG))
        assert status == 403 and err["type"] == "permission_error", path
        assert "user key 小王" in err["message"] and "APIKEY" in err["message"]
    assert proxy.api("GET", "/api/me")[1] == {"name": None, "admin": True}
    assert proxy.call("GET", "/api/me", key="sk-wrong-000000000000")[0] == 401


def test_requests_per_minute_reached_and_freed(team):
    proxy = team(rpm=3)
    same_minute()
    for _ in range(3):
        assert relay(proxy, SECRET_WANG)[0] == 200
    status, headers, err = error_of(relay(proxy, SECRET_WANG))
    assert status == 429 and err["type"] == "rate_limit_error"
    assert "3 requests this minute (rpm)" in err["message"] and WANG in err["message"]
    assert 1 <= int(headers["retry-after"]) <= 60 and "x-should-retry" not in headers    # worth a retry
    assert relay(proxy, SECRET_LI)[0] == 200 and relay(proxy, APIKEY)[0] == 200          # only 小王's
    # count_tokens is free and comes ~17 at once from /context: not counted, not refused.
    for _ in range(5):
        assert proxy.call("POST", "/v1/messages/count_tokens", MESSAGE, key=SECRET_WANG)[0] == 200
    # The next minute frees it (fixed minutes, local time).
    user = proxy.store.view.config.key_by_hash[sha(SECRET_WANG)]
    now = time.time()
    with pytest.raises(ccproxy.RateLimited):
        proxy.server.limits.admit(user, now)
    proxy.server.limits.admit(user, now + 60)
    assert proxy.api("GET", "/api/me", key=SECRET_WANG)[1]["used"]["rpm"] in (0, 1, 3)


def test_tokens_per_day_reached_and_freed_the_next_day(team, upstream):
    # Each mock reply reports 11 + 5 + 3 input and 7 output tokens: 26.
    proxy = team(tokens_per_day=50)
    assert relay(proxy, SECRET_WANG)[0] == 200
    assert relay(proxy, SECRET_WANG)[0] == 200

    def refused():
        status, headers, body = relay(proxy, SECRET_WANG)
        return status == 429 and (headers, json.loads(body)["error"])
    found = refused()
    assert found, "the third request was let through"
    headers, err = found
    assert "50 tokens today (tokens_per_day)" in err["message"] and headers["x-should-retry"] == "false"
    assert 0 < int(headers["retry-after"]) <= 86400
    usage(proxy, "by=key", 2)
    me = proxy.api("GET", "/api/me", key=SECRET_WANG)[1]
    assert me["used"]["tokens_per_day"] == 52 and me["left"]["tokens_per_day"] == 0
    assert me["tokens_per_day"] == 50 and all(r["key"] == WANG for r in me["recent"])
    assert [r["status"] for r in me["recent"]] == [429, 200, 200]          # newest first, the refusal too
    user = proxy.store.view.config.key_by_hash[sha(SECRET_WANG)]
    proxy.server.limits.admit(user, time.time() + 86400)                  # tomorrow starts at 0


@pytest.mark.parametrize("limit", ["cost_per_day", "cost_per_month"])
def test_cost_limits_count_priced_requests(team, limit):
    proxy = team(**{limit: 0.0001})
    assert relay(proxy, SECRET_WANG)[0] == 200                            # costs ~0.0003
    assert wait_for(lambda: relay(proxy, SECRET_WANG)[0] == 429)
    status, headers, err = error_of(relay(proxy, SECRET_WANG))
    assert "(%s)" % limit in err["message"] and headers["x-should-retry"] == "false"
    wait = int(headers["retry-after"])
    assert wait <= (86400 if limit == "cost_per_day" else 31 * 86400)
    usage(proxy, "by=key", 1)
    assert proxy.api("GET", "/api/me", key=SECRET_WANG)[1]["used"][limit] > 0.0001
    user = proxy.store.view.config.key_by_hash[sha(SECRET_WANG)]
    later = time.time() + wait + 1                    # the next day, or the next month
    proxy.server.limits.admit(user, later)
    with pytest.raises(ccproxy.KeyLimitReached):
        proxy.server.limits.admit(user, time.time())


def test_allowed_providers_and_models(team, upstream, upstream2):
    proxy = team(providers=[SPARE], models=["claude-sonnet-*", "glm-*"])
    # The selection (MAIN) is not 小王's: his requests go to SPARE, the failover list's.
    assert relay(proxy, SECRET_WANG)[0] == 200
    assert upstream2.requests and not upstream.requests
    status, _, err = error_of(relay(proxy, SECRET_WANG, dict(MESSAGE, model="claude-haiku-4-5")))
    assert status == 403 and "may use the models claude-sonnet-*, glm-*, not claude-haiku-4-5" in err["message"]
    # Nothing the key may use among the selection and the failover list: said, not relayed.
    assert proxy.api("POST", "/api/fallback", {"enabled": False})[0] == 200
    status, _, err = error_of(relay(proxy, SECRET_WANG))
    assert status == 403 and "may use the providers 备用🚀" in err["message"]
    # An alias names its provider: the real model is what the globs are matched against.
    alias = [m["id"] for m in json.loads(proxy.call("GET", "/v1/models?limit=100")[2])["data"]
             if m["id"].endswith("--glm-4.6")][0]
    assert relay(proxy, SECRET_WANG, dict(MESSAGE, model=alias))[0] == 200
    assert relay(proxy, SECRET_LI, dict(MESSAGE, model="claude-haiku-4-5"))[0] == 200     # 李四: anything
    # /v1/models offers 小王 what he may use: SPARE's models his globs allow, under their aliases.
    listed = [m["id"] for m in json.loads(proxy.call("GET", "/v1/models?limit=100", key=SECRET_WANG)[2])["data"]]
    assert listed == [alias]
    assert len(json.loads(proxy.call("GET", "/v1/models?limit=100", key=SECRET_LI)[2])["data"]) == 5


def test_a_renamed_or_deleted_provider_follows_into_keys(team):
    proxy = team(providers=[SPARE])
    assert proxy.call("PUT", "/api/providers/" + quote(SPARE), {"name": "备用B"}, headers={"If-Match": version(proxy)})[0] == 200
    assert proxy.store.view.config.key_by_hash[sha(SECRET_WANG)].providers == ["备用B"]
    assert proxy.call("DELETE", "/api/providers/" + quote("备用B"), headers={"If-Match": version(proxy)})[0] == 200
    user = proxy.store.view.config.key_by_hash[sha(SECRET_WANG)]
    assert user.providers == []                                             # none: not every one
    assert relay(proxy, SECRET_WANG)[0] == 403


def test_attribution_in_records_usage_and_metrics(team):
    proxy = team()
    for secret in (SECRET_WANG, SECRET_WANG, SECRET_LI, APIKEY):
        assert relay(proxy, secret)[0] == 200
    rows = {r["key"]: r for r in usage(proxy, "by=key", 4)["rows"]}
    assert {k: r["requests"] for k, r in rows.items()} == {None: 1, WANG: 2, LI: 1}   # None: the APIKEY
    records = proxy.api("GET", "/api/requests?limit=4")[1]["requests"]
    assert sorted(str(r["key"]) for r in records) == sorted([WANG, WANG, LI, "None"])
    metrics = proxy.call("GET", "/metrics")[2].decode()
    assert 'ccproxy_key_requests_total{key="小王",status="200"} 2' in metrics
    assert 'ccproxy_key_tokens_total{key="李四",kind="output"} 7' in metrics
    assert 'ccproxy_key_cost_total{key="小王",currency="USD"}' in metrics
    log = open(proxy.config_path.replace("config.json", "requests.jsonl"), encoding="utf-8").read()
    assert SECRET_WANG not in log and sha(SECRET_WANG) not in log


def test_the_wrong_key_throttle_with_many_keys(tmp_path, upstream, upstream2):
    keys = [{"name": "user%02d" % i, "sha256": sha("sk-ccp-user-%02d-%s" % (i, "x" * 32))} for i in range(50)]
    config = team_config(upstream, upstream2)
    config["Keys"] += keys
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        assert relay(proxy, "sk-ccp-user-07-" + "x" * 32)[0] == 200          # works, and is now trusted
        for i in range(ccproxy.AUTH_FAIL_LIMIT):
            assert relay(proxy, "sk-ccp-guess-%02d-%s" % (i, "y" * 32))[0] == 401
        assert relay(proxy, "sk-ccp-guess-99-" + "y" * 32)[0] == 429        # locked out
        assert relay(proxy, "sk-ccp-user-07-" + "x" * 32)[0] == 200          # a key that worked still does
        assert relay(proxy, SECRET_LI)[0] == 429                             # one that never did waits
    finally:
        proxy.stop()


@pytest.mark.parametrize("bad, words", [
    ([{"name": "a"}], "sha256 must be"),
    ([{"name": "a", "sha256": "x" * 64}], "sha256 must be"),
    ([{"name": "a", "sha256": "a" * 64}, {"name": "a", "sha256": "b" * 64}], "names must be unique"),
    ([{"name": "a", "sha256": "a" * 64}, {"name": "b", "sha256": "a" * 64}], "same secret"),
    ([{"name": "a", "sha256": "a" * 64, "rpm": 1.5}], "positive whole number"),
    ([{"name": "a", "sha256": "a" * 64, "cost_per_day": 0}], "positive number"),
    ([{"name": "a", "sha256": "a" * 64, "expires": "tomorrow"}], "expires must be a date"),
    ([{"name": "a", "sha256": "a" * 64, "providers": ["nope"]}], "'nope' is not a provider"),
    ([{"name": "a", "sha256": "a" * 64, "secret": "x"}], "not a key field"),
    ([{"name": "a\nb", "sha256": "a" * 64}], "unprintable"),
])
def test_bad_keys_are_named(upstream, upstream2, bad, words):
    config = team_config(upstream, upstream2)
    config["Keys"] = bad
    with pytest.raises(ccproxy.ConfigError) as err:
        ccproxy.validate_config(config)
    assert words in "\n".join(err.value.problems)


def test_limits_need_the_usage_store(upstream, upstream2):
    with pytest.raises(ccproxy.ConfigError) as err:
        ccproxy.validate_config(team_config(upstream, upstream2, [{"rpm": 5}], USAGE_DB=""))
    assert "USAGE_DB" in "\n".join(err.value.problems)


def test_trusted_proxies_give_the_client_address(tmp_path, upstream, upstream2):
    proxy = start_proxy(write_config(tmp_path / "c.json", team_config(upstream, upstream2,
                                                                     TRUSTED_PROXIES=["127.0.0.1"])))
    try:
        proxy.call("POST", "/v1/messages", MESSAGE, headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
        assert wait_for(lambda: proxy.api("GET", "/api/requests?limit=1")[1]["requests"])
        assert proxy.api("GET", "/api/requests?limit=1")[1]["requests"][0]["client"] == "203.0.113.9"
    finally:
        proxy.stop()
    (tmp_path / "other").mkdir()
    proxy = start_proxy(write_config(tmp_path / "other" / "c.json", team_config(upstream, upstream2)))
    try:                                    # not trusted: the header is anyone's to send
        proxy.call("POST", "/v1/messages", MESSAGE, headers={"X-Forwarded-For": "203.0.113.9"})
        assert wait_for(lambda: proxy.api("GET", "/api/requests?limit=1")[1]["requests"])
        assert proxy.api("GET", "/api/requests?limit=1")[1]["requests"][0]["client"] == "127.0.0.1"
    finally:
        proxy.stop()
