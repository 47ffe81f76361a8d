"""Hot reload on SIGHUP (and POST /reload): a changed alias applies to new connections while
an established one keeps its permissions; an invalid config is rejected with all its errors
and the old one keeps serving."""
import signal
import time
import urllib.error
import urllib.request

import pika
import pytest

from conftest import READ_ONLY_ROLE, _free_port, _write_config, _write_tls, metric, mint, run_gateway, unique


def _wait_metric(admin_port: int, sample: str, value: float) -> None:
    deadline = time.monotonic() + 10
    while metric(admin_port, sample) < value:
        assert time.monotonic() < deadline, f"{sample} never reached {value}"
        time.sleep(0.1)


def test_sighup_reloads_aliases_for_new_connections_only(tmp_path):
    ca = _write_tls(tmp_path)
    port, admin = _free_port(), _free_port()
    cfg = _write_config(tmp_path, port, admin)
    cfg.write_text(cfg.read_text() + "\n[runtime]\nworker_threads = 3\n")
    original = cfg.read_text()
    with run_gateway(tmp_path, cfg, port, ca) as gw:
        assert metric(admin, "amqp_iam_gateway_runtime_worker_threads") == 3
        ctx = gw.ssl_context()
        # Every connection of the test, closed at the end: the gateway stops with SIGINT
        # (run_gateway), and open clients would keep it in its drain period.
        opened = []

        def connect():
            params = pika.ConnectionParameters(
                "127.0.0.1", port, "/", pika.PlainCredentials("", mint(READ_ONLY_ROLE)),
                ssl_options=pika.SSLOptions(ctx, "localhost"), connection_attempts=1,
            )
            conn = pika.BlockingConnection(params)
            opened.append(conn)
            return conn

        def can_declare(conn) -> bool:
            ch = conn.channel()
            try:
                ch.queue_declare(unique("reload"), exclusive=True)
                return True
            except pika.exceptions.ChannelClosedByBroker as e:
                assert e.reply_code == 403
                return False

        before = connect()
        assert not can_declare(before), "the read-only alias cannot configure"

        # The alias now grants configure too; the thread count changes only at a restart.
        cfg.write_text(
            original.replace('"rabbitmq/read:*/*"', '"rabbitmq/read:*/* rabbitmq/configure:*/*"')
            .replace("worker_threads = 3", "worker_threads = 1")
        )
        gw.proc.send_signal(signal.SIGHUP)
        _wait_metric(admin, 'amqp_iam_gateway_config_reloads_total{result="ok"}', 1)
        assert metric(admin, "amqp_iam_gateway_runtime_worker_threads") == 3
        assert "worker_threads changed: it takes effect at the next restart" in gw.log()
        assert not can_declare(before), "an established connection keeps its permissions"
        assert before.is_open
        after = connect()
        assert can_declare(after), "a new connection gets the reloaded alias"

        # An invalid config is rejected with every error, and the last good one serves on.
        cfg.write_text(original.replace("[listener]", "[listener]\nbogus_key = 1\nmax_connections = 0"))
        gw.proc.send_signal(signal.SIGHUP)
        _wait_metric(admin, 'amqp_iam_gateway_config_reloads_total{result="error"}', 1)
        text = gw.log()
        assert "bogus_key" in text and "keeping the current one" in text, text[-2000:]
        assert can_declare(connect()), "still the last good configuration"

        # The admin endpoint does the same and says why.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{admin}/reload", method="POST"), timeout=10)
        assert e.value.code == 422 and "bogus_key" in e.value.read().decode()
        cfg.write_text(original)
        ok = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{admin}/reload", method="POST"), timeout=10)
        assert ok.status == 200
        assert not can_declare(connect()), "back to the original alias"
        for c in opened:
            c.close()
