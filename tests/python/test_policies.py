"""Broker policies in IAM's JSON grammar (`[authorization]`), end to end.

Every test runs its own gateway (conftest's `_write_config`, plus an `[authorization]`
section and the policy documents written next to the config) in front of the default node
(127.0.0.1:5672), and drives it with pika as a client would: the policies decide through
the real relay, and the refusals are RabbitMQ's codes and texts. Exchanges and queues are
made and inspected directly on the node as `guest` (so that the gateway's own checks on
declares do not get in the way) and deleted at the end of each test.

The CLI tests (`check-config`, `simulate`, `explain --operation`) run the same binary on the
same kind of config; `simulate` is compared with what the live gateway did for the same token.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pika
import pytest

import conftest
from conftest import (
    ACCOUNT,
    STS_NS,
    _free_port,
    _write_config,
    _write_tls,
    claims,
    gateway_binary,
    metric,
    proxy_shim,
    run_gateway,
    sign_rs256,
)

APP_ROLE = f"arn:aws:iam::{ACCOUNT}:role/App"
AUDITOR_ROLE = f"arn:aws:iam::{ACCOUNT}:role/Auditor"
OUR_ORG = "o-ourorg0001"
# Every permission, topics included (a 2-part scope grants no topic access).
FULL_SCOPE = ("rabbitmq/configure:*/* rabbitmq/write:*/* rabbitmq/read:*/* "
              "rabbitmq/write:*/*/* rabbitmq/read:*/*/*")
ARN = "arn:aws:rabbitmq:::vhost"  # the resource ARNs' common prefix
POLICY_FILE = "broker-policy.json"
VERSION = "2012-10-17"

# Everyone may open a connection to `/` (mode "both" and "policies" need an Allow for it).
CONNECT_ANYONE = {
    "Sid": "AnyoneConnectsToTheDefaultVhost",
    "Effect": "Allow",
    "Principal": "*",
    "Action": "rabbitmq:Connect",
    "Resource": f"{ARN}/%2F",
}


# --------------------------------------------------------------------------------------
# tokens


def token(
    sub: str,
    *,
    role: str | None = APP_ROLE,
    scope: str | None = FULL_SCOPE,
    principal_tags: dict | None = None,
    request_tags: dict | None = None,
    org_id: str | None = None,
    iat_offset: int = 0,
    exp_in: int = 300,
) -> str:
    """An STS-shaped token for the user `sub` (its RabbitMQ username), assumed from `role`
    (`aws:PrincipalArn`), with its tags and organisation in the nested STS object."""
    c = claims(sub, scope=scope, request_tags=request_tags, iat_offset=iat_offset,
               exp_in=exp_in)
    sts = c[STS_NS]
    if role is not None:
        sts["principal_id"] = role
    if principal_tags is not None:
        sts["principal_tags"] = dict(principal_tags)
    if org_id is not None:
        sts["org_id"] = org_id
    return sign_rs256(c)


def uname(prefix: str) -> str:
    """A unique name under `prefix.` (what `prefix.*` in a policy matches)."""
    return f"{prefix}.{uuid.uuid4().hex[:16]}"


def policy(*statements: dict) -> dict:
    return {"Version": VERSION, "Statement": list(statements)}


# --------------------------------------------------------------------------------------
# a gateway with policies


def policy_config(
    workdir: Path,
    documents: dict[str, dict | str],
    mode: str | None,
    *,
    proxy_protocol: bool = False,
    plain_port: int | None = None,
):
    """Writes a CA and certificate, the documents (`name` → a policy, or its text as
    written; beside the config) and a config whose `[authorization]` lists them in that
    order with `mode` (None: the key is left out, so the default). Returns (config, the
    AMQPS port, the admin port, the CA file)."""
    ca = _write_tls(workdir)
    port, admin_port = _free_port(), _free_port()
    config = _write_config(workdir, port, admin_port)
    for name, doc in documents.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    text = authorization_config(config.read_text(), list(documents), mode,
                                proxy_protocol=proxy_protocol)
    if plain_port is not None:
        text = text.replace("[listener]\n",
                            f'[listener]\nplain_address = "127.0.0.1:{plain_port}"\n', 1)
    config.write_text(text)
    return config, port, admin_port, ca


@contextlib.contextmanager
def policy_gateway(
    workdir: Path,
    documents: dict[str, dict | str],
    mode: str | None,
    *,
    proxy_protocol: bool = False,
    plain: bool = False,
):
    """A gateway with `policy_config`'s config. Yields the Gateway with `config`,
    `workdir`, `audit` (the audit log, JSON lines), `connect(token, vhost, port=None,
    tls=True)` (closed at the end), `admin_port`, and with `plain`, `plain_port` (a
    listener without TLS)."""
    plain_port = _free_port() if plain else None
    config, port, admin_port, ca = policy_config(
        workdir, documents, mode, proxy_protocol=proxy_protocol, plain_port=plain_port)
    opened: list[pika.BlockingConnection] = []
    with run_gateway(workdir, config, port, ca) as gw:
        gw.config, gw.workdir, gw.admin_port = config, workdir, admin_port
        gw.plain_port = plain_port
        gw.audit = workdir / "audit.jsonl"

        def connect(tok: str, vhost: str = "/", port: int | None = None, tls: bool = True):
            params = gw.params(tok, vhost)
            if port is not None:
                params.port = port
            if not tls:
                params.ssl_options = None
            conn = pika.BlockingConnection(params)
            opened.append(conn)
            return conn

        gw.connect = connect
        try:
            yield gw
        finally:
            # Open clients would hold the gateway in its drain period at SIGINT.
            for c in opened:
                with contextlib.suppress(Exception):
                    if c.is_open:
                        c.close()


def authorization_config(text: str, names: list[str], mode: str | None, *,
                         proxy_protocol: bool = False) -> str:
    """conftest's config with the exchange-type lookups (so a direct exchange made on the
    node gets no topic check), an audit log, and `[authorization]`."""
    text = text.replace(
        'password = "guest"\n',
        'password = "guest"\nmanagement_url = "http://127.0.0.1:15672"\n', 1)
    if proxy_protocol:
        text = text.replace("auth_failure_delay_ms = 300",
                            "auth_failure_delay_ms = 300\nproxy_protocol = true", 1)
    text += 'audit = "audit.jsonl"\n\n[authorization]\n'
    if mode is not None:
        text += f'mode = "{mode}"\n'
    text += f"policies = {json.dumps(names)}\n"
    return text


def audit_records(gw) -> list[dict]:
    try:
        return [json.loads(line) for line in gw.audit.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------
# the node itself, for setup and for looking at what arrived


@contextlib.contextmanager
def node():
    """A channel on the default node as `guest`; the queues and exchanges it records in
    `made` are deleted at the end."""
    host, port = conftest.BACKEND_NODE.rsplit(":", 1)
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host, int(port), "/", pika.PlainCredentials("guest", "guest"),
        connection_attempts=1, socket_timeout=10))
    ch = conn.channel()
    made: list[tuple[str, str]] = []
    ch.made = made
    try:
        yield ch
    finally:
        try:
            c2 = conn.channel() if not ch.is_open else ch
            for kind, name in reversed(made):
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        c2.queue_delete(name)
                    else:
                        c2.exchange_delete(name)
        finally:
            conn.close()


def make_exchange(ch, name: str, kind: str = "direct") -> str:
    ch.exchange_declare(name, kind)
    ch.made.append(("exchange", name))
    return name


def make_queue(ch, name: str, bind: tuple[str, str] | None = None) -> str:
    ch.queue_declare(name)
    ch.made.append(("queue", name))
    if bind:
        ch.queue_bind(name, bind[0], bind[1])
    return name


def take(ch, queue: str, wait: float = 2.0) -> bytes | None:
    """The next message of `queue` (waiting up to `wait` s for it to arrive), or None."""
    deadline = time.monotonic() + wait
    while True:
        _, _, body = ch.basic_get(queue, auto_ack=True)
        if body is not None or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def empty(ch, queue: str) -> bool:
    """Nothing (more) in `queue`. A refused publish is answered by the gateway before
    anything reaches the broker, and every accepted one was confirmed: a short look will do."""
    return take(ch, queue, wait=0.2) is None


# --------------------------------------------------------------------------------------
# operations through the gateway


def publish(conn, exchange: str, routing_key: str, body: bytes = b"m") -> None:
    """A confirmed, mandatory publish on a new channel: returns once the broker has taken
    it (routed), raises ChannelClosedByBroker when refused."""
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish(exchange, routing_key, body, mandatory=True)
    ch.close()


def get(conn, queue: str) -> bytes | None:
    ch = conn.channel()
    try:
        return take(ch, queue)
    finally:
        if ch.is_open:
            ch.close()


def consume_one(conn, queue: str) -> bytes | None:
    """basic.consume (refused: ChannelClosedByBroker), then the first delivery."""
    ch = conn.channel()
    got: list[bytes] = []
    ch.basic_consume(queue, lambda c, m, p, body: got.append(body), auto_ack=True)
    deadline = time.monotonic() + 3
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    ch.close()
    return got[0] if got else None


def refusal(fn, *args) -> tuple[int, str]:
    """The channel.close a refused operation gets: (code, text)."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        fn(*args)
    return e.value.reply_code, e.value.reply_text


