"""The web UI's JSON API: every route, auth failures and bad input."""

import json

import pytest

import ccproxy
from conftest import APIKEY, KEY_A, KEY_B, start_proxy


def test_state_lists_providers_without_full_keys(proxy):
    status, state = proxy.api("GET", "/api/state")
    assert status == 200 and state["selected"] == "alpha"
    assert state["proxy_url"] == proxy.url
    assert [p["name"] for p in state["providers"]] == ["alpha", "----", "beta"]
    alpha, sep, beta = state["providers"]
    assert sep["separator"] and not alpha["separator"]
    assert alpha["key_hint"] == "…6789" and beta["base_url"].endswith("/anthropic")
    assert beta["env_models"]["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "glm-4.6"
    assert state["header_overrides"] == {"ua": {"User-Agent": "relay-ua", "x-app": ""}}
    assert "nothink" in state["request_overrides"]
    text = json.dumps(state)
    assert KEY_A not in text and KEY_B not in text and APIKEY not in text


def test_select(proxy):
    status, state = proxy.api("POST", "/api/select", {"provider": "beta"})
    assert status == 200 and state["selected"] == "beta" and proxy.store.view.selected == "beta"


@pytest.mark.parametrize("body, status, kind", [
    ({"provider": "nope"}, 404, "not_found_error"),
    ({"provider": "----"}, 400, "invalid_request_error"),     # a separator cannot be selected
    ({"provider": 3}, 400, "invalid_request_error"),
    ({}, 400, "invalid_request_error"),
    ([], 400, "invalid_request_error"),
])
def test_select_bad_input(proxy, body, status, kind):
    got, err = proxy.api("POST", "/api/select", body)
    assert got == status and err["type"] == "error" and err["error"]["type"] == kind
    assert proxy.store.view.selected == "alpha"


def test_malformed_json_is_400(proxy):
    status, _, data = proxy.call("POST", "/api/select", b"{provider:", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]["message"]


def test_overrides(proxy):
    status, state = proxy.api("POST", "/api/overrides",
                              {"provider": "beta", "header_override": "ua", "request_override": None})
    beta = state["providers"][2]
    assert status == 200 and beta["header_override"] == "ua" and beta["request_override"] is None
    assert proxy.api("POST", "/api/overrides", {"provider": "beta", "header_override": "zz"})[0] == 404
    assert proxy.api("POST", "/api/overrides", {"provider": "beta", "request_override": 1})[0] == 400
    assert proxy.api("POST", "/api/overrides", {"provider": "zz"})[0] == 404


def test_provider_key_and_settings(proxy):
    status, got = proxy.api("GET", "/api/providers/beta/key")
    assert status == 200 and got["api_key"] == KEY_B
    env = got["settings"]["env"]
    assert env["ANTHROPIC_BASE_URL"].endswith("/anthropic") and env["ANTHROPIC_AUTH_TOKEN"] == KEY_B
    assert env["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "glm-4.6" and "" not in env.values()
    assert proxy.api("GET", "/api/providers/nope/key")[0] == 404
    assert proxy.api("GET", "/api/providers/%2D%2D%2D%2D/key")[0] == 400


def test_refresh_models_one_and_all(proxy, upstream, upstream2):
    upstream.models = ["m%02d" % i for i in range(45)]        # three pages of 20
    status, got = proxy.api("POST", "/api/refresh-models", {"provider": "alpha"})
    result = got["results"]["alpha"]
    assert status == 200 and result["ok"] and result["count"] == 45
    assert result["message"].startswith("45 models in ")
    assert proxy.store.view.targets["alpha"].models == tuple(upstream.models)
    got_headers = upstream.last.headers
    assert got_headers["x-api-key"] == KEY_A and got_headers["authorization"] == "Bearer " + KEY_A
    upstream2.models_shape = "openai"
    upstream.fail_next(status=200, body=b"<html>login</html>", content_type="text/html")
    status, got = proxy.api("POST", "/api/refresh-models", {})
    assert got["results"]["beta"]["ok"] and got["results"]["beta"]["count"] == 2
    assert not got["results"]["alpha"]["ok"] and "HTML" in got["results"]["alpha"]["message"]
    # a failed refresh keeps the previously discovered list
    assert len(proxy.store.view.targets["alpha"].models) == 45
    status, state = proxy.api("GET", "/api/state")
    assert state["providers"][0]["refresh"]["ok"] is False


@pytest.mark.parametrize("status, body, ctype, reason", [
    (401, b"<html>denied</html>", "text/html", "HTTP 401 (HTML page, not JSON)"),
    (200, b"{\"models\": []}", "application/json", "not a model list"),
    (200, b"not json", "application/json", "not a model list"),
])
def test_refresh_failures_in_words(proxy, upstream, status, body, ctype, reason):
    upstream.fail_next(status=status, body=body, content_type=ctype)
    _, got = proxy.api("POST", "/api/refresh-models", {"provider": "alpha"})
    assert reason in got["results"]["alpha"]["message"]
    assert proxy.store.view.targets["alpha"].models == ("claude-sonnet-4-5", "claude-haiku-4-5")


def test_discovered_models_survive_a_restart(config_file, upstream):
    upstream.models = ["fresh-1", "fresh-2"]
    proxy = start_proxy(config_file)
    proxy.api("POST", "/api/refresh-models", {"provider": "alpha"})
    proxy.stop()
    proxy = start_proxy(config_file)
    try:
        assert proxy.store.view.targets["alpha"].models == ("fresh-1", "fresh-2")
        page = json.loads(proxy.call("GET", "/v1/models")[2])
        assert [m["id"] for m in page["data"]][:2] == ["fresh-1", "fresh-2"]     # then the aliases
    finally:
        proxy.stop()
    with open(config_file, encoding="utf-8") as f:
        assert "fresh-1" not in f.read()           # config.json itself is not rewritten


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/state"), ("POST", "/api/select"), ("POST", "/api/reload"), ("POST", "/api/overrides"),
    ("POST", "/api/refresh-models"), ("GET", "/api/providers/alpha/key"),
])
def test_every_route_needs_the_key(proxy, method, path):
    status, err = proxy.api(method, path, {"provider": "alpha"}, key=None)
    assert status == 401 and err["error"]["type"] == "authentication_error"


