"""Tier 1: the pure transformations, called directly."""

import json

import pytest

import ccproxy


@pytest.mark.parametrize("url, base", [
    ("https://api.anthropic.com/v1/messages", "https://api.anthropic.com"),
    ("https://api.deepseek.com/anthropic/v1/messages", "https://api.deepseek.com/anthropic"),
    ("https://relay.example/anthropic/v1/messages/", "https://relay.example/anthropic"),
    ("https://relay.example/", "https://relay.example"),
    ("https://relay.example/api", "https://relay.example/api"),
    ("http://127.0.0.1:8080/v1/messages", "http://127.0.0.1:8080"),
    # only a trailing /v1/messages goes: the same text elsewhere stays
    ("https://v1/messages.example/x/v1/messages", "https://v1/messages.example/x"),
    ("  https://relay.example/v1/messages  ", "https://relay.example"),
])
def test_derive_base_url(url, base):
    assert ccproxy.derive_base_url(url) == base


MODELS = frozenset(["claude-sonnet-4-5", "glm-4.6"])
ENV = {"ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.5-air", "ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6",
       "ANTHROPIC_MODEL": "glm-4.6-default"}


@pytest.mark.parametrize("model, models, env, sent", [
    ("claude-sonnet-4-5", MODELS, ENV, "claude-sonnet-4-5"),            # listed: kept
    ("claude-sonnet-4-5[1m]", MODELS, ENV, "claude-sonnet-4-5"),        # suffix removed
    ("claude-sonnet-4-5-20250929", MODELS, ENV, "glm-4.6"),             # family: sonnet
    ("claude-3-5-haiku-20241022", MODELS, ENV, "glm-4.5-air"),          # family: haiku
    ("claude-opus-4-1", MODELS, ENV, "glm-4.6-default"),                # no opus entry: ANTHROPIC_MODEL
    ("some-model", MODELS, ENV, "glm-4.6-default"),
    ("claude-opus-4-1[1m]", MODELS, {}, "claude-opus-4-1"),             # no mapping: bare name
    ("CLAUDE-HAIKU-4-5", frozenset(), ENV, "glm-4.5-air"),              # family match ignores case
])
def test_map_model(model, models, env, sent):
    assert ccproxy.map_model(model, models, env) == sent


def test_effective_env_models_overlay_and_empty_values():
    merged = ccproxy.effective_env_models(
        {"ANTHROPIC_MODEL": "a", "ANTHROPIC_DEFAULT_HAIKU_MODEL": "h", "ANTHROPIC_DEFAULT_OPUS_MODEL": ""},
        {"ANTHROPIC_MODEL": "b", "ANTHROPIC_DEFAULT_HAIKU_MODEL": ""})
    assert merged == {"ANTHROPIC_MODEL": "b", "ANTHROPIC_DEFAULT_HAIKU_MODEL": "h"}


