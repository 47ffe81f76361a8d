"""boto3 against the embedded STS emulator (`amqp-iam-gateway sts-emulator`), then pika
through a gateway that finds the emulator's keys by OIDC discovery.

The emulator is driven exactly as an application drives AWS: `boto3.client("sts",
endpoint_url=..., region_name="us-east-1", ...)` and `get_web_identity_token(...)`, signed
with SigV4 by botocore. Tokens are verified independently with PyJWT and the JWKS named by
the discovery document. Bad requests go through a client with botocore's own parameter
validation switched off, so the emulator (not botocore) is what refuses them.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config
import jwt
import pika
import pika.exceptions
import pytest
from botocore.exceptions import ClientError

from conftest import (
    ACCOUNT,
    ADMIN_ROLE,
    AUDIENCE,
    STS_NS,
    START_TIMEOUT_S,
    _free_port,
    _write_config,
    _write_tls,
    gateway_binary,
    run_gateway,
    stop_process,
    unique,
)

REGION = "us-east-1"
ADMIN_KEY = "AKIAADMINEMULATOR001"
TEAM_KEY = "AKIATEAMEMULATOR0001"
SECRET = "emulator-secret/0123456789abcdefghijklmnopqr"
TEAM_ROLE = f"arn:aws:iam::{ACCOUNT}:role/TeamAWorker"
ORG = "o-abc1234567"
OU_PATH = f"{ORG}/r-ab12/ou-ab12-11111111/"

PRINCIPALS = f"""
[[principal]]
access_key_id = "{ADMIN_KEY}"
secret_access_key = "{SECRET}"
role_arn = "{ADMIN_ROLE}"
account = "{ACCOUNT}"
org_id = "{ORG}"
ou_path = ["{OU_PATH}"]
principal_tags = {{ environment = "test" }}

