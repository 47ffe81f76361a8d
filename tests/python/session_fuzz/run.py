"""Executes a sequence against one side and records what the client received.

A side is a RabbitMQ node reached either directly (the reference node) or through the
gateway. What is recorded, per channel: the ordered replies (method replies, a server
`channel.close` with code and text, `basic.return`, `basic.get-ok`/`-empty`), and the
asynchronous events (deliveries, server `basic.cancel`, publisher confirms), each with the
step it was read in and a global receive number; on channel 0 the login outcome,
`update-secret-ok` and a server `connection.close`. Then the broker state of the vhost.

Frames are read only while waiting (a step with `wait`, and the final sync), so what the
runner decides from what it has seen (auto-opening a channel, acking the last delivery
tag, resolving server-chosen names) depends only on events before the last wait, which
are the same on both sides until the sides diverge.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field

from . import amqp

WAIT_TIMEOUT_S = 3.0
SETTLE_S = 0.012  # extra read after a wait whose step published (deliveries are async)
QUIET_S = 0.03  # the final quiet period for asynchronous deliveries


# ------------------------------------------------------------------------------------------
# nodes


@dataclass
class Node:
    """A RabbitMQ node's management API and admin AMQP access."""
    name: str  # "ref" | "gw"
    mgmt_url: str
    mgmt_user: str
    mgmt_password: str
    amqp_host: str
    amqp_port: int
    admin_user: str  # AMQP admin login (for exact message counts)
    admin_password: str
    grant_users: tuple = ()  # internal users to give full permissions on each new vhost

    def _auth(self) -> str:
        raw = f"{self.mgmt_user}:{self.mgmt_password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def api(self, method: str, path: str, body=None, ok404: bool = False):
        req = urllib.request.Request(
            self.mgmt_url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"content-type": "application/json", "authorization": self._auth()})
        try:
            with urllib.request.urlopen(req, timeout=15) as f:
                data = f.read()
        except urllib.error.HTTPError as e:
            if ok404 and e.code == 404:
                return None
            raise RuntimeError(f"{self.name} {method} {path}: HTTP {e.code} {e.read()[:300]!r}") from e
        return json.loads(data) if data else None

    def create_vhost(self, vhost: str) -> None:
        v = urllib.parse.quote(vhost, safe="")
        self.api("PUT", f"/api/vhosts/{v}", {})
        for u in self.grant_users:
            self.api("PUT", f"/api/permissions/{v}/{urllib.parse.quote(u, safe='')}",
                     {"configure": ".*", "write": ".*", "read": ".*"})

    def delete_vhost(self, vhost: str) -> None:
        self.api("DELETE", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}", ok404=True)


@dataclass
class Side:
    """Where a sequence's client connects: the node itself (ref) or the gateway (gw)."""
    name: str
    host: str
    port: int
    node: Node
    service_users: tuple = ()  # names that may show up in texts (normalised away)


# ------------------------------------------------------------------------------------------
# the runner

# Replies that RabbitMQ's queue process sends for the channel: later replies may overtake
# them (and compare.py compares them as a multiset).
_QUEUE_PROCESS_REPLIES = (("basic.consume-ok",), ("basic.cancel-ok",))

SYNC_REPLIES = {
    "exchange.declare": ("exchange.declare-ok",), "exchange.delete": ("exchange.delete-ok",),
    "exchange.bind": ("exchange.bind-ok",), "exchange.unbind": ("exchange.unbind-ok",),
    "queue.declare": ("queue.declare-ok",), "queue.bind": ("queue.bind-ok",),
    "queue.purge": ("queue.purge-ok",), "queue.delete": ("queue.delete-ok",),
    "queue.unbind": ("queue.unbind-ok",), "basic.qos": ("basic.qos-ok",),
    "basic.consume": ("basic.consume-ok",), "basic.cancel": ("basic.cancel-ok",),
    "basic.get": ("basic.get-ok", "basic.get-empty"), "basic.recover": ("basic.recover-ok",),
    "confirm.select": ("confirm.select-ok",), "tx.select": ("tx.select-ok",),
    "tx.commit": ("tx.commit-ok",), "tx.rollback": ("tx.rollback-ok",),
    "channel.flow": ("channel.flow-ok",), "channel.close": ("channel.close-ok",),
    "channel.open": ("channel.open-ok",),
    "connection.update-secret": ("connection.update-secret-ok",),
}
NOWAIT_ABLE = {"exchange.declare", "exchange.delete", "exchange.bind", "exchange.unbind",
               "queue.declare", "queue.bind", "queue.purge", "queue.delete", "basic.consume",
               "basic.cancel", "confirm.select"}