def test_end_to_end_drops_hop_by_hop_and_connection_tokens():
    headers = [("Connection", "keep-alive, X-Trace"), ("Keep-Alive", "timeout=5"), ("X-Trace", "1"),
               ("TE", "trailers"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
               ("Proxy-Authorization", "Basic x"), ("Host", "me"), ("Content-Length", "3"),
               ("anthropic-version", "2023-06-01"), ("anthropic-beta", "a,b"), ("x-app", "cli"),
               ("X-Stainless-OS", "Linux"), ("User-Agent", "claude-cli/2"), ("x-api-key", "k")]
    kept = ccproxy.end_to_end(headers, ccproxy.REQUEST_OWN)
    assert kept == [("anthropic-version", "2023-06-01"), ("anthropic-beta", "a,b"), ("x-app", "cli"),
                    ("X-Stainless-OS", "Linux"), ("User-Agent", "claude-cli/2")]


@pytest.mark.parametrize("headers, found", [
    ([("x-api-key", "k1")], ("k1", "x-api-key")),
    ([("Authorization", "Bearer k2")], ("k2", "bearer")),
    ([("authorization", "bearer  k3 ")], ("k3", "bearer")),
    ([("Authorization", "Basic abc")], ("", None)),
    ([], ("", None)),
])
def test_client_key(headers, found):
    assert ccproxy.client_key(headers) == found


@pytest.mark.parametrize("style, expected", [
    ("bearer", [("Authorization", "Bearer K")]),
    ("x-api-key", [("x-api-key", "K")]),
    ("both", [("x-api-key", "K"), ("Authorization", "Bearer K")]),
])
def test_auth_headers(style, expected):
    assert ccproxy.auth_headers("K", style) == expected


def test_header_preset_replaces_case_insensitively_and_empty_removes():
    headers = [("user-agent", "claude-cli/1"), ("x-app", "cli"), ("anthropic-version", "v")]
    out = ccproxy.apply_header_preset(headers, {"User-Agent": "relay", "X-App": "", "_comment": "c"})
    assert out == [("anthropic-version", "v"), ("User-Agent", "relay")]
    assert ccproxy.apply_header_preset(headers, None) is headers


def test_request_preset_merges_deletes_and_sets_in_place():
    body = '{"model": "m",  "thinking": {"type": "enabled"}, "metadata": {"user_id": "u"}, "new": [1.0, 2e3]}'
    out = ccproxy.patch_json(body, {"thinking": None, "metadata": {"tag": "t"}, "temperature": 0, "_comment": "x"})
    assert json.loads(out) == {"model": "m", "metadata": {"user_id": "u", "tag": "t"}, "new": [1.0, 2e3],
                               "temperature": 0}
    assert '"new": [1.0, 2e3]' in out and out.startswith('{"model": "m",  "metadata"')   # untouched bytes stay


@pytest.mark.parametrize("body, changes, expected", [
    ('{"a":1,"b":2,"c":3}', {"b": None}, '{"a":1,"c":3}'),
    ('{"a":1,"b":2,"c":3}', {"c": None}, '{"a":1,"b":2}'),
    ('{"a":1,"b":2,"c":3}', {"a": None}, '{"b":2,"c":3}'),
    ('{"only": 1}', {"only": None}, '{}'),
    ('{}', {"x": "é"}, '{"x": "é"}'),
    ('{"a": 1}', {"x": None}, '{"a": 1}'),
    ('{ "s": "\\u00e9\\n", "t": {"k": 1} }', {"t": {"k": None, "j": 2}},
     '{ "s": "\\u00e9\\n", "t": {"j": 2} }'),
    ('{"t": {"k": 1}}', {"t": ccproxy.Replace({"z": 0})}, '{"t": {"z": 0}}'),
    ('{"a":1,"b":2,"c":3}', {"b": None, "c": None}, '{"a":1}'),
])
def test_patch_json_changes_only_what_it_must(body, changes, expected):
    assert ccproxy.patch_json(body, changes) == expected


def test_redact_removes_configured_secrets_and_key_shapes():
    text = "key sk-ant-api03-abcdefghijkl and custom-secret-123 and sk-short"
    out = ccproxy.redact(text, ["custom-secret-123"])
    assert "abcdefghijkl" not in out and "custom-secret-123" not in out
    assert "sk-ant-ap***" in out


@pytest.mark.parametrize("key, hint", [
    ("sk-ant-api03-abcdefgh1234abcd", "sk-…abcd"), ("sk-ant-api03-abcdefgh1234", "…1234"),
    ("abcdefghijkl", "…jkl"), ("short", "…t"), ("abc", "…"), ("", ""),
])
def test_key_hint_shows_at_most_a_quarter_of_the_key(key, hint):
    assert ccproxy.key_hint(key) == hint
    assert len(hint.replace("…", "")) <= len(key) // 4


@pytest.mark.parametrize("length", range(1, 80))
def test_no_key_length_shows_more_than_a_quarter(length):
    key = "sk-" + "k" * length
    assert len(ccproxy.key_hint(key).replace("…", "")) <= len(key) // 4


@pytest.mark.parametrize("name, encoded", [
    ("alpha", "alpha"), ("relay 1, backup", "relay 1, backup"), ("中转站A", "%E4%B8%AD%E8%BD%AC%E7%AB%99A"),
    ("100%", "100%25"), ("a\r\nSet-Cookie: x", "a%0D%0ASet-Cookie: x"), ("🚀", "%F0%9F%9A%80"),
])
def test_header_text_percent_encodes_what_a_header_cannot_carry(name, encoded):
    import urllib.parse
    assert ccproxy.header_text(name) == encoded
    assert urllib.parse.unquote(encoded) == name
    encoded.encode("ascii")


@pytest.mark.parametrize("text, escaped", [
    ("claude\nINFO forged line", "claude\\nINFO forged line"), ("a\x00b", "a\\u0000b"),
    ("tab\there", "tab\\there"), ("中转站A 🚀", "中转站A 🚀"), ("x\u2028y\u202ez", "x\\u2028y\\u202ez"),
])
def test_escape_unprintable(text, escaped):
    assert ccproxy.escape_unprintable(text) == escaped


@pytest.mark.parametrize("obj, ids", [
    ({"data": [{"type": "model", "id": "a"}, {"id": "b"}], "has_more": False}, ["a", "b"]),
    ({"object": "list", "data": [{"id": "x", "object": "model"}, {"id": "x"}]}, ["x"]),
    ({"data": ["plain", "ids"]}, ["plain", "ids"]),
])
def test_parse_model_list(obj, ids):
    assert ccproxy.parse_model_list(obj) == ids


@pytest.mark.parametrize("obj", [{"models": []}, "text", {"data": "x"}])
def test_parse_model_list_rejects_other_shapes(obj):
    with pytest.raises(ValueError):
        ccproxy.parse_model_list(obj)


def test_model_page_paginates_like_anthropic():
    models = ["m%d" % i for i in range(5)]
    page = ccproxy.model_page(models, "limit=2")
    assert [m["id"] for m in page["data"]] == ["m0", "m1"] and page["has_more"]
    assert page["first_id"] == "m0" and page["last_id"] == "m1"
    page = ccproxy.model_page(models, "limit=2&after_id=m3")
    assert [m["id"] for m in page["data"]] == ["m4"] and not page["has_more"]
    assert page["data"][0]["type"] == "model"
    with pytest.raises(ccproxy.ClientError):
        ccproxy.model_page(models, "limit=x")


def test_error_shapes():
    assert json.loads(ccproxy.error_body("not_found_error", "no")) == {
        "type": "error", "error": {"type": "not_found_error", "message": "no"}}
    frame = ccproxy.sse_error("api_error", "cut")
    assert frame.startswith(b"event: error\ndata: {") and frame.endswith(b"\n\n")


@pytest.mark.parametrize("spec, kept", [
    ("", ["claude-sonnet-4-5", "claude-haiku-4-5", "glm-4.6"]),
    ("4-5", ["claude-sonnet-4-5", "claude-haiku-4-5"]),
    ("SONNET, glm", ["claude-sonnet-4-5", "glm-4.6"]),
    (" , ", ["claude-sonnet-4-5", "claude-haiku-4-5", "glm-4.6"]),
    ("opus", []),
])
def test_filter_models(spec, kept):
    assert ccproxy.filter_models(["claude-sonnet-4-5", "claude-haiku-4-5", "glm-4.6"], spec) == kept


class _View:
    def __init__(self, mapping=True):
        self.config = type("C", (), {"model_mapping": mapping})()


class _Target:
    request_preset = None
    model_set = frozenset(["glm-4.6", "claude-sonnet-4-5"])
    env_models = {"ANTHROPIC_DEFAULT_SONNET_MODEL": "glm-4.6"}


@pytest.mark.parametrize("body, sent_body, requested, sent", [
    # model first (Claude Code's layout): read and replaced in place, the rest byte for byte
    (b'{"model":"claude-sonnet-4-5","x":1}', b'{"model":"claude-sonnet-4-5","x":1}', "claude-sonnet-4-5", "claude-sonnet-4-5"),
    (b' { "model" : "claude-sonnet-9[1m]", "messages": [{"content": "\\"model\\": \\"x\\""}]}',
     b' { "model" : "glm-4.6", "messages": [{"content": "\\"model\\": \\"x\\""}]}', "claude-sonnet-9[1m]", "glm-4.6"),
    (b'{"model":"claude-sonnet-\\u00e9"}', b'{"model":"glm-4.6"}', "claude-sonnet-\u00e9", "glm-4.6"),
    # model later (the SDK's layout): a full parse, nested "model" keys do not confuse it
    (b'{"messages":[{"content":[{"type":"tool_use","input":{"model":"claude-sonnet-4-5"}}]}],"model":"claude-sonnet-x"}',
     b'{"messages":[{"content":[{"type":"tool_use","input":{"model":"claude-sonnet-4-5"}}]}],"model":"glm-4.6"}',
     "claude-sonnet-x", "glm-4.6"),
    (b'{"messages":[],"model":"glm-4.6"}', b'{"messages":[],"model":"glm-4.6"}', "glm-4.6", "glm-4.6"),
    (b'not json', b'not json', None, None),
])
def test_prepare_body_reads_and_maps_the_top_level_model(body, sent_body, requested, sent):
    out, got_requested, got_sent = ccproxy.prepare_body(_View(), _Target(), "/v1/messages", body)
    assert (out, got_requested, got_sent) == (sent_body, requested, sent)
    if sent is not None:
        assert json.loads(out)["model"] == sent


def test_parsed_headers_fold_and_answer_case_insensitively():
    headers = ccproxy.parse_header_lines([b"Host: a\r\n", b"X-Long: one\r\n", b"\t two\r\n",
                                          b"x-dup: first\r\n", b"X-Dup: second\r\n"])
    assert headers == [("Host", "a"), ("X-Long", "one two"), ("x-dup", "first"), ("X-Dup", "second")]
    assert headers.get("HOST") == "a" and headers.get("x-long") == "one two"
    assert headers.get("X-DUP") == "first" and headers.get_all("x-dup") == ["first", "second"]
    assert headers.get("missing", "-") == "-" and headers.get_all("missing") is None


@pytest.mark.parametrize("lines", [[b" folded first\r\n"], [b"no colon\r\n"], [b"Bad : space\r\n"],
                                   [b"A: b\rc\r\n"], [b"A: b\x00\r\n"], [b": empty name\r\n"]])
def test_malformed_header_lines_are_refused(lines):
    with pytest.raises(ValueError):
        ccproxy.parse_header_lines(lines)


def test_request_head_is_one_block_of_latin1():
    head = ccproxy.request_head("POST", "/v1/messages?beta=true", [("Host", "h"), ("X-Name", "Zoë")])
    assert head == b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: h\r\nX-Name: Zo\xeb\r\n\r\n"


@pytest.mark.parametrize("text, safe", [
    ("sk-abc_123", True), ("Bearer a b\tc", True), ("", True), ("Zoë", True),
    ("a\r\nX-Evil: 1", False), ("a\nb", False), ("a\x00", False), ("a\x7f", False), ("密钥", False),
])
def test_header_safe(text, safe):
    assert ccproxy.header_safe(text) is safe



CHUNKED = [
    # (wire bytes, payload)
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n", b"abc"),                   # trailer fields are dropped
    (b"A\r\n0123456789\r\n0\n\n", b"0123456789"),                          # bare LF line ends
    (b"0\r\n\r\n", b""),
]


@pytest.mark.parametrize("wire, payload", CHUNKED)
def test_chunk_decoder_takes_any_split_of_the_wire(wire, payload):
    for pieces in [[wire], [wire[i:i + 1] for i in range(len(wire))]] + \
            [[wire[:cut], wire[cut:]] for cut in range(1, len(wire))]:
        decoder = ccproxy.ChunkDecoder()
        got = b"".join(decoder.feed(piece) for piece in pieces)
        assert (got, decoder.done, decoder.extra) == (payload, True, False), pieces


def test_chunk_decoder_stops_at_the_end_and_notes_what_follows():
    decoder = ccproxy.ChunkDecoder()
    assert decoder.feed(b"2\r\nok\r\n") == b"ok" and not decoder.done
    assert decoder.feed(b"0\r\n\r\nHTTP/1.1 200 OK\r\n") == b"" and decoder.done and decoder.extra


@pytest.mark.parametrize("wire", [
    b"zz\r\nhello\r\n",                  # size not hex
    b"-5\r\nhello\r\n",                  # negative size
    b"5\r\nhelloXY0\r\n\r\n",            # no CRLF after the payload
    b"1" * (ccproxy.CHUNK_SIZE_LINE + 1),  # a size line without end
])
def test_chunk_decoder_refuses_broken_framing(wire):
    with pytest.raises(ValueError):
        ccproxy.ChunkDecoder().feed(wire)


def test_json_elements_and_tool_keys():
    text = ' [ 1 , {"a": [2, 3]},"s\\"]" ,[] ]'
    assert [text[a:b] for a, b in ccproxy.json_elements(text)] == ["1", '{"a": [2, 3]}', '"s\\"]"', "[]"]
    assert ccproxy.json_elements("[]") == [] and ccproxy.json_elements(" [ ] ") == []
    for bad in ("{}", "[1 2]", "[1,", ""):
        with pytest.raises(ValueError):
            ccproxy.json_elements(bad)
    body = '{"tools": [{"name": "a", "defer_loading": true}, {"name": "b"}], "x": 1}'
    assert ccproxy.without_tool_keys(body, ["defer_loading"]) == '{"tools": [{"name": "a"}, {"name": "b"}], "x": 1}'
    assert ccproxy.without_tool_keys('{"x": 1}', ["defer_loading"]) == '{"x": 1}'
