"""Differential conformance: the gateway against RabbitMQ's own OAuth 2.0 plugin.

The same token × operation cases run against
  (a) the reference node: a second RabbitMQ (Debian 3.10.8) with rabbitmq_auth_backend_oauth2,
      started by scripts/reference-node.sh; the token is the AMQP password and the node
      validates it itself;
  (b) the gateway, with a configuration that mirrors the reference node's (same
      resource_server_id, same RS256 key and kid, default scope prefix `rabbitmq.`, same
      aliases, no issuer pin), relaying to the default node on 5672.
Each operation's outcome is reduced to a decision class (login refused, 530, channel 403 on
which resource, 404, 405, 406, OK) and the two sides are compared operation by operation.
A disagreement passes only when tests/conformance/differences.md documents it, with both
outcomes exactly as observed; a documented difference that is no longer observed fails too
(the list must stay true). docs/conformance.md explains how to run it and what the
differences are.

Profiles (the reference node switches at run time with application:set_env, read by the
3.10.8 plugin at every login; the gateway runs one instance per profile):
  base           additional_scopes_key = the top-level STS claim (the recorded matrix)
  aliases        scope aliases, no additional_scopes_key ("aliases-noextra")
  aliases-extra  both: shows 3.10.8's replacement bug (fixed in 4.1)
  pinned         base, and the gateway pins `iss` (a deliberate gateway addition)
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

import jwt
import pika
import pika.exceptions
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import conftest
from conftest import FIXTURES, REPO_ROOT, _free_port, _toml_str, _write_tls, run_gateway

REF_PORT = int(os.environ.get("REFERENCE_NODE_PORT", "5691"))
REF_SCRIPT = REPO_ROOT / "scripts" / "reference-node.sh"
DIFFERENCES = REPO_ROOT / "tests" / "conformance" / "differences.md"
KID = "test-rsa"
ISSUER = "https://issuer.test"
STS = "https://sts.amazonaws.com/"
ARN_READER = "arn:aws:iam::111122223333:role/Reader"
ARN_ADMIN = "arn:aws:iam::111122223333:role/Admin"
FULL = "rabbitmq.read:*/* rabbitmq.write:*/* rabbitmq.configure:*/*"
ADMIN_SCOPES = "rabbitmq.read:*/*/* rabbitmq.write:*/*/* rabbitmq.configure:*/* rabbitmq.tag:impersonator"
CASE_TIMEOUT_S = 20
# The same aliases on both sides (scripts/reference-node.sh has them for its `aliases`
# boot profile too). They expand to prefixed scopes: the prefix filter runs after.
ALIASES = {
    "reader-alias": ["rabbitmq.read:*/*"],
    ARN_READER: ["rabbitmq.read:*/*"],
    ARN_ADMIN: ["rabbitmq.read:*/*", "rabbitmq.write:*/*", "rabbitmq.configure:*/*"],
}

# A per-run tag in every resource name, so runs on a shared default node do not collide.
RUN = uuid.uuid4().hex[:6]
P = f"cf-{RUN}"  # prefix of the per-method matrix's resources
Q39 = f"ref-test-q-{RUN}"  # the oauth_matrix queue (the scope `configure:%2F/ref-*` covers it)


# --------------------------------------------------------------------------------------
# tokens


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


_PRIVATE = (FIXTURES / "rsa-private.pem").read_bytes()
_OTHER = (FIXTURES / "other-rsa-private.pem").read_bytes()
_UNSET = object()


def mint(scope=FULL, *, aud="rabbitmq", exp_in=300, kid=KID, sub="test-user", extra=None,
         key=None, alg="RS256", iss=ISSUER) -> str:
    now = int(time.time())
    c: dict = {"iat": now, "jti": str(uuid.uuid4())}
    if iss is not None:
        c["iss"] = iss
    if sub is not None:
        c["sub"] = sub
    if aud is not None:
        c["aud"] = aud
    if scope is not None:
        c["scope"] = scope
    if exp_in is not None:
        c["exp"] = now + int(exp_in)
    c.update(extra or {})
    return jwt.encode(c, key or _PRIVATE, algorithm=alg, headers={"kid": kid} if kid else {})


def unsigned() -> str:
    p = {"sub": "test-user", "aud": "rabbitmq", "scope": FULL, "exp": int(time.time()) + 300}
    return f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': KID})}.{_b64(p)}."


def hs256_with_public_pem() -> str:
    p = {"sub": "test-user", "aud": "rabbitmq", "scope": FULL, "exp": int(time.time()) + 300}
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': KID})}.{_b64(p)}"
    mac = hmac.new((FIXTURES / "rsa-public.pem").read_bytes(), signing_input.encode(),
                   hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def fresh_rsa_key() -> bytes:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def many_scopes(n: int) -> str:
    return FULL + " " + " ".join(f"rabbitmq.x{i}" for i in range(n - 3))


# --------------------------------------------------------------------------------------
# operations: each runs on a channel of its own (a refusal closes only that channel)


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str
    args: tuple = ()
    kw: tuple = ()  # sorted (key, value) pairs

    @property
    def label(self) -> str:
        shown = [(a or "''") if isinstance(a, str) else "<new token>" for a in self.args]
        extra = [k if v is True else f"({v})" if k == "what" else
                 f"{k}={json.dumps(v, separators=(',', ':'))}"
                 for k, v in self.kw if v not in (None, False)]
        return " ".join([self.kind, *shown, *extra])


def op(kind: str, *args, **kw) -> Op:
    return Op(kind, tuple(args), tuple(sorted(kw.items())))


def _run_op(conn: pika.BlockingConnection, o: Op) -> None:
    kw = dict(o.kw)
    if o.kind == "update_secret":
        conn.update_secret(o.args[0](), "refresh")
        return
    ch = conn.channel()
    k, a = o.kind, o.args
    if k == "qdeclare":
        ch.queue_declare(a[0], passive=kw.get("passive", False),
                         exclusive=kw.get("exclusive", False), arguments=kw.get("arguments"))
    elif k == "qdelete":
        ch.queue_delete(a[0])
    elif k == "qpurge":
        ch.queue_purge(a[0])
    elif k == "qbind":
        ch.queue_bind(a[0], a[1], a[2])
    elif k == "qunbind":
        ch.queue_unbind(a[0], a[1], a[2])
    elif k == "xdeclare":
        ch.exchange_declare(a[0], kw.get("type", "direct"), passive=kw.get("passive", False),
                            durable=kw.get("durable", False), arguments=kw.get("arguments"))
    elif k == "xdelete":
        ch.exchange_delete(a[0])
    elif k == "xbind":
        ch.exchange_bind(a[0], a[1], a[2])
    elif k == "xunbind":
        ch.exchange_unbind(a[0], a[1], a[2])
    elif k == "publish":
        ch.confirm_delivery()
        props = pika.BasicProperties(user_id=kw.get("user_id"), headers=kw.get("headers"),
                                     reply_to=kw.get("reply_to"))
        ch.basic_publish(a[0], a[1], b"conformance", props)
    elif k == "rpc":  # direct reply-to: consume the pseudo queue, publish with reply_to
        ch.basic_consume("amq.rabbitmq.reply-to", lambda *_: None, auto_ack=True)
        ch.confirm_delivery()
        ch.basic_publish(a[0], a[1], b"request",
                         pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    elif k == "consume":
        tag = ch.basic_consume(a[0], lambda *_: None, auto_ack=kw.get("no_ack", False))
        ch.basic_cancel(tag)
    elif k == "get":
        ch.basic_get(a[0], auto_ack=True)
    else:
        raise AssertionError(f"unknown op {k}")
    if ch.is_open:
        ch.close()


# --------------------------------------------------------------------------------------
# decision classes

_RESOURCE = re.compile(r"access to (queue|exchange) '(.*?)' in vhost")
_TOPIC = re.compile(r"access to topic '(.*?)' in exchange '(.*?)' in vhost")
_PERM_WORD = re.compile(r"^(configure|write|read) (?=access to )")


def normalize(text: str) -> str:
    """Run-independent names: the run tag and server-chosen queue names."""
    text = text.replace(RUN, "RUN")
    return re.sub(r"amq\.gen-[A-Za-z0-9_\-]+", "amq.gen-*", text)


def channel_class(code: int, text: str) -> str:
    """403 with the resource it names (4.x adds the permission word; the user name and a
    backend error suffix are dropped), any other code as is."""
    if code != 403:
        return str(code)
    expl = text.split(" - ", 1)[-1]
    expl = _PERM_WORD.sub("", expl)
    if m := _TOPIC.search(expl):
        return normalize(f"403 topic '{m.group(1)}' in '{m.group(2)}'")
    if m := _RESOURCE.search(expl):
        return normalize(f"403 {m.group(1)} '{m.group(2)}'")
    return normalize(f"403 {expl}")


def exc_class(e: BaseException) -> tuple[str, bool]:
    """(class, connection still usable)."""
    if isinstance(e, pika.exceptions.ChannelClosedByBroker):
        return channel_class(e.reply_code, e.reply_text), True
    if isinstance(e, pika.exceptions.ConnectionClosedByBroker):
        return f"conn {e.reply_code}", False
    if isinstance(e, pika.exceptions.ProbableAuthenticationError):
        return "login refused", False
    if isinstance(e, pika.exceptions.ProbableAccessDeniedError):
        return "530 vhost", False
    if isinstance(e, TimeoutError):
        return "timeout", False
    return f"error {type(e).__name__}", False


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """pika's blocking calls have no timeout of their own: SIGALRM bounds a case."""
    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass
