"""Brings up both sides and runs sequences on them.

Reuses the conformance harness (tests/python/test_conformance.py): its token minting, its
gateway configuration mirroring the reference node (profile `base`, plus a plain listener
here), its backend service user, and conftest's `run_gateway`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # tests/python: conftest and test_conformance
    sys.path.insert(0, str(HERE.parent))

import conftest  # noqa: E402
import test_conformance as tc  # noqa: E402

from . import run as runmod  # noqa: E402
from .perms import fill  # noqa: E402

REF_PORT = int(os.environ.get("REFERENCE_NODE_PORT", "5691"))
REF_MGMT_PORT = int(os.environ.get("REFERENCE_NODE_MGMT_PORT", "15691"))
ADMIN_SCOPES = ("rabbitmq.tag:administrator rabbitmq.configure:*/* rabbitmq.write:*/* "
                "rabbitmq.read:*/*")


def start_reference_node() -> float:
    env = {**os.environ, "REFERENCE_NODE_PORT": str(REF_PORT), "REFERENCE_NODE_PROFILE": "base",
           "REFERENCE_NODE_MGMT_PORT": str(REF_MGMT_PORT)}
    t0 = time.monotonic()
    r = subprocess.run([str(tc.REF_SCRIPT), "start"], capture_output=True, text=True, env=env,
                       timeout=150)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/reference-node.sh start failed:\n{r.stdout}{r.stderr}")
    return time.monotonic() - t0


def stop_reference_node() -> None:
    subprocess.run([str(tc.REF_SCRIPT), "stop"], capture_output=True, timeout=150)


class Env:
    """Both sides, ready: the reference node (started by the caller or here), a gateway in
    front of the default node, the service user. Use as a context manager."""

    def __init__(self, *, manage_reference: bool = True, keep_reference: bool = False):
        self.manage_reference = manage_reference
        self.keep_reference = keep_reference
        self.stack = contextlib.ExitStack()
        self.run_id = uuid.uuid4().hex[:6]
        self.counter = 0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="side")
        self.cleaner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cleanup")
        self._admin_token_at: float | None = None
        self.timings: dict[str, float] = {}

    def __enter__(self) -> "Env":
        try:
            if self.manage_reference:
                self.timings["reference_start"] = start_reference_node()
                if not self.keep_reference:
                    self.stack.callback(stop_reference_node)
            self.stack.enter_context(tc.service_user())
            self.workdir = Path(tempfile.mkdtemp(prefix="session-fuzz-"))
            ca = conftest._write_tls(self.workdir)
            port = conftest._free_port()
            self.plain_port = conftest._free_port()
            config = tc.gateway_config(self.workdir, port, "base")
            text = config.read_text().replace(
                "[listener]\n", f'[listener]\nplain_address = "127.0.0.1:{self.plain_port}"\n', 1)
            # debug logging costs the gateway a line per operation; info is enough here
            # (FUZZ_DEBUG=1 keeps it, to read what the gateway did)
            if not os.environ.get("FUZZ_DEBUG"):
                text = text.replace('level = "info,amqp_iam_gateway=debug"', 'level = "info"')
            config.write_text(text)
            self.gateway = self.stack.enter_context(conftest.run_gateway(self.workdir, config, port, ca))
            host, bport = conftest.BACKEND_NODE.rsplit(":", 1)
            self.default_node = runmod.Node(
                "gw", tc.MANAGEMENT_URL, "guest", "guest", host, int(bport), "guest", "guest",
                grant_users=(tc.SERVICE_USER, "guest"))
            self.ref_node = runmod.Node(
                "ref", f"http://127.0.0.1:{REF_MGMT_PORT}", "fuzz-admin", "", "127.0.0.1", REF_PORT,
                "", "")
            self._refresh_admin_token()
            self.sides = {
                "ref": runmod.Side("ref", "127.0.0.1", REF_PORT, self.ref_node),
                "gw": runmod.Side("gw", "127.0.0.1", self.plain_port, self.default_node,
                                  service_users=(tc.SERVICE_USER,)),
            }
            self._wait_plain()
        except BaseException:
            self.stack.close()
            raise
        return self

    def _wait_plain(self) -> None:
        import socket
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.plain_port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _refresh_admin_token(self) -> None:
        # `None` until the first token: the monotonic clock starts near zero at boot, so a
        # plain 0.0 would look fresh on a machine up for less than ten minutes.
        if self._admin_token_at is not None and time.monotonic() - self._admin_token_at < 600:
            return
        tok = tc.mint(ADMIN_SCOPES, sub="fuzz-admin", exp_in=3600)
        self.ref_node.mgmt_password = tok
        self.ref_node.admin_password = tok
        self._admin_token_at = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        self.cleaner.shutdown(wait=True)
        self.stack.close()

    def gateway_log(self) -> str:
        return self.gateway.log()

    # -- one sequence on both sides
    def new_vhost(self) -> str:
        with self.lock:
            self.counter += 1
            return f"sf-{self.run_id}-{self.counter}"

    def run_pair(self, seq: dict, *, state: bool = True) -> dict[str, dict]:
        """Runs `seq` on both sides at once, each in a fresh vhost of the same name."""
        self._refresh_admin_token()
        vhost = self.new_vhost()
        sub = seq["tokens"][0]["sub"]
        tokens = [tc.mint(" ".join(fill(t["scopes"], vhost)), sub=t.get("sub", sub), exp_in=600)
                  for t in seq["tokens"]]

        def one(name: str) -> dict:
            side = self.sides[name]
            t0 = time.monotonic()
            side.node.create_vhost(vhost)
            t1 = time.monotonic()
            res = runmod.Runner(side, seq, vhost, tokens).run()
            t2 = time.monotonic()
            res["state"] = runmod.snapshot(side.node, vhost) if state else None
            t3 = time.monotonic()
            res["vhost"] = vhost
            res["timings"] = {"vhost": t1 - t0, "session": t2 - t1, "state": t3 - t2}
            self.cleaner.submit(_quiet_delete, side.node, vhost)
            return res

        futs = {n: self.pool.submit(one, n) for n in ("ref", "gw")}
        return {n: f.result() for n, f in futs.items()}


def _quiet_delete(node, vhost) -> None:
    with contextlib.suppress(Exception):
        node.delete_vhost(vhost)
