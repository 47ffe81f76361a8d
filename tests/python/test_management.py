"""The management API listener (`[management]`): RabbitMQ's management API through the
gateway, with tokens.

The broker is the reference node (scripts/reference-node.sh: RabbitMQ 3.10.8 with
`rabbitmq_auth_backend_oauth2` then the internal users, its management API on 15691). The
gateway verifies client tokens and forwards each request with a backend token it mints
(signed with tests/fixtures/rsa-private.pem as kid `test-rsa`, which the node trusts). The
same node also validates the client tokens itself, which makes it the reference: every
request of the permission matrix is sent both ways, and the answers must agree.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
import pytest

import conftest
from conftest import (FIXTURES, ISSUER, KID, REF_PORT, REPO_ROOT, _free_port, _write_tls, ref_ctl,
                      run_gateway, sign_rs256, start_reference_node)

REF_MGMT = int(os.environ.get("REFERENCE_NODE_MGMT_PORT", "15691"))
RUN = uuid.uuid4().hex[:6]
PROTECTED = f"mg-protected-{RUN}"
# An internal user the gateway admits only from 10.0.0.0/8 (`[auth.sources]`).
ELSEWHERE = f"mg-elsewhere-{RUN}"


def token(sub: str, scope: str, exp_in: int = 600) -> str:
    """A token both the gateway and the reference node accept: `aud` rabbitmq, scopes with
    the default prefix `rabbitmq.`."""
    now = int(time.time())
    return sign_rs256({"iss": ISSUER, "aud": "rabbitmq", "sub": sub, "iat": now,
                       "exp": now + exp_in, "jti": str(uuid.uuid4()), "scope": scope})


# The permission matrix: who, and the scopes of their token.
MATRIX = {
    "admin": "rabbitmq.tag:administrator rabbitmq.configure:*/* rabbitmq.write:*/* rabbitmq.read:*/*",
    "monitoring": "rabbitmq.tag:monitoring rabbitmq.read:*/*",
    "management-ro": "rabbitmq.tag:management rabbitmq.read:%2F/*",
    "limited": "rabbitmq.tag:management rabbitmq.configure:%2F/mg-* rabbitmq.write:%2F/mg-* "
               "rabbitmq.read:%2F/mg-* rabbitmq.write:%2F/amq.default",
    "no-tag": "rabbitmq.read:*/* rabbitmq.write:*/* rabbitmq.configure:*/*",
}


class Api:
    """HTTP(S) requests to one management API: the gateway's or the reference node's."""

    def __init__(self, host: str, port: int, ca: str | None):
        self.host, self.port = host, port
        self.ctx = ssl.create_default_context(cafile=ca) if ca else None

    def conn(self) -> http.client.HTTPConnection:
        if self.ctx:
            return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=15)
        return http.client.HTTPConnection(self.host, self.port, timeout=15)

    def request(self, method: str, path: str, tok: str | None = None, body=None,
                headers: dict | None = None, basic_user: str = "") -> tuple[int, dict, bytes]:
        h = dict(headers or {})
        if tok is not None:
            h["authorization"] = "Basic " + base64.b64encode(f"{basic_user}:{tok}".encode()).decode()
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h.setdefault("content-type", "application/json")
        c = self.conn()
        try:
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()


@pytest.fixture(scope="module")
def mg(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        start_reference_node(stack)
        ref_ctl("add_user", PROTECTED, "pw-" + RUN)
        ref_ctl("set_user_tags", PROTECTED, "monitoring")
        ref_ctl("add_user", ELSEWHERE, "pw-" + RUN)
        ref_ctl("set_user_tags", ELSEWHERE, "monitoring")
        for user in (PROTECTED, ELSEWHERE):
            stack.callback(lambda u=user: ref_ctl("delete_user", u, check=False))
        workdir = tmp_path_factory.mktemp("management")
        ca = _write_tls(workdir)
        key = workdir / "backend-token.pem"
        shutil.copy(FIXTURES / "rsa-private.pem", key)
        key.chmod(0o600)
        port, admin_port, mport = _free_port(), _free_port(), _free_port()
        config = workdir / "gateway.toml"
        config.write_text(f"""\
[listener]
address = "127.0.0.1:{port}"
tls_cert = "server.pem"
tls_key = "server-key.pem"

[backend]
nodes = ["127.0.0.1:{REF_PORT}"]
username = "unused"
password = "unused"
management_url = "http://127.0.0.1:{REF_MGMT}"
auth = "token"

[backend.token]
signing_key = "{key}"
kid = "{KID}"
resource_server_id = "rabbitmq"

[oauth2]
resource_server_id = "rabbitmq"
issuer = "{ISSUER}"

[oauth2.signing_keys]
{KID} = "{FIXTURES / 'rsa-public.pem'}"

[auth]
backends = ["oauth2", "internal"]

[auth.sources]
"{ELSEWHERE}" = ["10.0.0.0/8"]
"mg-src-{RUN}" = ["10.0.0.0/8"]

[management]
address = "127.0.0.1:{mport}"
protected_users = ["{PROTECTED}"]
max_body_bytes = 1000000

