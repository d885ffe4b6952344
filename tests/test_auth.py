"""The client key and the wrong-key throttle: who gets in, who is slowed down, for how long."""

import json

import pytest

import ccproxy
from conftest import APIKEY
from test_relay import MESSAGE as MESSAGE_BODY


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(proxy):
    fake = Clock()
    proxy.server.throttle.clock = fake
    return fake


@pytest.mark.parametrize("key", [
    APIKEY[:-1],                    # one character short
    APIKEY + "x",                   # one character extra
    APIKEY.upper(),                 # other case
    APIKEY[:len("sk-ccproxy")],     # a prefix
    ccproxy.PLACEHOLDER_APIKEY,     # the template's placeholder
    " ",
])
def test_near_misses_of_the_key_are_refused(proxy, upstream, key):
    status, _, data = proxy.call("POST", "/v1/messages", MESSAGE_BODY, key=key)
    assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    status, _, _ = proxy.call("GET", "/api/state", key=key)
    assert status == 401
    assert not upstream.requests


def wrong(proxy, key):
    return proxy.call("GET", "/api/state", key=key)[0]


def test_requests_without_a_key_never_lock_anyone_out(proxy, clock):
    for _ in range(ccproxy.AUTH_FAIL_LIMIT * 3):
        assert proxy.call("GET", "/api/state", key=None)[0] == 401
    assert proxy.call("GET", "/api/state")[0] == 200


def test_the_same_wrong_key_repeated_counts_once(proxy, clock):
    # two Claude Code sessions with a stale key, each retrying a 401 ten times
    for _ in range(2 * 10):
        assert wrong(proxy, "sk-stale-key-1") == 401
    assert proxy.call("GET", "/api/state")[0] == 200
    assert proxy.call("GET", "/api/state", key="sk-stale-key-1")[0] == 401   # still just wrong


