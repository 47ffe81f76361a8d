"""Backend tokens (`backend.auth = "token"`): the gateway exchanges each client token for one
of its own, and RabbitMQ's OAuth 2.0 plugin verifies it again behind the gateway.

The broker is the reference node (scripts/reference-node.sh: RabbitMQ 3.10.8 with
`rabbitmq_auth_backend_oauth2`, `resource_server_id = rabbitmq`, and the static key
tests/fixtures/rsa-public.pem as kid `test-rsa`). The gateway signs its backend tokens with
the matching private key under that kid, so the node accepts them as it is configured for
the conformance harness; client tokens are verified by the gateway with the same key.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import conftest
from conftest import (FIXTURES, REF_PORT, _free_port, _write_config, _write_tls, mint,
                      ref_ctl, run_gateway, start_reference_node)

RUN = uuid.uuid4().hex[:8]
SCOPE = (
    "rabbitmq/configure:%2F/bt-* rabbitmq/write:%2F/bt-* rabbitmq/read:%2F/bt-* "
    "rabbitmq/write:%2F/amq.default"
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        start_reference_node(stack)
        workdir = tmp_path_factory.mktemp("backend-tokens")
        ca = _write_tls(workdir)
        key = workdir / "backend-token.pem"
        shutil.copy(FIXTURES / "rsa-private.pem", key)
        key.chmod(0o600)
        port = _free_port()
        config = _write_config(workdir, port, _free_port())
        text = config.read_text().replace(
            f'nodes = ["{conftest.BACKEND_NODE}"]', f'nodes = ["127.0.0.1:{REF_PORT}"]'
        ).replace(
            'username = "guest"\npassword = "guest"',
            'username = "unused"\npassword = "unused"\nauth = "token"\n\n'
            f'[backend.token]\nsigning_key = "{key}"\nkid = "test-rsa"\n'
            'resource_server_id = "rabbitmq"\n',
        ).replace("[log]\n", f'[log]\naudit = "{workdir / "audit.log"}"\n', 1)
        config.write_text(text)
        g = stack.enter_context(run_gateway(workdir, config, port, ca))
        g.workdir = workdir
        yield g


def test_the_broker_sees_the_tokens_user_on_the_relayed_connection(gw):
    user = f"bt-user-{RUN}"
    conn = gw.connect(mint(user, scope=SCOPE))
    try:
        ch = conn.channel()
        q = f"bt-q-{RUN}"
        ch.queue_declare(q, auto_delete=True)
        ch.basic_publish("", q, b"hello")
        assert ch.basic_get(q, auto_ack=True)[2] == b"hello"
        users = ref_ctl("list_connections", "user", "--silent").split()
        assert user in users, users
        assert "unused" not in users
    finally:
        conn.close()


def test_a_token_with_hundreds_of_scopes_logs_in_and_works(gw):
    """310 scopes make a backend token of ~16 KiB: far beyond RabbitMQ 3.10.8's 4096-byte
    frames before tuning. The login uses a minimal token, then update-secret the full one."""
    user = f"bt-big-{RUN}"
    many = " ".join(f"rabbitmq/read:%2F/bt-many-{i:03}-{'x' * 20}" for i in range(300))
    conn = gw.connect(mint(user, scope=f"{SCOPE} {many}"))
    try:
        ch = conn.channel()
        q = f"bt-big-q-{RUN}"
        ch.queue_declare(q, auto_delete=True)
        ch.basic_publish("", q, b"big")
        assert ch.basic_get(q, auto_ack=True)[2] == b"big"
        assert user in ref_ctl("list_connections", "user", "--silent").split()
    finally:
        conn.close()


def test_update_secret_reaches_the_broker_and_another_users_token_is_refused(gw):
    user = f"bt-refresh-{RUN}"
    conn = gw.connect(mint(user, scope=SCOPE))
    try:
        # A fresh token for the same user: the broker answers (update-secret-ok comes from it).
        conn.update_secret(mint(user, scope=SCOPE, exp_in=600), "refresh")
        ch = conn.channel()
        ch.queue_declare(f"bt-r-{RUN}", auto_delete=True)
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
            conn.update_secret(mint(f"{user}-other", scope=SCOPE), "refresh")
            conn.channel()
        assert e.value.reply_code == 530, e.value
    finally:
        if conn.is_open:
            conn.close()


def test_backend_setup_prints_the_brokers_lines_and_writes_the_public_key(gw, tmp_path):
    binary = str(conftest.gateway_binary())
    config = gw.workdir / "gateway.toml"
    public = tmp_path / "gateway-backend.pem"
    r = subprocess.run([binary, "backend-setup", "--config", str(config), "--public-key", str(public)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert lines == [
        "auth_backends.1 = rabbit_auth_backend_oauth2",
        "auth_oauth2.resource_server_id = rabbitmq",
        f"auth_oauth2.signing_keys.test-rsa = {public}",
    ], r.stdout
    # The key the reference node verifies the gateway's tokens with.
    squash = lambda s: "".join(s.split())  # noqa: E731
    assert squash(public.read_text()) == squash((FIXTURES / "rsa-public.pem").read_text())
    # A signing key that others may read is refused, here and at start.
    key = gw.workdir / "backend-token.pem"
    key.chmod(0o644)
    try:
        r = subprocess.run([binary, "backend-setup", "--config", str(config), "--public-key",
                            str(public)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "readable by others (mode 644)" in r.stderr, r.stderr
    finally:
        key.chmod(0o600)


def readyz(admin_port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def admin_port_of(config) -> int:
    return int(re.search(r'\[admin\]\naddress = "127\.0\.0\.1:(\d+)"', config.read_text()).group(1))


def test_check_config_and_readyz_find_the_broker_accepts_the_tokens(gw):
    config = gw.workdir / "gateway.toml"
    r = subprocess.run([str(conftest.gateway_binary()), "check-config", "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"backend tokens: 127.0.0.1:{REF_PORT} accepts them" in r.stdout, r.stdout
    assert readyz(admin_port_of(config)) == (200, "ready\n")


@contextlib.contextmanager
def management_stand_in(nodes: list):
    """A management API that answers `/api/nodes` with `nodes` (no node here lacks the
    plugin: scripts/setup.sh enables it on the default node for development mode)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(nodes).encode()
            self.send_response(200 if self.path == "/api/nodes" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_broker_refusing_the_tokens_is_explained_by_check_config_and_readyz(gw, tmp_path):
    """The default node does not know the key `test-rsa`: the gateway says so, and what to
    check, before any client fails; a node without the plugin is named (the management API
    says which, here a stand-in for a node that lacks it)."""
    text = (gw.workdir / "gateway.toml").read_text().replace(
        f'nodes = ["127.0.0.1:{REF_PORT}"]', f'nodes = ["{conftest.BACKEND_NODE}"]'
    ).replace('username = "unused"\npassword = "unused"\n',
              'username = "guest"\npassword = "guest"\n'
              'management_url = "http://127.0.0.1:15672"\n')
    admin = _free_port()
    text = re.sub(r'\[admin\]\naddress = "127\.0\.0\.1:\d+"', f'[admin]\naddress = "127.0.0.1:{admin}"', text)
    port = _free_port()
    text = re.sub(r'(?m)^address = "127\.0\.0\.1:\d+"\ntls_cert', f'address = "127.0.0.1:{port}"\ntls_cert', text)
    shutil.copy(gw.workdir / "server.pem", tmp_path / "server.pem")
    shutil.copy(gw.workdir / "server-key.pem", tmp_path / "server-key.pem")
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    binary = str(conftest.gateway_binary())
    r = subprocess.run([binary, "check-config", "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ("rabbitmq_auth_backend_oauth2 is enabled, so it is not in auth_backends, or it "
            'does not know signing key "test-rsa"') in r.stderr, r.stderr
    assert 'resource_server_id is not "rabbitmq"' in r.stderr, r.stderr
    with management_stand_in([{"name": "rabbit@without", "enabled_plugins": ["rabbitmq_management"]},
                              {"name": "rabbit@with",
                               "enabled_plugins": ["rabbitmq_auth_backend_oauth2"]}]) as url:
        other = tmp_path / "stand-in.toml"
        other.write_text(text.replace('management_url = "http://127.0.0.1:15672"',
                                      f'management_url = "{url}"'))
        r = subprocess.run([binary, "check-config", "--config", str(other)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the plugin rabbitmq_auth_backend_oauth2 is not enabled on rabbit@without " in r.stderr, r.stderr
    assert "rabbit@with," not in r.stderr and "rabbitmq-plugins enable" in r.stderr, r.stderr
    r = subprocess.run([binary, "check-config", "--offline", "--config", str(config)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([binary, "serve", "--config", str(config)], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                code, body = readyz(admin)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        assert code == 503, body
        assert "not ready: the broker refuses the gateway's backend tokens" in body, body
        assert 'does not know signing key "test-rsa"' in body, body
    finally:
        conftest.stop_process(proc)
        log.close()


def test_development_mode_uses_backend_tokens_when_the_broker_accepts_them(gw, tmp_path):
    """Development mode in front of a broker set up for its key (the reference node, with
    the fixture key as the development key): it asks at start, uses backend tokens, and the
    broker sees the role's user on the connection."""
    key = tmp_path / "backend.pem"
    shutil.copy(FIXTURES / "rsa-private.pem", key)
    key.chmod(0o600)
    with dev_mode(tmp_path, {"AMQP_IAM_GATEWAY_BACKEND": f"127.0.0.1:{REF_PORT}",
                             "AMQP_IAM_GATEWAY_BACKEND_TOKEN_KEY": str(key),
                             "AMQP_IAM_GATEWAY_BACKEND_TOKEN_KID": "test-rsa"}) as (banner, plain_port, token):
        assert "tokens: RabbitMQ checks every operation too" in banner, banner
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", plain_port, "/", pika.PlainCredentials("", token),
            connection_attempts=1))
        try:
            conn.channel().queue_declare("", exclusive=True)
            users = ref_ctl("list_connections", "user", "--silent").split()
            assert "arn:aws:iam::111122223333:role/RabbitMqAdminRole" in users, users
        finally:
            conn.close()


def test_a_rotated_key_reaches_the_broker_through_the_gateways_jwks(gw, tmp_path):
    """Key rotation with `auth_oauth2.jwks_url` pointing at the gateway's admin listener: the
    gateway signs with a new key the broker has never seen, and publishes it with the old
    one (`retired_keys`); the broker fetches the JWKS on the unknown kid and accepts the new
    tokens, and the old kid stays valid meanwhile."""
    new = tmp_path / "new.pem"
    new.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    new.chmod(0o600)
    old = gw.workdir / "backend-token.pem"
    kid = f"gw-rotated-{RUN}"
    admin, port = _free_port(), _free_port()
    text = (gw.workdir / "gateway.toml").read_text()
    text = text.replace(f'signing_key = "{old}"\nkid = "test-rsa"',
                        f'signing_key = "{new}"\nkid = "{kid}"')
    text = text.replace("\n[oauth2]\n", f'\n[backend.token.retired_keys]\ntest-rsa = "{old}"\n'
                        "\n[oauth2]\n", 1)
    text = re.sub(r'\[admin\]\naddress = "127\.0\.0\.1:\d+"', f'[admin]\naddress = "127.0.0.1:{admin}"', text)
    text = re.sub(r'(?m)^address = "127\.0\.0\.1:\d+"\ntls_cert', f'address = "127.0.0.1:{port}"\ntls_cert', text)
    assert f'kid = "{kid}"' in text and "retired_keys" in text, text
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(gw.workdir / name, tmp_path / name)
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    app = "rabbitmq_auth_backend_oauth2"
    url = f"http://127.0.0.1:{admin}/backend-jwks.json"
    # The broker's key config, kept to be put back; then the JWKS URL beside the static key.
    ref_ctl("eval", f"{{ok, KC}} = application:get_env({app}, key_config), "
                    "persistent_term:put(amqp_iam_gateway_test_key_config, KC), "
                    f'application:set_env({app}, key_config, [{{jwks_url, "{url}"}} | KC]), ok.')
    try:
        # Not run_gateway: its check-config would ask the broker before the JWKS is served.
        with serve_unchecked(tmp_path, config, port, gw.ca_file) as g:
            with urllib.request.urlopen(url, timeout=10) as r:
                jwks = json.load(r)
            assert sorted(k["kid"] for k in jwks["keys"]) == sorted([kid, "test-rsa"]), jwks
            assert all("d" not in k and "p" not in k for k in jwks["keys"]), "public keys only"
            user = f"bt-rotated-{RUN}"
            conn = g.connect(mint(user, scope=SCOPE))
            try:
                conn.channel().queue_declare(f"bt-rot-{RUN}", auto_delete=True)
                assert user in ref_ctl("list_connections", "user", "--silent").split()
            finally:
                conn.close()
        # The old key still verifies (it came with the JWKS): the first gateway's tokens.
        conn = gw.connect(mint(f"{user}-old", scope=SCOPE))
        conn.close()
    finally:
        ref_ctl("eval", f"application:set_env({app}, key_config, "
                        "persistent_term:get(amqp_iam_gateway_test_key_config)), ok.")


@contextlib.contextmanager
def serve_unchecked(workdir, config, port, ca_file):
    log_file = workdir / "serve.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([str(conftest.gateway_binary()), "serve", "--config", str(config)],
                                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log_file.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, log_file.read_text()
                time.sleep(0.1)
        yield conftest.Gateway("127.0.0.1", port, ca_file, log_file, proc)
    finally:
        conftest.stop_process(proc)


def default_state_dir() -> Path:
    """As the binary's `devmode::default_state_dir` (and scripts/setup.sh)."""
    if os.environ.get("AMQP_IAM_GATEWAY_STATE"):
        return Path(os.environ["AMQP_IAM_GATEWAY_STATE"])
    if os.environ.get("XDG_STATE_HOME"):
        return Path(os.environ["XDG_STATE_HOME"]) / "amqp-iam-gateway"
    return Path(os.environ["HOME"]) / ".local" / "state" / "amqp-iam-gateway"


def test_after_setup_development_mode_uses_backend_tokens_on_the_local_node(tmp_path):
    """scripts/setup.sh set the local node up for the development key of the default state
    directory: development mode with that key mints a token per client, RabbitMQ checks
    every operation too, and the node shows the role on the connection."""
    key = default_state_dir() / "backend-token.pem"
    assert key.exists(), f"{key}: run scripts/setup.sh"
    with dev_mode(tmp_path, {"AMQP_IAM_GATEWAY_BACKEND_TOKEN_KEY": str(key)}) as (banner, plain_port, token):
        assert "tokens: RabbitMQ checks every operation too" in banner, banner
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", plain_port, "/", pika.PlainCredentials("", token), connection_attempts=1))
        try:
            conn.channel().queue_declare("", exclusive=True)
            ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
            users = subprocess.run([ctl, "-q", "list_connections", "user"], capture_output=True,
                                   text=True, timeout=60).stdout.split()
            assert "arn:aws:iam::111122223333:role/RabbitMqAdminRole" in users, users
        finally:
            conn.close()
        # The management API listener, as the banner shows it: the README's (and Amazon MQ
        # tutorial's) `curl -u ":$TOKEN"`, with the development CA.
        url = re.search(r"management API\s+(https://\S+)", banner).group(1)
        ca = re.search(r"CA certificate\s+(\S+)", banner).group(1)
        assert f"curl --cacert {ca} -u \":$TOKEN\"" in banner, banner
        out = subprocess.run(["curl", "-s", "--cacert", ca, "-u", f":{token}",
                              url.replace("127.0.0.1", "localhost") + "/api/whoami"],
                             capture_output=True, text=True, timeout=30)
        assert json.loads(out.stdout) == {"name": "arn:aws:iam::111122223333:role/RabbitMqAdminRole",
                                          "tags": ["administrator"]}, out.stdout + out.stderr


def test_no_token_or_key_reaches_the_log_or_the_metrics(gw):
    """After every test above (logins, update-secret, probes, 310 scopes, a rotation): the
    gateway's log (debug level), its audit log and its metrics hold no JWT and no key. A JWT's header starts
    with `eyJ` (`{"` in base64url); keys are PEM blocks."""
    conn = gw.connect(mint(f"bt-last-{RUN}", scope=SCOPE))
    conn.close()
    log = gw.log()
    assert "token accepted" in log, "the log is the one of the connections above"
    metrics = conftest.metrics_text(admin_port_of(gw.workdir / "gateway.toml"))
    audit = (gw.workdir / "audit.log").read_text()
    assert f"bt-last-{RUN}" in audit, "the audit log has the connections above"
    for text, where in ((log, "log"), (metrics, "metrics"), (audit, "audit log")):
        assert "eyJ" not in text, f"a JWT in the {where}"
        assert "PRIVATE KEY" not in text and "BEGIN" not in text, f"a key in the {where}"


@contextlib.contextmanager
def dev_mode(tmp_path, extra_env: dict):
    """Development mode on free ports with a fresh state directory and `extra_env`, once its
    banner is out: yields the banner, the plain port and a token minted for it."""
    tls_port, plain_port, issuer_port = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "NO_COLOR": "1", "AMQP_IAM_GATEWAY_STATE": str(tmp_path / "state"),
           "AMQP_IAM_GATEWAY_MANAGEMENT_LISTEN": f"127.0.0.1:{_free_port()}",
           "AMQP_IAM_GATEWAY_LISTEN": f"127.0.0.1:{tls_port}",
           "AMQP_IAM_GATEWAY_PLAIN_LISTEN": f"127.0.0.1:{plain_port}",
           "AMQP_IAM_GATEWAY_ISSUER_LISTEN": f"127.0.0.1:{issuer_port}", **extra_env}
    binary = str(conftest.gateway_binary())
    out = tmp_path / "dev.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([binary], stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
    try:
        deadline = time.monotonic() + 20
        while "Mint a token" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        r = subprocess.run([binary, "token"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        yield out.read_text(), plain_port, r.stdout.strip()
    finally:
        conftest.stop_process(proc)
