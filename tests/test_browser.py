"""Tier 3: the real page in headless Chromium (Debian's chromium + chromium-driver, selenium).

Skips with the reason when no browser is installed; .ci/run installs one (and axe-core, for
the accessibility check, under .ci/node). With CCPROXY_SCREENSHOTS=1 the light and dark
screenshots are written to docs/ for the README.
"""

import json
import re
import os
import shutil
import socket
import time
from urllib.parse import quote

import pytest

from conftest import APIKEY, KEY_A, ROOT, make_config, start_proxy, write_config

# .ci/run sets CCPROXY_REQUIRE_BROWSER=1: there a missing browser fails instead of skipping.
REQUIRED = bool(os.environ.get("CCPROXY_REQUIRE_BROWSER"))
if REQUIRED:
    from selenium import webdriver
else:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test-only dependency")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
AXE = os.environ.get("CCPROXY_AXE") or os.path.join(ROOT, ".ci", "node", "node_modules", "axe-core", "axe.min.js")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not REQUIRED,
                                reason="no chromium/chromedriver (apt-get install chromium chromium-driver)")
EVIL = "<img src=x onerror=alert(1)>"
LONG = "一段很长的备注" * 30 + "https://relay.example/averyveryverylongpathwithoutanyspacesatall" * 3


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 "--user-data-dir=%s" % (tmp_path / "profile"), "--lang=en-US"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_script_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def ui_proxy(proxy_with, upstream):
    proxy = proxy_with(added=[{"name": EVIL, "comment": "<b>bold?</b>", "api_base_url": upstream.url,
                               "api_key": "sk-evil-0000", "models": ["<script>x</script>"]}])
    proxy.config_path = proxy.store.config_path
    return proxy


def wait(driver, predicate, timeout=10):
    # the page rebuilds its lists on each poll, so an element found a moment ago may be gone
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException, IndexError)) \
        .until(lambda d: predicate(d))


def click(driver, find):
    """Click what find(driver) returns, finding it again if a poll re-rendered it meanwhile;
    centred first, as a person would scroll to it, not under the sticky header."""
    def go(d):
        target = find(d)
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", target)
        target.click()
        return True
    wait(driver, go)


def login(driver, proxy, lang=None):
    driver.get(proxy.url + "/")
    if lang:
        driver.execute_script("localStorage.setItem('ccproxy.lang', arguments[0])", lang)
        driver.get(proxy.url + "/")
    wait(driver, lambda d: d.find_element(By.ID, "password").is_displayed())
    driver.find_element(By.ID, "password").send_keys(APIKEY)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#providers .prov"))


def provider_card(driver, name):
    for card in driver.find_elements(By.CSS_SELECTOR, "#providers .prov"):
        if card.get_attribute("data-name") == name:
            return card
    raise AssertionError("no card for %r" % name)


def card_names(driver):
    """The cards' names, read in one go in the page (a poll may rebuild the cards meanwhile)."""
    return driver.execute_script("return [...document.querySelectorAll('#providers .prov')].map(c => c.dataset.name)")


def press(driver, selector, key=Keys.ENTER):
    """Focus what the selector finds and press a key there, as a keyboard user does (again if a
    poll rebuilt it in between: the key then never reached it)."""
    def go(d):
        d.execute_script("document.querySelector(arguments[0]).focus()", selector)
        d.switch_to.active_element.send_keys(key)
        return True
    wait(driver, go)


def go(driver, view):
    """Open a view as a person does: its link in the navigation (the header, or a phone's tab bar)."""
    click(driver, lambda d: d.find_element(By.CSS_SELECTOR, "nav.views a[data-view=%s]" % view))
    wait(driver, lambda d: d.find_element(By.ID, "view-" + view).is_displayed())


