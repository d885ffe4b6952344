"""Usage over time, cost, the cache guard and relay balances (sqlite roll-ups, Pricing,
/api/usage, /api/balance), through the real proxy and a mock relay that reports fixed usage."""

import csv
import datetime
import io
import json
import logging
import re
import time

import pytest

import ccproxy
from conftest import APIKEY, KEY_A, KEY_B, start_proxy, wait_for, write_config
from test_relay import MESSAGE

# Each reply of the mock relay: 100 fresh input tokens, 900 read from the cache, 50 written to it.
CACHED = {"input_tokens": 100, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 50}
PRICING = {"currency": "USD", "_taken": "test prices",
           "models": {"claude-sonnet-*": {"input": 3, "output": 15, "cache_read": 0.3, "cache_write": 3.75},
                      "claude-sonnet-4-5-exact": {"input": 1, "output": 1},
                      "*sonnet*": {"input": 99, "output": 99}}}
MAIN, SPARE = "中转站A", "备用🚀"


def usage_config(upstream, upstream2, **top):
    config = {"HOST": "127.0.0.1", "PORT": 0, "APIKEY": APIKEY, "Pricing": PRICING,
              "Providers": [
                  {"name": MAIN, "api_base_url": upstream.url + "/v1/messages", "api_key": KEY_A,
                   "models": ["claude-sonnet-4-5"], "price_multiplier": 0.5},
                  {"name": SPARE, "api_base_url": upstream2.url + "/v1/messages", "api_key": KEY_B,
                   "models": ["glm-4.6"], "env-models": {"ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6"},
                   "console_url": "https://console.example/签到"}]}
    config.update(top)
    return config


def cost_of(output, multiplier=0.5):
    """What one mock reply costs at claude-sonnet-* prices."""
    return (100 * 3 + output * 15 + 900 * 0.3 + 50 * 3.75) / 1e6 * multiplier


def usage(proxy, query, requests):
    """/api/usage once the roll-ups hold `requests` requests (the recorder writes them off the
    request's path)."""
    assert wait_for(lambda: proxy.api("GET", "/api/usage?" + query)[1]["total"]["requests"] >= requests)
    status, report = proxy.api("GET", "/api/usage?" + query)
    assert status == 200
    return report


@pytest.fixture
def relays(proxy_with, upstream, upstream2):
    upstream.usage = dict(CACHED)
    upstream2.usage = dict(CACHED)
    proxy = proxy_with(base=usage_config, Fallback=[SPARE])
    return proxy, proxy.store.config_path


def send_known_traffic(proxy, upstream):
    """Two streams and one JSON reply from MAIN, and one request that MAIN fails (500) and
    SPARE answers with a model that has no price."""
    for body in (dict(MESSAGE, stream=True), dict(MESSAGE, stream=True), MESSAGE):
        assert proxy.call("POST", "/v1/messages", body)[0] == 200
    upstream.fail_next("status", status=500, body={"type": "error", "error": {"type": "api_error", "message": "x"}})
    assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_rollups_match_known_traffic_exactly_and_survive_a_restart(relays, upstream, tmp_path):
    proxy, path = relays
    send_known_traffic(proxy, upstream)
    today = datetime.date.today().isoformat()
    report = usage(proxy, "by=provider", 5)
    assert report["from"] == (datetime.date.today() - datetime.timedelta(days=6)).isoformat()
    assert report["to"] == today and report["currency"] == "USD"
    rows = {r["provider"]: r for r in report["rows"]}
    main = rows[MAIN]
    # 4 requests went to MAIN (one failed), outputs 5 + 5 (streams) + 7 (JSON).
    assert (main["requests"], main["errors"]) == (4, 1)
    assert (main["input"], main["output"], main["cache_read"], main["cache_write"]) == (300, 17, 2700, 150)
    assert main["hit_rate_pct"] == round(100 * 2700 / (300 + 2700 + 150), 1)
    assert main["cost"] == pytest.approx(2 * cost_of(5) + cost_of(7), abs=1e-6) and main["unpriced"] == 0
    spare = rows[SPARE]
    assert (spare["requests"], spare["errors"], spare["input"], spare["output"]) == (1, 0, 100, 7)
    assert spare["cost"] is None and spare["unpriced"] == 1      # glm-4.6 has no price: never a guess
    assert main["ttfb_p50_ms"] is not None and spare["ttfb_p95_ms"] is not None
    assert report["total"]["requests"] == 5 and report["total"]["cost"] == pytest.approx(main["cost"], abs=1e-6)

    by_model = usage(proxy, "by=model,provider&from=%s&to=%s" % (today, today), 5)["rows"]
    assert {(r["model"], r["provider"]): r["requests"] for r in by_model} == {
        ("claude-sonnet-4-5", MAIN): 4, ("glm-4.6", SPARE): 1}
    by_day = usage(proxy, "by=day", 5)["rows"]
    assert [(r["day"], r["requests"]) for r in by_day] == [(today, 5)]
    by_hour = usage(proxy, "by=hour&from=%s&to=%s" % (today, today), 5)["rows"]
    assert sum(r["requests"] for r in by_hour) == 5 and all(r["hour"].startswith(today) for r in by_hour)

    # Each request carries its own cost, in the Requests panel and the request log file.
    records = proxy.api("GET", "/api/requests?limit=10")[1]["requests"]
    costs = sorted(r["cost"] for r in records if r["provider"] == MAIN and r["status"] == 200)
    assert costs == pytest.approx(sorted([cost_of(5), cost_of(5), cost_of(7)]), abs=1e-8)
    assert [r["cost"] for r in records if r["provider"] == SPARE] == [None]
    with open(tmp_path / "requests.jsonl", encoding="utf-8") as f:
        logged = [json.loads(line) for line in f]
    assert sorted(r["cost"] for r in logged if r["provider"] == MAIN) == costs
    metrics = proxy.call("GET", "/metrics")[2].decode()
    assert 'ccproxy_cost_total{provider="%s",currency="USD"}' % MAIN in metrics

    # A restart keeps every figure; new traffic adds to them.
    proxy.stop()
    again = start_proxy(path)
    try:
        assert usage(again, "by=provider", 5)["rows"] == report["rows"]
        assert again.call("POST", "/v1/messages", MESSAGE)[0] == 200
        rows = {r["provider"]: r for r in usage(again, "by=provider", 6)["rows"]}
        assert rows[MAIN]["requests"] == 5 and rows[MAIN]["output"] == 24
    finally:
        again.stop()


