"""RabbitMQ 3.10.8's own 541 on a pipelined consume and cancel (rule R-BROKER-541).

Straight against the broker, no gateway: each connection declares a queue, then sends
`basic.consume` (acknowledged mode, tag c1) and `basic.cancel c1` in one write. 3.10.8's
channel crashes (`badkey`) and the broker closes the connection with 541 INTERNAL_ERROR.
The session fuzzer's rule R-BROKER-541 rests on this; run it again when the broker version
changes:

    python3 tests/session_fuzz/broker_541.py [connections] [host] [port]
"""

import socket
import struct
import sys
import uuid


def sstr(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def lstr(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def method(ch: int, class_id: int, method_id: int, args: bytes = b"") -> bytes:
    p = struct.pack(">HH", class_id, method_id) + args
    return struct.pack(">BHI", 1, ch, len(p)) + p + b"\xce"


class Raw:
    def __init__(self, host: str, port: int):
        self.s = socket.create_connection((host, port))
        self.s.settimeout(3)
        self.buf = b""
        self.s.sendall(b"AMQP\x00\x00\x09\x01")
        self.read()  # start
        self.s.sendall(method(0, 10, 11, lstr(b"") + sstr(b"PLAIN") + lstr(b"\x00guest\x00guest")
                              + sstr(b"en_US")))
        self.read()  # tune
        self.s.sendall(method(0, 10, 31, struct.pack(">HIH", 2047, 131072, 0))
                       + method(0, 10, 40, sstr(b"/") + sstr(b"") + b"\x00"))
        self.read()  # open-ok

    def read(self) -> tuple[int, int, bytes]:
        while len(self.buf) < 7 or len(self.buf) < 8 + struct.unpack(">I", self.buf[3:7])[0]:
            d = self.s.recv(65536)
            if not d:
                raise EOFError
            self.buf += d
        t, ch, n = struct.unpack(">BHI", self.buf[:7])
        p = self.buf[7:7 + n]
        self.buf = self.buf[8 + n:]
        return t, ch, p


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 5672
    crashes = 0
    for _ in range(n):
        c = Raw(host, port)
        q = ("broker-541-" + uuid.uuid4().hex[:8]).encode()
        c.s.sendall(method(1, 20, 10, sstr(b"")))
        c.read()  # channel.open-ok
        c.s.sendall(method(1, 50, 10, b"\x00\x00" + sstr(q) + b"\x08" + lstr(b"")))  # declare, nowait
        c.s.sendall(method(1, 60, 20, b"\x00\x00" + sstr(q) + sstr(b"c1") + b"\x00" + lstr(b""))
                    + method(1, 60, 30, sstr(b"c1") + b"\x00"))
        try:
            while True:
                t, _, p = c.read()
                ids = struct.unpack(">HH", p[:4]) if t == 1 else None
                if ids == (10, 50):
                    crashes += struct.unpack(">H", p[4:6])[0] == 541
                    break
                if ids == (60, 31):  # cancel-ok: no crash this time
                    break
        except (socket.timeout, EOFError):
            pass
        c.s.close()
        d = Raw(host, port)
        d.s.sendall(method(1, 20, 10, sstr(b"")))
        d.read()
        d.s.sendall(method(1, 50, 40, b"\x00\x00" + sstr(q) + b"\x00"))  # queue.delete
        d.read()
        d.s.close()
    print(f"{crashes} of {n} connections closed by the broker with 541 INTERNAL_ERROR")


if __name__ == "__main__":
    main()
