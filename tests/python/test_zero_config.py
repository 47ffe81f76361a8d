"""`amqp-iam-gateway` with no arguments: the README's first run, end to end.

The binary starts the embedded STS issuer and the gateway with a self-signed CA on first
start (in a fresh state directory), in front of RabbitMQ on 127.0.0.1:5672; `token` mints
a token; pika connects with an empty username and the token, trusting the printed CA.
Then `import-rabbitmq-conf` turns the Amazon MQ tutorial's rabbitmq.conf into a config
that `check-config` accepts and that authorises the same token the same way.
"""
import os
import socket
import subprocess
import time
from pathlib import Path

import pika
import pytest

from conftest import _free_port, gateway_binary, run_gateway, stop_process, unique

TLS_PORT = 5671
ISSUER = "http://127.0.0.1:8479"


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}:\n{log.read_text()}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return time.monotonic() - start
        except OSError:
            if time.monotonic() - start > timeout:
                pytest.fail(f"nothing on port {port} after {timeout} s:\n{log.read_text()}", pytrace=False)
            time.sleep(0.1)


@pytest.fixture(scope="module")
def dev_gateway(tmp_path_factory):
    for port in (TLS_PORT, 5674, 8479):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is busy: stop whatever runs there (a dev gateway?)", pytrace=False)
    state = tmp_path_factory.mktemp("state")
    env = {**os.environ, "AMQP_IAM_GATEWAY_STATE": str(state), "NO_COLOR": "1"}
    out = state.parent / "dev-mode.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([str(gateway_binary())], stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
        try:
            took = _wait_port(TLS_PORT, proc, out)
            yield state, env, out, took
        finally:
            stop_process(proc)


