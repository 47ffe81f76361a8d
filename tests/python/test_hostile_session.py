"""Hostile sessions against the gateway as a separate process (issue 11's bounds): what one
client can make the process allocate, whether a nested login can abort it, and how many
management API requests a client can cause. Raw AMQP over the plain listener (the same
session code as TLS), with the real RabbitMQ behind.

The gateway's resident set (VmRSS) is read from /proc while each hostile connection holds
what it made the gateway keep; the limits are far above what the bounds allow (a few MiB)
and far below what an unbounded structure reaches with the same input.
"""

from __future__ import annotations

import http.server
import os
import struct
import threading
import time
from pathlib import Path

import pika
import pytest

import conftest
from session_fuzz import amqp

# A hostile connection may cost the process this much resident memory at most.
RSS_LIMIT_MIB = 16


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _Management(http.server.ThreadingHTTPServer):
    """Stands in for RabbitMQ's management API: every exchange is missing (404); counts
    the requests."""

    daemon_threads = True

    def __init__(self):
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                with outer.lock:
                    outer.requests += 1
                body = b'{"error":"Object Not Found","reason":"Not Found"}'
                self.send_response(404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def count(self) -> int:
        with self.lock:
            return self.requests


class _Hostile:
    def __init__(self, gw: conftest.Gateway, plain_port: int, mgmt: _Management):
        self.gw, self.plain_port, self.mgmt = gw, plain_port, mgmt

    def login(self, scope: str) -> amqp.Conn:
        return amqp.handshake("127.0.0.1", self.plain_port, "/", conftest.mint("hostile", scope=scope))

    def rss(self) -> int:
        return _rss_kib(self.gw.proc.pid)

    def alive(self) -> None:
        assert self.gw.proc.poll() is None, f"the gateway exited:\n{conftest._tail(self.gw.log())}"
        conn = self.gw.connect(conftest.mint(
            "still-served", scope="rabbitmq/configure:%2F/amq.gen-* rabbitmq/read:%2F/*"))
        try:
            conn.channel().queue_declare("", exclusive=True)
        finally:
            conn.close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    ca_file = conftest._write_tls(workdir)
    port, plain_port = conftest._free_port(), conftest._free_port()
    config = conftest._write_config(workdir, port, conftest._free_port())
    mgmt = _Management()
    threading.Thread(target=mgmt.serve_forever, daemon=True).start()
    text = config.read_text()
    text = text.replace("[listener]\n", f'[listener]\nplain_address = "127.0.0.1:{plain_port}"\n', 1)
    text = text.replace(
        "[backend]\n",
        f'[backend]\nmanagement_url = "http://127.0.0.1:{mgmt.server_address[1]}"\n'
        "exchange_lookups_per_second = 10\n",
        1,
    )
    text = text.replace('level = "info,amqp_iam_gateway=debug"', 'level = "info"')
    config.write_text(text)
    with conftest.run_gateway(workdir, config, port, ca_file) as gw:
        h = _Hostile(gw, plain_port, mgmt)
        h.alive()  # warm: the first connection's allocations are not the hostile ones
        yield h
    mgmt.shutdown()


def _nested_arrays(depth: int) -> bytes:
    """An array value nested `depth` levels deep (5 bytes a level)."""
    out = bytearray()
    for i in range(depth):
        out += b"A" + struct.pack(">I", 5 * (depth - 1 - i))
    return bytes(out)


def _start_ok_nested(token: str, depth: int) -> bytes:
    props = amqp.encode_table([["product", "S", "hostile"]])[4:]  # entries without the length
    props += bytes([4]) + b"deep" + _nested_arrays(depth)
    payload = struct.pack(">HH", 10, 11) + struct.pack(">I", len(props)) + props
    payload += bytes([5]) + b"PLAIN"
    resp = b"\0\0" + token.encode()
    payload += struct.pack(">I", len(resp)) + resp + bytes([5]) + b"en_US"
    return amqp.frame(amqp.FRAME_METHOD, 0, payload)


def test_nested_client_properties_before_login_do_not_abort_the_gateway(hostile):
    token = conftest.mint("nested", scope="rabbitmq/read:%2F/*")
    for _ in range(20):
        c = amqp.Conn.open("127.0.0.1", hostile.plain_port)
        try:
            c.send(b"AMQP\x00\x00\x09\x01")
            deadline = time.monotonic() + 5
            assert [i.name for i in c.read(deadline)] == ["connection.start"]
            # 12,000 levels: 60 KB, within the pre-authentication frame limit.
            c.send(_start_ok_nested(token, 12_000))
            got = c.read(time.monotonic() + 5)
            assert got and got[0].name == "connection.tune", got
        finally:
            c.close_socket()
    hostile.alive()


def _held_publishes(c: amqp.Conn, channels: int) -> None:
    frames = []
    for ch in range(1, channels + 1):
        frames.append(amqp.method_frame(ch, "channel.open"))
    c.send(b"".join(frames))
    opened = 0
    deadline = time.monotonic() + 20
    while opened < channels and time.monotonic() < deadline:
        opened += sum(i.name == "channel.open-ok" for i in c.read(deadline))
    assert opened == channels
    # A publish method on each, its content header never sent: each is held (≤ 527 bytes).
    rk = "k" * 255
    c.send(b"".join(amqp.method_frame(ch, "basic.publish", {"exchange": "amq.direct", "routing_key": rk})
                    for ch in range(1, channels + 1)))


def _settle(c: amqp.Conn, seconds: float) -> list[amqp.Incoming]:
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        got += c.read(end)
    return got


def test_what_one_connection_can_make_the_gateway_hold_is_bounded(hostile):
    peaks = {}

    # 2000 channels, each holding a publish that waits for its content header.
    before = hostile.rss()
    c = hostile.login("rabbitmq/write:%2F/*")
    _held_publishes(c, 2000)
    _settle(c, 1.0)
    peaks["2000 held publishes"] = hostile.rss() - before
    c.close_socket()

    # 50,000 consumes pipelined on a channel the broker has closed: nothing is kept.
    before = hostile.rss()
    c = hostile.login("rabbitmq/read:%2F/*")
    c.send(amqp.method_frame(1, "channel.open"))
    c.send_method(1, "queue.declare", {"queue": conftest.unique("hostile-missing"), "passive": True})
    closed = [i for i in _settle(c, 1.0) if i.name == "channel.close"]
    assert closed and closed[0].args["reply_code"] == 404
    consume = b"".join(amqp.method_frame(1, "basic.consume", {"queue": "q", "consumer_tag": f"t{i}"})
                       for i in range(50_000))
    c.send(consume)
    _settle(c, 1.0)
    peaks["50,000 consumes on a closed channel"] = hostile.rss() - before
    c.close_socket()

    # 50,000 exchange redeclares pipelined, no reply read: the replies the gateway must
    # read are bounded (1024), beyond which it stops reading the client.
    x = conftest.unique("hostile-x")
    before = hostile.rss()
    c = hostile.login("rabbitmq/configure:%2F/hostile-* rabbitmq/write:%2F/* rabbitmq/read:%2F/*")
    c.send(amqp.method_frame(1, "channel.open"))
    declare = amqp.method_frame(1, "exchange.declare", {"exchange": x, "type": "direct", "auto_delete": True})
    c.sock.setblocking(False)
    sent, data = 0, declare * 50_000
    end = time.monotonic() + 5
    while sent < len(data) and time.monotonic() < end:
        try:
            sent += c.sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    c.sock.setblocking(True)
    time.sleep(1.0)
    peaks["50,000 unread exchange redeclares"] = hostile.rss() - before
    c.close_socket()

    # A publish with bytes after its arguments: RabbitMQ's 501, and the connection ends.
    c = hostile.login("rabbitmq/write:%2F/*")
    c.send(amqp.method_frame(1, "channel.open"))
    payload = amqp.encode_method("basic.publish", {"exchange": "amq.direct", "routing_key": "k"}) + b"\0"
    c.send(amqp.frame(amqp.FRAME_METHOD, 1, payload))
    got = _settle(c, 1.0) if not c.closed else []
    close = [i for i in got if i.name == "connection.close"]
    assert close and close[0].args["reply_code"] == 501, got
    c.close_socket()

    report = "\n".join(f"  {k}: +{v / 1024:.1f} MiB (limit {RSS_LIMIT_MIB})" for k, v in peaks.items())
    conftest.TERMINAL_REPORTS.append(("gateway resident memory per hostile connection", report))
    print(report)
    for what, kib in peaks.items():
        assert kib < RSS_LIMIT_MIB * 1024, f"{what}: the gateway grew by {kib} KiB\n{report}"
    hostile.alive()


def _publish_until_refused(c: amqp.Conn, ch: int, exchange: str) -> amqp.Incoming:
    c.send(amqp.method_frame(ch, "channel.open"))
    c.send(amqp.method_frame(ch, "basic.publish", {"exchange": exchange, "routing_key": "k"})
           + b"".join(amqp.content_frames(ch, b"x", {}, c.frame_max)))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for i in c.read(deadline):
            if i.name == "channel.close" and i.channel == ch:
                c.send_method(ch, "channel.close-ok")
                return i
    raise AssertionError("no refusal")


def test_a_client_cannot_make_the_gateway_flood_the_management_api(hostile):
    # Without write access the refusal needs no exchange type: no request at all.
    c = hostile.login("rabbitmq/read:%2F/*")
    start = hostile.mgmt.count()
    for i in range(200):
        close = _publish_until_refused(c, 1, conftest.unique(f"hostile-nox{i}"))
        assert close.args["reply_code"] == 403
    assert hostile.mgmt.count() == start
    c.close_socket()

    # With write access but no topic scopes, each missing exchange's type is asked for,
    # within the per-connection budget (10 a second, bursts of 20): a client that asks
    # for more waits. 1000 distinct missing exchanges, as fast as the client can: one
    # channel's publish after another, and 970 more pipelined on their own channels.
    c = hostile.login("rabbitmq/write:%2F/*")
    start, t0 = hostile.mgmt.count(), time.monotonic()
    codes = set()
    for i in range(30):
        codes.add(_publish_until_refused(c, 1, conftest.unique(f"hostile-nox{i}")).args["reply_code"])
    pipelined = b"".join(
        amqp.method_frame(ch, "channel.open")
        + amqp.method_frame(ch, "basic.publish", {"exchange": conftest.unique("hostile-p"), "routing_key": "k"})
        + b"".join(amqp.content_frames(ch, b"x", {}, c.frame_max))
        for ch in range(2, 972))
    c.send(pipelined)
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
    elapsed = time.monotonic() - t0
    asked = hostile.mgmt.count() - start
    c.close_socket()
    budget = 20 + 10 * elapsed
    report = (f"  1000 publishes to distinct missing exchanges (30 in turn, 970 pipelined): "
              f"{asked} management requests in {elapsed:.1f} s (budget {budget:.0f})")
    print(report)
    conftest.TERMINAL_REPORTS.append(("management API requests from one client", report))
    # The management API says each is missing: RabbitMQ's own 404, from the gateway.
    assert codes == {404}
    assert 0 < asked <= budget + 1, report
    hostile.alive()
