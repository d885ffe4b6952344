"""Fixtures: a mock Anthropic upstream, a config file pointing at it, and the real proxy."""

import http.client
import json
import logging
import os
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ccproxy  # noqa: E402
from mock_upstream import MockUpstream  # noqa: E402

APIKEY = "sk-ccproxy-test-3f9a7c1e5b"
TEST_TIMEOUT_S = 120        # any one test; the slowest takes ~20 s (256 streams at once)
SDK_TIMEOUT_S = 20          # an SDK client's own timeout would be 600 s


def pytest_collection_modifyitems(config, items):
    """Every test gets a timeout (pytest-timeout, a test-only dependency): a hang fails that
    test fast instead of stalling the run. A test's own timeout mark wins."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))
KEY_A = "sk-alpha-secret-0123456789"
KEY_B = "sk-beta-secret-9876543210"


@pytest.fixture
def upstream():
    mock = MockUpstream()
    yield mock
    mock.close()


@pytest.fixture
def upstream2():
    mock = MockUpstream(models=("glm-4.6", "kimi-k2"))
    yield mock
    mock.close()


def make_config(upstream, upstream2=None, **top):
    providers = [{"name": "alpha", "comment": "first", "api_base_url": upstream.url + "/v1/messages",
                  "api_key": KEY_A, "models": ["claude-sonnet-4-5", "claude-haiku-4-5"]}]
    if upstream2 is not None:
        providers.append({"name": "----", "api_base_url": ""})
        providers.append({"name": "beta", "api_base_url": upstream2.url + "/anthropic/v1/messages",
                          "api_key": KEY_B, "models": ["glm-4.6"], "auth": "bearer",
                          # a model of its own per family, so that a family mixed up shows
                          "env-models": {"ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6",
                                         "ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air",
                                         "ANTHROPIC_DEFAULT_OPUS_MODEL": "glm-4.6-plus"}})
    config = {"_comment": "test", "HOST": "127.0.0.1", "PORT": 0, "APIKEY": APIKEY,
              "LOG_LEVEL": "INFO", "HeaderOverrides": {"ua": {"User-Agent": "relay-ua", "x-app": ""}},
              "RequestOverrides": {"nothink": {"thinking": None, "metadata": {"tag": "x"}}},
              "Providers": providers}
    config.update(top)
    return config


def write_config(path, config):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return str(path)


@pytest.fixture
def config_file(tmp_path, upstream, upstream2):
    return write_config(tmp_path / "config.json", make_config(upstream, upstream2))


class RunningProxy:
    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def store(self):
        return self.server.store

    def call(self, method, path, body=None, headers=None, key=APIKEY, timeout=10):
        """(status, headers dict lowercased, body bytes) of one request on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = {"anthropic-version": "2023-06-01"}
            if key is not None:
                hdrs["x-api-key"] = key
            hdrs.update(headers or {})
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def api(self, method, path, body=None, key=APIKEY):
        status, _, data = self.call(method, path, body, key=key)
        return status, json.loads(data) if data else None

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_proxy(config_path, **kwargs):
    return RunningProxy(ccproxy.make_server(config_path, "127.0.0.1", 0, **kwargs))


@pytest.fixture
def proxy(config_file):
    running = start_proxy(config_file)
    yield running
    running.stop()


@pytest.fixture
def proxy_with(tmp_path, upstream, upstream2):
    """proxy_with(**top): a running proxy for alpha and beta (make_config) with these
    top-level keys; a provider's own keys via providers={name: {key: value}} (a "name" there
    renames it), more providers after them via added=[entry, …], a file's own config maker via
    base=(upstream, upstream2, **top) -> config. The one way the tests say "a proxy with this
    config"; each call starts another on the same config file."""
    started = []

    def start(providers=None, added=(), base=make_config, **top):
        config = base(upstream, upstream2, **top)
        for entry in config["Providers"]:
            entry.update((providers or {}).get(entry["name"], {}))
        config["Providers"].extend(added)
        started.append(start_proxy(write_config(tmp_path / "config.json", config)))
        return started[-1]
    yield start
    for running in started:
        running.stop()


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.DEBUG, logger="ccproxy")
    return caplog


def wait_for(predicate, timeout=5.0):
    """Poll until predicate() is true (the proxy logs after the response has gone out)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL server of the tests' own (tests/postgres.py), for the whole run."""
    import postgres
    made = postgres.cluster()
    yield made
    made.close()


@pytest.fixture
def pg_url(pg_cluster):
    """A new, empty database on it: its URL. The server is started again if a test stopped it."""
    try:
        return pg_cluster.new_database()
    except Exception:
        pg_cluster.start()
        return pg_cluster.new_database()
