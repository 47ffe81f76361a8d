"""Two backend nodes: the running node and a second one this test starts. Connections are
spread over both; when one stops, new connections go to the other."""
import os
import socket
import ssl
import subprocess
import time

import pika
import pytest

from conftest import (ADMIN_ROLE, REPO_ROOT, _free_port, _write_config, _write_tls, gateway_binary, metric,
                      metrics_text, mint, run_gateway)

SECOND = {"REFERENCE_NODE_STATE": str(REPO_ROOT / "target" / "backend-node"),
          "REFERENCE_NODE_NAME": "rabbit_backend2@localhost",
          "REFERENCE_NODE_PORT": "5692", "REFERENCE_NODE_DIST_PORT": "25692",
          "REFERENCE_NODE_PROFILE": "backend"}
SCRIPT = str(REPO_ROOT / "scripts" / "reference-node.sh")


def _node(cmd: str) -> None:
    r = subprocess.run(["bash", SCRIPT, cmd], env={**os.environ, **SECOND}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def second_node():
    _node("start")
    try:
        yield
    finally:
        _node("stop")


def test_new_connections_go_to_the_node_that_is_left(tmp_path, second_node):
    ca = _write_tls(tmp_path)
    port, admin = _free_port(), _free_port()
    cfg = _write_config(tmp_path, port, admin)
    cfg.write_text(cfg.read_text().replace('nodes = ["127.0.0.1:5672"]', 'nodes = ["127.0.0.1:5692", "127.0.0.1:5672"]'))
    second = 'amqp_iam_gateway_backend_connections_total{node="127.0.0.1:5692"}'
    first = 'amqp_iam_gateway_backend_connections_total{node="127.0.0.1:5672"}'
    with run_gateway(tmp_path, cfg, port, ca) as gw:
        conns = [gw.connect(mint(ADMIN_ROLE)) for _ in range(4)]
        assert metric(admin, second) >= 1 and metric(admin, first) >= 1, "both nodes take connections"
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
        _node("stop")
        before = metric(admin, first)
        for _ in range(4):
            c = gw.connect(mint(ADMIN_ROLE))
            ch = c.channel()
            ch.queue_declare("", exclusive=True)
            c.close()
        assert metric(admin, first) == before + 4, "every new connection went to the running node"
        # The gateway knows the node is gone: its background health check (every 2 s) says
        # so, and a client that came before the check would have counted a failed connect.
        gone = 'amqp_iam_gateway_backend_node_up{node="127.0.0.1:5692"}'
        deadline = time.monotonic() + 5
        while metric(admin, gone) != 0.0 or gone not in metrics_text(admin):
            assert time.monotonic() < deadline, "the health check did not find the node gone"
            time.sleep(0.2)
