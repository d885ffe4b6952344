"""tools/: each output checked the way its target program reads it."""

import glob
import json
import os
import sqlite3
import subprocess
import sys
import urllib.parse

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import ccp2ccr  # noqa: E402
import ccp2ccswitch  # noqa: E402
import ccp2cliproxy  # noqa: E402
import ccp_update_model  # noqa: E402


@pytest.fixture
def yaml():
    """PyYAML, for the tests that read YAML back; the others need no test-only dependency."""
    return pytest.importorskip("yaml", reason="PyYAML is a test-only dependency")


NASTY_NAME = '中转 "x" v1.2'
NASTY_KEY = "sk:#x\"q\"\\'y'&*%{}"      # what YAML, SQL and JSON quote (a key has no spaces)

# A hand-formatted config: 4-space indent, comments, unknown keys, UTF-8, inline lists.
TEMPLATE = """{
    "_comment": "我的配置 — keep me",
    "HOST": "127.0.0.1",
    "PORT": 3456,
    "APIKEY": "sk-ccproxy-tools-0123456789",
    "x-unknown-top": {"kept": [1, 2]},
    "env-models": {"ANTHROPIC_MODEL": ""},
    "Providers": [
        {
            "name": "alpha",
            "api_base_url": "%(one)s/v1/messages",
            "api_key": "sk-alpha-1",
            "models": %(alpha_models)s,
            "_note": "keeps its place"
        },
        {"name": "----- 分隔 -----", "api_base_url": ""},
        {
            "name": "%(nasty_json)s",
            "comment": "prefix kept",
            "api_base_url": "%(two)s/anthropic/v1/messages",
            "api_key": %(nasty_key_json)s,
            "env-models": {"ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air", "ANTHROPIC_MODEL": "glm-4.6"},
            "custom": true
        },
        {"name": "a.b", "api_base_url": "%(dead)s/v1/messages", "api_key": "k-ab", "models": ["old-1"]},
        {"name": "a_b", "api_base_url": "%(one)s", "api_key": "k-a_b", "models": []},
        {"name": "nokey", "api_base_url": "%(one)s/v1/messages", "models": ["m"]}
    ]
}
"""


@pytest.fixture
def dead_url():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % s.getsockname()[1]


@pytest.fixture
def fields(upstream, upstream2, dead_url):
    upstream2.models = ["glm-4.6", "glm-4.5-air", "kimi-k2"]
    return {"one": upstream.url, "two": upstream2.url, "dead": dead_url,
            "nasty_json": NASTY_NAME.replace('"', '\\"'), "nasty_key_json": json.dumps(NASTY_KEY),
            "alpha_models": '["claude-old"]'}


@pytest.fixture
def config_path(tmp_path, fields):
    path = tmp_path / "config.json"
    path.write_text(TEMPLATE % fields, encoding="utf-8")
    return str(path)


def run_tool(name, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name)] + list(args),
                          capture_output=True, text=True, timeout=60, cwd=cwd)


# -- ccp_update_model.py


