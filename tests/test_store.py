"""STORE: several ccproxy hosts on one PostgreSQL (a real server of the tests' own, see
tests/postgres.py). Each "host" here is a make_server in a directory of its own, with a
config.json that holds only what a host needs to start."""

import http.client
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest

import ccproxy
from conftest import APIKEY, ROOT, make_config, start_proxy, wait_for, write_config
from test_keys import same_minute
from test_processes import NGINX, REQUIRE_NGINX, free_port, run_nginx, wait_listening

SECRET = "sk-ccp-store-test-secret-0123456789abcdef"

CJK_RELAY = "中转站甲"


def host_dir(tmp_path, name, pg_url, **top):
    """A host's own directory and its config.json: the host keys and STORE only."""
    directory = tmp_path / name
    directory.mkdir()
    config = {"HOST": "127.0.0.1", "PORT": 0, "APIKEY": APIKEY, "STORE": pg_url}
    config.update(top)
    return write_config(directory / "config.json", config)


@pytest.fixture
def hosts(tmp_path, pg_url, upstream, upstream2):
    """hosts(n): n running hosts on one new database; the first seeds it from a whole config
    (alpha, beta and 中转站甲), the others start from their host keys alone."""
    started = []

    def start(n=2, **top):
        whole = make_config(upstream, upstream2, STORE=pg_url, **top)
        whole["Providers"].append({"name": CJK_RELAY, "api_base_url": upstream.url + "/v1/messages",
                                   "api_key": "sk-cjk-relay-0123456789"})
        first = tmp_path / "host1"
        first.mkdir()
        started.append(start_proxy(write_config(first / "config.json", whole)))
        for i in range(2, n + 1):
            started.append(start_proxy(host_dir(tmp_path, "host%d" % i, pg_url)))
        return started
    yield start
    for running in started:
        running.stop()


def names(proxy):
    return [p["name"] for p in proxy.api("GET", "/api/state")[1]["providers"]]


def test_the_first_host_seeds_an_empty_store_and_the_others_take_its_config(hosts):
    a, b = hosts(2)
    assert names(b) == names(a) == ["alpha", "----", "beta", CJK_RELAY]
    assert b.store.view.config.apikey == APIKEY and b.store.view.config.store
    # The store holds the shared part only: no host key travels to the other hosts.
    data, raw = b.store.config_file()
    assert not set(raw) & set(ccproxy.HOST_KEYS)
    assert a.store.config_file()[0] == data
    status, state = b.api("GET", "/api/state")
    assert state["store"]["ok"] and "@" not in state["store"]["where"].split("//")[1].split("/")[0][:0] + "x"


def test_a_host_with_nothing_to_share_waits_for_the_first_one_that_has(tmp_path, pg_url, upstream):
    early = start_proxy(host_dir(tmp_path, "early", pg_url))      # started before the first host
    try:
        assert names(early) == []
        first = start_proxy(write_config(tmp_path / "first.json", make_config(upstream, STORE=pg_url)))
        try:
            assert names(first) == ["alpha"]            # its config was not replaced by an empty one
            assert wait_for(lambda: names(early) == ["alpha"], 5)
        finally:
            first.stop()
    finally:
        early.stop()


def test_a_selection_on_one_host_is_in_force_on_the_other_at_once(hosts, upstream):
    a, b = hosts(2)
    status, _ = a.api("POST", "/api/select", {"provider": CJK_RELAY})
    assert status == 200
    assert wait_for(lambda: b.store.view.selected == CJK_RELAY, 1.0)     # within a second
    # and the other way round, with a preset choice
    status, _ = b.api("POST", "/api/overrides", {"provider": "alpha", "header_override": "ua",
                                                 "request_override": None})
    assert status == 200
    assert wait_for(lambda: a.store.view.targets["alpha"].header_preset_name == "ua", 1.0)


