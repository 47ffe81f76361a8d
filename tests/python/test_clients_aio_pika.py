"""aio-pika (asyncio, on aiormq) through the gateway over TLS, connecting with the URL form
`amqps://:TOKEN@localhost:PORT/%2f`.

Quirk: aiormq's PLAIN response uses `url.user or "guest"`, so an empty username in the URL
goes out as "guest". The gateway (like RabbitMQ's OAuth 2.0 backend) ignores the username,
so this is harmless; the token in the password is what counts.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
import pytest

from conftest import compat_user, unique

N = 20


async def _assert_declare_refused(ch, user, queue: str) -> None:
    """Declaring `queue` on `ch` is refused with the broker's configure refusal for `user`.
    aiormq maps the reply code to the class (403 -> ChannelAccessRefused) and keeps the
    reply text as the only argument."""
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as e:
        await ch.declare_queue(queue)
    assert e.value.args == (user.refused("configure", "queue", queue),)


async def _scenario(gateway) -> None:
    user = compat_user("aio-pika")
    conn = await aio_pika.connect(
        gateway.url(user.full), ssl_context=gateway.ssl_context(), timeout=20
    )
    try:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.declare_exchange(unique("compat.aio.x"), aio_pika.ExchangeType.DIRECT)
        q = await ch.declare_queue(unique("compat.aio.q"))
        await q.bind(ex, routing_key="rk")
        for i in range(N):
            # publisher_confirms=True: publish returns once the broker acked it.
            confirm = await ex.publish(
                aio_pika.Message(f"m{i}".encode(), message_id=str(i)), routing_key="rk"
            )
            assert isinstance(confirm, aiormq.spec.Basic.Ack), confirm

        got = []
        async with q.iterator() as it:
            async for msg in it:
                got.append(msg.body)
                await msg.ack()
                if len(got) == N:
                    break
        assert got == [f"m{i}".encode() for i in range(N)]

        # A forbidden operation: 403 on that channel, the connection stays usable.
        await _assert_declare_refused(await conn.channel(), user, unique("forbidden.aio"))
        assert not conn.is_closed
        ch2 = await conn.channel()
        await ex.publish(aio_pika.Message(b"after"), routing_key="rk")  # the first channel
        q2 = await ch2.get_queue(q.name)  # passive declare on a new channel
        msg = await q2.get(timeout=5)
        assert msg.body == b"after"
        await msg.ack()
        await q.unbind(ex, "rk")
        await q.delete()
        await ex.delete()

        # connection.update-secret: refresh to the read-only token of the same user.
        await conn.update_secret(user.read_only, reason="refresh")
        await _assert_declare_refused(await conn.channel(), user, unique("compat.aio.q"))
        assert not conn.is_closed
    finally:
        await conn.close()


def test_aio_pika_round_trip_refusal_and_update_secret(gateway):
    asyncio.run(asyncio.wait_for(_scenario(gateway), 60))