def menu(driver, item):
    """Press one of the menu's items (copy, test all, reload, language, log out)."""
    if not driver.find_element(By.ID, "menu").is_displayed():
        click(driver, lambda d: d.find_element(By.ID, "menu-btn"))
    click(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#menu " + item))


def text_of(driver, element_id):
    """What an element says, shown or not (a view not open keeps its words)."""
    return driver.find_element(By.ID, element_id).get_attribute("textContent")


def config_on_disk(proxy):
    with open(proxy.config_path, encoding="utf-8") as f:
        return json.load(f)


def test_the_page_end_to_end(browser, ui_proxy):
    login(browser, ui_proxy)
    assert card_names(browser) == ["alpha", "beta", EVIL]
    assert browser.find_element(By.CSS_SELECTOR, ".sep").text == "----"
    # names, comments and model ids are text, never markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#providers img, #providers b, #models script")
    assert EVIL in browser.find_element(By.ID, "providers").text
    assert browser.find_element(By.ID, "selected-name").text == "alpha"
    # focus is on the first provider after login
    assert browser.switch_to.active_element.text == "alpha"

    # select another provider: the server's selection changes
    click(browser, lambda d: provider_card(d, "beta").find_element(By.CSS_SELECTOR, "[data-action=select]"))
    wait(browser, lambda d: ui_proxy.store.view.selected == "beta")
    wait(browser, lambda d: d.find_element(By.ID, "selected-name").text == "beta")

    # filter the viewed provider's models (comma-separated keywords match any)
    click(browser, lambda d: provider_card(d, "alpha").find_element(By.CSS_SELECTOR, "button.name"))
    wait(browser, lambda d: d.find_element(By.ID, "detail-name").get_attribute("textContent") == "alpha")
    box = browser.find_element(By.ID, "filter")
    box.send_keys("haiku")
    models = lambda d: [li.find_element(By.CSS_SELECTOR, "span").text for li in d.find_elements(By.CSS_SELECTOR, "#models li")]
    wait(browser, lambda d: models(d) == ["claude-haiku-4-5"])
    box.send_keys(", sonnet")
    wait(browser, lambda d: models(d) == ["claude-sonnet-4-5", "claude-haiku-4-5"])
    # the filter is for one provider: viewing another clears it
    click(browser, lambda d: provider_card(d, "beta").find_element(By.CSS_SELECTOR, "button.name"))
    wait(browser, lambda d: d.find_element(By.ID, "filter").get_attribute("value") == "")
    click(browser, lambda d: provider_card(d, "alpha").find_element(By.CSS_SELECTOR, "button.name"))

    # copy /model x where navigator.clipboard is unavailable (plain http://server-ip) and
    # execCommand fails too: the text is shown selected; focus stays in the dialog and returns
    browser.execute_script("Object.defineProperty(navigator, 'clipboard', {value: undefined});"
                           "document.execCommand = () => false;")
    opener = browser.find_element(By.CSS_SELECTOR, "#models li button")
    opener.click()
    wait(browser, lambda d: d.find_element(By.ID, "manual").is_displayed())
    assert browser.find_element(By.ID, "manual-text").get_attribute("value") == "/model claude-sonnet-4-5"
    assert browser.execute_script("const a = document.getElementById('manual-text');"
                                  "return a.value.substring(a.selectionStart, a.selectionEnd);") \
        == "/model claude-sonnet-4-5"
    for _ in range(3):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("id") in ("manual-text", "manual-close")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(browser, lambda d: not d.find_element(By.ID, "manual").is_displayed())
    assert browser.switch_to.active_element.text == "Copy /model"      # back where it was opened
    # the alias picks this relay and this model from Claude Code's /model
    browser.find_element(By.CSS_SELECTOR, "#models li button[title]").click()
    wait(browser, lambda d: d.find_element(By.ID, "manual").is_displayed())
    alias = browser.find_element(By.ID, "manual-text").get_attribute("value")
    assert alias.startswith("/model claude-via-alpha-") and alias.endswith("--claude-sonnet-4-5")
    assert alias.split(" ", 1)[1] in ui_proxy.store.view.aliases
    browser.find_element(By.ID, "manual-close").click()

    # failover: add two providers, move the second up, remove one; the server sees each edit
    for name in ("beta", EVIL):
        Select(browser.find_element(By.ID, "fallback-add")).select_by_value(name)
        browser.find_element(By.ID, "fallback-add-btn").click()
        wait(browser, lambda d: name in ui_proxy.store.view.fallback)
    assert ui_proxy.store.view.fallback == ("beta", EVIL)
    click(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#fallback-list li")[1].find_elements(By.TAG_NAME, "button")[0])
    wait(browser, lambda d: ui_proxy.store.view.fallback == (EVIL, "beta"))
    click(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#fallback-list li")[0].find_elements(By.TAG_NAME, "button")[2])
    wait(browser, lambda d: ui_proxy.store.view.fallback == ("beta",))
    browser.find_element(By.ID, "fallback-enabled").click()
    wait(browser, lambda d: ui_proxy.store.view.fallback_enabled is False)
    ui_proxy.server.health.cool_down("beta", 60, "529")
    wait(browser, lambda d: "cooling down (529)" in provider_card(d, "beta").text, timeout=8)

    # requests view: a relayed request shows up live, with its tokens; stats on the provider's card
    ui_proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})
    go(browser, "requests")
    wait(browser, lambda d: "claude-sonnet-4-5" in d.find_element(By.ID, "requests").text, timeout=8)
    wait(browser, lambda d: "19 / 7" in d.find_element(By.CSS_SELECTOR, "#requests tbody tr").text)
    go(browser, "relays")
    wait(browser, lambda d: "1 req · 100% ok" in provider_card(d, "beta").text, timeout=8)
    # test the viewed provider: busy while it runs, then the result: in short on its card, in
    # words in its details
    click(browser, lambda d: provider_card(d, EVIL).find_element(By.CSS_SELECTOR, "button.name"))
    click(browser, lambda d: d.find_element(By.ID, "detail-test"))
    wait(browser, lambda d: "ok: first event in" in d.find_element(By.ID, "detail-health").text, timeout=15)
    assert " ms" in provider_card(browser, EVIL).find_element(By.CSS_SELECTOR, ".t-ok").text
    assert browser.find_element(By.ID, "detail-test").is_enabled()

    # a failed reload shows the problems and the running config stays
    with open(ui_proxy.config_path, "w") as f:
        f.write('{"Providers": [{"name": "x", "api_base_url": "not a url"}]}')
    menu(browser, "#reload")
    wait(browser, lambda d: d.find_element(By.ID, "reload-error").is_displayed())
    assert "api_base_url must be an http(s) URL" in browser.find_element(By.ID, "reload-error").text
    assert os.path.dirname(ui_proxy.config_path) not in browser.page_source     # the file's name, not its path
    assert browser.find_element(By.ID, "toast").text == "Reload failed — the running config is kept"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#providers .prov")) == 3


def fill(browser, field_id, text):
    field = browser.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(text)


def save_editor(browser):
    browser.find_element(By.CSS_SELECTOR, "#editor-form button[type=submit]").click()
    wait(browser, lambda d: not d.find_element(By.ID, "editor").is_displayed())


@pytest.mark.parametrize("lang, width", [("en", 1280), ("zh", 390)])
def test_manage_relays_through_the_page(browser, ui_proxy, upstream, lang, width):
    browser.set_window_size(width, 900)
    login(browser, ui_proxy, lang)
    # add a provider named in Chinese, with a key
    browser.find_element(By.ID, "add-provider").click()
    wait(browser, lambda d: d.find_element(By.ID, "editor").is_displayed())
    assert browser.switch_to.active_element.get_attribute("id") == "ed-name"
    fill(browser, "ed-name", "beta")                                     # taken: said inline, nothing sent
    fill(browser, "ed-url", "relay.example")
    browser.find_element(By.CSS_SELECTOR, "#editor-form button[type=submit]").click()
    assert browser.find_element(By.ID, "ed-name-error").text and browser.find_element(By.ID, "ed-url-error").text
    fill(browser, "ed-name", "新中转")
    fill(browser, "ed-url", upstream.url + "/v1/messages")
    fill(browser, "ed-key", "sk-new-secret-1234567890")
    fill(browser, "ed-models", "claude-sonnet-4-5\nglm-4.6")
    fill(browser, "ed-comment", LONG)
    fill(browser, "ed-balance-unit", "CNY")                              # the relay's unit, said by hand
    fill(browser, "ed-balance-low", "5")
    save_editor(browser)
    wait(browser, lambda d: "新中转" in card_names(d))
    entry = config_on_disk(ui_proxy)["Providers"][-1]
    assert entry["name"] == "新中转" and entry["api_key"] == "sk-new-secret-1234567890"
    assert entry["balance"] == {"unit": "CNY", "low": 5}
    assert "sk-new-secret" not in browser.page_source                  # the key is write-only
    # edit: rename it; the key stays
    click(browser, lambda d: provider_card(d, "新中转").find_element(By.CSS_SELECTOR, "button.name"))
    click(browser, lambda d: d.find_element(By.ID, "detail-edit"))
    wait(browser, lambda d: d.find_element(By.ID, "editor").is_displayed())
    assert browser.find_element(By.ID, "ed-key").get_attribute("value") == ""
    fill(browser, "ed-name", "中转站B")
    save_editor(browser)
    wait(browser, lambda d: "中转站B" in card_names(d) and "新中转" not in card_names(d))
    assert config_on_disk(ui_proxy)["Providers"][-1]["api_key"] == "sk-new-secret-1234567890"
    # reorder: a mode of its own (no "use" button beside ↑/↓ there); with the keyboard first,
    # its "up" button twice, the focus staying on it
    order = lambda: [p["name"] for p in config_on_disk(ui_proxy)["Providers"]]
    before = order()
    assert provider_card(browser, "alpha").find_elements(By.CSS_SELECTOR, "[data-action=select]")
    click(browser, lambda d: d.find_element(By.ID, "reorder"))
    wait(browser, lambda d: d.find_element(By.ID, "reorder-bar").is_displayed())
    assert not browser.find_elements(By.CSS_SELECTOR, "#providers [data-action=select]")
    for n in range(2):
        press(browser, '[data-name="中转站B"] [data-role=up]')
        wait(browser, lambda d: order().index("中转站B") == 3 - n)
    wait(browser, lambda d: d.execute_script("return document.activeElement.closest('[data-name]').dataset.name") == "中转站B")
    # by drag and drop, a line marking where it lands: beta on alpha's upper half goes before it,
    # alpha on the lower half of the card below it goes after that one, and one can reach the end
    drag = """
        const [from, to, lower] = arguments, data = new DataTransfer(), r = to.getBoundingClientRect();
        const at = {dataTransfer: data, bubbles: true, cancelable: true, clientX: r.left + 10,
                    clientY: lower ? r.bottom - 3 : r.top + 3};
        from.dispatchEvent(new DragEvent('dragstart', {dataTransfer: data, bubbles: true}));
        to.dispatchEvent(new DragEvent('dragover', at));
        const marked = to.className;
        to.dispatchEvent(new DragEvent('drop', at));
        from.dispatchEvent(new DragEvent('dragend', {dataTransfer: data, bubbles: true}));
        return marked;"""
    dragged = lambda a, b, lower: wait(browser, lambda d: d.execute_script(drag, provider_card(d, a), provider_card(d, b), lower))
    assert "drop-before" in dragged("beta", "alpha", False)
    wait(browser, lambda d: order()[0] == "beta")
    below = order()[order().index("alpha") + 1]
    assert "drop-after" in dragged("alpha", below, True)
    wait(browser, lambda d: order()[order().index(below) + 1] == "alpha")
    last = order()[-1]
    dragged("beta", last, True)
    wait(browser, lambda d: order()[-1] == "beta")
    # Undo all puts back the order of when Reorder was pressed; Done leaves the mode
    click(browser, lambda d: d.find_element(By.ID, "reorder-undo"))
    wait(browser, lambda d: order() == before)
    click(browser, lambda d: d.find_element(By.ID, "reorder-done"))
    wait(browser, lambda d: provider_card(d, "alpha").find_elements(By.CSS_SELECTOR, "[data-action=select]"))
    # duplicate: made by the server with the key, under the original, named in the page's
    # language; the editor opens on the copy, its key kept; then delete the copy
    click(browser, lambda d: provider_card(d, "alpha").find_element(By.CSS_SELECTOR, "button.name"))
    click(browser, lambda d: d.find_element(By.ID, "detail-duplicate"))
    wait(browser, lambda d: d.find_element(By.ID, "editor").is_displayed())
    copy_name = browser.find_element(By.ID, "ed-name").get_attribute("value")
    assert copy_name == ("alpha（副本）" if lang == "zh" else "alpha (copy)")
    names = [p["name"] for p in config_on_disk(ui_proxy)["Providers"]]
    assert names[names.index("alpha") + 1] == copy_name
    assert config_on_disk(ui_proxy)["Providers"][names.index(copy_name)]["api_key"] == KEY_A
    assert ui_proxy.api("GET", "/api/providers/%s/key" % quote(copy_name))[1]["api_key"] == KEY_A
    assert browser.find_element(By.ID, "ed-key").get_attribute("value") == ""     # empty keeps the key
    fill(browser, "ed-comment", "复制的")
    save_editor(browser)
    wait(browser, lambda d: copy_name in card_names(d))
    copied = [p for p in config_on_disk(ui_proxy)["Providers"] if p["name"] == copy_name][0]
    assert copied["api_key"] == KEY_A and copied["comment"] == "复制的"
    wait(browser, lambda d: text_of(d, "detail-name") == copy_name)        # the copy's details are open
    click(browser, lambda d: d.find_element(By.ID, "detail-edit"))
    wait(browser, lambda d: d.find_element(By.ID, "editor").is_displayed())
    browser.execute_script("window.confirm = () => true")
    browser.find_element(By.ID, "editor-delete").click()
    wait(browser, lambda d: copy_name not in card_names(d))
    assert copy_name not in [p["name"] for p in config_on_disk(ui_proxy)["Providers"]]
    # import a claude-code-router config, in the settings view: preview, then apply
    go(browser, "settings")
    # (an OpenAI-format relay beside it is shown, with why, and cannot be ticked; the Router's
    # default is carried as model names, its think rule is said not to be)
    ccr = {"Providers": [{"name": "ccr-导入", "api_base_url": upstream.url + "/v1/messages", "api_key": "sk-ccr-1",
                          "models": ["glm-4.6"], "transformer": {"use": ["Anthropic"]}},
                         {"name": "深度求索", "api_base_url": "https://api.deepseek.com/chat/completions",
                          "api_key": "sk-ds-1", "models": ["deepseek-chat"], "transformer": {"use": ["deepseek"]}}],
           "Router": {"default": "ccr-导入,glm-4.6", "think": "深度求索,deepseek-reasoner"}}
    browser.execute_script("document.getElementById('import-text').value = arguments[0]", json.dumps(ccr))
    click(browser, lambda d: d.find_element(By.ID, "import-preview"))
    wait(browser, lambda d: d.find_elements(By.ID, "import-apply"))
    plan = browser.find_element(By.ID, "import-plan").text
    assert "claude-code-router" in plan and upstream.url + "/v1/messages" in plan
    assert ("只转发 Anthropic Messages API" if lang == "zh" else "Anthropic Messages API only") in plan
    assert ("未带过来" if lang == "zh" else "Not carried over") in plan and "Router.think" in plan
    assert ("按模型名路由" if lang == "zh" else "routes by model name") in plan          # worded from its code
    refused = browser.find_element(By.CSS_SELECTOR, "#import-plan input[value='深度求索']")
    assert refused.get_attribute("disabled") is not None and not refused.is_selected()
    click(browser, lambda d: d.find_element(By.ID, "import-apply"))
    go(browser, "relays")
    wait(browser, lambda d: "ccr-导入" in card_names(d))
    imported = config_on_disk(ui_proxy)["Providers"]
    assert imported[-1]["api_key"] == "sk-ccr-1" and "深度求索" not in [p["name"] for p in imported]
    assert imported[-1]["env-models"]["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "glm-4.6"
    # search across providers; the page never scrolls sideways
    fill(browser, "search", "glm-4.6")
    wait(browser, lambda d: set(card_names(d)) == {"beta", "中转站B", "ccr-导入"})
    fill(browser, "search", "")
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page scrolls sideways by %d px" % overflow


def test_a_stale_version_is_said_and_nothing_is_lost(browser, ui_proxy):
    login(browser, ui_proxy)
    click(browser, lambda d: d.find_element(By.ID, "detail-edit"))
    wait(browser, lambda d: d.find_element(By.ID, "editor").is_displayed())
    with open(ui_proxy.config_path, "a", encoding="utf-8") as f:   # a hand edit meanwhile
        f.write("\n")
    fill(browser, "ed-comment", "from the page")
    browser.find_element(By.CSS_SELECTOR, "#editor-form button[type=submit]").click()
    wait(browser, lambda d: "changed meanwhile" in d.find_element(By.ID, "editor-errors").text)
    assert "from the page" not in json.dumps(config_on_disk(ui_proxy))
    browser.find_element(By.CSS_SELECTOR, "#editor-form button[type=submit]").click()   # now on the new version
    wait(browser, lambda d: not d.find_element(By.ID, "editor").is_displayed())
    assert config_on_disk(ui_proxy)["Providers"][0]["comment"] == "from the page"


def test_the_english_and_chinese_tables_have_the_same_words(browser, ui_proxy):
    """Every word of the page exists in both languages, nested tables and server codes too, and
    each is of the same kind (a text, or a function of the same values)."""
    browser.get(ui_proxy.url + "/")
    shape = browser.execute_script("""
        const shape = o => Object.fromEntries(Object.entries(o).map(([k, v]) =>
            [k, typeof v === "function" ? "fn" + v.length : v && typeof v === "object" ? shape(v) : typeof v]));
        return [shape(I18N.en), shape(I18N.zh), Object.keys(CODES).filter(k => !I18N.zh.msg[k])];""")
    english, chinese, codes_without_chinese = shape
    assert set(english) == set(chinese), (set(english) ^ set(chinese))
    # An empty English table means "the server's own (English) words": only Chinese words them.
    differing = {k for k in english if english[k] != chinese[k] and english[k] != {}}
    assert not differing, {k: (english[k], chinese[k]) for k in differing}
    # the codes the page words its own way (CODES, through t()) are server codes the zh table has too
    assert codes_without_chinese == []


def test_clipboard_copy_and_chinese(browser, ui_proxy):
    login(browser, ui_proxy)
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": ui_proxy.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    menu(browser, "#copy-url")
    wait(browser, lambda d: "show" in d.find_element(By.ID, "toast").get_attribute("class"))
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('ERR ' + e))")
    assert copied == ui_proxy.url
    assert not browser.find_element(By.ID, "menu").is_displayed()          # a choice closes the menu
    # Settings → Claude Code: the command that installs the managed settings with relay prices
    go(browser, "settings")
    wait(browser, lambda d: "/model" in d.find_element(By.ID, "cc-count").text)
    assert browser.find_element(By.ID, "cc-path").text == "/etc/claude-code/managed-settings.json"
    click(browser, lambda d: d.find_element(By.ID, "cc-copy-install"))
    wait(browser, lambda d: "managed-settings.json" in d.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], e => arguments[0]('ERR ' + e))"))
    command = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert command.startswith("sudo mkdir -p /etc/claude-code && printf ") and '"modelPricing"' in command
    go(browser, "relays")
    menu(browser, ".lang-toggle")
    wait(browser, lambda d: text_of(d, "reload") == "重载配置")
    assert browser.find_element(By.CSS_SELECTOR, "label[for=fallback-add]").text == "要添加的供应商"
    go(browser, "requests")
    assert browser.find_element(By.CSS_SELECTOR, "#requests th:nth-child(5)").text == "首字节"
    assert browser.title == "请求 · ccproxy"
    browser.refresh()                                    # remembered, still logged in, same view
    wait(browser, lambda d: text_of(d, "reload") == "重载配置")
    wait(browser, lambda d: d.find_element(By.ID, "view-requests").is_displayed())


