#!/usr/bin/env python3
"""Write a CC Switch SQL import file (cc-switch.sql), import links, or a Claude Code settings file.

CC Switch's SQL import REPLACES its whole database (every app's providers, MCP servers,
prompts, skills). The non-destructive way is one ccswitch:// link per provider, which this
tool prints (or writes with --links). --export-cc writes a standalone Claude Code settings
file for one provider instead.

Checked against CC Switch v3.20.0, whose database schema is version 17: the file declares
that version and writes every table as it defines it, so 3.20.0 reads it as it is and newer
versions migrate up from it; 3.19 and older refuse it.
"""

import argparse
import hashlib
import json
import re
import sys
import time
import urllib.parse

from ccp_common import add_input, ccproxy, current_name, exportable, fail, load

HEADER = "-- CC Switch SQLite 导出"
CHECKED_WITH = "CC Switch v3.20.0 (database schema 17)"
# The seven tables a CC Switch import requires, as schema version 17 has them: the columns of
# CC Switch's CREATE TABLE statements plus those its migrations up to 17 add (providers: cost
# and limit columns, provider_type; MCP servers and skills: one enabled_* flag per app; skills:
# content_hash and updated_at). user_version=17 tells CC Switch that no migration up to 17 is
# needed, so a table in an older layout would stay broken (no such column: …).
SCHEMA_VERSION = 17
SCHEMA = """\
CREATE TABLE providers (id TEXT NOT NULL, app_type TEXT NOT NULL, name TEXT NOT NULL,
  settings_config TEXT NOT NULL, website_url TEXT, category TEXT, created_at INTEGER,
  sort_index INTEGER, notes TEXT, icon TEXT, icon_color TEXT, meta TEXT NOT NULL DEFAULT '{}',
  is_current BOOLEAN NOT NULL DEFAULT 0, in_failover_queue BOOLEAN NOT NULL DEFAULT 0,
  cost_multiplier TEXT NOT NULL DEFAULT '1.0', limit_daily_usd TEXT, limit_monthly_usd TEXT,
  provider_type TEXT, PRIMARY KEY (id, app_type));
CREATE TABLE provider_endpoints (id INTEGER PRIMARY KEY AUTOINCREMENT, provider_id TEXT NOT NULL,
  app_type TEXT NOT NULL, url TEXT NOT NULL, added_at INTEGER,
  FOREIGN KEY (provider_id, app_type) REFERENCES providers(id, app_type) ON DELETE CASCADE);
CREATE TABLE mcp_servers (id TEXT PRIMARY KEY, name TEXT NOT NULL, server_config TEXT NOT NULL,
  description TEXT, homepage TEXT, docs TEXT, tags TEXT NOT NULL DEFAULT '[]',
  enabled_claude BOOLEAN NOT NULL DEFAULT 0, enabled_codex BOOLEAN NOT NULL DEFAULT 0,
  enabled_gemini BOOLEAN NOT NULL DEFAULT 0, enabled_grokbuild BOOLEAN NOT NULL DEFAULT 0,
  enabled_opencode BOOLEAN NOT NULL DEFAULT 0, enabled_hermes BOOLEAN NOT NULL DEFAULT 0);
CREATE TABLE prompts (id TEXT NOT NULL, app_type TEXT NOT NULL, name TEXT NOT NULL,
  content TEXT NOT NULL, description TEXT, enabled BOOLEAN NOT NULL DEFAULT 1,
  created_at INTEGER, updated_at INTEGER, PRIMARY KEY (id, app_type));
CREATE TABLE skills (id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT,
  directory TEXT NOT NULL, repo_owner TEXT, repo_name TEXT, repo_branch TEXT DEFAULT 'main',
  readme_url TEXT, enabled_claude BOOLEAN NOT NULL DEFAULT 0, enabled_codex BOOLEAN NOT NULL DEFAULT 0,
  enabled_gemini BOOLEAN NOT NULL DEFAULT 0, enabled_grokbuild BOOLEAN NOT NULL DEFAULT 0,
  enabled_opencode BOOLEAN NOT NULL DEFAULT 0, enabled_hermes BOOLEAN NOT NULL DEFAULT 0,
  installed_at INTEGER NOT NULL DEFAULT 0, content_hash TEXT, updated_at INTEGER NOT NULL DEFAULT 0);
CREATE TABLE skill_repos (owner TEXT NOT NULL, name TEXT NOT NULL, branch TEXT NOT NULL DEFAULT 'main',
  enabled BOOLEAN NOT NULL DEFAULT 1, PRIMARY KEY (owner, name));
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);
"""
TABLES = ("providers", "provider_endpoints", "mcp_servers", "prompts", "skills", "skill_repos", "settings")
WARNING = ("WARNING: importing %s in CC Switch (Settings → SQL Import/Export) REPLACES its whole "
           "database: every app's providers, MCP servers, prompts and skills. Export a backup "
           "from CC Switch first, or add providers one at a time with the ccswitch:// links.")


