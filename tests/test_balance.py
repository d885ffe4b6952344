"""A relay's balance in its own unit, by the route it answers: NewAPI's per-key /api/usage/token
(with /api/status saying how the site shows money), NewAPI's /v1/credits, sub2api's /v1/usage,
and the OpenAI-style billing pair last; through the real proxy and a mock relay shaped after
those handlers."""

import json

import pytest

from conftest import KEY_A, make_config, start_proxy, write_config

RELAY = "中转站甲"
TOKEN = {"granted": 5000000, "used": 1000000}          # raw quota: 10 and 2 dollars at 500000 a dollar


def balance_of(tmp_path, upstream, options=True, key=KEY_A, refresh=False, **top):
    """The relay's balance as /api/balance says it, and whether /api/state marks it low."""
    config = make_config(upstream, Pricing={"currency": "USD", "models": {}}, **top)
    config["Providers"][0].update(name=RELAY, balance=options, api_key=key)
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    try:
        found = proxy.api("GET", "/api/balance")[1]["balances"][RELAY]
        if refresh:
            found = proxy.api("GET", "/api/balance?refresh=1")[1]["balances"][RELAY]
        return found, proxy.api("GET", "/api/state")[1]["balances"][RELAY]["low"]
    finally:
        proxy.stop()


def asked(upstream):
    return [r.path for r in upstream.requests if not r.path.endswith("/v1/models")]


@pytest.mark.parametrize("display, rate, old, unit, left, limit", [
    ("USD", None, False, "USD", 8.0, 10.0),
    ("CNY", 7.3, False, "CNY", 58.4, 73.0),              # yuan: dollars × the site's rate
    ("TOKENS", None, False, "quota", 4000000, 5000000),  # raw quota, not money
    ("USD", None, True, "USD", 8.0, 10.0),               # an older build: display_in_currency
])
def test_newapi_per_key_in_the_sites_unit(tmp_path, upstream, display, rate, old, unit, left, limit):
    upstream.newapi(display=display, rate=rate, old=old, token=TOKEN)
    found, _ = balance_of(tmp_path, upstream)
    assert found["available"] and found["route"] == "newapi_token" and found["scope"] == "key"
    assert (found["unit"], found["remaining"], found["limit"]) == (unit, left, limit)
    assert found["used"] == pytest.approx(limit - left)
    call = [r for r in upstream.requests if r.path == "/api/usage/token"][0]
    assert call.headers.get("authorization") == "Bearer " + KEY_A        # the relay's own key
    status_call = [r for r in upstream.requests if r.path == "/api/status"][0]
    assert "authorization" not in {k.lower() for k in status_call.headers.keys()}   # public: no key sent


def test_an_unlimited_key_says_so(tmp_path, upstream):
    upstream.newapi(token={"unlimited": True})
    found, low = balance_of(tmp_path, upstream, LOW_BALANCE=5)
    assert found["unlimited"] is True and found["remaining"] is None and found["scope"] == "key" and not low


def test_credits_and_the_billing_pair_are_the_accounts_in_the_display_unit(tmp_path, upstream):
    upstream.newapi(display="CNY", rate=7.2, credits=37.66)
    found, _ = balance_of(tmp_path, upstream)
    assert (found["route"], found["scope"], found["unit"], found["remaining"]) == ("credits", "account", "CNY", 37.66)
    upstream.balance_routes.pop("/v1/credits")
    upstream.billing = {"hard_limit_usd": 500, "total_usage": 12345}     # yuan on a CNY site, despite the name
    found, _ = balance_of(tmp_path, upstream, refresh=True)
    assert (found["route"], found["unit"], found["remaining"], found["limit"]) == ("billing", "CNY", 376.55, 500)


SUB2API_KEY = {"isValid": True, "mode": "quota_limited", "status": "active", "unit": "USD", "remaining": 37.5,
               "quota": {"limit": 50, "remaining": 37.5, "unit": "USD", "used": 12.5},
               "rate_limits": [{"limit": 5, "remaining": 3.75, "used": 1.25, "window": "5h",
                                "reset_at": "2026-09-28T19:23:26.666648+08:00"}]}