[[principal]]
access_key_id = "{TEAM_KEY}"
secret_access_key = "{SECRET}"
role_arn = "{TEAM_ROLE}"
account = "{ACCOUNT}"
"""


@dataclass
class Emulator:
    url: str
    proc: subprocess.Popen
    log_file: Path
    state_dir: Path

    def client(self, key: str = ADMIN_KEY, secret: str = SECRET, validate: bool = True):
        return boto3.client(
            "sts",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=botocore.config.Config(
                parameter_validation=validate, retries={"max_attempts": 1}
            ),
        )

    def issued(self) -> int:
        """How many tokens the emulator has logged as issued."""
        return self.log_file.read_text(errors="replace").count("issued web identity token")

    def get_json(self, url: str) -> dict:
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
            return json.load(r)


def start_emulator(workdir: Path, state_dir: Path, port: int = 0) -> Emulator:
    """Runs `sts-emulator` (on a free port by default); its first stdout line is the
    issuer URL."""
    principals = workdir / "principals.toml"
    principals.write_text(PRINCIPALS)
    log_file = workdir / f"sts.{time.monotonic_ns()}.stderr.log"
    log = open(log_file, "wb")
    proc = subprocess.Popen(
        [
            str(gateway_binary()), "sts-emulator", "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(state_dir), "--principals", str(principals),
            "--region", REGION,
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
        env={**os.environ, "NO_COLOR": "1"},
    )
    log.close()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=START_TIMEOUT_S):
        stop_process(proc)
        pytest.fail(f"sts-emulator printed no URL:\n{log_file.read_text()}", pytrace=False)
    url = proc.stdout.readline().decode().strip()
    if not url.startswith("http://127.0.0.1:"):
        stop_process(proc)
        pytest.fail(f"sts-emulator printed {url!r}:\n{log_file.read_text()}", pytrace=False)
    return Emulator(url, proc, log_file, state_dir)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Emulator:
    workdir = tmp_path_factory.mktemp("sts")
    em = start_emulator(workdir, workdir / "state")
    yield em
    stop_process(em.proc)


def verify_with_discovery(em: Emulator, token: str) -> dict:
    """PyJWT, keys from the JWKS the discovery document points to, iss and aud checked."""
    discovery = em.get_json(f"{em.url}/.well-known/openid-configuration")
    jwks = jwt.PyJWKSet.from_dict(em.get_json(discovery["jwks_uri"]))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    return jwt.decode(
        token,
        key.key,
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience=AUDIENCE,
        issuer=discovery["issuer"],
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )


def test_botocore_knows_get_web_identity_token(emulator):
    sts = emulator.client()
    assert hasattr(sts, "get_web_identity_token")
    op = sts.meta.service_model.operation_model("GetWebIdentityToken")
    assert {"Audience", "SigningAlgorithm", "DurationSeconds", "Tags"} <= set(op.input_shape.members)


def test_es384_token_verifies_with_pyjwt_and_has_the_aws_shape(emulator):
    before = time.time()
    resp = emulator.client().get_web_identity_token(
        Audience=[AUDIENCE], SigningAlgorithm="ES384", Tags=[{"Key": "scope", "Value": "team-a"}]
    )
    token = resp["WebIdentityToken"]
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert resp["ResponseMetadata"]["RequestId"]
    assert jwt.get_unverified_header(token) == {"kid": "EC384_0", "typ": "JWT", "alg": "ES384"}
    claims = verify_with_discovery(emulator, token)
    assert claims["iss"] == emulator.url
    assert claims["aud"] == AUDIENCE, "a string for one audience"
    assert claims["sub"] == ADMIN_ROLE
    assert claims["exp"] - claims["iat"] == 300, "DurationSeconds defaults to 300"
    assert before - 5 <= claims["iat"] <= time.time() + 5
    assert "nbf" not in claims
    assert len(claims["jti"]) == 36
    assert resp["Expiration"].timestamp() == claims["exp"]
    ns = claims[STS_NS]
    assert ns["aws_account"] == ACCOUNT
    assert ns["source_region"] == REGION
    assert ns["principal_id"] == ADMIN_ROLE
    assert ns["org_id"] == ORG
    assert ns["ou_path"] == [OU_PATH], "an array, as real tokens have it"
    assert ns["principal_tags"] == {"environment": "test"}
    assert ns["request_tags"] == {"scope": "team-a"}
    assert ns["original_session_exp"].endswith("Z")


def test_rs256_token_with_two_audiences_and_a_duration(emulator):
    resp = emulator.client(TEAM_KEY).get_web_identity_token(
        Audience=[AUDIENCE, "https://api.example.com"], SigningAlgorithm="RS256",
        DurationSeconds=3600,
    )
    token = resp["WebIdentityToken"]
    assert jwt.get_unverified_header(token) == {"kid": "RSA_0", "typ": "JWT", "alg": "RS256"}
    claims = verify_with_discovery(emulator, token)
    assert claims["aud"] == [AUDIENCE, "https://api.example.com"]
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["sub"] == TEAM_ROLE
    assert "request_tags" not in claims[STS_NS]


def test_discovery_documents_match_the_real_issuer(emulator):
    d = emulator.get_json(f"{emulator.url}/.well-known/openid-configuration")
    assert d == {
        "issuer": emulator.url,
        "jwks_uri": f"{emulator.url}/.well-known/jwks.json",
        "id_token_signing_alg_values_supported": ["RS256", "ES384"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "jti", STS_NS],
        "subject_types_supported": ["public"],
    }
    keys = {k["kid"]: k for k in emulator.get_json(d["jwks_uri"])["keys"]}
    assert set(keys) == {"RSA_0", "EC384_0"}
    assert "alg" not in keys["RSA_0"] and keys["RSA_0"]["kty"] == "RSA"
    assert keys["EC384_0"]["alg"] == "ES384" and keys["EC384_0"]["crv"] == "P-384"
    assert {k["use"] for k in keys.values()} == {"sig"}


def _tags(n: int) -> list[dict]:
    return [{"Key": f"k{i}", "Value": f"v{i}"} for i in range(n)]


BAD_REQUESTS = {
    "missing audience": dict(SigningAlgorithm="ES384"),
    "empty audience list": dict(Audience=[], SigningAlgorithm="ES384"),
    "11 audiences": dict(Audience=[f"a{i}" for i in range(11)], SigningAlgorithm="ES384"),
    "duration 59": dict(Audience=[AUDIENCE], SigningAlgorithm="ES384", DurationSeconds=59),
    "duration 3601": dict(Audience=[AUDIENCE], SigningAlgorithm="ES384", DurationSeconds=3601),
    "bad algorithm": dict(Audience=[AUDIENCE], SigningAlgorithm="HS256"),
    "bad tag value": dict(
        Audience=[AUDIENCE], SigningAlgorithm="ES384", Tags=[{"Key": "scope", "Value": "read:*/*"}]
    ),
    "51 tags": dict(Audience=[AUDIENCE], SigningAlgorithm="ES384", Tags=_tags(51)),
}


@pytest.mark.parametrize("kwargs", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_a_validation_error_and_no_token(emulator, kwargs):
    before = emulator.issued()
    with pytest.raises(ClientError) as e:
        emulator.client(validate=False).get_web_identity_token(**kwargs)
    err = e.value.response
    assert err["Error"]["Code"] == "ValidationError", err
    assert err["Error"]["Type"] == "Sender"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "WebIdentityToken" not in err
    assert emulator.issued() == before, "nothing issued"


@pytest.mark.parametrize(
    "key,secret,code",
    [
        (ADMIN_KEY, "not-the-secret", "SignatureDoesNotMatch"),
        ("AKIAUNKNOWN000000000", SECRET, "InvalidClientTokenId"),
    ],
    ids=["wrong secret", "unknown access key"],
)
def test_bad_credentials_get_a_signature_error_and_no_token(emulator, key, secret, code):
    before = emulator.issued()
    with pytest.raises(ClientError) as e:
        emulator.client(key, secret).get_web_identity_token(
            Audience=[AUDIENCE], SigningAlgorithm="ES384"
        )
    assert e.value.response["Error"]["Code"] == code
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert emulator.issued() == before


def test_tokens_survive_an_emulator_restart(tmp_path):
    state = tmp_path / "state"
    port = _free_port()  # the same issuer URL both times
    first = start_emulator(tmp_path, state, port)
    try:
        token = first.client().get_web_identity_token(
            Audience=[AUDIENCE], SigningAlgorithm="ES384"
        )["WebIdentityToken"]
    finally:
        stop_process(first.proc)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (state / "sts-keys").iterdir()}
    assert modes == {"RSA_0.pem": 0o600, "EC384_0.pem": 0o600}
    second = start_emulator(tmp_path, state, port)
    try:
        claims = verify_with_discovery(second, token)
        assert claims["sub"] == ADMIN_ROLE
    finally:
        stop_process(second.proc)


# --------------------------------------------------------------------------------------
# through the gateway


@pytest.fixture(scope="module")
def sts_gateway(emulator, tmp_path_factory):
    """A gateway whose only key source is the emulator's OIDC discovery document."""
    workdir = tmp_path_factory.mktemp("sts-gateway")
    ca_file = _write_tls(workdir)
    port = _free_port()
    config = _write_config(workdir, port, _free_port(), issuer=emulator.url, static_key=False)
    with run_gateway(workdir, config, port, ca_file) as gw:
        yield gw