def test_screenshots_light_and_dark(browser, tmp_path, upstream, upstream2):
    out = os.path.join(ROOT, "docs") if os.environ.get("CCPROXY_SCREENSHOTS") else str(tmp_path)
    config = make_config(upstream, upstream2)
    config["Providers"][0].update(name="anthropic", comment="Anthropic's own API")
    config["Providers"][1]["name"] = "----- relays -----"
    config["Providers"][2].update(name="relay-hk", comment="中转 · Hong Kong")
    with open(os.path.join(ROOT, "config.in.json"), encoding="utf-8") as f:
        config["Pricing"] = json.load(f)["Pricing"]          # the template's list prices
    upstream.billing = {"hard_limit_usd": 50, "total_usage": 1234}
    upstream.newapi(display="USD")                       # a NewAPI site in dollars
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    try:
        browser.set_window_size(1280, 1500)
        login(browser, proxy)
        proxy.api("POST", "/api/refresh-models", {})
        proxy.api("POST", "/api/overrides", {"provider": "anthropic", "header_override": "ua"})
        proxy.api("POST", "/api/fallback", {"providers": ["relay-hk"]})
        for model, stream in (("claude-sonnet-4-5", True), ("claude-haiku-4-5", False), ("claude-opus-4-1[1m]", True)):
            proxy.call("POST", "/v1/messages", {"model": model, "max_tokens": 64, "stream": stream, "messages": []})
        proxy.api("POST", "/api/test", {})
        wait(browser, lambda d: "first event in" in d.find_element(By.ID, "detail").text)
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#requests tbody tr")) == 3)
        shoot(browser, out)
        # a phone, in Chinese: the switcher first
        set_scheme(browser, "light")
        browser.set_window_size(390, 844)
        menu(browser, ".lang-toggle")
        wait(browser, lambda d: text_of(d, "reload") == "重载配置")
        browser.execute_script("window.scrollTo(0, 0); document.activeElement.blur()")
        path = os.path.join(out, "webui-phone.png")
        browser.save_screenshot(path)
        assert os.path.getsize(path) > 10000
    finally:
        proxy.stop()