ASYNC_KINDS = {"deliver", "cancel", "confirm"}


def _resources_in_text(text: str) -> list[str]:
    """The quoted names a refusal text gives before its vhost: `queue 'q'`, or `topic 'rk'
    in exchange 'x'` (both), so the refusal can be matched to the method naming them."""
    import re
    return re.findall(r"'(.*?)'", text.split(" in vhost ")[0])


def _exchanges_in_text(text: str) -> list[str]:
    """The exchange names a refusal or error text gives (`exchange 'x'`)."""
    import re
    return re.findall(r"exchange '(.*?)'", text.split(" in vhost ")[0])


class Runner:
    def __init__(self, side: Side, seq: dict, vhost: str, tokens: list[str]):
        self.side = side
        self.seq = seq
        self.vhost = vhost
        self.tokens = tokens
        self.conn: amqp.Conn | None = None
        self.events: list[dict] = []
        self.n = 0
        self.step = 0
        self.ch_state: dict[int, str] = {}
        self.pending: dict[int, deque] = {}
        self.step_frames: list[bytes] = []  # the current step's frames not sent yet
        self.sent: dict[int, list] = {}
        self.tags: dict[int, list] = {}
        self.confirm: dict[int, dict] = {}
        self.consumers: dict[str, dict] = {}
        self.pending_consumes: dict[int, deque] = {}
        self.gen_names: list[str] = []
        self.ctags: list[str] = []
        self.fates: dict[str, str] = {}
        self.ops: dict[str, dict] = {}  # opref -> resolved op
        self.closed = False
        self.conn_close = None
        self.methods = 0
        self.secret_consumers = None
        self.timings = {}

    # -- recording
    def rec(self, ch: int, kind: str, data, **extra) -> dict:
        self.n += 1
        e = {"ch": ch, "kind": kind, "data": data, "step": self.step, "n": self.n, **extra}
        self.events.append(e)
        return e

    # -- resolution of symbolic values
    def resolve_name(self, name: str) -> str:
        if name.startswith("$gen"):
            i = int(name[4:]) - 1
            return self.gen_names[i] if i < len(self.gen_names) else "amq.gen-unknown"
        return name

    def resolve_tag(self, tag: str) -> str:
        if tag.startswith("$ctag"):
            i = int(tag[5:]) - 1
            return self.ctags[i] if i < len(self.ctags) else "amq.ctag-unknown"
        return tag

    def resolve_dtag(self, ch: int, what) -> int:
        tags = self.tags.get(ch) or []
        if what == "last":
            return max(tags) if tags else 0
        if what == "first":
            return min(tags) if tags else 0
        if what == "zero":
            return 0
        return int(what)

    # -- sending
    def expect(self, ch: int, names: tuple, ref: str) -> None:
        self.pending.setdefault(ch, deque()).append((names, ref))

    def frames_for(self, op: dict, ref: str) -> list[bytes]:
        ch, m = op["ch"], op["m"]
        a = dict(op.get("a") or {})
        out: list[bytes] = []
        if ch == 0:
            if m == "connection.update-secret":
                out.append(amqp.method_frame(0, m, {"new_secret": self.tokens[a.get("token", 1)],
                                                    "reason": "refresh"}))
                self.expect(0, SYNC_REPLIES[m], ref)
                self.ops[ref] = op
                self.fates[ref] = "sent"
                self.methods += 1
            return out
        state = self.ch_state.get(ch)
        if m == "channel.close-ok":
            if state == "server_closed_wait":
                out.append(amqp.method_frame(ch, m))
                self.ch_state[ch] = None
                self.methods += 1
                self.fates[ref] = "sent"
            else:
                self.fates[ref] = "skipped"
            return out
        if state == "client_closing":
            self.fates[ref] = "skipped"
            return out
        if m == "channel.open" and state == "open":
            self.fates[ref] = "skipped"
            return out
        if state == "server_closed_wait":
            out.append(amqp.method_frame(ch, "channel.close-ok"))
            self.ch_state[ch] = None
            state = None
        if state != "open":
            if not self.seq.get("pipeline_open", True) and not self.closed:
                # Open in a round trip of its own, after the step's frames so far (sent
                # first, as a client would have: the replies read meanwhile may close
                # their channels).
                self.conn.send(b"".join(self.step_frames + out + [amqp.method_frame(ch, "channel.open")]))
                self.step_frames.clear()
                out = []
                self.expect(ch, SYNC_REPLIES["channel.open"], ref + "/open")
                self.ch_state[ch] = "open"
                self.sent[ch] = []
                self.confirm.pop(ch, None)
                self.tags[ch] = []
                self.methods += 1
                self.read_until(lambda: not self.pending.get(ch), time.monotonic() + WAIT_TIMEOUT_S)
                if self.closed:
                    return out
                if m == "channel.open":
                    self.fates[ref] = "sent"
                    return out
                state = "open"
        if state != "open":
            out.append(amqp.method_frame(ch, "channel.open"))
            self.expect(ch, SYNC_REPLIES["channel.open"], ref + "/open")
            self.ch_state[ch] = "open"
            self.sent[ch] = []
            self.confirm.pop(ch, None)
            self.tags[ch] = []
            self.methods += 1
            if m == "channel.open":
                self.fates[ref] = "sent"
                return out
        # resolve
        for k in ("queue",):
            if k in a:
                a[k] = self.resolve_name(a[k])
        if m == "basic.publish" and a.get("exchange") == "" and a.get("routing_key", "").startswith("$gen"):
            a["routing_key"] = self.resolve_name(a["routing_key"])
        if m == "basic.cancel":
            a["consumer_tag"] = self.resolve_tag(a["consumer_tag"])
        if m in ("basic.ack", "basic.nack", "basic.reject"):
            a["delivery_tag"] = self.resolve_dtag(ch, a.get("delivery_tag", "last"))
        self.ops[ref] = {**op, "a": a}
        self.fates[ref] = "sent"
        self.methods += 1
        if m == "basic.publish":
            props = a.get("props") or {}
            out.append(amqp.method_frame(ch, m, {"exchange": a["exchange"],
                                                 "routing_key": a["routing_key"],
                                                 "mandatory": a.get("mandatory", False)}))
            out += amqp.content_frames(ch, amqp.to_bytes(a.get("body", "")), props,
                                       self.conn.frame_max)
            c = self.confirm.get(ch)
            if c is not None:
                c["unconfirmed"].add(c["next"])
                c["next"] += 1
        else:
            out.append(amqp.method_frame(ch, m, a))
        replies = SYNC_REPLIES.get(m)
        nowait = m in NOWAIT_ABLE and a.get("nowait")
        if replies and not nowait:
            self.expect(ch, replies, ref)
        self.sent.setdefault(ch, []).append((ref, bool(replies and not nowait)))
        if m == "channel.close":
            self.ch_state[ch] = "client_closing"
        if m == "confirm.select":
            self.confirm.setdefault(ch, {"next": 1, "unconfirmed": set()})
        if m == "basic.consume":
            if nowait:
                self.consumers[a["consumer_tag"]] = {"ch": ch, "queue": a["queue"], "ref": ref}
            else:
                self.pending_consumes.setdefault(ch, deque()).append((a["queue"], ref))
        return out

    def preopen(self, ops: list[dict], step_i: int) -> None:
        """Without pipelined opens, the channels a step needs are opened before any of its
        frames is sent, each in a round trip: what the step then sends does not depend on
        when replies arrive."""
        done = set()
        for i, op in enumerate(ops):
            ch, m = op["ch"], op["m"]
            if ch == 0 or ch in done or m in ("channel.open", "channel.close-ok") or self.closed:
                continue
            done.add(ch)
            state = self.ch_state.get(ch)
            if state not in (None, "server_closed_wait"):
                continue
            frames = []
            if state == "server_closed_wait":
                frames.append(amqp.method_frame(ch, "channel.close-ok"))
            frames.append(amqp.method_frame(ch, "channel.open"))
            try:
                self.conn.send(b"".join(frames))
            except amqp.ConnectionLost:
                self.lost("send failed")
                return
            self.expect(ch, SYNC_REPLIES["channel.open"], f"{step_i}.{i}/open")
            self.ch_state[ch] = "open"
            self.sent[ch] = []
            self.confirm.pop(ch, None)
            self.tags[ch] = []
            self.methods += 1
            self.read_until(lambda: not self.pending.get(ch), time.monotonic() + WAIT_TIMEOUT_S)

    def send_step(self, ops: list[dict], step_i: int) -> None:
        if not self.seq.get("pipeline_open", True):
            self.preopen(ops, step_i)
        frames = self.step_frames = []
        for i, op in enumerate(ops):
            frames += self.frames_for(op, f"{step_i}.{i}")
        if frames and not self.closed:
            try:
                self.conn.send(b"".join(frames))
            except amqp.ConnectionLost:
                self.lost("send failed")

    def lost(self, why: str) -> None:
        if not self.closed:
            self.closed = True
            if self.conn_close is None:
                self.conn_close = {"code": None, "text": f"connection lost ({why})", "step": self.step}
                self.rec(0, "conn-lost", [why])

    # -- receiving
    def settle_sent(self, ch: int, upto_ref: str | None) -> None:
        """A reply to `upto_ref` arrived: everything sent before it on `ch` was processed."""
        lst = self.sent.get(ch) or []
        for i, (ref, _sync) in enumerate(lst):
            if ref == upto_ref:
                for r2, s2 in lst[:i]:
                    if self.fates.get(r2) == "sent":
                        self.fates[r2] = "settled"
                self.fates[ref] = "answered"
                del lst[:i + 1]
                return

    def channel_gone(self, ch: int) -> None:
        self.pending.pop(ch, None)
        self.pending_consumes.pop(ch, None)
        for tag in [t for t, c in self.consumers.items() if c["ch"] == ch]:
            del self.consumers[tag]
        self.confirm.pop(ch, None)

    def handle(self, it: amqp.Incoming) -> None:
        ch, name, a = it.channel, it.name, it.args
        if ch == 0:
            if name == "connection.close":
                self.conn_close = {"code": a["reply_code"], "text": a["reply_text"], "step": self.step}
                self.rec(0, "conn-close", [a["reply_code"], a["reply_text"],
                                           amqp.method_name(a["class_id"], a["method_id"])])
                try:
                    self.conn.send_method(0, "connection.close-ok")
                except amqp.ConnectionLost:
                    pass
                self.closed = True
            elif name == "connection.update-secret-ok":
                q = self.pending.get(0)
                ref = q.popleft()[1] if q else None
                if ref:
                    self.fates[ref] = "answered"
                e = self.rec(0, "reply", [name], op=ref)
                # Consumers awaiting their consume-ok count too (an empty tag is
                # learnt from the consume-ok, when the run is judged).
                awaiting = [{"tag": (self.ops.get(r) or {}).get("a", {}).get("consumer_tag", ""),
                             "ch": ch_, "queue": qn, "ref": r}
                            for ch_, pcs in self.pending_consumes.items() for qn, r in pcs]
                self.secret_consumers = {"n": e["n"], "consumers": [
                    {"tag": t, **c} for t, c in self.consumers.items()] + awaiting}
            elif name == "connection.close-ok":
                self.closed = True
            return
        state = self.ch_state.get(ch)
        q = self.pending.get(ch)
        awaiting_open = state == "open" and bool(q) and q[0][0] == SYNC_REPLIES["channel.open"]
        if name == "channel.close" and (state is None or awaiting_open):
            # A second close on a channel already closed and answered (3.10.8 sends one for
            # a method it had queued before the first): recorded, not answered. It may
            # arrive after the runner reopened the channel; a channel awaiting its open-ok
            # cannot have been closed for anything it did, so it is the old one's.
            self.rec(ch, "close", [a["reply_code"], a["reply_text"],
                                   amqp.method_name(a["class_id"], a["method_id"])], op=None,
                     inflight=[])
            return
        if name == "channel.close":
            inflight = [r for r, _ in (self.sent.get(ch) or []) if self.fates.get(r) == "sent"]
            failed = amqp.method_name(a["class_id"], a["method_id"])
            res = _resources_in_text(a["reply_text"])
            culprit = None
            for pref in (True, False):
                for r in inflight:
                    op = self.ops.get(r) or {}
                    if op.get("m") != failed:
                        continue
                    args = json.dumps(op.get("a"))
                    # A `""` queue (and with it a bind's `""` routing key) stands for the
                    # channel's last declared queue, which the text may name.
                    shortcut = op.get("m") != "queue.declare" and (op.get("a") or {}).get("queue") == ""
                    # ... but an exchange the text names is still the op's own.
                    if shortcut:
                        shortcut = all(json.dumps(x) in args for x in _exchanges_in_text(a["reply_text"]))
                    if pref and (not res or not (shortcut or all(json.dumps(r) in args for r in res))):
                        continue
                    culprit = r
                    break
                if culprit:
                    break
            if culprit is None and inflight:
                culprit = inflight[0]
            # The channel handles its methods in order: those before the failed one were
            # processed (a nowait one that failed would be the culprit); the rest were
            # discarded by the closing channel.
            before = True
            for r in inflight:
                if r == culprit:
                    before = False
                self.fates[r] = "settled" if before and culprit else "discarded"
            if culprit:
                self.fates[culprit] = "closed"
            self.rec(ch, "close", [a["reply_code"], a["reply_text"], failed], op=culprit,
                     inflight=inflight)
            self.channel_gone(ch)
            self.sent[ch] = []
            if self.seq.get("auto_close_ok", True):
                try:
                    self.conn.send_method(ch, "channel.close-ok")
                except amqp.ConnectionLost:
                    self.lost("send failed")
                self.ch_state[ch] = None
            else:
                self.ch_state[ch] = "server_closed_wait"
            return
        if state == "client_closing" and name != "channel.close-ok":
            # Replies to methods sent before the close come in order before its close-ok:
            # they are recorded; anything else in flight (deliveries, returns) is racy.
            if not (q and name in q[0][0]):
                return
        if name == "channel.close-ok" and state != "client_closing":
            # The answer to a client close that crossed a server close: not recorded.
            return
        if name in ("basic.deliver",):
            tag = a["delivery_tag"]
            self.tags.setdefault(ch, []).append(tag)
            self.rec(ch, "deliver", [a["consumer_tag"], a["exchange"], a["routing_key"],
                                     amqp.from_bytes(it.body or b""), a["redelivered"]])
            return
        if name == "basic.cancel":
            self.consumers.pop(a["consumer_tag"], None)
            self.rec(ch, "cancel", [a["consumer_tag"]])
            return
        if name in ("basic.ack", "basic.nack"):
            c = self.confirm.get(ch)
            tags = [a["delivery_tag"]]
            if c is not None:
                if a.get("multiple"):
                    tags = sorted(t for t in c["unconfirmed"] if t <= a["delivery_tag"])
                for t in tags:
                    c["unconfirmed"].discard(t)
            for t in tags:
                self.rec(ch, "confirm", ["ack" if name == "basic.ack" else "nack", t])
            return
        if name == "basic.return":
            self.rec(ch, "return", [a["reply_code"], a["reply_text"], a["exchange"],
                                    a["routing_key"], amqp.from_bytes(it.body or b"")])
            return
        if name == "channel.flow":
            return
        # a reply to a synchronous method
        q = self.pending.get(ch)
        ref = None
        if q:
            # RabbitMQ's queue process sends consume-ok and cancel-ok on its own, so a
            # later method's reply may overtake them: match past awaited ones.
            i = 0
            while i < len(q) and name not in q[i][0] and q[i][0] in _QUEUE_PROCESS_REPLIES:
                i += 1
            if 0 < i < len(q) and name in q[i][0]:
                names, ref = q[i]
                del q[i]
            else:
                names, ref = q.popleft()
                if name not in names:
                    self.rec(ch, "unexpected", [name, list(names)], op=ref)
        if ref and not ref.endswith("/open"):
            self.settle_sent(ch, ref)
        data = [name]
        if name == "queue.declare-ok":
            qn = a["queue"]
            if qn.startswith("amq.gen-") and qn not in self.gen_names:
                self.gen_names.append(qn)
            data.append(qn)
        elif name == "basic.consume-ok":
            tag = a["consumer_tag"]
            if tag.startswith("amq.ctag-") and tag not in self.ctags:
                self.ctags.append(tag)
            pc = self.pending_consumes.get(ch)
            if pc:
                qn, cref = pc.popleft()
                self.consumers[tag] = {"ch": ch, "queue": qn, "ref": cref}
            data.append(tag)
            # Its place among the channel's replies is not fixed (see above): compared
            # as a set, like deliveries.
            self.rec(ch, "consume-ok", data, op=ref)
            return
        elif name == "basic.cancel-ok":
            self.consumers.pop(a["consumer_tag"], None)
            data.append(a["consumer_tag"])
        elif name == "basic.get-ok":
            op = self.ops.get(ref) or {}
            if not (op.get("a") or {}).get("no_ack"):
                self.tags.setdefault(ch, []).append(a["delivery_tag"])
            data += [a["exchange"], a["routing_key"], amqp.from_bytes(it.body or b""),
                     a["redelivered"]]
        elif name == "channel.close-ok":
            self.ch_state[ch] = None
            self.channel_gone(ch)
        elif name == "confirm.select-ok":
            pass
        self.rec(ch, "reply", data, op=ref)

    def read_until(self, done, deadline: float) -> bool:
        while not self.closed:
            if done():
                return True
            try:
                items = self.conn.read(deadline)
            except amqp.ConnectionLost as e:
                self.lost(str(e))
                return True
            for it in items:
                self.handle(it)
                if self.closed:
                    break
            if not items and time.monotonic() >= deadline:
                return done()
        return True

    def quiet(self, seconds: float, cap: float = 0.5) -> None:
        """Reads until nothing arrives for `seconds` (at most `cap`)."""
        end = time.monotonic() + cap
        while not self.closed and time.monotonic() < end:
            try:
                items = self.conn.read(min(end, time.monotonic() + seconds))
            except amqp.ConnectionLost as e:
                self.lost(str(e))
                return
            if not items:
                return
            for it in items:
                self.handle(it)

    def barrier(self, step_i: int) -> None:
        frames = []
        for k, (ch, st) in enumerate(sorted(self.ch_state.items())):
            if st == "open":
                frames.append(amqp.method_frame(ch, "channel.flow", {"active": True}))
                self.expect(ch, ("channel.flow-ok",), f"{step_i}.{1000 + k}")
                self.sent.setdefault(ch, []).append((f"{step_i}.{1000 + k}", True))
                self.ops[f"{step_i}.{1000 + k}"] = {"ch": ch, "m": "channel.flow", "a": {"active": True}}
                self.fates[f"{step_i}.{1000 + k}"] = "sent"
        if frames and not self.closed:
            try:
                self.conn.send(b"".join(frames))
            except amqp.ConnectionLost:
                self.lost("send failed")
                return
        ok = self.read_until(lambda: not any(self.pending.values()),
                             time.monotonic() + WAIT_TIMEOUT_S)
        if not ok and not self.closed:
            waiting = {ch: [n for n, _ in q] for ch, q in self.pending.items() if q}
            self.rec(0, "timeout", [json.dumps(waiting, sort_keys=True)])
            self.closed = True
            self.conn_close = {"code": None, "text": "timeout", "step": self.step}

    # -- the whole run
    def run(self) -> dict:
        t0 = time.monotonic()
        try:
            self.conn = amqp.handshake(self.side.host, self.side.port, self.vhost, self.tokens[0],
                                       cancel_notify=self.seq.get("cancel_notify", True))
            login = "ok"
        except amqp.LoginRefused as e:
            login = e.what
        self.rec(0, "login", [login])
        if login == "ok":
            steps = self.seq["steps"]
            for i, step in enumerate(steps):
                if self.closed:
                    break
                self.step = i
                self.send_step(step["ops"], i)
                if step.get("wait") and not self.closed:
                    self.barrier(i)
                    if any(op["m"] in ("basic.publish", "basic.nack", "basic.reject", "basic.consume",
                                       "basic.cancel", "queue.delete", "basic.qos")
                           for op in step["ops"]):
                        self.quiet(SETTLE_S, 0.2)
            self.step = len(steps)
            if not self.closed:
                self.barrier(len(steps))
                self.quiet(QUIET_S)
            if not self.closed:
                try:
                    self.conn.send_method(0, "connection.close", {"reply_code": 200, "reply_text": "bye"})
                    self.read_until(lambda: self.closed, time.monotonic() + 2)
                except amqp.ConnectionLost:
                    pass
            self.conn.close_socket()
        self.timings["session"] = time.monotonic() - t0
        return {
            "side": self.side.name,
            "login": login,
            "events": self.events,
            "conn_close": self.conn_close,
            "gen_names": self.gen_names,
            "ctags": self.ctags,
            "fates": self.fates,
            "ops": self.ops,
            "methods": self.methods,
            "secret_consumers": self.secret_consumers,
        }


