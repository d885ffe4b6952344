"""Config validation, the state file, reload (API and SIGHUP) and the command line."""

import http.client
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import ccproxy
from conftest import APIKEY, ROOT, make_config, start_proxy, wait_for, write_config

GOOD = {"APIKEY": "sk-ccproxy-good-0123456789", "Providers": [{"name": "a", "api_base_url": "https://a.example/v1/messages"}]}


def bad(**changes):
    raw = json.loads(json.dumps(GOOD))
    raw.update(changes)
    return raw


@pytest.mark.parametrize("raw, message", [
    (bad(PORT="3456"), "PORT must be a whole number"),
    (bad(PORT=70000), "PORT must be a whole number"),
    (bad(LOG_LEVEL="LOUD"), "LOG_LEVEL must be one of"),
    (bad(API_TIMEOUT_MS=0), "API_TIMEOUT_MS must be a positive number"),
    (bad(MODEL_MAPPING="yes"), "MODEL_MAPPING must be true or false"),
    (bad(Providers={}), "Providers must be a list"),
    (bad(Providers=[{"name": "a", "api_base_url": "ftp://x/v1/messages"}]),
     "Providers[0] (a).api_base_url must be an http(s) URL"),
    (bad(Providers=[{"name": "a", "api_base_url": "relay.example/v1/messages"}]),
     "Providers[0] (a).api_base_url must be an http(s) URL"),
    (bad(Providers=[{"name": "a"}, {"name": "a"}]), "Providers[1] (a): duplicate provider name"),
    (bad(Providers=[{"api_base_url": "https://x"}]), "Providers[0].name must be a non-empty string"),
    (bad(Providers=[{"name": "a", "models": "m1"}]), "Providers[0] (a).models must be a list"),
    (bad(Providers=[{"name": "a", "auth": "basic"}]), "Providers[0] (a).auth must be one of"),
    (bad(Providers=[{"name": "a", "proxy": "socks5://h:1"}]), "Providers[0] (a).proxy must be an http://"),
    (bad(Providers=[{"name": "a", "api_key": 5}]), "Providers[0] (a).api_key must be a string"),
    (bad(HeaderOverrides={"p": "User-Agent: x"}), "HeaderOverrides.p must be an object"),
    (bad(HeaderOverrides={"p": {"User-Agent": 5}}), "HeaderOverrides.p.User-Agent must be a string"),
    (bad(HeaderOverrides={"p": {"X-A": "a\r\nX-Evil: 1"}}), "HeaderOverrides.p.X-A contains a line break"),
    (bad(HeaderOverrides={"p": {"Bad Name": "v"}}), "is not a valid HTTP header name"),
    (bad(HeaderOverrides={"p": {"X-A": "密钥"}}), "HeaderOverrides.p.X-A contains a line break, a control character"),
    (bad(Providers=[{"name": "a", "api_key": "sk-a\nsk-b"}]), "Providers[0] (a).api_key contains a space, a tab, a line"),
    (bad(Providers=[{"name": "a", "api_key": "sk-a\x00"}]), "Providers[0] (a).api_key contains a space, a tab, a line"),
    (bad(Providers=[{"name": "a", "api_key": "sk-a sk-b"}]), "Providers[0] (a).api_key contains a space, a tab, a line"),
    (bad(Providers=[{"name": "a", "api_key": "sk-a\tb"}]), "Providers[0] (a).api_key contains a space, a tab, a line"),
    (bad(APIKEY=""), "APIKEY is empty, which would let any program here and any web page you open use your relays"),
    (bad(APIKEY=ccproxy.PLACEHOLDER_APIKEY), "APIKEY is still the template's placeholder"),
    ({"Providers": []}, "APIKEY is empty"),
    (bad(APIKEY="sk ccproxy"), "APIKEY contains a space"),
    (bad(APIKEY="sk-中文-0123456789"), "APIKEY contains a space, a line break, a control character or a character outside Latin-1"),
    (bad(APIKEY=5), "APIKEY must be a string"),
    (bad(RequestOverrides={"p": ["thinking"]}), "RequestOverrides.p must be an object"),
    (bad(**{"env-models": {"ANTHROPIC_SONET_MODEL": "x"}}), "env-models.ANTHROPIC_SONET_MODEL is not a model variable"),
    ([1, 2], "the top level must be a JSON object"),
    (bad(Providers=[{"name": "中转站\r\nX-Evil: 1"}]), 'Providers[0].name "中转站\\r\\nX-Evil: 1" contains an unprintable character (U+000D'),
    (bad(Providers=[{"name": "a\tb"}]), "Providers[0].name \"a\\tb\" contains an unprintable character (U+0009"),
    (bad(Providers=[{"name": "a\x00"}]), "contains an unprintable character (U+0000"),
    (bad(Providers=[{"name": "a\u202eb"}]), "contains an unprintable character (U+202E"),
    (bad(Providers=[{"name": "中", "models": ["ok", "glm\n4"]}]), "Providers[0] (中).models: the model id \"glm\\n4\""),
    (bad(Providers=[{"name": "中", "comment": "ok\nfine\x1b[31m"}]), "Providers[0] (中).comment"),
    (bad(HeaderOverrides={"预设\n": {}}), "HeaderOverrides: the preset name"),
    (bad(RequestOverrides={"预设\u2028": {}}), "RequestOverrides: the preset name"),
    (bad(**{"env-models": {"ANTHROPIC_MODEL": "glm\r"}}), "env-models.ANTHROPIC_MODEL \"glm\\r\" contains an unprintable"),
])
def test_each_problem_gets_one_clear_line(raw, message):
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.validate_config(raw, "config.json")
    assert any(p.startswith("config.json: ") and message in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("name", ["中转站A", "リレー🚀", "\u200f\u05e2\u05d1\u05e8\u05d9\u05ea", "a b, c"])
def test_names_in_any_script_are_valid(name):
    raw = bad(Providers=[{"name": name, "api_base_url": "https://a.example", "comment": "第一行\n\t第二行",
                          "models": ["模型-1"]}], Fallback=[name], HeaderOverrides={"预设": {"X-A": "1"}})
    config = ccproxy.validate_config(raw)
    assert config.by_name[name].models == ("模型-1",) and config.fallback == (name,)


@pytest.mark.parametrize("auth", ["Bearer", "BEARER", " bearer ", "X-Api-Key", "Both"])
def test_auth_is_read_in_any_case(auth):
    raw = bad(Providers=[{"name": "a", "api_base_url": "https://a.example", "auth": auth}])
    assert ccproxy.validate_config(raw).by_name["a"].auth == auth.strip().lower()


def test_a_pasted_key_loses_the_whitespace_around_it():
    raw = bad(Providers=[{"name": "a", "api_base_url": "https://a.example/v1/messages", "api_key": " sk-abc\n"}])
    assert ccproxy.validate_config(raw).by_name["a"].api_key == "sk-abc"


def test_all_problems_are_reported_together():
    raw = bad(PORT=-1, LOG_LEVEL="x", Providers=[{"name": "a"}, {"name": "a", "auth": "?"}])
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.validate_config(raw)
    assert len(info.value.problems) == 4


def test_comments_separators_and_template_are_valid():
    """The template is valid once it has an APIKEY (the first run gives it one), not before."""
    with open(os.path.join(ROOT, "config.in.json"), encoding="utf-8") as f:
        template = json.load(f)
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.validate_config(template)
    assert info.value.problems == ["config.json: APIKEY is still the template's placeholder, which would let any "
                                   "program here and any web page you open use your relays — set it to a long "
                                   "random secret, or start ccproxy.py, which puts a random one in"]
    config = ccproxy.validate_config(dict(template, APIKEY=ccproxy.new_apikey()))
    assert [p.name for p in config.providers if not p.usable] == ["----- relays -----"]
    deepseek = config.by_name["deepseek"]
    assert deepseek.base_url == "https://api.deepseek.com/anthropic"
    assert "_comment" not in config.header_presets


@pytest.mark.parametrize("text, message", [
    ("{", "invalid JSON"), ("", "invalid JSON"), (b"\xff\xfe{}", "is not UTF-8"),
])
def test_unreadable_files(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.load_config(str(path))
    # named by its name: a browser sees these (the page's Reload), never the server's paths
    assert message in info.value.problems[0] and info.value.problems[0].startswith("config.json: ")
    assert str(tmp_path) not in info.value.problems[0]


# -- state file


def test_selection_and_presets_survive_a_restart(config_file):
    proxy = start_proxy(config_file)
    proxy.store.select("beta")
    proxy.store.set_overrides("alpha", "ua", None)
    proxy.stop()
    state_path = ccproxy.state_path_for(config_file)
    assert os.path.dirname(state_path) == os.path.dirname(os.path.abspath(config_file))
    with open(state_path, encoding="utf-8") as f:
        assert json.load(f)["selected"] == "beta"
    proxy = start_proxy(config_file)
    try:
        assert proxy.store.view.selected == "beta"
        assert proxy.store.view.targets["alpha"].header_preset_name == "ua"
    finally:
        proxy.stop()
    # Writes that succeed leave no temp file behind. (That the write is atomic is shown by
    # test_state.py's test_state_is_written_atomically, which makes the rename fail.)
    leftovers = [n for n in os.listdir(os.path.dirname(state_path)) if n.startswith(".")]
    assert leftovers == []


def test_a_corrupt_state_file_is_ignored(config_file):
    with open(ccproxy.state_path_for(config_file), "w") as f:
        f.write('{"selected": "bet')
    proxy = start_proxy(config_file)
    try:
        assert proxy.store.view.selected == "alpha"
    finally:
        proxy.stop()


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "s.json")
    ccproxy.write_atomic(path, "old")
    with pytest.raises(TypeError):   # the write fails half-way: not text
        ccproxy.write_atomic(path, 42)
    with open(path) as f:
        assert f.read() == "old"
    assert os.listdir(tmp_path) == ["s.json"]


# -- reload


def test_reload_swaps_in_a_valid_config_and_keeps_the_old_one_on_error(tmp_path, upstream, upstream2):
    path = tmp_path / "config.json"
    write_config(path, make_config(upstream))
    proxy = start_proxy(str(path))
    try:
        write_config(path, make_config(upstream, upstream2))
        status, state = proxy.api("POST", "/api/reload")
        assert status == 200 and [p["name"] for p in state["providers"]] == ["alpha", "----", "beta"]
        path.write_text('{"Providers": [{"name": "x", "api_base_url": "nope"}]')
        status, err = proxy.api("POST", "/api/reload")
        assert status == 400 and "invalid JSON" in err["error"]["message"]
        path.write_text(json.dumps({"APIKEY": APIKEY, "Providers": [{"name": "x", "api_base_url": "nope"}]}))
        status, err = proxy.api("POST", "/api/reload")
        assert status == 400 and any("api_base_url must be an http(s) URL" in p["message"] for p in err["problems"])
        status, state = proxy.api("GET", "/api/state")
        assert [p["name"] for p in state["providers"]] == ["alpha", "----", "beta"]
        assert state["reload_error"] and proxy.call("POST", "/v1/messages", {"model": "m"})[0] == 200
    finally:
        proxy.stop()


def run_cli(*args, timeout=30, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ccproxy.py")] + list(args),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def test_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--config", "--host", "--port", "--debug", "--log-level", "--check", "--version"):
        assert flag in result.stdout
    assert run_cli("--version").stdout.startswith("ccproxy ")


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path):
    path = write_config(tmp_path / "config.json", bad(PORT="x", Providers=[{"name": "a"}, {"name": "a"}]))
    result = run_cli("--config", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    # the full path once (the command line may name any file), then one line per problem
    assert lines[0] == "%s cannot be used:" % path and len(lines) == 3 and "Traceback" not in result.stderr
    assert run_cli("--check", "--config", path).returncode == 2
    good = write_config(tmp_path / "good.json", GOOD)
    assert run_cli("--check", "--config", good).returncode == 0


@pytest.mark.parametrize("apikey", ["", ccproxy.PLACEHOLDER_APIKEY])
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_no_server_without_a_real_key_on_any_address(tmp_path, apikey, host):
    """An empty key on 127.0.0.1 let any web page the user opened spend the relays."""
    path = write_config(tmp_path / "config.json", dict(GOOD, APIKEY=apikey))
    with pytest.raises(ccproxy.ConfigError) as info:
        ccproxy.make_server(path, host, 0)
    assert "APIKEY is" in info.value.problems[0]
    assert run_cli("--check", "--config", path).returncode == 2


@pytest.mark.parametrize("apikey", ["", ccproxy.PLACEHOLDER_APIKEY, None])
def test_a_start_gives_a_keyless_config_a_random_key(tmp_path, apikey):
    raw = dict(GOOD, _comment="中文 comment", Providers=[{"name": "中转站A", "api_base_url": "https://a.example"}])
    if apikey is None:
        del raw["APIKEY"]
    else:
        raw["APIKEY"] = apikey
    path = tmp_path / "config.json"
    before = json.dumps(raw, ensure_ascii=False, indent=4)          # a layout of the user's own
    path.write_text(before, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = proc.stdout.readline() + proc.stdout.readline()
        after = path.read_text(encoding="utf-8")
        key = json.loads(after)["APIKEY"]
        assert key.startswith("sk-ccproxy-") and len(key) > 30 and key not in said
        assert "had no APIKEY" in said and "see the APIKEY line of" in said
        # only the key changed, and the file before it is kept
        if apikey is not None:
            assert after == before.replace(json.dumps(apikey), json.dumps(key))
        backups = list(tmp_path.glob("config.json.bak-*"))
        assert [b.read_text(encoding="utf-8") for b in backups] == [before]
        assert {oct(p.stat().st_mode & 0o777) for p in backups + [path]} == {"0o600"}
        port = int(proc.stdout.readline().split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/state", headers={"x-api-key": key})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


def test_sighup_reloads_and_sigterm_stops_cleanly(tmp_path, upstream, upstream2):
    path = tmp_path / "config.json"
    write_config(path, make_config(upstream))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        port = int(banner.split("http://127.0.0.1:")[1].split()[0])
        write_config(path, dict(make_config(upstream, upstream2), PORT=port))
        proc.send_signal(signal.SIGHUP)

        def providers():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/state", headers={"x-api-key": APIKEY})
            names = [p["name"] for p in json.loads(conn.getresponse().read())["providers"]]
            conn.close()
            return names
        assert wait_for(lambda: "beta" in providers())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "Traceback" not in err and "stopped" in err
    finally:
        proc.kill()
        proc.wait()


def read_until(fd, marker, timeout=15):
    """What a process wrote to the terminal fd until marker appeared."""
    text, deadline = "", time.monotonic() + timeout
    while marker not in text and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                text += os.read(fd, 65536).decode("utf-8", "replace")
            except OSError:
                break
    return text


@pytest.mark.parametrize("terminal", [True, False])
def test_first_run_creates_config_with_a_random_key(tmp_path, terminal):
    """The key is shown on a terminal, and never where the output may be a log file."""
    path = tmp_path / "config.json"
    master, out = pty.openpty() if terminal else os.pipe()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", str(path),
                             "--port", "0"], stdout=out, stderr=subprocess.PIPE)
    os.close(out)
    try:
        text = read_until(master, "示例密钥")
        port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
        # Claude Code run at once: the template's example key is not sent to the real host
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/messages", json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1,
                                                         "messages": []}),
                     {"x-api-key": json.load(open(path, encoding="utf-8"))["APIKEY"]})
        resp = conn.getresponse()
        error = json.loads(resp.read())["error"]
        assert resp.status == 500 and resp.getheader("x-should-retry") == "false"
        assert "example key" in error["message"] and "Add provider" in error["message"]
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
        os.close(master)
    with open(path, encoding="utf-8") as f:
        created = json.load(f)
    key = created["APIKEY"]
    assert key.startswith("sk-ccproxy-") and key != ccproxy.PLACEHOLDER_APIKEY and len(key) > 30
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert "http://127.0.0.1:" in text and '"ANTHROPIC_BASE_URL"' in text
    assert '"ANTHROPIC_AUTH_TOKEN"' in text                     # interactive Claude Code asks about API_KEY
    assert "next: add your relay in the web UI" in text and "下一步" in text
    assert (key in text) is terminal
    if not terminal:
        assert "see the APIKEY line of" in text and "<APIKEY from config.json>" in text
    with open(os.path.join(ROOT, "config.in.json"), encoding="utf-8") as f:
        template_text = f.read()
    # the template as it is, but for its key
    assert path.read_text(encoding="utf-8") == template_text.replace(ccproxy.PLACEHOLDER_APIKEY, key)
    assert proc.returncode == 0