def set_scheme(browser, scheme):
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
    time.sleep(0.3)                                      # let the new palette paint


def shoot(browser, out):
    wait(browser, lambda d: "models in" in d.find_element(By.ID, "detail").text)  # the next poll
    for scheme in ("light", "dark"):
        set_scheme(browser, scheme)
        path = os.path.join(out, "webui-%s.png" % scheme)
        browser.save_screenshot(path)
        assert os.path.getsize(path) > 10000
    bg = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(21, 24, 29)"                       # the dark palette is in force


def test_phone_width_and_keyboard(browser, ui_proxy, upstream):
    browser.set_window_size(390, 844)
    login(browser, ui_proxy)
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page scrolls sideways at phone width by %d px" % overflow
    # a skip link is the first stop; it leads to the view's heading
    assert browser.execute_script("return document.querySelector('#app a[href], #app button, #app input').id") == "skip"
    press(browser, "#skip")
    assert browser.switch_to.active_element.get_attribute("id") == "h-relays"
    # keyboard only: Enter on beta's name opens its details in place of the list, focus there
    name = provider_card(browser, "beta").find_element(By.CSS_SELECTOR, "button.name")
    browser.execute_script("arguments[0].focus()", name)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "detail-name").get_attribute("textContent") == "beta")
    wait(browser, lambda d: d.switch_to.active_element.get_attribute("id") == "detail")
    assert browser.current_url.endswith("#relays/beta") and not browser.find_element(By.ID, "providers").is_displayed()
    # use it from there: the focus stays on the button just pressed, which now says it is in use
    use = browser.find_element(By.ID, "detail-select")
    browser.execute_script("arguments[0].focus()", use)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: ui_proxy.store.view.selected == "beta")
    wait(browser, lambda d: d.find_element(By.ID, "detail-select").get_attribute("aria-disabled") == "true")
    assert browser.switch_to.active_element.get_attribute("id") == "detail-select"
    # Back (the button, or the browser's): the list again, focus on the relay it came from
    browser.back()
    wait(browser, lambda d: d.find_element(By.ID, "providers").is_displayed())
    wait(browser, lambda d: d.switch_to.active_element.text == "beta")
    # focus survives a switch made from the list, and every refresh the page makes by itself
    focused = lambda: browser.execute_script(
        "const a = document.activeElement, c = a.closest('[data-name]');"
        "return [c && c.dataset.name, a.getAttribute('aria-label') || a.textContent, a === document.body]")
    alpha_use = provider_card(browser, "alpha").find_element(By.CSS_SELECTOR, "[data-action=select]")
    browser.execute_script("arguments[0].focus()", alpha_use)
    before = focused()
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: ui_proxy.store.view.selected == "alpha")
    wait(browser, lambda d: "selected" in provider_card(d, "alpha").get_attribute("class"))
    assert focused() == before
    assert ui_proxy.api("POST", "/api/fallback", {"enabled": True, "providers": ["alpha"]})[0] == 200
    browser.execute_script("return loadState()")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#fallback-list button"))
    assert focused() == before
    remove = browser.find_elements(By.CSS_SELECTOR, "#fallback-list button")[-1]
    browser.execute_script("arguments[0].focus()", remove)
    before = focused()
    ui_proxy.store.set_overrides("alpha", "ua", None)                  # some other change, made elsewhere
    browser.execute_script("return loadState()")
    wait(browser, lambda d: "ua" in d.execute_script("return JSON.stringify(state.providers)"))
    assert focused() == before and before[1].endswith("alpha")


def run_axe(browser):
    if not os.path.exists(AXE):
        if REQUIRED:
            raise AssertionError("axe-core is missing at %s (.ci/run installs it)" % AXE)
        pytest.skip("axe-core is a test-only dependency: npm install --prefix .ci/node axe-core")
    # Not with a toast up: it fades out (0.2 s) at a moment of its own, and half-transparent,
    # its text has half its contrast, which axe reports when a busy machine catches it there.
    wait(browser, lambda d: d.execute_script(
        "var t = document.getElementById('toast');"
        "return !t || (!t.classList.contains('show') && getComputedStyle(t).opacity === '0');"))
    with open(AXE, encoding="utf-8") as f:
        browser.execute_script(f.read())
    result = browser.execute_async_script(
        "axe.run(document, {resultTypes: ['violations']}).then(r => arguments[0](r.violations), "
        "e => arguments[0]([{impact: 'critical', id: 'axe failed: ' + e}]))")
    return [(v["id"], v["impact"], [n["target"] for n in v.get("nodes", [])][:3]) for v in result
            if v["impact"] in ("moderate", "serious", "critical")]


@pytest.mark.parametrize("lang, scheme", [("en", "light"), ("zh", "dark")])
def test_no_serious_accessibility_violations(browser, ui_proxy, lang, scheme):
    set_scheme(browser, scheme)
    browser.get(ui_proxy.url + "/")
    browser.execute_script("localStorage.setItem('ccproxy.lang', arguments[0])", lang)
    browser.get(ui_proxy.url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "password").is_displayed())
    assert run_axe(browser) == []                        # the login page
    login(browser, ui_proxy, lang)
    ui_proxy.api("POST", "/api/test", {})
    ui_proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})
    wait(browser, lambda d: "first event" in d.find_element(By.ID, "detail").text
         or "首个事件" in d.find_element(By.ID, "detail").text)
    assert run_axe(browser) == []                        # providers, with a relay's details
    menu(browser, "#copy-url")
    click(browser, lambda d: d.find_element(By.ID, "menu-btn"))
    assert run_axe(browser) == [], "the menu, open"
    browser.find_element(By.ID, "menu-btn").send_keys(Keys.ESCAPE)
    for view in ("usage", "requests", "keys", "settings"):
        go(browser, view)
        assert browser.find_elements(By.CSS_SELECTOR, "#view-%s h1" % view)
        assert run_axe(browser) == [], view
    go(browser, "relays")
    browser.find_element(By.ID, "detail-edit").click()
    wait(browser, lambda d: d.find_element(By.ID, "editor").is_displayed())
    assert run_axe(browser) == []                        # the provider editor