def refused_text(perm: str, kind: str, name: str, user: str, vhost: str = "/") -> str:
    return (f"ACCESS_REFUSED - {perm} access to {kind} '{name}' in vhost '{vhost}' "
            f"refused for user '{user}'")


def refused_topic_text(perm: str, routing_key: str, exchange: str, user: str) -> str:
    return (f"ACCESS_REFUSED - {perm} access to topic '{routing_key}' in exchange "
            f"'{exchange}' in vhost '/' refused for user '{user}'")


def vhost_refusal(fn) -> tuple[int, str]:
    """The connection.close of a refused connection.open: (code, text). pika wraps a 530
    in ProbableAccessDeniedError with the original's repr only."""
    with pytest.raises((pika.exceptions.ProbableAccessDeniedError,
                        pika.exceptions.ConnectionClosedByBroker)) as e:
        fn()
    if isinstance(e.value, pika.exceptions.ConnectionClosedByBroker):
        return e.value.reply_code, e.value.reply_text
    text = str(e.value.args[0])
    code = 530 if "(530)" in text else 0
    return code, text


# --------------------------------------------------------------------------------------
# the CLI


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The binary with `args`; standard input is `stdin`, or empty."""
    return subprocess.run([str(gateway_binary()), *args], capture_output=True, text=True,
                          timeout=30, input=stdin if stdin is not None else "")


def simulate(gw, tok: str, rows: list[str], *extra: str) -> tuple[int, dict | str]:
    ops = gw.workdir / f"ops-{uuid.uuid4().hex}.txt"
    ops.write_text("\n".join(rows) + "\n")
    tf = gw.workdir / f"token-{uuid.uuid4().hex}"
    tf.write_text(tok)
    r = cli("simulate", "--config", str(gw.config), "--operations", str(ops),
            "--token-file", str(tf), *extra)
    if "--json" in extra:
        assert r.stdout.strip(), r.stderr
        return r.returncode, json.loads(r.stdout)
    return r.returncode, r.stdout + r.stderr


# ======================================================================================
# 1. aws:PrincipalTag


def test_principal_tag_condition_decides_publishing(tmp_path):
    """Mode "both": role App may publish to orders.* only when its principal tag team is
    orders. Both tokens have every scope, so the policy alone makes the difference."""
    doc = policy(CONNECT_ANYONE, {
        "Sid": "OrdersTeamPublishesOrders",
        "Effect": "Allow",
        "Principal": {"AWS": [APP_ROLE]},
        "Action": "rabbitmq:Publish",
        "Resource": f"{ARN}/%2F/exchange/orders.*",
        "Condition": {"StringEquals": {"aws:PrincipalTag/team": "orders"}},
    })
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "both") as gw, node() as n:
        x = make_exchange(n, uname("orders"))
        q = make_queue(n, uname("orders-q"), bind=(x, "eu.new"))
        alice, bob, carol = uname("alice"), uname("bob"), uname("carol")

        conn = gw.connect(token(alice, principal_tags={"team": "orders"}))
        publish(conn, x, "eu.new", b"from-orders")
        assert take(n, q) == b"from-orders"

        conn = gw.connect(token(bob, principal_tags={"team": "billing"}))
        assert refusal(publish, conn, x, "eu.new") == (
            403, refused_text("write", "exchange", x, bob))
        assert conn.is_open, "a refused operation closes the channel, not the connection"
        # The same tag on another role does not count: the statement names role App.
        conn = gw.connect(token(carol, role=AUDITOR_ROLE, principal_tags={"team": "orders"}))
        assert refusal(publish, conn, x, "eu.new") == (
            403, refused_text("write", "exchange", x, carol))
        assert empty(n, q), "nothing refused reached the broker"


# ======================================================================================
# 2. aws:RequestTag and aws:TagKeys


def test_request_tag_condition(tmp_path):
    """Mode "both": publishing to telemetry.* needs the session tag env=prod; a session
    carrying any debug* tag is denied whatever else it has (ForAnyValue on aws:TagKeys)."""
    doc = policy(
        CONNECT_ANYONE,
        {
            "Sid": "ProdSessionsPublishTelemetry",
            "Effect": "Allow",
            "Principal": {"AWS": ACCOUNT},
            "Action": ["rabbitmq:Write"],
            "Resource": f"{ARN}/%2F/exchange/telemetry.*",
            "Condition": {"StringEquals": {"aws:RequestTag/env": "prod"}},
        },
        {
            "Sid": "NoDebugSessions",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "rabbitmq:*",
            "Resource": "*",
            "Condition": {"ForAnyValue:StringLike": {"aws:TagKeys": ["debug*"]}},
        },
    )
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "both") as gw, node() as n:
        x = make_exchange(n, uname("telemetry"))
        q = make_queue(n, uname("telemetry-q"), bind=(x, "k"))
        prod, dev, untagged, debug = (uname(p) for p in ("prod", "dev", "untagged", "debug"))

        publish(gw.connect(token(prod, request_tags={"env": "prod"})), x, "k", b"prod")
        assert take(n, q) == b"prod"
        for user, tags in ((dev, {"env": "dev"}), (untagged, None)):
            conn = gw.connect(token(user, request_tags=tags))
            assert refusal(publish, conn, x, "k") == (
                403, refused_text("write", "exchange", x, user)), user
        # The Deny covers rabbitmq:Connect too: refused at connection.open.
        code, text = vhost_refusal(lambda: gw.connect(
            token(debug, request_tags={"env": "prod", "debugSession": "1"})))
        assert code == 530, text
        assert f"NOT_ALLOWED - access to vhost '/' refused for user '{debug}'" in text
        assert empty(n, q)
        refused = [r for r in audit_records(gw)
                   if r.get("event") == "authentication" and r.get("username") == debug]
        assert [(r["decision"], r["reason"], r.get("statement")) for r in refused] == [
            ("deny", "vhost", f"{POLICY_FILE}:NoDebugSessions")], refused
        # Those refused by the scopes' side or an implicit deny name no statement.
        for user in (dev, untagged):
            records = [r for r in audit_records(gw)
                       if r.get("event") == "authorization" and r.get("username") == user]
            assert len(records) == 1 and "statement" not in records[0], records


# ======================================================================================
# 3. aws:PrincipalOrgID


def test_organisation_condition_denies_outsiders_reading_audit_queues(tmp_path):
    """Mode "scopes" (the default, key left out): every token may read everything by its
    scopes, but nobody from outside our organisation may read audit.* (a Deny with
    StringNotEquals, which also applies when the token has no org_id)."""
    doc = policy({
        "Sid": "OutsidersNeverReadAudit",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "rabbitmq:Read",
        "Resource": f"{ARN}/*/queue/audit.*",
        "Condition": {"StringNotEquals": {"aws:PrincipalOrgID": OUR_ORG}},
    })
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, None) as gw, node() as n:
        audit_q = make_queue(n, uname("audit"))
        work_q = make_queue(n, uname("work"))
        for q in (audit_q, audit_q, work_q):
            n.basic_publish("", q, q.encode())
        read = "rabbitmq/read:*/*"
        insider, outsider, orgless = uname("insider"), uname("outsider"), uname("orgless")

        conn = gw.connect(token(insider, scope=read, org_id=OUR_ORG))
        assert get(conn, audit_q) == audit_q.encode()
        assert consume_one(conn, audit_q) == audit_q.encode()

        for user, org in ((outsider, "o-elsewhere01"), (orgless, None)):
            conn = gw.connect(token(user, scope=read, org_id=org))
            expected = (403, refused_text("read", "queue", audit_q, user))
            assert refusal(get, conn, audit_q) == expected, user
            assert refusal(consume_one, conn, audit_q) == expected, user
            assert conn.is_open
        # The Deny takes only audit.* away: the scopes still grant the rest.
        assert get(gw.connect(token(outsider, scope=read, org_id="o-elsewhere01")),
                   work_q) == work_q.encode()


# ======================================================================================
# 4. aws:SourceIp from the PROXY header


def test_source_ip_condition_through_the_proxy_header(tmp_path):
    """Consumers only from 10.0.0.0/8: the client's address is the one the load balancer's
    PROXY header names. Publishing is not restricted by the statement."""
    doc = policy({
        "Sid": "ConsumersOnlyFromTheVpc",
        "Effect": "Deny",
        "Principal": "*",
        "Action": ["rabbitmq:Consume", "rabbitmq:Get"],
        "Resource": f"{ARN}/%2F/queue/*",
        "Condition": {"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
    })
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "scopes", proxy_protocol=True) as gw, \
            node() as n, proxy_shim(gw.port, "10.1.2.3") as inside, \
            proxy_shim(gw.port, "192.168.1.1") as outside:
        q = make_queue(n, uname("vpc-q"))
        user = uname("consumer")
        tok = token(user)

        conn = gw.connect(tok, port=outside)
        assert refusal(consume_one, conn, q) == (403, refused_text("read", "queue", q, user))
        assert refusal(get, conn, q) == (403, refused_text("read", "queue", q, user))
        publish(conn, "", q, b"from-outside")  # the Deny is about consumers only
        conn.close()  # before its shim goes

        conn = gw.connect(tok, port=inside)
        assert consume_one(conn, q) == b"from-outside"
        conn.close()

        # The audit log has the address of the PROXY header, and the statement.
        denied = [r for r in audit_records(gw)
                  if r.get("event") == "authorization" and r.get("username") == user]
        statement = f"{POLICY_FILE}:ConsumersOnlyFromTheVpc"
        assert [(r["client"].split(":")[0], r["method"], r.get("statement"))
                for r in denied] == [("192.168.1.1", "basic.consume", statement),
                                     ("192.168.1.1", "basic.get", statement)], denied

        # simulate agrees, given the same address.
        rows = [f"consume queue={q}"]
        for ip, permitted in (("10.1.2.3", True), ("192.168.1.1", False)):
            rc, out = simulate(gw, tok, rows, "--json", "--source-ip", ip)
            assert rc == 0, out
            assert out["results"][0]["permitted"] is permitted, out


# ======================================================================================
# 5. aws:CurrentTime (and aws:TokenIssueTime)


def test_time_window(tmp_path):
    """Mode "both": publishing to an exchange is allowed only within a window; a window in
    the past refuses, one that contains now allows, and one that closes while a connection
    is open refuses from then on (the time is read per operation). Tokens issued before a
    cut-off are revoked (a Deny on aws:TokenIssueTime), refused at connection.open."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    closes = int(time.time()) + 4
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731

    def window(sid: str, prefix: str, start: dt.datetime, end: dt.datetime) -> dict:
        return {
            "Sid": sid,
            "Effect": "Allow",
            "Principal": "*",
            "Action": "rabbitmq:Publish",
            "Resource": f"{ARN}/%2F/exchange/{prefix}.*",
            "Condition": {
                "DateGreaterThan": {"aws:CurrentTime": iso(start)},
                "DateLessThan": {"aws:CurrentTime": iso(end)},
            },
        }

    doc = policy(
        CONNECT_ANYONE,
        window("LastYearsWindow", "past", now - dt.timedelta(days=400),
               now - dt.timedelta(days=365)),
        window("ThisHoursWindow", "now", now - dt.timedelta(hours=1),
               now + dt.timedelta(hours=1)),
        {
            # Closes a few seconds from now: decided per operation, not once per connection.
            "Sid": "ClosingSoon",
            "Effect": "Allow",
            "Principal": "*",
            "Action": "rabbitmq:Publish",
            "Resource": f"{ARN}/%2F/exchange/closing.*",
            "Condition": {"NumericLessThan": {"aws:EpochTime": str(closes)}},
        },
        {
            "Sid": "RevokeOldTokens",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "rabbitmq:*",
            "Resource": "*",
            "Condition": {
                "DateLessThan": {"aws:TokenIssueTime": iso(now - dt.timedelta(minutes=10))}},
        },
    )
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "both") as gw, node() as n:
        past = make_exchange(n, uname("past"))
        current = make_exchange(n, uname("now"))
        q = make_queue(n, uname("window-q"), bind=(current, "k"))
        n.queue_bind(q, past, "k")
        user = uname("clock")
        tok = token(user)
        conn = gw.connect(tok)
        publish(conn, current, "k", b"in-window")
        assert take(n, q) == b"in-window"
        assert refusal(publish, conn, past, "k") == (
            403, refused_text("write", "exchange", past, user))
        assert empty(n, q)

        # The same connection, before and after the end of a window.
        closing = make_exchange(n, uname("closing"))
        n.queue_bind(q, closing, "k")
        publish(conn, closing, "k", b"before-close")
        assert take(n, q) == b"before-close"
        time.sleep(max(0.0, closes + 1.2 - time.time()))
        assert refusal(publish, conn, closing, "k") == (
            403, refused_text("write", "exchange", closing, user))

        old = uname("old-token")
        code, text = vhost_refusal(lambda: gw.connect(token(old, iat_offset=-3600,
                                                            exp_in=3900)))
        assert code == 530 and f"access to vhost '/' refused for user '{old}'" in text, text

        # simulate --at moves the clock: last year's window then allows, this hour's not.
        rows = [f"publish exchange={past} routing-key=k exchange-type=direct",
                f"publish exchange={current} routing-key=k exchange-type=direct"]
        rc, out = simulate(gw, tok, rows, "--json")
        assert [r["permitted"] for r in out["results"]] == [False, True], out
        at = iso(now - dt.timedelta(days=380))
        rc, out = simulate(gw, tok, rows, "--json", "--at", at)
        assert [r["permitted"] for r in out["results"]] == [True, False], out