def provider_id(prefix, name):
    """A unique, non-empty, stable id: readable ASCII plus a hash of the exact name, so
    `a.b` and `a_b` differ and a Chinese name still gets one."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return "%s%s-%s" % (prefix, slug or "provider", digest)


def sql_str(value):
    return "NULL" if value is None else "'" + str(value).replace("'", "''") + "'"


def settings_for(target):
    return ccproxy.claude_settings(target.provider.base_url, target.provider.api_key,
                                   target.env_models, target.provider.auth)


def provider_meta(target):
    """CC Switch's provider metadata: which env variable holds the key. Its local proxy sends
    ANTHROPIC_API_KEY as x-api-key and anything else as Authorization: Bearer."""
    if target.provider.auth == "x-api-key":
        return {"apiKeyField": "ANTHROPIC_API_KEY"}
    return {}


def homepage(base_url):
    parts = urllib.parse.urlsplit(base_url)
    return "%s://%s" % (parts.scheme, parts.netloc.rsplit("@", 1)[-1])


def ccswitch_sql(targets, current, prefix, now_ms):
    out = [HEADER, "-- written by ccproxy tools/ccp2ccswitch.py", "PRAGMA foreign_keys=OFF;",
           "BEGIN TRANSACTION;", SCHEMA.rstrip()]
    for index, target in enumerate(targets):
        pid = provider_id(prefix, target.name)
        settings = json.dumps(settings_for(target), ensure_ascii=False)
        values = [pid, "claude", target.name, settings, homepage(target.provider.base_url), "custom",
                  now_ms + index, index, target.provider.comment or None, None, None,
                  json.dumps(provider_meta(target)),
                  1 if target.name == current else 0, 0]
        out.append("INSERT INTO providers (id, app_type, name, settings_config, website_url, category, "
                   "created_at, sort_index, notes, icon, icon_color, meta, is_current, in_failover_queue) "
                   "VALUES (%s);" % ", ".join(str(v) if isinstance(v, int) else sql_str(v) for v in values))
        out.append("INSERT INTO provider_endpoints (provider_id, app_type, url, added_at) VALUES (%s, 'claude', %s, %d);"
                   % (sql_str(pid), sql_str(target.provider.base_url), now_ms + index))
    out += ["COMMIT;", "PRAGMA user_version=%d;" % SCHEMA_VERSION, "PRAGMA foreign_keys=ON;"]
    return "\n".join(out) + "\n"


def import_link(target):
    env = settings_for(target)["env"]
    params = [("resource", "provider"), ("app", "claude"), ("name", target.name),
              ("endpoint", target.provider.base_url),
              ("apiKey", target.provider.api_key), ("homepage", homepage(target.provider.base_url)),
              ("model", env.get("ANTHROPIC_MODEL")),
              ("haikuModel", env.get("ANTHROPIC_DEFAULT_HAIKU_MODEL")),
              ("sonnetModel", env.get("ANTHROPIC_DEFAULT_SONNET_MODEL")),
              ("opusModel", env.get("ANTHROPIC_DEFAULT_OPUS_MODEL")),
              ("notes", target.provider.comment)]
    return "ccswitch://v1/import?" + urllib.parse.urlencode([(k, v) for k, v in params if v],
                                                            quote_via=urllib.parse.quote)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ccp2ccswitch.py", description=__doc__.split("\n\n")[0],
                                     epilog="Checked against %s: 3.20.0 and newer import the file; "
                                            "3.19 and older refuse its schema version." % CHECKED_WITH)
    add_input(parser)
    parser.add_argument("--output", help="file to write (default: cc-switch.sql, or with --export-cc "
                                         "claude-settings-NAME.json)")
    parser.add_argument("--prefix", default="ccp-", help='prefix of the provider ids (default "ccp-")')
    parser.add_argument("--current", metavar="NAME",
                        help="provider marked current (default: the one selected in ccproxy); "
                             "with --export-cc, the provider to export")
    parser.add_argument("--links", metavar="FILE", help="also write the ccswitch:// import links to FILE")
    parser.add_argument("--export-cc", action="store_true",
                        help="write a Claude Code settings file for one provider instead of SQL")
    parser.add_argument("--provider", metavar="NAME", help="the provider for --export-cc")
    return parser.parse_args(argv)


def export_cc(args, store, targets):
    name = current_name(store, targets, args.provider or args.current)
    target = next(t for t in targets if t.name == name)
    output = args.output or "claude-settings-%s.json" % provider_id("", name)
    ccproxy.write_atomic(output, json.dumps(settings_for(target), ensure_ascii=False, indent=2) + "\n")
    print("wrote %s for %s" % (output, name))
    print("use: claude --settings %s   (or merge its env block into ~/.claude/settings.json)" % output)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        config, store = load(args.input)
        targets = exportable(store)
        if not targets:
            return fail("no provider with a URL and a key to export")
        if args.export_cc:
            return export_cc(args, store, targets)
        current = current_name(store, targets, args.current)
        output = args.output or "cc-switch.sql"
        ccproxy.write_atomic(output, ccswitch_sql(targets, current, args.prefix, int(time.time() * 1000)))
        links = [import_link(t) for t in targets]
        if args.links:
            ccproxy.write_atomic(args.links, "\n".join(links) + "\n")
    except ccproxy.ConfigError as exc:
        return fail("\n".join(exc.problems))
    except OSError as exc:
        return fail("cannot write: %s" % (exc.strerror or exc))
    print("wrote %s: %d Claude providers, current: %s" % (output, len(targets), current))
    print(WARNING % output)
    for target in targets:
        if target.provider.auth == "x-api-key":
            print("note: the ccswitch:// link of %s cannot say that it wants its key as x-api-key, so "
                  "CC Switch would send it as Bearer; after opening the link, set the provider's key "
                  "field to ANTHROPIC_API_KEY in CC Switch (the SQL file already does)" % target.name)
    if args.links:
        print("wrote %d ccswitch:// links to %s (open each one to add that provider alone)" % (len(links), args.links))
    else:
        print("Non-destructive alternative, one provider at a time (open in a browser / run `xdg-open LINK`):")
        for link in links:
            print("  " + link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