def test_chinese_names_placeholder_keys_and_a_provider_refusing_its_key(browser, tmp_path, upstream, upstream2):
    config = make_config(upstream, upstream2, Fallback=["🚀备用"])
    config["Providers"][0].update(name="中转站A", comment="主力线路")
    config["Providers"][2].update(name="🚀备用")
    config["Providers"].append({"name": "示例", "api_base_url": upstream.url, "api_key": "sk-your-relay-key"})
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    try:
        login(browser, proxy, "zh")
        wait(browser, lambda d: text_of(d, "reload") == "重载配置")
        assert card_names(browser) == ["中转站A", "🚀备用", "示例"]
        assert "示例密钥" in provider_card(browser, "示例").text
        assert "示例密钥" not in provider_card(browser, "中转站A").text
        click(browser, lambda d: provider_card(d, "🚀备用").find_element(By.CSS_SELECTOR, "[data-action=select]"))
        wait(browser, lambda d: proxy.store.view.selected == "🚀备用")
        wait(browser, lambda d: d.find_element(By.ID, "selected-name").text == "🚀备用")
        # the provider refuses its own key: the Requests panel says so, in Chinese
        upstream2.fail_next(status=401, body={"type": "error", "error": {"type": "authentication_error",
                                                                         "message": "invalid key"}})
        proxy.api("POST", "/api/fallback", {"enabled": False})
        proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})
        go(browser, "requests")
        wait(browser, lambda d: "供应商 🚀备用 拒绝了它的密钥" in d.find_element(By.ID, "requests").text, timeout=8)
        go(browser, "relays")
        # failover: back to config.json's list, then switching it on again keeps it unedited
        click(browser, lambda d: d.find_element(By.ID, "fallback-enabled"))
        wait(browser, lambda d: proxy.store.view.fallback_enabled is True)
        proxy.api("POST", "/api/fallback", {"providers": ["中转站A", "🚀备用"]})
        wait(browser, lambda d: d.find_element(By.ID, "fallback-reset").is_displayed(), timeout=8)
        click(browser, lambda d: d.find_element(By.ID, "fallback-reset"))
        wait(browser, lambda d: proxy.store.view.fallback == ("🚀备用",))
        click(browser, lambda d: d.find_element(By.ID, "fallback-enabled"))
        wait(browser, lambda d: proxy.store.view.fallback_enabled is False)
        time.sleep(0.3)
        assert proxy.api("GET", "/api/state")[1]["fallback"]["edited"] is False
        assert not browser.find_element(By.ID, "fallback-reset").is_displayed()
    finally:
        proxy.stop()


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_compatibility_panel(browser, tmp_path, upstream, upstream2, lang):
    """A fix learned from real traffic shows on the relay's page and can be forgotten; Check
    this relay shows each case; a client-version gate is said, with the presets it outdates."""
    config = make_config(upstream, upstream2)
    config["Providers"][0]["name"] = "中转站A"
    config["HeaderOverrides"]["旧版"] = {"User-Agent": "claude-cli/2.0.14 (external, cli)"}
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    words = {"en": ("remove the body field context_management", "Forget", "refused", "Claude Code 2.1.0 or newer"),
             "zh": ("删除请求体字段 context_management", "忘记", "被拒绝", "Claude Code 2.1.0 或更新版本")}[lang]
    try:
        upstream.refuse_fields = {"context_management", "safeguards"}
        body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "context_management": {"edits": []},
                "messages": [{"role": "user", "content": "hi"}]}
        assert proxy.call("POST", "/v1/messages", body)[0] == 200
        upstream.gate = ("2.1.0", "claude-opus-4-1")
        proxy.call("POST", "/v1/messages", dict(body, model="claude-opus-4-1"),
                   headers={"User-Agent": "claude-cli/2.0.14 (external, cli)"})
        login(browser, proxy, lang)
        wait(browser, lambda d: words[0] in d.find_element(By.ID, "fixes").text)
        # the request that taught it, in the Requests panel, in the page's language
        note = {"en": "fix applied, retried: ", "zh": "已修正并重试："}[lang] + words[0]
        go(browser, "requests")
        wait(browser, lambda d: note in d.find_element(By.ID, "requests").text)
        go(browser, "relays")
        gate = browser.find_element(By.ID, "gate").text
        assert words[3] in gate and "旧版" in gate
        click(browser, lambda d: d.find_element(By.ID, "detail-check"))
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#check-results li")) == 8, timeout=15)
        results = browser.find_element(By.ID, "check-results").text
        assert "safeguards " + words[2] in results and "Extra inputs are not permitted" in results
        assert proxy.store.state["checks"]["中转站A"]["results"]["stream"]["result"] == "ok"
        click(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#fixes button[data-fix]"))
        wait(browser, lambda d: "context_management" not in d.find_element(By.ID, "fixes").text)
        assert proxy.store.state["fixes"].get("中转站A") == []
        assert run_axe(browser) == []
    finally:
        proxy.stop()


@pytest.mark.parametrize("lang, width, scheme", [("en", 1280, "light"), ("zh", 390, "dark")])
def test_usage_cost_cache_and_balance_in_the_page(browser, tmp_path, upstream, upstream2, lang, width, scheme):
    """The Usage panel's charts carry their data points (values on focus and hover), the cards
    show balance and cost, a relay that loses the cache is flagged, and a switch mid-conversation
    says what it costs before it is made; desktop in English, phone in Chinese and dark."""
    config = make_config(upstream, upstream2, CACHE_WARN_PCT=90, Fallback=["🚀备用"],
                         Pricing={"currency": "USD", "models": {"claude-sonnet-*": {"input": 3, "output": 15}}})
    config["Providers"][0].update(name="中转站A", price_multiplier=0.5)
    config["Providers"][2]["name"] = "🚀备用"
    upstream.billing = {"hard_limit_usd": 100, "total_usage": 2550}
    upstream.newapi(display="USD")
    upstream.usage = {"input_tokens": 100, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 5000}
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    words = {"en": ("74.50 USD left", "requests", "cache hit rate 16.4%", "no price", "context", "no price in Pricing",
                    "中转站A · until idle", "(no hint headers)"),
             "zh": ("剩余 74.50 USD", "次请求", "缓存命中率为 16.4%", "无价格", "上下文", "没有价格",
                    "中转站A · 等闲下来", "（没有提示头）")}[lang]
    try:
        set_scheme(browser, scheme)
        browser.set_window_size(width, 900)
        for _ in range(5):
            assert proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8,
                                                        "messages": [{"role": "user", "content": "hi"}]})[0] == 200
        proxy.api("POST", "/api/select", {"provider": "🚀备用"})
        proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []})
        proxy.api("POST", "/api/select", {"provider": "中转站A"})
        proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []},
                   headers={"X-Claude-Code-Session-Id": "0f3c9a64-e828-4caa-aac9-6f60450ab149"})
        login(browser, proxy, lang)
        wait(browser, lambda d: words[0] in provider_card(d, "中转站A").text)
        assert {"en": "the whole account's", "zh": "整个账户的"}[lang] in text_of(browser, "detail-balance")
        assert "中转站A" in text_of(browser, "cache-warning") and words[2] in text_of(browser, "cache-warning")
        # Charts: a column per day of the range; the values are the points' names.
        go(browser, "usage")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-tokens g[data-col]")) == 7)
        today = time.strftime("%Y-%m-%d")
        columns = browser.find_elements(By.CSS_SELECTOR, "#chart-cost g[data-col]")
        last = columns[-1].get_attribute("aria-label")
        assert last.startswith(today) and "中转站A: " in last and "🚀备用: " + words[3] in last
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-hit g[data-col]")) == 7
        hits = browser.find_elements(By.CSS_SELECTOR, "#chart-hit g[data-col]")[-1].get_attribute("aria-label")
        assert "中转站A: 16.4%" in hits and "🚀备用: 26.3%" in hits           # 1000 / 6100; 5 / 19
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-hit circle")) == 2
        # first byte: a line a provider over the days, its median each day
        ttfb = [g.get_attribute("aria-label") for g in browser.find_elements(By.CSS_SELECTOR, "#chart-ttfb g[data-col]")]
        assert len(ttfb) == 7 and "中转站A: " in ttfb[-1] and " ms" in ttfb[-1]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-ttfb path")) == 2
        # 16 relays keep 16 colours; each is named in the legend beside its colour
        assert len(set(browser.execute_script(
            "return [...Array(16).keys()].map(i => getComputedStyle(document.documentElement).getPropertyValue('--c' + i).trim())"))) == 16
        assert [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#usage-legend .legend")] == ["中转站A", "🚀备用"]
        rows = browser.find_elements(By.CSS_SELECTOR, "#usage-table tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["中转站A", "🚀备用"]
        # the cost is the second column, on screen at any width
        cost = rows[0].find_elements(By.TAG_NAME, "td")[1]
        assert "USD" in cost.text
        assert browser.execute_script("const r = arguments[0].getBoundingClientRect(); return r.right <= innerWidth", cost)
        assert words[1] in browser.find_element(By.ID, "usage-total").text
        # Download CSV: the file the page saves names its columns in the page's language.
        browser.execute_script("const made = URL.createObjectURL; URL.createObjectURL = blob => "
                               "{ blob.text().then(text => { window.savedCsv = text; }); return made.call(URL, blob); };")
        click(browser, lambda d: d.find_element(By.ID, "usage-csv"))
        saved = wait(browser, lambda d: d.execute_script("return window.savedCsv"))
        header, first = saved.lstrip("\ufeff").splitlines()[:2]
        assert header.startswith({"en": "day,provider,model,requests,errors,input,output",
                                  "zh": "日期,供应商,模型,请求,错误,输入,输出"}[lang])
        assert first.startswith(today + ",中转站A,claude-sonnet-4-5,")
        # the conversation, with the relay it was on and its cost
        wait(browser, lambda d: "0f3c9a64…" in d.find_element(By.ID, "sessions").text)
        assert "中转站A" in browser.find_element(By.CSS_SELECTOR, "#sessions tbody tr").text
        # Keyboard: one tab stop a chart, arrows move, the value shows beside the point.
        first = columns[0]
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus()", first)
        browser.switch_to.active_element.send_keys(Keys.END)
        wait(browser, lambda d: d.switch_to.active_element.get_attribute("aria-label") == last)
        tip = browser.find_element(By.ID, "chart-tip")
        assert tip.is_displayed() and tip.text == last
        assert [c.get_attribute("tabindex") for c in columns].count("0") == 1
        # Today by hour: 24 columns, the requests in the hour they were made.
        Select(browser.find_element(By.ID, "usage-range")).select_by_value("1")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-tokens g[data-col]")) == 24)
        hours = [g.get_attribute("aria-label") for g in browser.find_elements(By.CSS_SELECTOR, "#chart-tokens g[data-col]")]
        assert hours[0].startswith(today + " 00") and sum("中转站A: " in h for h in hours) >= 1
        Select(browser.find_element(By.ID, "usage-range")).select_by_value("7")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-tokens g[data-col]")) == 7)
        colour = browser.execute_script("return getComputedStyle(document.querySelector('svg.chart text')).fill")
        assert colour == {"light": "rgb(88, 98, 115)", "dark": "rgb(169, 178, 192)"}[scheme]   # --muted
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, "the page scrolls sideways by %d px" % overflow
        assert run_axe(browser) == []
        # Requests: each with its cache read/write and cost; a model without a price says so.
        go(browser, "requests")
        wait(browser, lambda d: words[3] in d.find_element(By.ID, "requests").text)
        assert "1.0k / 5.0k" in browser.find_element(By.ID, "requests").text
        # Switching mid-conversation: the page says what the new relay's cache write costs first;
        # toward a relay without a price, that it cannot say (not "about no price"); and offers to
        # let each conversation go idle where its cache is first.
        go(browser, "relays")
        click(browser, lambda d: provider_card(d, "🚀备用").find_element(By.CSS_SELECTOR, "[data-action=select]"))
        wait(browser, lambda d: d.find_element(By.ID, "switch").is_displayed())
        said = browser.find_element(By.ID, "switch").text
        assert words[4] in said and "6.1k" in said and words[5] in said   # glm-4.6 has no price
        assert ("about no price" if lang == "en" else "约 无价格") not in said
        assert browser.switch_to.active_element.get_attribute("id") == "switch-idle"
        click(browser, lambda d: d.find_element(By.ID, "switch-cancel"))
        time.sleep(0.3)
        assert proxy.store.view.selected == "中转站A"
        click(browser, lambda d: provider_card(d, "🚀备用").find_element(By.CSS_SELECTOR, "[data-action=select]"))
        click(browser, lambda d: d.find_element(By.ID, "switch-idle"))
        wait(browser, lambda d: proxy.store.view.selected == "🚀备用")
        # the conversation stays where its cache is until it goes idle, and the page says so
        go(browser, "usage")
        wait(browser, lambda d: words[6] in d.find_element(By.ID, "sessions").text)
        # what each kind of request costs: these came without Claude Code's hint headers
        assert words[7] in browser.find_element(By.ID, "classes").text
        assert run_axe(browser) == []
    finally:
        proxy.stop()


@pytest.mark.parametrize("lang, width", [("en", 1280), ("zh", 390)])
def test_user_keys_in_the_page(browser, tmp_path, upstream, upstream2, lang, width):
    """Create a key for 小王 in the page: its secret is shown once (and copied with its
    settings.json), only its hash reaches config.json, it relays and is refused the page's API;
    then disable it, give it a new secret and delete it."""
    import hashlib
    config = make_config(upstream, upstream2)
    config["Providers"][0]["name"] = "中转站A"
    path = write_config(tmp_path / "config.json", config)
    proxy = start_proxy(path)
    proxy.config_path = path
    words = {"en": ("Key for 小王", "disabled", "Disable", "New secret", "Delete", "limits: 30/min", "Edit", "limits: 5/min"),
             "zh": ("小王 的密钥", "已停用", "停用", "换新密钥", "删除", "限额：30/分钟", "编辑", "限额：5/分钟")}[lang]
    try:
        browser.set_window_size(width, 900)
        login(browser, proxy, lang)
        browser.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": proxy.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        go(browser, "keys")
        click(browser, lambda d: d.find_element(By.ID, "add-key"))
        wait(browser, lambda d: d.find_element(By.ID, "key-editor").is_displayed())
        assert run_axe(browser) == []
        browser.find_element(By.ID, "key-name").send_keys("小王")
        browser.find_element(By.ID, "key-rpm").send_keys("30")
        browser.find_element(By.ID, "key-models").send_keys("claude-sonnet-*, claude-haiku-*")
        provider_box = [b for b in browser.find_elements(By.CSS_SELECTOR, "#key-providers input") if b.get_attribute("value") == "中转站A"][0]
        provider_box.click()
        browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        wait(browser, lambda d: d.find_element(By.ID, "key-secret").is_displayed())
        assert browser.find_element(By.ID, "key-secret-title").text == words[0]
        secret = browser.find_element(By.ID, "key-secret-text").get_attribute("value")
        assert secret.startswith("sk-ccp-") and browser.switch_to.active_element.get_attribute("id") == "key-copy"
        click(browser, lambda d: d.find_element(By.ID, "key-copy-settings"))
        copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('ERR ' + e))")
        assert json.loads(copied)["env"]["ANTHROPIC_AUTH_TOKEN"] == secret
        assert run_axe(browser) == []
        click(browser, lambda d: d.find_element(By.ID, "key-secret-close"))
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() in text
        entry = json.loads(text)["Keys"][0]
        assert entry["providers"] == ["中转站A"] and entry["rpm"] == 30
        # The key relays; the page's API is not its to call.
        body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []}
        assert proxy.call("POST", "/v1/messages", body, key=secret)[0] == 200
        assert proxy.call("GET", "/api/state", key=secret)[0] == 403
        row = lambda d: d.find_element(By.CSS_SELECTOR, '#keys li[data-key="小王"]')
        wait(browser, lambda d: words[5] in row(d).text)
        assert secret not in browser.find_element(By.ID, "app").get_attribute("textContent")
        # Edit: another limit, every provider; the secret stays.
        click(browser, lambda d: row(d).find_element(By.XPATH, ".//button[text()='%s']" % words[6]))
        wait(browser, lambda d: d.find_element(By.ID, "key-editor").is_displayed())
        assert browser.find_element(By.ID, "key-rpm").get_attribute("value") == "30"
        browser.find_element(By.ID, "key-rpm").clear()
        browser.find_element(By.ID, "key-rpm").send_keys("5")
        [b for b in browser.find_elements(By.CSS_SELECTOR, "#key-providers input") if b.is_selected()][0].click()
        browser.find_element(By.ID, "key-submit").click()
        wait(browser, lambda d: words[7] in row(d).text)
        entry = config_on_disk(proxy)["Keys"][0]
        assert entry["rpm"] == 5 and "providers" not in entry and entry["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
        click(browser, lambda d: row(d).find_element(By.XPATH, ".//button[text()='%s']" % words[2]))
        wait(browser, lambda d: words[1] in row(d).text)
        assert proxy.call("POST", "/v1/messages", body, key=secret)[0] == 401
        click(browser, lambda d: row(d).find_element(By.XPATH, ".//button[text()='%s']" % words[3]))
        browser.switch_to.alert.accept()
        wait(browser, lambda d: d.find_element(By.ID, "key-secret").is_displayed())
        fresh = browser.find_element(By.ID, "key-secret-text").get_attribute("value")
        assert fresh != secret and proxy.call("POST", "/v1/messages", body, key=secret)[0] == 401
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)              # closed by Escape: the secret goes too
        wait(browser, lambda d: not d.find_element(By.ID, "key-secret").is_displayed())
        assert browser.find_element(By.ID, "key-secret-text").get_attribute("value") == ""
        assert fresh not in browser.page_source
        click(browser, lambda d: row(d).find_element(By.XPATH, ".//button[text()='%s']" % words[4]))
        browser.switch_to.alert.accept()
        wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, '#keys li[data-key="小王"]'))
        assert proxy.call("POST", "/v1/messages", body, key=fresh)[0] == 401
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
    finally:
        proxy.stop()


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_user_key_sees_its_own_usage_not_the_page(browser, tmp_path, upstream, upstream2, lang):
    import hashlib
    secret = "sk-ccp-page-user-0123456789abcdefghijklmnopq"
    config = make_config(upstream, upstream2, Keys=[{"name": "小王", "sha256": hashlib.sha256(secret.encode()).hexdigest(),
                                                     "rpm": 30, "models": ["claude-*"]}])
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    words = {"en": ("requests this minute", "30", "no limits", "only claude-*"),
             "zh": ("本分钟请求", "30", "不限额", "仅限 claude-*")}[lang]
    try:
        body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []}
        for _ in range(2):
            assert proxy.call("POST", "/v1/messages", body, key=secret)[0] == 200
        browser.get(proxy.url + "/")
        browser.execute_script("localStorage.setItem('ccproxy.lang', arguments[0])", lang)
        browser.get(proxy.url + "/")
        wait(browser, lambda d: d.find_element(By.ID, "password").is_displayed())
        browser.find_element(By.ID, "password").send_keys(secret)
        browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
        wait(browser, lambda d: d.find_element(By.ID, "me").is_displayed())
        assert not browser.find_element(By.ID, "app").is_displayed()
        assert browser.find_element(By.ID, "me-name").text == "小王"
        rows = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "th, td")]
                for r in browser.find_elements(By.CSS_SELECTOR, "#me-limits tbody tr")]
        assert rows[0][:2] == [words[0], words[1]] and int(rows[0][2]) + int(rows[0][3]) == 30  # 2 used, or 0 in a new minute
        assert rows[1][1] == words[2]
        assert words[3] in browser.find_element(By.ID, "me-scope").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#me-recent tbody tr")) == 2
        assert run_axe(browser) == []
        # on a phone a number stays whole ("30", never "3 / 0" over two lines)
        browser.set_window_size(390, 844)
        assert browser.execute_script("""return [...document.querySelectorAll('#me-limits td')]
            .every(td => td.getClientRects().length === 1 && td.getBoundingClientRect().height < 40)""")
        browser.set_window_size(1280, 900)
        # Disabled meanwhile: the view, refreshing by itself, goes back to the login with the reason;
        # logging in again says it too, in the page's language.
        reason = {"en": "key 小王 is disabled", "zh": "密钥 小王 已停用"}[lang]
        version = proxy.api("GET", "/api/config")[1]["version"]
        assert proxy.call("PUT", "/api/keys/" + quote("小王"), {"enabled": False},
                          headers={"If-Match": version})[0] == 200
        browser.execute_script("refreshMe()")
        wait(browser, lambda d: d.find_element(By.ID, "password").is_displayed())
        assert reason in browser.find_element(By.ID, "login-error").text
        browser.find_element(By.ID, "password").send_keys(secret)
        browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
        wait(browser, lambda d: reason in d.find_element(By.ID, "login-error").text)
        assert "ccproxy:" not in browser.find_element(By.ID, "login-error").text     # not "cannot reach"
    finally:
        proxy.stop()