# ======================================================================================
# 6. a Deny takes away what the scopes grant


def test_deny_statement_overrides_a_scope_grant_and_is_audited(tmp_path):
    """Mode "scopes": the token's scopes grant everything; a Deny in one document takes
    publishing to ledger.* away, one without a Sid in a second document (in a directory
    beside the config) takes vault.* away. The audit log and the log name the statement,
    `<document as written>:<Sid>` or `<document>:Statement[i]`."""
    ledger_doc = policy({
        "Sid": "NobodyWritesTheLedger",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "rabbitmq:Publish",
        "Resource": f"{ARN}/%2F/exchange/ledger.*",
    })
    vault_doc = policy({
        "Effect": "Deny",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
        "Action": "rabbitmq:Write",
        "Resource": f"{ARN}/*/exchange/vault.*",
    })
    second = "policies/vault.json"
    with policy_gateway(tmp_path, {POLICY_FILE: ledger_doc, second: vault_doc},
                        "scopes") as gw, node() as n:
        ledger = make_exchange(n, uname("ledger"))
        vault = make_exchange(n, uname("vault"))
        other = make_exchange(n, uname("journal"))
        q = make_queue(n, uname("ledger-q"), bind=(ledger, "k"))
        for x in (vault, other):
            n.queue_bind(q, x, "k")
        user = uname("writer")
        conn = gw.connect(token(user))  # every scope

        publish(conn, other, "k", b"ok")
        assert take(n, q) == b"ok"
        expected = {x: refused_text("write", "exchange", x, user) for x in (ledger, vault)}
        assert refusal(publish, conn, ledger, "k") == (403, expected[ledger])
        assert refusal(publish, conn, vault, "k") == (403, expected[vault])
        assert empty(n, q)

        statements = {ledger: f"{POLICY_FILE}:NobodyWritesTheLedger",
                      vault: f"{second}:Statement[0]"}
        denied = [r for r in audit_records(gw)
                  if r.get("event") == "authorization" and r.get("username") == user]
        assert [(r["decision"], r["method"], r["resource"], r["reason"], r.get("statement"))
                for r in denied] == [
            ("deny", "basic.publish", f"exchange '{x}'", expected[x], statements[x])
            for x in (ledger, vault)], denied
        log = [line for line in gw.log().splitlines() if "operation refused" in line]
        for statement in statements.values():
            assert any(user in line and (f'statement="{statement}"' in line
                                         or f"statement={statement} " in line)
                       for line in log), (statement, log)