def test_usage_as_csv_for_a_spreadsheet(relays, upstream):
    proxy, _ = relays
    send_known_traffic(proxy, upstream)
    usage(proxy, "by=provider", 5)
    status, headers, body = proxy.call("GET", "/api/usage?by=provider,day&format=csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert "attachment" in headers["content-disposition"]
    assert body.startswith("\ufeff".encode())          # Excel reads the names as UTF-8
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))
    assert [r["provider"] for r in rows] == sorted([MAIN, SPARE])
    main = next(r for r in rows if r["provider"] == MAIN)
    assert main["requests"] == "4" and main["cache_read"] == "2700" and main["day"] == datetime.date.today().isoformat()
    assert next(r for r in rows if r["provider"] == SPARE)["cost"] == ""


def test_usage_csv_header_in_chinese(relays, upstream):
    """?lang=zh names every column in Chinese, whatever the grouping; anything else, the JSON's keys."""
    proxy, _ = relays
    send_known_traffic(proxy, upstream)
    usage(proxy, "by=provider", 5)
    body = proxy.call("GET", "/api/usage?by=provider,day&format=csv&lang=zh")[2].decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(body)))
    main = next(r for r in rows if r["供应商"] == MAIN)
    assert main["请求"] == "4" and main["缓存读取"] == "2700" and main["日期"] == datetime.date.today().isoformat()
    assert list(rows[0])[-3:] == ["币种", "首字节 中位数 ms", "首字节 p95 ms"]
    english = proxy.call("GET", "/api/usage?by=provider&format=csv&lang=fr")[2].decode("utf-8-sig")
    assert english.startswith("provider,requests,errors,")
    for by in ("provider,model,day,hour,key", "session,provider,key", "class,provider,day,hour"):
        status, _, body = proxy.call("GET", "/api/usage?format=csv&lang=zh&by=" + by)
        header = body.decode("utf-8-sig").splitlines()[0]
        assert status == 200 and not re.search("[a-z]{2,}", header.replace(" ms", "").replace("p95", "")), header


def test_usage_query_errors_are_clear(relays):
    proxy, _ = relays
    for query, words in (("from=2026-13-01", "dates such as"), ("from=2026-02-01&to=2026-01-01", "on or before"),
                         ("from=2020-01-01&to=2026-01-01", "at most"), ("by=bogus", "one or more of"),
                         ("by=provider,provider", "one or more of")):
        status, body = proxy.api("GET", "/api/usage?" + query)
        assert status == 400 and body["type"] == "error", query
        assert words in body["error"]["message"], query