# Of what a person can press or type into in the view shown (a checkbox counts with its
# label, its target): how many; those covered by something else once scrolled to, at any
# scroll position it takes; and those under 44 px either way. A chart's day columns are its
# data points, not controls (one tab stop, arrows move; a month is 30 of them; the table
# below the charts holds the same figures): they count for cover, not for size.
CHECK_VIEW = """
    const seen = n => { const r = n.getBoundingClientRect(), s = getComputedStyle(n);
                        return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && r.left > -1000; };
    const all = [...document.querySelectorAll('button, a[href], input, select, textarea, summary, [tabindex="0"]')]
        .filter(n => n.closest('#app') && seen(n) && !n.closest('.dialog'))
        .map(n => n.type === 'checkbox' && n.closest('label') ? n.closest('label') : n);
    const name = n => n.id || n.textContent.trim().slice(0, 30);
    const covered = [], small = [];
    for (const n of all) {
        n.scrollIntoView({block: 'center', inline: 'nearest'});
        const r = n.getBoundingClientRect(), hit = document.elementFromPoint(r.left + Math.min(r.width / 2, 20), r.top + r.height / 2);
        if (!hit || !(n === hit || n.contains(hit))) covered.push([name(n), hit && (hit.id || hit.tagName)]);
        if (!n.closest('svg') && (r.width < 44 || r.height < 44)) small.push(name(n) + ' ' + Math.round(r.width) + 'x' + Math.round(r.height));
    }
    window.scrollTo(0, 0);
    return [all.length, covered, small];"""


