"""Tier 3: the real page in headless Chromium (Debian's chromium + chromium-driver, selenium).

Skips with the reason when no browser is installed; .ci/run installs one. With
CCPROXY_SCREENSHOTS=1 the light and dark screenshots are written to docs/ for the README.
"""

import json
import os
import shutil
import time

import pytest

from conftest import APIKEY, ROOT, make_config, start_proxy, write_config

# .ci/run sets CCPROXY_REQUIRE_BROWSER=1: there a missing browser fails instead of skipping.
REQUIRED = bool(os.environ.get("CCPROXY_REQUIRE_BROWSER"))
if REQUIRED:
    from selenium import webdriver
else:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test-only dependency")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not REQUIRED,
                                reason="no chromium/chromedriver (apt-get install chromium chromium-driver)")
EVIL = "<img src=x onerror=alert(1)>"


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
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


@pytest.fixture
def ui_proxy(tmp_path, upstream, upstream2):
    config = make_config(upstream, upstream2)
    config["Providers"].append({"name": EVIL, "comment": "<b>bold?</b>", "api_base_url": upstream.url,
                                "api_key": "sk-evil-0000", "models": ["<script>x</script>"]})
    path = write_config(tmp_path / "config.json", config)
    proxy = start_proxy(path)
    proxy.config_path = path
    yield proxy
    proxy.stop()


def wait(driver, predicate, timeout=10):
    # the page rebuilds its lists on each poll, so an element found a moment ago may be gone
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException, IndexError)) \
        .until(lambda d: predicate(d))


def click(driver, find):
    """Click what find(driver) returns, finding it again if a poll re-rendered it meanwhile."""
    wait(driver, lambda d: find(d).click() or True)


def login(driver, proxy):
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


def test_the_page_end_to_end(browser, ui_proxy):
    login(browser, ui_proxy)
    names = [c.find_element(By.CSS_SELECTOR, ".name").text for c in browser.find_elements(By.CSS_SELECTOR, ".prov")]
    assert names == ["alpha", "beta", EVIL]
    assert browser.find_element(By.CSS_SELECTOR, ".sep").text == "----"
    # names, comments and model ids are text, never markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#providers img, #providers b, #models script")
    assert EVIL in browser.find_element(By.ID, "providers").text
    assert browser.find_element(By.ID, "selected-name").text == "alpha"

    # select another provider: the server's selection changes
    click(browser, lambda d: provider_card(d, "beta").find_element(By.CSS_SELECTOR, "[data-action=select]"))
    wait(browser, lambda d: ui_proxy.store.view.selected == "beta")
    wait(browser, lambda d: d.find_element(By.ID, "selected-name").text == "beta")

    # filter the viewed provider's models (comma-separated keywords match any)
    click(browser, lambda d: provider_card(d, "alpha"))
    wait(browser, lambda d: d.find_element(By.ID, "detail-name").get_attribute("textContent") == "alpha")
    box = browser.find_element(By.ID, "filter")
    box.send_keys("haiku")
    models = lambda d: [li.find_element(By.CSS_SELECTOR, "span").text for li in d.find_elements(By.CSS_SELECTOR, "#models li")]
    wait(browser, lambda d: models(d) == ["claude-haiku-4-5"])
    box.send_keys(", sonnet")
    wait(browser, lambda d: models(d) == ["claude-sonnet-4-5", "claude-haiku-4-5"])

    # copy /model x where navigator.clipboard is unavailable (plain http://server-ip) and
    # execCommand fails too: the text is shown selected for a manual copy
    browser.execute_script("Object.defineProperty(navigator, 'clipboard', {value: undefined});"
                           "document.execCommand = () => false;")
    click(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#models li button"))
    wait(browser, lambda d: d.find_element(By.ID, "manual").is_displayed())
    assert browser.find_element(By.ID, "manual-text").get_attribute("value") == "/model claude-sonnet-4-5"
    assert browser.execute_script("const a = document.getElementById('manual-text');"
                                  "return a.value.substring(a.selectionStart, a.selectionEnd);") \
        == "/model claude-sonnet-4-5"
    browser.find_element(By.ID, "manual-close").click()

    # failover: add two providers, move the second up, remove one; the server sees each edit
    from selenium.webdriver.support.ui import Select
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
    # a provider cooling down says so, with the reason
    ui_proxy.server.health.cool_down("beta", 60, "529")
    wait(browser, lambda d: "cooling down (529)" in provider_card(d, "beta").text, timeout=8)

    # requests panel: a relayed request shows up live, with its tokens; stats beside the provider
    ui_proxy.call("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})
    wait(browser, lambda d: "claude-sonnet-4-5" in d.find_element(By.ID, "requests").text, timeout=8)
    # 11 + 5 + 3 tokens in, 7 out: the mock's usage
    wait(browser, lambda d: "19 / 7" in d.find_element(By.CSS_SELECTOR, "#requests tbody tr").text)
    wait(browser, lambda d: "1 req · 100% ok" in provider_card(d, "beta").text, timeout=8)
    # test a provider and sort by the result: the failing one goes last
    click(browser, lambda d: provider_card(d, EVIL).find_element(By.CSS_SELECTOR, "[data-action=test]"))
    wait(browser, lambda d: "ok: first event in" in provider_card(d, EVIL).text, timeout=15)

    # a failed reload shows the problems and the running config stays
    with open(ui_proxy.config_path, "w") as f:
        f.write('{"Providers": [{"name": "x", "api_base_url": "not a url"}]}')
    browser.find_element(By.ID, "reload").click()
    wait(browser, lambda d: d.find_element(By.ID, "reload-error").is_displayed())
    assert "api_base_url must be an http(s) URL" in browser.find_element(By.ID, "reload-error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#providers .prov")) == 3


def test_clipboard_copy_and_chinese(browser, ui_proxy):
    login(browser, ui_proxy)
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": ui_proxy.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    browser.find_element(By.ID, "copy-url").click()
    wait(browser, lambda d: "show" in d.find_element(By.ID, "toast").get_attribute("class"))
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('ERR ' + e))")
    assert copied == ui_proxy.url
    browser.find_element(By.CSS_SELECTOR, "header .lang-toggle").click()
    wait(browser, lambda d: d.find_element(By.ID, "reload").text == "重载配置")
    browser.refresh()                                    # remembered, and still logged in
    wait(browser, lambda d: d.find_element(By.ID, "reload").text == "重载配置")
    wait(browser, lambda d: d.find_element(By.ID, "app").is_displayed())


