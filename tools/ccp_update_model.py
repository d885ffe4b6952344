#!/usr/bin/env python3
"""Refresh every provider's `models` in a ccproxy config from its /v1/models.

Fetches all providers concurrently (pagination, both list shapes, both auth headers, via
ccproxy.py's own discovery), keeps ids matching --filter, and rewrites only the `models`
values: key order, comments, unknown keys, UTF-8 and indentation stay byte for byte. The
write is atomic (mode 0600) and the previous file is kept as FILE.bak-<time>, as the web
page keeps it. A provider that fails keeps its list. Exit 0 when at least one provider was updated, 1 when none was, 2 for a bad config.
"""

import argparse
import json
import re
import sys

from ccp_common import add_discovery, add_input, ccproxy, fail, with_key

WS = re.compile(r"[ \t\r\n]*")
SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null")


class Node:
    """A JSON value's place in the text: kind, [start, end), and members or items."""

    __slots__ = ("kind", "start", "end", "members", "items")

    def __init__(self, kind, start):
        self.kind, self.start, self.end = kind, start, start
        self.members, self.items = [], []

    def get(self, key):
        for name, key_start, value in self.members:
            if name == key:
                return value
        return None


def parse(text, pos=0):
    """Parse the JSON value at pos (the text is known to be valid JSON); return its Node."""
    pos = WS.match(text, pos).end()
    ch = text[pos]
    if ch == '"':
        node = Node("string", pos)
        node.end = json.decoder.scanstring(text, pos + 1)[1]
        return node
    if ch not in "{[":
        node = Node("scalar", pos)
        node.end = SCALAR.match(text, pos).end()
        return node
    node = Node("object" if ch == "{" else "array", pos)
    close = "}" if ch == "{" else "]"
    pos = WS.match(text, pos + 1).end()
    while text[pos] != close:
        if node.kind == "object":
            key, after = json.decoder.scanstring(text, pos + 1)
            colon = WS.match(text, after).end()
            value = parse(text, colon + 1)
            node.members.append((key, pos, value))
        else:
            value = parse(text, pos)
            node.items.append(value)
        pos = WS.match(text, value.end).end()
        if text[pos] == ",":
            pos = WS.match(text, pos + 1).end()
    node.end = pos + 1
    return node


def line_indent(text, pos):
    start = text.rfind("\n", 0, pos) + 1
    return text[start:pos][:len(text[start:pos]) - len(text[start:pos].lstrip())]


def indent_unit(text, root):
    """The file's indentation step, from its first top-level member (two spaces if none)."""
    if root.members:
        unit = line_indent(text, root.members[0][1])
        if unit:
            return unit
    return "  "


def render_list(ids, inner=None, outer=""):
    """A JSON list on one line, or one item a line at `inner` with `]` at `outer`."""
    items = [json.dumps(i, ensure_ascii=False) for i in ids]
    if inner is None or not items:
        return "[" + ", ".join(items) + "]"
    return "[\n" + ",\n".join(inner + i for i in items) + "\n" + outer + "]"


def replace_models(text, updates):
    """Return text with Providers[i].models replaced by updates[i], nothing else touched."""
    root = parse(text)
    unit = indent_unit(text, root)
    providers = root.get("Providers")
    edits = []
    for index, ids in updates.items():
        entry = providers.items[index]
        models = entry.get("models")
        if models is not None:
            key_start = next(k for name, k, v in entry.members if v is models)
            inner = outer = None
            if models.items and "\n" in text[models.start:models.end]:
                # keep the list's own layout
                inner = line_indent(text, models.items[0].start)
                outer = line_indent(text, models.end - 1)
            elif not models.items and "\n" in text[entry.start:entry.end]:
                # an empty list in a multi-line object: one model a line, one step deeper
                outer = line_indent(text, key_start)
                inner = outer + unit
            edits.append((models.start, models.end, render_list(ids, inner, outer)))
        else:
            last_key, last_value = entry.members[-1][1], entry.members[-1][2]
            outer = line_indent(text, last_key)
            if "\n" in text[entry.start:entry.end]:
                added = ",\n" + outer + '"models": ' + render_list(ids, outer + unit, outer)
            else:
                added = ', "models": ' + render_list(ids)
            edits.append((last_value.end, last_value.end, added))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ccp_update_model.py", description=__doc__.split("\n\n")[0])
    add_input(parser)
    parser.add_argument("--output", help="where to write (default: the input file, the previous one kept as FILE.bak-<time>)")
    add_discovery(parser)
    parser.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        text, raw = ccproxy.read_config(args.input)
        config = ccproxy.validate_config(raw, args.input)
    except ccproxy.ConfigError as exc:
        return fail("\n".join(exc.problems))
    if config.store:
        return fail("%s: STORE is set, so the providers are in the database, not this file — refresh their models "
                    "with the web page's Refresh models (kept there for every host)" % args.input)
    positions = {}
    for index, entry in enumerate(raw.get("Providers", [])):
        positions[entry.get("name")] = index
    providers = with_key(config.providers)
    results = ccproxy.discover_all(providers, args.timeout)
    updates, ok_times = {}, {}
    for number, provider in enumerate(providers, 1):
        models, result = results[provider.name]
        seconds = result["ms"] / 1000.0
        prefix = "[%d/%d]" % (number, len(providers))
        if models is None:
            print("%s FAIL %s: %s (%.1f s) — kept its %d models"
                  % (prefix, provider.name, result["message"], seconds, len(provider.models)))
            continue
        kept = ccproxy.filter_models(models, args.filter)
        if not kept:
            print("%s SKIP %s: %d models, none matches --filter %r — kept its list"
                  % (prefix, provider.name, len(models), args.filter))
            continue
        updates[positions[provider.name]] = kept
        ok_times[provider.name] = seconds
        change = "" if list(provider.models) != kept else ", unchanged"
        print("%s OK %s: %d models (%.1f s%s)" % (prefix, provider.name, len(kept), seconds, change))
    if ok_times:
        fastest = min(ok_times, key=ok_times.get)
        print("fastest: %s (%.1f s)" % (fastest, ok_times[fastest]))
    print("updated %d of %d providers" % (len(updates), len(providers)))
    if not updates:
        return 1
    new_text = replace_models(text, updates)
    output = args.output or args.input
    if args.dry_run:
        print("dry run: %s not written" % output)
        return 0
    if new_text == text and output == args.input:
        print("%s already up to date" % output)
        return 0
    try:
        if output == args.input:
            ccproxy.backup_config(args.input, text.encode("utf-8"))
        ccproxy.write_atomic(output, new_text)
    except OSError as exc:
        return fail("%s: cannot be written (%s)" % (output, exc.strerror or exc))
    print("wrote %s%s" % (output, " (previous version: %s.bak-<time>)" % args.input if output == args.input else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
