"""Graceful drain on SIGTERM: new connections are refused at once, established clients get
`connection.close 320` after the drain period, and the process exits 0."""
import signal
import socket
import time
import urllib.error
import urllib.request

import pika
import pytest

from conftest import ADMIN_ROLE, _free_port, _write_config, _write_tls, mint, run_gateway, unique

DRAIN_PERIOD_S = 0.6


def test_sigterm_drains_with_320_and_exits_0(tmp_path):
    ca = _write_tls(tmp_path)
    port, admin_port = _free_port(), _free_port()
    cfg = _write_config(tmp_path, port, admin_port)
    text = cfg.read_text().replace(
        "auth_failure_delay_ms = 300",
        f"auth_failure_delay_ms = 300\ndrain_period_ms = {int(DRAIN_PERIOD_S * 1000)}\ndrain_deadline_ms = 8000",
    )
    cfg.write_text(text)
    with run_gateway(tmp_path, cfg, port, ca) as gw:
        ctx = gw.ssl_context()
        params = pika.ConnectionParameters(
            "127.0.0.1", port, "/", pika.PlainCredentials("", mint(ADMIN_ROLE)),
            ssl_options=pika.SSLOptions(ctx, "localhost"), connection_attempts=1,
        )
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.queue_declare(unique("drain"), exclusive=True)

        def status(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        assert status("/readyz")[0] == 200
        sent = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Readiness fails as soon as the drain begins (a Kubernetes readiness probe takes the
        # pod out of the Service); liveness does not.
        assert status("/readyz") == (503, "not ready: draining: no new connections\n")
        assert status("/healthz")[0] == 200
        # New connections are not accepted any more.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        # The established one keeps working during the drain period...
        ch.basic_qos(prefetch_count=1)
        # ...then gets the 320 RabbitMQ sends when a node shuts down.
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            while time.monotonic() - sent < 8:
                conn.process_data_events(time_limit=0.1)
        assert closed.value.reply_code == 320
        assert closed.value.reply_text == "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
        assert time.monotonic() - sent >= DRAIN_PERIOD_S - 0.05, "not before the drain period"
        assert gw.proc.wait(timeout=10) == 0, gw.log()