class Case:
    id: str
    token: Callable[[], str]
    ops: list[Op]
    profile: str = "base"
    username: str = ""
    vhost: str = "/"
    note: str = ""
    # The client's address: the gateway reads it from a PROXY header, the reference node
    # from the listener the client reached (its loopback address or REF_REMOTE).
    source: str = "127.0.0.1"


# oauth_matrix.py's four operations
OM_OPS = [
    op("qdeclare", Q39),
    op("publish", "", Q39),
    op("get", Q39),
    op("publish", "amq.topic", "a.b"),
]


def om(id_: str, token, username: str = "") -> Case:
    return Case(id_, token, OM_OPS, username=username)


def oauth_matrix_cases() -> list[Case]:
    """The 39 cases of the reference broker's oauth_matrix.py (base profile)."""
    return [
        om("om01-full-scope", lambda: mint()),
        om("om02-full-scope-username-anything", lambda: mint(), "anything"),
        om("om03-expired", lambda: mint(exp_in=-60)),
        om("om04-read-only", lambda: mint("rabbitmq.read:*/*")),
        om("om05-write-only", lambda: mint("rabbitmq.write:*/*")),
        om("om06-configure-only", lambda: mint("rabbitmq.configure:*/*")),
        om("om07-other-vhost-only", lambda: mint("rabbitmq.read:other/*")),
        om("om08-vhost-%2F-explicit", lambda: mint("rabbitmq.read:%2F/* rabbitmq.configure:%2F/ref-*")),
        om("om09-unprefixed-scopes", lambda: mint("read:*/* write:*/* configure:*/*")),
        om("om10-empty-scope", lambda: mint("")),
        om("om11-scope-json-list", lambda: mint(FULL.split())),
        om("om12-no-scope-claim", lambda: mint(None)),
        om("om13-aud-other", lambda: mint(aud="other")),
        om("om14-aud-list", lambda: mint(aud=["other", "rabbitmq"])),
        om("om15-aud-space-separated", lambda: mint(aud="other rabbitmq")),
        om("om16-no-aud", lambda: mint(aud=None)),
        om("om17-no-exp", lambda: mint(exp_in=None)),
        om("om18-nbf-future", lambda: mint(extra={"nbf": int(time.time()) + 3600})),
        om("om19-no-kid-default-key", lambda: mint(kid=None)),
        om("om20-unknown-kid", lambda: mint(kid="nope")),
        om("om21-other-rsa-key", lambda: mint(key=fresh_rsa_key())),
        om("om22-alg-none", unsigned),
        om("om23-hs256-public-pem", hs256_with_public_pem),
        om("om24-garbage", lambda: "not-a-jwt"),
        om("om25-guest-guest", lambda: "guest", "guest"),
        om("om26-no-sub-username-bob", lambda: mint(sub=None), "bob"),
        om("om27-no-sub-empty-username", lambda: mint(sub=None)),
        om("om28-3-part-scopes", lambda: mint("rabbitmq.read:*/* rabbitmq.write:*/*/* rabbitmq.configure:*/*")),
        om("om29-topic-rk-restricted", lambda: mint(
            "rabbitmq.read:*/* rabbitmq.write:*/amq.topic/x.* rabbitmq.write:*/* rabbitmq.configure:*/*")),
        om("om30-client-id-and-sub", lambda: mint(extra={"client_id": "svc-a"})),
        om("om31-sts-nested-map-empty-scope", lambda: mint("", extra={STS: {"principal_id": ARN_READER}})),
        om("om32-sts-nested-map-full-scope", lambda: mint(FULL, extra={STS: {"principal_id": ARN_READER}})),
        om("om33-sts-arn-string", lambda: mint("", extra={STS: ARN_READER})),
        om("om34-sts-scope-string", lambda: mint("", extra={STS: "rabbitmq.read:*/*"})),
        om("om35-sts-scope-list", lambda: mint("", extra={STS: ["rabbitmq.read:*/*"]})),
        om("om36-sts-map-rsid-list", lambda: mint("", extra={STS: {"rabbitmq": ["read:*/*"]}})),
        om("om37-sts-map-rsid-string", lambda: mint("", extra={STS: {"rabbitmq": "read:*/* write:*/*"}})),
        om("om38-alias-without-aliases", lambda: mint("reader-alias")),
        om("om39-arn-alias-without-aliases", lambda: mint(ARN_READER)),
    ]


def s(*scopes: str) -> Callable[[], str]:
    """A token (sub `alice`) with these scopes; `{P}` is the run's resource prefix."""
    text = " ".join("rabbitmq." + x.replace("{P}", P) for x in scopes)
    return lambda: mint(text, sub="alice")


def n(name: str) -> str:
    return name.replace("{P}", P)


