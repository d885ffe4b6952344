#!/usr/bin/env python3
"""Benchmark: what ccproxy adds over going direct. Stdlib only; not collected by pytest.

    python3 tests/bench.py [--quick] [--json FILE] [--baseline FILE] [--store]

Three processes: an asyncio mock Anthropic upstream, the real proxy (started as run.sh starts
it: INFO logging to a file, request log on) and this asyncio load client, which speaks raw
HTTP/1.1 over keep-alive connections. Every figure is measured twice in one run,
direct to the mock and through the proxy, and printed as medians/percentiles side by side.
Event timestamps come from CLOCK_MONOTONIC, which is shared by all processes on Linux.
Every loop is bounded in count and in time. Linux only (/proc for CPU time and RSS).
With --store, also ccproxy on a PostgreSQL of its own (STORE; tests/postgres.py starts one, as
the tests do), side by side with the same proxy on files.
"""

import argparse
import asyncio
import hashlib
import json
import os
import py_compile
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APIKEY = "sk-bench-0123456789abcdef"
USER_KEY = "sk-ccp-bench-user-0123456789abcdefghijklmnop"     # a user key (Keys) with every limit
PHASE_TIMEOUT_S = 180
RELATIVE, REPORTED = "relative", "reported"
TARGETS = [
    # key, label, goal (word for word the target column of README's Performance table), check
    ("latency_added_ms", "non-streaming, 1 client: added p50 latency", "≤ +0.5 ms", lambda v: v <= 0.5),
    ("cpu_ms_per_request", "proxy CPU time per request (16 clients)", "≤ 0.6 ms", lambda v: v <= 0.6),
    ("new_conns_per_request", "new upstream connections per request (16 clients)", "≤ 0.05", lambda v: v <= 0.05),
    ("first_event_added_ms", "streaming, 1 client: added first-event delay p50", "≤ +1 ms", lambda v: v <= 1.0),
    # On a shared VM this one varies 4-fold between runs of the same code: shown beside the
    # figure of the commit before (--baseline), judged by the reader, not passed or missed.
    ("event_lag_added_p99_ms", "streaming, 64 clients: added per-event lag p99", "beside the commit before",
     REPORTED),
    ("streams_completed", "256 concurrent streams: completed", "256", lambda v: v == 256),
    # The burst is judged relatively since the thread-per-connection design stays: against the
    # figure of an earlier run of the commit before a change (--baseline), at most 1.3 x; against
    # the fastest peer (claude-code-router), less than half of what it adds (measured apart).
    ("ttfb_added_p99_ms", "256 concurrent streams: added TTFB p99", "≤ 1.3 × the commit before", RELATIVE),
    ("big_body_ratio", "2 MB request body: latency vs direct", "≤ 2 ×", lambda v: v <= 2.0),
    # 50 MB again since ccproxy is run from its cached bytecode, as run.sh and the systemd units
    # start it (docs/performance.md, 2026-12-05): started as a script, the file's syntax tree
    # stayed for the life of the process, and the budget had gone from 50 to 62 MB with it.
    ("rss_peak_mb", "proxy RSS peak during the 256 streams", "≤ 50 MB", lambda v: v <= 50.0),
    ("rss_growth_mb", "RSS growth over the soak after warm-up", "≤ 5 MB", lambda v: v <= 5.0),
    ("models_list_ms", "/v1/models?limit=1000, 50 relays x 200 models: p50", "≤ 100 ms", lambda v: v <= 100.0),
    ("key_limits_added_ms", "a user key with limits vs the APIKEY: added p50", "≤ +0.1 ms", lambda v: v <= 0.1),
]