@pytest.mark.parametrize("lang, width, scheme", [("en", 1366, "light"), ("zh", 1366, "dark"), ("en", 390, "dark"), ("zh", 390, "light")])
def test_views_nothing_covered_and_phone_targets(browser, tmp_path, upstream, upstream2, lang, width, scheme):
    """Every view is one at a time, by URL and by keyboard; at any scroll position nothing
    covers a control of the view shown (the sticky relay details used to float over the
    charts); on a phone the switcher is on the first screen and one tap switches, and every
    control is at least 44 px each way."""
    config = make_config(upstream, upstream2, Fallback=["中转站丙"])
    names = ["中转站%s" % c for c in "甲乙丙丁戊己庚辛壬癸子丑"]
    config["Providers"] = [dict(config["Providers"][0], name=n, comment="线路 " + n) for n in names]
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    try:
        set_scheme(browser, scheme)
        browser.set_window_size(width, 844)
        login(browser, proxy, lang)
        phone = width < 800
        if phone:
            # The switcher first: the first cards, with their "use" button, are on the first
            # screen, and one tap switches (no conversation under way: nothing to warn of).
            use = '[data-name="中转站乙"] [data-action=select]'
            bottom = browser.execute_script("return document.querySelector(arguments[0]).getBoundingClientRect().bottom", use)
            assert 0 < bottom <= browser.execute_script("return innerHeight") - 60      # above the tab bar
            wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, use).click() or True)
            wait(browser, lambda d: proxy.store.view.selected == "中转站乙")
        proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})
        for view in ("relays", "usage", "requests", "keys", "settings"):
            go(browser, view)
            assert browser.current_url.endswith("#" + view)
            assert browser.find_element(By.CSS_SELECTOR, "nav.views a[aria-current=page]").get_attribute("data-view") == view
            assert [v.get_attribute("id") for v in browser.find_elements(By.CSS_SELECTOR, "section.view")
                    if v.is_displayed()] == ["view-" + view]
            assert browser.switch_to.active_element.get_attribute("id") == "h-" + view      # focus follows the link
            time.sleep(0.3)                                               # charts drawn at their width
            count, covered, small = browser.execute_script(CHECK_VIEW)
            assert count > 3 and not covered, (view, covered)
            if phone:
                assert not small, (view, small)
        if phone:
            # a dialog's controls too (the provider editor)
            go(browser, "relays")
            click(browser, lambda d: d.find_element(By.ID, "add-provider"))
            wait(browser, lambda d: d.find_element(By.ID, "editor").is_displayed())
            small = browser.execute_script("""return [...document.querySelectorAll('#editor button, #editor input, #editor select, #editor textarea')]
                .filter(n => n.offsetParent).map(n => n.type === 'checkbox' ? n.closest('label') : n)
                .filter(n => { const r = n.getBoundingClientRect(); return r.width < 44 || r.height < 44; }).map(n => n.id || n.textContent)""")
            assert not small, small
            browser.switch_to.active_element.send_keys(Keys.ESCAPE)
            go(browser, "settings")
        # the menu, open: its items too
        click(browser, lambda d: d.find_element(By.ID, "menu-btn"))
        items = browser.find_elements(By.CSS_SELECTOR, "#menu button")
        assert items and browser.switch_to.active_element == items[0]
        if phone:
            assert all(i.rect["height"] >= 44 and i.rect["width"] >= 44 for i in items)
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)
        assert not browser.find_element(By.ID, "menu").is_displayed()
        assert browser.switch_to.active_element.get_attribute("id") == "menu-btn"
        # a reload keeps the view; the browser's Back goes to the one before
        browser.refresh()
        wait(browser, lambda d: d.find_element(By.ID, "view-settings").is_displayed())
        browser.back()
        before = "relays" if phone else "keys"         # on a phone the editor was opened from Providers
        wait(browser, lambda d: d.find_element(By.ID, "view-" + before).is_displayed())
        # keyboard only: a view's link, Enter
        press(browser, "nav.views a[data-view=usage]")
        wait(browser, lambda d: d.find_element(By.ID, "view-usage").is_displayed())
        assert browser.switch_to.active_element.get_attribute("id") == "h-usage"
    finally:
        proxy.stop()


