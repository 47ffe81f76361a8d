"""pika (a real AMQP 0-9-1 client) through the gateway, over TLS, to RabbitMQ.

Each test is one acceptance point: what an allowed token can do end to end, what a
restricted token is refused with the exact RabbitMQ error, and that refused logins never
reach RabbitMQ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pika
import pika.exceptions
import pytest

from conftest import (
    ADMIN_ROLE,
    AUDIENCE,
    ISSUER,
    READ_ONLY_ROLE,
    claims,
    hs256_with_public_key,
    mint,
    sign_rs256,
    unique,
    unsigned_token,
)

VHOST = "/"


def access_refused(kind: str, queue: str, user: str) -> str:
    return (
        f"ACCESS_REFUSED - {kind} access to queue '{queue}' in vhost '{VHOST}' "
        f"refused for user '{user}'"
    )


def queue_exists(conn: pika.BlockingConnection, queue: str) -> bool:
    ch = conn.channel()
    try:
        ch.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404, e
        return False
    ch.close()
    return True


def delete_queue(conn: pika.BlockingConnection, queue: str) -> None:
    ch = conn.channel()
    ch.queue_delete(queue)
    ch.close()


# --------------------------------------------------------------------------------------
# admin alias: full round trip


def payloads() -> list[bytes]:
    """Bodies that catch framing and copying bugs: empty, every byte value, and bodies
    larger than frame_max (131072) that span several body frames."""
    out = [b"", bytes(range(256)), b"\x00" * 7, "h\u00e9llo \u2603".encode()]
    out += [os.urandom(n) for n in (1, 4095, 4096, 4097, 131_064, 131_072, 300_001)]
    out += [f"message {i}".encode() * (i + 1) for i in range(30)]
    return out


def test_admin_alias_publish_confirm_consume_roundtrip(gateway, admin):
    queue = unique("py-admin")
    bodies = payloads()
    ch = admin.channel()
    ch.queue_declare(queue, durable=False, auto_delete=False)
    ch.confirm_delivery()
    for i, body in enumerate(bodies):
        # With confirms on, a nack or an unroutable mandatory message raises here.
        ch.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(
                message_id=str(i),
                content_type="application/octet-stream",
                headers={"index": i, "kind": "roundtrip"},
            ),
            mandatory=True,
        )
    assert ch.queue_declare(queue, passive=True).method.message_count == len(bodies)

    received = []
    for method, props, body in ch.consume(queue, inactivity_timeout=15):
        if method is None:
            break  # inactivity timeout: the assertion below reports what is missing
        received.append((props.message_id, props.headers, body))
        ch.basic_ack(method.delivery_tag)
        if len(received) == len(bodies):
            break
    ch.cancel()

    assert len(received) == len(bodies), f"got {len(received)} of {len(bodies)} messages"
    for i, (body, (mid, headers, got)) in enumerate(zip(bodies, received)):
        assert mid == str(i)
        assert headers == {"index": i, "kind": "roundtrip"}
        assert got == body, f"message {i}: body differs (len {len(got)} vs {len(body)})"
    assert ch.queue_declare(queue, passive=True).method.message_count == 0
    ch.queue_delete(queue)
    ch.close()


# --------------------------------------------------------------------------------------
# read-only alias: 403 on configure, the connection survives


def test_read_only_refused_configure_then_basic_get_on_new_channel(gateway, admin):
    existing = unique("py-ro-existing")
    new_queue = unique("py-ro-new")
    setup = admin.channel()
    setup.queue_declare(existing)
    setup.confirm_delivery()
    setup.basic_publish("", existing, b"for the reader", mandatory=True)

    conn = gateway.connect(mint(READ_ONLY_ROLE))
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare(new_queue)
        assert e.value.reply_code == 403
        assert e.value.reply_text == access_refused("configure", new_queue, READ_ONLY_ROLE)
        assert conn.is_open, "a channel error must not close the connection"

        ch2 = conn.channel()
        method, _props, body = ch2.basic_get(existing, auto_ack=False)
        assert method is not None, "basic_get found no message in the existing queue"
        assert body == b"for the reader"
        ch2.basic_ack(method.delivery_tag)
        ch2.close()
    finally:
        if conn.is_open:
            conn.close()

    # The refused declare must not have reached RabbitMQ.
    assert not queue_exists(admin, new_queue)
    delete_queue(admin, existing)


# --------------------------------------------------------------------------------------
# a token for another vhost: 530 at connection.open


def test_wrong_vhost_token_refused_with_530(gateway):
    sub = unique("py-wrong-vhost")
    token = mint(sub, scope="rabbitmq/read:other/*")
    with pytest.raises(
        (pika.exceptions.ProbableAccessDeniedError, pika.exceptions.ConnectionClosedByBroker)
    ) as e:
        gateway.connect(token, VHOST).close()
    expected = f"NOT_ALLOWED - access to vhost '{VHOST}' refused for user '{sub}'"
    if isinstance(e.value, pika.exceptions.ConnectionClosedByBroker):
        assert (e.value.reply_code, e.value.reply_text) == (530, expected)
    else:
        # pika wraps the broker's close in ProbableAccessDeniedError("ConnectionClosedByBroker:
        # (530) '<text>'"): only the repr of the original is kept.
        text = str(e.value.args[0])
        assert "ConnectionClosedByBroker" in text and "(530)" in text, text
        assert expected in text, text


# --------------------------------------------------------------------------------------
# refused logins


FULL_SCOPE = "rabbitmq/read:*/* rabbitmq/write:*/* rabbitmq/configure:*/*"


def _bad_token(kind: str, sub: str) -> str:
    """A token that would give full access, spoilt in one way."""
    if kind == "expired":
        return sign_rs256(claims(sub, scope=FULL_SCOPE, iat_offset=-3600, exp_in=600))
    if kind == "wrong_aud":
        return sign_rs256(claims(sub, scope=FULL_SCOPE, aud="not-" + AUDIENCE))
    if kind == "wrong_iss":
        return sign_rs256(claims(sub, scope=FULL_SCOPE, iss=ISSUER + ".evil"))
    if kind == "bad_signature":
        return sign_rs256(claims(sub, scope=FULL_SCOPE), key_file="other-rsa-private.pem")
    if kind == "alg_none":
        return unsigned_token(claims(sub, scope=FULL_SCOPE))
    if kind == "hs256_public_key":
        return hs256_with_public_key(claims(sub, scope=FULL_SCOPE))
    if kind == "valid":  # the control: the same construction, unspoilt
        return sign_rs256(claims(sub, scope=FULL_SCOPE))
    raise ValueError(kind)


REFUSED_KINDS = ["expired", "wrong_aud", "wrong_iss", "bad_signature", "alg_none",
                 "hs256_public_key"]


@pytest.fixture(scope="module")
def refused_attempts(gateway):
    """Tries every refused kind once: {kind: (sub, exception or None if it connected)}."""
    results = {}
    for kind in REFUSED_KINDS:
        sub = unique(f"py-refused-{kind}")
        try:
            conn = gateway.connect(_bad_token(kind, sub))
        except pika.exceptions.AMQPError as e:
            results[kind] = (sub, e)
        else:
            conn.close()
            results[kind] = (sub, None)
    return results


def test_control_token_is_accepted(gateway):
    """The refused tokens below differ from this one in one respect each."""
    conn = gateway.connect(_bad_token("valid", unique("py-control")))
    assert conn.is_open
    conn.close()


@pytest.mark.parametrize("kind", REFUSED_KINDS)
def test_refused_login(refused_attempts, kind):
    sub, err = refused_attempts[kind]
    assert err is not None, f"{kind} token was accepted (sub {sub})"
    assert isinstance(
        err,
        (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError),
    ), repr(err)
    # pika keeps only the repr of the broker's connection.close: check code and text.
    text = repr(err)
    assert "(403)" in text, text
    assert (
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN" in text
    ), text


def _rabbitmqctl_connections() -> str:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not os.path.exists(ctl):
        pytest.fail("rabbitmqctl not found (run scripts/setup.sh)")
    out = subprocess.run(
        [ctl, "-q", "list_connections", "user", "client_properties"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_refused_logins_open_no_backend_connection(gateway, refused_attempts):
    # Control: an accepted login is visible, named after its user, so the search below
    # would find a refused one that got through.
    control_sub = unique("py-visible")
    conn = gateway.connect(_bad_token("valid", control_sub))
    try:
        deadline = time.monotonic() + 10
        while True:
            listing = _rabbitmqctl_connections()
            if control_sub in listing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert control_sub in listing, f"accepted connection not listed:\n{listing}"
        line = next(l for l in listing.splitlines() if control_sub in l)
        assert f"{control_sub} via amqp-iam-gateway from 127.0.0.1:" in line, line
    finally:
        conn.close()
    for kind, (sub, _err) in refused_attempts.items():
        assert sub not in listing, f"{kind}: a backend connection exists for {sub}"


# --------------------------------------------------------------------------------------
# a scope alias found through a nested claim


def test_nested_request_tag_alias(gateway, admin):
    sub = unique("py-nested")  # no alias for this sub
    token = mint(sub, request_tags={"scope": "team-a"})
    allowed = f"team-a.{unique('q')}"
    refused = f"other-{unique('q')}"
    conn = gateway.connect(token)
    try:
        ch = conn.channel()
        assert ch.queue_declare(allowed).method.queue == allowed
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare(refused)
        assert e.value.reply_code == 403
        assert e.value.reply_text == access_refused("configure", refused, sub)
        ch2 = conn.channel()
        ch2.queue_delete(allowed)
    finally:
        if conn.is_open:
            conn.close()
    assert not queue_exists(admin, refused)
    assert not queue_exists(admin, allowed)


# --------------------------------------------------------------------------------------
# client compatibility: the URL form, bind, confirms, refusal, update-secret


def test_pika_url_bind_confirms_refusal_and_update_secret(gateway):
    """pika with `URLParameters("amqps://:TOKEN@localhost:PORT/%2f")`: the empty username
    is kept (PlainCredentials("", token)); the TLS context cannot go in the URL, so it is
    set on the parsed parameters. `BlockingConnection.update_secret` sends
    connection.update-secret and waits for update-secret-ok."""
    from conftest import compat_user

    user = compat_user("pika")
    params = pika.URLParameters(gateway.url(user.full))
    assert params.credentials.username == ""
    params.ssl_options = pika.SSLOptions(gateway.ssl_context(), "localhost")
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ex, queue = unique("compat.pika.x"), unique("compat.pika.q")
        ch.exchange_declare(ex, "direct")
        ch.queue_declare(queue)
        ch.queue_bind(queue, ex, "rk")
        ch.confirm_delivery()
        for i in range(20):
            ch.basic_publish(ex, "rk", f"m{i}".encode(), mandatory=True)  # raises on nack
        got = []
        for method, _props, body in ch.consume(queue, inactivity_timeout=10):
            assert method is not None, f"timed out after {len(got)} messages"
            got.append(body)
            ch.basic_ack(method.delivery_tag)
            if len(got) == 20:
                break
        ch.cancel()
        assert got == [f"m{i}".encode() for i in range(20)]

        bad = conn.channel()
        forbidden = unique("forbidden.pika")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            bad.queue_declare(forbidden)
        assert (e.value.reply_code, e.value.reply_text) == (
            403, user.refused("configure", "queue", forbidden)
        )
        assert conn.is_open and ch.is_open
        ch2 = conn.channel()
        ch.basic_publish(ex, "rk", b"after", mandatory=True)
        method, _props, body = ch2.basic_get(queue, auto_ack=False)
        assert body == b"after"
        ch2.basic_ack(method.delivery_tag)
        ch2.queue_delete(queue)
        ch2.exchange_delete(ex)

        conn.update_secret(user.read_only, "refresh")
        ch3 = conn.channel()
        again = unique("compat.pika.q")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch3.queue_declare(again)
        assert e.value.reply_text == user.refused("configure", "queue", again)
        assert conn.is_open
    finally:
        if conn.is_open:
            conn.close()


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_tls_1_2_and_1_3(gateway, version):
    """The AMQPS listener speaks TLS 1.2 and 1.3."""
    import ssl

    ctx = gateway.ssl_context()
    ctx.minimum_version = getattr(ssl.TLSVersion, version)
    ctx.maximum_version = getattr(ssl.TLSVersion, version)
    params = pika.ConnectionParameters(
        gateway.host, gateway.port, "/", pika.PlainCredentials("", mint(ADMIN_ROLE)),
        ssl_options=pika.SSLOptions(ctx, "localhost"), connection_attempts=1,
    )
    conn = pika.BlockingConnection(params)
    assert conn.is_open
    conn.close()
