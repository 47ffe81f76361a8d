"""Fixtures for the pika integration tests.

The session fixture `gateway` builds nothing: it runs the binary named by the environment
variable GATEWAY_BIN (default: target/debug/amqp-iam-gateway under the repository root),
with a config, a CA and a server certificate written to a temporary directory. The gateway
relays to the RabbitMQ node at 127.0.0.1:5672 as `guest` (scripts/setup.sh starts it).

Tokens are minted like AWS STS web identity tokens, signed with tests/fixtures/rsa-private.pem
(kid `test-rsa`, RS256).

pika and the empty user name: `pika.PlainCredentials("", token)` works as it is. pika does
not validate the user name; its PLAIN response is b"\\0" + username + b"\\0" + password, so
the gateway receives an empty authcid and the token as the password. No workaround needed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
import pika
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"

ISSUER = "https://issuer.test"
AUDIENCE = "rabbitmq"
ACCOUNT = "111122223333"
ADMIN_ROLE = f"arn:aws:iam::{ACCOUNT}:role/RabbitMqAdminRole"
READ_ONLY_ROLE = f"arn:aws:iam::{ACCOUNT}:role/ReadOnly"
STS_NS = "https://sts.amazonaws.com/"
KID = "test-rsa"

BACKEND_NODE = os.environ.get("RABBITMQ_NODE", "127.0.0.1:5672")
START_TIMEOUT_S = 20.0

# Set by the gateway fixture; read by the report hook to attach the gateway's stderr.
_GATEWAY_LOG: Path | None = None

# (title, text) blocks that tests want shown at the end of the run whatever the outcome
# (the conformance harness's table); printed by pytest_terminal_summary.
TERMINAL_REPORTS: list[tuple[str, str]] = []


# --------------------------------------------------------------------------------------
# tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(obj: dict) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(
    sub: str,
    *,
    scope: str | None = None,
    request_tags: dict | None = None,
    aud: str = AUDIENCE,
    iss: str = ISSUER,
    exp_in: int = 300,
    iat_offset: int = 0,
) -> dict:
    """Claims shaped like an AWS STS web identity token."""
    now = int(time.time()) + iat_offset
    c = {
        "iss": iss,
        "aud": aud,
        "sub": sub,
        "iat": now,
        "exp": now + exp_in,
        "jti": str(uuid.uuid4()),
        STS_NS: {
            "aws_account": ACCOUNT,
            "source_region": "us-east-1",
            "request_tags": dict(request_tags or {}),
        },
    }
    if scope is not None:
        c["scope"] = scope
    return c


def _pem(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sign_rs256(payload: dict, key_file: str = "rsa-private.pem", kid: str = KID) -> str:
    return jwt.encode(payload, _pem(key_file), algorithm="RS256", headers={"kid": kid})


def mint(sub: str, **kw) -> str:
    """A valid token from the trusted key."""
    return sign_rs256(claims(sub, **kw))


def unsigned_token(payload: dict) -> str:
    """`alg: none` with an empty signature, made by hand (PyJWT would not help here)."""
    header = {"alg": "none", "typ": "JWT"}
    return f"{_b64url_json(header)}.{_b64url_json(payload)}."


def hs256_with_public_key(payload: dict) -> str:
    """The algorithm-confusion attack: HS256 keyed with the trusted RSA public key's PEM
    bytes. PyJWT refuses to use a PEM key as an HMAC secret, so this is made by hand."""
    header = {"alg": "HS256", "typ": "JWT", "kid": KID}
    signing_input = f"{_b64url_json(header)}.{_b64url_json(payload)}".encode()
    mac = hmac.new(_pem("rsa-public.pem"), signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{_b64url(mac)}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


# The client compatibility tests (test_clients_*.py): a token with full access to the
# `compat.*` resources (and to amq.direct, for the CLI tools, which cannot declare
# exchanges), and a read-only one for the same user to refresh to with update-secret.
COMPAT_FULL_SCOPE = (
    "rabbitmq/configure:%2F/compat.* rabbitmq/write:%2F/compat.* rabbitmq/read:%2F/compat.* "
    "rabbitmq/write:%2F/amq.direct rabbitmq/read:%2F/amq.direct"
)
COMPAT_READ_SCOPE = "rabbitmq/read:%2F/compat.*"


@dataclass
class CompatUser:
    sub: str
    full: str  # token: configure/write/read on compat.*
    read_only: str  # token, same sub: read on compat.* only

    def refused(self, kind: str, resource: str, name: str) -> str:
        """RabbitMQ 4.x's channel.close text for a refused operation of this user."""
        return (
            f"ACCESS_REFUSED - {kind} access to {resource} '{name}' in vhost '/' "
            f"refused for user '{self.sub}'"
        )


def compat_user(client: str) -> CompatUser:
    sub = unique(f"compat-{client}")
    return CompatUser(
        sub, mint(sub, scope=COMPAT_FULL_SCOPE), mint(sub, scope=COMPAT_READ_SCOPE)
    )


