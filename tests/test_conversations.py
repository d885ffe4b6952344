"""Cost per conversation: every request of a Claude Code conversation carries its
X-Claude-Code-Session-Id; ccproxy keeps a conversation's figures per relay (GET /api/sessions),
and Claude Code's status line (POST /api/status-line, through the curl command of the copied
settings) says the relay, this conversation's cost, today's and the balance."""

import hashlib
import json
import shutil
import subprocess

import pytest

import ccproxy
from conftest import wait_for

PRICING = {"currency": "USD", "models": {"claude-sonnet-*": {"input": 3, "output": 15}, "glm-*": {"input": 1, "output": 2}}}
SECRET = "sk-ccp-conversation-user-0123456789abcdef"
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def relays(proxy_with):
    return proxy_with(Pricing=PRICING, providers={"alpha": {"name": "中转站甲"}, "beta": {"name": "中转站乙"}},
                      Keys=[{"name": "小王", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(), "cost_per_day": 5}])


def ask(proxy, session, key=None):
    headers = {"X-Claude-Code-Session-Id": session} if session else {}
    kwargs = {"key": key} if key else {}
    assert proxy.call("POST", "/v1/messages", MESSAGE, headers=headers, **kwargs)[0] == 200


def sessions(proxy):
    return proxy.api("GET", "/api/sessions")[1]["sessions"]


def test_a_conversation_across_two_relays(relays):
    ask(relays, "chat-1")
    ask(relays, "chat-1")
    relays.api("POST", "/api/select", {"provider": "中转站乙"})
    ask(relays, "chat-1")
    ask(relays, "other")
    ask(relays, None)                              # no session header: in no conversation
    assert wait_for(lambda: len(sessions(relays)) == 2 and sessions(relays)[1]["requests"] == 3)
    newest, first = sessions(relays)
    assert newest["session"] == "other" and first["session"] == "chat-1"
    assert first["relays"] == ["中转站甲", "中转站乙"] and first["first"] <= first["last"]
    costs = [r["cost"] for r in relays.api("GET", "/api/requests?limit=10")[1]["requests"]
             if r.get("session") == "chat-1"]
    assert len(costs) == 3 and first["cost"] == pytest.approx(sum(costs), abs=1e-6)   # rounded as /api/usage rounds
    assert first["currency"] == "USD" and first["hit_rate_pct"] is not None
    # /api/usage by conversation (and relay), as JSON and as CSV
    report = relays.api("GET", "/api/usage?by=session,provider")[1]
    rows = {(r["session"], r["provider"]): r for r in report["rows"]}
    assert set(rows) == {("chat-1", "中转站甲"), ("chat-1", "中转站乙"), ("other", "中转站乙")}
    assert rows[("chat-1", "中转站甲")]["requests"] == 2 and report["total"]["requests"] == 4
    csv_text = relays.call("GET", "/api/usage?by=session&format=csv")[2].decode("utf-8-sig")
    assert csv_text.splitlines()[0].startswith("session,requests") and "chat-1" in csv_text
    status, err = relays.api("GET", "/api/usage?by=session,day")
    assert status == 400 and err["code"] == "usage_by" and err["values"]["groups"] == "session, provider, key"


def test_the_status_line(relays):
    relays.api("GET", "/api/balance")
    ask(relays, "chat-2")
    assert wait_for(lambda: sessions(relays))
    cost = sessions(relays)[0]["cost"]
    status, headers, body = relays.call("POST", "/api/status-line?lang=zh", {"session_id": "chat-2", "model": {"id": "x"}})
    line = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    money = ccproxy.amount_text(cost)
    assert line == "中转站甲 · 本次 %s USD · 今日 %s USD\n" % (money, money) and money != "0.00"
    # English; a conversation ccproxy has not seen; a body that is not JSON: a line all the same
    english = relays.call("POST", "/api/status-line", {"session_id": "new"})[2].decode()
    assert english == "中转站甲 · today %s USD\n" % money
    assert relays.call("POST", "/api/status-line", b"not json")[0] == 200
    # it names the relay the conversation's next request goes to: kept until idle, or moved now
    relays.api("POST", "/api/select", {"provider": "中转站乙", "when": "idle"})
    assert relays.call("POST", "/api/status-line", {"session_id": "chat-2"})[2].decode().startswith("中转站甲 · ")
    assert relays.call("POST", "/api/status-line", {"session_id": "new"})[2].decode().startswith("中转站乙 · ")
    relays.api("POST", "/api/select", {"provider": "中转站甲"})
    relays.api("POST", "/api/select", {"provider": "中转站乙", "when": "now"})
    assert relays.call("POST", "/api/status-line", {"session_id": "chat-2"})[2].decode().startswith("中转站乙 · ")
    relays.api("POST", "/api/select", {"provider": "中转站甲"})
    # a user key's own: its name, and today's cost against its limit
    ask(relays, "chat-3", key=SECRET)
    assert wait_for(lambda: any(s["session"] == "chat-3" for s in sessions(relays)))
    mine = relays.call("POST", "/api/status-line?lang=zh", {"session_id": "chat-3"}, key=SECRET)[2].decode()
    assert mine.startswith("小王 · 本次 ") and " / 5.00" in mine
    assert relays.call("POST", "/api/status-line", {}, key="sk-wrong-key-0000000000")[0] == 401


def test_amounts_in_a_status_line():
    assert [ccproxy.amount_text(v) for v in (0, 0.000048, 0.0421, 3.1, 120)] == ["0.00", "0.00005", "0.042", "3.10", "120.00"]


@pytest.mark.skipif(not shutil.which("curl"), reason="the status line command is curl")
def test_the_copied_status_line_command(relays, tmp_path):
    template = relays.api("GET", "/api/state")[1]["status_line"]["statusLine"]
    assert template["type"] == "command"
    command = template["command"].replace("{key}", SECRET).replace("{lang}", "en")
    ask(relays, "chat-4", key=SECRET)
    assert wait_for(lambda: any(s["session"] == "chat-4" for s in sessions(relays)))
    given = json.dumps({"session_id": "chat-4", "cwd": str(tmp_path), "model": {"id": "claude-sonnet-4-5"}})
    done = subprocess.run(["sh", "-c", command], input=given, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and done.stdout.startswith("小王 · this chat ")
    # ccproxy down: a short mark, never an error in Claude Code's status line
    down = command.replace(relays.url, "http://127.0.0.1:9")
    done = subprocess.run(["sh", "-c", down], input=given, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and done.stdout == "ccproxy ?\n"
