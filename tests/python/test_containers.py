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
- The scale-out stack (docker-compose.scale-out.yml): HAProxy from Debian's package on the
  same base (tests/containers/haproxy.Dockerfile) with send-proxy-v2 in front of two gateways
  in front of a two-node RabbitMQ cluster; load spread, failover under confirms, a stopped
  node, the PROXY addresses in the audit logs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import threading
import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika
import pytest

import conftest
from conftest import REPO_ROOT, _free_port, _write_tls, gateway_binary, mint

# Debian's client: it builds with BuildKit without the buildx plugin.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
COMPOSE = shutil.which("docker-compose") or "docker-compose"
BASE = "amqp-iam-gateway/debian:bookworm"
GATEWAY_IMAGE = "amqp-iam-gateway:test"
# The lean production gateway (--no-default-features, scripts/build-lean.sh): the scale-out
# stack serves with it.
LEAN_IMAGE = "amqp-iam-gateway:lean-test"
LEAN_BIN = Path(os.environ.get("GATEWAY_LEAN_BIN", REPO_ROOT / "target" / "lean" / "amqp-iam-gateway"))
RABBITMQ_IMAGE = "amqp-iam-gateway/rabbitmq:test"
HAPROXY_IMAGE = "amqp-iam-gateway/haproxy:test"
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
    if not LEAN_BIN.is_file():
        pytest.fail(f"no lean gateway at {LEAN_BIN}: run scripts/build-lean.sh")
    shutil.copy2(LEAN_BIN, staged.with_name("amqp-iam-gateway-lean"))
    # The three images at once: the two apt installs wait on the network more than the CPU.
    local = REPO_ROOT / "tests" / "containers"
    builds = [
        ("build", "--network", "host", "--target", "prebuilt", "--build-arg",
         f"RUNTIME_IMAGE={BASE}", "-t", GATEWAY_IMAGE, str(REPO_ROOT)),
        ("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-t",
         RABBITMQ_IMAGE, "-f", str(local / "rabbitmq.Dockerfile"), str(local)),
        ("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-t",
         HAPROXY_IMAGE, "-f", str(local / "haproxy.Dockerfile"), str(local)),
        ("build", "--network", "host", "--target", "prebuilt", "--build-arg",
         f"RUNTIME_IMAGE={BASE}", "--build-arg", "BINARY=target/docker/amqp-iam-gateway-lean",
         "-t", LEAN_IMAGE, str(REPO_ROOT)),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(builds)) as pool:
        for done in [pool.submit(docker, *b) for b in builds]:
            done.result()
    # The image: non-root, the state volume, development mode without arguments.
    info = docker("image", "inspect", "-f", "{{.Config.User}} {{json .Config.Volumes}} "
                  "{{json .Config.Entrypoint}} {{json .Config.Cmd}}", GATEWAY_IMAGE).stdout
    assert info.startswith("10001:10001 ") and "/var/lib/amqp-iam-gateway" in info, info
    assert '["amqp-iam-gateway"] null' in info, info


class Stack:
    """A compose project of `file` with the test images and free ports."""

    file = REPO_ROOT / "docker-compose.yml"

    def __init__(self, tmp: Path):
        self.project = f"aig{RUN}"
        self.port, self.issuer_port, self.mgmt_port = _free_port(), _free_port(), _free_port()
        self.env = {**ENV, "RABBITMQ_IMAGE": RABBITMQ_IMAGE, "GATEWAY_IMAGE": GATEWAY_IMAGE,
                    "GATEWAY_AMQPS_PORT": str(self.port),
                    "GATEWAY_ISSUER_PORT": str(self.issuer_port),
                    "RABBITMQ_MANAGEMENT_PORT": str(self.mgmt_port)}
        self.tmp = tmp

    def compose(self, *args: str, timeout: float = 180, check: bool = True):
        # Relative paths in the compose files resolve against the repository root.
        r = subprocess.run([COMPOSE, "-f", str(self.file), "-p", self.project, *args],
                           capture_output=True, text=True, timeout=timeout, env=self.env,
                           cwd=REPO_ROOT)
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


