"""What a session leaves beside the config: every file its owner's alone (0600, most hold relay
keys), and every one of them ignored by the project's .gitignore, so that a checkout stays clean
and a key never gets committed by a `git add .`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import ccproxy
from conftest import ROOT, start_proxy, wait_for, write_config
from test_relay import MESSAGE

RELAY = "中转站·甲"
USER, USER_SECRET = "小王", "sk-ccp-wang-files-0123456789abcdef"

# What the README says ccproxy, run.sh and the tools may write beside the config.
WRITTEN_NAMES = ["config.json", "config.json.bak-20261204-112233", "config.state.json",
                 "config.state.json.lock", "requests.jsonl", "requests.jsonl.1", "usage.sqlite3",
                 "usage.sqlite3-wal", "usage.sqlite3-shm", "usage.sqlite3.minutes", "ccproxy.pid",
                 "ccproxy.log", "ccproxy.log.old", "cc-router.json", "cc-switch.sql", "cliproxy.yaml",
                 "claude-settings-中转站.json", ".venv/bin/python3"]


def git(directory, *args):
    return subprocess.run(["git", "-C", str(directory)] + list(args), capture_output=True, text=True,
                          timeout=30)


@pytest.fixture
def checkout(tmp_path):
    """An empty git repository holding the project's .gitignore, as a clone would."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    directory = tmp_path / "ccproxy"
    directory.mkdir()
    assert git(directory, "init", "-q").returncode == 0
    shutil.copy(os.path.join(ROOT, ".gitignore"), str(directory / ".gitignore"))
    return directory


@pytest.mark.parametrize("name", WRITTEN_NAMES)
def test_each_file_ccproxy_writes_is_ignored(checkout, name):
    result = git(checkout, "check-ignore", "-q", "--no-index", name)
    assert result.returncode == 0, "%s is not in .gitignore" % name


def run_tool(directory, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", args[0])] + list(args[1:]),
                            cwd=str(directory), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_a_whole_session_leaves_only_private_ignored_files(checkout, upstream):
    config_path = str(checkout / "config.json")
    assert ccproxy.ensure_apikey(config_path)                  # the first run creates the config
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["Providers"] = [{"name": RELAY, "api_base_url": upstream.url + "/v1/messages",
                            "api_key": "sk-relay-files-0123456789", "models": ["claude-sonnet-4-5"]}]
    config["Keys"] = [{"name": USER, "sha256": ccproxy.key_sha256(USER_SECRET), "rpm": 100}]
    write_config(config_path, config)
    apikey = config["APIKEY"]

    proxy = start_proxy(config_path)
    try:
        assert proxy.call("POST", "/v1/messages", MESSAGE, key=apikey)[0] == 200
        assert proxy.call("POST", "/v1/messages", MESSAGE, key=USER_SECRET)[0] == 200   # counts its minute
        assert proxy.api("POST", "/api/select", {"provider": RELAY}, key=apikey)[0] == 200
        version = proxy.api("GET", "/api/config", key=apikey)[1]["version"]
        status, _, _ = proxy.call("PUT", "/api/settings", {"CACHE_WARN_PCT": 40}, key=apikey,
                                  headers={"If-Match": version})
        assert status == 200                                    # kept the previous file as a backup
        assert wait_for(lambda: os.path.exists(str(checkout / "requests.jsonl")))
    finally:
        proxy.stop()

    run_tool(checkout, "ccp2ccr.py")
    run_tool(checkout, "ccp2ccswitch.py")
    run_tool(checkout, "ccp2ccswitch.py", "--export-cc", "--current", RELAY)
    run_tool(checkout, "ccp2cliproxy.py")
    run_tool(checkout, "ccp_update_model.py")

    written = sorted(name for name in os.listdir(str(checkout)) if name not in (".git", ".gitignore"))
    for expected in ("config.json", "config.state.json", "config.state.json.lock", "requests.jsonl",
                     "usage.sqlite3", "usage.sqlite3.minutes", "cc-router.json", "cc-switch.sql",
                     "cliproxy.yaml"):
        assert expected in written
    assert any(name.startswith("config.json.bak-") for name in written)
    assert any(name.startswith("claude-settings-") for name in written)
    modes = {name: oct(os.stat(str(checkout / name)).st_mode & 0o777) for name in written}
    assert modes == {name: "0o600" for name in written}
    status = git(checkout, "status", "--porcelain", "--untracked-files=all")
    assert status.stdout.splitlines() == ["?? .gitignore"]
