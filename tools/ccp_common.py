"""What the tools in this folder share: reading the config through ccproxy.py's own code,
choosing the providers to export, and the common flags. Standard library only."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ccproxy  # noqa: E402

DEFAULT_INPUT = "config.json"


def add_input(parser):
    parser.add_argument("--input", default=DEFAULT_INPUT, help="ccproxy config file (default: config.json)")


def add_discovery(parser):
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds allowed for each provider's /v1/models (default 30)")
    parser.add_argument("--filter", default="",
                        help='keep only model ids containing any of these comma-separated keywords, e.g. "4-5,sonnet"')


def fail(message):
    print(message, file=sys.stderr)
    return 2


def load(path):
    """(config, store) through ccproxy's own loading and validation; ConfigError if unusable.
    With STORE, the config and state the hosts share, read from the database (or, while it is
    away, from the host's copy of them).

    The store is built read-only: nothing is written unless a tool asks for it.
    """
    config = ccproxy.load_config(path)
    if not config.store:
        return config, ccproxy.Store(config)
    docs = ccproxy.SharedDocuments(path, ccproxy.Postgres(config.store))
    docs.open()
    config = docs.load_config()
    store = ccproxy.Store(config, docs)
    docs.close()
    return config, store


def with_key(providers, warn=None):
    """The providers a tool can use, in config order: those with a URL and a key.

    Separators (no URL) are left out quietly; a provider without a key is reported.
    """
    warn = warn or (lambda text: print(text, file=sys.stderr))
    kept = []
    for provider in providers:
        if not provider.usable:
            continue
        if not provider.api_key:
            warn("warning: skipped %s: it has no api_key" % provider.name)
            continue
        kept.append(provider)
    return kept


def exportable(store):
    """The targets (provider + effective models and env-models) a converter can write."""
    return [store.view.targets[p.name] for p in with_key(store.view.config.providers)]


def current_name(store, targets, wanted=None):
    """The provider to mark current: --current if given (an error if unknown), else the one
    selected in ccproxy's web UI, else the first."""
    names = [t.name for t in targets]
    if wanted is not None:
        if wanted not in names:
            raise ccproxy.ConfigError(["--current %r names no exportable provider; choose one of: %s"
                                       % (wanted, ", ".join(names))])
        return wanted
    selected = store.view.selected
    return selected if selected in names else (names[0] if names else None)


def default_model(target, models):
    """The model a router should default to: ANTHROPIC_MODEL if it is among models, else the first."""
    wanted = target.env_models.get("ANTHROPIC_MODEL")
    return wanted if wanted in models else (models[0] if models else None)