# --------------------------------------------------------------------------------------
# certificates and config


def _write_tls(dir_: Path) -> Path:
    """A CA and a server certificate for localhost/127.0.0.1. Returns the CA file."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "amqp-iam-gateway test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = dir_ / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (dir_ / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (dir_ / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file


_HANDED_OUT: set[int] = set()


def _free_port() -> int:
    """A port free now and not handed out before in this process: the OS may give a port
    it just released again, and two listeners of one config must not share it."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _write_config(
    dir_: Path, port: int, admin_port: int, *, issuer: str = ISSUER, static_key: bool = True
) -> Path:
    """The gateway config. With `static_key=False` the keys come only from `issuer`'s OIDC
    discovery document (the STS emulator tests)."""
    aliases = {
        ADMIN_ROLE: "rabbitmq/tag:administrator rabbitmq/read:*/* rabbitmq/write:*/* "
        "rabbitmq/configure:*/*",
        READ_ONLY_ROLE: "rabbitmq/read:*/*",
        "team-a": "rabbitmq/configure:%2F/team-a.* rabbitmq/write:%2F/team-a.* "
        "rabbitmq/read:%2F/team-a.*",
    }
    alias_lines = "\n".join(f"{_toml_str(k)} = {_toml_str(v)}" for k, v in aliases.items())
    keys = (
        f"[oauth2.signing_keys]\n{KID} = {_toml_str(str(FIXTURES / 'rsa-public.pem'))}\n"
        if static_key
        else ""
    )
    text = f"""\
[listener]
address = "127.0.0.1:{port}"
tls_cert = "server.pem"
tls_key = "server-key.pem"
auth_failure_delay_ms = 300

[backend]
nodes = [{_toml_str(BACKEND_NODE)}]
username = "guest"
password = "guest"

[oauth2]
resource_server_id = "rabbitmq"
scope_prefix = "rabbitmq/"
issuer = {_toml_str(issuer)}
additional_scopes_key = 'sub https://sts\\.amazonaws\\.com/.request_tags.scope'

{keys}
[oauth2.scope_aliases]
{alias_lines}

[admin]
address = "127.0.0.1:{admin_port}"

[log]
level = "info,amqp_iam_gateway=debug"
"""
    path = dir_ / "gateway.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------
# the reference node (scripts/reference-node.sh: RabbitMQ with the OAuth 2.0 plugin)

REF_PORT = int(os.environ.get("REFERENCE_NODE_PORT", "5691"))
REF_SCRIPT = REPO_ROOT / "scripts" / "reference-node.sh"
_REF_ENV = {**os.environ, "REFERENCE_NODE_PORT": str(REF_PORT)}


def ref_ctl(*args: str, check: bool = True) -> str:
    """`rabbitmqctl` against the reference node; its output."""
    r = subprocess.run([str(REF_SCRIPT), "ctl", *args], capture_output=True, text=True,
                       timeout=60, env=_REF_ENV)
    assert not check or r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def start_reference_node(stack: contextlib.ExitStack) -> None:
    """Starts the reference node (a running one with the same configuration is kept) and,
    unless CONFORMANCE_KEEP_REFERENCE=1, stops it when `stack` closes."""
    r = subprocess.run([str(REF_SCRIPT), "start"], capture_output=True, text=True,
                       env=_REF_ENV, timeout=150)
    if r.returncode != 0:
        pytest.fail(f"reference-node.sh start failed:\n{r.stdout}{r.stderr}", pytrace=False)
    if os.environ.get("CONFORMANCE_KEEP_REFERENCE") != "1":
        stack.callback(lambda: subprocess.run([str(REF_SCRIPT), "stop"], env=_REF_ENV,
                                              timeout=150, capture_output=True))


# --------------------------------------------------------------------------------------
# the gateway


@dataclass
class Gateway:
    host: str
    port: int
    ca_file: Path
    log_file: Path
    proc: subprocess.Popen

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def params(self, token: str, vhost: str = "/") -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials("", token),
            ssl_options=pika.SSLOptions(self.ssl_context(), "localhost"),
            connection_attempts=1,
            retry_delay=0,
            socket_timeout=10,
            stack_timeout=20,
            blocked_connection_timeout=30,
        )

    def url(self, token: str, vhost: str = "%2f") -> str:
        """The URL form clients take: empty username, the token as password."""
        return f"amqps://:{token}@localhost:{self.port}/{vhost}"

    def connect(self, token: str, vhost: str = "/") -> pika.BlockingConnection:
        return pika.BlockingConnection(self.params(token, vhost))

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _resolve_bin() -> Path:
    raw = os.environ.get("GATEWAY_BIN", "target/debug/amqp-iam-gateway")
    p = Path(raw)
    return p if p.is_absolute() else (REPO_ROOT / p)


