"""What ccproxy offers Claude Code to read: managed settings whose modelPricing makes its spend
figures the relays' prices (with a command per system that installs them), /model rows by
relay (modelPicker), and /v1/models descriptions; shapes as Claude Code 2.1.332 reads them."""

import json
import subprocess

import pytest


PRICING = {"currency": "USD", "models": {"claude-opus-5-5": {"input": 4, "output": 20},
                                         "claude-sonnet-*": {"input": 3, "output": 15},
                                         "glm-4.6": {"input": 0.6, "output": 2.2, "cache_read": 0.11}}}


@pytest.fixture
def relays(proxy_with):
    return proxy_with(Pricing=PRICING, providers={
        "alpha": {"name": "中转站甲", "price_multiplier": 0.5, "models": ["claude-opus-5-5", "claude-sonnet-4-5"]},
        "beta": {"name": "中转站乙", "models": ["glm-4.6"]}})


def test_managed_pricing_is_each_relays_price(relays):
    status, got = relays.api("GET", "/api/claude-code")
    assert status == 200 and got["currency"] == "USD" and got["selected"] == "中转站甲"
    overrides = got["managed"]["modelPricing"]["overrides"]
    assert set(got["managed"]) == {"modelPricing"} and set(got["managed"]["modelPricing"]) == {"overrides"}
    for prices in overrides.values():
        assert set(prices) == {"input", "output", "cacheRead", "cacheWrite"}
        assert all(isinstance(v, (int, float)) and v >= 0 for v in prices.values())
    aliases = {k: v for k, v in overrides.items() if k.startswith("claude-via-")}
    by_model = {k.split("--", 1)[1]: v for k, v in aliases.items()}
    # the relay's price: Pricing × its multiplier; cache prices by Anthropic's rule when left out
    assert by_model["claude-opus-5-5"] == {"input": 2, "output": 10, "cacheRead": 0.2, "cacheWrite": 2.5}
    assert by_model["glm-4.6"] == {"input": 0.6, "output": 2.2, "cacheRead": 0.11, "cacheWrite": 0.75}
    # a plain id is priced as the selected relay serves it
    assert overrides["claude-opus-5-5"] == by_model["claude-opus-5-5"]
    assert overrides["claude-sonnet-4-5"] == {"input": 1.5, "output": 7.5, "cacheRead": 0.15, "cacheWrite": 1.875}
    # the path per system, and a command that installs exactly this file
    assert got["paths"]["linux"] == "/etc/claude-code/managed-settings.json"
    assert got["paths"]["macos"].startswith("/Library/Application Support/ClaudeCode/")
    assert got["paths"]["windows"].startswith("C:\\Program Files\\ClaudeCode\\")
    assert got["install"]["linux"].startswith("sudo mkdir -p /etc/claude-code && printf ") and "\n" not in got["install"]["linux"]
    assert "[IO.File]::WriteAllText('C:\\Program Files\\ClaudeCode\\managed-settings.json'" in got["install"]["windows"]


def test_the_install_command_writes_that_json(tmp_path):
    import ccproxy
    managed = {"modelPricing": {"overrides": {"claude-via-x--a'b": {"input": 1, "output": 2, "cacheRead": 0.1,
                                                                    "cacheWrite": 1.25}}}}
    text = json.dumps(managed, ensure_ascii=False, separators=(",", ":"))
    target = tmp_path / "it's here" / "managed-settings.json"
    command = ccproxy.install_command("linux", str(target), text)
    assert "\n" not in command and "\n" not in ccproxy.install_command("windows", "C:\\x\\m.json", text)
    subprocess.run(["sh", "-c", command.replace("sudo ", "")], check=True)
    assert json.loads(target.read_text(encoding="utf-8")) == managed


def test_the_model_picker_names_each_relay(relays):
    relays.api("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []})
    picker = relays.api("GET", "/api/claude-code")[1]["picker"]["modelPicker"]
    assert picker["replaceBuiltInOptions"] is False
    rows = {o["label"]: o for o in picker["options"]}
    assert set(rows) == {"claude-opus-5-5 · 中转站甲", "claude-sonnet-4-5 · 中转站甲", "glm-4.6 · 中转站乙"}
    glm = rows["glm-4.6 · 中转站乙"]
    assert glm["model"].startswith("claude-via-") and glm["model"].endswith("--glm-4.6")
    assert glm["behavesAs"] == "claude-sonnet-4-5"          # 中转站乙 maps sonnet to glm-4.6
    assert "behavesAs" not in rows["claude-opus-5-5 · 中转站甲"]
    assert all(len(o["description"]) <= 100 and o["description"].startswith(o["label"].split(" · ")[1])
               for o in picker["options"])


def test_v1_models_describes_each_row(relays):
    relays.api("GET", "/api/balance")
    status, _, body = relays.call("GET", "/v1/models?limit=100")
    rows = json.loads(body)["data"]
    assert status == 200 and rows
    for row in rows:
        relay = row["display_name"].split(" · ")[1].split(" (")[0] if " · " in row["display_name"] else "中转站甲"
        assert row["description"].startswith(relay) and len(row["description"]) <= 100
