"""Internal users beside tokens: `[auth] backends = ["oauth2", "internal"]`.

One gateway with the chain, the PROXY protocol on (every connection goes through a shim that
names the client's address, so the loopback and source-network rules see the address a load
balancer would give), an audit log, and `[auth.sources]` for one user. Internal users are
created on the default node (127.0.0.1:5672) through its management API for the module and
deleted after it. What the broker answers through the gateway is compared byte for byte with
what it answers directly.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import statistics
import time
import urllib.parse
import uuid

import amqp
import pika
import pytest

import conftest
from conftest import (
    _free_port,
    _write_config,
    _write_tls,
    management_api,
    metric,
    mint,
    proxy_shim,
    run_gateway,
)

RUN = uuid.uuid4().hex[:8]
FULL = f"iu-full-{RUN}"
LIMITED = f"iu-lim-{RUN}"
WRONG = f"iu-wrong-{RUN}"
MONITOR = f"iu-monitor-{RUN}"
TWIN = f"iu-twin-{RUN}"
FALLS = f"iu-falls-{RUN}"
FALLS_GARBAGE = f"iu-garbage-{RUN}"
FALLS_BADSIG = f"iu-badsig-{RUN}"
FALLS_ISS = f"iu-iss-{RUN}"
VHOST = f"iu-vh-{RUN}"
PASSWORD = uuid.uuid4().hex
# The passwords of three internal users. A token whose signature fails and a JWT-shaped
# string that is no token fall through to a login that works; an expired token with a
# valid signature is the issuer's, and ends the chain at the token backend.
EXPIRED_TOKEN = mint(FALLS, exp_in=-600)
# Signed with the trusted key, but naming another issuer than the pinned one. Minted when
# the module is collected, so valid for long enough to still be unexpired when the test
# runs in a full suite (`exp` is checked before `iss`).
OTHER_ISSUER_TOKEN = mint(FALLS_ISS, iss="https://sts.elsewhere.example", exp_in=3600)
GARBAGE_JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.not-a-signature"
BAD_SIGNATURE_TOKEN = mint(FALLS_BADSIG)[:-6] + "AAAAAA"
LOGIN_REFUSED = (
    "ConnectionClosedByBroker: (403) 'ACCESS_REFUSED - Login was refused using "
    "authentication mechanism PLAIN. For details see the broker logfile.'"
)


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


@pytest.fixture(scope="module")
def users():
    """Internal users on the default node: FULL (everything on `/`), LIMITED (only
    `iu-lim-*` on `/`, nothing on VHOST), WRONG (for the back-off), MONITOR (with source
    networks), TWIN (the same name as a token's user, no permissions), and two users whose
    passwords look like tokens."""
    made = []

    def user(name: str, password: str, perms: tuple[str, str, str] | None):
        management_api("PUT", f"/api/users/{_q(name)}", {"password": password, "tags": ""})
        made.append(name)
        if perms:
            c, w, r = perms
            management_api("PUT", f"/api/permissions/%2F/{_q(name)}",
                           {"configure": c, "write": w, "read": r})

    management_api("PUT", f"/api/vhosts/{_q(VHOST)}")
    try:
        allow = (".*", ".*", ".*")
        user(FULL, PASSWORD, allow)
        user(LIMITED, PASSWORD, ("^iu-lim-.*", "^iu-lim-.*", "^iu-lim-.*"))
        user(WRONG, PASSWORD, allow)
        user(MONITOR, PASSWORD, allow)
        user(TWIN, PASSWORD, None)
        user(FALLS, EXPIRED_TOKEN, allow)
        user(FALLS_GARBAGE, GARBAGE_JWT, allow)
        user(FALLS_BADSIG, BAD_SIGNATURE_TOKEN, allow)
        user(FALLS_ISS, OTHER_ISSUER_TOKEN, allow)
        yield
    finally:
        for name in made:
            try:
                management_api("DELETE", f"/api/users/{_q(name)}")
            except Exception:  # noqa: BLE001 - best effort
                pass
        try:
            management_api("DELETE", f"/api/vhosts/{_q(VHOST)}")
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture(scope="module")
def gw(tmp_path_factory, users):
    workdir = tmp_path_factory.mktemp("internal-users")
    ca = _write_tls(workdir)
    port, admin_port = _free_port(), _free_port()
    config = _write_config(workdir, port, admin_port)
    text = config.read_text().replace(
        "auth_failure_delay_ms = 300", "auth_failure_delay_ms = 300\nproxy_protocol = true")
    text += (
        'audit = "audit.jsonl"\n\n'
        "[auth]\n"
        'backends = ["oauth2", "internal"]\n\n'
        "[auth.sources]\n"
        f'"{MONITOR}" = ["10.0.0.0/8"]\n'
    )
    config.write_text(text)
    with run_gateway(workdir, config, port, ca) as g, contextlib.ExitStack() as shims:
        g.admin_port = admin_port
        g.audit = workdir / "audit.jsonl"
        ports: dict[str, int] = {}

        def shim(source: str) -> int:
            # One load balancer per client address, for the module.
            if source not in ports:
                ports[source] = shims.enter_context(proxy_shim(g.port, source))
            return ports[source]

        g.shim = shim
        yield g


def params(g, port: int, user: str, password: str, vhost: str = "/") -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host="127.0.0.1", port=port, virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password),
        ssl_options=pika.SSLOptions(g.ssl_context(), "localhost"),
        connection_attempts=1, retry_delay=0, socket_timeout=10, stack_timeout=20)


def connect(g, user: str, password: str, *, source: str = "127.0.0.1", vhost: str = "/"):
    """A pika connection through the gateway from `source` (the PROXY header's address)."""
    return pika.BlockingConnection(params(g, g.shim(source), user, password, vhost))


def direct(user: str, password: str, vhost: str = "/") -> pika.BlockingConnection:
    host, port = conftest.BACKEND_NODE.rsplit(":", 1)
    return pika.BlockingConnection(pika.ConnectionParameters(
        host, int(port), vhost, pika.PlainCredentials(user, password),
        connection_attempts=1, socket_timeout=10))


def refusal(fn) -> str:
    """The text of the exception `fn` raises (a refused login or operation)."""
    with pytest.raises(Exception) as e:  # noqa: PT011 - the text is what is compared
        fn()
    return f"{type(e.value).__name__}: {e.value}"


def audit_records(g) -> list[dict]:
    try:
        return [json.loads(line) for line in g.audit.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def login_refusals(g, since: int = 0) -> list[tuple]:
    """(backend, reason) of each refused login the audit log recorded after its first
    `since` records."""
    return [(r.get("backend"), r.get("reason")) for r in audit_records(g)[since:]
            if r["decision"] == "deny" and r.get("event") == "authentication"]


def round_trip(conn: pika.BlockingConnection, queue: str) -> bytes:
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)
    ch.basic_publish("", queue, b"hello")
    for _ in range(50):
        _, _, body = ch.basic_get(queue, auto_ack=True)
        if body is not None:
            return body
        time.sleep(0.05)
    return b""


def test_an_internal_user_logs_in_with_its_own_credentials_and_works(gw):
    conn = connect(gw, FULL, PASSWORD)
    try:
        assert round_trip(conn, f"iu-q-{RUN}") == b"hello"
        # The broker sees the user itself, never the gateway's service user (the management
        # API lists a connection once its first statistics are in: a few seconds).
        mine: list = []
        deadline = time.monotonic() + 15
        while not mine and time.monotonic() < deadline:
            time.sleep(0.5)
            mine = [c for c in management_api("GET", "/api/connections")
                    if f"{FULL} via amqp-iam-gateway" in (c.get("client_properties") or {}).get(
                        "connection_name", "")]
        assert [c["user"] for c in mine] == [FULL], mine
    finally:
        conn.close()
    # AMQPLAIN (py-amqp's default) is passed on as the client sent it.
    c = amqp.Connection(
        host=f"127.0.0.1:{gw.shim('127.0.0.1')}", userid=FULL, password=PASSWORD,
        login_method="AMQPLAIN",
        ssl={"ca_certs": str(gw.ca_file), "cert_reqs": ssl.CERT_REQUIRED,
             "server_hostname": "localhost"},
        connect_timeout=10)
    c.connect()
    try:
        q, _, _ = c.channel().queue_declare(f"iu-amqplain-{RUN}", auto_delete=True)
        assert q == f"iu-amqplain-{RUN}"
    finally:
        c.close()
    assert metric(gw.admin_port,
                  'amqp_iam_gateway_authentications_total{issuer="internal",outcome="accepted",reason="ok"}') >= 2
    allowed = [r for r in audit_records(gw)
               if r.get("username") == FULL and r["decision"] == "allow"]
    assert allowed and all(r["backend"] == "internal" for r in allowed), allowed


def test_a_limited_internal_user_is_refused_by_rabbitmq_with_its_codes_and_texts(gw):
    """The broker enforces the user's permissions: through the gateway the client gets
    exactly what the broker sends directly."""
    forbidden = f"iu-forbidden-{RUN}"

    allowed = f"iu-lim-{RUN}"

    def ops(conn):
        out = []
        conn.channel().queue_declare(allowed, auto_delete=True)
        out.append("declared")
        out.append(refusal(lambda: conn.channel().queue_declare(forbidden)))
        out.append(refusal(lambda: conn.channel().queue_bind(allowed, "amq.topic", "a.b")))
        out.append(refusal(lambda: conn.channel().basic_get(forbidden)))
        return out

    via_gateway = connect(gw, LIMITED, PASSWORD)
    straight = direct(LIMITED, PASSWORD)
    try:
        got, want = ops(via_gateway), ops(straight)
    finally:
        for c in (via_gateway, straight):
            if c.is_open:
                c.close()
    assert got == want, (got, want)
    assert "(403, \"ACCESS_REFUSED - access to queue" in got[1], got
    # The vhost the user may not use: the broker's 530, word for word.
    got = refusal(lambda: connect(gw, LIMITED, PASSWORD, vhost=VHOST))
    want = refusal(lambda: direct(LIMITED, PASSWORD, vhost=VHOST))
    assert got == want and "(530)" in got, (got, want)


def test_a_wrong_password_is_refused_as_rabbitmq_refuses_it_and_backs_off(gw):
    want = refusal(lambda: direct(WRONG, "not-the-password"))
    got = refusal(lambda: connect(gw, WRONG, "not-the-password", source="10.20.0.1"))
    assert got.endswith(LOGIN_REFUSED) and want.endswith(LOGIN_REFUSED), (got, want)
    cached = 'amqp_iam_gateway_authentications_total{issuer="internal",outcome="refused",reason="cached_failure"}'
    before = metric(gw.admin_port, cached)
    # Within the back-off, even the right password is refused without asking the broker...
    assert refusal(lambda: connect(gw, WRONG, PASSWORD, source="10.20.0.1")).endswith(LOGIN_REFUSED)
    assert metric(gw.admin_port, cached) == before + 1
    # ...from that address only; and once it is over, the login works.
    connect(gw, WRONG, PASSWORD, source="10.20.0.2").close()
    time.sleep(1.2)
    connect(gw, WRONG, PASSWORD, source="10.20.0.1").close()


def test_loopback_users_and_source_networks_are_judged_on_the_real_client_address(gw):
    # guest/guest is a loopback user (RabbitMQ's default): the PROXY header's address counts.
    connect(gw, "guest", "guest", source="127.0.0.1").close()
    connect(gw, "guest", "guest", source="::1").close()
    assert refusal(lambda: connect(gw, "guest", "guest", source="203.0.113.9")).endswith(LOGIN_REFUSED)
    # A user with [auth.sources] only from its networks.
    connect(gw, MONITOR, PASSWORD, source="10.1.2.3").close()
    assert refusal(lambda: connect(gw, MONITOR, PASSWORD, source="192.0.2.50")).endswith(LOGIN_REFUSED)
    records = audit_records(gw)
    reasons = {(r.get("username"), r["reason"], r.get("backend")) for r in records
               if r["decision"] == "deny"}
    assert ("guest", "loopback_only", "internal") in reasons, records
    assert (MONITOR, "source_network", "internal") in reasons, records


def test_a_valid_token_wins_over_an_internal_user_of_the_same_name(gw):
    token = mint(TWIN, scope="rabbitmq/configure:*/* rabbitmq/write:*/* rabbitmq/read:*/*")
    conn = connect(gw, TWIN, token)
    try:
        # The internal TWIN has no permissions at all: this works only as the token's user.
        assert round_trip(conn, f"iu-twin-q-{RUN}") == b"hello"
    finally:
        conn.close()
    # The internal user exists (its own login gets as far as the vhost).
    got = refusal(lambda: connect(gw, TWIN, PASSWORD))
    assert "(530)" in got and f"refused for user '{TWIN}'" in got, got


def test_a_password_that_fails_as_a_token_falls_through_to_the_internal_user(gw):
    for user, password in ((FALLS_BADSIG, BAD_SIGNATURE_TOKEN), (FALLS_GARBAGE, GARBAGE_JWT)):
        conn = connect(gw, user, password, source="10.30.0.1")
        try:
            assert round_trip(conn, f"iu-falls-q-{RUN}") == b"hello"
        finally:
            conn.close()
    # A login that succeeded leaves no refusal record, though its first backend refused.
    denies = [r for r in audit_records(gw) if r.get("username") in (FALLS_BADSIG, FALLS_GARBAGE)
              and r["decision"] == "deny"]
    assert not denies, denies


def test_a_verified_token_that_a_claim_refuses_is_not_offered_to_the_broker(gw):
    """An expired token with a valid signature is the issuer's, not a password: the chain
    ends at the token backend. FALLS's internal password is exactly this token, so had it
    gone on to the broker, the login would have worked (and a broker running its own OAuth
    2.0 plugin could accept a token the gateway refused, by rules without `nbf`, `jti_deny`
    or token policies)."""
    before = len(audit_records(gw))
    got = refusal(lambda: connect(gw, FALLS, EXPIRED_TOKEN, source="10.31.0.1"))
    assert got == f"ProbableAuthenticationError: {LOGIN_REFUSED}", got
    assert login_refusals(gw, before) == [("oauth2", "expired")]


def test_a_verified_token_naming_another_issuer_is_not_offered_to_the_broker(gw):
    """The same for a token the trusted key signed whose `iss` is not the pinned issuer:
    RabbitMQ's own OAuth 2.0 plugin (3.10) does not check `iss`, so a broker running it would
    take the token. FALLS_ISS's internal password is this token; the chain ends before it."""
    before = len(audit_records(gw))
    got = refusal(lambda: connect(gw, FALLS_ISS, OTHER_ISSUER_TOKEN, source="10.31.0.2"))
    assert got == f"ProbableAuthenticationError: {LOGIN_REFUSED}", got
    assert login_refusals(gw, before) == [("oauth2", "issuer")]


def test_with_internal_first_a_token_is_still_checked_before_the_broker_sees_it(
        tmp_path, users):
    """`backends = ["internal", "oauth2"]`: a JWT-shaped password goes to the token backend
    first, so FALLS's expired token (its internal password) is refused by the gateway and
    never offered to the broker. A password and a token whose signature fails still reach
    the broker, in the configured order."""
    ca = _write_tls(tmp_path)
    port = _free_port()
    cfg = _write_config(tmp_path, port, _free_port())
    cfg.write_text(cfg.read_text() + 'audit = "audit.jsonl"\n\n'
                   '[auth]\nbackends = ["internal", "oauth2"]\n')
    with run_gateway(tmp_path, cfg, port, ca) as g:
        g.audit = tmp_path / "audit.jsonl"
        got = refusal(lambda: pika.BlockingConnection(params(g, port, FALLS, EXPIRED_TOKEN)))
        assert got == f"ProbableAuthenticationError: {LOGIN_REFUSED}", got
        assert login_refusals(g) == [("oauth2", "expired")]
        for user, password in ((FULL, PASSWORD), (FALLS_BADSIG, BAD_SIGNATURE_TOKEN)):
            conn = pika.BlockingConnection(params(g, port, user, password))
            try:
                assert round_trip(conn, f"iu-first-{user}") == b"hello"
            finally:
                conn.close()


def test_refusals_do_not_tell_which_backend_refused(gw):
    """A JWT that fails and a password that fails both end at the broker's refusal: the same
    text, and times of the same order (medians of 9 logins each, each from its own address
    so no back-off is involved)."""
    bad_sig = mint(FULL)[:-6] + "AAAAAA"
    times = {"token": [], "password": []}
    texts = set()
    for i in range(9):
        for kind, password in (("token", bad_sig), ("password", f"nope-{i}")):
            source = f"10.40.{0 if kind == 'token' else 1}.{i + 1}"
            t0 = time.monotonic()
            texts.add(refusal(lambda: connect(gw, FULL, password, source=source)))
            times[kind].append(time.monotonic() - t0)
    assert texts == {f"ProbableAuthenticationError: {LOGIN_REFUSED}"}, texts
    tok, pw = statistics.median(times["token"]), statistics.median(times["password"])
    print(f"median refusal: token {tok * 1000:.1f} ms, password {pw * 1000:.1f} ms")
    assert 1 / 3 < tok / pw < 3, (tok, pw)


def test_the_default_chain_has_tokens_only(gateway):
    """Without [auth], guest/guest is refused at the gateway (no backend login)."""
    got = refusal(lambda: pika.BlockingConnection(
        pika.ConnectionParameters(
            host=gateway.host, port=gateway.port,
            credentials=pika.PlainCredentials("guest", "guest"),
            ssl_options=pika.SSLOptions(gateway.ssl_context(), "localhost"),
            connection_attempts=1, socket_timeout=10)))
    assert got.endswith(LOGIN_REFUSED), got


def test_an_internal_users_session_is_drained_like_a_token_session(tmp_path):
    """SIGTERM: the internal user's session keeps working for the drain period, then gets
    the 320 RabbitMQ sends when a node shuts down, from the gateway (the session is relayed
    unchecked, but the gateway's own closes still apply)."""
    import signal

    ca = _write_tls(tmp_path)
    port = _free_port()
    cfg = _write_config(tmp_path, port, _free_port())
    cfg.write_text(cfg.read_text().replace(
        "auth_failure_delay_ms = 300",
        "auth_failure_delay_ms = 300\ndrain_period_ms = 600\ndrain_deadline_ms = 8000",
    ) + '\n[auth]\nbackends = ["oauth2", "internal"]\n')
    with run_gateway(tmp_path, cfg, port, ca) as g:
        conn = pika.BlockingConnection(params(g, port, "guest", "guest"))
        ch = conn.channel()
        ch.queue_declare(f"iu-drain-{RUN}", exclusive=True)
        sent = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ch.basic_qos(prefetch_count=1)  # still relayed during the drain period
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            while time.monotonic() - sent < 8:
                conn.process_data_events(time_limit=0.1)
        assert (closed.value.reply_code, closed.value.reply_text) == (
            320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'")
        assert time.monotonic() - sent >= 0.55
        assert g.proc.wait(timeout=10) == 0, g.log()
