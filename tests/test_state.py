"""The state file (selection, presets, fallback edits, discovered models): every change is
saved before it is made, atomically, and a change that cannot be saved is refused, not lost."""

import json
import os
import time

import pytest

import ccproxy
from conftest import start_proxy


@pytest.fixture
def state_path(config_file):
    return ccproxy.state_path_for(config_file)


def read_state(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


CHANGES = [
    ("/api/select", {"provider": "beta"}),
    ("/api/overrides", {"provider": "alpha", "header_override": "ua"}),
    ("/api/fallback", {"enabled": False, "providers": ["beta"]}),
    ("/api/refresh-models", {"provider": "alpha"}),
]


@pytest.mark.parametrize("path, body", CHANGES)
def test_a_change_that_cannot_be_saved_is_refused_and_not_made(proxy, state_path, path, body):
    before = proxy.api("GET", "/api/state")[1]
    os.mkdir(state_path)                       # a directory where the state file should be
    status, err = proxy.api("POST", path, body)
    assert status == 500 and err["type"] == "error"
    message = err["error"]["message"]
    assert "could not save this change to config.state.json" in message and state_path not in message
    after = proxy.api("GET", "/api/state")[1]
    for key in ("selected", "fallback", "providers"):
        assert after[key] == before[key]        # nothing changed that the next restart would lose
    os.rmdir(state_path)
    assert proxy.api("POST", path, body)[0] == 200     # and once the disk is fixed, it works


@pytest.mark.parametrize("path, body", CHANGES)
def test_state_is_written_atomically(proxy, state_path, monkeypatch, path, body):
    """Make the final rename fail: a write in place would already have changed the file."""
    assert proxy.api("POST", "/api/select", {"provider": "alpha"})[0] == 200
    with open(state_path, "rb") as f:
        saved = f.read()

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_rename)
    status, err = proxy.api("POST", path, body)
    monkeypatch.undo()
    assert status == 500 and "No space left on device" in err["error"]["message"]
    with open(state_path, "rb") as f:
        assert f.read() == saved                # the old file, whole
    leftovers = [n for n in os.listdir(os.path.dirname(state_path)) if n.startswith(".")]
    assert leftovers == []                      # and the temp file was removed


def test_the_selection_survives_a_reload_and_a_restart(config_file, state_path):
    proxy = start_proxy(config_file)
    try:
        assert proxy.api("POST", "/api/select", {"provider": "beta"})[0] == 200
        status, state = proxy.api("POST", "/api/reload")
        assert status == 200 and state["selected"] == "beta"
        assert proxy.call("POST", "/v1/messages", {"model": "m", "max_tokens": 1, "messages": []})[1][
            "x-ccproxy-provider"] == "beta"
    finally:
        proxy.stop()
    assert read_state(state_path)["selected"] == "beta"
    proxy = start_proxy(config_file)
    try:
        assert proxy.store.view.selected == "beta"
    finally:
        proxy.stop()


def test_temp_files_left_by_a_crash_are_removed_at_start(config_file, state_path):
    directory = os.path.dirname(state_path)
    old = os.path.join(directory, "." + os.path.basename(state_path) + ".ab12cd_9")
    fresh = os.path.join(directory, "." + os.path.basename(state_path) + ".zz34yy_1")
    old_config = os.path.join(directory, ".config.json.k2j4h5g6")
    other = os.path.join(directory, ".unrelated.ab12cd_9")
    for path in (old, fresh, old_config, other):
        with open(path, "w") as f:
            f.write("{half")
    long_ago = time.time() - ccproxy.STALE_TEMP_S - 10
    for path in (old, old_config, other):
        os.utime(path, (long_ago, long_ago))
    proxy = start_proxy(config_file)
    proxy.stop()
    # a fresh one may belong to another process writing right now; other files are not ours
    assert not os.path.exists(old) and not os.path.exists(old_config)
    assert os.path.exists(fresh) and os.path.exists(other)


def test_fallback_without_providers_keeps_the_edited_list(proxy):
    def listed(state):
        return {k: state["fallback"][k] for k in ("enabled", "providers", "edited")}
    status, state = proxy.api("POST", "/api/fallback", {"enabled": True, "providers": ["beta"]})
    assert listed(state) == {"enabled": True, "providers": ["beta"], "edited": True}
    status, state = proxy.api("POST", "/api/fallback", {"enabled": False})
    assert status == 200 and listed(state) == {"enabled": False, "providers": ["beta"], "edited": True}
    status, state = proxy.api("POST", "/api/fallback", {"enabled": True, "providers": None})
    assert listed(state) == {"enabled": True, "providers": [], "edited": False}   # config.json's
    status, state = proxy.api("POST", "/api/fallback", {"enabled": False})
    assert listed(state) == {"enabled": False, "providers": [], "edited": False}  # still config's