# STORE against the files, measured side by side in one run (--store): the goals.
STORE_TARGETS = [
    ("store_added_ms", "STORE: 1 client, APIKEY: added p50 vs files", "≤ +0.1 ms", lambda v: v <= 0.1),
    ("store_key_limits_added_ms", "STORE: 1 client, user key with limits: added p50", "≤ +0.3 ms",
     lambda v: v <= 0.3),
    ("store_ttfb_ratio", "STORE: 256 streams TTFB p99 vs files", "≤ 1.3 ×", lambda v: v <= 1.3),
]

# ---------------------------------------------------------------- mock upstream (own process)


async def mock_handle(reader, writer, stats):
    stats["connections"] += 1
    writer.transport.set_write_buffer_limits(0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", 0))
            if length:
                await reader.readexactly(length)
            if path == "/bench/connections":
                body = json.dumps(stats).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                continue
            events = int(headers.get("x-bench-events", 0))
            if not events:
                body = (b'{"id":"msg_b","type":"message","role":"assistant","model":"m","content":'
                        b'[{"type":"text","text":"hello"}],"stop_reason":"end_turn",'
                        b'"usage":{"input_tokens":10,"output_tokens":5}}')
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nrequest-id: req_b\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                continue
            delay = float(headers.get("x-bench-delay-ms", 0)) / 1000.0
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            # As Anthropic sends it: the first block begins with the message. (A message_start
            # alone, then a pause, is held by ccproxy's content gate until content comes.)
            start = (b'event: message_start\ndata: {"type":"message_start","t":%.6f,"message":{"usage":'
                     b'{"input_tokens":10,"output_tokens":1}}}\n\nevent: content_block_start\ndata: '
                     b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
                     % time.monotonic())
            writer.write(b"%x\r\n%s\r\n" % (len(start), start))
            await writer.drain()
            for _ in range(events):
                if delay:
                    await asyncio.sleep(delay)
                event = (b'event: content_block_delta\ndata: {"type":"content_block_delta","t":%.6f,'
                         b'"delta":{"type":"text_delta","text":"word "}}\n\n' % time.monotonic())
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            stop = (b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":%d}}\n\n'
                    b'event: message_stop\ndata: {"type":"message_stop"}\n\n' % events)
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(stop), stop))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_mock():
    async def main():
        stats = {"connections": 0}
        server = await asyncio.start_server(lambda r, w: mock_handle(r, w, stats), "127.0.0.1", 0, backlog=2048)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()
    asyncio.run(main())


def serve_floor(upstream_port, threads=300):
    """The least a relay of ccproxy's design (a thread per connection, started ahead, blocking
    sockets) can do: no HTTP parsing beyond the framing, no pool, no log. Its time to first
    byte in the 256-stream burst is the floor of that design on this machine."""
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2048)
    print(listener.getsockname()[1], flush=True)

    def serve(client):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b""
        while True:
            piece = client.recv(65536)
            if not piece:
                return
            data += piece
            if b"\r\n\r\n" not in data:
                continue
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += client.recv(65536)
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.sendall(head + b"\r\n\r\n" + body)
            while True:
                piece = upstream.recv(65536)
                if not piece:
                    break
                client.sendall(piece)
                if piece.endswith(b"0\r\n\r\n"):
                    break
            upstream.close()
            data = b""

    def work():
        while True:
            client, _ = listener.accept()
            try:
                serve(client)
            except OSError:
                pass
            client.close()
    for _ in range(threads):
        threading.Thread(target=work, daemon=True).start()
    threading.Event().wait()


# ---------------------------------------------------------------- load client