# ======================================================================================
# 7. mode "policies": scopes are not consulted


def test_policies_mode_allows_by_policy_alone_and_refuses_a_vhost_without_connect(tmp_path):
    """Mode "policies": a token with no scope at all connects and publishes because a
    statement allows it; what no statement allows is refused, whatever the scopes. The
    per-operation actions are told apart: rabbitmq:QueueBind allows queue.bind and not
    queue.unbind, which needs the same permissions."""
    other_vhost = uname("policies-vh")
    conftest.management_api("PUT", f"/api/vhosts/{other_vhost}")
    try:
        with node() as n:
            q = make_queue(n, uname("pol-q"))
            x = make_exchange(n, uname("pol-x"))
            doc = policy(
                CONNECT_ANYONE,
                {
                    "Sid": "AppPublishesToItsQueue",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:role/Ap*"},
                    "Action": "rabbitmq:Publish",
                    "Resource": f"{ARN}/%2F/exchange/amq.default",
                },
                {
                    "Sid": "AppBindsItsQueue",
                    "Effect": "Allow",
                    "Principal": {"AWS": APP_ROLE},
                    "Action": "rabbitmq:QueueBind",
                    "Resource": [f"{ARN}/%2F/queue/pol-q.*", f"{ARN}/%2F/exchange/pol-x.*"],
                },
            )
            with policy_gateway(tmp_path, {POLICY_FILE: doc}, "policies") as gw:
                user = uname("no-scopes")
                tok = token(user, scope=None)  # no scope at all
                conn = gw.connect(tok)
                publish(conn, "", q, b"by-policy")
                assert take(n, q) == b"by-policy"

                conn.channel().queue_bind(q, x, "k")
                n.basic_publish(x, "k", b"bound")
                assert take(n, q) == b"bound", "the binding reached the broker"
                assert refusal(lambda: conn.channel().queue_unbind(q, x, "k")) == (
                    403, refused_text("write", "queue", q, user))
                # Nothing else is allowed: a declare is refused though no Deny exists.
                name = uname("pol-x")
                assert refusal(lambda: conn.channel().exchange_declare(name, "direct")) == (
                    403, refused_text("configure", "exchange", name, user))
                # Full scopes do not help in this mode, and the vhost needs rabbitmq:Connect.
                code, text = vhost_refusal(lambda: gw.connect(token(user), other_vhost))
                assert code == 530, text
                assert (f"NOT_ALLOWED - access to vhost '{other_vhost}' refused for user "
                        f"'{user}'") in text
                assert refusal(lambda: gw.connect(token(user)).channel().queue_declare(
                    uname("pol-q"), exclusive=True))[0] == 403
    finally:
        conftest.management_api("DELETE", f"/api/vhosts/{other_vhost}")