def test_updater_rewrites_only_models(config_path, fields, upstream):
    original = open(config_path, encoding="utf-8").read()
    result = run_tool("ccp_update_model.py", "--input", config_path, "--timeout", "5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "OK alpha: 3 models" in out and "OK %s: 3 models" % NASTY_NAME in out
    assert "FAIL a.b: connection refused" in out and "kept its 1 models" in out
    assert "fastest:" in out and "updated 3 of 4 providers" in out
    assert "skipped nokey: it has no api_key" in result.stderr
    new = open(config_path, encoding="utf-8").read()
    backups = glob.glob(config_path + ".bak-*")
    assert len(backups) == 1 and open(backups[0], encoding="utf-8").read() == original
    assert os.stat(backups[0]).st_mode & 0o777 == os.stat(config_path).st_mode & 0o777 == 0o600
    inline = "[%s]" % ", ".join(json.dumps(m) for m in upstream.models)
    expected = original.replace('"models": ["claude-old"]', '"models": ' + inline)   # inline stays inline
    # the nasty provider had no models key: it is added after its last member
    expected = expected.replace('"custom": true\n', '"custom": true,\n            "models": [\n'
                                + ",\n".join(" " * 16 + json.dumps(m) for m in ["glm-4.6", "glm-4.5-air", "kimi-k2"])
                                + "\n            ]\n")
    expected = expected.replace('"api_key": "k-a_b", "models": []', '"api_key": "k-a_b", "models": [%s]'
                                % ", ".join(json.dumps(m) for m in upstream.models))
    assert new == expected


def test_updater_filter_dry_run_and_exit_codes(config_path, tmp_path, upstream):
    before = open(config_path, encoding="utf-8").read()
    result = run_tool("ccp_update_model.py", "--input", config_path, "--filter", "haiku,kimi", "--dry-run")
    assert result.returncode == 0 and "dry run" in result.stdout
    assert "OK alpha: 1 models" in result.stdout and open(config_path, encoding="utf-8").read() == before
    assert not glob.glob(config_path + ".bak*")
    out = tmp_path / "other.json"
    assert run_tool("ccp_update_model.py", "--input", config_path, "--output", str(out), "--filter", "haiku").returncode == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["Providers"][0]["models"] == ["claude-haiku-4-5"]
    result = run_tool("ccp_update_model.py", "--input", config_path, "--filter", "nothing-matches")
    assert result.returncode == 1 and "none matches" in result.stdout


def test_updater_exits_1_when_every_provider_fails(tmp_path, dead_url):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"APIKEY": X_API_KEY_CONFIG["APIKEY"], "Providers": [{"name": "x", "api_base_url": dead_url, "api_key": "k",
                                               "models": ["keep"]}]}))
    before = path.read_text()
    result = run_tool("ccp_update_model.py", "--input", str(path))
    assert result.returncode == 1 and "FAIL x: connection refused" in result.stdout
    assert path.read_text() == before


def test_updater_reports_html_pages_in_words(config_path, upstream):
    upstream.fail_next(status=401, body=b"<html>login</html>", content_type="text/html")
    result = run_tool("ccp_update_model.py", "--input", config_path, "--dry-run")
    assert "HTTP 401 (HTML page, not JSON)" in result.stdout


@pytest.mark.parametrize("tool", ["ccp_update_model.py", "ccp2ccr.py", "ccp2ccswitch.py", "ccp2cliproxy.py"])
@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("{nope", "invalid JSON"),
    ('{"PORT": "x", "APIKEY": "sk-ccproxy-tools-0123456789"}', "PORT must be a whole number")])
def test_bad_input_one_line_exit_2_no_output(tool, content, message, tmp_path):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out.file"
    result = run_tool(tool, "--input", str(path), "--output", str(out))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("tool", ["ccp_update_model.py", "ccp2ccr.py", "ccp2ccswitch.py", "ccp2cliproxy.py",
                                  "ccp2ccr.sh", "ccp2ccswitch.sh", "ccp2cliproxy.sh"])
def test_help(tool):
    command = ["bash"] if tool.endswith(".sh") else [sys.executable]
    result = subprocess.run(command + [os.path.join(ROOT, "tools", tool), "--help"], capture_output=True,
                            text=True, timeout=30, cwd="/")
    assert result.returncode == 0 and "--input" in result.stdout and "--output" in result.stdout


# -- ccp2ccr.py