def test_what_the_server_says_is_said_in_chinese(browser, tmp_path, upstream, upstream2):
    """The 中文 page words what ccproxy says in Chinese, from its code and values: a provider
    test's and a balance's reason, a failed reload, a save refused with its problems; and the
    server's files are named, never their paths."""
    import socket
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                       # nothing listens there: connection refused
    config = make_config(upstream, upstream2)
    config["Providers"].append({"name": "断线中转", "api_base_url": "http://127.0.0.1:%d/v1/messages" % port,
                                "api_key": "sk-down-0123456789"})
    path = write_config(tmp_path / "config.json", config)
    proxy = start_proxy(path)
    english = re.compile(r"\b(must|cannot|refused|not|the|is|no)\b")
    try:
        login(browser, proxy, "zh")
        assert proxy.api("POST", "/api/test", {"provider": "断线中转"})[0] == 200
        proxy.api("GET", "/api/balance?refresh=1&provider=" + quote("断线中转"))
        click(browser, lambda d: provider_card(d, "断线中转").find_element(By.CSS_SELECTOR, "button.name"))
        wait(browser, lambda d: "连接被拒绝" in d.find_element(By.ID, "detail-health").text, timeout=8)
        wait(browser, lambda d: "余额：无法查询 —— 连接被拒绝" in d.find_element(By.ID, "detail-balance").text, timeout=8)
        assert "connection refused" not in browser.find_element(By.ID, "detail").text
        # a request that could not reach its relay: the Requests view says why, in Chinese
        proxy.api("POST", "/api/select", {"provider": "断线中转"})
        proxy.api("POST", "/api/fallback", {"enabled": False})
        assert proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})[0] == 502
        go(browser, "requests")
        wait(browser, lambda d: "无法连接位于 127.0.0.1:%d 的供应商 断线中转：连接被拒绝" % port
             in d.find_element(By.ID, "requests").text, timeout=8)
        # a save refused, with each problem in Chinese and the file by its name
        go(browser, "settings")
        wait(browser, lambda d: d.find_element(By.ID, "set-pricing").get_attribute("value").startswith("{"))
        browser.execute_script("document.getElementById('set-pricing').value = arguments[0]",
                               json.dumps({"currency": "USD", "models": {"claude-*": {"input": -1}}}))
        click(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#settings-form button[type=submit]"))
        wait(browser, lambda d: "必须是不小于 0 的数" in d.find_element(By.ID, "settings-errors").text)
        errors = browser.find_element(By.ID, "settings-errors").text
        assert "config.json: Pricing.models.claude-*" in errors and "缺少 output" in errors
        assert not english.search(errors), errors
        # a reload of a broken file: where, in Chinese; nothing of the server's paths
        with open(path, "w", encoding="utf-8") as f:
            f.write("{\n  oops")
        menu(browser, "#reload")
        wait(browser, lambda d: d.find_element(By.ID, "reload-error").is_displayed())
        text = browser.find_element(By.ID, "reload-error").text
        assert "config.json: 第 2 行第 3 列：JSON 无效" in text and str(tmp_path) not in browser.page_source
    finally:
        proxy.stop()


def test_routes_are_edited_as_rules_and_the_failover_order_is_shown(browser, tmp_path, upstream, upstream2):
    """Settings → Routes: rows of model glob, request class, agent type and relay; a misspelt
    class is refused in Chinese with the classes Claude Code sends; FALLBACK_ORDER is chosen
    there, and the failover panel says the order it would try now."""
    config = make_config(upstream, upstream2, Routes={"*haiku*": "备用站"}, Fallback=["备用站"])
    config["Providers"][0]["name"] = "中转站A"
    config["Providers"][2]["name"] = "备用站"
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    proxy.config_path = str(tmp_path / "config.json")

    def rows(d):
        return d.find_elements(By.CSS_SELECTOR, "#routes-table tbody tr")

    def save():
        click(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#settings-form button[type=submit]"))
    try:
        login(browser, proxy, "zh")
        go(browser, "settings")
        wait(browser, lambda d: len(rows(d)) == 1)
        first = rows(browser)[0]
        assert first.find_elements(By.TAG_NAME, "input")[0].get_attribute("value") == "*haiku*"
        assert Select(first.find_element(By.TAG_NAME, "select")).first_selected_option.text == "备用站"
        click(browser, lambda d: d.find_element(By.ID, "routes-add"))
        added = rows(browser)[1]
        assert browser.switch_to.active_element == added.find_elements(By.TAG_NAME, "input")[0]
        assert added.find_elements(By.TAG_NAME, "input")[1].get_attribute("aria-label") == "请求种类, 第 2 条规则"
        added.find_elements(By.TAG_NAME, "input")[1].send_keys("compactoin")
        save()
        wait(browser, lambda d: "请选择中转" in d.find_element(By.ID, "settings-errors").text)
        Select(added.find_element(By.TAG_NAME, "select")).select_by_visible_text("备用站")
        save()
        wait(browser, lambda d: "请求种类 compactoin 不存在" in d.find_element(By.ID, "settings-errors").text)
        assert "compaction" in browser.find_element(By.ID, "settings-errors").text
        field = added.find_elements(By.TAG_NAME, "input")[1]
        field.clear()
        field.send_keys("compaction,auxiliary")
        Select(browser.find_element(By.ID, "set-fallback-order")).select_by_value("cheapest")
        save()
        # The toast (the first "saved" of this page) says the save's answer came: ccproxy writes
        # the file, then takes it in use, so the file alone may be a moment early.
        wait(browser, lambda d: d.find_element(By.ID, "toast").get_attribute("textContent") == "已保存到 config.json")
        assert config_on_disk(proxy).get("Routes") == {"*haiku*": "备用站", "class=compaction,auxiliary": "备用站"}
        assert config_on_disk(proxy)["FALLBACK_ORDER"] == "cheapest"
        assert proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []},
                          headers={"x-claude-code-request-class": "auxiliary"})[1]["x-ccproxy-provider"] == "%E5%A4%87%E7%94%A8%E7%AB%99"
        # a rule removed with its ✕; focus goes to "add a rule"
        click(browser, lambda d: rows(d)[0].find_element(By.TAG_NAME, "button"))
        assert browser.switch_to.active_element.get_attribute("id") == "routes-add"
        save()
        wait(browser, lambda d: config_on_disk(proxy).get("Routes") == {"class=compaction,auxiliary": "备用站"})
        go(browser, "relays")
        wait(browser, lambda d: "现在的尝试顺序（最便宜的优先（价格 × 倍率））：中转站A → 备用站"
             in d.find_element(By.ID, "fallback-now").text)
        assert run_axe(browser) == []
    finally:
        proxy.stop()


def test_the_page_installs_like_an_app(browser, ui_proxy):
    """Chromium finds the manifest and its icons and has nothing against installing the page
    (on localhost, as on https)."""
    browser.get(ui_proxy.url + "/")
    wait(browser, lambda d: d.execute_cdp_cmd("Page.getAppManifest", {}).get("data"))
    manifest = browser.execute_cdp_cmd("Page.getAppManifest", {})
    assert manifest["errors"] == [] and '"standalone"' in manifest["data"]
    assert browser.execute_cdp_cmd("Page.getInstallabilityErrors", {})["installabilityErrors"] == []


def test_the_page_says_when_the_shared_store_is_away_in_chinese(browser, tmp_path, upstream, pg_url, pg_cluster):
    """With STORE: the page says, in Chinese, that the shared store cannot be reached (a
    banner, and a change refused with why), and that it is back."""
    path = write_config(tmp_path / "config.json", make_config(upstream, STORE=pg_url,
                                                              Fallback=[], Providers=[
                                                                  {"name": "中转站甲", "api_base_url": upstream.url,
                                                                   "api_key": "sk-relay-jia-0123456789"},
                                                                  {"name": "中转站乙", "api_base_url": upstream.url,
                                                                   "api_key": "sk-relay-yi-0123456789"}]))
    proxy = start_proxy(path)
    try:
        login(browser, proxy, "zh")
        assert not browser.find_element(By.ID, "store-down").is_displayed()
        go(browser, "settings")         # where the settings are saved: the shared store, not config.json
        wait(browser, lambda d: "保存在共享存储 postgresql://postgres@" in text_of(d, "settings-store"))
        go(browser, "relays")
        pg_cluster.stop()
        try:
            wait(browser, lambda d: d.find_element(By.ID, "store-down").is_displayed(), timeout=15)
            assert "共享存储" in text_of(browser, "store-down") and "请求照常转发" in text_of(browser, "store-down")
            click(browser, lambda d: provider_card(d, "中转站乙").find_element(By.CSS_SELECTOR, "[data-action=select]"))
            wait(browser, lambda d: "无法连接共享存储" in d.find_element(By.ID, "toast").text)
            assert proxy.store.view.selected == "中转站甲"
        finally:
            pg_cluster.start()
        wait(browser, lambda d: not d.find_element(By.ID, "store-down").is_displayed(), timeout=20)
        assert proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5,
                                                   "messages": [{"role": "user", "content": "你好"}]})[0] == 200
        go(browser, "requests")     # which host answered, under its time
        wait(browser, lambda d: socket.gethostname() in d.find_element(By.ID, "requests").text, timeout=8)
    finally:
        proxy.stop()
