#!/usr/bin/env python3
"""Write a claude-code-router config (cc-router.json) from a ccproxy config.

Only ccr's own keys; a port other than ccproxy's; providers with models only, each with
`transformer: {"use": ["Anthropic"]}` (v2 passes Anthropic Messages through) and
`protocol: "anthropic_messages"` (v3's key; v2 ignores it); a Router.default that routes.
"""

import argparse
import json
import sys

from ccp_common import (add_discovery, add_input, ccproxy, current_name, default_model, exportable,
                        fail, load)

CCR_PORT = 3456          # ccr's own default, which is also ccproxy's
V3_CAVEAT = ("note: claude-code-router v3 keeps its config in a database and reads config.json "
             "only once, on a fresh install; for v3, import this file before its first start.")


def ccr_config(config, targets, models, current):
    """The ccr config object for these targets (with `models[name]` each); `current` becomes
    Router.default."""
    providers = []
    for target in targets:
        providers.append({
            "name": target.name.replace(",", " "),          # ccr splits "provider,model" on commas
            "api_base_url": target.provider.base_url + "/v1/messages",   # v2 posts to it as given
            "api_key": target.provider.api_key,
            "models": models[target.name],
            "transformer": {"use": ["Anthropic"]},
            "protocol": "anthropic_messages",
        })
    by_name = {t.name: t for t in targets}
    router = {}
    if current is not None:
        target = by_name[current]
        router["default"] = "%s,%s" % (target.name.replace(",", " "), default_model(target, models[current]))
        haiku = target.env_models.get("ANTHROPIC_DEFAULT_HAIKU_MODEL")
        if haiku in models[current]:
            router["background"] = "%s,%s" % (target.name.replace(",", " "), haiku)
    port = config.port + 1 if config.port == CCR_PORT else CCR_PORT
    return {"HOST": "127.0.0.1", "PORT": port, "APIKEY": config.apikey, "LOG": False,
            "API_TIMEOUT_MS": int(config.api_timeout_s * 1000), "Providers": providers, "Router": router}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ccp2ccr.py", description=__doc__.split("\n\n")[0])
    add_input(parser)
    parser.add_argument("--output", default="cc-router.json", help="file to write (default: cc-router.json)")
    parser.add_argument("--update-models", action="store_true",
                        help="ask every provider's /v1/models first and export what it lists")
    add_discovery(parser)
    parser.add_argument("--current", help="provider for Router.default (default: the one selected in ccproxy)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config, store = load(args.input)
        targets = exportable(store)
        models = {t.name: list(t.models) for t in targets}
        if args.update_models:
            found = ccproxy.discover_all([t.provider for t in targets], args.timeout)
            for target in targets:
                ids, result = found[target.name]
                if ids:
                    models[target.name] = ids
                else:
                    print("warning: %s: %s — its configured models are used" % (target.name, result["message"]),
                          file=sys.stderr)
        models = {name: ccproxy.filter_models(ids, args.filter) for name, ids in models.items()}
        with_models = [t for t in targets if models[t.name]]
        for target in targets:
            if not models[target.name]:
                print("warning: skipped %s: it has no models (ccr needs at least one)" % target.name,
                      file=sys.stderr)
        if not with_models:
            return fail("no provider with a key and models to export — run with --update-models")
        current = current_name(store, with_models, args.current)
        data = ccr_config(config, with_models, models, current)
        ccproxy.write_atomic(args.output, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    except ccproxy.ConfigError as exc:
        return fail("\n".join(exc.problems))
    except OSError as exc:
        return fail("%s: cannot be written (%s)" % (args.output, exc.strerror or exc))
    print("wrote %s: %d providers, Router.default = %s, port %d"
          % (args.output, len(with_models), data["Router"]["default"], data["PORT"]))
    print("use: cp %s ~/.claude-code-router/config.json && ccr start" % args.output)
    print(V3_CAVEAT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