# ======================================================================================
# 8. a policy variable in Resource


def test_policy_variable_names_the_team_queue(tmp_path):
    """Mode "both": each team may declare and read only queues named after its principal
    tag, `team.${aws:PrincipalTag/team}.*`. A tag value is text, not a wildcard; without
    the tag the resource matches nothing."""
    doc = policy(CONNECT_ANYONE, {
        "Sid": "TeamQueues",
        "Effect": "Allow",
        "Principal": "*",
        "Action": ["rabbitmq:QueueDeclare", "rabbitmq:Get", "rabbitmq:Publish"],
        "Resource": [f"{ARN}/%2F/queue/team.${{aws:PrincipalTag/team}}.*",
                     f"{ARN}/%2F/exchange/amq.default"],
    })
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "both") as gw:
        red, star, untagged = uname("red"), uname("star"), uname("untagged")
        conn = gw.connect(token(red, principal_tags={"team": "red"}))
        ch = conn.channel()
        own = uname("team.red")
        ch.queue_declare(own, exclusive=True)
        ch.basic_publish("", own, b"red")
        assert take(ch, own) == b"red"
        blue = uname("team.blue")
        assert refusal(lambda: conn.channel().queue_declare(blue, exclusive=True)) == (
            403, refused_text("configure", "queue", blue, red))

        # team "*" is the literal text `*`: it matches no other team's queue.
        conn = gw.connect(token(star, principal_tags={"team": "*"}))
        assert refusal(lambda: conn.channel().queue_declare(blue, exclusive=True)) == (
            403, refused_text("configure", "queue", blue, star))
        conn = gw.connect(token(untagged))
        q = uname("team..")
        assert refusal(lambda: conn.channel().queue_declare(q, exclusive=True)) == (
            403, refused_text("configure", "queue", q, untagged))


# ======================================================================================
# 9. SIGHUP reloads the documents


def _wait_reloads(gw, result: str, n: int) -> None:
    sample = f'amqp_iam_gateway_config_reloads_total{{result="{result}"}}'
    deadline = time.monotonic() + 10
    while metric(gw.admin_port, sample) < n:
        assert time.monotonic() < deadline, f"{sample} never reached {n}\n{gw.log()[-3000:]}"
        time.sleep(0.05)


def test_sighup_reloads_the_policy_for_new_and_open_connections(tmp_path):
    def deny(prefix: str) -> dict:
        return policy({
            "Sid": f"Freeze{prefix.capitalize()}",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "rabbitmq:Publish",
            "Resource": f"{ARN}/%2F/exchange/{prefix}.*",
        })

    with policy_gateway(tmp_path, {POLICY_FILE: deny("alpha")}, "scopes") as gw, \
            node() as n:
        alpha = make_exchange(n, uname("alpha"))
        beta = make_exchange(n, uname("beta"))
        q = make_queue(n, uname("reload-q"), bind=(alpha, "k"))
        n.queue_bind(q, beta, "k")
        user = uname("reloaded")
        tok = token(user)

        conn = gw.connect(tok)
        assert refusal(publish, conn, alpha, "k")[0] == 403
        publish(conn, beta, "k", b"beta-1")
        assert take(n, q) == b"beta-1"
        # A connection that stays open across the reload, with a consumer on a queue the
        # new document will forbid.
        old = gw.connect(tok)
        watched = make_queue(n, uname("watched"))
        consumer = old.channel()
        cancelled: list = []
        consumer.add_on_cancel_callback(lambda frame: cancelled.append(frame))
        consumer.basic_consume(watched, lambda *a: None)

        new_doc = deny("beta")
        new_doc["Statement"].append({
            "Sid": "NoWatching", "Effect": "Deny", "Principal": "*",
            "Action": "rabbitmq:Consume", "Resource": f"{ARN}/%2F/queue/{watched}",
        })
        (tmp_path / POLICY_FILE).write_text(json.dumps(new_doc))
        gw.proc.send_signal(signal.SIGHUP)
        _wait_reloads(gw, "ok", 1)
        conn = gw.connect(tok)
        publish(conn, alpha, "k", b"alpha-2")
        assert take(n, q) == b"alpha-2"
        assert refusal(publish, conn, beta, "k") == (
            403, refused_text("write", "exchange", beta, user))
        # The open connection follows the new document too: its consumer is cancelled and
        # its publishes are judged by the new statements.
        deadline = time.monotonic() + 3
        while not cancelled and time.monotonic() < deadline:
            old.process_data_events(time_limit=0.05)
        assert cancelled, "the open connection's consumer was not cancelled by the reload"
        publish(old, alpha, "k", b"alpha-old")
        assert take(n, q) == b"alpha-old"
        assert refusal(publish, old, beta, "k") == (
            403, refused_text("write", "exchange", beta, user))

        # A broken document is refused with its JSON path; the last good one serves on.
        broken = deny("alpha")
        broken["Statement"][0]["Effect"] = "Forbid"
        (tmp_path / POLICY_FILE).write_text(json.dumps(broken))
        gw.proc.send_signal(signal.SIGHUP)
        _wait_reloads(gw, "error", 1)
        assert (f'{POLICY_FILE}: $.Statement[0].Effect: expected "Allow" or "Deny", '
                f'found "Forbid"') in gw.log()
        conn = gw.connect(tok)
        publish(conn, alpha, "k", b"alpha-3")
        assert take(n, q) == b"alpha-3"
        assert refusal(publish, conn, beta, "k")[0] == 403