def test_screenshots_light_and_dark(browser, tmp_path, upstream, upstream2):
    out = os.path.join(ROOT, "docs") if os.environ.get("CCPROXY_SCREENSHOTS") else str(tmp_path)
    config = make_config(upstream, upstream2)
    config["Providers"][0].update(name="anthropic", comment="Anthropic's own API")
    config["Providers"][1]["name"] = "----- relays -----"
    config["Providers"][2].update(name="relay-hk", comment="中转 · Hong Kong")
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
        wait(browser, lambda d: "first event in" in d.find_element(By.ID, "providers").text)
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#requests tbody tr")) == 3)
        shoot(browser, out)
    finally:
        proxy.stop()


def shoot(browser, out):
    wait(browser, lambda d: "models in" in d.find_element(By.ID, "providers").text)  # the next poll
    for scheme in ("light", "dark"):
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        time.sleep(0.3)                                  # let the new palette paint
        path = os.path.join(out, "webui-%s.png" % scheme)
        browser.save_screenshot(path)
        assert os.path.getsize(path) > 10000
    bg = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(21, 24, 29)"                       # the dark palette is in force


def test_phone_width_and_keyboard(browser, ui_proxy):
    from selenium.webdriver.common.keys import Keys
    browser.set_window_size(390, 844)
    login(browser, ui_proxy)
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page scrolls sideways at phone width by %d px" % overflow
    # keyboard only: focus beta's card, open it with Enter, select it with its button
    card = provider_card(browser, "beta")
    browser.execute_script("arguments[0].focus()", card)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "detail-name").get_attribute("textContent") == "beta")
    browser.switch_to.active_element.send_keys(Keys.TAB)          # the card's first button: select
    assert browser.switch_to.active_element.get_attribute("data-action") == "select"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: ui_proxy.store.view.selected == "beta")


def test_chinese_names_placeholder_keys_and_a_provider_refusing_its_key(browser, tmp_path, upstream, upstream2):
    config = make_config(upstream, upstream2, Fallback=["🚀备用"])
    config["Providers"][0].update(name="中转站A", comment="主力线路")
    config["Providers"][2].update(name="🚀备用")
    config["Providers"].append({"name": "示例", "api_base_url": upstream.url, "api_key": "sk-your-relay-key"})
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    try:
        login(browser, proxy)
        browser.find_element(By.CSS_SELECTOR, "header .lang-toggle").click()
        wait(browser, lambda d: d.find_element(By.ID, "reload").text == "重载配置")
        names = [c.get_attribute("data-name") for c in browser.find_elements(By.CSS_SELECTOR, ".prov")]
        assert names == ["中转站A", "🚀备用", "示例"]
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
        wait(browser, lambda d: "供应商 🚀备用 拒绝了它的密钥" in d.find_element(By.ID, "requests").text, timeout=8)
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
