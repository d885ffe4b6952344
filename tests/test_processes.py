"""More than one ccproxy on one host: they share the selection, presets, failover edits, learned
fixes, discovered models, config edits, usage and per-key limit counters (the state file, the
usage store); and the README's nginx example in front of two real processes."""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import pytest

from conftest import APIKEY, ROOT, start_proxy, wait_for, write_config
from test_keys import MAIN, SECRET_WANG, SPARE, relay, same_minute, team_config
from test_relay import MESSAGE

# .ci/run sets CCPROXY_REQUIRE_NGINX=1: there a missing nginx fails instead of skipping.
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
REQUIRE_NGINX = bool(os.environ.get("CCPROXY_REQUIRE_NGINX"))


@pytest.fixture
def pair(tmp_path, upstream, upstream2):
    """Two ccproxy servers on one config file (and so one state file and one usage store)."""
    path = write_config(tmp_path / "config.json", team_config(upstream, upstream2, [{"rpm": 4}]))
    first, second = start_proxy(path), start_proxy(path)
    yield first, second
    first.stop()
    second.stop()


def test_a_selection_made_through_one_is_used_by_the_other(pair, upstream2):
    first, second = pair
    assert first.api("POST", "/api/select", {"provider": SPARE})[0] == 200
    assert wait_for(lambda: second.store.view.selected == SPARE, timeout=1.0)    # within a second
    assert second.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert [r.json["model"] for r in upstream2.requests] == ["glm-4.6"]
    # presets and failover edits travel the same way
    first.api("POST", "/api/overrides", {"provider": MAIN, "header_override": None, "request_override": None})
    first.api("POST", "/api/fallback", {"enabled": False})
    assert wait_for(lambda: not second.store.view.fallback_enabled, timeout=1.0)


def test_learned_fixes_models_and_config_edits_reach_the_other(pair, upstream):
    first, second = pair
    upstream.refuse_fields = {"context_management"}
    body = dict(MESSAGE, context_management={"edits": []})
    assert first.call("POST", "/v1/messages", body)[0] == 200               # learned through the first
    assert wait_for(lambda: second.store.view.targets[MAIN].fixes, timeout=1.0)
    count = len(upstream.requests)
    assert second.call("POST", "/v1/messages", body)[0] == 200              # the second sends it fixed
    assert len(upstream.requests) == count + 1
    upstream.models = ["claude-sonnet-4-5", "新模型-1"]
    assert first.api("POST", "/api/refresh-models", {"provider": MAIN})[0] == 200
    assert wait_for(lambda: "新模型-1" in second.store.view.targets[MAIN].models, timeout=1.0)
    version = first.api("GET", "/api/config")[1]["version"]
    status, _, _ = first.call("PUT", "/api/providers/" + quote("第三家"), {"api_base_url": upstream.url, "api_key": "sk-third-0000"},
                              headers={"If-Match": version})
    assert status == 200
    assert wait_for(lambda: "第三家" in second.store.view.targets, timeout=1.0)
    # The second now edits on the new version: its If-Match is the file's, not a stale one.
    version = second.api("GET", "/api/config")[1]["version"]
    assert second.call("DELETE", "/api/providers/" + quote("第三家"), headers={"If-Match": version})[0] == 200
    assert wait_for(lambda: "第三家" not in first.store.view.targets, timeout=1.0)


def test_a_key_limit_holds_across_both(pair):
    first, second = pair
    same_minute()
    for proxy in (first, second, first, second):
        assert relay(proxy, SECRET_WANG)[0] == 200
    assert relay(first, SECRET_WANG)[0] == 429 and relay(second, SECRET_WANG)[0] == 429     # 4 a minute, not 8


def test_both_write_one_request_log_and_each_panel_shows_all(pair):
    first, second = pair
    for proxy in (first, second, first):
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
    # Once a process sees another writing the log, its Requests panel reads the log.
    assert second.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert wait_for(lambda: len(first.api("GET", "/api/requests?limit=10")[1]["requests"]) == 4)
    assert wait_for(lambda: len(second.api("GET", "/api/requests?limit=10")[1]["requests"]) == 4)
    with open(os.path.join(os.path.dirname(first.store.config_path), "requests.jsonl"), encoding="utf-8") as f:
        assert len([json.loads(line) for line in f]) == 4