def method_cases() -> list[Case]:
    """Spec §6, one permission at a time (base profile, user `alice`)."""
    q, xd, xt, xf, xi, xdst, excl = (n(x) for x in (
        "{P}-q", "{P}-xd", "{P}-xt", "{P}-xf", "{P}-xint", "{P}-xdest", "{P}-excl"))
    C = Case
    return [
        # queue.declare
        C("m-qdeclare-configure", s("configure:%2F/{P}-qn1"), [op("qdeclare", n("{P}-qn1"))]),
        C("m-qdeclare-read-only", s("read:%2F/*"), [op("qdeclare", n("{P}-qn2"))]),
        C("m-qdeclare-server-named", s("configure:%2F/amq.gen-*"),
          [op("qdeclare", "", exclusive=True)]),
        C("m-qdeclare-server-named-denied", s("configure:%2F/{P}-*"),
          [op("qdeclare", "", exclusive=True)]),
        C("m-qdeclare-amq-prefix-configure", s("configure:%2F/*"), [op("qdeclare", n("amq.{P}"))]),
        C("m-qdeclare-amq-prefix-no-configure", s("read:%2F/*"), [op("qdeclare", n("amq.{P}"))]),
        C("m-qdeclare-dlx-new", s("configure:%2F/{P}-qdlx1", "read:%2F/{P}-qdlx1", "write:%2F/{P}-xd"),
          [op("qdeclare", n("{P}-qdlx1"), arguments={"x-dead-letter-exchange": xd})]),
        C("m-qdeclare-dlx-new-no-read", s("configure:%2F/{P}-qdlx2", "write:%2F/{P}-xd"),
          [op("qdeclare", n("{P}-qdlx2"), arguments={"x-dead-letter-exchange": xd})]),
        C("m-qdeclare-dlx-new-no-write", s("configure:%2F/{P}-qdlx3", "read:%2F/{P}-qdlx3"),
          [op("qdeclare", n("{P}-qdlx3"), arguments={"x-dead-letter-exchange": xd})]),
        C("m-qdeclare-dlx-existing", s("configure:%2F/{P}-qdlx-old"),
          [op("qdeclare", n("{P}-qdlx-old"), arguments={"x-dead-letter-exchange": xd})]),
        C("m-qdeclare-passive-unrelated", s("read:%2F/unrelated"), [op("qdeclare", q, passive=True)]),
        C("m-qdeclare-passive-read", s("read:%2F/{P}-q"), [op("qdeclare", q, passive=True)]),
        C("m-qdeclare-passive-missing", s("read:%2F/*"), [op("qdeclare", n("{P}-missing"), passive=True)]),
        C("m-qdeclare-exclusive-elsewhere", s("configure:%2F/*", "read:%2F/*"),
          [op("qdeclare", excl, exclusive=True), op("qdeclare", excl, passive=True)]),
        C("m-qdeclare-exclusive-elsewhere-no-perm", s("read:%2F/unrelated"),
          [op("qdeclare", excl, exclusive=True)]),
        C("m-qdeclare-reply-to-no-perm", s("read:%2F/unrelated"),
          [op("qdeclare", "amq.rabbitmq.reply-to", passive=True)]),
        # queue.delete, queue.purge
        C("m-qdelete-configure", s("configure:%2F/{P}-gone"), [op("qdelete", n("{P}-gone"))]),
        C("m-qdelete-read-only", s("read:%2F/*"), [op("qdelete", n("{P}-gone"))]),
        C("m-qdelete-exclusive-elsewhere", s("configure:%2F/*"), [op("qdelete", excl)]),
        C("m-qpurge-read", s("read:%2F/{P}-q"), [op("qpurge", q)]),
        C("m-qpurge-write-only", s("write:%2F/*"), [op("qpurge", q)]),
        C("m-qpurge-exclusive-elsewhere", s("read:%2F/*"), [op("qpurge", excl)]),
        # queue.bind / unbind
        C("m-qbind-direct", s("write:%2F/{P}-q", "read:%2F/{P}-xd"),
          [op("qbind", q, xd, "rk"), op("qunbind", q, xd, "rk")]),
        C("m-qbind-no-write-on-queue", s("read:%2F/*"), [op("qbind", q, xd, "rk"), op("qunbind", q, xd, "rk")]),
        C("m-qbind-no-read-on-exchange", s("write:%2F/*"), [op("qbind", q, xd, "rk"), op("qunbind", q, xd, "rk")]),
        C("m-qbind-topic-2-part", s("write:%2F/{P}-q", "read:%2F/{P}-xt"), [op("qbind", q, xt, "a.b")]),
        C("m-qbind-topic-3-part", s("write:%2F/{P}-q", "read:%2F/{P}-xt/a.*"),
          [op("qbind", q, xt, "a.b"), op("qbind", q, xt, "b.c"), op("qunbind", q, xt, "a.b")]),
        C("m-qbind-default-exchange", s("write:%2F/*", "read:%2F/*"), [op("qbind", q, "", "rk")]),
        C("m-qbind-missing-exchange", s("write:%2F/*", "read:%2F/*/*"), [op("qbind", q, n("{P}-nox"), "rk")]),
        C("m-qbind-exclusive-elsewhere", s("write:%2F/*", "read:%2F/*"), [op("qbind", excl, xd, "rk")]),
        # exchange.declare / delete
        C("m-xdeclare-configure", s("configure:%2F/{P}-xn1"), [op("xdeclare", n("{P}-xn1"))]),
        C("m-xdeclare-read-only", s("read:%2F/*"), [op("xdeclare", n("{P}-xn2"))]),
        C("m-xdeclare-default", s("configure:%2F/*"), [op("xdeclare", "")]),
        C("m-xdeclare-amq-prefix-configure", s("configure:%2F/*"), [op("xdeclare", n("amq.{P}"))]),
        C("m-xdeclare-amq-prefix-no-configure", s("read:%2F/*"), [op("xdeclare", n("amq.{P}"))]),
        C("m-xdeclare-existing-amq-topic", s("configure:%2F/amq.topic"), [op("xdeclare", "amq.topic", type="topic", durable=True)]),
        C("m-xdeclare-ae-new", s("configure:%2F/{P}-xae1", "read:%2F/{P}-xae1", "write:%2F/{P}-xd"),
          [op("xdeclare", n("{P}-xae1"), arguments={"alternate-exchange": xd})]),
        C("m-xdeclare-ae-new-no-read", s("configure:%2F/{P}-xae2", "write:%2F/{P}-xd"),
          [op("xdeclare", n("{P}-xae2"), arguments={"alternate-exchange": xd})]),
        C("m-xdeclare-ae-new-no-write", s("configure:%2F/{P}-xae3", "read:%2F/{P}-xae3"),
          [op("xdeclare", n("{P}-xae3"), arguments={"alternate-exchange": xd})]),
        C("m-xdeclare-ae-existing", s("configure:%2F/{P}-xae-old"),
          [op("xdeclare", n("{P}-xae-old"), arguments={"alternate-exchange": xd})]),
        C("m-xdeclare-passive-unrelated", s("read:%2F/unrelated"), [op("xdeclare", xd, passive=True)]),
        C("m-xdeclare-passive-write", s("write:%2F/{P}-xd"), [op("xdeclare", xd, passive=True)]),
        C("m-xdelete-configure", s("configure:%2F/{P}-xgone"), [op("xdelete", n("{P}-xgone"))]),
        C("m-xdelete-read-only", s("read:%2F/*"), [op("xdelete", n("{P}-xgone"))]),
        C("m-xdelete-amq-direct", s("configure:%2F/*"), [op("xdelete", "amq.direct")]),
        C("m-xdelete-default", s("configure:%2F/*"), [op("xdelete", "")]),
        # exchange.bind / unbind
        C("m-xbind-direct", s("write:%2F/{P}-xdest", "read:%2F/{P}-xd"),
          [op("xbind", xdst, xd, "rk"), op("xunbind", xdst, xd, "rk")]),
        C("m-xbind-no-write-on-destination", s("read:%2F/*"), [op("xbind", xdst, xd, "rk")]),
        C("m-xbind-no-read-on-source", s("write:%2F/*"), [op("xbind", xdst, xd, "rk")]),
        C("m-xbind-topic-2-part", s("write:%2F/{P}-xdest", "read:%2F/{P}-xt"), [op("xbind", xdst, xt, "a.b")]),
        C("m-xbind-topic-3-part", s("write:%2F/{P}-xdest", "read:%2F/{P}-xt/a.*"),
          [op("xbind", xdst, xt, "a.b"), op("xbind", xdst, xt, "b.c"), op("xunbind", xdst, xt, "a.b")]),
        C("m-xbind-default-source", s("write:%2F/*", "read:%2F/*"), [op("xbind", xdst, "", "rk")]),
        # basic.publish
        C("m-publish-default-exchange", s("write:%2F/amq.default"), [op("publish", "", q)]),
        C("m-publish-default-exchange-queue-scope", s("write:%2F/{P}-q"), [op("publish", "", q)]),
        C("m-publish-direct", s("write:%2F/{P}-xd"), [op("publish", xd, "rk")]),
        C("m-publish-direct-read-only", s("read:%2F/*"), [op("publish", xd, "rk")]),
        C("m-publish-direct-3-part-rk-ignored", s("write:%2F/{P}-xd/zzz"), [op("publish", xd, "rk")]),
        C("m-publish-fanout-2-part", s("write:%2F/{P}-xf"), [op("publish", xf, "a.b")]),
        C("m-publish-topic-2-part", s("write:%2F/{P}-xt"), [op("publish", xt, "a.b")]),
        C("m-publish-topic-3-part", s("write:%2F/{P}-xt/a.*"),
          [op("publish", xt, "a.b"), op("publish", xt, "b.c")]),
        C("m-publish-amq-topic-3-part", s("write:%2F/amq.topic/a.*"), [op("publish", "amq.topic", "a.b")]),
        C("m-publish-internal", s("write:%2F/*"), [op("publish", xi, "rk")]),
        C("m-publish-internal-no-write", s("read:%2F/*"), [op("publish", xi, "rk")]),
        C("m-publish-missing-exchange-2-part", s("write:%2F/*"), [op("publish", n("{P}-nox"), "rk")]),
        C("m-publish-missing-exchange-3-part", s("write:%2F/*/*"), [op("publish", n("{P}-nox"), "rk")]),
        C("m-publish-user-id-self", s("write:%2F/amq.default"), [op("publish", "", q, user_id="alice")]),
        C("m-publish-user-id-other", s("write:%2F/amq.default"), [op("publish", "", q, user_id="bob")]),
        C("m-publish-user-id-impersonator", s("write:%2F/amq.default", "tag:impersonator"),
          [op("publish", "", q, user_id="bob")]),
        C("m-publish-user-id-client-id-order",
          lambda: mint("rabbitmq.write:%2F/amq.default", sub="alice", extra={"client_id": "svc-a"}),
          [op("publish", "", q, user_id="alice"), op("publish", "", q, user_id="svc-a")]),
        C("m-publish-topic-cc", s("write:%2F/{P}-xt/a.*"),
          [op("publish", xt, "a.b", headers={"CC": ["b.c"]})]),
        C("m-publish-topic-bcc", s("write:%2F/{P}-xt/a.*"),
          [op("publish", xt, "a.b", headers={"BCC": ["b.c"]})]),
        C("m-publish-topic-cc-allowed", s("write:%2F/{P}-xt/a.*"),
          [op("publish", xt, "a.b", headers={"CC": ["a.c"]})]),
        C("m-publish-reply-to-without-consumer", s("write:%2F/amq.default"),
          [op("publish", "", q, reply_to="amq.rabbitmq.reply-to")]),
        C("m-direct-reply-to-rpc", s("write:%2F/amq.default"), [op("rpc", "", q)]),
        # basic.consume, basic.get
        C("m-consume-read", s("read:%2F/{P}-q"), [op("consume", q)]),
        C("m-consume-write-only", s("write:%2F/*"), [op("consume", q)]),
        C("m-consume-exclusive-elsewhere", s("read:%2F/*"), [op("consume", excl)]),
        C("m-consume-reply-to-no-perm", s("read:%2F/unrelated"),
          [op("consume", "amq.rabbitmq.reply-to", no_ack=True)]),
        C("m-consume-reply-to-with-ack", s("read:%2F/*"),
          [op("consume", "amq.rabbitmq.reply-to", no_ack=False)]),
        C("m-get-read", s("read:%2F/{P}-q"), [op("get", q)]),
        C("m-get-configure-only", s("configure:%2F/*"), [op("get", q)]),
        C("m-get-exclusive-elsewhere", s("read:%2F/*"), [op("get", excl)]),
        # scope patterns: URL-decoding of each part
        C("m-scope-plus-is-space", s("configure:%2F/{P}+sp"),
          [op("qdeclare", n("{P} sp"), exclusive=True), op("qdeclare", n("{P}+sp"), exclusive=True)]),
        C("m-scope-encoded-slash", s("configure:%2F/{P}%2Fsl"),
          [op("qdeclare", n("{P}/sl"), exclusive=True)]),
        # vhost access
        C("m-vhost-tag-only", s("tag:administrator"), []),
        C("m-vhost-3-part-scope", s("write:%2F/x/y"), []),
        C("m-vhost-missing", s("read:*/*"), [], vhost=n("{P}-vhost")),
        C("m-vhost-wildcard-prefix", s("read:%2F*/*"), []),
        # token shape and update-secret
        C("t-rs384-same-key", lambda: mint(alg="RS384"), []),
        C("t-iat-future", lambda: mint(extra={"iat": int(time.time()) + 3600}), []),
        C("t-exp-now", lambda: mint(exp_in=0), []),
        C("t-exp-float-past", lambda: mint(exp_in=None, extra={"exp": time.time() - 60.5}), []),
        C("t-exp-float-future", lambda: mint(exp_in=None, extra={"exp": time.time() + 300.5}), []),
        C("t-exp-string", lambda: mint(exp_in=None, extra={"exp": str(int(time.time()) + 300)}), []),
        C("t-large-token", lambda: mint(extra={"pad": "x" * 5000}), [op("qdeclare", Q39)]),
        C("t-2049-scopes", lambda: mint(many_scopes(2049)), []),
        C("u-same-user", lambda: mint(sub="alice"),
          [op("update_secret", lambda: mint("rabbitmq.read:*/*", sub="alice"), what="same user, read only"),
           op("qdeclare", Q39), op("get", Q39)]),
        C("u-other-user", lambda: mint(sub="alice"),
          [op("update_secret", lambda: mint(sub="mallory"), what="other user"), op("get", Q39)]),
        C("u-garbage", lambda: mint(sub="alice"), [op("update_secret", lambda: "not-a-jwt", what="garbage")]),
        C("u-expired", lambda: mint(sub="alice"),
          [op("update_secret", lambda: mint(sub="alice", exp_in=-60), what="expired"), op("get", Q39)]),
        C("u-2049-scopes", lambda: mint(sub="alice"),
          [op("update_secret", lambda: mint(many_scopes(2049), sub="alice"), what="2049 scopes"), op("get", Q39)]),
    ]


