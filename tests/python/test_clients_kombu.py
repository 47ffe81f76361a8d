"""kombu (transport `pyamqp`, i.e. py-amqp) through the gateway over TLS, connecting with the
URL form `amqps://:TOKEN@localhost:PORT/%2f`.

- kombu passes the empty username through (py-amqp's PLAIN response is
  b"\\0" + username + b"\\0" + password).
- Publisher confirms: `transport_options={"confirm_publish": True}` makes every publish wait
  for the broker's ack.
- TLS options: `ssl` must be a dict of py-amqp's options (`ca_certs`, `cert_reqs`,
  `server_hostname`); an `ssl.SSLContext` is silently dropped (system CAs only), and the
  hostname is checked only when `server_hostname` is set.
- A refused operation raises `amqp.exceptions.AccessRefused` (reply_code 403, reply_text)
  and closes only that channel.
- py-amqp 5.x (and so kombu) has no `connection.update-secret`; the test shows the
  workaround used in application code: register update-secret-ok (10, 71) on the
  connection and send update-secret (10, 70) with `send_method`.
"""

from __future__ import annotations

import ssl
import time

import amqp
import amqp.exceptions
import amqp.spec
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from conftest import compat_user, unique

N = 20
UPDATE_SECRET = (10, 70)
UPDATE_SECRET_OK = (10, 71)


def update_secret(conn: amqp.Connection, token: str, reason: str = "refresh") -> None:
    """connection.update-secret for py-amqp, which does not implement it."""
    if UPDATE_SECRET_OK not in conn._METHODS:
        conn._METHODS = {**conn._METHODS, UPDATE_SECRET_OK: amqp.spec.method(UPDATE_SECRET_OK)}
    # new-secret is a longstr (S), reason a shortstr (s).
    conn.send_method(UPDATE_SECRET, "Ss", (token, reason), wait=UPDATE_SECRET_OK)


def test_kombu_round_trip_refusal_and_update_secret(gateway):
    user = compat_user("kombu")
    ex = Exchange(unique("compat.kombu.x"), type="direct", durable=False)
    q = Queue(unique("compat.kombu.q"), exchange=ex, routing_key="rk", durable=False)
    with Connection(
        gateway.url(user.full),
        # py-amqp takes a dict (an SSLContext is silently replaced by {}: system CAs), and
        # checks the hostname only when server_hostname is given.
        ssl={
            "ca_certs": str(gateway.ca_file),
            "cert_reqs": ssl.CERT_REQUIRED,
            "server_hostname": "localhost",
        },
        transport_options={"confirm_publish": True},
        connect_timeout=10,
    ) as conn:
        conn.connect()
        ch = conn.channel()
        q(ch).declare()  # exchange, queue and binding
        producer = Producer(ch, exchange=ex, routing_key="rk")
        for i in range(N):
            producer.publish(f"m{i}".encode(), content_type="application/octet-stream")

        got = []

        def on_message(body, message):
            got.append(body)
            message.ack()

        with Consumer(conn.channel(), queues=[q], callbacks=[on_message], accept=None):
            while len(got) < N:
                conn.drain_events(timeout=10)
        assert got == [f"m{i}".encode() for i in range(N)]

        # A forbidden operation: 403 on that channel, the connection stays usable.
        raw: amqp.Connection = conn.connection
        bad = raw.channel()
        forbidden = unique("forbidden.kombu")
        with pytest.raises(amqp.exceptions.AccessRefused) as e:
            bad.queue_declare(forbidden)
        assert (e.value.reply_code, e.value.reply_text) == (
            403, user.refused("configure", "queue", forbidden)
        )
        assert raw.connected
        ch2 = raw.channel()
        ch2.basic_publish(amqp.Message(b"after"), exchange=ex.name, routing_key="rk")
        msg = None
        for _ in range(50):
            msg = ch2.basic_get(q.name)
            if msg is not None:
                break
            time.sleep(0.05)
        assert msg is not None and msg.body == b"after"
        ch2.basic_ack(msg.delivery_tag)
        ch2.queue_delete(q.name)
        ch2.exchange_delete(ex.name)

        # connection.update-secret (workaround): refresh to the read-only token.
        update_secret(raw, user.read_only)
        ch3 = raw.channel()
        again = unique("compat.kombu.q")
        with pytest.raises(amqp.exceptions.AccessRefused) as e:
            ch3.queue_declare(again)
        assert e.value.reply_text == user.refused("configure", "queue", again)
        assert raw.connected