[admin]
address = "127.0.0.1:{admin_port}"

[log]
level = "info,amqp_iam_gateway=debug"
audit = "{workdir / 'audit.log'}"
""")
        g = stack.enter_context(run_gateway(workdir, config, port, ca))
        g.workdir = workdir
        g.admin_port = admin_port
        g.api = Api("localhost", mport, str(ca))
        g.mport = mport
        g.ref = Api("127.0.0.1", REF_MGMT, None)
        g.tokens = {who: token(f"mg-{who}-{RUN}", scope) for who, scope in MATRIX.items()}
        yield g


def q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def normalise(path: str, status: int, body: bytes, side: str):
    """What must agree between the two sides: the status, and the body's stable part, with
    this side's names (`-r-`, `-g-`) made one and the other side's resources left out."""
    if not body:
        return status, None
    other = "g" if side == "r" else "r"
    text = body.decode(errors="replace")
    for kind in ("q", "x"):
        text = text.replace(f"-{side}-{kind}-{RUN}", f"-X-{kind}-{RUN}")
    try:
        doc = json.loads(text)
    except ValueError:
        return status, text
    if isinstance(doc, dict) and "error" in doc:
        return status, doc
    if path.startswith("/api/overview"):
        # Rates and counters move; which sections a user sees does not.
        return status, sorted(doc)
    if isinstance(doc, list):
        names = sorted(str(e.get("name", "")) for e in doc if isinstance(e, dict))
        return status, [n for n in names if not n.startswith("amq.gen")
                        and f"-{other}-" not in n and ("mg-" not in n or RUN in n)]
    if path.startswith("/api/definitions"):
        return status, sorted(doc)
    return status, doc


def both(mg, who: str, method: str, path_tpl: str, body=None):
    """Sends the request to the reference node (with the client token) and through the
    gateway (which forwards a backend token), on names of their own (`-r-` and `-g-`) so
    that neither sees the other's resources; returns the two normalised answers."""
    out = {}
    for side, api in (("r", mg.ref), ("g", mg.api)):
        path = path_tpl.format(side=side, run=RUN)
        b = json.loads(json.dumps(body).replace("{side}", side)) if body is not None else None
        status, _, text = api.request(method, path, mg.tokens[who], b)
        out[side] = normalise(path, status, text, side)
    return out["r"], out["g"]


# (method, path, body): each is sent for every user of the matrix, in this order.
REQUESTS = [
    ("GET", "/api/overview", None),
    ("GET", "/api/whoami", None),
    ("GET", "/api/vhosts", None),
    ("PUT", "/api/queues/%2F/mg-{side}-q-{run}", {"durable": False, "auto_delete": False}),
    ("PUT", "/api/queues/%2F/other-{side}-q-{run}", {"durable": False}),
    ("GET", "/api/queues", None),
    ("GET", "/api/queues/%2F/mg-{side}-q-{run}", None),
    ("PUT", "/api/exchanges/%2F/mg-{side}-x-{run}", {"type": "fanout", "durable": False}),
    ("POST", "/api/exchanges/%2F/amq.default/publish",
     {"properties": {}, "routing_key": "mg-{side}-q-{run}", "payload": "hello",
      "payload_encoding": "string"}),
    ("POST", "/api/queues/%2F/mg-{side}-q-{run}/get",
     {"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"}),
    ("GET", "/api/exchanges/%2F/mg-{side}-x-{run}", None),
    ("DELETE", "/api/exchanges/%2F/mg-{side}-x-{run}", None),
    ("DELETE", "/api/queues/%2F/mg-{side}-q-{run}", None),
    ("DELETE", "/api/queues/%2F/other-{side}-q-{run}", None),
    ("GET", "/api/definitions", None),
    ("GET", "/api/users", None),
]


@pytest.mark.parametrize("who", list(MATRIX))
def test_the_permission_matrix_answers_as_the_reference_node(mg, who):
    differences = []
    for method, path, body in REQUESTS:
        ref, gw = both(mg, who, method, path, body)
        if ref != gw:
            differences.append(f"{method} {path}: reference {ref!r}, gateway {gw!r}")
    # The tests must test something: the admin can do it all, the untagged user nothing.
    status, _, _ = mg.api.request("GET", "/api/overview", mg.tokens[who])
    assert status == (401 if who == "no-tag" else 200)
    assert not differences, "\n".join(differences)