SUB2API_PLAN = {"isValid": True, "mode": "unrestricted", "planName": "lab-subscription", "remaining": 6.8,
                "unit": "USD", "subscription": {"daily_limit_usd": 10, "daily_usage_usd": 3.2}}
SUB2API_WALLET = {"balance": 0, "daily_usage": [], "isValid": True, "mode": "unrestricted",
                  "planName": "钱包余额", "remaining": 0, "unit": "USD"}


@pytest.mark.parametrize("answer, scope, left, limit, plan", [
    (SUB2API_KEY, "key", 37.5, 50, None),
    (SUB2API_PLAN, "account", 6.8, None, "lab-subscription"),
    (SUB2API_WALLET, "account", 0, None, "钱包余额"),
])
def test_sub2api(tmp_path, upstream, answer, scope, left, limit, plan):
    upstream.sub2api(answer)
    found, _ = balance_of(tmp_path, upstream)
    assert (found["route"], found["scope"], found["unit"]) == ("sub2api", scope, "USD")
    assert (found["remaining"], found["limit"], found.get("plan")) == (left, limit, plan)


def test_a_refusal_says_more_than_a_missing_route(tmp_path, upstream):
    upstream.newapi(token=TOKEN)
    found, _ = balance_of(tmp_path, upstream, key="sk-relay-key-that-is-bad")
    assert found["available"] is False and found["why"]["code"] == "balance_refused"
    upstream.sub2api(dict(SUB2API_KEY, isValid=False))
    found, _ = balance_of(tmp_path, upstream, key="sk-relay-key-that-is-bad", refresh=True)
    assert found["why"]["code"] == "balance_refused"


def test_a_relay_with_none_of_them(tmp_path, upstream):
    found, _ = balance_of(tmp_path, upstream)
    assert found["available"] is False and found["why"]["code"] == "balance_none"
    assert asked(upstream) == ["/api/usage/token", "/v1/credits", "/v1/usage", "/v1/dashboard/billing/subscription"]


def test_options_unit_route_and_low(tmp_path, upstream):
    # route: that one only; unit: what the relay gets wrong
    upstream.newapi(display="USD", token=TOKEN)
    upstream.billing = {"hard_limit_usd": 100, "total_usage": 2550}
    found, low = balance_of(tmp_path, upstream, {"route": "billing", "unit": "元", "low": 80})
    assert (found["route"], found["unit"], found["remaining"]) == ("billing", "元", 74.5) and low
    assert "/api/usage/token" not in asked(upstream)


@pytest.mark.parametrize("display, low_balance, low", [
    ("USD", 9, True), ("USD", 8, False),            # the same unit as Pricing's: as it is
    ("CNY", 10, True), ("CNY", 7, False),           # 58.4 yuan against 10 or 7 dollars × 7.3
    ("TOKENS", 10 ** 9, False),                     # raw quota is never compared with money
])
def test_low_balance_compares_in_the_relays_unit(tmp_path, upstream, display, low_balance, low):
    upstream.newapi(display=display, rate=7.3, token=TOKEN)
    assert balance_of(tmp_path, upstream, LOW_BALANCE=low_balance)[1] is low


def test_bad_balance_options_are_said_with_codes(tmp_path, upstream):
    config = make_config(upstream)
    config["Providers"][0]["balance"] = {"unit": "", "route": "ask-nicely", "low": -1, "limit": 3}
    proxy = start_proxy(write_config(tmp_path / "good.json", make_config(upstream)))
    try:
        version = proxy.api("GET", "/api/config")[1]["version"]
        status, _, body = proxy.call("PUT", "/api/providers/alpha", {"balance": config["Providers"][0]["balance"]},
                                     headers={"If-Match": version})
        codes = {p["code"] for p in json.loads(body)["problems"]}
        assert status == 400 and codes == {"balance_unit", "balance_route", "balance_low", "balance_field_unknown"}
    finally:
        proxy.stop()