class Conn:
    """One keep-alive HTTP/1.1 connection, speaking just enough HTTP for this benchmark."""

    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self):
        if self.writer:
            self.writer.close()

    async def __aenter__(self):
        await self.open()
        return self

    async def __aexit__(self, *exc):
        self.close()

    async def request(self, path, body, headers=b"", on_event=None, key=APIKEY):
        """Send a POST; return (status, body). on_event(arrival, t) is called per SSE event
        that carries a "t" stamp, as its bytes arrive."""
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: b\r\nx-api-key: %s\r\nanthropic-version: 2023-06-01\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                          % (path, key.encode(), len(body), headers, body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        if b"transfer-encoding: chunked" not in lower:
            i = lower.index(b"content-length:") + 15
            length = int(lower[i:lower.index(b"\r\n", i)])
            return status, await self.reader.readexactly(length)
        chunks = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return status, b"".join(chunks)
            data = await self.reader.readexactly(size + 2)
            if on_event is not None:
                now = time.monotonic()
                start = 0
                while True:
                    i = data.find(b'"t":', start)
                    if i < 0:
                        break
                    end = data.find(b",", i)
                    on_event(now, float(data[i + 4:end]))
                    start = end
            chunks.append(data[:-2])


def stream_body(events, delay_ms):
    return (b'{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}',
            b"x-bench-events: %d\r\nx-bench-delay-ms: %d\r\n" % (events, delay_ms))


PLAIN = b'{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def proc_cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


async def sequential(port, count, body, headers=b"", key=APIKEY):
    times = []
    async with Conn(port) as conn:
        for _ in range(count):
            t0 = time.perf_counter()
            status, _ = await conn.request(b"/v1/messages", body, headers, key=key)
            times.append((time.perf_counter() - t0) * 1000)
            assert status == 200, status
    return times


async def alternating(port, count, body, keys):
    """count rounds of one request per key, in turn, each key on its own connection: the keys
    meet the same moments of a busy machine. {key: [ms, ...]}"""
    times = {key: [] for key in keys}
    conns = [Conn(port) for _ in keys]
    for conn in conns:
        await conn.open()
    try:
        for _ in range(count):
            for key, conn in zip(keys, conns):
                t0 = time.perf_counter()
                status, _ = await conn.request(b"/v1/messages", body, key=key)
                times[key].append((time.perf_counter() - t0) * 1000)
                assert status == 200, status
    finally:
        for conn in conns:
            conn.close()
    return times


async def parallel(port, clients, per_client, body=PLAIN, headers=b""):
    async def one():
        async with Conn(port) as conn:
            for _ in range(per_client):
                status, _ = await conn.request(b"/v1/messages", body, headers)
                assert status == 200, status
    await asyncio.gather(*(one() for _ in range(clients)))


async def first_events(port, count):
    body, headers = stream_body(2, 0)
    out = []
    async with Conn(port) as conn:
        for _ in range(count):
            sent = time.monotonic()
            first = []
            await conn.request(b"/v1/messages", body, headers, lambda at, t: first or first.append(at))
            out.append((first[0] - sent) * 1000)
    return out


async def streams(port, clients, events, delay_ms):
    """clients concurrent streams; returns (completed, per-event lags ms, TTFBs ms)."""
    body, headers = stream_body(events, delay_ms)
    lags, ttfbs, done = [], [], []

    async def one():
        try:
            async with Conn(port) as conn:
                sent = time.monotonic()
                first = []

                def seen(at, t):
                    if not first:
                        first.append(at)
                        ttfbs.append((at - sent) * 1000)
                    lags.append((at - t) * 1000)
                status, data = await conn.request(b"/v1/messages", body, headers, seen)
                if status == 200 and data.endswith(b'{"type":"message_stop"}\n\n'):
                    done.append(1)
        except (OSError, asyncio.IncompleteReadError) as exc:
            print("  stream failed: %r" % exc, file=sys.stderr)
    await asyncio.gather(*(one() for _ in range(clients)))
    return len(done), lags, ttfbs


def list_models_ms(port, count):
    """Times of GET /v1/models?limit=1000 (a 1000-model page of the aliases), in ms."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        reader = conn.makefile("rb")
        for _ in range(count):
            t0 = time.perf_counter()
            conn.sendall(b"GET /v1/models?limit=1000 HTTP/1.1\r\nHost: b\r\nx-api-key: %s\r\n\r\n" % APIKEY.encode())
            length = 0
            while True:
                line = reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            times.append((time.perf_counter() - t0) * 1000)
    return times


def mock_connections(mock_port):
    conn = socket.create_connection(("127.0.0.1", mock_port))
    conn.sendall(b"POST /bench/connections HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n")
    data = b""
    while not data.endswith(b"}"):
        data += conn.recv(4096)
    conn.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["connections"]


# ---------------------------------------------------------------- the run


def start_proxy(tmp, mock_port, name="config.json", **settings):
    """The real proxy as run.sh and the README's systemd units run it (python3 -m ccproxy from
    its directory, from the bytecode cached in __pycache__/, which main() writes; INFO log
    to a file, request log on), unless settings say otherwise; (process, port)."""
    config = os.path.join(tmp, name)
    with open(config, "w") as f:
        json.dump(dict({"APIKEY": APIKEY, "PORT": 0, "Providers": [
            {"name": "mock", "api_base_url": "http://127.0.0.1:%d/v1/messages" % mock_port, "api_key": "sk-up",
             "models": ["claude-sonnet-4-5"]}]}, **settings), f)
    log = open(os.path.join(tmp, name + ".log"), "a")
    proxy = subprocess.Popen([sys.executable, "-m", "ccproxy", "--config", config], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=log, universal_newlines=True)
    return proxy, int(proxy.stdout.readline().split("http://127.0.0.1:")[1].split()[0])


def stop_proxy(proxy):
    proxy.send_signal(signal.SIGTERM)
    try:
        proxy.wait(15)
    except subprocess.TimeoutExpired:
        proxy.kill()


def start_processes(tmp):
    mock = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-mock"], stdout=subprocess.PIPE,
                            universal_newlines=True)
    mock_port = int(mock.stdout.readline())
    proxy, proxy_port = start_proxy(tmp, mock_port)
    return mock, mock_port, proxy, proxy_port


async def store_phase(phase, tmp, mock_port, limits, scale, r, raw):
    """The same proxy on files and on a PostgreSQL STORE, in turn: one client with the APIKEY
    and with a user key with limits (its rpm is then one statement), and the 256-stream burst."""
    sys.path.insert(0, HERE)
    import postgres
    cluster = postgres.cluster()
    files, files_port = start_proxy(tmp, mock_port, "files.json", Keys=[limits])
    shared, shared_port = start_proxy(tmp, mock_port, "shared.json", Keys=[limits], STORE=cluster.new_database())
    try:
        times = {"files": {APIKEY: [], USER_KEY: []}, "store": {APIKEY: [], USER_KEY: []}}
        for end, port in (("files", files_port), ("store", shared_port)):
            await phase("warm-up %s" % end, alternating(port, 100, PLAIN, [APIKEY, USER_KEY]))
        for _ in range(2):                   # files, store, files, store: the same moments of the machine
            for end, port in (("files", files_port), ("store", shared_port)):
                found = await phase("%s: APIKEY and a user key, in turn" % end,
                                    alternating(port, scale(1500, 500), PLAIN, [APIKEY, USER_KEY]))
                for key in found:
                    times[end][key] += found[key]
        for end in times:
            raw["%s_apikey_ms" % end] = pct(times[end][APIKEY], 0.5)
            raw["%s_user_key_ms" % end] = pct(times[end][USER_KEY], 0.5)
        r["store_added_ms"] = raw["store_apikey_ms"] - raw["files_apikey_ms"]
        r["store_key_limits_added_ms"] = raw["store_user_key_ms"] - raw["files_user_key_ms"]
        events = scale(100, 20)
        for end, port in (("files", files_port), ("store", shared_port)):
            _, _, ttfb = await phase("256 streams %s" % end, streams(port, 256, events, 50))
            raw["%s_ttfb_p99" % end] = pct(ttfb, 0.99)
        r["store_ttfb_ratio"] = raw["store_ttfb_p99"] / raw["files_ttfb_p99"]
    finally:
        stop_proxy(files)
        stop_proxy(shared)
        cluster.close()


async def run(quick, store=False):
    scale = (lambda full, small: small) if quick else (lambda full, small: full)
    tmp = tempfile.mkdtemp(prefix="ccproxy-bench-")
    mock, mock_port, proxy, proxy_port = start_processes(tmp)
    pid = proxy.pid
    ends = {"direct": mock_port, "proxy": proxy_port}
    r, raw = {}, {}
    try:
        async def phase(name, coro):
            print("  %s…" % name, file=sys.stderr, flush=True)
            return await asyncio.wait_for(coro, PHASE_TIMEOUT_S)

        for end, port in ends.items():                       # warm-up: pools, code paths
            await phase("warm-up " + end, parallel(port, 4, 50))
        n = scale(2000, 300)
        for end, port in ends.items():
            raw["latency_" + end] = pct(await phase("latency " + end, sequential(port, n, PLAIN)), 0.5)
        r["latency_added_ms"] = raw["latency_proxy"] - raw["latency_direct"]
        # the same through a proxy that writes no log line and no request log file
        quiet, quiet_port = start_proxy(tmp, mock_port, "quiet.json", LOG_LEVEL="WARNING", REQUEST_LOG="")
        try:
            await phase("warm-up quiet", parallel(quiet_port, 4, 50))
            raw["latency_quiet"] = pct(await phase("latency without logs", sequential(quiet_port, n, PLAIN)), 0.5)
            raw["latency_proxy_again"] = pct(await phase("latency with logs", sequential(proxy_port, n, PLAIN)), 0.5)
        finally:
            stop_proxy(quiet)

        per = scale(500, 100)
        conns0, cpu0 = mock_connections(mock_port), proc_cpu_s(pid)
        t0 = time.perf_counter()
        await phase("16 clients proxy", parallel(proxy_port, 16, per))
        raw["rps_proxy"] = 16 * per / (time.perf_counter() - t0)
        r["cpu_ms_per_request"] = (proc_cpu_s(pid) - cpu0) * 1000 / (16 * per)
        r["new_conns_per_request"] = (mock_connections(mock_port) - conns0) / (16 * per)
        t0 = time.perf_counter()
        await phase("16 clients direct", parallel(mock_port, 16, per))
        raw["rps_direct"] = 16 * per / (time.perf_counter() - t0)

        n = scale(500, 100)
        for end, port in ends.items():
            raw["first_event_" + end] = pct(await phase("first event " + end, first_events(port, n)), 0.5)
        r["first_event_added_ms"] = raw["first_event_proxy"] - raw["first_event_direct"]

        clients, events = scale(64, 16), scale(50, 20)
        for end, port in ends.items():
            done, lags, _ = await phase("64 streams " + end, streams(port, clients, events, 20))
            raw["event_lag_p99_" + end] = pct(lags, 0.99)
            raw["event_lag_p50_" + end] = pct(lags, 0.5)
        r["event_lag_added_p99_ms"] = raw["event_lag_p99_proxy"] - raw["event_lag_p99_direct"]

        events = scale(100, 20)
        done_direct, _, ttfb_direct = await phase("256 streams direct", streams(mock_port, 256, events, 50))
        done, _, ttfb_proxy = await phase("256 streams proxy", streams(proxy_port, 256, events, 50))
        r["streams_completed"] = done
        raw["streams_completed_direct"] = done_direct
        raw["ttfb_p99_direct"], raw["ttfb_p99_proxy"] = pct(ttfb_direct, 0.99), pct(ttfb_proxy, 0.99)
        r["ttfb_added_p99_ms"] = raw["ttfb_p99_proxy"] - raw["ttfb_p99_direct"]
        r["rss_peak_mb"] = proc_mem_mb(pid, "VmHWM")
        floor = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-floor", str(mock_port)],
                                 stdout=subprocess.PIPE, universal_newlines=True)
        try:
            floor_port = int(floor.stdout.readline())
            await phase("256 streams minimal threaded relay", streams(floor_port, 256, 2, 0))   # its threads warm
            _, _, ttfb_floor = await phase("256 streams minimal threaded relay", streams(floor_port, 256, events, 50))
            raw["ttfb_p99_floor"] = pct(ttfb_floor, 0.99)
        finally:
            floor.kill()
            floor.wait()

        # Claude Code's large bodies are images: 2 MB of base64 in an image block.
        big = (b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":[{"type":"image",'
               b'"source":{"type":"base64","media_type":"image/png","data":"%s"}}]}]}' % (b"QUJD" * (1 << 19)))
        n = scale(20, 6)
        for end, port in ends.items():
            raw["big_body_ms_" + end] = pct(await phase("2 MB body " + end, sequential(port, n, big)), 0.5)
        r["big_body_ratio"] = raw["big_body_ms_proxy"] / raw["big_body_ms_direct"]

        total = scale(10000, 2000)
        await phase("soak warm-up", parallel(proxy_port, 16, total // 10 // 16))
        rss0 = proc_mem_mb(pid, "VmRSS")
        await phase("soak", parallel(proxy_port, 16, total // 16))
        raw["rss_soak_start_mb"], raw["rss_soak_end_mb"] = rss0, proc_mem_mb(pid, "VmRSS")
        r["rss_growth_mb"] = raw["rss_soak_end_mb"] - rss0

        # A user key with every limit: its lookup, its rpm counted in the usage store (one sqlite
        # transaction), its day and month totals; alternated with the APIKEY on the same proxy.
        limits = {"name": "bench", "sha256": hashlib.sha256(USER_KEY.encode()).hexdigest(), "rpm": 10 ** 9,
                  "tokens_per_day": 10 ** 12, "cost_per_day": 10 ** 9, "cost_per_month": 10 ** 9}
        keyed, keyed_port = start_proxy(tmp, mock_port, "keys.json", Keys=[limits])
        try:
            await phase("warm-up keys", alternating(keyed_port, 100, PLAIN, [APIKEY, USER_KEY]))
            times = await phase("APIKEY and a user key with limits, in turn",
                                alternating(keyed_port, scale(3000, 1000), PLAIN, [APIKEY, USER_KEY]))
            raw["latency_apikey_ms"], raw["latency_user_key_ms"] = pct(times[APIKEY], 0.5), pct(times[USER_KEY], 0.5)
            r["key_limits_added_ms"] = raw["latency_user_key_ms"] - raw["latency_apikey_ms"]
        finally:
            stop_proxy(keyed)
        if store:
            await store_phase(phase, tmp, mock_port, limits, scale, r, raw)

        # Claude Code's /model picker: every provider's models under an alias, from stored lists
        many = [{"name": "中转站%02d" % i, "api_base_url": "http://127.0.0.1:%d/r%d" % (mock_port, i),
                 "api_key": "sk-up", "models": ["model-%03d" % m for m in range(200)]} for i in range(50)]
        relays, relays_port = start_proxy(tmp, mock_port, "relays.json", Providers=many)
        try:
            print("  /v1/models with 50 relays…", file=sys.stderr, flush=True)
            raw["models_list_ms_p95"] = pct(list_models_ms(relays_port, scale(100, 20)), 0.95)
            r["models_list_ms"] = pct(list_models_ms(relays_port, scale(100, 20)), 0.5)
        finally:
            stop_proxy(relays)
    finally:
        stop_proxy(proxy)
        mock.kill()
        mock.wait()
    return r, raw


def report(r, raw, baseline=None):
    rows = [
        ("non-streaming, 1 client: p50 latency (ms)", raw["latency_direct"], raw["latency_proxy"]),
        ("16 clients: requests per second", raw["rps_direct"], raw["rps_proxy"]),
        ("streaming, 1 client: first event p50 (ms)", raw["first_event_direct"], raw["first_event_proxy"]),
        ("streaming, 64 clients: per-event lag p50 (ms)", raw["event_lag_p50_direct"], raw["event_lag_p50_proxy"]),
        ("streaming, 64 clients: per-event lag p99 (ms)", raw["event_lag_p99_direct"], raw["event_lag_p99_proxy"]),
        ("256 streams: completed", raw["streams_completed_direct"], r["streams_completed"]),
        ("256 streams: TTFB p99 (ms)", raw["ttfb_p99_direct"], raw["ttfb_p99_proxy"]),
        ("  … through a minimal threaded relay (ms)", raw["ttfb_p99_direct"], raw["ttfb_p99_floor"]),
        ("2 MB body: p50 latency (ms)", raw["big_body_ms_direct"], raw["big_body_ms_proxy"]),
        ("1 client p50 (ms): APIKEY | user key with limits", raw["latency_apikey_ms"], raw["latency_user_key_ms"]),
    ]
    print("%-48s %10s %10s %10s" % ("measured", "direct", "proxy", "diff"))
    for label, direct, proxied in rows:
        print("%-48s %10.3f %10.3f %+10.3f" % (label, direct, proxied, proxied - direct))
    print("%-48s %10.3f %10.3f %+10.3f" % ("1 client p50 (ms): logs off | logs on", raw["latency_quiet"],
                                           raw["latency_proxy_again"], raw["latency_proxy_again"] - raw["latency_quiet"]))
    if "store_added_ms" in r:
        print("%-48s %10s %10s %10s" % ("STORE", "files", "store", "diff"))
        for label, key in (("1 client p50 (ms): APIKEY", "apikey_ms"), ("1 client p50 (ms): user key with limits",
                                                                         "user_key_ms"), ("256 streams: TTFB p99 (ms)", "ttfb_p99")):
            files, store = raw["files_" + key], raw["store_" + key]
            print("%-48s %10.3f %10.3f %+10.3f" % (label, files, store, store - files))
    print()
    print("%-52s %10s %12s  %s" % ("target", "value", "goal", ""))
    ok = True
    for key, label, goal, check in TARGETS + [t for t in STORE_TARGETS if t[0] in r]:
        base = baseline["targets"].get(key) if baseline is not None else None
        if check in (RELATIVE, REPORTED):
            if base is None or check == REPORTED:
                print("%-52s %10.3f %12s  %s" % (label, r[key], "" if base is None else "was %.3f" % base,
                                                 "(no --baseline)" if base is None else ""))
                continue
            check = lambda v, base=base: v <= 1.3 * base    # noqa: E731
            goal = "<= %.0f" % (1.3 * base)
        passed = check(r[key])
        ok &= passed
        print("%-52s %10.3f %12s  %s" % (label, r[key], goal, "ok" if passed else "MISSED"))
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (about ten seconds; the full run takes about a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--baseline", metavar="FILE", help="a --json FILE of the commit before a change, run on "
                        "the same machine in the same hour: the 256-stream burst may be 1.3 x its figure")
    parser.add_argument("--store", action="store_true", help="also measure STORE against the files, on a PostgreSQL "
                        "of its own (initdb and pg_ctl, and psycopg, must be installed)")
    parser.add_argument("--serve-mock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_mock:
        serve_mock()
        return 0
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return 0
    # the bytecode a user's first start caches, written even if PYTHONDONTWRITEBYTECODE is set
    py_compile.compile(os.path.join(ROOT, "ccproxy.py"), doraise=True)
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    r, raw = asyncio.run(run(args.quick, args.store))
    ok = report(r, raw, baseline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"targets": r, "measured": raw, "quick": args.quick,
                       "python": sys.version.split()[0]}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
