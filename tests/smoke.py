#!/usr/bin/env python3
"""Stdlib-only smoke run for any Python >= 3.8 (not collected by pytest).

Starts ccproxy.py as a user would (a subprocess with this interpreter) against two mock
providers, streams one request through it, switches provider, sends another, stops it with
SIGTERM, then runs each tool in tools/ on the same config, then starts and stops it with run.sh
(which runs it as a module). Exit 0 and "smoke OK" on success.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mock_upstream import MockUpstream  # noqa: E402

APIKEY = "sk-smoke-0123456789"


def call(port, method, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, json.dumps(body), {"x-api-key": APIKEY, "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def main():
    one, two = MockUpstream(), MockUpstream(models=("glm-4.6",))
    tmp = tempfile.mkdtemp(prefix="ccproxy-smoke-")
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump({"APIKEY": APIKEY, "PORT": 0, "Providers": [
            {"name": "one", "api_base_url": one.url + "/v1/messages", "api_key": "k1"},
            {"name": "two", "api_base_url": two.url + "/v1/messages", "api_key": "k2"}]}, f)
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(HERE), "ccproxy.py"),
                             "--config", config], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    try:
        banner = proc.stdout.readline()
        port = int(banner.split("http://127.0.0.1:")[1].split()[0])
        status, data = call(port, "POST", "/v1/messages?beta=true",
                            {"model": "m", "stream": True, "max_tokens": 5, "messages": []})
        assert status == 200 and b"event: message_stop" in data, (status, data[:200])
        assert len(one.requests) == 1
        status, _ = call(port, "POST", "/api/select", {"provider": "two"})
        assert status == 200
        status, data = call(port, "POST", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": []})
        assert status == 200 and len(two.requests) == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, (proc.returncode, err)
        assert "Traceback" not in err, err
        tools = os.path.join(os.path.dirname(HERE), "tools")
        for tool, args in (("ccp_update_model.py", ["--dry-run"]), ("ccp2ccr.py", ["--update-models", "--output", "ccr.json"]),
                           ("ccp2ccswitch.py", ["--output", "cc.sql"]), ("ccp2cliproxy.py", ["--output", "c.yaml"])):
            run = subprocess.run([sys.executable, os.path.join(tools, tool), "--input", config] + args,
                                 cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
            assert run.returncode == 0 and "Traceback" not in run.stderr, (tool, run.stderr)
        run_sh(tmp, config, one)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        one.close()
        two.close()
    print("smoke OK on Python %s" % sys.version.split()[0])
    return 0


def run_sh(tmp, config, relay):
    """run.sh start and stop with this interpreter: it runs ccproxy as a module (-m ccproxy)."""
    env = dict(os.environ, PYTHON=sys.executable, CONFIG=config, PIDFILE=os.path.join(tmp, "ccproxy.pid"),
               LOGFILE=os.path.join(tmp, "ccproxy.log"))
    script = os.path.join(os.path.dirname(HERE), "run.sh")
    start = subprocess.run(["bash", script, "start"], env=env, cwd=tmp, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    try:
        assert start.returncode == 0, start.stderr
        port = int(start.stdout.split("http://127.0.0.1:")[1].split("/")[0])
        before = len(relay.requests)
        call(port, "POST", "/api/select", {"provider": "one"})
        status, _ = call(port, "POST", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": []})
        assert status == 200 and len(relay.requests) == before + 1, status
    finally:
        stop = subprocess.run(["bash", script, "stop"], env=env, cwd=tmp, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert "ccproxy stopped" in stop.stdout, (stop.stdout, stop.stderr)
    with open(env["LOGFILE"]) as f:
        assert "Traceback" not in f.read()


if __name__ == "__main__":
    sys.exit(main())