def profile_cases() -> list[Case]:
    A = OM_OPS
    return [
        # aliases: aliases in the scope claim, no additional_scopes_key
        Case("a-reader-alias", lambda: mint("reader-alias"), A, profile="aliases"),
        Case("a-arn-alias", lambda: mint(ARN_READER), A, profile="aliases"),
        Case("a-admin-alias", lambda: mint(ARN_ADMIN), A, profile="aliases"),
        Case("a-alias-and-scope", lambda: mint("reader-alias rabbitmq.configure:*/*"), A, profile="aliases"),
        Case("a-unknown-alias", lambda: mint("nope"), A, profile="aliases"),
        Case("a-no-scope-claim", lambda: mint(None), A, profile="aliases"),
        Case("a-full-scope", lambda: mint(), A, profile="aliases"),
        Case("a-sts-arn-ignored", lambda: mint("", extra={STS: ARN_READER}), A, profile="aliases"),
        # aliases-extra: aliases and additional_scopes_key together
        Case("ae-full-scope-no-sts", lambda: mint(), A, profile="aliases-extra"),
        Case("ae-sts-arn", lambda: mint("", extra={STS: ARN_READER}), A, profile="aliases-extra"),
        Case("ae-sts-arn-and-scope", lambda: mint("rabbitmq.configure:*/*", extra={STS: ARN_READER}), A,
             profile="aliases-extra"),
        Case("ae-sts-nested-map", lambda: mint("", extra={STS: {"principal_id": ARN_READER}}), A,
             profile="aliases-extra"),
        # pinned: the gateway requires iss == its configured issuer
        Case("p-iss-match", lambda: mint(iss=ISSUER), [op("get", Q39)], profile="pinned"),
        Case("p-iss-other", lambda: mint(iss="https://evil.test"), [op("get", Q39)], profile="pinned"),
        Case("p-no-iss", lambda: mint(iss=None), [op("get", Q39)], profile="pinned"),
    ]