def test_first_run_then_the_relay_added_is_used_at_once(tmp_path, upstream):
    """The README's first steps: the template selects its example (anthropic, with an example
    key); the relay the user then adds is the one meant, with no selection to make."""
    path = str(tmp_path / "config.json")
    key = ccproxy.ensure_apikey(path)
    proxy = start_proxy(path)
    try:
        assert proxy.api("GET", "/api/state", key=key)[1]["selected"] == "anthropic"
        raw = json.load(open(path, encoding="utf-8"))
        raw["Providers"].append({"name": "中转站A", "api_base_url": upstream.url + "/v1/messages",
                                 "api_key": "sk-relay-0123456789"})
        write_config(path, raw)
        status, state = proxy.api("POST", "/api/reload", key=key)
        assert status == 200 and state["selected"] == "中转站A"
        status, headers, _ = proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8,
                                                                 "messages": [{"role": "user", "content": "hi"}]},
                                        key=key)
        assert status == 200 and headers["x-ccproxy-provider"] == "%E4%B8%AD%E8%BD%AC%E7%AB%99A"
        assert upstream.last.headers["x-api-key"] == "sk-relay-0123456789"
        # the example cannot be chosen while its key is an example
        status, body = proxy.api("POST", "/api/select", {"provider": "anthropic"}, key=key)
        assert status == 400 and body["code"] == "example_key" and "example api_key" in body["error"]["message"]
        assert proxy.api("GET", "/api/state", key=key)[1]["selected"] == "中转站A"
    finally:
        proxy.stop()