def test_a_spreadsheet_cell_never_runs_a_name_as_a_formula():
    report = {"by": ["provider"], "rows": [dict(ccproxy.usage_row(dict.fromkeys(ccproxy.UsageStore.SUMS, 0), "USD"),
                                                provider="=HYPERLINK(1)")]}
    text = ccproxy.usage_csv(report).decode("utf-8-sig")
    assert "\r\n'=HYPERLINK(1)," in text


def test_usage_store_off(tmp_path, upstream, upstream2):
    proxy = start_proxy(write_config(tmp_path / "c.json", usage_config(upstream, upstream2, USAGE_DB="")))
    try:
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        status, body = proxy.api("GET", "/api/usage")
        assert status == 404 and "USAGE_DB" in body["error"]["message"]
        assert not (tmp_path / "usage.sqlite3").exists()
    finally:
        proxy.stop()


def test_two_processes_add_to_one_store(tmp_path, upstream, upstream2):
    """Several ccproxy processes on one host share the roll-ups: each adds its own requests."""
    path = write_config(tmp_path / "c.json", usage_config(upstream, upstream2))
    first, second = start_proxy(path), start_proxy(path)
    try:
        for proxy in (first, second, second):
            assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        rows = usage(first, "by=provider", 3)["rows"]
        assert [(r["provider"], r["requests"]) for r in rows] == [(MAIN, 3)]
    finally:
        first.stop()
        second.stop()


def test_pricing_picks_the_most_specific_price():
    config = ccproxy.validate_config(usage_config(type("U", (), {"url": "http://127.0.0.1:9"})(),
                                                  type("U", (), {"url": "http://127.0.0.1:9"})()))
    pricing = config.pricing
    assert pricing.rates("claude-sonnet-4-5-exact") == (1, 1, pytest.approx(0.1), pytest.approx(1.25))
    assert pricing.rates("CLAUDE-SONNET-4-5") == (3, 15, 0.3, 3.75)    # the longer glob, any case
    assert pricing.rates("my-sonnet") == (99, 99, pytest.approx(9.9), pytest.approx(123.75))
    assert pricing.rates("glm-4.6") is None
    usage = {"input": 1000000, "output": 0, "cache_read": 0, "cache_creation": 0}
    assert pricing.cost(MAIN, "claude-sonnet-4-5", usage) == pytest.approx(1.5)     # x0.5
    assert pricing.cost(SPARE, "claude-sonnet-4-5", usage) == pytest.approx(3.0)
    assert pricing.cost(SPARE, "glm-4.6", usage) is None


@pytest.mark.parametrize("bad, words", [
    ({"Pricing": {"models": {"m": {"input": 1}}}}, "needs output"),
    ({"Pricing": {"models": {"m": {"input": -1, "output": 1}}}}, "0 or more"),
    ({"Pricing": {"models": {"m": {"input": 1, "output": 1, "cache_hit": 1}}}}, "is not a price"),
    ({"Pricing": {"currency": ""}}, "currency"),
    ({"CACHE_WARN_PCT": 120}, "CACHE_WARN_PCT"),
    ({"LOW_BALANCE": "5"}, "LOW_BALANCE"),
    ({"LOW_BALANCE_LAST": 1}, "LOW_BALANCE_LAST"),
    ({"USAGE_DB": None}, "USAGE_DB"),
])
def test_bad_pricing_and_thresholds_are_named(upstream, upstream2, bad, words):
    with pytest.raises(ccproxy.ConfigError) as err:
        ccproxy.validate_config(usage_config(upstream, upstream2, **bad))
    assert words in "\n".join(err.value.problems)


def test_bad_provider_money_fields_are_named(upstream, upstream2):
    config = usage_config(upstream, upstream2)
    config["Providers"][0].update(price_multiplier=-1, balance="yes", console_url="javascript:alert(1)")
    with pytest.raises(ccproxy.ConfigError) as err:
        ccproxy.validate_config(config)
    text = "\n".join(err.value.problems)
    assert "price_multiplier" in text and ".balance" in text and "console_url" in text and MAIN in text