# Internal users (`[auth] backends = ["oauth2", "internal"]` on the gateway, the same chain
# on the reference node), created on both nodes for the run.
I_FULL, I_WRONG, I_LIMITED = f"{P}-ifull", f"{P}-iwrong", f"{P}-ilim"
I_TWIN, I_EXPIRED, I_GARBAGE = f"{P}-itwin", f"{P}-iexpired", f"{P}-igarbage"
I_PASSWORD = uuid.uuid4().hex
I_VHOST = f"{P}-ivh"
# Passwords that fail as tokens: an expired token with a valid signature, and a JWT-shaped
# string with an `alg: none` header and no signature.
I_EXPIRED_TOKEN = ""  # minted when the users are made (mint needs the key loaded)
I_GARBAGE_JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.not-a-signature"
I_LIM_Q = f"{P}-ilim-q"
REMOTE_SOURCE = "203.0.113.9"


def internal_cases() -> list[Case]:
    A = [op("qdeclare", Q39), op("publish", "", Q39), op("get", Q39)]
    pw = lambda: I_PASSWORD  # noqa: E731
    return [
        Case("i-internal-user", pw, A, profile="internal", username=I_FULL),
        Case("i-wrong-password", lambda: "wrong", A, profile="internal", username=I_WRONG),
        Case("i-unknown-user", pw, A, profile="internal", username=f"{P}-nobody"),
        Case("i-guest-loopback", lambda: "guest", [op("get", Q39)], profile="internal",
             username="guest"),
        Case("i-guest-remote", lambda: "guest", [op("get", Q39)], profile="internal",
             username="guest", source=REMOTE_SOURCE),
        Case("i-limited-user", pw,
             [op("qdeclare", Q39), op("qdeclare", I_LIM_Q), op("get", Q39),
              op("publish", "amq.topic", "a.b"), op("get", I_LIM_Q)],
             profile="internal", username=I_LIMITED),
        Case("i-no-vhost-access", pw, A, profile="internal", username=I_LIMITED, vhost=I_VHOST),
        Case("i-expired-token-falls-through", lambda: I_EXPIRED_TOKEN, A, profile="internal",
             username=I_EXPIRED),
        Case("i-garbage-jwt-falls-through", lambda: I_GARBAGE_JWT, A, profile="internal",
             username=I_GARBAGE),
        # The internal user I_TWIN has no permissions: only the token's user can do this.
        Case("i-token-wins-over-same-name", lambda: mint(sub=I_TWIN), A, profile="internal",
             username=I_TWIN),
        Case("i-same-name-own-password", pw, A, profile="internal", username=I_TWIN),
    ]


CASES = oauth_matrix_cases() + method_cases() + profile_cases() + internal_cases()
PROFILE_ORDER = ["base", "pinned", "aliases", "aliases-extra", "internal"]
CASES.sort(key=lambda c: PROFILE_ORDER.index(c.profile))  # stable: keeps the order within


# --------------------------------------------------------------------------------------
# the documented differences


@dataclasses.dataclass(frozen=True)
class Difference:
    case: str
    operation: str
    reference: str
    gateway: str
    kind: str
    reason: str


def load_differences() -> dict[tuple[str, str], Difference]:
    """The rows of the table in tests/conformance/differences.md whose first cell is a case
    id (backticked)."""
    out = {}
    for line in DIFFERENCES.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 6, f"differences.md: 6 cells expected: {line}"
        case, operation, ref, gw, kind, reason = (c.strip("`") if i < 5 else c
                                                 for i, c in enumerate(cells))
        key = (case, operation)
        assert key not in out, f"differences.md: duplicate row {key}"
        out[key] = Difference(case, operation, ref, gw, kind, reason)
    return out


# --------------------------------------------------------------------------------------
# the two sides


def ref_params(username: str, token: str, vhost: str = "/",
               source: str = "127.0.0.1") -> pika.ConnectionParameters:
    host = "127.0.0.1"
    if source != "127.0.0.1":
        # RabbitMQ's loopback check reads the address of the listener the client reached.
        assert REF_REMOTE != "none", (
            "the reference node has no non-loopback listener (no global IPv4 address found; "
            "set REFERENCE_NODE_REMOTE_ADDRESS)")
        host = REF_REMOTE
    return pika.ConnectionParameters(
        host=host, port=REF_PORT, virtual_host=vhost,
        credentials=pika.PlainCredentials(username, token),
        connection_attempts=1, retry_delay=0, socket_timeout=5, stack_timeout=10,
        blocked_connection_timeout=10)