def test_unknown_api_route(proxy):
    assert proxy.api("GET", "/api/nothing")[0] == 404
    status, headers, data = proxy.call("DELETE", "/api/state")
    assert status == 405 and headers["allow"] == "GET" and json.loads(data)["type"] == "error"


def test_page_is_served_without_auth(proxy):
    status, headers, data = proxy.call("GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<title>ccproxy</title>" in data and b"https://" not in data.split(b"<script>")[0]
    assert headers["x-frame-options"] == "DENY"


def test_a_hostile_model_list_is_capped_and_cleaned(proxy, upstream):
    upstream.models_shape = "openai"        # one page, no paging: a relay that lists everything
    good = ["model-%05d" % i for i in range(30000)]
    upstream.models = good[:10] + ["x" * 20000, "evil\r\nX-Injected: 1", "nul\x00id", "模型-好"] + good[10:] + good[:5]
    status, body = proxy.api("POST", "/api/refresh-models", {"provider": "alpha"})
    result = body["results"]["alpha"]
    assert status == 200 and result["ok"] and result["count"] == ccproxy.MAX_MODELS
    assert result["dropped"] == 3 + (30000 + 1 - ccproxy.MAX_MODELS)       # the repeats are not counted
    assert "left out" in result["message"]
    models = proxy.store.view.targets["alpha"].models
    assert models[:11] == tuple(good[:10] + ["模型-好"]) and len(set(models)) == len(models)
    assert all(len(m) <= ccproxy.MODEL_ID_MAX and "\r" not in m and "\x00" not in m for m in models)


def test_a_model_list_past_the_size_cap_is_refused(proxy, upstream, monkeypatch):
    monkeypatch.setattr(ccproxy, "MODELS_MAX_BYTES", 4096)
    upstream.models_shape = "openai"
    upstream.models = ["model-%05d" % i for i in range(1000)]
    status, body = proxy.api("POST", "/api/refresh-models", {"provider": "alpha"})
    result = body["results"]["alpha"]
    assert status == 200 and not result["ok"] and "larger than" in result["message"]
    assert proxy.store.view.targets["alpha"].models == ("claude-sonnet-4-5", "claude-haiku-4-5")


def test_the_page_installs_on_a_home_screen(proxy):
    """The manifest and its icons: public (a browser fetches them without the key), drawn by
    ccproxy.py itself, linked from the page."""
    import struct
    import xml.etree.ElementTree as ET
    status, headers, body = proxy.call("GET", "/", key=None)
    page = body.decode()
    assert status == 200 and 'rel="manifest" href="manifest.webmanifest"' in page and 'href="icon-192.png"' in page
    status, headers, body = proxy.call("GET", "/manifest.webmanifest", key=None)
    assert status == 200 and headers["content-type"] == "application/manifest+json"
    manifest = json.loads(body)
    assert manifest["display"] == "standalone" and manifest["start_url"] == "./#relays"
    sizes = {}
    for icon in manifest["icons"]:
        status, headers, data = proxy.call("GET", "/" + icon["src"], key=None)
        assert status == 200 and headers["content-type"] == icon["type"]
        if icon["type"] == "image/png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
            width, height = struct.unpack(">II", data[16:24])
            sizes[icon["sizes"]] = (width, height)
        else:
            assert ET.fromstring(data).tag.endswith("svg")
    assert sizes == {"192x192": (192, 192), "512x512": (512, 512)}      # what a home screen asks for
    # HEAD like GET, without the body; other methods are refused with what is allowed
    status, headers, body = proxy.call("HEAD", "/icon.svg", key=None)
    assert status == 200 and body == b"" and headers["content-length"] == str(len(ccproxy.ICON_SVG))
    status, headers, _ = proxy.call("POST", "/manifest.webmanifest", key=None)
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert proxy.call("GET", "/icon-64.png", key=None)[0] == 404


def test_the_icon_png_is_a_valid_image():
    """Decoded back with zlib: the rows are whole, the corners transparent, the centre the
    accent colour, the arrows white."""
    import struct
    import zlib
    data = ccproxy.icon_png(192)
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + chunk)
        if kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == 192 * (1 + 192 * 4)
    pixel = lambda x, y: tuple(raw[y * (1 + 192 * 4) + 1 + x * 4:y * (1 + 192 * 4) + 5 + x * 4])
    assert pixel(0, 0)[3] == 0 and pixel(96, 96) == ccproxy.ICON_COLOUR + (255,)
    assert pixel(96, 72) == (255, 255, 255, 255)            # on the upper arrow (y 24 of 64)