def test_ccr_file_follows_ccr_rules(config_path, tmp_path):
    out = tmp_path / "cc-router.json"
    result = run_tool("ccp2ccr.py", "--input", config_path, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "v3" in result.stdout and "skipped nokey" in result.stderr
    assert "skipped %s: it has no models" % NASTY_NAME in result.stderr
    ccr = json.loads(out.read_text(encoding="utf-8"))
    assert set(ccr) <= {"HOST", "PORT", "APIKEY", "LOG", "API_TIMEOUT_MS", "PROXY_URL", "Providers", "Router"}
    assert ccr["PORT"] != 3456 and ccr["HOST"] == "127.0.0.1"
    names = [p["name"] for p in ccr["Providers"]]
    assert names == ["alpha", "a.b"] and len(set(names)) == len(names)
    for provider in ccr["Providers"]:
        assert set(provider) == {"name", "api_base_url", "api_key", "models", "transformer", "protocol"}
        assert "," not in provider["name"] and provider["models"]
        assert provider["api_base_url"].endswith("/v1/messages")
        assert provider["transformer"] == {"use": ["Anthropic"]} and provider["protocol"] == "anthropic_messages"
    name, model = ccr["Router"]["default"].split(",")
    assert name == "alpha" and model in ccr["Providers"][0]["models"]


def test_ccr_update_models_keeps_prefix_and_routes_to_current(config_path, tmp_path, fields):
    out = tmp_path / "cc-router.json"
    result = run_tool("ccp2ccr.py", "--input", config_path, "--output", str(out), "--update-models",
                      "--timeout", "5", "--current", NASTY_NAME)
    assert result.returncode == 0, result.stderr
    ccr = json.loads(out.read_text(encoding="utf-8"))
    nasty = next(p for p in ccr["Providers"] if p["name"] == NASTY_NAME)
    assert nasty["api_base_url"] == fields["two"] + "/anthropic/v1/messages"
    assert nasty["api_key"] == NASTY_KEY and nasty["models"] == ["glm-4.6", "glm-4.5-air", "kimi-k2"]
    assert ccr["Router"]["default"] == NASTY_NAME + ",glm-4.6"        # its ANTHROPIC_MODEL
    assert ccr["Router"]["background"] == NASTY_NAME + ",glm-4.5-air"
    assert run_tool("ccp2ccr.py", "--input", config_path, "--output", str(tmp_path / "x"),
                    "--current", "nope").returncode == 2


# -- ccp2ccswitch.py

ALLOWED_PRAGMAS = {"foreign_keys", "user_version"}


def replay_ccswitch_import(sql_text):
    """Import an SQL file the way CC Switch does: header, fresh database, authorizer, commit."""
    assert sql_text.splitlines()[0] == "-- CC Switch SQLite 导出"
    db = sqlite3.connect(":memory:")

    def authorizer(action, arg1, arg2, dbname, source):
        if action == sqlite3.SQLITE_ATTACH:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_PRAGMA and arg1 not in ALLOWED_PRAGMAS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    db.set_authorizer(authorizer)
    db.executescript(sql_text)
    db.set_authorizer(lambda *args: sqlite3.SQLITE_OK)   # None only clears it from Python 3.11 on
    assert not db.in_transaction
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert set(ccp2ccswitch.TABLES) <= tables
    assert db.execute("PRAGMA user_version").fetchone()[0] == 17
    return db


# What CC Switch v3.20.0 (database schema 17) has in the seven tables an import requires, read
# from its schema.rs (CREATE TABLE plus the columns its migrations up to 17 add):
# column -> (declared type, NOT NULL, default, position in the primary key).
BOOL = ("BOOLEAN", 1, "0", 0)
CCSWITCH_SCHEMA_17 = {
    "providers": {
        "id": ("TEXT", 1, None, 1), "app_type": ("TEXT", 1, None, 2), "name": ("TEXT", 1, None, 0),
        "settings_config": ("TEXT", 1, None, 0), "website_url": ("TEXT", 0, None, 0),
        "category": ("TEXT", 0, None, 0), "created_at": ("INTEGER", 0, None, 0),
        "sort_index": ("INTEGER", 0, None, 0), "notes": ("TEXT", 0, None, 0), "icon": ("TEXT", 0, None, 0),
        "icon_color": ("TEXT", 0, None, 0), "meta": ("TEXT", 1, "'{}'", 0), "is_current": BOOL,
        "in_failover_queue": BOOL, "cost_multiplier": ("TEXT", 1, "'1.0'", 0),
        "limit_daily_usd": ("TEXT", 0, None, 0), "limit_monthly_usd": ("TEXT", 0, None, 0),
        "provider_type": ("TEXT", 0, None, 0)},
    "provider_endpoints": {
        "id": ("INTEGER", 0, None, 1), "provider_id": ("TEXT", 1, None, 0), "app_type": ("TEXT", 1, None, 0),
        "url": ("TEXT", 1, None, 0), "added_at": ("INTEGER", 0, None, 0)},
    "mcp_servers": dict({
        "id": ("TEXT", 0, None, 1), "name": ("TEXT", 1, None, 0), "server_config": ("TEXT", 1, None, 0),
        "description": ("TEXT", 0, None, 0), "homepage": ("TEXT", 0, None, 0), "docs": ("TEXT", 0, None, 0),
        "tags": ("TEXT", 1, "'[]'", 0)},
        **{"enabled_" + app: BOOL for app in ("claude", "codex", "gemini", "grokbuild", "opencode", "hermes")}),
    "prompts": {
        "id": ("TEXT", 1, None, 1), "app_type": ("TEXT", 1, None, 2), "name": ("TEXT", 1, None, 0),
        "content": ("TEXT", 1, None, 0), "description": ("TEXT", 0, None, 0), "enabled": ("BOOLEAN", 1, "1", 0),
        "created_at": ("INTEGER", 0, None, 0), "updated_at": ("INTEGER", 0, None, 0)},
    "skills": dict({
        "id": ("TEXT", 0, None, 1), "name": ("TEXT", 1, None, 0), "description": ("TEXT", 0, None, 0),
        "directory": ("TEXT", 1, None, 0), "repo_owner": ("TEXT", 0, None, 0), "repo_name": ("TEXT", 0, None, 0),
        "repo_branch": ("TEXT", 0, "'main'", 0), "readme_url": ("TEXT", 0, None, 0)},
        **{"enabled_" + app: BOOL for app in ("claude", "codex", "gemini", "grokbuild", "opencode", "hermes")},
        installed_at=("INTEGER", 1, "0", 0), content_hash=("TEXT", 0, None, 0), updated_at=("INTEGER", 1, "0", 0)),
    "skill_repos": {
        "owner": ("TEXT", 1, None, 1), "name": ("TEXT", 1, None, 2), "branch": ("TEXT", 1, "'main'", 0),
        "enabled": ("BOOLEAN", 1, "1", 0)},
    "settings": {"key": ("TEXT", 0, None, 1), "value": ("TEXT", 0, None, 0)},
}


def test_every_ccswitch_table_is_schema_17_column_for_column(config_path, tmp_path):
    out = tmp_path / "cc-switch.sql"
    assert run_tool("ccp2ccswitch.py", "--input", config_path, "--output", str(out)).returncode == 0
    db = replay_ccswitch_import(out.read_text(encoding="utf-8"))
    assert set(ccp2ccswitch.TABLES) == set(CCSWITCH_SCHEMA_17)
    for table, expected in CCSWITCH_SCHEMA_17.items():
        columns = {row[1]: (row[2], row[3], row[4], row[5]) for row in db.execute("PRAGMA table_info(%s)" % table)}
        assert columns == expected, table


def test_ccswitch_queries_run_on_the_imported_database(config_path, tmp_path):
    """The reads and writes CC Switch's providers, MCP and Skills pages make: each names its
    columns, so a table in another layout fails here as it does there (no such column)."""
    out = tmp_path / "cc-switch.sql"
    assert run_tool("ccp2ccswitch.py", "--input", config_path, "--output", str(out)).returncode == 0
    db = replay_ccswitch_import(out.read_text(encoding="utf-8"))
    db.execute("PRAGMA foreign_keys = ON")
    rows = db.execute("SELECT id, name, settings_config, website_url, category, created_at, sort_index, notes, "
                      "icon, icon_color, meta, is_current, in_failover_queue, cost_multiplier, limit_daily_usd, "
                      "limit_monthly_usd, provider_type FROM providers WHERE app_type = 'claude' "
                      "ORDER BY COALESCE(sort_index, 999999), created_at, id").fetchall()
    assert len(rows) == 4 and rows[0][13] == "1.0"
    assert db.execute("SELECT id FROM providers WHERE app_type = 'claude' AND is_current = 1").fetchall()
    db.execute("UPDATE providers SET is_current = (id = ?) WHERE app_type = 'claude'", (rows[2][0],))
    db.execute("SELECT url, added_at FROM provider_endpoints WHERE provider_id = ? AND app_type = 'claude'",
               (rows[0][0],)).fetchall()
    db.execute("INSERT INTO mcp_servers (id, name, server_config, description, homepage, docs, tags, "
               "enabled_claude, enabled_codex, enabled_gemini, enabled_grokbuild, enabled_opencode, enabled_hermes) "
               "VALUES ('fetch', 'fetch', '{\"command\":\"uvx\"}', NULL, NULL, NULL, '[]', 1, 0, 0, 1, 0, 0)")
    assert db.execute("SELECT id, name, server_config, description, homepage, docs, tags, enabled_claude, "
                      "enabled_codex, enabled_gemini, enabled_grokbuild, enabled_opencode, enabled_hermes "
                      "FROM mcp_servers ORDER BY name, id").fetchall()[0][10] == 1
    db.execute("INSERT INTO skills (id, name, description, directory, repo_owner, repo_name, repo_branch, "
               "readme_url, enabled_claude, enabled_codex, enabled_gemini, enabled_grokbuild, enabled_opencode, "
               "enabled_hermes, installed_at, content_hash, updated_at) "
               "VALUES ('o/r:s', '技能', NULL, 's', 'o', 'r', 'main', NULL, 1, 0, 0, 0, 0, 0, 1, 'h', 1)")
    assert db.execute("SELECT id, name, directory, enabled_claude, content_hash, updated_at FROM skills "
                      "ORDER BY name").fetchall() == [("o/r:s", "技能", "s", 1, "h", 1)]
    db.execute("INSERT INTO prompts (id, app_type, name, content) VALUES ('p', 'claude', 'p', 'x')")
    db.execute("INSERT INTO skill_repos (owner, name) VALUES ('o', 'r')")
    db.execute("DELETE FROM providers WHERE id = ?", (rows[0][0],))     # its endpoints go with it
    assert db.execute("SELECT COUNT(*) FROM provider_endpoints").fetchone()[0] == 3


def test_newer_ccswitch_versions_migrate_up_from_the_file(config_path, tmp_path):
    """3.20.1+ (schema 18), 3.20.4 (19) and later run their migrations from 17: 17->18 touches
    only a table they create themselves, 18->19 and 19->20 add one flag column each."""
    out = tmp_path / "cc-switch.sql"
    assert run_tool("ccp2ccswitch.py", "--input", config_path, "--output", str(out)).returncode == 0
    db = replay_ccswitch_import(out.read_text(encoding="utf-8"))
    for table in ("mcp_servers", "skills"):
        db.execute("ALTER TABLE %s ADD COLUMN enabled_mcode BOOLEAN NOT NULL DEFAULT 0" % table)
    db.execute("ALTER TABLE mcp_servers ADD COLUMN enabled_pi BOOLEAN NOT NULL DEFAULT 0")
    db.execute("PRAGMA user_version = 20")
    assert db.execute("SELECT id, enabled_grokbuild, enabled_opencode, enabled_hermes, enabled_mcode, enabled_pi "
                      "FROM mcp_servers").fetchall() == []
    assert db.execute("SELECT id, directory, enabled_hermes, enabled_mcode, content_hash, updated_at "
                      "FROM skills").fetchall() == []


X_API_KEY_CONFIG = {"APIKEY": "sk-ccproxy-tools-0123456789", "Providers": [
    {"name": "官方直连", "api_base_url": "https://api.anthropic.com/v1/messages", "api_key": "sk-ant-real-1",
     "auth": "x-api-key"},
    {"name": "relay-both", "api_base_url": "https://relay.example/claude", "api_key": "sk-relay-2", "auth": "both"},
    {"name": "relay-bearer", "api_base_url": "https://relay2.example", "api_key": "sk-relay-3"}]}


def test_an_x_api_key_provider_keeps_its_style_in_every_target(tmp_path, yaml):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(X_API_KEY_CONFIG, ensure_ascii=False), encoding="utf-8")
    sql = tmp_path / "cc-switch.sql"
    result = run_tool("ccp2ccswitch.py", "--input", str(config), "--output", str(sql))
    assert result.returncode == 0, result.stderr
    db = replay_ccswitch_import(sql.read_text(encoding="utf-8"))
    rows = {name: (json.loads(settings)["env"], json.loads(meta)) for name, settings, meta in
            db.execute("SELECT name, settings_config, meta FROM providers")}
    env, meta = rows["官方直连"]
    assert meta == {"apiKeyField": "ANTHROPIC_API_KEY"} and env["ANTHROPIC_API_KEY"] == "sk-ant-real-1"
    assert "ANTHROPIC_AUTH_TOKEN" not in env
    for name in ("relay-both", "relay-bearer"):
        assert rows[name][1] == {} and "ANTHROPIC_AUTH_TOKEN" in rows[name][0]
    # the link format cannot carry it: said on the console, for that provider only
    assert "link of 官方直连 cannot say that it wants its key as x-api-key" in result.stdout
    assert "link of relay-both" not in result.stdout
    # CLIProxyAPI sends Bearer to any host but api.anthropic.com: the entry's headers carry x-api-key
    out = tmp_path / "cliproxy.yaml"
    assert run_tool("ccp2cliproxy.py", "--input", str(config), "--output", str(out)).returncode == 0
    entries = {e["base-url"]: e for e in yaml.safe_load(out.read_text(encoding="utf-8"))["claude-api-key"]}
    assert entries["https://api.anthropic.com"]["headers"] == {"x-api-key": "sk-ant-real-1"}
    assert entries["https://relay.example/claude"]["headers"] == {"x-api-key": "sk-relay-2"}
    assert "headers" not in entries["https://relay2.example"]