def gateway_config(dir_: Path, port: int, profile: str) -> Path:
    aliases = profile in ("aliases", "aliases-extra")
    extra_key = profile in ("base", "pinned", "aliases-extra")
    lines = [
        "[listener]",
        f'address = "127.0.0.1:{port}"',
        'tls_cert = "server.pem"',
        'tls_key = "server-key.pem"',
        "auth_failure_delay_ms = 100",
        "",
        "[backend]",
        f"nodes = [{_toml_str(conftest.BACKEND_NODE)}]",
        f"username = {_toml_str(SERVICE_USER)}",
        f"password = {_toml_str(SERVICE_PASSWORD)}",
        f"management_url = {_toml_str(MANAGEMENT_URL)}",
        # Under the session fuzzer's 3-s wait: a close RabbitMQ never answers (its channel
        # crashed) ends the connection with 541 in time to be compared (rule R-BROKER-541).
        "close_timeout_ms = 1500",
        "",
        "[oauth2]",
        'resource_server_id = "rabbitmq"',
        'algorithms = ["RS256"]',
        f'default_key = "{KID}"',
    ]
    if extra_key:
        # RabbitMQ 3.10.8 reads the literal top-level claim; 4.1+ reads a path, and `\.`
        # (a gateway addition) addresses the same top-level claim despite its dots.
        lines.append(r"additional_scopes_key = 'https://sts\.amazonaws\.com/'")
    if profile == "pinned":
        lines.append(f"issuer = {_toml_str(ISSUER)}")
    if profile == "internal":
        # Behind a load balancer in miniature: the PROXY header carries the case's source.
        lines.insert(lines.index("auth_failure_delay_ms = 100") + 1, "proxy_protocol = true")
    lines += ["", "[oauth2.signing_keys]", f"{KID} = {_toml_str(str(FIXTURES / 'rsa-public.pem'))}"]
    if aliases:
        lines += ["", "[oauth2.scope_aliases]"]
        lines += [f"{_toml_str(k)} = {json.dumps(v)}" for k, v in ALIASES.items()]
    # The reference node's chain: tokens first, then the internal users.
    lines += ["", "[auth]", 'backends = ["oauth2", "internal"]']
    lines += ["", "[admin]", f'address = "127.0.0.1:{_free_port()}"',
              "", "[log]", 'level = "info,amqp_iam_gateway=debug"', ""]
    path = dir_ / "gateway.toml"
    path.write_text("\n".join(lines))
    return path


# The gateways' backend service user, as the README prescribes it: full permissions on `/`
# and the `impersonator` tag, so that `user_id` values the gateway has validated pass the
# broker's own check, plus `management` for the exchange-type lookups (management_url);
# the shared test setup's `guest` lacks `impersonator`. Created through the
# management API for the run and deleted after it.
SERVICE_USER = f"conformance-gw-{RUN}"
SERVICE_PASSWORD = uuid.uuid4().hex
MANAGEMENT_URL = "http://127.0.0.1:15672"


def management(method: str, path: str, body: dict | None = None) -> None:
    conftest.management_api(method, path, body, base=MANAGEMENT_URL)


def reference_env() -> dict[str, str]:
    r = subprocess.run([str(REF_SCRIPT), "env"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "REFERENCE_NODE_PORT": str(REF_PORT)})
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


REF_REMOTE = reference_env().get("REMOTE", "none")


@contextlib.contextmanager
def internal_users():
    """The internal users of the `internal` cases, on the reference node and on the
    gateway's backend (the default node), and a vhost I_LIMITED has no access to."""
    global I_EXPIRED_TOKEN
    I_EXPIRED_TOKEN = mint(sub=I_EXPIRED, exp_in=-600)
    allow = (".*", ".*", ".*")
    users = [(I_FULL, I_PASSWORD, allow), (I_WRONG, I_PASSWORD, allow),
             (I_LIMITED, I_PASSWORD, (f"^{P}-ilim.*",) * 3), (I_TWIN, I_PASSWORD, None),
             (I_EXPIRED, I_EXPIRED_TOKEN, allow), (I_GARBAGE, I_GARBAGE_JWT, allow)]
    q = urllib.parse.quote
    try:
        management("PUT", f"/api/vhosts/{q(I_VHOST, safe='')}")
        reference_ctl("add_vhost", I_VHOST)
        for name, password, perms in users:
            management("PUT", f"/api/users/{q(name, safe='')}", {"password": password, "tags": ""})
            reference_ctl("add_user", name, password)
            if perms:
                c, w, r = perms
                management("PUT", f"/api/permissions/%2F/{q(name, safe='')}",
                           {"configure": c, "write": w, "read": r})
                reference_ctl("set_permissions", "-p", "/", name, c, w, r)
        yield
    finally:
        for name, _, _ in users:
            with contextlib.suppress(Exception):
                management("DELETE", f"/api/users/{q(name, safe='')}")
        with contextlib.suppress(Exception):
            management("DELETE", f"/api/vhosts/{q(I_VHOST, safe='')}")


@contextlib.contextmanager
def service_user():
    management("PUT", f"/api/users/{SERVICE_USER}",
               {"password": SERVICE_PASSWORD, "tags": "impersonator,management"})
    try:
        management("PUT", f"/api/permissions/%2F/{SERVICE_USER}",
                   {"configure": ".*", "write": ".*", "read": ".*"})
        yield
    finally:
        with contextlib.suppress(Exception):
            management("DELETE", f"/api/users/{SERVICE_USER}")


