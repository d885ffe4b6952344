"""Reaching providers: through an HTTP CONNECT proxy (per provider or from the environment),
TLS that is verified, and the sockets' kernel-kept timeouts."""

import base64
import io
import json
import select
import shutil
import socket
import ssl
import subprocess
import threading

import pytest

import ccproxy
from conftest import make_config, start_proxy, write_config
from test_relay import MESSAGE


class ConnectProxy:
    """A minimal HTTP proxy that only does CONNECT, records what it was asked, and pipes."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.requests = []
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.tunnel, args=(client,), daemon=True).start()

    def tunnel(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return
            head += data
        lines = head.decode().split("\r\n")
        self.requests.append(lines)
        host, port = lines[0].split()[1].rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pair = {client: upstream, upstream: client}
        try:
            while True:
                ready, _, _ = select.select(list(pair), [], [], 10)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self):
        self.listener.close()


@pytest.fixture
def connect_proxy():
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


def test_per_provider_proxy_with_credentials(tmp_path, upstream, connect_proxy):
    config = make_config(upstream)
    config["Providers"][0]["proxy"] = connect_proxy.url.replace("http://", "http://user:p%40ss@")
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        assert proxy.call("POST", "/v1/messages", dict(MESSAGE, stream=True))[0] == 200
        assert proxy.call("POST", "/api/refresh-models", {"provider": "alpha"})[0] == 200
    finally:
        proxy.stop()
    first = connect_proxy.requests[0]
    assert first[0].startswith("CONNECT 127.0.0.1:%d " % upstream.port)
    auth = [line for line in first if line.lower().startswith("proxy-authorization:")]
    assert auth and base64.b64decode(auth[0].split()[-1]) == b"user:p@ss"
    assert len(upstream.requests) == 2          # the message and the model list both went through


def test_environment_proxy_and_no_proxy(tmp_path, upstream, connect_proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", connect_proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    proxy = start_proxy(write_config(tmp_path / "c.json", make_config(upstream)))
    try:
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert len(connect_proxy.requests) == 1
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert proxy.api("POST", "/api/reload")[0] == 200       # targets are resolved on (re)load
        assert proxy.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert len(connect_proxy.requests) == 1                  # bypassed
    finally:
        proxy.stop()


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl makes the self-signed certificate")
def test_tls_is_verified(tmp_path, upstream):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    upstream.server.socket = context.wrap_socket(upstream.server.socket, server_side=True)
    config = make_config(upstream)
    config["Providers"][0]["api_base_url"] = "https://127.0.0.1:%d/v1/messages" % upstream.port
    proxy = start_proxy(write_config(tmp_path / "c.json", config))
    try:
        status, _, data = proxy.call("POST", "/v1/messages", MESSAGE)
        assert status == 502 and "TLS certificate not trusted" in json.loads(data)["error"]["message"]
        assert not upstream.requests
    finally:
        proxy.stop()


def test_a_kernel_timeout_is_a_timeout_not_the_end_of_the_stream():
    a, b = socket.socketpair()
    try:
        ccproxy.set_timeout(a, 0.2)
        stream = ccproxy.SocketStream(a)
        reader = io.BufferedReader(stream)
        b.sendall(b"line\n")
        assert reader.readline() == b"line\n"
        with pytest.raises(socket.timeout):
            reader.readline()               # makefile()'s reader would return b"" here
        with pytest.raises(socket.timeout):
            reader.read1(10)
        with pytest.raises(socket.timeout):
            while True:                     # the peer reads nothing: the buffers fill, then the send times out
                stream.write(b"x" * 65536)
    finally:
        a.close()
        b.close()


def test_the_head_leaves_with_the_first_write():
    sent = []
    out = ccproxy.ClientWriter(sent.append)
    assert not out.started
    out.head(200, [("Content-Type", "text/plain"), ("x-ccproxy-provider", "alpha")])
    assert out.started and sent == []                   # nothing sent yet
    out.write(b"body")
    assert sent == [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-ccproxy-provider: alpha\r\n\r\nbody"]
    out.write(b"more")
    assert sent[1] == b"more"
    out.head(204, [])
    out.flush()
    assert sent[2] == b"HTTP/1.1 204 No Content\r\n\r\n"
    out.flush()
    assert len(sent) == 3                               # nothing more to send


def test_a_head_outside_latin_1_is_refused_before_anything_is_sent():
    sent = []
    out = ccproxy.ClientWriter(sent.append)
    with pytest.raises(UnicodeEncodeError):
        out.head(200, [("x-ccproxy-provider", "中转站A")])     # names go through header_text()
    assert sent == [] and not out.started