@pytest.mark.parametrize("tool, version", [("ccp2ccswitch.py", "CC Switch v3.20.0"),
                                           ("ccp2cliproxy.py", "CLIProxyAPI v7.2.140")])
def test_help_names_the_target_version_it_was_checked_against(tool, version):
    result = run_tool(tool, "--help")
    assert result.returncode == 0 and version in result.stdout
    with open(os.path.join(ROOT, "tools", "README.md"), encoding="utf-8") as f:
        assert version in f.read()


def test_ccswitch_sql_imports_cleanly(config_path, tmp_path, fields):
    out, links = tmp_path / "cc-switch.sql", tmp_path / "links.txt"
    result = run_tool("ccp2ccswitch.py", "--input", config_path, "--output", str(out), "--links", str(links))
    assert result.returncode == 0, result.stderr
    assert "REPLACES its whole database" in result.stdout
    db = replay_ccswitch_import(out.read_text(encoding="utf-8"))
    rows = db.execute("SELECT id, app_type, name, settings_config, category, sort_index, created_at, meta, "
                      "is_current, notes FROM providers ORDER BY sort_index").fetchall()
    assert [r[2] for r in rows] == ["alpha", NASTY_NAME, "a.b", "a_b"]
    ids = [r[0] for r in rows]
    assert all(ids) and len(set(ids)) == 4 and all(i.startswith("ccp-") for i in ids)
    assert [r[5] for r in rows] == [0, 1, 2, 3] and sum(r[8] for r in rows) == 1 and rows[0][8] == 1
    assert all(r[1] == "claude" and r[4] == "custom" and r[7] == "{}" and r[6] > 0 for r in rows)   # all Bearer
    env = json.loads(rows[1][3])["env"]
    assert env == {"ANTHROPIC_BASE_URL": fields["two"] + "/anthropic", "ANTHROPIC_AUTH_TOKEN": NASTY_KEY,
                   "ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air", "ANTHROPIC_MODEL": "glm-4.6"}
    assert rows[1][9] == "prefix kept"
    endpoints = db.execute("SELECT provider_id, url FROM provider_endpoints").fetchall()
    assert len(endpoints) == 4 and {e[0] for e in endpoints} == set(ids)
    link = links.read_text(encoding="utf-8").splitlines()[1]
    assert link.startswith("ccswitch://v1/import?")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link).query))
    assert query["name"] == NASTY_NAME and query["apiKey"] == NASTY_KEY and query["app"] == "claude"
    assert query["endpoint"] == fields["two"] + "/anthropic" and query["haikuModel"] == "glm-4.5-air"