def _token(env, *args) -> str:
    r = subprocess.run([str(gateway_binary()), "token", *args], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _connect(state: Path, token: str, port: int = TLS_PORT) -> pika.BlockingConnection:
    import ssl

    ctx = ssl.create_default_context(cafile=str(state / "tls" / "ca.pem"))
    params = pika.ConnectionParameters(
        "127.0.0.1", port, "/", pika.PlainCredentials("", token),
        ssl_options=pika.SSLOptions(ctx, "localhost"), connection_attempts=1,
    )
    return pika.BlockingConnection(params)


def test_first_run_accepts_a_client_within_seconds(dev_gateway):
    state, env, out, took = dev_gateway
    assert took < 10, f"listening after {took:.1f} s"
    banner = out.read_text()
    assert str(state / "tls" / "ca.pem") in banner, "the CA path is printed"
    assert "amqp-iam-gateway token" in banner, "how to mint a token is printed"
    token = _token(env, "--tag", "scope=anything")
    conn = _connect(state, token)
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", q, b"first run")
    method, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"first run"
    conn.close()


def test_a_broker_that_does_not_know_the_key_is_named_and_the_gateway_guards_alone(dev_gateway):
    """A fresh state directory has a backend key the local node was not given (setup.sh gives
    it the one of the default state directory): development mode asks the node at start,
    keeps the service user, and says that the gateway is the only guard and why."""
    state, _, out, _ = dev_gateway
    banner = out.read_text()
    assert 'service user "guest": the gateway is the only guard' in banner, banner
    assert "backend tokens not in use" in banner, banner
    assert 'does not know signing key "amqp-iam-gateway-dev"' in banner, banner
    assert (state / "backend-token.pub.pem").exists(), "the public key for the broker is written"
    assert oct((state / "backend-token.pem").stat().st_mode & 0o777) == "0o600"
    assert 'auth = "token"' in (state / "gateway-tokens.toml").read_text()
    assert 'auth = "token"' not in (state / "gateway.toml").read_text()


def test_read_only_role_and_rs256(dev_gateway):
    state, env, _, _ = dev_gateway
    token = _token(env, "--role-arn", "arn:aws:iam::111122223333:role/RabbitMqReadOnlyRole", "--alg", "RS256")
    conn = _connect(state, token)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare(unique("ro"))
    assert e.value.reply_code == 403
    conn.close()


def test_imported_tutorial_conf_authorises_the_same_way(dev_gateway, tmp_path):
    """The Amazon MQ IAM tutorial's rabbitmq.conf, pointed at the dev issuer's JWKS."""
    state, env, _, _ = dev_gateway
    conf = tmp_path / "rabbitmq.conf"
    conf.write_text(
        "auth_backends.1 = oauth2\n"
        "auth_backends.2 = internal\n\n"
        f"auth_oauth2.jwks_url = {ISSUER}/.well-known/jwks.json\n"
        "auth_oauth2.resource_server_id = rabbitmq\n"
        "auth_oauth2.scope_prefix = rabbitmq/\n\n"
        "auth_oauth2.additional_scopes_key = sub\n"
        "auth_oauth2.scope_aliases.1.alias = arn:aws:iam::111122223333:role/RabbitMqAdminRole\n"
        "auth_oauth2.scope_aliases.1.scope = rabbitmq/tag:administrator rabbitmq/read:*/* "
        "rabbitmq/write:*/* rabbitmq/configure:*/*\n"
        "auth_oauth2.https.hostname_verification = wildcard\n\n"
        "management.oauth_enabled = true\n"
    )
    binary = str(gateway_binary())
    r = subprocess.run([binary, "import-rabbitmq-conf", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for key in ("auth_oauth2.https.hostname_verification", "management.oauth_enabled"):
        assert key in r.stderr, f"{key} is reported, not dropped silently"
    # The chain carries over: tokens first, then the broker's internal users.
    assert "auth_backends" not in r.stderr, r.stderr
    assert '[auth]\nbackends = ["oauth2", "internal"]' in r.stdout, r.stdout
    # The import's [listener]/[backend] are templates: point them at this machine.
    toml = r.stdout
    port = _free_port()
    toml = toml.replace('address = "0.0.0.0:5671"', f'address = "127.0.0.1:{port}"', 1)
    toml += f'\n[admin]\naddress = "127.0.0.1:{_free_port()}"\n'
    toml = toml.replace('tls_cert = "certs/server.pem"', f'tls_cert = "{state}/tls/server.pem"')
    toml = toml.replace('tls_key = "certs/server-key.pem"', f'tls_key = "{state}/tls/server-key.pem"')
    toml = toml.replace('username = "iam-gateway"', 'username = "guest"').replace('"change-me"', '"guest"')
    cfg = tmp_path / "imported.toml"
    cfg.write_text(toml)
    check = subprocess.run([binary, "check-config", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    token = _token(env)
    explained = {}
    for name, path in (("dev", state / "gateway.toml"), ("imported", cfg)):
        e = subprocess.run([binary, "explain", "--config", str(path), "--json", token], capture_output=True, text=True, timeout=30)
        assert e.returncode == 0, e.stdout + e.stderr
        import json

        explained[name] = json.loads(e.stdout)
    for field in ("accepted", "username", "tags", "scopes"):
        assert explained["dev"][field] == explained["imported"][field], field
    assert explained["imported"]["scopes"] == ["configure:*/*", "read:*/*", "tag:administrator", "write:*/*"]

    # And a gateway running the imported config lets the token in with the same rights.
    with run_gateway(tmp_path, cfg, port, state / "tls" / "ca.pem"):
        conn = _connect(state, token, port)
        ch = conn.channel()
        q = ch.queue_declare(unique("imported"), exclusive=True).method.queue
        ch.basic_publish("", q, b"imported")
        assert ch.basic_get(q, auto_ack=True)[2] == b"imported"
        conn.close()


def test_rotation_on_demand_keeps_old_tokens_and_serves_new_ones(dev_gateway):
    import json
    import urllib.request

    state, env, _, _ = dev_gateway
    old = _token(env)
    r = subprocess.run([str(gateway_binary()), "rotate-keys"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    jwks = json.load(urllib.request.urlopen(f"{ISSUER}/.well-known/jwks.json", timeout=5))
    kids = {k["kid"] for k in jwks["keys"]}
    assert set(answer["signing_kids"]) <= kids and len(kids) == 4, kids
    new = _token(env)
    import base64

    header = json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))
    assert header["kid"] in answer["signing_kids"], "new tokens use the new key"
    # The gateway refetches the JWKS for the unknown kid (at most once a second).
    time.sleep(1.1)
    for token in (old, new):
        conn = _connect(state, token)
        assert conn.is_open
        conn.close()


def test_aws_cli_works_unchanged_with_an_endpoint_override(dev_gateway):
    """`aws sts get-web-identity-token --endpoint-url ...` (AWS CLI v1, installed by
    scripts/setup.sh into .venv-awscli), then the token opens a connection."""
    import json
    from conftest import REPO_ROOT

    state, env, _, _ = dev_gateway
    aws = REPO_ROOT / ".venv-awscli" / "bin" / "aws"
    assert aws.exists(), "run scripts/setup.sh (it installs the AWS CLI)"
    cli_env = {**env, "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
               "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
               "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    args = [str(aws), "sts", "get-web-identity-token", "--audience", "rabbitmq",
            "--signing-algorithm", "ES384", "--tags", "Key=scope,Value=team-a",
            "--endpoint-url", ISSUER, "--region", "us-east-1", "--output", "json"]
    r = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["WebIdentityToken"]
    time.sleep(1.1)  # a previous test may have rotated the keys: let the refetch limit pass
    conn = _connect(state, token)
    assert conn.is_open
    conn.close()
    bad = subprocess.run(args, env={**cli_env, "AWS_SECRET_ACCESS_KEY": "wrong"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "SignatureDoesNotMatch" in bad.stderr


def test_token_follows_the_issuer_address_from_the_environment(tmp_path):
    """Regression: with AMQP_IAM_GATEWAY_ISSUER_LISTEN moved, `token` still put the default
    127.0.0.1:8479 in `iss`, which the development gateway then refused."""
    import base64
    import json

    port = _free_port()
    env = {**os.environ, "AMQP_IAM_GATEWAY_STATE": str(tmp_path), "AMQP_IAM_GATEWAY_ISSUER_LISTEN": f"127.0.0.1:{port}"}
    payload = _token(env).split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["iss"] == f"http://127.0.0.1:{port}"
    bad = subprocess.run(
        [str(gateway_binary()), "token"], env={**env, "AMQP_IAM_GATEWAY_ISSUER_LISTEN": "nonsense"},
        capture_output=True, text=True, timeout=30,
    )
    assert bad.returncode != 0 and "AMQP_IAM_GATEWAY_ISSUER_LISTEN" in bad.stderr

