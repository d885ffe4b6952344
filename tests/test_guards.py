"""Guards for the promises: stdlib only, documented flags and keys, no CDN, the file's map."""

import ast
import glob
import os
import re
import sys

import pytest

import ccproxy
from conftest import ROOT

RUNTIME = [os.path.join(ROOT, "ccproxy.py")] + sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))
LOCAL = {os.path.splitext(os.path.basename(p))[0] for p in RUNTIME}


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("path", RUNTIME, ids=os.path.basename)
def test_runtime_imports_only_the_standard_library(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            assert root in sys.stdlib_module_names or root in LOCAL, "%s imports %s" % (path, name)


def test_every_cli_flag_and_config_key_is_in_the_readme():
    readme = read("README.md")
    flags = re.findall(r"--[a-z][a-z-]+", read("ccproxy.py").split("def parse_args", 1)[1].split("def main", 1)[0])
    assert flags
    for flag in set(flags):
        assert "`%s" % flag in readme, "README does not document " + flag
    for key in ccproxy.TOP_KEYS + ccproxy.PROVIDER_KEYS:
        assert "`%s`" % key in readme, "README does not document config key " + key


def test_template_documents_every_top_level_key():
    import json
    template = json.loads(read("config.in.json"))
    for key in ccproxy.TOP_KEYS:
        assert key in template and ("_comment_" + key) in template


def test_the_web_ui_loads_nothing_from_elsewhere():
    page = read("webui.html")
    assert not re.search(r"""(src|href)\\s*=\\s*["']?(https?:)?//""", page)
    assert "@import" not in page


def test_the_docstring_lists_the_sections_in_file_order():
    source = read("ccproxy.py")
    banners = re.findall(r"^# =+ (.+)$", source, re.M)
    assert banners == ["constants", "errors", "config", "files", "state", "config editing", "HTTP messages",
                       "Anthropic requests and replies", "relay compatibility",
                       "upstream client", "providers: discovery and tests", "relay", "observability",
                       "usage and cost", "balance", "team keys", "health and failover", "web UI API",
                       "request handler", "server factory and CLI"]
    doc = ccproxy.__doc__.split("Sections, in file order", 1)[1].split("\n\n", 1)[0].split(":", 1)[1]
    listed = [" ".join(name.split()).rstrip(".") for name in doc.split(",")]
    assert listed == banners


def test_sections_stay_readable():
    """A section is read in one sitting: ~400 lines at most (house style)."""
    source = read("ccproxy.py").split("\n")
    starts = [i for i, line in enumerate(source) if line.startswith("# ====")] + [len(source)]
    for start, end in zip(starts, starts[1:]):
        assert end - start <= 420, "%s is %d lines" % (source[start], end - start)


def test_readme_test_command_is_what_ci_runs():
    command = "python3 -m pip install -r requirements-dev.txt && python3 -m pytest"
    assert command in read("README.md")
    assert command in read(".ci/run")


def test_the_chinese_readme_has_every_section_flag_and_key():
    english, chinese = read("README.md"), read("README_zh.md")
    for level in ("## ", "### "):
        count = lambda text: len(re.findall(r"^%s" % level, text, re.M))
        assert count(chinese) == count(english), "README_zh.md lacks a %s section" % level.strip()
    for name in re.findall(r"`(--[a-z][a-z-]+)", english) + list(ccproxy.TOP_KEYS + ccproxy.PROVIDER_KEYS):
        assert name in chinese, "README_zh.md does not mention " + name
    for route in re.findall(r"^\| `((?:GET|POST|HEAD) [^ `]+)", english, re.M):
        assert route in chinese, "README_zh.md does not list the route " + route
