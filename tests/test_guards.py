"""Guards for the promises: stdlib only, documented flags and keys, no CDN, the file's map."""

import ast
import glob
import json
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
    """Standard library only; the one exception is the PostgreSQL driver, imported by
    ccproxy.import_psycopg alone, which runs only when STORE names PostgreSQL."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    driver = {id(node) for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
              and function.name == "import_psycopg" for node in ast.walk(function)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            if root == "psycopg" and id(node) in driver and path.endswith("ccproxy.py"):
                continue
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


def test_the_page_reads_in_lines_of_120_characters():
    long = [n for n, line in enumerate(read("webui.html").split("\n"), 1) if len(line) > 120]
    assert not long, "webui.html lines over 120 characters: %s" % long


# What the markup may say itself, in no language: names of things, values of config keys.
PAGE_NAMES = {"ccproxy", "Linux", "macOS", "Windows (PowerShell)", "x-api-key", "bearer", "both",
              "NewAPI /api/usage/token", "NewAPI /v1/credits", "sub2api /v1/usage", "/v1/dashboard/billing"}


def test_the_page_says_its_english_in_one_place():
    """Every word the page shows is in its I18N tables: an element that applyLang() fills
    (data-i18n) is empty in the markup, and no other text of the markup is a word of English."""
    page = read("webui.html")
    markup = re.sub(r"<style>.*?</style>", "", page.split("<script>", 1)[0], flags=re.S)
    markup = markup[markup.index("<body"):]
    filled = re.findall(r'<(\w+)\b[^<>]*\sdata-i18n="([^"]+)"[^<>]*>([^<]*)<', markup)
    assert filled and all(not text.strip() for _, _, text in filled), [f for f in filled if f[2].strip()]
    texts = {t.strip() for t in re.findall(r">([^<]*[A-Za-z][^<]*)<", markup)} - {""}
    assert texts <= PAGE_NAMES, texts - PAGE_NAMES
    # and each key it names is in the English table (the Chinese one has the same: test_browser)
    english = page.split("  en: {", 1)[1].split("\n  zh: {", 1)[0]
    for _, key, _ in filled:
        assert re.search(r"\b%s:" % re.escape(key), english), key


def test_the_script_opens_with_a_map_of_names_it_has():
    script = read("webui.html").split("<script>", 1)[1]
    head = script.split("\n")[1:40]
    comments = [line for line in head if line.startswith("//")]
    assert len(comments) >= 10, "the script opens with a map of its parts"
    for name in re.findall(r"\b([a-zA-Z]+)\(", "\n".join(comments)):
        assert re.search(r"\bfunction %s\(|\b(const|let) %s = " % (name, name), script), name


def test_the_docstring_maps_the_sections_in_file_order():
    """The module docstring is the map: a line per section, in file order, with its purpose,
    the same names as the banners (grep -n '^# ===' ccproxy.py)."""
    source = read("ccproxy.py")
    banners = re.findall(r"^# =+ (.+)$", source, re.M)
    block = ccproxy.__doc__.split("each for one topic:\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip().split(" — ", 1) for line in block.splitlines()]
    assert [name for name, _ in lines] == banners
    assert all(len(purpose) > 10 for _, purpose in lines)
    # the names a request passes, in the map's walk, are the file's own
    walk = ccproxy.__doc__.split("A request goes through:", 1)[1].split("\n\n", 1)[0]
    for name in ("handle_one_request", "dispatch", "find_route", "cross_site", "Throttle", "Limits", "relay_request",
                 "Relay", "candidates", "Health", "map_model", "Pool", "Response", "ClientWriter", "Exchange",
                 "exchange_record", "Recorder", "UsageStore"):
        assert name in walk and re.search(r"^\s*(def|class) %s\b" % name, source, re.M), name


def test_sections_stay_readable():
    """A section holds one topic and is read in one sitting: one that grows past ~600 lines
    becomes two named sections (in the map), never a move of code to an unrelated one."""
    source = read("ccproxy.py").split("\n")
    starts = [i for i, line in enumerate(source) if line.startswith("# ====")] + [len(source)]
    for start, end in zip(starts, starts[1:]):
        assert end - start <= 600, "%s is %d lines: split it by topic" % (source[start], end - start)


def test_readme_test_command_is_what_ci_runs():
    """The README's two lines (a virtual environment first: a PEP 668 system Python refuses a
    plain pip install), which .ci/run runs as they are, in a venv of the system Python."""
    command = "python3 -m pip install -r requirements-dev.txt && python3 -m pytest"
    venv = "python3 -m venv .venv && . .venv/bin/activate"
    for name in ("README.md", "README_zh.md"):
        text = read(name)
        assert venv in text and command in text and text.index(venv) < text.index(command), name
    ci = read(".ci/run")
    assert command in ci and "-m venv .venv && . .venv/bin/activate" in ci and "/usr/bin/python3" in ci


def test_the_chinese_readme_has_every_section_flag_and_key():
    english, chinese = read("README.md"), read("README_zh.md")
    for level in ("## ", "### "):
        count = lambda text: len(re.findall(r"^%s" % level, text, re.M))
        assert count(chinese) == count(english), "README_zh.md lacks a %s section" % level.strip()
    for name in re.findall(r"`(--[a-z][a-z-]+)", english) + list(ccproxy.TOP_KEYS + ccproxy.PROVIDER_KEYS):
        assert name in chinese, "README_zh.md does not mention " + name
    for route in re.findall(r"^\| `((?:GET|POST|HEAD) [^ `]+)", english, re.M):
        assert route in chinese, "README_zh.md does not list the route " + route


# -- README and README_zh against the code and each other

READMES = ("README.md", "README_zh.md")


def squeezed(text):
    """Text without whitespace: a phrase is found whatever the line breaks in between."""
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("name", READMES)
def test_every_route_is_in_both_readmes(name):
    text = read(name)
    for route in ccproxy.ROUTES:
        if not route.pattern.startswith(("/api/", "/metrics")):
            continue
        for method in route.methods - {"HEAD"}:
            doc = "%s %s" % (method, re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), route.pattern))
            head, _, last = doc.rpartition("/")
            # a trailing parameter may be given in parentheses after its route: `/api/x/NAME` (`/ID`)
            assert doc in text or (last.isupper() and head in text and "`/%s`" % last in text), \
                "%s does not document %s" % (name, doc)
    for path in ("/healthz", "/api/hello", "/v1/models", "/v1/messages/count_tokens"):
        assert path in text, "%s does not mention %s" % (name, path)


@pytest.mark.parametrize("name", READMES)
def test_every_config_key_is_in_both_readmes(name):
    text = read(name)
    for key in ccproxy.TOP_KEYS + ccproxy.PROVIDER_KEYS + ccproxy.KEY_FIELDS:
        assert "`%s`" % key in text, "%s does not document the config key %s" % (name, key)


def test_every_number_of_one_readme_is_in_the_other():
    number = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w.])")
    english, chinese = (set(number.findall(read(name))) for name in READMES)
    assert english - chinese == set(), "only in README.md"
    assert chinese - english == set(), "only in README_zh.md"


def readme_defaults(name):
    """{top-level key: its default} from the README's table of settings."""
    found = {}
    for key, cell in re.findall(r"^\| `([A-Za-z_-]+)` \| `([^`]*)`", read(name), re.M):
        if key in ccproxy.TOP_KEYS:
            try:
                found[key] = json.loads(cell)
            except ValueError:
                found[key] = cell               # 127.0.0.1, requests.jsonl: unquoted strings
    return found