def test_the_lean_build_has_no_development_mode_and_no_sts_emulator(images):
    """`--no-default-features`: `serve`, `check-config` and the operator commands only (the
    scale-out stack below serves with it)."""
    r = docker("run", "--rm", LEAN_IMAGE, check=False)
    assert r.returncode == 2, r
    assert "no development mode" in r.stderr and "serve --config" in r.stderr, r.stderr
    helptext = docker("run", "--rm", LEAN_IMAGE, "--help").stdout
    commands = {line.split()[0] for line in helptext.split("Commands:")[1].split("Options:")[0]
                .splitlines() if line.strip()}
    assert {"serve", "check-config", "explain", "backend-setup"} <= commands, helptext
    assert not commands & {"token", "rotate-keys", "sts-emulator"}, helptext
    full = docker("run", "--rm", GATEWAY_IMAGE, "--help").stdout
    assert "sts-emulator" in full and "token" in full
    sizes = {"full (debug)": gateway_binary().stat().st_size, "lean (debug)": LEAN_BIN.stat().st_size}
    conftest.TERMINAL_REPORTS.append(("binary sizes", json.dumps(sizes)))


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


# --------------------------------------------------------------------------------------
# the scale-out stack: HAProxy (send-proxy-v2) → two gateways → a two-node RabbitMQ cluster

# About a minute: the stack up and clustered in about 11 s, two failover runs of about
# 14 s, a stopped RabbitMQ node. scripts/test-scale-out.sh runs these tests alone.


class ScaleOut(Stack):
    file = REPO_ROOT / "docker-compose.scale-out.yml"

    def __init__(self, tmp: Path):
        super().__init__(tmp)
        self.project = f"aigscale{RUN}"
        self.env.update({"HAPROXY_IMAGE": HAPROXY_IMAGE, "GATEWAY_IMAGE": LEAN_IMAGE,
                         "SCALE_OUT_AMQPS_PORT": str(self.port),
                         "SCALE_OUT_CONFIG": str(tmp)})

    def audit(self, service: str) -> list[dict]:
        out = docker("logs", self.container(service)).stdout
        records = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                if line.startswith("{"):
                    records.append(json.loads(line))
        return records


@pytest.fixture(scope="module")
def scale(images, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("scale-out")
    _write_tls(cfg)
    shutil.copy(REPO_ROOT / "deploy" / "scale-out" / "gateway.toml", cfg / "gateway.toml")
    shutil.copy(REPO_ROOT / "tests" / "fixtures" / "rsa-public.pem", cfg / "issuer-public.pem")
    for f in cfg.iterdir():
        f.chmod(0o644)  # the gateways run as uid 10001
    cfg.chmod(0o755)
    s = ScaleOut(cfg)
    started = time.monotonic()
    try:
        s.compose("up", "-d", "--no-build", timeout=300)
        # Both nodes in one cluster, both gateways ready behind HAProxy.
        deadline = time.monotonic() + 120
        while True:
            r = docker("exec", s.container("rabbitmq-1"), "rabbitmqctl", "-q", "cluster_status",
                       "--formatter", "json", check=False)
            with contextlib.suppress(ValueError):
                if r.returncode == 0 and len(json.loads(r.stdout)["running_nodes"]) == 2:
                    break
            assert time.monotonic() < deadline, r.stdout + r.stderr
            time.sleep(1)
        s.up_seconds = time.monotonic() - started
        conftest.TERMINAL_REPORTS.append(("scale-out stack", f"up and clustered in {s.up_seconds:.1f} s"))
        yield s
    finally:
        logs = s.compose("logs", "--no-color", "--timestamps", check=False).stdout
        (REPO_ROOT / "target" / "scale-out-test.log").write_text(logs)
        s.compose("kill", check=False)
        s.compose("down", "-v", "--remove-orphans", timeout=180, check=False)


SCALE_SCOPE = "rabbitmq/read:*/* rabbitmq/write:*/* rabbitmq/configure:*/*"


def scale_connect(s: ScaleOut, user: str) -> pika.BlockingConnection:
    ctx = ssl.create_default_context(cafile=str(s.tmp / "ca.pem"))
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", s.port, "/", pika.PlainCredentials("", mint(user, scope=SCALE_SCOPE)),
        ssl_options=pika.SSLOptions(ctx, "localhost"), connection_attempts=1, heartbeat=0))


def accepted_on(s: ScaleOut, service: str, user: str) -> list[dict]:
    return [r for r in s.audit(service) if r.get("event") == "authentication"
            and r.get("decision") == "allow" and r.get("username") == user]