# ------------------------------------------------------------------------------------------
# broker state


def admin_counts(node: Node, vhost: str, queues: list[str]) -> dict[str, int | None]:
    if not queues:
        return {}
    c = amqp.handshake(node.amqp_host, node.amqp_port, vhost, node.admin_password,
                       username=node.admin_user)
    out: dict[str, int | None] = {q: None for q in queues}
    try:
        frames = [amqp.method_frame(1, "channel.open")]
        for q in queues:
            frames.append(amqp.method_frame(1, "queue.declare", {"queue": q, "passive": True}))
        c.send(b"".join(frames))
        got = 0
        deadline = time.monotonic() + 3
        while got < len(queues) and time.monotonic() < deadline:
            for it in c.read(deadline):
                if it.name == "queue.declare-ok":
                    out[it.args["queue"]] = it.args["message_count"]
                    got += 1
                elif it.name == "channel.close":
                    got = len(queues)
    finally:
        c.close_socket()
    return out


def snapshot(node: Node, vhost: str) -> dict:
    v = urllib.parse.quote(vhost, safe="")
    deadline = time.monotonic() + 4
    prev = None
    while True:
        conns = node.api("GET", f"/api/vhosts/{v}/connections") or []
        qs = node.api("GET", f"/api/queues/{v}?disable_stats=true") or []
        names = sorted(q["name"] for q in qs)
        busy = conns or any(q.get("exclusive") for q in qs)
        if not busy and names == prev:
            break
        if time.monotonic() > deadline:
            break
        prev = None if busy else names
        time.sleep(0.01 if not busy else 0.02)
    xs = node.api("GET", f"/api/exchanges/{v}?disable_stats=true") or []
    bs = node.api("GET", f"/api/bindings/{v}") or []
    counts = admin_counts(node, vhost, names)
    return {
        "queues": sorted([q["name"], q.get("durable"), q.get("auto_delete"),
                          sorted_args(q.get("arguments")), counts.get(q["name"])] for q in qs),
        "exchanges": sorted([x["name"], x["type"], x.get("durable"), x.get("auto_delete"),
                             x.get("internal"), sorted_args(x.get("arguments"))]
                            for x in xs if x["name"] and not x["name"].startswith("amq.")),
        "bindings": sorted([b["source"], b["destination"], b["destination_type"],
                            b["routing_key"], sorted_args(b.get("arguments"))]
                           for b in bs if b["source"]),
    }


def sorted_args(args) -> str:
    return json.dumps(args or {}, sort_keys=True)