def settings(config):
    """What a Config holds, comparable: its fields, and its pricing's."""
    fields = {k: v for k, v in vars(config).items() if k not in ("raw", "loaded_at", "pricing")}
    return fields, vars(config.pricing)


@pytest.mark.parametrize("name", READMES)
def test_the_readmes_defaults_are_the_codes(name, tmp_path):
    """A config that spells out the README's default of a key means what leaving it out means."""
    defaults = readme_defaults(name)
    assert len(defaults) >= 15 and defaults == readme_defaults("README.md")
    path = str(tmp_path / "config.json")
    base = {"APIKEY": "sk-guard-0123456789abcdef", "Providers": []}
    left_out = settings(ccproxy.validate_config(base, path))
    for key, value in defaults.items():
        spelled_out = settings(ccproxy.validate_config(dict(base, **{key: value}), path))
        assert spelled_out == left_out, "%s says %s defaults to %r; the code does not" % (name, key, value)


# (constant, its value as the README writes it, the English phrase, the Chinese one)
QUOTED = [
    ("DEFAULT_PORT", "{:d}", "http://127.0.0.1:{}/", "http://127.0.0.1:{}/"),
    ("HEADER_DEADLINE_S", "{:g}", "within {} s of its first byte", "第一个字节之后 {} 秒内收齐"),
    ("CLIENT_TIMEOUT_S", "{:g}", "may wait {} s for its next request", "可以等 {} 秒"),
    ("LINGER_S", "{:g}", "for up to {} s first", "最多花 {} 秒读取并丢弃"),
    ("ERROR_HOLD_BYTES", "{:d}", "read only {} KB ahead", "只预读 {} KB"),
    ("AUTH_FAIL_LIMIT", "{:d}", "{} different wrong keys from one address", "的 {} 个不同错误密钥"),
    ("AUTH_GLOBAL_FAIL_LIMIT", "{:d}", "{} different wrong keys from all addresses", "合计 {} 个不同错误密钥"),
    ("APIKEY_MIN_CHARS", "{:d}", "shorter than {} characters", "短于 {} 个字符"),
    ("DEBUG_BODY_CHARS", "{:d}", "truncated to {} characters", "截断到 {} 个字符"),
    ("SHUTDOWN_GRACE_S", "{:g}", "requests in flight get {} seconds", "进行中的请求有 {} 秒"),
    ("TEST_SLOW_S", "{:g}", "first event after {} s", "首个事件超过 {} 秒"),
    ("MODELS_MAX_BYTES", "{:d}", "at most {} MB a page", "每页最多读 {} MB"),
    ("MAX_MODELS", "{:d}", "keeps at most {} ids", "最多保留 {} 个 id"),
    ("CONFIG_BACKUPS", "{}", "(the newest {})", "（保留最新的{}个）"),
]
UNITS = {"ERROR_HOLD_BYTES": 1 << 10, "MODELS_MAX_BYTES": 1 << 20}
WORDS = {5: ("five", "五")}