def test_cache_guard_warns_when_a_relay_stops_keeping_the_cache(tmp_path, upstream, upstream2, caplog):
    caplog.set_level(logging.INFO, logger="ccproxy")
    upstream.usage = {"input_tokens": 10, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 2000}
    proxy = start_proxy(write_config(tmp_path / "c.json", usage_config(upstream, upstream2, CACHE_WARN_PCT=40)))
    try:
        for _ in range(ccproxy.CACHE_MIN_SAMPLES):
            assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert wait_for(lambda: proxy.api("GET", "/api/state")[1]["cache"].get(MAIN, {}).get("low"))
        state = proxy.api("GET", "/api/state")[1]
        assert state["cache"][MAIN] == {"hit_rate_pct": 0.0, "samples": ccproxy.CACHE_MIN_SAMPLES, "low": True}
        assert state["cache_warn_pct"] == 40
        warnings = [r.getMessage() for r in caplog.records if "cache hit rate" in r.getMessage()]
        assert len(warnings) == 1 and MAIN in warnings[0] and "CACHE_WARN_PCT" in warnings[0]
        assert 'ccproxy_cache_low{provider="%s"} 1' % MAIN in proxy.call("GET", "/metrics")[2].decode()
        # The relay keeps the cache again: the warning goes once its recent hit rate is back.
        upstream.usage = dict(CACHED)
        for _ in range(ccproxy.CACHE_WINDOW):
            proxy.call("POST", "/v1/messages", MESSAGE)
        assert wait_for(lambda: not proxy.api("GET", "/api/state")[1]["cache"][MAIN]["low"])
        assert 'ccproxy_cache_low{provider="%s"} 0' % MAIN in proxy.call("GET", "/metrics")[2].decode()
    finally:
        proxy.stop()


def test_a_switch_mid_conversation_is_priced_before_it_is_made(tmp_path, upstream, upstream2):
    upstream.usage = dict(CACHED)
    pricing = dict(PRICING, models=dict(PRICING["models"], **{"glm-*": {"input": 2, "output": 8, "cache_write": 2.5}}))
    proxy = start_proxy(write_config(tmp_path / "c.json", usage_config(upstream, upstream2, Pricing=pricing)))
    try:
        assert proxy.api("GET", "/api/state")[1]["switch"] is None        # nothing active yet
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert wait_for(lambda: proxy.api("GET", "/api/state")[1]["switch"] is not None)
        switch = proxy.api("GET", "/api/state")[1]["switch"]
        assert switch["from"] == MAIN and switch["model"] == "claude-sonnet-4-5" and switch["tokens"] == 1050
        # On SPARE the model maps to glm-4.6: its cache write price, for the whole prompt.
        assert switch["costs"] == {SPARE: pytest.approx(1050 * 2.5 / 1e6)} and switch["currency"] == "USD"
    finally:
        proxy.stop()


def billing_hits(mock):
    return sum("/dashboard/billing/" in r.path for r in mock.requests)


def test_balance_from_the_billing_routes_and_not_available_without_them(relays, upstream, upstream2):
    proxy, _ = relays
    upstream.billing = {"hard_limit_usd": 100, "total_usage": 2550}     # cents
    status, body = proxy.api("GET", "/api/balance")
    assert status == 200
    main, spare = body["balances"][MAIN], body["balances"][SPARE]
    # a relay that does not say how it shows money (no /api/status): the unit is not guessed
    assert main["available"] is True and main["unit"] is None and main["route"] == "billing"
    assert (main["limit"], main["used"], main["remaining"]) == (100, 25.5, 74.5) and main["checked_at"]
    assert main["scope"] == "account"
    assert spare["available"] is False and spare["why"]["code"] == "balance_none"
    assert "/v1/dashboard/billing/subscription" in spare["reason"]
    # The relay's own key was sent; ccproxy's APIKEY never was.
    asked = [r for r in upstream.requests if r.path.endswith("/subscription")][0]
    assert KEY_A in (asked.headers.get("x-api-key"), asked.headers.get("authorization", "").partition(" ")[2])
    assert APIKEY not in json.dumps(asked.header_list)
    # Answers are reused for a few minutes, shown in /api/state, and asked again on refresh.
    hits = billing_hits(upstream)
    proxy.api("GET", "/api/balance")
    assert billing_hits(upstream) == hits and billing_hits(upstream2) == 1
    # the route that answered is asked first next time: no more 404s on the others
    before = len(upstream.requests)
    proxy.api("GET", "/api/balance?refresh=1")
    assert [r.path for r in upstream.requests[before:]][0] == "/v1/dashboard/billing/subscription"
    assert proxy.api("GET", "/api/state")[1]["balances"][MAIN]["remaining"] == 74.5
    upstream.newapi(display="USD")                                        # a NewAPI site in dollars
    assert proxy.api("GET", "/api/balance?refresh=1")[1]["balances"][MAIN]["unit"] == "USD"
    line = 'ccproxy_balance_remaining{provider="%s",unit="USD",scope="account"} 74.5' % MAIN
    assert line in proxy.call("GET", "/metrics")[2].decode()
    upstream.billing = {"hard_limit_usd": 100000000, "total_usage": 100}
    assert proxy.api("GET", "/api/balance?refresh=1")[1]["balances"][MAIN]["unlimited"] is True
    assert line not in proxy.call("GET", "/metrics")[2].decode()      # unlimited: no figure