def _round_trip(conn: pika.BlockingConnection, queue: str) -> None:
    """Declare, publish through an exchange of our own, get back."""
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue, exclusive=True)
    exchange = f"{queue}.x"
    ch.exchange_declare(exchange, "fanout", auto_delete=True)
    ch.queue_bind(queue, exchange)
    ch.basic_publish(exchange, "", b"via the STS emulator")
    for _ in range(50):
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            assert body == b"via the STS emulator"
            break
        time.sleep(0.02)
    else:
        pytest.fail("message did not come back")
    ch.close()


@pytest.mark.parametrize("alg", ["ES384", "RS256"])
def test_pika_with_a_role_alias_token(emulator, sts_gateway, alg):
    token = emulator.client().get_web_identity_token(
        Audience=[AUDIENCE], SigningAlgorithm=alg
    )["WebIdentityToken"]
    conn = sts_gateway.connect(token)
    try:
        _round_trip(conn, unique("sts-admin"))
    finally:
        conn.close()


@pytest.mark.parametrize("alg", ["ES384", "RS256"])
def test_pika_with_a_request_tag_through_the_nested_claim(emulator, sts_gateway, alg):
    token = emulator.client(TEAM_KEY).get_web_identity_token(
        Audience=[AUDIENCE], SigningAlgorithm=alg, Tags=[{"Key": "scope", "Value": "team-a"}]
    )["WebIdentityToken"]
    conn = sts_gateway.connect(token)
    try:
        _round_trip(conn, unique("team-a.sts"))
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare(unique("other"))
        assert e.value.reply_code == 403
    finally:
        conn.close()
    # Without the tag the same role has no access to the vhost.
    bare = emulator.client(TEAM_KEY).get_web_identity_token(
        Audience=[AUDIENCE], SigningAlgorithm=alg
    )["WebIdentityToken"]
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as e:
        sts_gateway.connect(bare).close()
    # pika keeps only the repr of the broker's close (see test_pika.py).
    text = str(e.value.args[0])
    assert "(530)" in text and f"access to vhost '/' refused for user '{TEAM_ROLE}'" in text, text