@pytest.mark.parametrize("constant, form, english, chinese", QUOTED, ids=[q[0] for q in QUOTED])
def test_numbers_the_readmes_quote_are_the_codes(constant, form, english, chinese):
    value = getattr(ccproxy, constant) // UNITS.get(constant, 1)
    if form == "{}":
        en_value, zh_value = WORDS[value]
    else:
        en_value = zh_value = form.format(value)
    assert squeezed(english.format(en_value)) in squeezed(read("README.md")), constant
    assert squeezed(chinese.format(zh_value)) in squeezed(read("README_zh.md")), constant


def test_the_performance_targets_are_the_benchmarks():
    """README's Performance table states, row by row, the targets tests/bench.py checks."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import bench
    section = read("README.md").split("## Performance", 1)[1].split("\n## ", 1)[0]
    targets = []
    for row in re.findall(r"^\| (.+) \|$", section, re.M)[1:]:     # after the heading row
        target = row.split(" | ")[-1]
        if not target.startswith("("):                  # "(the design's floor)": shown, not a target
            targets.append(target.replace(" ✓", "").strip())
    assert targets == [goal for _key, _label, goal, _check in bench.TARGETS]


# -- what ccproxy says to a person carries a code (MESSAGES), which the page words in Chinese

def said_call(node):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Said"


def test_every_message_of_the_server_has_a_code():
    """Every error ccproxy answers, every config problem and every reason it gives is made by
    Said(code, ...) from MESSAGES: an English string written straight into one fails here."""
    tree = ast.parse(read("ccproxy.py"))
    errors = {name for name, obj in vars(ccproxy).items()
              if isinstance(obj, type) and issubclass(obj, ccproxy.ProxyError)}
    builds_its_own = {"CrossOrigin"}           # its __init__ says Said("cross_origin", reason=...)
    bare, codes = [], set()
    for node in ast.walk(tree):
        if said_call(node):
            assert isinstance(node.args[0], (ast.Constant, ast.Name, ast.BinOp, ast.IfExp)), ast.dump(node)
            if isinstance(node.args[0], ast.Constant):
                codes.add(node.args[0].value)
            continue
        if not isinstance(node, ast.Call):
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else node.func.attr if isinstance(node.func, ast.Attribute) else ""
        if func in errors - builds_its_own and node.args:
            if not (said_call(node.args[0]) or isinstance(node.args[0], ast.Name)):
                bare.append((node.lineno, func))
        elif func == "ConfigError":
            first = node.args[0]
            if not (isinstance(first, ast.Name) or isinstance(first, ast.List) and all(isinstance(e, ast.Call) for e in first.elts)):
                bare.append((node.lineno, func))
        elif func in ("append", "extend") and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "problems":
            arg = node.args[0]
            if not (said_call(arg) or isinstance(arg, ast.GeneratorExp) and said_call(arg.elt)):
                bare.append((node.lineno, "problems." + func))
    assert not bare, "English without a code (Said) at lines %s" % bare
    # functions whose every answer is a reason said to a person
    for fn in ("describe_network_error", "listen_problem"):
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn)
        for ret in (n for n in ast.walk(node) if isinstance(n, ast.Return)):
            assert said_call(ret.value), "%s: line %d returns words without a code" % (fn, ret.lineno)
    # every code used is in MESSAGES, and every one of MESSAGES is used
    assert codes - set(ccproxy.MESSAGES) == set()
    source = read("ccproxy.py")
    unused = [c for c in ccproxy.MESSAGES if '"%s"' % c not in source.split("MESSAGES = {", 1)[1].split("\n}\n", 1)[1]
              and not c.startswith("unprintable_")]
    assert not unused, unused


def test_the_page_words_every_code_in_chinese_with_the_same_values():
    """webui.html's I18N.zh.msg has exactly MESSAGES' codes, each with the same {values}."""
    import string
    page = read("webui.html")
    block = page.split("    msg: {\n", 1)[1].split("\n    },\n", 1)[0]
    zh = {}
    for code, text in re.findall(r'^      "(\w+)": ((?:"(?:[^"\\]|\\.)*"(?: \+\n\s*)?)+),$', block, re.M):
        zh[code] = "".join(json.loads(piece) for piece in re.findall(r'"(?:[^"\\]|\\.)*"', text))
    assert set(zh) == set(ccproxy.MESSAGES), set(zh) ^ set(ccproxy.MESSAGES)
    fields = lambda t: {f for _, f, _, _ in string.Formatter().parse(t) if f}
    for code, english in ccproxy.MESSAGES.items():
        assert fields(english) == set(re.findall(r"\{(\w+)\}", zh[code])), code
        # Chinese words, unless the English has none either ("HTTP {status}")
        assert re.search(r"[\u4e00-\u9fff]", zh[code]) or not re.search(r"[a-z]{3}", re.sub(r"\{\w+\}", "", english)), code