# -- two real processes behind a real nginx, configured as the README says


def readme_nginx():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.search(r"```nginx\n(# /etc/nginx/conf.d/ccproxy.conf.*?)```", text, re.S).group(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, process, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the process exited: %s" % process.stdout.read()
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nothing listens on %d" % port)


def call(port, method, path, body=None, key=APIKEY, stream=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"x-api-key": key, "Content-Type": "application/json",
                                                    "anthropic-version": "2023-06-01"})
    resp = conn.getresponse()
    if stream:
        return conn, resp
    out = resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
    conn.close()
    return out


def run_nginx(tmp_path, site):
    """nginx in the foreground with a server block of the README's, everything of it under tmp_path."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / name).mkdir()
    (prefix / "nginx.conf").write_text(
        "%s\npid %s/nginx.pid;\nerror_log %s/error.log;\nevents {}\nhttp {\n access_log off;\n"
        " client_body_temp_path %s/body;\n proxy_temp_path %s/proxy;\n fastcgi_temp_path %s/fastcgi;\n"
        " uwsgi_temp_path %s/uwsgi;\n scgi_temp_path %s/scgi;\n%s\n}\n"
        % ("user root;" if os.geteuid() == 0 else "", prefix, prefix, prefix, prefix, prefix, prefix, prefix, site))
    return subprocess.Popen([NGINX or "nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                             "-g", "daemon off;"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.skipif(not NGINX and not REQUIRE_NGINX, reason="no nginx (apt-get install nginx-light)")
def test_two_processes_behind_nginx(tmp_path, upstream, upstream2):
    ports = [free_port(), free_port()]
    front = free_port()
    config = team_config(upstream, upstream2, [{"rpm": 6}], TRUSTED_PROXIES=["127.0.0.1"])
    path = write_config(tmp_path / "config.json", config)
    processes = [subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", path,
                                   "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, cwd=str(tmp_path)) for port in ports]
    site = readme_nginx().replace("3457", str(ports[0])).replace("3458", str(ports[1])) \
        .replace("listen 3456", "listen 127.0.0.1:%d" % front) \
        .replace("location / {", "location / {\n        add_header X-Upstream $upstream_addr always;")
    nginx = run_nginx(tmp_path, site)
    try:
        for port, process in zip(ports, processes):
            wait_listening(port, process)
        wait_listening(front, nginx)
        # A selection made through the first process...
        assert call(ports[0], "POST", "/api/select", {"provider": SPARE})[0] == 200
        deadline = time.monotonic() + 1.0
        while json.loads(call(ports[1], "GET", "/api/state")[2])["selected"] != SPARE:
            assert time.monotonic() < deadline, "the second process did not take the selection within a second"
            time.sleep(0.05)
        # ...applies to what the second answers through nginx (round robin: both answer).
        answered = set()
        for _ in range(4):
            status, headers, body = call(front, "POST", "/v1/messages", MESSAGE)
            assert status == 200 and headers["x-ccproxy-provider"] == quote(SPARE)
            answered.add(headers["x-upstream"])
        assert answered == {"127.0.0.1:%d" % p for p in ports}
        assert len(upstream2.requests) == 4 and not upstream.requests
        # A per-key limit holds across both: 6 a minute through nginx, not 6 a process.
        same_minute()
        results = [call(front, "POST", "/v1/messages", MESSAGE, key=SECRET_WANG)[0] for _ in range(8)]
        assert results == [200] * 6 + [429] * 2
        # Streams pass through nginx unbuffered: the first event long before the last.
        upstream2.event_delay, upstream2.words = 0.4, 5
        conn, resp = call(front, "POST", "/v1/messages", dict(MESSAGE, stream=True), stream=True)
        started, first_delta = time.monotonic(), None
        while True:
            line = resp.readline()
            if not line:
                break
            if b"content_block_delta" in line and first_delta is None:
                first_delta = time.monotonic() - started
        total = time.monotonic() - started
        conn.close()
        assert resp.status == 200 and first_delta is not None
        assert total - first_delta > 1.0, "the stream arrived at once (%.2f s of %.2f s): buffered" % (first_delta, total)
    finally:
        nginx.terminate()
        for process in processes:
            process.terminate()
        for process in processes + [nginx]:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