def test_distinct_wrong_keys_lock_the_address_but_not_a_client_that_had_the_key(proxy, clock):
    assert proxy.call("GET", "/api/state")[0] == 200            # a working client on 127.0.0.1
    for i in range(ccproxy.AUTH_FAIL_LIMIT):
        assert wrong(proxy, "guess-%d" % i) == 401
    status, headers, data = proxy.call("GET", "/api/state", key="guess-next")
    assert status == 429 and json.loads(data)["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["retry-after"]) <= ccproxy.AUTH_LOCKOUT_S
    # the client that had authenticated from this address keeps working during the lockout
    assert proxy.call("GET", "/api/state")[0] == 200
    assert proxy.call("POST", "/v1/messages", MESSAGE_BODY)[0] == 200


def test_during_a_lockout_a_key_never_seen_from_the_address_is_refused(proxy, clock):
    for i in range(ccproxy.AUTH_FAIL_LIMIT):
        wrong(proxy, "guess-%d" % i)
    # the right key, but never used from here before the lockout: no oracle for a guesser
    assert proxy.call("GET", "/api/state")[0] == 429


def test_a_lockout_expires(proxy, clock):
    for i in range(ccproxy.AUTH_FAIL_LIMIT):
        wrong(proxy, "guess-%d" % i)
    assert proxy.call("GET", "/api/state")[0] == 429
    clock.now += ccproxy.AUTH_LOCKOUT_S - 1
    assert proxy.call("GET", "/api/state")[0] == 429
    clock.now += 2
    assert proxy.call("GET", "/api/state")[0] == 200
    assert wrong(proxy, "guess-again") == 401                  # counting starts afresh


def test_failures_leave_the_window():
    clock = Clock()
    throttle = ccproxy.Throttle(clock)
    for i in range(ccproxy.AUTH_FAIL_LIMIT - 1):
        with pytest.raises(ccproxy.AuthError):
            throttle.admit("127.0.0.1", "guess-%d" % i, False)
    clock.now += ccproxy.AUTH_FAIL_WINDOW_S + 1
    for i in range(ccproxy.AUTH_FAIL_LIMIT - 1):
        with pytest.raises(ccproxy.AuthError):
            throttle.admit("127.0.0.1", "later-%d" % i, False)
    throttle.admit("127.0.0.1", APIKEY, True)                   # never locked


def test_rotating_addresses_hit_the_global_cap():
    clock = Clock()
    throttle = ccproxy.Throttle(clock)
    throttle.admit("127.0.0.1", APIKEY, True)                   # Claude Code, already working
    for i in range(ccproxy.AUTH_GLOBAL_FAIL_LIMIT):
        with pytest.raises(ccproxy.AuthError):
            throttle.admit("127.0.%d.%d" % (i // 200, i % 200 + 2), "guess-%d" % i, False)
    with pytest.raises(ccproxy.RateLimited):
        throttle.admit("127.9.9.9", "guess-x", False)
    with pytest.raises(ccproxy.RateLimited):
        throttle.admit("127.9.9.9", APIKEY, True)               # never authenticated from there
    throttle.admit("127.0.0.1", APIKEY, True)                   # the working client still is let in
    clock.now += ccproxy.AUTH_LOCKOUT_S + 1
    throttle.admit("127.9.9.9", APIKEY, True)


def test_ipv6_addresses_of_one_64_count_together():
    throttle = ccproxy.Throttle(Clock())
    for i in range(ccproxy.AUTH_FAIL_LIMIT):
        with pytest.raises(ccproxy.AuthError):
            throttle.admit("2001:db8:1:2::%x" % (i + 1), "guess-%d" % i, False)
    with pytest.raises(ccproxy.RateLimited):
        throttle.admit("2001:db8:1:2:ffff::1", "guess-x", False)
    with pytest.raises(ccproxy.AuthError):                     # another /64 is not locked
        throttle.admit("2001:db8:1:3::1", "guess-y", False)


@pytest.mark.parametrize("addr, group", [
    ("127.0.0.1", "127.0.0.1"), ("::ffff:10.1.2.3", "10.1.2.3"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("fe80::1%eth0", "fe80::/64"),
])
def test_address_group(addr, group):
    assert ccproxy.address_group(addr) == group


def test_the_throttle_forgets_addresses_whose_failures_expired(monkeypatch):
    monkeypatch.setattr(ccproxy, "AUTH_TRACKED_MAX", 3)
    clock = Clock()
    throttle = ccproxy.Throttle(clock)
    for i in range(4):
        with pytest.raises(ccproxy.AuthError):
            throttle.admit("198.51.100.%d" % i, "guess", False)
    clock.now += ccproxy.AUTH_FAIL_WINDOW_S + 1
    with pytest.raises(ccproxy.AuthError):
        throttle.admit("203.0.113.9", "guess", False)
    assert list(throttle.failures) == ["203.0.113.9"]


# -- another site's page: refused whatever the key, also an empty one (which is no longer a config)

CROSS = [{"Origin": "https://evil.example"}, {"Origin": "null"},
         {"Origin": "http://127.0.0.1:1"},                  # another port of this host: another origin
         {"Origin": "http://127.0.0.1.evil.example"},
         {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
         {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}]


@pytest.mark.parametrize("headers", CROSS, ids=lambda h: ",".join("%s=%s" % kv for kv in h.items()))
@pytest.mark.parametrize("method, path, body", [("POST", "/api/select", {"provider": "beta"}),
                                                ("POST", "/v1/messages", MESSAGE_BODY),
                                                ("GET", "/api/state", None), ("GET", "/healthz", None)])
def test_another_sites_page_is_refused_even_with_the_key(proxy, upstream, upstream2, headers, method, path, body):
    status, _, data = proxy.call(method, path, body, headers=headers)
    error = json.loads(data)["error"]
    assert status == 403 and error["type"] == "permission_error" and "cross-origin" in error["message"]
    assert upstream.requests == upstream2.requests == []
    assert proxy.store.view.selected == "alpha"


@pytest.mark.parametrize("headers", [
    {},                                                         # Claude Code, the SDKs, curl
    {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"},
    {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"},   # typed in the address bar
    {"Origin": "ORIGIN", "Sec-Fetch-Site": "same-origin"},      # the page's own POST
    {"Origin": "HTTP://LOCALHOST:PORT"}, ])
def test_the_pages_own_requests_and_clients_pass(proxy, headers):
    headers = {k: v.replace("ORIGIN", proxy.url).replace("PORT", str(proxy.port)) for k, v in headers.items()}
    if "LOCALHOST" in headers.get("Origin", ""):
        headers["Host"] = "localhost:%d" % proxy.port
    assert proxy.call("POST", "/api/select", {"provider": "beta"}, headers=headers)[0] == 200


def test_a_link_from_another_site_opens_the_page_and_nothing_else(proxy):
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    status, headers, _ = proxy.call("GET", "/", headers=link, key=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert proxy.call("GET", "/api/state", headers=link)[0] == 403
    assert proxy.call("POST", "/api/select", {"provider": "beta"}, headers=link)[0] == 403   # a form from there
    assert proxy.store.view.selected == "alpha"
