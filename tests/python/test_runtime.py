"""The runtime's threads. The default number of workers: one per CPU, one on 2 CPUs or
fewer, unless the config or TOKIO_WORKER_THREADS names a number. `[runtime] per_core =
true`: single-threaded runtimes, one per worker thread, each relaying the connections the
acceptor hands to it. The same sessions must work as on the default multi-thread runtime,
across several workers, and the process must drain and exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pika

from conftest import (ADMIN_ROLE, _free_port, _write_config, _write_tls, gateway_binary,
                      metric, mint, run_gateway, unique)


def default_workers() -> int:
    """The rule of src/main.rs, from the CPUs this process may run on (as Rust's
    available_parallelism counts them, without a cgroup quota)."""
    cpus = len(os.sched_getaffinity(0))
    return 1 if cpus <= 2 else cpus


def test_worker_threads_default_and_their_overrides(tmp_path):
    ca = _write_tls(tmp_path)
    port, admin_port = _free_port(), _free_port()
    config = _write_config(tmp_path, port, admin_port)
    gauge = "amqp_iam_gateway_runtime_worker_threads"
    with run_gateway(tmp_path, config, port, ca, env={"TOKIO_WORKER_THREADS": None}) as gw:
        assert metric(admin_port, gauge) == default_workers()
        # Token checks run on the blocking pool: a fresh token is verified and relayed.
        c = gw.connect(mint(ADMIN_ROLE))
        c.channel().queue_declare("", exclusive=True)
        c.close()
    with run_gateway(tmp_path, config, port, ca, env={"TOKIO_WORKER_THREADS": "3"}):
        assert metric(admin_port, gauge) == 3
    config.write_text(config.read_text() + "\n[runtime]\nworker_threads = 4\n")
    with run_gateway(tmp_path, config, port, ca, env={"TOKIO_WORKER_THREADS": "3"}):
        assert metric(admin_port, gauge) == 4


def test_an_unusable_tokio_worker_threads_is_a_clear_error(tmp_path):
    """TOKIO_WORKER_THREADS that is no whole number from 1 to 1024 stops the gateway at start
    with a message naming it, on either runtime, instead of tokio's panic (multi-thread) or
    a quietly ignored value (per_core, where 0 left no worker to hand connections to)."""
    _write_tls(tmp_path)
    port, admin_port = _free_port(), _free_port()
    config = _write_config(tmp_path, port, admin_port)
    per_core = tmp_path / "per-core.toml"
    per_core.write_text(config.read_text() + "\n[runtime]\nper_core = true\n")
    for cfg in (config, per_core):
        for value in ("0", "two", "1025"):
            env = {**os.environ, "TOKIO_WORKER_THREADS": value}
            got = subprocess.run([str(gateway_binary()), "serve", "--config", str(cfg)],
                                 cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=30)
            assert got.returncode == 1, (cfg.name, value, got.returncode, got.stderr[-2000:])
            assert "TOKIO_WORKER_THREADS must be a whole number from 1 to 1024" in got.stderr, (
                cfg.name, value, got.stderr[-2000:])
            assert "panicked" not in got.stderr, got.stderr[-2000:]


def test_per_core_runtimes_relay_sessions_and_drain(tmp_path):
    ca = _write_tls(tmp_path)
    port, admin_port = _free_port(), _free_port()
    config = _write_config(tmp_path, port, admin_port)
    config.write_text(config.read_text() + "\n[runtime]\nworker_threads = 3\nper_core = true\n")
    with run_gateway(tmp_path, config, port, ca) as gw:
        from pathlib import Path

        names = sorted(p.read_text().strip() for p in Path(f"/proc/{gw.proc.pid}/task").glob("*/comm"))
        assert [n for n in names if n.startswith("relay-")] == ["relay-0", "relay-1", "relay-2"], names
        # Six connections: two on each worker, round robin; each publishes to its own queue
        # through another connection's declare, and reads it back.
        conns = [gw.connect(mint(ADMIN_ROLE)) for _ in range(6)]
        queues = []
        for i, c in enumerate(conns):
            q = c.channel().queue_declare(unique(f"per-core-{i}"), auto_delete=False).method.queue
            queues.append(q)
        errors: list = []

        def work(i: int) -> None:
            try:
                ch = conns[i].channel()
                ch.confirm_delivery()
                target = queues[(i + 1) % len(queues)]
                for n in range(200):
                    ch.basic_publish("", target, f"{i}-{n}".encode())
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        for i, c in enumerate(conns):
            ch = c.channel()
            got = 0
            while ch.basic_get(queues[i], auto_ack=True)[0] is not None:
                got += 1
            assert got == 200, (queues[i], got)
            ch.queue_delete(queues[i])
        assert metric(admin_port, "amqp_iam_gateway_connections_open") == 6
        for c in conns:
            c.close()
        # A refused operation on a worker: RabbitMQ's text, the connection usable after.
        c = gw.connect(mint("arn:aws:iam::111122223333:role/ReadOnly"))
        try:
            c.channel().queue_declare(unique("per-core-refused"))
            raise AssertionError("declare permitted")
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 403
        assert c.is_open
        c.close()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=30) == 0, gw.log()