# ======================================================================================
# 10. check-config


def test_check_config_reports_policy_errors_with_their_json_path(tmp_path):
    port, admin = _free_port(), _free_port()
    _write_tls(tmp_path)
    config = _write_config(tmp_path, port, admin)
    base = config.read_text()
    good = policy(CONNECT_ANYONE)
    (tmp_path / "good.json").write_text(json.dumps(good))
    config.write_text(base + '\n[authorization]\nmode = "both"\npolicies = ["good.json"]\n')
    r = cli("check-config", "--config", str(config), "--offline")
    assert r.returncode == 0, r.stdout + r.stderr

    bad = {
        "Version": VERSION,
        "Statement": [
            {"Sid": "Lower", "Effect": "allow", "Principal": "*",
             "Action": "rabbitmq:Publish", "Resource": f"{ARN}/%2F/exchange/x"},
            {"Sid": "Typo", "Effect": "Allow", "Principal": "*",
             "Action": ["rabbitmq:Publish", "rabbitmq:Publsh"],
             "Resource": "arn:aws:sqs:::vhost/x",
             "Condition": {"StringEquals": {"aws:PrincipalTeg/team": "x"}}},
        ],
    }
    (tmp_path / POLICY_FILE).write_text(json.dumps(bad))
    config.write_text(base + "\n[authorization]\nmode = \"both\"\n"
                      f'policies = ["good.json", "{POLICY_FILE}"]\n')
    r = cli("check-config", "--config", str(config), "--offline")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert (f'authorization.policies[1]: {POLICY_FILE}: $.Statement[0].Effect: expected '
            f'"Allow" or "Deny", found "allow"') in out, out
    # Every error at once, each with its path.
    for path in ("$.Statement[1].Action[1]", "$.Statement[1].Resource[0]",
                 '$.Statement[1].Condition.StringEquals["aws:PrincipalTeg/team"]'):
        assert f"authorization.policies[1]: {POLICY_FILE}: {path}: " in out, (path, out)
    assert "authorization.policies[0]" not in out, out

    # A mode unknown, and a document that is no JSON.
    (tmp_path / "good.json").write_text('{"Version": "2012-10-17", "Statement": [')
    config.write_text(base + '\n[authorization]\nmode = "strict"\npolicies = ["good.json"]\n')
    r = cli("check-config", "--config", str(config), "--offline")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "authorization.mode" in out and '"strict"' in out, out
    assert "authorization.policies[0]: good.json: $: not JSON" in out, out


# ======================================================================================
# 11. simulate and explain --operation agree with the live gateway


def test_simulate_and_explain_agree_with_the_live_gateway(tmp_path):
    """Mode "both" on a topic exchange: App may publish to orders.* with routing keys eu.*,
    except keys ending in .test (a Deny). The live refusals, simulate's rows and
    explain --operation's decision are compared for the same token."""
    deny_sid = "NoTestTraffic"
    doc = policy(
        CONNECT_ANYONE,
        {
            "Sid": "AppPublishesEuOrders",
            "Effect": "Allow",
            "Principal": {"AWS": APP_ROLE},
            "Action": "rabbitmq:Publish",
            "Resource": [f"{ARN}/%2F/exchange/orders.*", f"{ARN}/%2F/topic/orders.*/eu.*"],
        },
        {
            "Sid": deny_sid,
            "Effect": "Deny",
            "Principal": "*",
            "Action": "rabbitmq:Write",
            "Resource": f"{ARN}/%2F/topic/*",
            "Condition": {"StringLike": {"rabbitmq:RoutingKey": "*.test"}},
        },
    )
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "both") as gw, node() as n:
        x = make_exchange(n, uname("orders"), "topic")
        q = make_queue(n, uname("orders-q"), bind=(x, "#"))
        user = uname("sim")
        tok = token(user)
        conn = gw.connect(tok)

        live: dict[str, tuple[bool, str | None]] = {}
        for rk in ("eu.new", "us.new", "eu.new.test"):
            try:
                publish(conn, x, rk, rk.encode())
                live[rk] = (True, None)
            except pika.exceptions.ChannelClosedByBroker as e:
                assert e.reply_code == 403
                live[rk] = (False, e.reply_text)
        assert take(n, q) == b"eu.new"
        assert empty(n, q)
        assert live == {
            "eu.new": (True, None),
            "us.new": (False, refused_topic_text("write", "us.new", x, user)),
            "eu.new.test": (False, refused_topic_text("write", "eu.new.test", x, user)),
        }, live
        # The live gateway names the Deny where one decided (the audit log).
        live_statements = {r["resource"]: r.get("statement") for r in audit_records(gw)
                           if r.get("event") == "authorization" and r.get("username") == user}
        assert live_statements == {
            f"topic 'us.new' in exchange '{x}'": None,
            f"topic 'eu.new.test' in exchange '{x}'": f"{POLICY_FILE}:{deny_sid}",
        }, live_statements

        rows = [f"publish vhost=/ exchange={x} routing-key={rk}" for rk in live]
        rc, out = simulate(gw, tok, rows, "--json")
        assert rc == 0, out
        assert out["accepted"] is True and out["mode"] == "both", out
        got = {r["operation"].rsplit("=", 1)[1]: r for r in out["results"]}
        for rk, (permitted, reply) in live.items():
            assert (got[rk]["permitted"], got[rk]["reply"]) == (permitted, reply), got[rk]
        assert got["eu.new.test"]["statement"] == f"{POLICY_FILE}:{deny_sid}", got
        assert got["us.new"]["statement"] is None, got
        assert got["eu.new"]["permitted"] and "AppPublishesEuOrders" in got["eu.new"]["decided_by"]

        # --fail-on-deny: 1 with a refused row, 0 when every row is permitted.
        rc, text = simulate(gw, tok, rows, "--fail-on-deny")
        assert rc == 1, text
        rc, text = simulate(gw, tok, rows[:1], "--fail-on-deny")
        assert rc == 0, text

        # explain --operation: the token report, then the same decision.
        r = cli("explain", "--config", str(gw.config), "--operation", "publish",
                "--vhost", "/", "--exchange", x, "--routing-key", "eu.new.test", tok)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert user in out, out
        assert "DENY" in out and live["eu.new.test"][1] in out, out
        assert f"denied by {POLICY_FILE}:{deny_sid}" in out, out
        r = cli("explain", "--config", str(gw.config), "--operation", "publish",
                "--vhost", "/", "--exchange", x, "--routing-key", "eu.new", tok)
        assert r.returncode == 0 and "ALLOW" in r.stdout, r.stdout + r.stderr


