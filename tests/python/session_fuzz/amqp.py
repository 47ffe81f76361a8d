"""A minimal raw AMQP 0-9-1 client codec for the differential session fuzzer.

Only what the fuzzer needs: frames, the methods it sends and the replies it reads, content
headers and bodies, and field tables encoded from an explicit ordered list of
``(key, type, value)`` entries, so that duplicate keys, nesting and every RabbitMQ table type
can be produced (RabbitMQ's reading, `rabbit_binary_parser`: ``s`` is a *signed 16-bit
integer*, not a short string; ``l`` and ``L`` are both signed 64-bit).

Names are ``str``; a name that is not valid UTF-8 is carried as a ``str`` with surrogate
escapes (``"q\\udcff"`` is the bytes ``q\\xff``), which survives JSON.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE


def to_bytes(s) -> bytes:
    if isinstance(s, bytes):
        return s
    return s.encode("utf-8", "surrogateescape")


def from_bytes(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------------------
# field tables


def encode_value(t: str, v) -> bytes:
    if t == "S":
        b = to_bytes(v)
        return b"S" + struct.pack(">I", len(b)) + b
    if t == "x":
        b = bytes.fromhex(v) if isinstance(v, str) else bytes(v)
        return b"x" + struct.pack(">I", len(b)) + b
    if t == "t":
        return b"t" + (b"\x01" if v else b"\x00")
    if t == "b":
        return b"b" + struct.pack(">b", v)
    if t == "B":
        return b"B" + struct.pack(">B", v)
    if t == "s":  # RabbitMQ: signed 16-bit
        return b"s" + struct.pack(">h", v)
    if t == "u":
        return b"u" + struct.pack(">H", v)
    if t == "I":
        return b"I" + struct.pack(">i", v)
    if t == "i":
        return b"i" + struct.pack(">I", v)
    if t in ("l", "L"):
        return t.encode() + struct.pack(">q", v)
    if t == "T":
        return b"T" + struct.pack(">Q", v)
    if t == "d":
        return b"d" + struct.pack(">d", v)
    if t == "f":
        return b"f" + struct.pack(">f", v)
    if t == "D":  # [scale, value]
        return b"D" + struct.pack(">BI", v[0], v[1])
    if t == "F":
        return b"F" + encode_table(v)
    if t == "A":
        body = b"".join(encode_value(et, ev) for et, ev in v)
        return b"A" + struct.pack(">I", len(body)) + body
    if t == "V":
        return b"V"
    raise ValueError(f"unknown field type {t!r}")


def encode_table(entries) -> bytes:
    """`entries`: an ordered list of (key, type, value); duplicates are kept as given."""
    if not entries:
        return b"\x00\x00\x00\x00"
    body = bytearray()
    for key, t, v in entries:
        k = to_bytes(key)
        body += bytes([len(k)]) + k + encode_value(t, v)
    return struct.pack(">I", len(body)) + bytes(body)


def _decode_value(buf: bytes, o: int):
    t = chr(buf[o])
    o += 1
    if t in "Sx":
        (n,) = struct.unpack_from(">I", buf, o)
        o += 4
        raw = buf[o:o + n]
        return (t, from_bytes(raw) if t == "S" else raw.hex()), o + n
    fixed = {"t": (">B", 1), "b": (">b", 1), "B": (">B", 1), "s": (">h", 2), "u": (">H", 2),
             "I": (">i", 4), "i": (">I", 4), "l": (">q", 8), "L": (">q", 8), "T": (">Q", 8),
             "d": (">d", 8), "f": (">f", 4)}
    if t in fixed:
        fmt, n = fixed[t]
        (v,) = struct.unpack_from(fmt, buf, o)
        return (t, bool(v) if t == "t" else v), o + n
    if t == "D":
        scale, v = struct.unpack_from(">BI", buf, o)
        return (t, [scale, v]), o + 5
    if t == "F":
        tab, o = decode_table(buf, o)
        return (t, tab), o
    if t == "A":
        (n,) = struct.unpack_from(">I", buf, o)
        o += 4
        end = o + n
        items = []
        while o < end:
            item, o = _decode_value(buf, o)
            items.append(list(item))
        return (t, items), o
    if t == "V":
        return (t, None), o
    raise ValueError(f"unknown field type {t!r}")


def decode_table(buf: bytes, o: int):
    (n,) = struct.unpack_from(">I", buf, o)
    o += 4
    end = o + n
    out = []
    while o < end:
        kl = buf[o]
        key = from_bytes(buf[o + 1:o + 1 + kl])
        o += 1 + kl
        (t, v), o = _decode_value(buf, o)
        out.append([key, t, v])
    return out, end


# ------------------------------------------------------------------------------------------
# methods

# name -> (class, method, [(arg, type)]); types: octet short long longlong shortstr longstr
# bit table
M = {
    "connection.start": (10, 10, [("version_major", "octet"), ("version_minor", "octet"),
                                  ("server_properties", "table"), ("mechanisms", "longstr"),
                                  ("locales", "longstr")]),
    "connection.start-ok": (10, 11, [("client_properties", "table"), ("mechanism", "shortstr"),
                                     ("response", "longstr"), ("locale", "shortstr")]),
    "connection.secure": (10, 20, [("challenge", "longstr")]),
    "connection.tune": (10, 30, [("channel_max", "short"), ("frame_max", "long"),
                                 ("heartbeat", "short")]),
    "connection.tune-ok": (10, 31, [("channel_max", "short"), ("frame_max", "long"),
                                    ("heartbeat", "short")]),
    "connection.open": (10, 40, [("virtual_host", "shortstr"), ("reserved1", "shortstr"),
                                 ("reserved2", "bit")]),
    "connection.open-ok": (10, 41, [("reserved1", "shortstr")]),
    "connection.close": (10, 50, [("reply_code", "short"), ("reply_text", "shortstr"),
                                  ("class_id", "short"), ("method_id", "short")]),
    "connection.close-ok": (10, 51, []),
    "connection.blocked": (10, 60, [("reason", "shortstr")]),
    "connection.unblocked": (10, 61, []),
    "connection.update-secret": (10, 70, [("new_secret", "longstr"), ("reason", "shortstr")]),
    "connection.update-secret-ok": (10, 71, []),
    "channel.open": (20, 10, [("reserved1", "shortstr")]),
    "channel.open-ok": (20, 11, [("reserved1", "longstr")]),
    "channel.flow": (20, 20, [("active", "bit")]),
    "channel.flow-ok": (20, 21, [("active", "bit")]),
    "channel.close": (20, 40, [("reply_code", "short"), ("reply_text", "shortstr"),
                               ("class_id", "short"), ("method_id", "short")]),
    "channel.close-ok": (20, 41, []),
    "exchange.declare": (40, 10, [("reserved1", "short"), ("exchange", "shortstr"),
                                  ("type", "shortstr"), ("passive", "bit"), ("durable", "bit"),
                                  ("auto_delete", "bit"), ("internal", "bit"), ("nowait", "bit"),
                                  ("arguments", "table")]),
    "exchange.declare-ok": (40, 11, []),
    "exchange.delete": (40, 20, [("reserved1", "short"), ("exchange", "shortstr"),
                                 ("if_unused", "bit"), ("nowait", "bit")]),
    "exchange.delete-ok": (40, 21, []),
    "exchange.bind": (40, 30, [("reserved1", "short"), ("destination", "shortstr"),
                               ("source", "shortstr"), ("routing_key", "shortstr"),
                               ("nowait", "bit"), ("arguments", "table")]),
    "exchange.bind-ok": (40, 31, []),
    "exchange.unbind": (40, 40, [("reserved1", "short"), ("destination", "shortstr"),
                                 ("source", "shortstr"), ("routing_key", "shortstr"),
                                 ("nowait", "bit"), ("arguments", "table")]),
    "exchange.unbind-ok": (40, 51, []),
    "queue.declare": (50, 10, [("reserved1", "short"), ("queue", "shortstr"), ("passive", "bit"),
                               ("durable", "bit"), ("exclusive", "bit"), ("auto_delete", "bit"),
                               ("nowait", "bit"), ("arguments", "table")]),
    "queue.declare-ok": (50, 11, [("queue", "shortstr"), ("message_count", "long"),
                                  ("consumer_count", "long")]),
    "queue.bind": (50, 20, [("reserved1", "short"), ("queue", "shortstr"), ("exchange", "shortstr"),
                            ("routing_key", "shortstr"), ("nowait", "bit"), ("arguments", "table")]),
    "queue.bind-ok": (50, 21, []),
    "queue.purge": (50, 30, [("reserved1", "short"), ("queue", "shortstr"), ("nowait", "bit")]),
    "queue.purge-ok": (50, 31, [("message_count", "long")]),
    "queue.delete": (50, 40, [("reserved1", "short"), ("queue", "shortstr"), ("if_unused", "bit"),
                              ("if_empty", "bit"), ("nowait", "bit")]),
    "queue.delete-ok": (50, 41, [("message_count", "long")]),
    "queue.unbind": (50, 50, [("reserved1", "short"), ("queue", "shortstr"),
                              ("exchange", "shortstr"), ("routing_key", "shortstr"),
                              ("arguments", "table")]),
    "queue.unbind-ok": (50, 51, []),
    "basic.qos": (60, 10, [("prefetch_size", "long"), ("prefetch_count", "short"),
                           ("global", "bit")]),
    "basic.qos-ok": (60, 11, []),
    "basic.consume": (60, 20, [("reserved1", "short"), ("queue", "shortstr"),
                               ("consumer_tag", "shortstr"), ("no_local", "bit"), ("no_ack", "bit"),
                               ("exclusive", "bit"), ("nowait", "bit"), ("arguments", "table")]),
    "basic.consume-ok": (60, 21, [("consumer_tag", "shortstr")]),
    "basic.cancel": (60, 30, [("consumer_tag", "shortstr"), ("nowait", "bit")]),
    "basic.cancel-ok": (60, 31, [("consumer_tag", "shortstr")]),
    "basic.publish": (60, 40, [("reserved1", "short"), ("exchange", "shortstr"),
                               ("routing_key", "shortstr"), ("mandatory", "bit"),
                               ("immediate", "bit")]),
    "basic.return": (60, 50, [("reply_code", "short"), ("reply_text", "shortstr"),
                              ("exchange", "shortstr"), ("routing_key", "shortstr")]),
    "basic.deliver": (60, 60, [("consumer_tag", "shortstr"), ("delivery_tag", "longlong"),
                               ("redelivered", "bit"), ("exchange", "shortstr"),
                               ("routing_key", "shortstr")]),
    "basic.get": (60, 70, [("reserved1", "short"), ("queue", "shortstr"), ("no_ack", "bit")]),
    "basic.get-ok": (60, 71, [("delivery_tag", "longlong"), ("redelivered", "bit"),
                              ("exchange", "shortstr"), ("routing_key", "shortstr"),
                              ("message_count", "long")]),
    "basic.get-empty": (60, 72, [("reserved1", "shortstr")]),
    "basic.ack": (60, 80, [("delivery_tag", "longlong"), ("multiple", "bit")]),
    "basic.reject": (60, 90, [("delivery_tag", "longlong"), ("requeue", "bit")]),
    "basic.recover": (60, 110, [("requeue", "bit")]),
    "basic.recover-ok": (60, 111, []),
    "basic.nack": (60, 120, [("delivery_tag", "longlong"), ("multiple", "bit"),
                             ("requeue", "bit")]),
    "confirm.select": (85, 10, [("nowait", "bit")]),
    "confirm.select-ok": (85, 11, []),
    "tx.select": (90, 10, []),
    "tx.select-ok": (90, 11, []),
    "tx.commit": (90, 20, []),
    "tx.commit-ok": (90, 21, []),
    "tx.rollback": (90, 30, []),
    "tx.rollback-ok": (90, 31, []),
}
BY_ID = {(c, m): name for name, (c, m, _) in M.items()}
CLASS_NAMES = {10: "connection", 20: "channel", 40: "exchange", 50: "queue", 60: "basic",
               85: "confirm", 90: "tx"}

# Methods with content (a header and bodies follow).
CONTENT_METHODS = {"basic.publish", "basic.return", "basic.deliver", "basic.get-ok"}


def method_name(class_id: int, method_id: int) -> str:
    return BY_ID.get((class_id, method_id), f"{class_id}.{method_id}")


def encode_method(name: str, args: dict) -> bytes:
    c, m, spec = M[name]
    out = bytearray(struct.pack(">HH", c, m))
    bits: list[bool] = []

    def flush_bits():
        if bits:
            v = 0
            for i, b in enumerate(bits):
                if b:
                    v |= 1 << i
            out.append(v)
            bits.clear()

    for arg, t in spec:
        v = args.get(arg)
        if t == "bit":
            bits.append(bool(v))
            if len(bits) == 8:
                flush_bits()
            continue
        flush_bits()
        if t == "octet":
            out += struct.pack(">B", v or 0)
        elif t == "short":
            out += struct.pack(">H", v or 0)
        elif t == "long":
            out += struct.pack(">I", v or 0)
        elif t == "longlong":
            out += struct.pack(">Q", v or 0)
        elif t == "shortstr":
            b = to_bytes(v or "")
            out += bytes([len(b)]) + b
        elif t == "longstr":
            b = to_bytes(v or "")
            out += struct.pack(">I", len(b)) + b
        elif t == "table":
            out += encode_table(v or [])
    flush_bits()
    return bytes(out)


def decode_method(payload: bytes) -> tuple[str, dict]:
    c, m = struct.unpack_from(">HH", payload, 0)
    name = method_name(c, m)
    if name not in M:
        return name, {}
    spec = M[name][2]
    o = 4
    args = {}
    bit_i = 8
    byte = 0
    for arg, t in spec:
        if t == "bit":
            if bit_i == 8:
                byte = payload[o]
                o += 1
                bit_i = 0
            args[arg] = bool(byte & (1 << bit_i))
            bit_i += 1
            continue
        bit_i = 8
        if t == "octet":
            args[arg] = payload[o]
            o += 1
        elif t == "short":
            (args[arg],) = struct.unpack_from(">H", payload, o)
            o += 2
        elif t == "long":
            (args[arg],) = struct.unpack_from(">I", payload, o)
            o += 4
        elif t == "longlong":
            (args[arg],) = struct.unpack_from(">Q", payload, o)
            o += 8
        elif t == "shortstr":
            n = payload[o]
            args[arg] = from_bytes(payload[o + 1:o + 1 + n])
            o += 1 + n
        elif t == "longstr":
            (n,) = struct.unpack_from(">I", payload, o)
            args[arg] = from_bytes(payload[o + 4:o + 4 + n])
            o += 4 + n
        elif t == "table":
            args[arg], o = decode_table(payload, o)
    return name, args


def frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + bytes([FRAME_END])


def method_frame(channel: int, name: str, args: dict | None = None) -> bytes:
    return frame(FRAME_METHOD, channel, encode_method(name, args or {}))


# Basic properties, in flag order (bit 15 first).
PROPS = [("content_type", "shortstr"), ("content_encoding", "shortstr"), ("headers", "table"),
         ("delivery_mode", "octet"), ("priority", "octet"), ("correlation_id", "shortstr"),
         ("reply_to", "shortstr"), ("expiration", "shortstr"), ("message_id", "shortstr"),
         ("timestamp", "longlong"), ("type", "shortstr"), ("user_id", "shortstr"),
         ("app_id", "shortstr"), ("cluster_id", "shortstr")]


def content_frames(channel: int, body: bytes, props: dict, frame_max: int) -> list[bytes]:
    flags = 0
    pl = bytearray()
    for i, (name, t) in enumerate(PROPS):
        if name not in props or props[name] is None:
            continue
        flags |= 1 << (15 - i)
        v = props[name]
        if t == "shortstr":
            b = to_bytes(v)
            pl += bytes([len(b)]) + b
        elif t == "table":
            pl += encode_table(v)
        elif t == "octet":
            pl += struct.pack(">B", v)
        elif t == "longlong":
            pl += struct.pack(">Q", v)
    header = struct.pack(">HHQH", 60, 0, len(body), flags) + bytes(pl)
    frames = [frame(FRAME_HEADER, channel, header)]
    step = max(1, frame_max - 8)
    for i in range(0, len(body), step):
        frames.append(frame(FRAME_BODY, channel, body[i:i + step]))
    return frames


def decode_header(payload: bytes) -> tuple[int, dict]:
    _cls, _w, size, flags = struct.unpack_from(">HHQH", payload, 0)
    o = 14
    props = {}
    for i, (name, t) in enumerate(PROPS):
        if not flags & (1 << (15 - i)):
            continue
        if t == "shortstr":
            n = payload[o]
            props[name] = from_bytes(payload[o + 1:o + 1 + n])
            o += 1 + n
        elif t == "table":
            props[name], o = decode_table(payload, o)
        elif t == "octet":
            props[name] = payload[o]
            o += 1
        elif t == "longlong":
            (props[name],) = struct.unpack_from(">Q", payload, o)
            o += 8
    return size, props


# ------------------------------------------------------------------------------------------
# connection


class ConnectionLost(Exception):
    pass


@dataclass
class Incoming:
    """One complete thing from the server: a method (with its content, if any)."""
    channel: int
    name: str
    args: dict
    body: bytes | None = None
    props: dict | None = None


@dataclass
class Conn:
    sock: socket.socket
    frame_max: int = 131072
    channel_max: int = 2047
    buf: bytearray = field(default_factory=bytearray)
    # channel -> [Incoming awaiting content, expected size, collected body parts]
    _partial: dict = field(default_factory=dict)
    closed: bool = False

    @classmethod
    def open(cls, host: str, port: int, timeout: float = 5.0) -> "Conn":
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(s)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.closed = True
            raise ConnectionLost(str(e)) from e

    def send_method(self, channel: int, name: str, args: dict | None = None) -> None:
        self.send(method_frame(channel, name, args))

    def _fill(self, deadline: float) -> bool:
        """Reads once; False on timeout. Raises ConnectionLost at EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            return False
        except OSError as e:
            self.closed = True
            raise ConnectionLost(str(e)) from e
        if not data:
            self.closed = True
            raise ConnectionLost("EOF")
        self.buf += data
        return True

    def _parse(self) -> list[Incoming]:
        out = []
        buf = self.buf
        o = 0
        while len(buf) - o >= 7:
            ftype, ch, size = struct.unpack_from(">BHI", buf, o)
            if len(buf) - o < 8 + size:
                break
            payload = bytes(buf[o + 7:o + 7 + size])
            o += 8 + size
            if ftype == FRAME_METHOD:
                name, args = decode_method(payload)
                inc = Incoming(ch, name, args)
                if name in CONTENT_METHODS:
                    self._partial[ch] = [inc, None, []]
                else:
                    out.append(inc)
            elif ftype == FRAME_HEADER:
                p = self._partial.get(ch)
                if p is not None:
                    size_, props = decode_header(payload)
                    p[0].props = props
                    p[1] = size_
                    if size_ == 0:
                        p[0].body = b""
                        out.append(p[0])
                        del self._partial[ch]
            elif ftype == FRAME_BODY:
                p = self._partial.get(ch)
                if p is not None:
                    p[2].append(payload)
                    if sum(map(len, p[2])) >= (p[1] or 0):
                        p[0].body = b"".join(p[2])
                        out.append(p[0])
                        del self._partial[ch]
            # heartbeats ignored
        del buf[:o]
        return out

    def read(self, deadline: float) -> list[Incoming]:
        """Whatever complete items arrive before `deadline` (at least one read attempt)."""
        items = self._parse()
        if items:
            return items
        while time.monotonic() < deadline:
            if not self._fill(deadline):
                break
            items = self._parse()
            if items:
                return items
        return []

    def close_socket(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


CAPABILITIES = ["consumer_cancel_notify", "authentication_failure_close", "publisher_confirms",
                "exchange_exchange_bindings", "basic.nack", "connection.blocked"]


class LoginRefused(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def handshake(host: str, port: int, vhost: str, token: str, *, cancel_notify: bool = True,
              timeout: float = 5.0, username: str = "") -> Conn:
    """Connects and logs in with PLAIN `\\0\\0<token>`. Raises LoginRefused with a class
    (`login refused`, `530 ...`, `conn <code>`) when the server refuses."""
    c = Conn.open(host, port, timeout)
    deadline = time.monotonic() + timeout
    try:
        c.send(b"AMQP\x00\x00\x09\x01")
        start = _expect(c, deadline)
        if start.name != "connection.start":
            raise LoginRefused(f"unexpected {start.name}")
        caps = [[k, "t", k != "consumer_cancel_notify" or cancel_notify] for k in CAPABILITIES]
        c.send_method(0, "connection.start-ok", {
            "client_properties": [["product", "S", "session-fuzz"],
                                  ["capabilities", "F", caps]],
            "mechanism": "PLAIN", "response": "\0" + username + "\0" + token, "locale": "en_US"})
        tune = _expect(c, deadline)
        if tune.name == "connection.close":
            raise LoginRefused("login refused")
        if tune.name != "connection.tune":
            raise LoginRefused(f"unexpected {tune.name}")
        c.frame_max = tune.args["frame_max"] or 131072
        c.channel_max = tune.args["channel_max"] or 2047
        c.send_method(0, "connection.tune-ok", {"channel_max": c.channel_max,
                                                "frame_max": c.frame_max, "heartbeat": 0})
        c.send_method(0, "connection.open", {"virtual_host": vhost})
        ok = _expect(c, deadline)
        if ok.name == "connection.close":
            raise LoginRefused(f"{ok.args['reply_code']} {ok.args['reply_text']}")
        if ok.name != "connection.open-ok":
            raise LoginRefused(f"unexpected {ok.name}")
    except (ConnectionLost, TimeoutError) as e:
        c.close_socket()
        raise LoginRefused(f"login refused ({e})") from e
    except LoginRefused:
        c.close_socket()
        raise
    c.sock.settimeout(None)
    return c


def _expect(c: Conn, deadline: float) -> Incoming:
    while True:
        items = c.read(deadline)
        if items:
            # During the handshake only one method is outstanding at a time.
            return items[0]
        if time.monotonic() >= deadline:
            raise TimeoutError("handshake timed out")
