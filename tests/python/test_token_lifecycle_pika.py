"""Token lifecycle with pika: expiry closes with 320 at about exp; update-secret without read
on a consumed queue cancels the consumer; another user's token is refused; a refreshed token
with a later exp keeps the connection alive past the first one's."""
import time

import pika
import pytest

from conftest import mint, unique

FULL = "rabbitmq/configure:*/* rabbitmq/read:*/* rabbitmq/write:*/*"


def test_expiry_closes_with_320_at_about_exp(gateway):
    sub = unique("arn:aws:iam::111122223333:role/Expiring")
    conn = gateway.connect(mint(sub, scope=FULL, exp_in=3))
    start = time.monotonic()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        while time.monotonic() - start < 8:
            conn.process_data_events(time_limit=0.1)
    took = time.monotonic() - start
    assert (closed.value.reply_code, closed.value.reply_text) == (320, "CONNECTION_FORCED - credential expired")
    assert 1.5 < took < 4.5, f"closed after {took:.2f} s for exp = now + 3 s"


def test_update_secret_cancels_the_consumer_refuses_another_user_and_extends_exp(gateway):
    sub = unique("arn:aws:iam::111122223333:role/Refresher")
    conn = gateway.connect(mint(sub, scope=FULL, exp_in=3))
    ch = conn.channel()
    q = ch.queue_declare(unique("lifecycle"), exclusive=True).method.queue
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume(q, lambda *a: None, auto_ack=True)

    # Later exp, and no read on this queue any more: the consumer is cancelled.
    conn.update_secret(mint(sub, scope="rabbitmq/read:%2F/other-* rabbitmq/write:*/*", exp_in=300), "refresh")
    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert cancelled == [tag], "basic.cancel from the server for the consumer"

    # Past the first token's exp the connection is still open.
    time.sleep(3.5)
    conn.process_data_events(time_limit=0.1)
    assert conn.is_open
    conn.channel().basic_qos(prefetch_count=1)

    # Another user's token is refused and closes the connection (RabbitMQ 4.x).
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        conn.update_secret(mint(unique("arn:aws:iam::111122223333:role/Other"), scope=FULL), "swap")
        conn.process_data_events(time_limit=1)
    assert (closed.value.reply_code, closed.value.reply_text) == (
        530, "NOT_ALLOWED - New secret was refused by one of the backends")
