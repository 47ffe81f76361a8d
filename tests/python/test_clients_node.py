"""The Node.js clients (tests/node: amqplib, rabbitmq-client) through the gateway.

This test starts nothing of its own: it runs `node --test` on tests/node/*.test.js against
the session's gateway, passing the port, the CA file and freshly minted tokens through the
environment (see tests/node/common.js), and fails when any Node test fails or none ran.
scripts/setup.sh installs Node.js and the packages (`npm ci` from tests/node's lockfile).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, compat_user

NODE_DIR = REPO_ROOT / "tests" / "node"
CLIENTS = ("amqplib", "rabbitmq-client")


def test_node_clients(gateway):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: scripts/setup.sh installs Node.js")
    if not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        pytest.fail("tests/node/node_modules missing: run scripts/setup.sh (npm ci)")
    files = sorted(str(p.relative_to(NODE_DIR)) for p in NODE_DIR.glob("*.test.js"))
    assert files, "no tests/node/*.test.js"
    users = {c: vars(compat_user(c)) for c in CLIENTS}
    env = {
        "PATH": str(Path(node).parent) + ":/usr/bin:/bin",
        "GATEWAY_PORT": str(gateway.port),
        "GATEWAY_CA": str(gateway.ca_file),
        "COMPAT_USERS": json.dumps(users),
    }
    proc = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    print(out)  # shown by pytest on failure (and with -s)
    assert proc.returncode == 0, f"node --test failed (exit {proc.returncode}):\n{out}"
    passed = re.search(r"^# pass (\d+)$", out, re.M)
    failed = re.search(r"^# fail (\d+)$", out, re.M)
    assert passed and failed, f"no TAP summary from node --test:\n{out}"
    assert int(failed.group(1)) == 0, out
    assert int(passed.group(1)) >= len(files), f"fewer Node tests passed than files:\n{out}"