def test_a_provider_edit_on_one_host_is_the_edit_for_all_with_the_same_versions(hosts):
    a, b = hosts(2)
    status, config = a.api("GET", "/api/config")
    _, config_b = b.api("GET", "/api/config")
    assert config["version"] == config_b["version"]
    status, _, body = a.call("PUT", "/api/providers/" + "%E4%B8%AD%E8%BD%AC%E7%AB%99%E4%B9%99", {
        "name": "中转站乙", "api_base_url": "https://relay.example/v1/messages", "api_key": "sk-relay-yi-0123456789"},
        headers={"If-Match": config["version"]})
    assert status == 200, body
    version = json.loads(body)["version"]
    assert wait_for(lambda: "中转站乙" in names(b), 1.0)
    assert b.api("GET", "/api/config")[1]["version"] == version
    # The version B saw before is stale on B too: the same If-Match rules on every host.
    status, _, body = b.call("DELETE", "/api/providers/alpha", headers={"If-Match": config["version"]})
    assert status == 409, body


def test_export_and_import_work_on_the_shared_config(hosts):
    a, b = hosts(2)
    status, _, body = b.call("GET", "/api/export?keys=1")
    exported = json.loads(body)
    assert status == 200 and [p["name"] for p in exported["Providers"]] == ["alpha", "----", "beta", CJK_RELAY]
    assert exported["Providers"][0]["api_key"] == "sk-alpha-secret-0123456789"
    text = json.dumps({"Providers": [{"name": "中转站丙", "api_base_url": "https://bing.example/v1/messages",
                                      "api_key": "sk-bing-0123456789"}]}, ensure_ascii=False)
    status, preview = b.api("POST", "/api/import/preview", {"text": text})
    assert status == 200 and preview["providers"][0]["name"] == "中转站丙"
    version = b.api("GET", "/api/config")[1]["version"]
    status, _, body = b.call("POST", "/api/import", {"text": text}, headers={"If-Match": version})
    assert status == 200, body
    assert wait_for(lambda: "中转站丙" in names(a), 5)


def test_a_key_made_on_one_host_relays_on_the_other(hosts, upstream):
    a, b = hosts(2)
    version = a.api("GET", "/api/config")[1]["version"]
    status, _, body = a.call("POST", "/api/keys", {"name": "小王"}, headers={"If-Match": version})
    assert status == 200, body
    secret = json.loads(body)["key"]
    assert wait_for(lambda: any(k.name == "小王" for k in b.store.view.config.keys), 1.0)
    status, _, body = b.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "hi"}]}, key=secret)
    assert status == 200, body


def test_a_host_with_the_store_away_starts_from_its_cache_and_refuses_changes_until_it_is_back(
        hosts, pg_cluster, tmp_path, pg_url, upstream):
    a, b = hosts(2)
    b.stop()
    pg_cluster.stop()
    try:
        c = start_proxy(str(tmp_path / "host2" / "config.json"))       # from host2's cache file
        try:
            assert names(c) == names(a)
            status, _, body = c.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5,
                                                              "messages": [{"role": "user", "content": "hi"}]})
            assert status == 200, body            # relaying goes on
            status, _, body = c.call("POST", "/api/select", {"provider": "beta"})
            assert status == 503 and json.loads(body)["code"] == "store_down", body
            assert c.store.view.selected == "alpha"
            assert wait_for(lambda: not c.api("GET", "/api/state")[1]["store"]["ok"], 5)
        finally:
            pg_cluster.start()
        # Back: a change made on one host reaches the other again.
        assert wait_for(lambda: c.api("GET", "/api/state")[1]["store"]["ok"], 15)
        assert wait_for(lambda: a.api("POST", "/api/select", {"provider": "beta"})[0] == 200, 15)
        assert wait_for(lambda: c.store.view.selected == "beta", 5)
        c.stop()
    finally:
        if not pg_cluster_running(pg_cluster):
            pg_cluster.start()


def pg_cluster_running(cluster):
    return os.path.exists(os.path.join(cluster.data, "postmaster.pid"))