def test_load_spreads_over_both_gateways_with_the_clients_address(scale):
    user = f"spread-{RUN}"
    deadline = time.monotonic() + 30
    while True:  # HAProxy marks a gateway up after two good health checks
        try:
            scale_connect(scale, user).close()
            break
        except pika.exceptions.AMQPError:
            assert time.monotonic() < deadline
            time.sleep(1)
    conns = [scale_connect(scale, user) for _ in range(10)]
    try:
        time.sleep(0.5)
        per = {g: accepted_on(scale, g, user) for g in ("gateway-1", "gateway-2")}
        assert len(per["gateway-1"]) >= 3 and len(per["gateway-2"]) >= 3, {
            g: len(v) for g, v in per.items()}
        # The client address is the PROXY header's: where HAProxy saw the client come from
        # (Docker's port proxy, on the network's gateway address), never HAProxy's own.
        net = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.Gateway}} "
                     "{{.IPAddress}}{{end}}", scale.container("haproxy")).stdout.split()
        client_ip, haproxy_ip = net[0], net[1]
        for records in per.values():
            for r in records:
                assert r["client"].rsplit(":", 1)[0] == client_ip, (r, net)
                assert not r["client"].startswith(haproxy_ip + ":")
    finally:
        for c in conns:
            c.close()


def payload(i: int) -> bytes:
    return f"{i}:".encode() + hashlib.sha256(str(i).encode()).hexdigest().encode()