# ======================================================================================
# 12. topic resources only for topic exchanges; rabbitmq:RoutingKey on any exchange


def test_topic_resources_are_checked_only_for_topic_exchanges(tmp_path):
    """Mode "scopes": a Deny on `topic/*/*.secret` refuses such keys on a topic exchange
    (RabbitMQ's topic check, with its text) and not on a direct one, which gets no topic
    check (its type is looked up). A Deny on the exchange with a rabbitmq:RoutingKey
    condition applies to every exchange type."""
    doc = policy(
        {
            "Sid": "NoSecretTopics",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "rabbitmq:Write",
            "Resource": f"{ARN}/%2F/topic/*/*.secret",
        },
        {
            "Sid": "NoForbiddenKeys",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "rabbitmq:Publish",
            "Resource": f"{ARN}/%2F/exchange/*",
            "Condition": {"StringLike": {"rabbitmq:RoutingKey": "*.forbidden"}},
        },
    )
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "scopes") as gw, node() as n:
        topic = make_exchange(n, uname("events"), "topic")
        direct = make_exchange(n, uname("commands"), "direct")
        q = make_queue(n, uname("events-q"), bind=(topic, "#"))
        for rk in ("a.secret", "a.forbidden"):
            n.queue_bind(q, direct, rk)
        user = uname("topics")
        tok = token(user)
        conn = gw.connect(tok)

        publish(conn, topic, "a.public", b"t-public")
        assert take(n, q) == b"t-public"
        assert refusal(publish, conn, topic, "a.secret") == (
            403, refused_topic_text("write", "a.secret", topic, user))
        publish(conn, direct, "a.secret", b"d-secret")
        assert take(n, q) == b"d-secret"
        for x in (direct, topic):
            assert refusal(publish, conn, x, "a.forbidden") == (
                403, refused_text("write", "exchange", x, user)), x
        assert empty(n, q)
        statements = [(r["resource"], r.get("statement")) for r in audit_records(gw)
                      if r.get("event") == "authorization" and r.get("username") == user]
        assert statements == [
            (f"topic 'a.secret' in exchange '{topic}'", f"{POLICY_FILE}:NoSecretTopics"),
            (f"exchange '{direct}'", f"{POLICY_FILE}:NoForbiddenKeys"),
            (f"exchange '{topic}'", f"{POLICY_FILE}:NoForbiddenKeys"),
        ], statements

        rows = [f"publish exchange={direct} routing-key=a.secret exchange-type=direct",
                f"publish exchange={topic} routing-key=a.secret exchange-type=topic"]
        rc, out = simulate(gw, tok, rows, "--json")
        assert [(r["permitted"], r["statement"]) for r in out["results"]] == [
            (True, None), (False, f"{POLICY_FILE}:NoSecretTopics")], out


# ======================================================================================
# 13. aws:SecureTransport


def test_secure_transport_condition(tmp_path):
    """A listener without TLS beside the TLS one: a Deny on everything when
    aws:SecureTransport is false refuses the plain connection at connection.open."""
    doc = policy({
        "Sid": "TlsOnly",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "rabbitmq:*",
        "Resource": "*",
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    })
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "scopes", plain=True) as gw:
        user = uname("plain")
        tok = token(user)
        code, text = vhost_refusal(lambda: gw.connect(tok, port=gw.plain_port, tls=False))
        assert code == 530 and f"access to vhost '/' refused for user '{user}'" in text, text
        conn = gw.connect(tok)
        conn.channel().queue_declare(uname("tls-q"), exclusive=True)
        refused = [r for r in audit_records(gw)
                   if r.get("event") == "authentication" and r.get("decision") == "deny"]
        assert [(r["username"], r.get("statement")) for r in refused] == [
            (user, f"{POLICY_FILE}:TlsOnly")], refused
        for extra, permitted in (((), True), (("--no-tls",), False)):
            rc, out = simulate(gw, tok, ["connect"], "--json", *extra)
            assert out["results"][0]["permitted"] is permitted, out


# ======================================================================================
# 14. a refreshed token (update-secret) is bound again


