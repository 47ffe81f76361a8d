"""The container image and the compose stack, for real: Docker Engine and docker-compose from
Debian, base images made locally (no registry is reachable here).

- The base image is Debian bookworm from `debootstrap --variant=minbase` (the mirror apt
  uses), imported with `docker import`; made once per machine, about 25 s.
- The gateway image is the Dockerfile's `prebuilt` target on that base, with the binary the
  suite tests (no Rust toolchain image can be pulled); the `runtime` target differs only in
  where the binary comes from. RabbitMQ's image is tests/containers/rabbitmq.Dockerfile
  (Debian's rabbitmq-server on the same base).
- dockerd runs with `--iptables=false --bridge=none` (started here when none answers);
  builds use the host's network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika
import pytest

from conftest import REPO_ROOT, _free_port, gateway_binary

# Debian's client: it builds with BuildKit without the buildx plugin.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
COMPOSE = shutil.which("docker-compose") or "docker-compose"
BASE = "amqp-iam-gateway/debian:bookworm"
GATEWAY_IMAGE = "amqp-iam-gateway:test"
RABBITMQ_IMAGE = "amqp-iam-gateway/rabbitmq:test"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
ENV = {**os.environ, "DOCKER_BUILDKIT": "1", "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
RUN = uuid.uuid4().hex[:6]


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert r.returncode == 0, f"docker {' '.join(args)}:\n{r.stdout}{r.stderr}"
    return r


def engine_up() -> bool:
    return subprocess.run([DOCKER, "info"], capture_output=True, timeout=30, env=ENV).returncode == 0


@pytest.fixture(scope="module")
def images():
    if not shutil.which("dockerd") or not Path(DOCKER).exists():
        pytest.fail("Docker is missing: run scripts/setup.sh (docker.io, docker-compose, debootstrap)")
    if not engine_up():
        log = open(REPO_ROOT / "target" / "dockerd.log", "ab")
        subprocess.Popen(["dockerd", "--storage-driver", "overlay2", "--iptables=false",
                          "--bridge=none"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while not engine_up():
            assert time.monotonic() < deadline, "dockerd did not start (target/dockerd.log)"
            time.sleep(0.5)
    if docker("image", "inspect", BASE, check=False).returncode != 0:
        with tempfile.TemporaryDirectory() as root:
            r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", root, MIRROR],
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            imp = subprocess.run([DOCKER, "import", "-", BASE], stdin=tar.stdout,
                                 capture_output=True, text=True, timeout=300, env=ENV)
            tar.wait()
            assert imp.returncode == 0, imp.stderr
    staged = REPO_ROOT / "target" / "docker" / "amqp-iam-gateway"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(gateway_binary(), staged)
    docker("build", "--network", "host", "--target", "prebuilt", "--build-arg",
           f"RUNTIME_IMAGE={BASE}", "-t", GATEWAY_IMAGE, str(REPO_ROOT))
    docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-t",
           RABBITMQ_IMAGE, "-f", str(REPO_ROOT / "tests" / "containers" / "rabbitmq.Dockerfile"),
           str(REPO_ROOT / "tests" / "containers"))
    # The image: non-root, the state volume, development mode without arguments.
    info = docker("image", "inspect", "-f", "{{.Config.User}} {{json .Config.Volumes}} "
                  "{{json .Config.Entrypoint}} {{json .Config.Cmd}}", GATEWAY_IMAGE).stdout
    assert info.startswith("10001:10001 ") and "/var/lib/amqp-iam-gateway" in info, info
    assert '["amqp-iam-gateway"] null' in info, info


class Stack:
    def __init__(self, tmp: Path):
        self.project = f"aig{RUN}"
        self.port, self.issuer_port, self.mgmt_port = _free_port(), _free_port(), _free_port()
        self.env = {**ENV, "RABBITMQ_IMAGE": RABBITMQ_IMAGE, "GATEWAY_IMAGE": GATEWAY_IMAGE,
                    "GATEWAY_AMQPS_PORT": str(self.port),
                    "GATEWAY_ISSUER_PORT": str(self.issuer_port),
                    "RABBITMQ_MANAGEMENT_PORT": str(self.mgmt_port)}
        self.tmp = tmp

    def compose(self, *args: str, timeout: float = 180, check: bool = True):
        r = subprocess.run([COMPOSE, "-f", str(REPO_ROOT / "docker-compose.yml"), "-p",
                            self.project, *args], capture_output=True, text=True,
                           timeout=timeout, env=self.env)
        if check:
            assert r.returncode == 0, f"docker-compose {' '.join(args)}:\n{r.stdout}{r.stderr}"
        return r

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def wait_for_banner(self, since: int = 0, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            logs = self.compose("logs", "--no-color", "gateway").stdout
            if logs.count("Mint a token") > since:
                return logs
            assert time.monotonic() < deadline, logs[-3000:]
            time.sleep(0.5)

    def token(self) -> str:
        r = self.compose("exec", "-T", "gateway", "amqp-iam-gateway", "token")
        return r.stdout.strip()

    def ca(self) -> bytes:
        out = self.tmp / f"ca-{time.monotonic_ns()}.pem"
        docker("cp", f"{self.container('gateway')}:/var/lib/amqp-iam-gateway/tls/ca.pem", str(out))
        return out.read_bytes()


def connect(port: int, ca: bytes, token: str, host: str = "127.0.0.1") -> pika.BlockingConnection:
    ctx = ssl.create_default_context(cadata=ca.decode())
    return pika.BlockingConnection(pika.ConnectionParameters(
        host, port, "/", pika.PlainCredentials("", token),
        ssl_options=pika.SSLOptions(ctx, "localhost"), connection_attempts=3, retry_delay=1))


def round_trip(conn: pika.BlockingConnection, name: str) -> None:
    ch = conn.channel()
    ch.queue_declare(name, exclusive=True)
    ch.basic_publish("", name, b"through the container")
    assert ch.basic_get(name, auto_ack=True)[2] == b"through the container"


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("compose"))
    started = time.monotonic()
    try:
        s.compose("up", "-d", "--no-build", timeout=300)
        s.wait_for_banner()
        s.up_seconds = time.monotonic() - started
        yield s
    finally:
        logs = s.compose("logs", "--no-color", check=False).stdout
        (REPO_ROOT / "target" / "compose-test.log").write_text(logs)
        s.compose("down", "-v", "--remove-orphans", timeout=180, check=False)


def test_the_compose_stack_serves_a_host_client_and_keeps_its_keys(stack):
    token = stack.token()
    assert token.count(".") == 2, token
    ca = stack.ca()
    with contextlib.closing(connect(stack.port, ca, token)) as conn:
        round_trip(conn, f"compose-{RUN}")
    # SIGHUP reloads the generated config.
    docker("kill", "-s", "HUP", stack.container("gateway"))
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in stack.compose("logs", "--no-color", "gateway").stdout:
        assert time.monotonic() < deadline, "no reload after SIGHUP"
        time.sleep(0.3)
    # A restart (SIGTERM: drained at once, no client) keeps the CA, the certificate and the
    # STS keys: the old token and the old CA still work.
    started = time.monotonic()
    stack.compose("restart", "-t", "40", "gateway")
    assert time.monotonic() - started < 15, "the gateway did not stop promptly on SIGTERM"
    logs = stack.wait_for_banner(since=1)
    assert "shutting down gracefully" in logs, logs[-2000:]
    assert stack.ca() == ca
    with contextlib.closing(connect(stack.port, ca, token)) as conn:
        round_trip(conn, f"compose-after-{RUN}")


def test_serve_with_a_config_file_drains_on_sigterm(stack, tmp_path):
    """`serve --config` in the same image: the development config from the volume, on other
    ports, sharing the development container's network (its issuer is on 127.0.0.1)."""
    gw = stack.container("gateway")
    cfg = tmp_path / "gateway.toml"
    docker("cp", f"{gw}:/var/lib/amqp-iam-gateway/gateway.toml", str(cfg))
    text = cfg.read_text().replace('address = "0.0.0.0:5671"', 'address = "0.0.0.0:5681"')
    text += '\n[admin]\naddress = "127.0.0.1:15694"\n' if "[admin]" not in text else ""
    text = text.replace("[listener]", "[listener]\ndrain_period_ms = 1500\ndrain_deadline_ms = 10000", 1)
    cfg.write_text(text)
    cfg.chmod(0o644)
    name = f"aig-serve-{RUN}"
    volume = f"{stack.project}_gateway-state"
    docker("run", "-d", "--name", name, "--network", f"container:{gw}",
           "-v", f"{volume}:/var/lib/amqp-iam-gateway",
           "-v", f"{cfg}:/etc/amqp-iam-gateway/gateway.toml:ro",
           GATEWAY_IMAGE, "serve", "--config", "/etc/amqp-iam-gateway/gateway.toml")
    try:
        ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                    gw).stdout.strip()
        assert ip, "no address for the gateway container"
        token, ca = stack.token(), stack.ca()
        conn = connect(5681, ca, token, host=ip)
        round_trip(conn, f"serve-{RUN}")
        docker("kill", "-s", "HUP", name)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in docker("logs", name).stderr:
            assert time.monotonic() < deadline, docker("logs", name).stderr[-2000:]
            time.sleep(0.3)
        # SIGTERM with a client connected: it keeps working for the drain period, then gets
        # RabbitMQ's 320, and the process exits 0.
        sent = time.monotonic()
        docker("kill", "-s", "TERM", name)
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            while time.monotonic() - sent < 15:
                conn.process_data_events(time_limit=0.2)
        assert closed.value.reply_code == 320
        assert time.monotonic() - sent >= 1.4
        code = docker("wait", name, timeout=30).stdout.strip()
        assert code == "0", docker("logs", name).stderr[-2000:]
    finally:
        docker("rm", "-f", name, check=False)