def test_bearer_and_any_user_name_work_and_the_tutorials_curl_call(mg):
    tok = mg.tokens["monitoring"]
    for headers, user in (({}, ""), ({}, "anything"), ({"authorization": f"Bearer {tok}"}, None)):
        status, _, body = mg.api.request("GET", "/api/whoami", None if user is None else tok,
                                         headers=headers, basic_user=user or "")
        assert status == 200, body
        assert json.loads(body)["name"] == f"mg-monitoring-{RUN}"
    # Step 9 of Amazon MQ's tutorial, verbatim but for the CA.
    out = subprocess.run(["curl", "-s", "--cacert", str(mg.ca_file),
                          "-u", f":{tok}", f"https://localhost:{mg.mport}/api/overview"],
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["management_version"] == "3.10.8", out.stdout + out.stderr


def test_refusals_look_like_rabbitmqs(mg):
    expired = token(f"mg-expired-{RUN}", MATRIX["admin"], exp_in=-120)
    forged = mg.tokens["admin"][:-4] + ("AAAA" if not mg.tokens["admin"].endswith("AAAA") else "BBBB")
    for tok in (expired, forged, "not-a-token"):
        ref = mg.ref.request("GET", "/api/overview", tok)
        gw = mg.api.request("GET", "/api/overview", tok)
        assert gw[0] == ref[0] == 401, (gw, ref)
        assert gw[2] == ref[2] == b'{"error":"not_authorized","reason":"Login failed"}'
        assert gw[1]["www-authenticate"] == ref[1]["www-authenticate"]
    # No credentials at all: the broker's own answer comes through.
    gw = mg.api.request("GET", "/api/overview")
    ref = mg.ref.request("GET", "/api/overview")
    assert (gw[0], gw[2], gw[1]["www-authenticate"]) == (ref[0], ref[2], ref[1]["www-authenticate"])
    # Static files and the CLI need no credentials.
    status, _, body = mg.api.request("GET", "/")
    assert status == 200 and b"RabbitMQ Management" in body


def test_another_users_connections_are_hidden_from_a_management_user(mg):
    """A `management` user sees only its own connections; a `monitoring` user sees all."""
    a = token(f"mg-conn-a-{RUN}", "rabbitmq.tag:management rabbitmq.read:%2F/*")
    b = token(f"mg-conn-b-{RUN}", "rabbitmq.read:%2F/*")
    ctx = ssl.create_default_context(cafile=str(mg.ca_file))
    params = lambda t: pika.ConnectionParameters(  # noqa: E731
        "localhost", mg.port, "/", pika.PlainCredentials("", t),
        ssl_options=pika.SSLOptions(ctx, "localhost"))
    ca, cb = pika.BlockingConnection(params(a)), pika.BlockingConnection(params(b))
    try:
        def users(tok):
            deadline = time.monotonic() + 15
            while True:
                status, _, body = mg.api.request("GET", "/api/connections", tok)
                assert status == 200, body
                seen = {c["user"] for c in json.loads(body)}
                if f"mg-conn-a-{RUN}" in seen or time.monotonic() > deadline:
                    return seen
                time.sleep(0.5)  # connection stats reach the API every few seconds
        seen_by_a = users(a)
        assert f"mg-conn-a-{RUN}" in seen_by_a
        assert f"mg-conn-b-{RUN}" not in seen_by_a
        deadline = time.monotonic() + 15
        while f"mg-conn-b-{RUN}" not in users(mg.tokens["monitoring"]):
            assert time.monotonic() < deadline, "the monitoring user never saw b's connection"
            time.sleep(0.5)
    finally:
        ca.close()
        cb.close()


def test_internal_users_pass_and_protected_users_stay(mg):
    internal = ("", f"{PROTECTED}:pw-{RUN}")
    # The internal user's Basic credentials reach the broker unchanged.
    basic = base64.b64encode(f"{PROTECTED}:pw-{RUN}".encode()).decode()
    status, _, body = mg.api.request("GET", "/api/whoami", headers={"authorization": f"Basic {basic}"})
    assert status == 200 and json.loads(body)["name"] == PROTECTED, (status, body, internal)
    bad = base64.b64encode(f"{PROTECTED}:wrong".encode()).decode()
    status, _, body = mg.api.request("GET", "/api/whoami", headers={"authorization": f"Basic {bad}"})
    assert status == 401, body
    # The broker refused that password: the next try from here, the right password this
    # time, waits out the back-off (1 s) without reaching the broker.
    status, _, body = mg.api.request("GET", "/api/whoami", headers={"authorization": f"Basic {basic}"})
    assert (status, body) == (401, b'{"error":"not_authorized","reason":"Login failed"}')
    time.sleep(1.2)
    assert mg.api.request("GET", "/api/whoami", headers={"authorization": f"Basic {basic}"})[0] == 200
    # The broker sees the gateway's loopback address; the gateway applies the source rules
    # to the client's own: this user may come only from 10.0.0.0/8.
    direct = mg.ref.request("GET", "/api/whoami",
                            headers={"authorization": "Basic " + base64.b64encode(
                                f"{ELSEWHERE}:pw-{RUN}".encode()).decode()})
    assert direct[0] == 200, direct
    via = mg.api.request("GET", "/api/whoami", headers={"authorization": "Basic " + base64.b64encode(
        f"{ELSEWHERE}:pw-{RUN}".encode()).decode()})
    assert via[0] == 401, via
    time.sleep(0.3)
    audit = (mg.workdir / "audit.log").read_text()
    assert any(json.loads(line).get("reason") == "source_network" and json.loads(line).get("username") == ELSEWHERE
               for line in audit.splitlines()), audit[-2000:]
    admin = mg.tokens["admin"]
    refusal = {"error": "bad_request",
               "reason": "Protected users cannot be modified via the HTTP API"}
    attempts = [
        ("PUT", f"/api/users/{PROTECTED}", {"password": "x", "tags": "administrator"}, "application/json"),
        ("DELETE", f"/api/users/{PROTECTED}", None, None),
        ("DELETE", f"/api/users/{q(PROTECTED).replace('p', '%70', 1)}/", None, None),
        ("PUT", f"/api/permissions/%2F/{PROTECTED}", {"configure": ".*", "write": ".*", "read": ".*"}, "application/json"),
        ("POST", "/api/users/bulk-delete", {"users": [PROTECTED]}, "application/json"),
        ("POST", "/api/definitions", {"users": [{"name": PROTECTED, "password_hash": "", "tags": "administrator"}]}, "application/json"),
    ]
    for method, path, body, _ in attempts:
        status, _, text = mg.api.request(method, path, admin, body)
        assert (status, json.loads(text)) == (400, refusal), (method, path, status, text)
    # The UI's upload form: multipart, with the credentials in the query.
    boundary = "----mgtest" + RUN
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.json\"\r\n"
            f"Content-Type: application/json\r\n\r\n"
            + json.dumps({"users": [{"name": PROTECTED, "password_hash": "", "tags": ""}]})
            + f"\r\n--{boundary}--\r\n").encode()
    auth = base64.b64encode(f":{admin}".encode()).decode()
    status, _, text = mg.api.request("POST", f"/api/definitions?auth={q(auth)}", body=form,
                                     headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and json.loads(text) == refusal, text
    # Still there, unchanged.
    assert PROTECTED in ref_ctl("list_users", "--silent")
    # Another user can still be managed.
    other = f"mg-other-{RUN}"
    assert mg.api.request("PUT", f"/api/users/{other}", admin, {"password": "p", "tags": ""})[0] == 201
    assert mg.api.request("DELETE", f"/api/users/{other}", admin)[0] == 204


def test_the_definitions_download_link_and_the_login_form(mg):
    admin = mg.tokens["admin"]
    auth = base64.b64encode(f":{admin}".encode()).decode()
    status, headers, body = mg.api.request("GET", f"/api/definitions?download=d.json&auth={q(auth)}")
    assert status == 200, body
    assert "attachment" in headers.get("content-disposition", "")
    assert "rabbit_version" in json.loads(body)
    # POST /api/login: the cookie the broker sets holds the client's own credentials, not
    # the backend token.
    form = urllib.parse.urlencode({"username": "", "password": admin}).encode()
    status, headers, body = mg.api.request(
        "POST", "/api/login", body=form,
        headers={"content-type": "application/x-www-form-urlencoded"})
    assert status in (200, 204), body
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie == "auth=" + base64.b64encode(f":{admin}".encode()).decode()


def test_rabbitmqadmin_works_through_the_gateway(mg, tmp_path):
    status, _, script = mg.api.request("GET", "/cli/rabbitmqadmin")
    assert status == 200 and script.startswith(b"#!/usr/bin/env python3")
    path = tmp_path / "rabbitmqadmin"
    path.write_bytes(script)
    base = [sys.executable, str(path), "-H", "localhost", "-P", str(mg.mport), "--ssl",
            "--ssl-ca-cert-file", str(mg.ca_file), "-u", "token"]
    name = f"mg-cli-{RUN}"
    admin = mg.tokens["admin"]
    out = subprocess.run(base + ["-p", admin, "declare", "queue", f"name={name}", "durable=false"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(base + ["-p", admin, "-f", "tsv", "list", "queues", "name"],
                         capture_output=True, text=True, timeout=60)
    assert name in out.stdout.split(), out.stdout + out.stderr
    out = subprocess.run(base + ["-p", mg.tokens["management-ro"], "delete", "queue", f"name={name}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Access refused" in out.stdout + out.stderr, out.stdout + out.stderr
    out = subprocess.run(base + ["-p", admin, "delete", "queue", f"name={name}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_keep_alive_and_every_request_audited_without_the_token(mg):
    admin = mg.tokens["admin"]
    c = mg.api.conn()
    auth = "Basic " + base64.b64encode(f":{admin}".encode()).decode()
    try:
        c.request("GET", "/api/whoami", headers={"authorization": auth})
        r = c.getresponse()
        r.read()
        sock = c.sock
        for path in ("/api/vhosts", "/api/overview", "/api/queues/%2F"):
            c.request("GET", path, headers={"authorization": auth})
            r = c.getresponse()
            assert r.status == 200
            r.read()
            assert c.sock is sock, "the connection was not kept alive"
    finally:
        c.close()
    time.sleep(0.3)
    audit = (mg.workdir / "audit.log").read_text()
    lines = [json.loads(line) for line in audit.splitlines() if '"event":"http"' in line]
    mine = [r for r in lines if r.get("username") == f"mg-admin-{RUN}"]
    assert any(r["path"] == "/api/queues/{vhost}" and r["status"] == 200 and r["decision"] == "allow"
               and r["method"] == "GET" for r in mine), mine[-5:]
    # With the internal backend on, a token whose signature fails goes on to the broker's
    # internal users, and the audit record says why the token was not used. An expired
    # token with a valid signature is the issuer's: the gateway refuses it itself, and it
    # never reaches the broker as a password (test_refusals_look_like_rabbitmqs sent both).
    passed = [r for r in lines if r["decision"] == "pass" and "bad_signature" in r["reason"]]
    assert passed, "the forged token's pass to the internal users is not in the audit log"
    denied = [r for r in lines if r["decision"] == "deny" and r["reason"] == "expired"
              and r["backend"] == "oauth2"]
    assert denied, "the expired token's refusal is not in the audit log"
    for tok in mg.tokens.values():
        sig = tok.rsplit(".", 1)[1]
        assert sig not in audit
        assert sig not in mg.log()
    metrics = conftest.metrics_text(mg.admin_port)
    assert 'amqp_iam_gateway_management_requests_total{outcome="token",status="2xx"}' in metrics
    assert 'amqp_iam_gateway_management_requests_total{outcome="internal",status="4xx"}' in metrics


# --------------------------------------------------------------------------------------
# the HTTP proxy itself, against a backend that shows what it received


class Echo(BaseHTTPRequestHandler):
    """Answers every request with what it received: method, path, headers, body length."""
    protocol_version = "HTTP/1.1"
    seen: list = []

    def log_message(self, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            data = self.rfile.read(length)
        if self.path.startswith("/slow"):
            time.sleep(3)
        record = {"method": self.command, "path": self.path,
                  "headers": {k.lower(): v for k, v in self.headers.items()},
                  "length": len(data)}
        Echo.seen.append(record)
        if self.path.startswith("/big"):
            self.send_response(200)
            self.send_header("content-length", str(8 << 20))
            self.send_header("connection", "keep-alive, x-hop")
            self.send_header("x-hop", "1")
            self.end_headers()
            chunk = b"x" * (1 << 20)
            for _ in range(8):
                self.wfile.write(chunk)
            return
        out = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_DELETE = _answer


@pytest.fixture(scope="module")
def echo_gw(tmp_path_factory, mg):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    workdir = tmp_path_factory.mktemp("management-echo")
    ca = _write_tls(workdir)
    text = (mg.workdir / "gateway.toml").read_text()
    port, admin_port, mport = _free_port(), _free_port(), _free_port()
    text = (text.replace(f'address = "127.0.0.1:{mg.port}"', f'address = "127.0.0.1:{port}"')
            .replace(f'address = "127.0.0.1:{mg.admin_port}"', f'address = "127.0.0.1:{admin_port}"')
            .replace(f'address = "127.0.0.1:{mg.mport}"',
                     f'address = "127.0.0.1:{mport}"\nbackend_url = "http://127.0.0.1:{server.server_port}"\n'
                     'max_concurrent_requests = 2\nrequest_timeout_ms = 2000\nmax_header_bytes = 16384\n'
                     'header_timeout_ms = 2000')
            .replace(str(mg.workdir / "audit.log"), str(workdir / "audit.log"))
            .replace('backends = ["oauth2", "internal"]', 'backends = ["oauth2"]')
            # The edge policy (the source rules are the shared config's), as for AMQP logins.
            + '\n[oauth2.policy]\nmax_lifetime_seconds = 3600\n')
    config = workdir / "gateway.toml"
    config.write_text(text)
    with run_gateway(workdir, config, port, ca) as g:
        g.workdir = workdir
        g.admin_port = admin_port
        g.api = Api("localhost", mport, str(ca))
        g.mport = mport
        yield g
    server.shutdown()


def test_what_the_broker_receives(echo_gw, mg):
    admin = mg.tokens["admin"]
    Echo.seen.clear()
    status, _, body = echo_gw.api.request(
        "PUT", "/api/queues/%2F/x?columns=name&auth=secret", admin, {"a": 1},
        headers={"connection": "x-drop", "x-drop": "1", "x-forwarded-for": "6.6.6.6",
                 "proxy-authorization": "Basic eHg6eXk=", "x-keep": "1"})
    assert status == 200, body
    seen = json.loads(body)
    h = seen["headers"]
    assert seen["path"] == "/api/queues/%2F/x?columns=name&auth=secret"  # not /api/definitions
    assert h["authorization"].startswith("Bearer ") and admin not in h["authorization"]
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["forwarded"] == f"for=127.0.0.1;proto=https;host=localhost:{echo_gw.mport}"
    assert h["x-forwarded-proto"] == "https"
    assert "x-drop" not in h and "proxy-authorization" not in h
    assert h["x-keep"] == "1"
    assert seen["length"] == len(b'{"a": 1}')
    # The definitions query's credentials are the gateway's to read and to remove.
    auth = base64.b64encode(f":{admin}".encode()).decode()
    status, _, body = echo_gw.api.request("GET", f"/api/definitions?download=d.json&auth={q(auth)}")
    seen = json.loads(body)
    assert seen["path"] == "/api/definitions?download=d.json", seen["path"]
    assert seen["headers"]["authorization"].startswith("Bearer ")
    # Without the internal backend, a refused token never reaches the backend: the gateway
    # answers as RabbitMQ would, and says why in the audit log and the metrics.
    n = len(Echo.seen)
    expired = token(f"mg-expired-{RUN}", MATRIX["admin"], exp_in=-120)
    for tok in ("bad.token.x", expired):
        status, headers, body = echo_gw.api.request("GET", "/api/overview", tok)
        assert (status, body) == (401, b'{"error":"not_authorized","reason":"Login failed"}')
        assert headers["www-authenticate"] == 'Basic realm="RabbitMQ Management"'
    # A token the edge policy refuses (lifetime over 3600 s), and a user allowed only from
    # 10.0.0.0/8 connecting from loopback.
    too_long = token(f"mg-long-{RUN}", MATRIX["admin"], exp_in=7200)
    elsewhere = token(f"mg-src-{RUN}", MATRIX["admin"])
    for tok in (too_long, elsewhere):
        status, headers, body = echo_gw.api.request("GET", "/api/overview", tok)
        assert (status, body) == (401, b'{"error":"not_authorized","reason":"Login failed"}')
    assert len(Echo.seen) == n
    time.sleep(0.3)
    audit = [json.loads(line) for line in (echo_gw.workdir / "audit.log").read_text().splitlines()]
    for reason in ("expired", "policy_lifetime", "source_network"):
        assert any(r["event"] == "http" and r["decision"] == "deny" and r["reason"] == reason
                   and r["status"] == 401 and r["path"] == "/api/overview" for r in audit), (
            reason, audit[-4:])
    metrics = conftest.metrics_text(echo_gw.admin_port)
    assert 'amqp_iam_gateway_management_requests_total{outcome="refused",status="4xx"} 4' in metrics


def test_credentials_the_gateway_cannot_read_do_not_reach_the_broker(echo_gw):
    """Without the internal backend, a credential the gateway cannot read (base64 without
    padding, which a lenient decoder might accept; an unknown scheme) is removed, not passed
    on for the broker to read its own way: the broker trusts the gateway's address."""
    Echo.seen.clear()
    unpadded = base64.b64encode(b"guest:guest").decode().rstrip("=")
    status, _, body = echo_gw.api.request(
        "GET", f"/api/definitions?download=x&auth={unpadded}&token=zz",
        headers={"authorization": "Basic " + unpadded})
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/api/definitions?download=x", seen
    assert "authorization" not in seen["headers"], seen
    seen = json.loads(echo_gw.api.request("GET", "/api//definitions/%2F?auth=x&a=1")[2])
    assert seen["path"] == "/api//definitions/%2F?a=1", seen
    # A `token` there is a token: verified, and refused as any other.
    n = len(Echo.seen)
    assert echo_gw.api.request("GET", "/api/x/../definitions?token=y")[0] == 401
    assert len(Echo.seen) == n
    # A login form the gateway cannot read is refused, not forwarded.
    n = len(Echo.seen)
    status, _, _ = echo_gw.api.request("POST", "/api/login", body=b"user=guest&pass=guest",
                                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert status == 401 and len(Echo.seen) == n


def test_bodies_stream_and_limits_hold(echo_gw, mg):
    admin = mg.tokens["admin"]
    auth = "Basic " + base64.b64encode(f":{admin}".encode()).decode()
    # An 8 MiB response streams through (hop-by-hop headers dropped).
    status, headers, body = echo_gw.api.request("GET", "/big", admin)
    assert status == 200 and len(body) == 8 << 20
    assert "x-hop" not in headers
    # A chunked upload of 900 kB streams to the backend; 1.1 MB is refused with 413.
    for size, want in ((900_000, 200), (1_100_000, 413)):
        c = echo_gw.api.conn()
        c.putrequest("POST", "/api/upload")
        c.putheader("authorization", auth)
        c.putheader("transfer-encoding", "chunked")
        c.endheaders()
        chunk = b"y" * 100_000
        try:
            for _ in range(size // len(chunk)):
                c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            c.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = c.getresponse()
        body = r.read()
        assert r.status == want, (size, r.status, body)
        if want == 200:
            assert json.loads(body)["length"] == size
        c.close()
    # Headers beyond max_header_bytes: 431, from hyper, before anything is forwarded.
    status, _, _ = echo_gw.api.request("GET", "/api/overview", admin,
                                       headers={"x-big": "z" * 20_000})
    assert status == 431
    # The backend slower than request_timeout_ms: 504.
    status, _, body = echo_gw.api.request("GET", "/slow", admin)
    assert status == 504 and b"did not answer within 2000 ms" in body
    # More than max_concurrent_requests (2) at once: 503 for the others.
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        echo_gw.api.request("GET", "/slow", admin)[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [503, 503, 504, 504], results


def test_a_client_that_sends_nothing_is_cut_off(echo_gw):
    """Pre-auth bounds: a TLS connection that never finishes its request's headers is
    closed once header_timeout_ms (2 s here) has passed."""
    raw = socket.create_connection(("127.0.0.1", echo_gw.mport), timeout=30)
    ctx = ssl.create_default_context(cafile=str(echo_gw.ca_file))
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    start = time.monotonic()
    s.send(b"GET /api/overview HTTP/1.1\r\n")
    try:
        data = s.recv(100)
    except (ConnectionResetError, ssl.SSLError):
        data = b""
    took = time.monotonic() - start
    s.close()
    assert 1.5 < took < 6, took
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
    # An idle keep-alive connection goes the same way after a request.
    c = echo_gw.api.conn()
    c.request("GET", "/")
    c.getresponse().read()
    start = time.monotonic()
    c.sock.settimeout(30)
    try:
        rest = c.sock.recv(100)
    except (ConnectionResetError, ssl.SSLError):
        rest = b""
    took = time.monotonic() - start
    c.close()
    assert rest == b"" and took < 6, (rest, took)


# --------------------------------------------------------------------------------------
# the management UI in a real browser (Debian's chromium, headless, driven by Selenium
# through Debian's chromedriver); screenshots go to target/test-artifacts/management-ui/

ARTIFACTS = REPO_ROOT / "target" / "test-artifacts" / "management-ui"


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium must not look for a driver online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    # The gateway's certificate is signed by the tests' own CA, which Chromium's NSS store
    # does not hold; everything else about TLS is real.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--ignore-certificate-errors"):
        opts.add_argument(arg)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def ui_login(driver, mg, username: str, tok: str, who: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base = f"https://localhost:{mg.mport}/"
    driver.delete_all_cookies()
    driver.get(base)
    driver.execute_script("window.localStorage.clear();")
    driver.delete_all_cookies()
    driver.get(base)
    wait = WebDriverWait(driver, 20)
    user_field = wait.until(ec.visibility_of_element_located((By.NAME, "username")))
    user_field.clear()
    user_field.send_keys(username)
    # The token goes in as the UI would get it pasted (send_keys of 1 KB is slow).
    pw = driver.find_element(By.NAME, "password")
    driver.execute_script("arguments[0].value = arguments[1];", pw, tok)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(ec.visibility_of_element_located((By.ID, "tabs")))
    wait.until(lambda d: "Overview" in d.find_element(By.ID, "main").text)
    driver.save_screenshot(str(ARTIFACTS / f"{who}-overview.png"))
    return wait


@pytest.mark.parametrize("who,username", [("monitoring", ""), ("admin", "any name")])
def test_the_management_ui_logs_in_with_a_token(mg, browser, who, username):
    """A read-only (monitoring) token and an administrator token log in through the
    gateway's UI, with an empty user name and with any user name; each sees the overview
    and the queue list. RabbitMQ 3.10.8 shows the Admin tab to every management user (its
    Policies and Limits pages); only the administrator finds Users, Virtual Hosts and
    Cluster there.

    A refused token is not tried here: the UI's synchronous `/api/whoami` then gets
    RabbitMQ's `401` with `WWW-Authenticate: Basic`, and Chromium opens its own credentials
    prompt, through the gateway as against RabbitMQ directly (the API tests compare that
    answer byte for byte)."""
    from selenium.webdriver.common.by import By

    name = f"mg-ui-q-{RUN}"
    assert mg.api.request("PUT", f"/api/queues/%2F/{name}", mg.tokens["admin"],
                          {"durable": False})[0] in (201, 204)
    try:
        wait = ui_login(browser, mg, username, mg.tokens[who], who)
        tabs = browser.find_element(By.ID, "tabs").text
        assert "Queues" in tabs and "Connections" in tabs and "Admin" in tabs, tabs
        user_shown = browser.find_element(By.ID, "header").text
        assert f"mg-{who}-{RUN}" in user_shown, user_shown
        browser.get(f"https://localhost:{mg.mport}/#/queues")
        wait.until(lambda d: name in d.find_element(By.ID, "main").text)
        browser.save_screenshot(str(ARTIFACTS / f"{who}-queues.png"))
        browser.find_element(By.LINK_TEXT, "Admin").click()
        wait.until(lambda d: "Policies" in d.find_element(By.ID, "rhs").text)
        admin_menu = browser.find_element(By.ID, "rhs").text
        browser.save_screenshot(str(ARTIFACTS / f"{who}-admin-tab.png"))
        for entry in ("Users", "Virtual Hosts", "Cluster"):
            assert (entry in admin_menu) == (who == "admin"), admin_menu
        if who == "admin":
            browser.get(f"https://localhost:{mg.mport}/#/users")
            wait.until(lambda d: PROTECTED in d.find_element(By.ID, "main").text)
            browser.save_screenshot(str(ARTIFACTS / f"{who}-admin-users.png"))
    finally:
        mg.api.request("DELETE", f"/api/queues/%2F/{name}", mg.tokens["admin"])


# --------------------------------------------------------------------------------------
# broker policies on the management API ([authorization]): the same documents as AMQP

MG_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Sid": "NoDeniedQueues", "Effect": "Deny", "Principal": "*",
         "Action": "rabbitmq:QueueDeclare", "Resource": "arn:aws:rabbitmq:::vhost/%2F/queue/mg-pol-denied-*"},
        {"Sid": "NoSecretKeys", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Publish",
         "Resource": "*", "Condition": {"StringLike": {"rabbitmq:RoutingKey": "secret.*"}}},
        {"Sid": "BlockedRole", "Effect": "Deny",
         "Principal": {"AWS": "arn:aws:iam::111122223333:role/MgBlocked"},
         "Action": "rabbitmq:Connect", "Resource": "arn:aws:rabbitmq:::vhost/%2F"},
    ],
}


@pytest.fixture(scope="module")
def pol_gw(mg, tmp_path_factory):
    """A second gateway in front of the reference node, with `[authorization]` policies."""
    import re

    workdir = tmp_path_factory.mktemp("management-policies")
    for f in ("server.pem", "server-key.pem", "ca.pem", "backend-token.pem"):
        if (mg.workdir / f).exists():
            shutil.copy(mg.workdir / f, workdir / f)
    (workdir / "backend-token.pem").chmod(0o600)
    (workdir / "policy.json").write_text(json.dumps(MG_POLICY))
    port, admin_port, mport = _free_port(), _free_port(), _free_port()
    text = (mg.workdir / "gateway.toml").read_text()
    text = text.replace(str(mg.workdir / "backend-token.pem"), str(workdir / "backend-token.pem"))
    text = text.replace(str(mg.workdir / "audit.log"), str(workdir / "audit.log"))
    text = re.sub(r'(\[listener\]\naddress = "127\.0\.0\.1:)\d+', rf"\g<1>{port}", text)
    text = re.sub(r'(\[management\]\naddress = "127\.0\.0\.1:)\d+', rf"\g<1>{mport}", text)
    text = re.sub(r'(\[admin\]\naddress = "127\.0\.0\.1:)\d+', rf"\g<1>{admin_port}", text)
    text += '\n[authorization]\nmode = "scopes"\npolicies = ["policy.json"]\n'
    config = workdir / "gateway.toml"
    config.write_text(text)
    with run_gateway(workdir, config, port, workdir / "ca.pem") as g:
        g.workdir = workdir
        g.api = Api("localhost", mport, str(workdir / "ca.pem"))
        yield g


def test_the_management_api_applies_the_broker_policies(pol_gw):
    admin = token(f"arn:aws:iam::111122223333:role/MgAdmin", MATRIX["admin"])
    api = pol_gw.api
    ok, denied = f"mg-pol-ok-{RUN}", f"mg-pol-denied-{RUN}"
    try:
        # A queue the Deny names: the management plugin's own refusal for a declare.
        status, _, body = api.request("PUT", f"/api/queues/%2F/{denied}", admin, {"auto_delete": True})
        assert (status, json.loads(body)) == (401, {"error": "not_authorised", "reason": "Access refused."})
        # Any other queue: the broker decides (the scopes allow it).
        status, _, body = api.request("PUT", f"/api/queues/%2F/{ok}", admin, {"auto_delete": True})
        assert status in (201, 204), body
        # A publish with a routing key the Deny names, from the body: 400 with the AMQP text.
        msg = {"properties": {}, "payload": "x", "payload_encoding": "string"}
        status, _, body = api.request("POST", "/api/exchanges/%2F/amq.default/publish", admin,
                                      {**msg, "routing_key": "secret.1"})
        assert status == 400, body
        assert json.loads(body) == {
            "error": "bad_request",
            "reason": "403 ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' "
                      "refused for user 'arn:aws:iam::111122223333:role/MgAdmin'",
        }
        status, _, body = api.request("POST", "/api/exchanges/%2F/amq.default/publish", admin,
                                      {**msg, "routing_key": ok})
        assert (status, json.loads(body)) == (200, {"routed": True})
        # The blocked role: no access to the vhost's listings.
        blocked = token("arn:aws:iam::111122223333:role/MgBlocked", MATRIX["admin"])
        status, _, body = api.request("GET", "/api/queues/%2F", blocked)
        assert (status, json.loads(body)) == (
            401, {"error": "not_authorised", "reason": "User not authorised to access virtual host"})
        status, _, _ = api.request("GET", "/api/queues/%2F", admin)
        assert status == 200
        # Routes the policies do not cover stay the broker's.
        status, _, _ = api.request("GET", "/api/overview", blocked)
        assert status == 200
    finally:
        api.request("DELETE", f"/api/queues/%2F/{ok}", admin)
    # The audit records name the deciding statements.
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in (pol_gw.workdir / "audit.log").read_text().splitlines()]
        named = {r.get("statement") for r in records if r.get("event") == "http" and r.get("decision") == "deny"}
        if {"policy.json:NoDeniedQueues", "policy.json:NoSecretKeys", "policy.json:BlockedRole"} <= named \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {"policy.json:NoDeniedQueues", "policy.json:NoSecretKeys", "policy.json:BlockedRole"} <= named, named
