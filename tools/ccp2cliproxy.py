#!/usr/bin/env python3
"""Write a CLIProxyAPI config (cliproxy.yaml) from a ccproxy config.

A complete file: host, port, api-keys (clients must send ccproxy's APIKEY), and one
`claude-api-key` entry per provider with its base URL (prefix kept, no /v1), models and
proxy. Every string is written as a JSON-style double-quoted scalar, which YAML reads as the
same string, so any key or name round-trips.

Checked against CLIProxyAPI v7.2.140. It sends a claude-api-key as x-api-key only to
api.anthropic.com and as Authorization: Bearer to every other base URL; a provider whose auth
is x-api-key (or both) gets the key in its entry's headers too, which CLIProxyAPI adds to
every request of that entry.
"""

import argparse
import json
import sys

from ccp_common import add_input, ccproxy, exportable, fail, load

CLIPROXY_PORT = 8317
CHECKED_WITH = "CLIProxyAPI v7.2.140"


def q(value):
    """A YAML double-quoted scalar: JSON's escaping is valid YAML (YAML 1.2 is a JSON superset)."""
    return json.dumps(value, ensure_ascii=False)


def cliproxy_yaml(config, targets):
    lines = ["# CLIProxyAPI config written by ccproxy tools/ccp2cliproxy.py",
             "host: %s" % q("127.0.0.1"),
             "port: %d" % CLIPROXY_PORT]
    lines += ["api-keys:", "  - %s" % q(config.apikey)] if config.apikey else ["api-keys: []"]
    lines.append("claude-api-key:")
    if not targets:
        lines[-1] += " []"
    for target in targets:
        provider = target.provider
        lines.append("  - api-key: %s" % q(provider.api_key))
        lines.append("    base-url: %s" % q(provider.base_url))
        if target.proxy:
            lines.append("    proxy-url: %s" % q(target.proxy))
        if provider.auth in ("x-api-key", "both"):
            lines.append("    headers:")
            lines.append("      x-api-key: %s" % q(provider.api_key))
        if target.models:
            lines.append("    models:")
            for model in target.models:
                lines.append("      - name: %s" % q(model))
                lines.append("        alias: %s" % q(model))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ccp2cliproxy.py", description=__doc__.split("\n\n")[0],
                                     epilog="Checked against %s." % CHECKED_WITH)
    add_input(parser)
    parser.add_argument("--output", default="cliproxy.yaml", help="file to write (default: cliproxy.yaml)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config, store = load(args.input)
        if not config.apikey:
            print("warning: APIKEY is empty: the file's api-keys list is empty too, so CLIProxyAPI "
                  "would accept any client", file=sys.stderr)
        targets = exportable(store)
        ccproxy.write_atomic(args.output, cliproxy_yaml(config, targets))
    except ccproxy.ConfigError as exc:
        return fail("\n".join(exc.problems))
    except OSError as exc:
        return fail("%s: cannot be written (%s)" % (args.output, exc.strerror or exc))
    print("wrote %s: %d providers under claude-api-key, listening on 127.0.0.1:%d"
          % (args.output, len(targets), CLIPROXY_PORT))
    print("use: cli-proxy-api --config %s   (clients send ccproxy's APIKEY)" % args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