def test_update_secret_binds_the_new_tokens_tags(tmp_path):
    """Mode "both": the connection's permissions follow a token refreshed with
    connection.update-secret, principal tags included: publishing is refused after a move
    to another team, and the consumer the new token may no longer have is cancelled."""
    team_orders = {"StringEquals": {"aws:PrincipalTag/team": "orders"}}
    doc = policy(
        CONNECT_ANYONE,
        {
            "Sid": "OrdersTeamPublishesOrders",
            "Effect": "Allow",
            "Principal": {"AWS": [APP_ROLE]},
            "Action": "rabbitmq:Publish",
            "Resource": f"{ARN}/%2F/exchange/orders.*",
            "Condition": team_orders,
        },
        {
            "Sid": "OrdersTeamConsumesOrders",
            "Effect": "Allow",
            "Principal": {"AWS": [APP_ROLE]},
            "Action": "rabbitmq:Consume",
            "Resource": f"{ARN}/%2F/queue/orders-q.*",
            "Condition": team_orders,
        },
    )
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "both") as gw, node() as n:
        x = make_exchange(n, uname("orders"))
        q = make_queue(n, uname("orders-q"), bind=(x, "k"))
        feed = make_queue(n, uname("orders-q"))
        user = uname("refresher")
        conn = gw.connect(token(user, principal_tags={"team": "orders"}))
        publish(conn, x, "k", b"1")
        assert take(n, q) == b"1"
        consumer = conn.channel()
        cancelled: list = []
        consumer.add_on_cancel_callback(lambda frame: cancelled.append(frame))
        consumer.basic_consume(feed, lambda *a: None)

        conn.update_secret(token(user, principal_tags={"team": "billing"}), "moved team")
        assert refusal(publish, conn, x, "k") == (403, refused_text("write", "exchange", x, user))
        deadline = time.monotonic() + 3
        while not cancelled and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
        assert cancelled, "the consumer the new token may not have was cancelled"

        # A reload binds the policies to the refreshed token's tags, not the first one's.
        doc["Statement"].append({"Sid": "Unrelated", "Effect": "Deny", "Principal": "*",
                                 "Action": "rabbitmq:QueueDelete", "Resource": f"{ARN}/%2F/queue/nothing"})
        (tmp_path / POLICY_FILE).write_text(json.dumps(doc))
        gw.proc.send_signal(signal.SIGHUP)
        _wait_reloads(gw, "ok", 1)
        assert refusal(publish, conn, x, "k") == (403, refused_text("write", "exchange", x, user))

        conn.update_secret(token(user, principal_tags={"team": "orders"}), "back")
        publish(conn, x, "k", b"2")
        assert take(n, q) == b"2"


def test_a_reload_that_denies_the_vhost_closes_open_connections(tmp_path):
    """A Deny on rabbitmq:Connect added by a reload ends the connections already open on
    that vhost with 530, as an update-secret refused for the vhost does."""
    with policy_gateway(tmp_path, {POLICY_FILE: policy(CONNECT_ANYONE)}, "scopes") as gw:
        user = uname("evicted")
        conn = gw.connect(token(user))
        conn.channel().queue_declare(uname("evict-q"), exclusive=True)
        (tmp_path / POLICY_FILE).write_text(json.dumps(policy(CONNECT_ANYONE, {
            "Sid": "NoMoreApp", "Effect": "Deny", "Principal": {"AWS": APP_ROLE},
            "Action": "rabbitmq:Connect", "Resource": f"{ARN}/%2F"})))
        gw.proc.send_signal(signal.SIGHUP)
        _wait_reloads(gw, "ok", 1)
        deadline = time.monotonic() + 3
        closed = None
        while closed is None and time.monotonic() < deadline:
            try:
                conn.process_data_events(time_limit=0.05)
            except pika.exceptions.ConnectionClosedByBroker as e:
                closed = (e.reply_code, e.reply_text)
        assert closed == (530, f"NOT_ALLOWED - access to vhost '/' refused for user '{user}'"), closed
        code, _ = vhost_refusal(lambda: gw.connect(token(user)))
        assert code == 530


def test_simulate_reads_topic_keys_with_hash_and_skips_comments(tmp_path):
    doc = policy(CONNECT_ANYONE, {
        "Sid": "NoHashBinds", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:QueueBind",
        "Resource": "*", "Condition": {"StringEquals": {"rabbitmq:RoutingKey": "orders.#"}}})
    with policy_gateway(tmp_path, {POLICY_FILE: doc}, "scopes") as gw:
        tok = token(uname("hash"))
        rc, out = simulate(gw, tok, [
            "# a comment line",
            "queue-bind queue=q exchange=amq.topic routing-key=orders.#   # the wildcard key",
            "queue-bind queue=q exchange=amq.topic routing-key=orders.*",
        ], "--json")
        assert rc == 0, out
        got = [(r["operation"], r["permitted"], r["statement"]) for r in out["results"]]
        assert got == [
            ("queue-bind queue=q exchange=amq.topic routing-key=orders.#", False, f"{POLICY_FILE}:NoHashBinds"),
            ("queue-bind queue=q exchange=amq.topic routing-key=orders.*", True, None),
        ], got


# ======================================================================================
# 15. explain --operation: the token from standard input, and --json


EXPLAIN_DOC = policy(CONNECT_ANYONE, {
    "Sid": "NoAuditReads",
    "Effect": "Deny",
    "Principal": "*",
    "Action": "rabbitmq:Get",
    "Resource": f"{ARN}/%2F/queue/audit.*",
})


def test_explain_operation_reads_the_token_from_standard_input(tmp_path):
    """`explain [TOKEN]`: "The token; read from standard input when absent". With
    --operation, the decision is made for that same token, as with the token as argument."""
    config, *_ = policy_config(tmp_path, {POLICY_FILE: EXPLAIN_DOC}, "scopes")
    user = uname("stdin")
    tok = token(user)
    args = ["explain", "--config", str(config), "--operation", "get", "--queue", "audit.x"]
    by_arg = cli(*args, tok)
    assert by_arg.returncode == 0, by_arg.stdout + by_arg.stderr
    assert f"denied by {POLICY_FILE}:NoAuditReads" in by_arg.stdout, by_arg.stdout
    by_stdin = cli(*args, stdin=tok + "\n")
    out = by_stdin.stdout + by_stdin.stderr
    assert by_stdin.returncode == 0, out
    assert "accepted:  no" not in out, out
    assert f"username:  {user}" in by_stdin.stdout, out
    # The decisions (from the first row on) are the same.
    decision = lambda text: text[re.search(r"(?m)^ *1\. ", text).start():]  # noqa: E731
    assert decision(by_stdin.stdout) == decision(by_arg.stdout), out


def test_explain_operation_json_is_one_json_document(tmp_path):
    """`explain --json` is "Machine-readable output": with --operation too, standard
    output is one JSON document holding the token's report and the decision."""
    config, *_ = policy_config(tmp_path, {POLICY_FILE: EXPLAIN_DOC}, "scopes")
    user = uname("json")
    r = cli("explain", "--config", str(config), "--json", "--operation", "get",
            "--queue", "audit.x", token(user))
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        pytest.fail(f"not one JSON document ({e}):\n{r.stdout}")
    text = json.dumps(doc)
    assert user in text, text
    rows = []

    def walk(v):
        if isinstance(v, dict):
            if "permitted" in v and "statement" in v:
                rows.append(v)
            for w in v.values():
                walk(w)
        elif isinstance(v, list):
            for w in v:
                walk(w)

    walk(doc)
    assert [(r["permitted"], r["statement"]) for r in rows] == [
        (False, f"{POLICY_FILE}:NoAuditReads")], doc