def reference_ctl(*args: str) -> str:
    r = subprocess.run([str(REF_SCRIPT), "ctl", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"reference-node.sh ctl {args}: {r.stdout}{r.stderr}"
    return r.stdout


def erl_bin(s: str) -> str:
    return '<<"' + s.replace("\\", "\\\\").replace('"', '\\"') + '">>'


def set_reference_profile(profile: str) -> None:
    app = "rabbitmq_auth_backend_oauth2"
    aliases = "#{" + ", ".join(
        f"{erl_bin(k)} => [{', '.join(erl_bin(x) for x in v)}]" for k, v in ALIASES.items()) + "}"
    extra = f"application:set_env({app}, extra_scopes_source, {erl_bin(STS)})"
    no_extra = f"application:unset_env({app}, extra_scopes_source)"
    set_aliases = f"application:set_env({app}, scope_aliases, {aliases})"
    no_aliases = f"application:unset_env({app}, scope_aliases)"
    exprs = {
        "base": [extra, no_aliases],
        "internal": [extra, no_aliases],
        "pinned": [extra, no_aliases],
        "aliases": [no_extra, set_aliases],
        "aliases-extra": [extra, set_aliases],
    }[profile]
    out = reference_ctl("eval", ", ".join(exprs) + ", ok.")
    assert out.strip() == "ok", out


# --------------------------------------------------------------------------------------
# running


@dataclasses.dataclass
class Outcome:
    connect: str
    ops: list[str]  # one per op run; "not run" after the connection was lost


def run_case(connect: Callable[[], pika.BlockingConnection], case: Case) -> Outcome:
    conn = None
    try:
        with deadline(CASE_TIMEOUT_S):
            try:
                conn = connect()
            except Exception as e:  # noqa: BLE001 - every failure is a decision class
                return Outcome(exc_class(e)[0], [])
            results: list[str] = []
            alive = True
            for o in case.ops:
                if not alive or not conn.is_open:
                    results.append("not run")
                    continue
                try:
                    _run_op(conn, o)
                    results.append("OK")
                except Exception as e:  # noqa: BLE001
                    cls, alive = exc_class(e)
                    results.append(cls)
            return Outcome("OK", results)
    except TimeoutError:
        return Outcome("timeout", [])
    finally:
        if conn is not None:
            with contextlib.suppress(Exception), deadline(5):
                if conn.is_open:
                    conn.close()


def compare(case: Case, ref: Outcome, gw: Outcome):
    """[(operation, reference, gateway)] for each operation whose classes differ. When the
    connect outcomes differ only that is compared; after a connection is lost nothing more."""
    if ref.connect != gw.connect:
        return [("connect", ref.connect, gw.connect)]
    out = []
    for o, r, g in zip(case.ops, ref.ops, gw.ops):
        if r != g:
            out.append((o.label.replace(RUN, "RUN"), r, g))
        if r.startswith(("conn", "not run")) or g.startswith(("conn", "not run")):
            break
    return out


@dataclasses.dataclass
class Row:
    case: Case
    ref: Outcome
    gw: Outcome
    diffs: list  # [(operation, ref, gw)]
    verdict: str  # agree | documented | UNEXPLAINED | known bug
    problems: list[str]


@pytest.fixture(scope="module")
def conformance(tmp_path_factory):
    """Runs every case on both sides once; the tests below judge the rows."""
    # The reference node.
    env = {**os.environ, "REFERENCE_NODE_PORT": str(REF_PORT), "REFERENCE_NODE_PROFILE": "base"}
    t0 = time.monotonic()
    r = subprocess.run([str(REF_SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=150)
    if r.returncode != 0:
        pytest.fail(f"scripts/reference-node.sh start failed:\n{r.stdout}{r.stderr}", pytrace=False)
    t_node = time.monotonic() - t0
    stack = contextlib.ExitStack()
    if os.environ.get("CONFORMANCE_KEEP_REFERENCE") != "1":
        stack.callback(lambda: subprocess.run([str(REF_SCRIPT), "stop"], env=env, timeout=150,
                                              capture_output=True))
    with stack:
        stack.enter_context(service_user())
        stack.enter_context(internal_users())
        # One gateway per profile.
        gateways = {}
        for profile in PROFILE_ORDER:
            workdir = tmp_path_factory.mktemp(f"conformance-gw-{profile}")
            ca = _write_tls(workdir)
            port = _free_port()
            gateways[profile] = stack.enter_context(
                run_gateway(workdir, gateway_config(workdir, port, profile), port, ca))

        set_reference_profile("base")
        holders = setup_resources()
        stack.callback(cleanup_resources, holders)

        diffs_doc = load_differences()
        rows: list[Row] = []
        current = None
        for case in CASES:
            if case.profile != current:
                set_reference_profile(case.profile)
                current = case.profile
            token = case.token()
            gw = gateways[case.profile]
            gw_port = gw.port
            if case.profile == "internal":
                gw_port = stack.enter_context(conftest.proxy_shim(gw.port, case.source))
            ref_out = run_case(lambda: pika.BlockingConnection(
                ref_params(case.username, token, case.vhost, case.source)), case)
            gw_out = run_case(lambda: pika.BlockingConnection(
                _gw_params(gw, case.username, token, case.vhost, gw_port)), case)
            rows.append(judge(case, ref_out, gw_out, diffs_doc))
        set_reference_profile("base")
        broker_only = broker_only_pass(stack, tmp_path_factory, holders[0])

        # Documented rows that no case produced.
        seen = {(row.case.id, d[0]) for row in rows for d in row.diffs}
        ids = {c.id for c in CASES}
        stale = [k for k in diffs_doc if k not in seen]
        report = render_report(rows, stale, diffs_doc, time.monotonic() - t0, t_node)
        (REPO_ROOT / "target").mkdir(exist_ok=True)
        (REPO_ROOT / "target" / "conformance-report.txt").write_text(report)
        conftest.TERMINAL_REPORTS.append(("differential conformance (reference node vs gateway)", report))
        yield {"rows": {row.case.id: row for row in rows}, "stale": stale, "ids": ids,
               "report": report, "broker_only": broker_only}


def _gw_params(gw, username: str, token: str, vhost: str, port: int) -> pika.ConnectionParameters:
    p = gw.params(token, vhost)
    p.port = port
    p.credentials = pika.PlainCredentials(username, token)
    p.socket_timeout = 5
    p.stack_timeout = 10
    return p


def judge(case: Case, ref: Outcome, gw: Outcome, doc: dict) -> Row:
    diffs = compare(case, ref, gw)
    problems = []
    kinds = set()
    for operation, r, g in diffs:
        d = doc.get((case.id, operation))
        if d is None:
            problems.append(f"unexplained: {operation}: reference {r!r}, gateway {g!r}")
        elif (d.reference, d.gateway) != (r, g):
            problems.append(
                f"{operation}: documented reference {d.reference!r} / gateway {d.gateway!r}, "
                f"observed reference {r!r} / gateway {g!r}")
        else:
            kinds.add(d.kind)
    if problems:
        verdict = "UNEXPLAINED"
    elif not diffs:
        verdict = "agree"
    elif "gateway-bug" in kinds:
        verdict = "KNOWN GATEWAY BUG"
    else:
        verdict = "documented (" + ", ".join(sorted(kinds)) + ")"
    return Row(case, ref, gw, diffs, verdict, problems)


def _summary(o: Outcome, case: Case) -> str:
    if o.connect != "OK":
        return o.connect
    return " ; ".join(["OK", *o.ops]) if o.ops else "OK"


def render_report(rows, stale, doc, elapsed, t_node) -> str:
    w_case = max(len(r.case.id) for r in rows)
    lines = [f"{'case':<{w_case}}  {'reference (connect ; ops...)':<60}  {'gateway':<60}  verdict"]
    for r in rows:
        ref, gw = _summary(r.ref, r.case), _summary(r.gw, r.case)
        lines.append(f"{r.case.id:<{w_case}}  {ref:<60}  {gw:<60}  {r.verdict}")
        for p in r.problems:
            lines.append(f"{'':<{w_case}}    !! {p}")
    counts: dict[str, int] = {}
    for r in rows:
        key = r.verdict.split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append("")
    lines.append(f"{len(rows)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                 + f"; {elapsed:.1f} s (reference node start {t_node:.1f} s)")
    for k in stale:
        lines.append(f"!! documented difference not observed (update tests/conformance/differences.md): {k}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# resources (the same on both sides)


def backend_params() -> pika.ConnectionParameters:
    """The gateway's backend (the default node), directly, as the gateway's service user."""
    host, port = conftest.BACKEND_NODE.rsplit(":", 1)
    return pika.ConnectionParameters(host, int(port), credentials=pika.PlainCredentials("guest", "guest"),
                                     connection_attempts=1, socket_timeout=5)


def setup_resources():
    """Queues and exchanges the cases use, and a connection per side that owns the
    exclusive queue. Returns the connections to close at the end."""
    ref_admin = pika.BlockingConnection(ref_params("", mint(ADMIN_SCOPES, exp_in=3600, sub="admin")))
    gw_admin = pika.BlockingConnection(backend_params())
    for conn in (ref_admin, gw_admin):
        declare_resources(conn.channel())
        conn.channel().queue_declare(n("{P}-excl"), exclusive=True)
    return [ref_admin, gw_admin]


def declare_resources(ch) -> None:
    for name in (Q39, n("{P}-q")):
        ch.queue_declare(name)
        ch.queue_purge(name)
    for name, type_, internal in (("{P}-xd", "direct", False), ("{P}-xt", "topic", False),
                                  ("{P}-xf", "fanout", False), ("{P}-xint", "direct", True),
                                  ("{P}-xdest", "direct", False)):
        ch.exchange_declare(n(name), type_, internal=internal)
    ch.queue_declare(n("{P}-qdlx-old"), arguments={"x-dead-letter-exchange": n("{P}-xd")})
    ch.exchange_declare(n("{P}-xae-old"), "direct", arguments={"alternate-exchange": n("{P}-xd")})


def case_resources() -> set[str]:
    """Every queue and exchange name the cases use or create (but the exclusive queue)."""
    names = {Q39}
    for case in CASES:
        for o in case.ops:
            names.update(a for a in o.args if isinstance(a, str) and RUN in a)
    names.update(n(x) for x in ("{P}-q", "{P}-xd", "{P}-xt", "{P}-xf", "{P}-xint", "{P}-xdest",
                                "{P}-qdlx-old", "{P}-xae-old"))
    names.discard(n("{P}-excl"))
    return names


def delete_resources(conn, names) -> None:
    for name in sorted(names):
        for kind in ("queue", "exchange"):
            with contextlib.suppress(Exception):
                ch = conn.channel()
                (ch.queue_delete if kind == "queue" else ch.exchange_delete)(name)
                ch.close()


# --------------------------------------------------------------------------------------
# the second guard alone (backend tokens, the gateway's decisions switched off)

# The token profile's cases, run again through a gateway that exchanges each client token
# for one of its own (`backend.auth = "token"`) and, in this test build only (the
# `test-switches` feature, `[testing] gateway_decisions = false`), makes no per-method
# decision: the reference node, which verifies the gateway's tokens with the same key,
# decides alone. It must decide as it does for the client's own token.
BROKER_ONLY_PROFILE = "base"


def broker_only_config(dir_: Path, port: int, admin_port: int) -> Path:
    key = dir_ / "backend-token.pem"
    key.write_bytes((FIXTURES / "rsa-private.pem").read_bytes())
    key.chmod(0o600)
    text = gateway_config(dir_, port, BROKER_ONLY_PROFILE).read_text()
    text = text.replace(f"nodes = [{_toml_str(conftest.BACKEND_NODE)}]",
                        f'nodes = ["127.0.0.1:{REF_PORT}"]', 1)
    text = text.replace(f"management_url = {_toml_str(MANAGEMENT_URL)}\n", "", 1)
    text = text.replace("[oauth2]\n", 'auth = "token"\n\n[backend.token]\n'
                        f"signing_key = {_toml_str(str(key))}\nkid = \"{KID}\"\n"
                        'resource_server_id = "rabbitmq"\n\n[oauth2]\n', 1)
    text = re.sub(r'(?m)^address = "127\.0\.0\.1:\d+"\n(?=\n\[log\])',
                  f'address = "127.0.0.1:{admin_port}"\n', text)
    text += "\n[testing]\ngateway_decisions = false\n"
    path = dir_ / "gateway.toml"
    path.write_text(text)
    return path


def broker_only_pass(stack, tmp_path_factory, ref_admin) -> dict:
    workdir = tmp_path_factory.mktemp("conformance-gw-broker-only")
    ca = _write_tls(workdir)
    port, admin_port = _free_port(), _free_port()
    gw = stack.enter_context(run_gateway(workdir, broker_only_config(workdir, port, admin_port),
                                         port, ca))
    set_reference_profile(BROKER_ONLY_PROFILE)
    # The reference node as the main pass found it: what its cases created goes, the
    # resources come back; the cases then run in the same order from the same state.
    delete_resources(ref_admin, case_resources())
    declare_resources(ref_admin.channel())
    outcomes = {}
    for case in CASES:
        if case.profile != BROKER_ONLY_PROFILE:
            continue
        token = case.token()
        outcomes[case.id] = run_case(lambda: pika.BlockingConnection(
            _gw_params(gw, case.username, token, case.vhost, gw.port)), case)
    denials = sum(float(line.split()[-1]) for line in conftest.metrics_text(admin_port).splitlines()
                  if line.startswith("amqp_iam_gateway_authorization_denials_total"))
    return {"outcomes": outcomes, "gateway_denials": denials}


def cleanup_resources(holders) -> None:
    for conn in holders:
        with contextlib.suppress(Exception):
            conn.close()
    # The reference node is stopped (and its database dropped at the next start); the
    # default node keeps what the cases created on it.
    try:
        conn = pika.BlockingConnection(backend_params())
    except Exception:  # noqa: BLE001
        return
    with contextlib.closing(conn):
        delete_resources(conn, case_resources())


# --------------------------------------------------------------------------------------
# the tests


def test_case_count():
    """At least the 39 oauth_matrix cases plus the per-method matrix; ids unique."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert sum(c.id.startswith("om") for c in CASES) == 39
    assert len(CASES) >= 39 + 60


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_conformance(conformance, case_id):
    row: Row = conformance["rows"][case_id]
    if row.problems:
        pytest.fail(
            f"{case_id}: the gateway and the reference node disagree in a way "
            "tests/conformance/differences.md does not document:\n  "
            + "\n  ".join(row.problems)
            + f"\nreference: {_summary(row.ref, row.case)}\ngateway:   {_summary(row.gw, row.case)}",
            pytrace=False)
    if row.verdict == "KNOWN GATEWAY BUG":
        notes = [d for d in load_differences().values() if d.case == case_id and d.kind == "gateway-bug"]
        pytest.xfail("known gateway conformance bug: " + "; ".join(d.reason for d in notes))


def test_no_stale_differences(conformance):
    """Every documented difference is still observed (else the list lies)."""
    unknown = [k for k in conformance["stale"] if k[0] not in conformance["ids"]]
    assert not unknown, f"differences.md names unknown cases: {unknown}"
    assert not conformance["stale"], (
        "documented differences no longer observed (update tests/conformance/differences.md): "
        f"{conformance['stale']}")


# Cases whose per-method outcome depends on the user name, which is the gateway's: 3.10.8
# prefers `client_id` to `sub`, the gateway (as 4.x) takes `sub`, and the backend token
# carries the gateway's name, which the broker then checks `user_id` against.
USER_NAME_CASES = {"m-publish-user-id-client-id-order"}


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.profile == BROKER_ONLY_PROFILE])
def test_the_broker_alone_decides_as_for_the_clients_own_token(conformance, case_id):
    """Backend tokens, the gateway's per-method decisions switched off (a test build): every
    operation the reference node refuses for the client's token, it refuses for the
    gateway's token too, and everything it allows still works. The login is the gateway's
    either way, so the connect outcome is the gateway's own."""
    row: Row = conformance["rows"][case_id]
    bo: Outcome = conformance["broker_only"]["outcomes"][case_id]
    assert bo.connect == row.gw.connect, (bo, row.gw)
    if bo.connect != "OK" or row.ref.connect != "OK":
        return
    # The connection's own decisions stay the gateway's: the login, and `update-secret`
    # (verified by the gateway, which refuses another user's or an expired token where
    # 3.10.8 takes it); per-method decisions are the broker's alone.
    expected = []
    for o, r, g in zip(row.case.ops, row.ref.ops, row.gw.ops):
        expected.append(g if o.kind == "update_secret" or case_id in USER_NAME_CASES else r)
        if expected[-1].startswith(("conn", "not run")):
            break
    assert bo.ops[:len(expected)] == expected, (
        f"broker alone: {_summary(bo, row.case)}\nexpected:     {' ; '.join(['OK', *expected])}"
        f"\nreference:    {_summary(row.ref, row.case)}\ngateway:      {_summary(row.gw, row.case)}")


def test_the_refusals_behind_the_gateway_are_rabbitmqs_own(conformance):
    """The pass above refused operations while the gateway refused none: each refusal came
    from RabbitMQ, verifying the gateway's token."""
    bo = conformance["broker_only"]
    assert bo["gateway_denials"] == 0
    refused = [(cid, r) for cid, o in bo["outcomes"].items() for r in o.ops if r.startswith("403")]
    assert len(refused) >= 30, refused
    conftest.TERMINAL_REPORTS.append((
        "backend tokens, RabbitMQ deciding alone",
        f"{len(bo['outcomes'])} cases, {len(refused)} operations refused by RabbitMQ, "
        f"{bo['gateway_denials']:.0f} by the gateway\n"))