def test_sigterm_lets_a_stream_in_flight_finish(tmp_path, upstream):
    upstream.event_delay = 0.2
    upstream.words = 6                     # about 1.2 s of stream, inside the 5 s grace period
    path = write_config(tmp_path / "config.json", make_config(upstream))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/messages", json.dumps({"model": "m", "stream": True, "messages": []}),
                     {"x-api-key": APIKEY})
        resp = conn.getresponse()
        first = resp.read1(65536)
        proc.send_signal(signal.SIGTERM)   # mid-stream
        rest = resp.read()
        assert b"message_start" in first and rest.rstrip().endswith(b'{"type": "message_stop"}')
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()
    with open(os.path.join(os.path.dirname(path), "requests.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["stream"] and records[-1]["usage"]["output"] == 6   # written before the exit


def test_the_settings_table_is_what_readme_and_the_template_say():
    """One table (SETTINGS): its keys are config.in.json's, README's rows give each default as
    it is, and the keys a reload cannot apply are the ones README names."""
    import json
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    template = json.load(open(os.path.join(root, "config.in.json"), encoding="utf-8"))
    assert {k for k in template if not k.startswith("_")} == set(ccproxy.TOP_KEYS)
    for name in ("README.md", "README_zh.md"):
        text = open(os.path.join(root, name), encoding="utf-8").read()
        rows = dict(re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", text, re.M))
        for setting in ccproxy.SETTINGS:
            default = setting.default
            if isinstance(default, (bool, int, float)) or (isinstance(default, str) and default):
                shown = json.dumps(default) if isinstance(default, bool) else str(default)
                assert "`%s`" % shown in rows[setting.key], (name, setting.key)
        restart = {s.key for s in ccproxy.SETTINGS if not s.reload}
        said = re.search(r"(?:every key except|重载会应用除) (.+?)(?:,\n|之外)", text, re.S).group(1)
        assert set(re.findall(r"`([A-Z_]+)`", said)) == restart, name
    assert ccproxy.EDITABLE_SETTINGS == tuple(s.key for s in ccproxy.SETTINGS if s.page)


def test_a_setting_that_needs_a_restart_is_said_when_it_changes(tmp_path, upstream, log_lines):
    path = write_config(tmp_path / "config.json", make_config(upstream))
    proxy = start_proxy(path)
    try:
        assert proxy.api("GET", "/api/state")[1]["restart_needed"] == []
        config = make_config(upstream, REQUEST_LOG="其他日志.jsonl", COOLDOWN_MS=5000)
        write_config(tmp_path / "config.json", config)
        assert proxy.api("POST", "/api/reload")[0] == 200
        state = proxy.api("GET", "/api/state")[1]
        assert state["restart_needed"] == ["REQUEST_LOG"] and proxy.store.view.config.cooldown_s == 5.0
        assert "REQUEST_LOG changed in config.json: it takes effect when ccproxy is started again" in log_lines.text
    finally:
        proxy.stop()