def test_a_host_that_never_reached_the_store_refuses_to_start_and_says_why(tmp_path, pg_cluster):
    path = host_dir(tmp_path, "fresh", "postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.make_server(path, "127.0.0.1", 0)
    assert "cannot be reached" in str(caught.value) and "config.store-cache.json" in str(caught.value)


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path, pg_url, upstream):
    import psycopg
    path = write_config(tmp_path / "config.json", make_config(upstream, STORE=pg_url))
    ccproxy.make_server(path, "127.0.0.1", 0).server_close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE ccproxy.meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.make_server(path, "127.0.0.1", 0)
    assert "schema 99, newer than this ccproxy's 1" in str(caught.value)
    said = caught.value.as_json()[0]
    assert said["code"] == "store_schema_newer" and said["values"] == {"found": 99, "known": 1}


@pytest.mark.parametrize("driver", ["missing", "3.0.18"])
def test_without_the_driver_the_message_names_the_package(tmp_path, driver):
    """No psycopg, or one older than 3.1: a clear refusal that names the packages, never a
    traceback."""
    path = host_dir(tmp_path, "nodriver", "postgresql://db.example/ccproxy")
    fake = tmp_path / "site" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = %r\n" % driver)
    setup = "sys.modules['psycopg'] = None" if driver == "missing" else "sys.path.insert(0, %r)" % str(fake.parent)
    run = subprocess.run([sys.executable, "-c", "import sys; %s; sys.path.insert(0, %r); import ccproxy; "
                          "sys.exit(ccproxy.main(['--config', %r]))" % (setup, ROOT, path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "apt-get install python3-psycopg" in run.stderr and "pip install --upgrade 'psycopg[binary]'" in run.stderr
    assert "Traceback" not in run.stderr


MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "你好"}]}


def usage_total(proxy):
    status, report = proxy.api("GET", "/api/usage?by=provider")
    return report["total"]["requests"] if status == 200 else None


def test_usage_of_every_host_adds_up_in_the_store(hosts):
    a, b, c = hosts(3)
    for proxy in (a, b, c, a, b, a):
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
    for proxy in (a, b, c):
        assert wait_for(lambda: usage_total(proxy) == 6, 10), usage_total(proxy)
    status, report = c.api("GET", "/api/usage?by=provider")
    row = report["rows"][0]
    assert row["provider"] == "alpha" and row["input"] == 6 * 11 and row["cache_read"] == 6 * 5
    assert isinstance(row["input"], int)        # not a Decimal, not a float
    status, sessions = b.api("GET", "/api/sessions")
    assert status == 200


def test_a_keys_rpm_holds_across_all_hosts(hosts):
    a, b, c = hosts(3)
    version = a.api("GET", "/api/config")[1]["version"]
    status, _, body = a.call("POST", "/api/keys", {"name": "小李", "rpm": 4}, headers={"If-Match": version})
    secret = json.loads(body)["key"]
    assert wait_for(lambda: all(any(k.name == "小李" for k in p.store.view.config.keys) for p in (b, c)), 5)
    statuses = [p.call("POST", "/v1/messages", MESSAGE, key=secret)[0] for p in (a, b, c, a, b, c)]
    if statuses.count(200) != 4:       # a minute turned over between the requests: once more
        statuses = [p.call("POST", "/v1/messages", MESSAGE, key=secret)[0] for p in (a, b, c, a, b, c)]
    assert statuses.count(200) == 4 and statuses.count(429) == 2, statuses
    assert statuses[:4] == [200] * 4
    status, me = c.api("GET", "/api/me", key=secret)
    assert me["used"]["rpm"] == 4