def test_ccswitch_current_and_errors(config_path, tmp_path):
    out = tmp_path / "cc.sql"
    assert run_tool("ccp2ccswitch.py", "--input", config_path, "--output", str(out),
                    "--current", "a_b").returncode == 0
    db = replay_ccswitch_import(out.read_text(encoding="utf-8"))
    assert db.execute("SELECT name FROM providers WHERE is_current=1").fetchall() == [("a_b",)]
    out.unlink()
    result = run_tool("ccp2ccswitch.py", "--input", config_path, "--output", str(out), "--current", "nope")
    assert result.returncode == 2 and "names no exportable provider" in result.stderr and not out.exists()


def test_export_cc_settings_file(config_path, tmp_path, fields):
    out = tmp_path / "settings.json"
    result = run_tool("ccp2ccswitch.py", "--input", config_path, "--export-cc", "--provider", NASTY_NAME,
                      "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == {"env": {
        "ANTHROPIC_BASE_URL": fields["two"] + "/anthropic", "ANTHROPIC_AUTH_TOKEN": NASTY_KEY,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air", "ANTHROPIC_MODEL": "glm-4.6"}}
    result = run_tool("ccp2ccswitch.py", "--input", config_path, "--export-cc", "--current", "alpha", cwd=str(tmp_path))
    written = [n for n in os.listdir(tmp_path) if n.startswith("claude-settings-alpha")]
    assert result.returncode == 0 and len(written) == 1
    env = json.loads((tmp_path / written[0]).read_text())["env"]
    assert env == {"ANTHROPIC_BASE_URL": fields["one"], "ANTHROPIC_AUTH_TOKEN": "sk-alpha-1"}   # nothing empty


def test_provider_ids_are_unique_and_never_empty():
    names = ["a.b", "a_b", "a b", "中转", "中转站", "", "--"]
    ids = [ccp2ccswitch.provider_id("", n) for n in names]
    assert all(ids) and len(set(ids)) == len(ids)
    assert ccp2ccswitch.provider_id("", "a.b") == ccp2ccswitch.provider_id("", "a.b")   # stable


# -- ccp2cliproxy.py

CLIPROXY_TOP = {"host", "port", "api-keys", "claude-api-key"}
CLIPROXY_ENTRY = {"api-key", "base-url", "models", "proxy-url", "headers", "prefix", "priority"}


def test_cliproxy_yaml_parses_and_round_trips(config_path, tmp_path, fields, yaml):
    out = tmp_path / "cliproxy.yaml"
    result = run_tool("ccp2cliproxy.py", "--input", config_path, "--output", str(out))
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert set(data) == CLIPROXY_TOP
    assert data["host"] == "127.0.0.1" and data["port"] == 8317
    assert data["api-keys"] == ["sk-ccproxy-tools-0123456789"]
    entries = data["claude-api-key"]
    assert len(entries) == 4
    for entry in entries:
        assert set(entry) <= CLIPROXY_ENTRY
        assert not entry["base-url"].endswith("/") and "/v1" not in entry["base-url"]
        for model in entry.get("models", []):
            assert set(model) == {"name", "alias"}
    nasty = entries[1]
    assert nasty["api-key"] == NASTY_KEY and nasty["base-url"] == fields["two"] + "/anthropic"
    assert entries[0]["models"] == [{"name": "claude-old", "alias": "claude-old"}]


def test_wrappers_run_from_any_directory(config_path, tmp_path, yaml):
    result = subprocess.run(["bash", os.path.join(ROOT, "tools", "ccp2cliproxy.sh"), "--output", "x.yaml"],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                            env=dict(os.environ, CONFIG=config_path))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "x.yaml").read_text(encoding="utf-8"))["port"] == 8317


