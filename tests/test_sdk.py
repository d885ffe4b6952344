"""Tier 3: the official anthropic SDK, a real client, through the proxy."""

import pytest

from conftest import APIKEY, SDK_TIMEOUT_S, make_config, start_proxy, write_config

anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is a test-only dependency")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SDK model notices

MANY = ["model-%02d" % i for i in range(45)]


@pytest.fixture
def sdk_proxy(tmp_path, upstream):
    config = make_config(upstream)
    config["Providers"][0]["models"] = MANY + ["claude-sonnet-4-5"]
    proxy = start_proxy(write_config(tmp_path / "config.json", config))
    yield proxy
    proxy.stop()


@pytest.fixture
def client(sdk_proxy):
    with anthropic.Anthropic(base_url=sdk_proxy.url, api_key=APIKEY, max_retries=0, timeout=SDK_TIMEOUT_S) as c:
        yield c


def test_create(client, upstream):
    msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=16,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "hello" and msg.usage.output_tokens == 7
    assert upstream.last.headers["anthropic-version"]          # the SDK's own header went through
    assert upstream.last.headers["user-agent"].startswith("Anthropic/Python")


def test_stream(client, upstream):
    upstream.words = 6
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=16,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join("w%d " % i for i in range(6))
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 6


def test_count_tokens(client, upstream):
    result = client.messages.count_tokens(model="claude-sonnet-4-5",
                                          messages=[{"role": "user", "content": "hi"}])
    assert result.input_tokens == 42
    assert upstream.last.path.startswith("/v1/messages/count_tokens")


def test_models_list_follows_pages(client, upstream):
    models = list(client.models.list(limit=20))
    ids = [m.id for m in models]
    assert ids[:len(MANY) + 1] == MANY + ["claude-sonnet-4-5"]
    aliases = models[len(MANY) + 1:]                         # then each one under its alias
    assert len(aliases) == len(MANY) + 1 and all(m.id.startswith("claude-via-") for m in aliases)
    assert [m.display_name for m in aliases] == ["%s · alpha" % m for m in MANY + ["claude-sonnet-4-5"]]
    assert not upstream.requests                              # answered by the proxy itself


def test_wrong_key_is_an_authentication_error(sdk_proxy):
    with anthropic.Anthropic(base_url=sdk_proxy.url, api_key="wrong", max_retries=0, timeout=SDK_TIMEOUT_S) as c:
        with pytest.raises(anthropic.AuthenticationError):
            c.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