def test_a_relay_that_fails_on_one_host_cools_down_on_the_others(hosts, upstream, upstream2, tmp_path, pg_url):
    a, b = hosts(2, Fallback=["beta"])
    upstream.fail_next(status=529, body={"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert a.call("POST", "/v1/messages", MESSAGE)[0] == 200         # answered by beta
    assert a.server.health.is_cooling("alpha", time.time())
    assert wait_for(lambda: b.server.health.is_cooling("alpha", time.time()), 5)
    cooling = b.api("GET", "/api/state")[1]
    before = len(upstream.requests)
    assert b.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert len(upstream.requests) == before          # B did not try alpha: it cools there too
    reason = b.server.health.snapshot()["alpha"]["why"]
    assert "529" in reason["message"], (reason, cooling)
    # a host started now knows it too: the store keeps what is cooling
    c = start_proxy(host_dir(tmp_path, "late", pg_url))
    try:
        assert wait_for(lambda: c.server.health.is_cooling("alpha", time.time()), 5)
        assert c.server.health.snapshot()["alpha"]["why"] == reason
    finally:
        c.stop()


def test_an_outage_of_the_store_loses_no_usage_and_limits_count_per_host(hosts, pg_cluster):
    a, b = hosts(2)
    version = a.api("GET", "/api/config")[1]["version"]
    status, _, body = a.call("POST", "/api/keys", {"name": "小张", "rpm": 3}, headers={"If-Match": version})
    secret = json.loads(body)["key"]
    assert wait_for(lambda: any(k.name == "小张" for k in b.store.view.config.keys), 5)
    pg_cluster.stop()
    try:
        answered = [a.call("POST", "/v1/messages", MESSAGE)[0] for _ in range(5)]
        assert answered == [200] * 5
        # per host meanwhile: 3 a minute on each (unless the minute turns over in between)
        on_a = [a.call("POST", "/v1/messages", MESSAGE, key=secret)[0] for _ in range(4)]
        assert on_a.count(429) <= 1 and on_a.count(200) >= 3, on_a
        status, state = a.api("GET", "/api/state")
        assert state["store"]["ok"] is False and state["store"]["reason"]
        # /metrics says so too, with the usage groups that wait here for the store
        assert wait_for(lambda: re.search(r"ccproxy_store_waiting_usage [1-9]", a.call("GET", "/metrics")[2].decode()), 5)
        assert "ccproxy_store_up 0" in a.call("GET", "/metrics")[2].decode()
    finally:
        pg_cluster.start()
    # back: the usage of those seconds reaches the store, seen from the other host
    assert wait_for(lambda: usage_total(b) == 5 + on_a.count(200), 20), usage_total(b)
    assert wait_for(lambda: a.api("GET", "/api/state")[1]["store"]["ok"], 10)


def test_migrate_store_copies_a_file_setup_and_refuses_to_overwrite_a_different_one(tmp_path, pg_url, upstream,
                                                                                     upstream2):
    import psycopg
    whole = make_config(upstream, upstream2)
    whole["Providers"][0]["name"] = CJK_RELAY
    path = write_config(tmp_path / "config.json", whole)
    proxy = start_proxy(path)
    try:     # a file setup first: a selection in its state file, usage in its sqlite store
        assert proxy.api("POST", "/api/select", {"provider": "beta"})[0] == 200
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert wait_for(lambda: usage_total(proxy) == 1, 10)
    finally:
        proxy.stop()
    whole["STORE"] = pg_url
    write_config(tmp_path / "config.json", whole)
    assert ccproxy.main(["--config", path, "--migrate-store"]) == 0
    assert ccproxy.main(["--config", path, "--migrate-store"]) == 0      # the same again: nothing twice
    with psycopg.connect(pg_url) as conn:
        body = json.loads(conn.execute("SELECT body FROM ccproxy.documents WHERE name = 'config'").fetchone()[0])
        assert body["Providers"][0]["name"] == CJK_RELAY and not set(body) & set(ccproxy.HOST_KEYS)
        assert conn.execute("SELECT sum(requests) FROM ccproxy.usage").fetchone()[0] == 1
    whole["Providers"][0]["comment"] = "改过"
    write_config(tmp_path / "config.json", whole)
    assert ccproxy.main(["--config", path, "--migrate-store"]) == 2      # a different config is there
    assert ccproxy.main(["--config", path, "--migrate-store", "--force"]) == 0
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM ccproxy.config_history").fetchone()[0] == 1
    running = start_proxy(host_dir(tmp_path, "other", pg_url))
    try:
        assert names(running)[0] == CJK_RELAY and running.store.view.selected == "beta"
        assert usage_total(running) == 1
        assert running.store.view.config.by_name[CJK_RELAY].comment == "改过"
    finally:
        running.stop()


def test_migrate_store_says_why_it_cannot(tmp_path, upstream, capsys):
    path = write_config(tmp_path / "config.json", make_config(upstream))
    assert ccproxy.main(["--config", path, "--migrate-store"]) == 2
    assert "STORE must be a PostgreSQL URL" in capsys.readouterr().err


def test_a_guesser_gets_one_throttle_for_all_hosts(hosts):
    a, b = hosts(2)
    for proxy in (a, b):        # Claude Code with the right key, on both hosts, before the guessing
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
    for i in range(ccproxy.AUTH_FAIL_LIMIT):           # wrong keys, spread over both hosts
        assert (a, b)[i % 2].call("POST", "/v1/messages", MESSAGE, key="sk-guess-%d" % i)[0] == 401
    # the last one, on B, locked the guesser out on A as well: one throttle, not one per host
    assert wait_for(lambda: a.call("POST", "/v1/messages", MESSAGE, key="sk-guess-more")[0] == 429, 5)
    assert b.call("POST", "/v1/messages", MESSAGE, key="sk-guess-again")[0] == 429
    for proxy in (a, b):        # and the right key that worked from here is still let in
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_a_relays_balance_is_fetched_once_for_all_hosts(hosts, upstream):
    a, b = hosts(2)
    upstream.billing = {"hard_limit_usd": 100, "total_usage": 2550}
    status, found = a.api("GET", "/api/balance?provider=alpha")
    assert status == 200 and found["balances"]["alpha"]["remaining"] == 74.5
    asked = len([r for r in upstream.requests if "billing" in r.path])
    assert wait_for(lambda: "alpha" in b.server.balances.cached(["alpha"]), 5)
    status, found = b.api("GET", "/api/balance?provider=alpha")
    assert found["balances"]["alpha"]["remaining"] == 74.5
    assert len([r for r in upstream.requests if "billing" in r.path]) == asked      # B did not ask again


def test_the_requests_panel_lists_every_hosts_requests(hosts):
    a, b = hosts(2)
    assert a.call("POST", "/v1/messages", dict(MESSAGE, model="claude-sonnet-4-5"))[0] == 200
    assert b.call("POST", "/v1/messages", dict(MESSAGE, model="claude-haiku-4-5"))[0] == 200

    def models(proxy):
        return sorted(r["model"] for r in proxy.api("GET", "/api/requests?limit=10")[1]["requests"])
    for proxy in (a, b):
        assert wait_for(lambda: models(proxy) == ["claude-haiku-4-5", "claude-sonnet-4-5"], 10), models(proxy)
    found = a.api("GET", "/api/requests?limit=10")[1]["requests"]
    assert {r["host"] for r in found} == {socket.gethostname()}       # each says which host answered it
    found = a.api("GET", "/api/requests?limit=10&provider=beta")[1]["requests"]
    assert found == []


# -- three real processes, each in a directory of its own, behind the README's nginx block


def readme_hosts_nginx():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.search(r"```nginx\n(# /etc/nginx/conf.d/ccproxy-hosts.conf.*?)```", text, re.S).group(1)


class Hosts:
    """Three ccproxy processes on one database, each run as the README's systemd unit runs it
    (python3 -m ccproxy in a directory holding ccproxy.py, webui.html and config.json), and
    nginx in front with the README's block."""

    def __init__(self, tmp_path, pg_url, whole):
        self.ports = [free_port() for _ in range(3)]
        self.front = free_port()
        self.processes = []
        for i, port in enumerate(self.ports):
            directory = tmp_path / ("host%d" % (i + 1))
            directory.mkdir()
            config = dict(whole, STORE=pg_url) if i == 0 else {"APIKEY": APIKEY, "STORE": pg_url}
            config.update(HOST="127.0.0.1", PORT=port, TRUSTED_PROXIES=["127.0.0.1"])
            path = write_config(directory / "config.json", config)
            for name in ("ccproxy.py", "webui.html"):
                shutil.copy(os.path.join(ROOT, name), str(directory))
            self.processes.append(subprocess.Popen([sys.executable, "-m", "ccproxy", "--config", path],
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                   cwd=str(directory)))
            wait_listening(port, self.processes[-1], 20)      # the first makes the schema: one at a time
        site = readme_hosts_nginx()
        for address, port in zip(("10.0.0.11:3456", "10.0.0.12:3456", "10.0.0.13:3456"), self.ports):
            site = site.replace(address, "127.0.0.1:%d" % port)
        site = site.replace("listen 3456", "listen 127.0.0.1:%d" % self.front).replace(
            "location / {", "location / {\n        add_header X-Upstream $upstream_addr always;")
        self.nginx = run_nginx(tmp_path, site)
        wait_listening(self.front, self.nginx)

    def close(self):
        for process in [self.nginx] + self.processes:
            if process.poll() is None:
                process.terminate()
        for process in [self.nginx] + self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.skipif(not NGINX and not REQUIRE_NGINX, reason="no nginx (apt-get install nginx-light)")
@pytest.mark.timeout(180)
def test_three_hosts_behind_nginx_survive_a_killed_host_and_a_stopped_database(tmp_path, pg_url, pg_cluster,
                                                                              upstream, upstream2):
    whole = make_config(upstream, upstream2, Keys=[{"name": "小王", "sha256": ccproxy.key_sha256(SECRET), "rpm": 6}])
    hosts = Hosts(tmp_path, pg_url, whole)
    try:
        a, b, c = hosts.ports
        # A selection made on one host is in force on the others within a second.
        assert call(a, "POST", "/api/select", {"provider": "beta"})[0] == 200
        deadline = time.monotonic() + 1.0
        while any(json.loads(call(p, "GET", "/api/state")[2])["selected"] != "beta" for p in (b, c)):
            assert time.monotonic() < deadline, "the others did not take the selection within a second: %s" % [
                json.loads(call(p, "GET", "/api/state")[2]) for p in (b, c)]
            time.sleep(0.05)
        # Through nginx: requests without a conversation are spread over all three...
        answered = set()
        for _ in range(9):
            status, headers, body = call(hosts.front, "POST", "/v1/messages", MESSAGE)
            assert status == 200 and headers["x-ccproxy-provider"] == "beta", body
            answered.add(headers["x-upstream"])
        assert answered == {"127.0.0.1:%d" % p for p in hosts.ports}
        # ...and a conversation's requests stay on one host.
        talk = {"X-Claude-Code-Session-Id": "6f1c2b9e-3d4a-4e8f-9b1c-2a7d5e0f4c3b"}
        assert len({call(hosts.front, "POST", "/v1/messages", MESSAGE, headers=talk)[1]["x-upstream"]
                    for _ in range(4)}) == 1
        # A key's rpm holds across all three: 6 a minute through nginx, not 6 a host.
        same_minute()
        results = [call(hosts.front, "POST", "/v1/messages", MESSAGE, key=SECRET)[0] for _ in range(8)]
        assert results == [200] * 6 + [429] * 2
        # Usage adds up: every host's requests, seen from any one.
        assert wait_for(lambda: usage_requests(c) == 9 + 4 + 6, 10), usage_requests(c)

        # kill -9 one host in the middle of a burst: every request after it is answered.
        upstream2.first_delay = 0.2
        statuses, lock = [], threading.Lock()

        def burst(n):
            for _ in range(n):
                status = call(hosts.front, "POST", "/v1/messages", MESSAGE)[0]
                with lock:
                    statuses.append((time.monotonic(), status))
        threads = [threading.Thread(target=burst, args=(10,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        hosts.processes[1].kill()
        killed = time.monotonic()
        hosts.processes[1].wait(10)
        for thread in threads:
            thread.join(60)
        after = [s for at, s in statuses if at > killed + 0.3]     # sent after the kill
        assert after and all(s == 200 for s in after), statuses
        assert len(statuses) == 60
        answered_before = sum(1 for _, s in statuses if s == 200)

        # PostgreSQL stopped for 10 s under load: every request is still answered...
        upstream2.first_delay = 0.0
        statuses.clear()
        stop = threading.Event()

        def load():
            while not stop.is_set():
                status = call(hosts.front, "POST", "/v1/messages", MESSAGE)[0]
                with lock:
                    statuses.append((time.monotonic(), status))
                time.sleep(0.05)
        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(1)
        pg_cluster.stop()
        time.sleep(10)
        pg_cluster.start()
        time.sleep(1)
        stop.set()
        for worker in workers:
            worker.join(30)
        assert statuses and all(s == 200 for _, s in statuses), [s for _, s in statuses if s != 200]
        # ...and their usage is in the store once it is back: nothing recorded was lost.
        expected = 9 + 4 + 6 + answered_before + len(statuses)
        assert wait_for(lambda: usage_requests(c) == expected, 30), (usage_requests(c), expected)
    finally:
        hosts.close()
        if not pg_cluster_running(pg_cluster):
            pg_cluster.start()


def call(port, method, path, body=None, key=APIKEY, headers=None):
    """(status, headers lowercased, body) of one request to a port, on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        sent = {"x-api-key": key, "Content-Type": "application/json", "anthropic-version": "2023-06-01"}
        sent.update(headers or {})
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=sent)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def usage_requests(port):
    status, _, body = call(port, "GET", "/api/usage?by=provider")
    return json.loads(body)["total"]["requests"] if status == 200 else None


def test_the_converters_read_the_shared_config_through_a_hosts_file(hosts, tmp_path):
    a, b = hosts(2)
    host = str(tmp_path / "host2" / "config.json")
    out = tmp_path / "cc-router.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ccp2ccr.py"), "--input", host,
                          "--output", str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    written = json.loads(out.read_text(encoding="utf-8"))
    assert [p["name"] for p in written["Providers"]] == ["alpha", "beta"]
    assert "skipped %s: it has no models" % CJK_RELAY in run.stderr       # the store's own, read from it
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ccp_update_model.py"), "--input", host],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Refresh models" in run.stderr


def test_check_reaches_the_store_and_validates_the_shared_config(hosts, tmp_path, pg_url, capsys):
    first = host_dir(tmp_path, "before", pg_url)
    assert ccproxy.main(["--check", "--config", first]) == 0       # an empty database, before any start
    assert "reached, empty: the first start makes its tables" in capsys.readouterr().out
    a, b = hosts(2)
    host = str(tmp_path / "host2" / "config.json")
    assert ccproxy.main(["--check", "--config", host]) == 0
    out = capsys.readouterr().out
    assert "reached (schema 1): 4 providers, 0 keys" in out and "postgres@" in out
    away = host_dir(tmp_path, "away", "postgresql://postgres@127.0.0.1:1/nowhere")
    assert ccproxy.main(["--check", "--config", away]) == 2
    assert "PostgreSQL at postgresql://postgres@127.0.0.1:1/nowhere could not be used" in capsys.readouterr().err


def test_ccproxy_store_in_the_environment_wins_over_the_file(tmp_path, pg_url, upstream, monkeypatch):
    path = write_config(tmp_path / "config.json", make_config(upstream))       # no STORE in the file
    monkeypatch.setenv("CCPROXY_STORE", pg_url)
    proxy = start_proxy(path)
    try:
        assert proxy.store.docs.shared and proxy.api("GET", "/api/state")[1]["store"]["ok"]
    finally:
        proxy.stop()
    monkeypatch.delenv("CCPROXY_STORE")
    other = start_proxy(host_dir(tmp_path, "other", pg_url))
    try:
        assert names(other) == ["alpha"]           # the file's config went into the store
    finally:
        other.stop()


def test_the_urls_password_reaches_no_log_and_no_page(tmp_path, pg_url, upstream, caplog):
    caplog.set_level(logging.DEBUG, logger="ccproxy")
    secret = "pw-秘密-0123456789"
    with_password = pg_url.replace("postgres@", "postgres:%s@" % quote(secret, safe=""))     # trust: ignored
    proxy = start_proxy(write_config(tmp_path / "config.json", make_config(upstream, STORE=with_password)))
    try:
        state = proxy.api("GET", "/api/state")[1]
        assert state["store"]["ok"] and secret not in json.dumps(state, ensure_ascii=False)
        assert quote(secret, safe="") not in json.dumps(state)
    finally:
        proxy.stop()
    away = host_dir(tmp_path, "away", "postgresql://postgres:%s@127.0.0.1:1/nowhere" % quote(secret, safe=""))
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.make_server(away, "127.0.0.1", 0)
    said = str(caught.value) + caplog.text
    assert secret not in said and quote(secret, safe="") not in said


def test_the_store_is_seen_back_even_when_its_kept_connections_died_with_it(hosts, pg_cluster):
    a, = hosts(1)
    assert a.api("GET", "/api/usage")[0] == 200          # a connection kept for the page's next use
    assert a.api("GET", "/api/sessions")[0] == 200
    pg_cluster.stop()
    try:
        assert wait_for(lambda: not a.api("GET", "/api/state")[1]["store"]["ok"], 10)
        assert a.api("POST", "/api/select", {"provider": "beta"})[0] == 503     # as the page's switch did
    finally:
        pg_cluster.start()
    # no request needs the store now: its listener alone must find it back, and stay sure of it
    assert wait_for(lambda: a.api("GET", "/api/state")[1]["store"]["ok"], 10)
    time.sleep(3)
    assert a.api("GET", "/api/state")[1]["store"]["ok"]
    assert a.api("GET", "/api/usage")[0] == 200


def test_two_hosts_making_the_same_new_usage_row_at_once_both_count(hosts, pg_url):
    """Two hosts adding the first request of an hour for the same relay and model at once:
    the second waits for the first's row and adds to it (an upsert). Before, its insert hit
    the first's and the batch failed, which also said the store was down."""
    import psycopg
    a, = hosts(1)
    usage = ccproxy.SharedUsage(a.store.docs.pg)           # a writer of its own, as another host's
    now = time.time()
    rec = {"time": now, "provider": "alpha", "model": "claude-sonnet-4-5", "status": 200, "key": None,
           "attempts": [["alpha", "200"]], "session": "会话-1", "ttfb_ms": 12, "cost": None,
           "usage": {"input": 10, "output": 5, "cache_read": 0, "cache_creation": 0}}
    hour = time.strftime("%Y-%m-%d %H", time.localtime(now))
    with psycopg.connect(pg_url) as other:                 # the other host, mid-transaction
        other.execute("INSERT INTO ccproxy.usage (hour, provider, model, key_name, requests) "
                      "VALUES (%s, 'alpha', 'claude-sonnet-4-5', '', 1)", (hour,))
        other.execute("INSERT INTO ccproxy.conversations (session, provider, first_seen, last_seen, requests) "
                      "VALUES ('会话-1', 'alpha', %s, %s, 1)", (now, now))
        writer = threading.Thread(target=usage.add, args=([rec],))
        writer.start()
        time.sleep(0.5)                                    # it waits on the other's new rows
        other.commit()
        writer.join(10)
    assert not usage.waiting() and a.store.docs.pg.down is None
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT requests, input FROM ccproxy.usage").fetchall() == [(2, 10)]
        assert conn.execute("SELECT requests, output FROM ccproxy.conversations").fetchall() == [(2, 5)]