@pytest.mark.parametrize("before, after", [
    ('{"Providers": [{"name": "a", "models": []}]}', '{"Providers": [{"name": "a", "models": ["x", "y"]}]}'),
    ('{"Providers": [{"name": "a"}]}', '{"Providers": [{"name": "a", "models": ["x", "y"]}]}'),
    ('{\n  "Providers": [\n    {\n      "name": "a",\n      "models": []\n    }\n  ]\n}',
     '{\n  "Providers": [\n    {\n      "name": "a",\n      "models": [\n        "x",\n        "y"\n      ]\n    }\n  ]\n}'),
    ('{\n\t"Providers": [{"name": "a", "models": ["old"], "k": {"models": 1}}]\n}',
     '{\n\t"Providers": [{"name": "a", "models": ["x", "y"], "k": {"models": 1}}]\n}'),
    ('{"_c": "models: []", "Providers": [{"name": "a \\"models\\"", "models": [\n "o"\n]}]}',
     '{"_c": "models: []", "Providers": [{"name": "a \\"models\\"", "models": [\n "x",\n "y"\n]}]}'),
])
def test_replace_models_touches_nothing_else(before, after):
    assert ccp_update_model.replace_models(before, {0: ["x", "y"]}) == after
    assert json.loads(after)["Providers"][0]["models"] == ["x", "y"]
