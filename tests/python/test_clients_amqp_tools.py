"""The C librabbitmq command-line tools (Debian package `amqp-tools`) through the gateway
over TLS: `amqp-consume` declares an auto-delete queue, binds it to amq.direct and acks
each message; `amqp-publish` publishes; `amqp-declare-queue` is refused with 403.

What the tools (0.11) can and cannot do here:
- TLS with a custom CA and an empty username work, but only through `--url`:
  `--url amqps://:TOKEN@localhost:PORT/%2f --cacert ca.pem` (the hostname is verified).
  `--ssl` without `--url` fails with "the --ssl option specifies an SSL connection but the
  --url option does not", and `--url` cannot be combined with `--username`, `--password`
  or `--authfile`: the token has to be in the URL, so it shows in the process list. Without
  userinfo in the URL the tools log in as guest/guest (refused: 403 at login).
- No publisher confirms (amqp-publish does not select confirm mode), no
  `connection.update-secret`, and each tool is one connection doing one thing, so
  "keep working on another channel" does not apply: the next command opens a new
  connection. Refusals surface as exit status 1 and RabbitMQ's text on standard error
  (for a publish, at channel close: "closing channel: server channel error 403, ...").
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from conftest import compat_user, unique

N = 3


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: scripts/setup.sh installs the Debian package amqp-tools")
    return path


def _run(gateway, token: str, tool: str, *args: str, stdin: bytes | None = None):
    return subprocess.run(
        [_tool(tool), "--url", gateway.url(token), "--cacert", str(gateway.ca_file), *args],
        input=stdin, capture_output=True, timeout=30,
    )


def test_amqp_tools_publish_consume_and_refusal(gateway, admin):
    user = compat_user("amqp-tools")
    queue = unique("compat.tools.q")
    key = unique("rk")
    consumer = subprocess.Popen(
        [
            _tool("amqp-consume"), "--url", gateway.url(user.full),
            "--cacert", str(gateway.ca_file),
            "-q", queue, "-e", "amq.direct", "-r", key, "-c", str(N),
            "cat",  # run once per message with the body on stdin; acked after it exits
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        # Wait until the consumer's queue is declared and bound (seen through the admin).
        deadline = time.monotonic() + 15
        while True:
            ch = admin.channel()
            try:
                ch.queue_declare(queue, passive=True)
                ch.close()
                break
            except Exception:
                if time.monotonic() > deadline or consumer.poll() is not None:
                    raise
                time.sleep(0.1)
        for i in range(N - 1):
            p = _run(gateway, user.full, "amqp-publish", "-e", "amq.direct", "-r", key,
                     "-b", f"m{i};")
            assert p.returncode == 0, p.stderr
        # -l: one message per line of standard input.
        p = _run(gateway, user.full, "amqp-publish", "-e", "amq.direct", "-r", key, "-l",
                 stdin=f"m{N - 1};\n".encode())
        assert p.returncode == 0, p.stderr
        out, err = consumer.communicate(timeout=20)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert consumer.returncode == 0, err
    # -l keeps the line's newline in the body.
    assert out.decode() == "".join(f"m{i};" for i in range(N)) + "\n"

    # Refusals: exit status 1 and RabbitMQ's code and text.
    forbidden = unique("forbidden.tools")
    p = _run(gateway, user.full, "amqp-declare-queue", "-q", forbidden)
    assert p.returncode == 1
    assert (
        f"server channel error 403, message: {user.refused('configure', 'queue', forbidden)}"
        in p.stderr.decode()
    ), p.stderr
    p = _run(gateway, user.full, "amqp-publish", "-e", "amq.topic", "-r", key, "-b", "x")
    assert p.returncode == 1
    assert (
        "server channel error 403, message: "
        + user.refused("write", "exchange", "amq.topic")
        in p.stderr.decode()
    ), p.stderr
    # And the next command works again (a new connection).
    p = _run(gateway, user.full, "amqp-declare-queue", "-q", queue)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().strip() == queue

    # The URL without userinfo logs in as guest/guest: refused at login.
    p = subprocess.run(
        [_tool("amqp-publish"), "--url", f"amqps://localhost:{gateway.port}/%2f",
         "--cacert", str(gateway.ca_file), "-e", "amq.direct", "-r", key, "-b", "x"],
        capture_output=True, timeout=30,
    )
    assert p.returncode == 1
    assert b"server connection error 403, message: ACCESS_REFUSED - Login was refused" in p.stderr

    ch = admin.channel()
    ch.queue_delete(queue)
    ch.close()