def test_balance_switched_off_and_console_links(tmp_path, upstream, upstream2):
    config = usage_config(upstream, upstream2)
    config["Providers"][0]["balance"] = False
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        body = proxy.api("GET", "/api/balance")[1]["balances"]
        assert body[MAIN] == {"available": False, "reason": "switched off (balance: false)", "checked_at": None,
                              "why": {"code": "balance_off", "values": {}, "message": "switched off (balance: false)"}}
        assert billing_hits(upstream) == 0
        providers = {p["name"]: p for p in proxy.api("GET", "/api/state")[1]["providers"]}
        assert providers[MAIN]["console_url"] == upstream.url + "/"          # the relay site's root
        assert providers[SPARE]["console_url"] == "https://console.example/签到"
        assert providers[MAIN]["price_multiplier"] == 0.5 and providers[MAIN]["balance"] is False
    finally:
        proxy.stop()


def test_a_low_balance_relay_is_tried_last(tmp_path, upstream, upstream2):
    """LOW_BALANCE_LAST: a fallback whose balance is under LOW_BALANCE moves to the end."""
    config = usage_config(upstream, upstream2, LOW_BALANCE=5, LOW_BALANCE_LAST=True)
    config["Providers"] = [
        {"name": "主", "api_base_url": upstream2.url + "/main/v1/messages", "api_key": KEY_B},
        {"name": "低余额", "api_base_url": upstream.url + "/v1/messages", "api_key": KEY_A},
        {"name": "次选", "api_base_url": upstream2.url + "/second/v1/messages", "api_key": KEY_B}]
    config["Fallback"] = ["低余额", "次选"]
    upstream.billing = {"hard_limit_usd": 10, "total_usage": 900}       # 1 USD left
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        body = proxy.api("GET", "/api/balance")[1]
        assert body["low"] == ["低余额"] and body["balances"]["低余额"]["remaining"] == 1.0
        upstream2.fail_next("status", status=503, body={"type": "error", "error": {"type": "overloaded_error",
                                                                                   "message": "busy"}})
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert wait_for(lambda: proxy.api("GET", "/api/requests?limit=1")[1]["requests"])
        records = proxy.api("GET", "/api/requests?limit=1")[1]["requests"]
        assert [a[:2] for a in records[0]["attempts"]] == [["主", "503"], ["次选", "200"]]
    finally:
        proxy.stop()


@pytest.mark.parametrize("model, rates", [
    ("claude-opus-4-5-20251101", (5, 25, 0.5, 6.25)), ("claude-opus-4-1-20250805", (15, 75, 1.5, 18.75)),
    ("claude-opus-4-20250514", (15, 75, 1.5, 18.75)), ("claude-opus-5-5", (4, 20, 0.2, 5)),
    ("claude-sonnet-4-5-20250929", (3, 15, 0.3, 3.75)), ("claude-sonnet-5-5", (2, 10, 0.1, 2.5)),
    ("claude-haiku-4-5-20251001", (1, 5, 0.1, 1.25)), ("claude-fable-5-1", (10, 50, 0.25, 12.5)),
    ("claude-fable-5", (10, 50, 1, 12.5)), ("glm-4.6", None)])
def test_the_template_ships_anthropic_list_prices(model, rates):
    with open(ccproxy.TEMPLATE_CONFIG, encoding="utf-8") as f:
        config = ccproxy.validate_config(dict(json.load(f), APIKEY=ccproxy.new_apikey()))
    assert config.pricing.currency == "USD" and config.pricing.rates(model) == rates


def test_a_broken_usage_store_is_said_once_and_the_relay_goes_on(tmp_path, upstream, upstream2, caplog):
    caplog.set_level(logging.INFO, logger="ccproxy")
    (tmp_path / "usage.sqlite3").write_bytes(b"this is not a database, " * 100)
    proxy = start_proxy(write_config(tmp_path / "c.json", usage_config(upstream, upstream2)))
    try:
        for _ in range(5):
            assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
            time.sleep(0.05)                                  # separate batches
        assert wait_for(lambda: len(proxy.api("GET", "/api/requests?limit=5")[1]["requests"]) == 5)
        errors = [r.getMessage() for r in caplog.records if "cannot add to the usage store" in r.getMessage()]
        assert len(errors) == 1 and "tried again" in errors[0]
        status, body = proxy.api("GET", "/api/usage")
        assert status == 500 and body["type"] == "error" and "usage store cannot be read" in body["error"]["message"]
    finally:
        proxy.stop()