class Traffic:
    """Publishers with confirms and consumers through HAProxy, each reconnecting on any error
    and republishing what was not confirmed (at least once)."""

    def __init__(self, s: ScaleOut, queue: str, publishers: int = 4, consumers: int = 2):
        self.s, self.queue = s, queue
        self.publishers, self.consumers = publishers, consumers
        self.lock = threading.Lock()
        self.attempts = 0
        self.confirmed: set[int] = set()
        self.received: dict[int, int] = {}
        self.bad_bodies = 0
        self.reconnects: list[float] = []
        self.stop_publishing = threading.Event()
        self.stop_consuming = threading.Event()
        self.threads = [threading.Thread(target=self.publish, args=(k,), daemon=True)
                        for k in range(publishers)]
        self.threads += [threading.Thread(target=self.consume, daemon=True)
                         for _ in range(consumers)]

    def connect(self, user: str, failed_at: float | None):
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = scale_connect(self.s, user)
                if failed_at is not None:
                    with self.lock:
                        self.reconnects.append(time.monotonic() - failed_at)
                return conn
            except Exception:
                assert time.monotonic() < deadline, "no reconnect within 60 s"
                time.sleep(0.1)

    def publish(self, k: int) -> None:
        conn = self.connect(f"pub-{k}-{RUN}", None)
        ch = conn.channel()
        ch.confirm_delivery()
        i = k
        while not self.stop_publishing.is_set():
            try:
                with self.lock:
                    self.attempts += 1
                ch.basic_publish("", self.queue, payload(i),
                                 properties=pika.BasicProperties(delivery_mode=2, message_id=str(i)))
                with self.lock:
                    self.confirmed.add(i)
                i += self.publishers
                time.sleep(0.005)
            except Exception:
                failed_at = time.monotonic()
                with contextlib.suppress(Exception):
                    conn.close()
                conn = self.connect(f"pub-{k}-{RUN}", failed_at)
                ch = conn.channel()
                ch.confirm_delivery()
        with contextlib.suppress(Exception):
            conn.close()

    def consume(self) -> None:
        failed_at = None
        while not self.stop_consuming.is_set():
            conn = self.connect(f"sub-{RUN}", failed_at)
            try:
                ch = conn.channel()
                ch.basic_qos(prefetch_count=50)
                for method, _, body in ch.consume(self.queue, inactivity_timeout=0.3):
                    if self.stop_consuming.is_set():
                        break
                    if method is None:
                        continue
                    i = int(body.split(b":", 1)[0])
                    with self.lock:
                        self.received[i] = self.received.get(i, 0) + 1
                        self.bad_bodies += body != payload(i)
                    ch.basic_ack(method.delivery_tag)
                with contextlib.suppress(Exception):
                    conn.close()
                return
            except Exception:
                failed_at = time.monotonic()
                with contextlib.suppress(Exception):
                    conn.close()

    def run(self, disrupt, settle: float = 3.0) -> dict:
        for t in self.threads:
            t.start()
        time.sleep(settle)
        disrupt()
        time.sleep(settle + 3)
        self.stop_publishing.set()
        for t in self.threads[:self.publishers]:
            t.join(timeout=70)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self.lock:
                if self.confirmed <= self.received.keys():
                    break
            time.sleep(0.2)
        self.stop_consuming.set()
        for t in self.threads[self.publishers:]:
            t.join(timeout=30)
        with self.lock:
            missing = self.confirmed - self.received.keys()
            digest = lambda ids: hashlib.sha256(b"".join(payload(i) for i in sorted(ids))).hexdigest()  # noqa: E731
            return {
                "published": self.attempts, "confirmed": len(self.confirmed),
                "consumed": sum(self.received.values()), "unique": len(self.received),
                "redelivered": sum(n - 1 for n in self.received.values()),
                "missing": len(missing), "bad_bodies": self.bad_bodies,
                "checksum_confirmed": digest(self.confirmed),
                "checksum_consumed": digest(self.received.keys() & self.confirmed),
                "reconnects": len(self.reconnects),
                "reconnect_max_s": round(max(self.reconnects, default=0.0), 3),
                "reconnect_median_s": round(sorted(self.reconnects)[len(self.reconnects) // 2], 3)
                if self.reconnects else 0.0,
            }


def wait_gateway_back(s: ScaleOut, service: str) -> None:
    before = docker("logs", s.container(service)).stderr.count("AMQPS listener")
    s.compose("start", service)
    deadline = time.monotonic() + 30
    while docker("logs", s.container(service)).stderr.count("AMQPS listener") <= before:
        assert time.monotonic() < deadline, f"{service} did not come back"
        time.sleep(0.3)
    time.sleep(2.5)  # HAProxy marks it up after two good health checks, 1 s apart


@pytest.mark.parametrize("signal_name,service", [("TERM", "gateway-1"), ("KILL", "gateway-2")])
def test_a_gateway_stopped_under_load_loses_no_confirmed_message(scale, signal_name, service):
    queue = f"failover-{signal_name.lower()}-{RUN}"
    with contextlib.closing(scale_connect(scale, f"setup-{RUN}")) as conn:
        conn.channel().queue_declare(queue, durable=True)
    traffic = Traffic(scale, queue)
    result = traffic.run(lambda: docker("kill", "-s", signal_name, scale.container(service)))
    conftest.TERMINAL_REPORTS.append((f"scale-out failover, SIG{signal_name} {service}",
                                      json.dumps(result, indent=1)))
    (REPO_ROOT / "target" / f"failover-{signal_name.lower()}.json").write_text(json.dumps(result))
    wait_gateway_back(scale, service)
    assert result["reconnects"] >= 1, result  # clients were on the stopped gateway
    assert result["missing"] == 0 and result["bad_bodies"] == 0, result
    assert result["checksum_consumed"] == result["checksum_confirmed"], result
    assert result["confirmed"] > 100, result


def test_a_stopped_rabbitmq_node_sends_new_connections_to_the_other(scale):
    scale.compose("kill", "rabbitmq-2")
    killed = time.monotonic()
    opens = []
    try:
        for n in range(6):
            started = time.monotonic()
            with contextlib.closing(scale_connect(scale, f"node-{n}-{RUN}")) as conn:
                opens.append(round(time.monotonic() - started, 3))
                ch = conn.channel()
                q = ch.queue_declare("", exclusive=True).method.queue
                ch.basic_publish("", q, b"still here")
                assert ch.basic_get(q, auto_ack=True)[2] == b"still here"
        # The gateways say where each connection went ("connection opened ... node=").
        opened = [line for g in ("gateway-1", "gateway-2")
                  for line in docker("logs", scale.container(g)).stderr.splitlines()
                  if "connection opened" in line and f"-{RUN}" in line and "node-" in line]
        assert len(opened) == 6, opened
        assert all("rabbitmq-1:5672" in line for line in opened), opened
        # A connection that reached a gateway before its health check found the node gone
        # waits for backend.connect_timeout_ms (5 s: a killed container answers nothing);
        # later ones go straight to rabbitmq-1.
        report = {"connection_open_s": opens, "after_kill_s": round(time.monotonic() - killed, 1)}
        conftest.TERMINAL_REPORTS.append(("scale-out, rabbitmq-2 killed", json.dumps(report)))
        (REPO_ROOT / "target" / "failover-node.json").write_text(json.dumps(report))
        assert max(opens) < 5 + 2, report
    finally:
        scale.compose("start", "rabbitmq-2")