def gateway_binary() -> Path:
    binary = _resolve_bin()
    if not binary.is_file():
        pytest.fail(
            f"gateway binary not found at {binary}: run `cargo build` or set GATEWAY_BIN",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> Gateway:
    workdir = tmp_path_factory.mktemp("gateway")
    ca_file = _write_tls(workdir)
    port = _free_port()
    config = _write_config(workdir, port, _free_port())
    with run_gateway(workdir, config, port, ca_file) as gw:
        yield gw


@contextlib.contextmanager
def run_gateway(workdir: Path, config: Path, port: int, ca_file: Path,
                env: dict[str, str | None] | None = None):
    """Checks `config`, runs `serve` with it until the block ends, and yields the Gateway
    once it accepts TCP on `port`. The process is `gw.proc` (a test may signal it, e.g.
    SIGHUP or SIGTERM), its stdout and stderr are `gw.log()`; at the end it is stopped with
    `stop_process` unless it has exited already. `env` changes the process's environment
    (a value of None removes the variable)."""
    global _GATEWAY_LOG
    binary = gateway_binary()
    check = subprocess.run(
        [str(binary), "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    if check.returncode != 0:
        pytest.fail(
            f"check-config rejected the test config ({config}):\n{check.stdout}{check.stderr}",
            pytrace=False,
        )

    log_file = workdir / "gateway.stderr.log"
    log = open(log_file, "wb")
    environ = {**os.environ, "NO_COLOR": "1"}
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    proc = subprocess.Popen(
        [str(binary), "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir,
        env=environ,
    )
    _GATEWAY_LOG = log_file
    gw = Gateway("127.0.0.1", port, ca_file, log_file, proc)

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(
                f"gateway exited with status {proc.returncode} before listening:\n{gw.log()}",
                pytrace=False,
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                log.close()
                pytest.fail(
                    f"gateway did not accept TCP on 127.0.0.1:{port} within "
                    f"{START_TIMEOUT_S:.0f} s:\n{gw.log()}",
                    pytrace=False,
                )
            time.sleep(0.1)

    try:
        yield gw
    finally:
        stop_process(proc)
        log.close()


def metrics_text(admin_port: int) -> str:
    """The gateway's `/metrics` text, from its admin listener."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def metric(admin_port: int, sample: str) -> float:
    """The value of `sample` (a metric name with its labels as written in the exposition
    text, e.g. `amqp_iam_gateway_config_reloads_total{result="ok"}`) on the gateway's admin
    listener; 0 when absent."""
    for line in metrics_text(admin_port).splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def stop_process(proc: subprocess.Popen) -> None:
    """SIGINT (ctrl-c), which the binary handles; SIGKILL if it does not stop in 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _gateway_log_per_test():
    """A test that runs its own gateway (`run_gateway`) points the failure report at that
    gateway's log until the test is torn down (after its report), then back at the log of
    the gateway before it, so later failures show the right log."""
    global _GATEWAY_LOG
    saved = _GATEWAY_LOG
    yield
    _GATEWAY_LOG = saved


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tail of the gateway's stderr to every failed test's report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _GATEWAY_LOG is not None:
        try:
            text = _GATEWAY_LOG.read_text(errors="replace")
        except OSError:
            return
        rep.sections.append(("gateway stderr (tail)", _tail(text)))


def pytest_terminal_summary(terminalreporter):
    for title, text in TERMINAL_REPORTS:
        terminalreporter.section(title)
        for line in text.splitlines():
            terminalreporter.write_line(line)


@pytest.fixture
def admin(gateway):
    """A connection with the admin alias token (full permissions)."""
    conn = gateway.connect(mint(ADMIN_ROLE))
    yield conn
    if conn.is_open:
        conn.close()


# --------------------------------------------------------------------------------------
# a load balancer in miniature


@contextlib.contextmanager
def proxy_shim(target_port: int, source: str, source_port: int = 40000):
    """A local TCP listener that sends a PROXY protocol v1 header naming `source` as the
    client, then relays both ways to 127.0.0.1:`target_port` (TLS passes through). Yields
    the port to connect to; threads stop when the block ends."""
    import threading

    family = "TCP6" if ":" in source else "TCP4"
    dest = "::1" if family == "TCP6" else "127.0.0.1"
    header = f"PROXY {family} {source} {dest} {source_port} {target_port}\r\n".encode()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.settimeout(0.2)
    stop = threading.Event()
    socks: list[socket.socket] = []

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while not stop.is_set():
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", target_port), timeout=5)
            upstream.settimeout(None)
            # No Nagle: with delayed ACKs it would add up to 40 ms to small exchanges.
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.sendall(header)
            socks.extend((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        stop.set()
        t.join(timeout=2)
        lsock.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def management_api(method: str, path: str, body: dict | None = None,
                   base: str = "http://127.0.0.1:15672", auth: tuple = ("guest", "guest")):
    """A request to the default node's management API as `guest`; the parsed JSON answer
    (None when empty)."""
    req = urllib.request.Request(
        base + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json",
                 "authorization": "Basic " + base64.b64encode(
                     f"{auth[0]}:{auth[1]}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read()
    return json.loads(text) if text else None
