"""The documented differences (tests/session_fuzz/differences.md) as predicates, and the
gateway oracles.

A rule recognises the FIRST divergence of a channel: `explain(d, ctx)` returns the id of
the rule that explains `d`, or None. Rules are deliberately narrow: each checks the method
the divergence is about (the gateway's refused method must be the one the reference
answered or refused, never a later one: RabbitMQ processes a channel's methods in order),
the exact refusal, and, with the 4.2 scope semantics in `perms.py`, that RabbitMQ 4.2
would decide as the gateway did.

The oracles check the gateway's recording alone, for the places where the reference
(3.10.8) checks nothing, so agreement with it proves nothing: what 4.2 refuses there, the
gateway must refuse too.
"""

from __future__ import annotations

import json
import re

from .compare import normalizer, op_key
from .perms import Perms, fill

_RES = re.compile(r"^ACCESS_REFUSED - (?:(configure|write|read) )?access to (queue|exchange) '(.*)' "
                  r"in vhost '(.*)' refused for user '(.*)'$")
_TOPIC = re.compile(r"^ACCESS_REFUSED - (?:(configure|write|read) )?access to topic '(.*)' in exchange "
                    r"'(.*)' in vhost '(.*)' refused for user '(.*)'$")


class Ctx:
    def __init__(self, seq: dict, ref: dict, gw: dict, vhost: str, users: list[str]):
        self.seq, self.ref, self.gw, self.vhost, self.users = seq, ref, gw, vhost, users
        toks = seq["tokens"]
        self.p = [Perms(fill(t["scopes"], vhost)) for t in toks]
        self.secret_step = None
        self.secret_index = None
        for i, s in enumerate(seq["steps"]):
            for j, o in enumerate(s["ops"]):
                if o["m"] == "connection.update-secret":
                    self.secret_step, self.secret_index = i, j
                    break
            if self.secret_step is not None:
                break
        self.norm_gw = normalizer(gw, users)
        self.norm_ref = normalizer(ref, users)
        self.raw_gw = {e["n"]: e for e in gw["events"]}

    def op(self, side: str, ref: str | None) -> dict | None:
        if not ref:
            return None
        return (self.gw if side == "gw" else self.ref)["ops"].get(ref)

    def perms_at(self, ref: str | None) -> list[Perms]:
        """The permissions that may be in force for the op `ref` (both around the refresh)."""
        if self.secret_step is None or ref is None:
            return [self.p[0]]
        s, i = op_key(ref)
        if s < self.secret_step:
            return [self.p[0]]
        if s > self.secret_step:
            return [self.p[1]]
        # The gateway decides the client's methods in the order they were sent: what
        # follows the refresh only once it has the new token, what precedes it with the
        # old one.
        if i > self.secret_index:
            return [self.p[1]]
        if i < self.secret_index:
            return [self.p[0]]
        return [self.p[0], self.p[1]]

    def raw_text(self, e: dict) -> str:
        return self.raw_gw.get(e["n"], e)["data"][1]


def _is_close(e, code=None) -> bool:
    return e is not None and e["kind"] == "close" and (code is None or e["data"][0] == code)


def _order_ok(d, op: dict | None = None, c: Ctx | None = None) -> bool:
    """The reference's event is about the gateway's refused method or a later one (the
    gateway may not refuse a method before the broker has answered the earlier ones)."""
    g, r = d.gw, d.ref
    k = op_key(g.get("op"))
    if g.get("op") is None:
        return False
    if r is None or r["kind"] not in ("close", "reply", "return"):
        return True
    if r["kind"] == "return":
        # The return of the refused publish itself (which the reference let through) ...
        if bool(op) and op["m"] == "basic.publish" and r["data"][2:5] == [
                op["a"]["exchange"], op["a"]["routing_key"], op["a"].get("body", "")]:
            return True
        # ... or of a later publish on the channel (returns carry no op: the publish is
        # the one with that exchange, key and body, which the generator makes unique).
        return c is not None and _later_return(c, r, k)
    return op_key(r.get("op")) >= k


def _later_return(c: Ctx, r: dict, after: tuple) -> bool:
    """`r`, a reference `basic.return`, is for a publish on its channel after `after`."""
    refs = [ref for ref, o in c.ref["ops"].items()
            if o["m"] == "basic.publish" and o["ch"] == r["ch"]
            and [o["a"].get("exchange"), o["a"].get("routing_key"), o["a"].get("body", "")]
            == r["data"][2:5]]
    return bool(refs) and all(op_key(ref) > after for ref in refs)


def _same_refusal(d) -> bool:
    """The reference refused the same method with the same 403 text (then the divergence is
    not about this decision)."""
    return _is_close(d.ref, 403) and d.ref.get("op") == d.gw.get("op") and d.ref["data"] == d.gw["data"]


def first_entry(table, key):
    for k, t, v in table or []:
        if k == key:
            return t, v
    return None


def routing_keys(op: dict) -> list[str]:
    """RabbitMQ 4.2's routing keys of a publish: the routing key, then the longstr elements
    of the FIRST `CC` entry and of the FIRST `BCC` entry (rabbit_basic:header_routes)."""
    a = op["a"]
    keys = [a.get("routing_key", "")]
    headers = (a.get("props") or {}).get("headers") or []
    for h in ("CC", "BCC"):
        fe = first_entry(headers, h)
        if fe and fe[0] == "A":
            keys += [v for t, v in fe[1] if t == "S"]
    return keys


# ------------------------------------------------------------------------------------------
# rules


def passive_declare(d, c: Ctx) -> bool:
    """V-PASSIVE: a passive declare refused by the gateway (4.2.7+: any of read/write/
    configure on the resource), answered or 404ed by 3.10.8 (no check)."""
    g = d.gw
    if d.kind != "ordered" or not _is_close(g, 403) or _same_refusal(d):
        return False
    op = c.op("gw", g.get("op"))
    if not op or op["m"] not in ("queue.declare", "exchange.declare") or not op["a"].get("passive"):
        return False
    kind = op["m"].split(".")[0]
    name = op["a"].get(kind, "")
    if any(p.any_resource(c.vhost, name) for p in c.perms_at(g["op"])):
        return False
    m = _RES.match(g["data"][1])
    if not m or m.group(2) != kind or m.group(3) != c.norm_gw(name):
        return False
    return _order_ok(d, c=c)


def cc_bcc_topic(d, c: Ctx) -> bool:
    """V-CC-BCC: 4.0.3+ topic-checks the first CC and BCC entries' keys of a publish to a
    topic exchange; 3.10.8 checks only the routing key."""
    g = d.gw
    if d.kind != "ordered" or not _is_close(g, 403) or _same_refusal(d):
        return False
    op = c.op("gw", g.get("op"))
    if not op or op["m"] != "basic.publish":
        return False
    m = _TOPIC.match(g["data"][1])
    if not m or m.group(3) != op["a"]["exchange"]:
        return False
    keys = routing_keys(op)
    for p in c.perms_at(g["op"]):
        failing = [k for k in keys if not p.topic("write", c.vhost, op["a"]["exchange"], k)]
        # The first failing key is the one 4.2 names, and it is not the routing key
        # (3.10.8 checks that one too).
        if failing and failing[0] == m.group(2) and keys[0] != m.group(2) and \
                p.topic("write", c.vhost, op["a"]["exchange"], keys[0]):
            return _order_ok(d, op, c)
    return False


def _queue_of(c: Ctx, x: dict) -> str:
    """A consumer's queue; `""` is the last queue declared on its channel before it."""
    if x["queue"] or not x.get("ref"):
        return x["queue"]
    oks = [e for e in c.gw["events"] if e["ch"] == x["ch"] and e["kind"] == "reply"
           and e["data"][0] == "queue.declare-ok" and op_key(e.get("op")) < op_key(x["ref"])]
    return oks[-1]["data"][1] if oks else ""


def _must_cancel(c: Ctx) -> list[dict]:
    sc = c.gw.get("secret_consumers")
    if not sc:
        return []
    out = []
    for x in sc["consumers"]:
        if not x["tag"]:
            oks = [e for e in c.gw["events"] if e["kind"] == "consume-ok" and e.get("op") == x.get("ref")]
            if not oks:
                continue
            x = {**x, "tag": c.raw_gw.get(oks[0]["n"], oks[0])["data"][1]}
        q = _queue_of(c, x)
        if q and not q.startswith("amq.rabbitmq.reply-to") and not c.p[1].resource("read", c.vhost, q):
            out.append({**x, "queue": q})
    return out


def update_secret(d, c: Ctx) -> bool:
    """V-UPDATE-SECRET: after connection.update-secret, 4.2.6+ re-checks vhost access (530),
    cancels consumers whose queue is no longer readable and decides every later operation
    with the new token; 3.10.8 does none of that (and its channels keep up to 12 cached
    permission checks until their next tick)."""
    if c.secret_step is None or d.step < c.secret_step:
        return False
    g = d.gw
    if d.kind == "ordered" and g is not None and g["kind"] == "conn-close" and g["data"][0] == 530:
        return not c.p[1].vhost(c.vhost) and "refused" in g["data"][1]
    # The refusal of the refresh closes the connection at once: replies the broker had not
    # sent yet for methods pipelined in the same step never come (RabbitMQ's reader closes
    # it too while its channels answer on their own).
    if (d.kind == "ordered" and g is None and d.step >= c.secret_step
            and not c.p[1].vhost(c.vhost)
            and any(e["kind"] == "conn-close" and e["data"][0] == 530 for e in c.gw["events"])):
        return True
    if d.kind == "async":
        tags = {x["tag"] for x in _must_cancel(c)}
        gw_cancels = [e for e in d.gw_extra if e["kind"] == "cancel"]
        if gw_cancels and all(c.gw["ops"] and _raw_tag(c, e) in tags for e in gw_cancels):
            return True
        # The reference still delivers to consumers the gateway cancelled.
        if tags and not d.gw_extra and all(e["kind"] in ("deliver", "confirm") for e in d.ref_extra):
            return True
        return False
    if d.kind == "ordered" and _is_close(g, 403) and not _same_refusal(d):
        # Decided with the new token: sent after the refresh in the client's stream.
        if op_key(g.get("op")) <= (c.secret_step, c.secret_index):
            return False
        raw = c.raw_text(g)
        op = c.op("gw", g.get("op"))
        if op is None:
            return False
        m = _RES.match(raw)
        if m and m.group(1):
            perm, name = m.group(1), m.group(3)
            return (not c.p[1].resource(perm, c.vhost, name)) and c.p[0].resource(perm, c.vhost, name)
        m = _TOPIC.match(raw)
        if m and m.group(1):
            perm, rk, x = m.group(1), m.group(2), m.group(3)
            return (not c.p[1].topic(perm, c.vhost, x, rk)) and c.p[0].topic(perm, c.vhost, x, rk)
    return False


def _raw_tag(c: Ctx, e: dict) -> str:
    return c.raw_gw.get(e["n"], e)["data"][0]


def dlx_ae_existing(d, c: Ctx) -> bool:
    """F-DLX-AE: the gateway checks the x-dead-letter-exchange / alternate-exchange
    permissions (read on the declared resource, write on the FIRST entry's exchange) even
    when the queue or exchange exists; RabbitMQ only for a new one."""
    g = d.gw
    if d.kind != "ordered" or not _is_close(g, 403) or _same_refusal(d):
        return False
    # The runner attributes a close to the first in-flight method of its kind that names
    # what the text names: with two declares of one name in flight (the first `nowait`),
    # that is the first, though the refused one is the one with the argument.
    refs = [g.get("op")] + [r for r in g.get("inflight") or [] if r != g.get("op")]
    return any(_dlx_ae_refusal(d, c, c.op("gw", r), r) for r in refs if r)


def _dlx_ae_refusal(d, c: Ctx, op: dict | None, ref: str) -> bool:
    g = d.gw
    if not op or op["m"] not in ("queue.declare", "exchange.declare") or op["a"].get("passive"):
        return False
    kind = op["m"].split(".")[0]
    key = "x-dead-letter-exchange" if kind == "queue" else "alternate-exchange"
    fe = first_entry(op["a"].get("arguments"), key)
    if not fe or fe[0] != "S":
        return False
    # RabbitMQ checks the default exchange `""` as `amq.default`.
    name, target = op["a"].get(kind, ""), fe[1] or "amq.default"
    m = _RES.match(c.raw_text(g))
    if not m:
        return False
    for p in c.perms_at(ref):
        if not p.resource("configure", c.vhost, name):
            continue
        if m.group(2) == kind and m.group(3) == name and (m.group(1) in (None, "read")) \
                and not p.resource("read", c.vhost, name):
            return _order_ok(d, c=c)
        if m.group(2) == "exchange" and m.group(3) == target and (m.group(1) in (None, "write")) \
                and p.resource("read", c.vhost, name) and not p.resource("write", c.vhost, target):
            return _order_ok(d, c=c)
    return False


def _declared_before(side: dict, x: str, ref: str) -> bool:
    """Whether exchange `x` exists on that side when op `ref` runs (declared and not deleted
    by an op the broker processed before it)."""
    exists = False
    ops = sorted(side["ops"].items(), key=lambda kv: op_key(kv[0]))
    # A method the runner saw no reply for was still processed when a later one on its
    # channel was answered (a channel handles its methods in order; the runner may lose
    # track of replies when RabbitMQ drops a consume-ok on a closing channel).
    last_answered: dict[int, tuple] = {}
    for r, op in ops:
        if side["fates"].get(r) in ("answered", "settled") and op_key(r) < op_key(ref):
            last_answered[op["ch"]] = op_key(r)
    # ... or when the runner reopened the channel after it (its close was answered).
    for e in side["events"]:
        if e["kind"] == "reply" and e["data"][0] == "channel.open-ok" and e.get("op") \
                and op_key(e["op"]) < op_key(ref):
            last_answered[e["ch"]] = max(last_answered.get(e["ch"], (-1, 0)), op_key(e["op"]))
    for r, op in ops:
        if op_key(r) >= op_key(ref):
            break
        fate = side["fates"].get(r)
        if fate not in ("answered", "settled") and not (
                fate == "sent" and op_key(r) < last_answered.get(op["ch"], (-1, 0))):
            continue
        if op["m"] == "exchange.declare" and op["a"].get("exchange") == x and not op["a"].get("passive"):
            exists = True
        elif op["m"] == "exchange.delete" and op["a"].get("exchange") == x:
            exists = False
    return exists


def missing_exchange_topic(d, c: Ctx) -> bool:
    """F-MISSING-X: a publish, bind or unbind naming a missing exchange whose topic check
    fails. Publishes and binds get RabbitMQ's 404 from the gateway itself once the
    management API says the exchange is missing; the gateway still checks it as a topic
    exchange (403) where it does not believe that (the connection just declared the name
    itself) or for an unbind (RabbitMQ answers unbind-ok: nothing to remove)."""
    g, r = d.gw, d.ref
    if (d.kind == "ordered" and _is_close(g, 406) and _is_close(r, 404) and g.get("op")
            and g["data"][1].startswith("PRECONDITION_FAILED - user_id property set to")):
        # The same for the user_id check, which RabbitMQ makes after finding the exchange.
        # The runner attributes the 406 (its text names no resource) to the earliest method
        # in flight; the reference's 404 names the publish itself.
        ref_ = g.get("op") if g.get("op") == r.get("op") else r.get("op")
        if not ref_ or op_key(g["op"]) > op_key(ref_):
            return False
        op = c.op("gw", ref_)
        uid = re.match(r"PRECONDITION_FAILED - user_id property set to '(.*)' but", g["data"][1])
        return bool(op) and bool(uid) and op["m"] == "basic.publish" \
            and (op["a"].get("props") or {}).get("user_id") == uid.group(1) \
            and r["data"][1].startswith(f"NOT_FOUND - no exchange '{op['a']['exchange']}'")
    if d.kind != "ordered" or not _is_close(g, 403) or r is None:
        return False
    op = c.op("gw", g.get("op"))
    # A 404 the reference's runner took for a late second close (no op) is about the
    # same method when it names it.
    unattributed = r.get("op") is None and _is_close(r, 404) and bool(op) and r["data"][2] == op["m"]
    if g.get("op") != r.get("op") and not unattributed:
        # An unbind from a missing exchange is answered unbind-ok, which is not recorded
        # when its step does not wait: the reference's next event is a later method's.
        later = op_key(r.get("op")) > op_key(g.get("op")) if r.get("op") else False
        # ... or a basic.return for a later publish on the channel.
        if r["kind"] == "return" and op:
            later = _later_return(c, r, op_key(g["op"]))
        if not (op and op["m"] in ("queue.unbind", "exchange.unbind") and later):
            return False
        m = _TOPIC.match(g["data"][1])
        src = op["a"].get("exchange", op["a"].get("source"))
        return bool(m) and m.group(3) == src and src not in ("amq.topic",) \
            and not _declared_before(c.ref, src, g["op"])
    if not op or op["m"] not in ("basic.publish", "queue.bind", "queue.unbind", "exchange.bind",
                                 "exchange.unbind"):
        return False
    m = _TOPIC.match(g["data"][1])
    if not m:
        return False
    x = m.group(3)
    if _is_close(r, 404):
        return r["data"][1].startswith(f"NOT_FOUND - no exchange '{x}'")
    if r["kind"] == "reply" and r["data"][0] in ("queue.unbind-ok", "exchange.unbind-ok"):
        return x not in ("amq.topic",) and not _declared_before(c.ref, x, g["op"])
    return False


def nowait_declared_exchange(d, c: Ctx) -> bool:
    """F-NOWAIT-X: a method naming an exchange that the same channel declared with `nowait`
    just before, refused by the gateway's topic check. A `nowait` declare has no reply the
    gateway could learn the type from, and its lookup in the management API may run before
    the broker has made the exchange: the gateway fails closed (topic check, 403) where
    RabbitMQ, knowing the type, lets a non-topic exchange through."""
    g = d.gw
    if d.kind != "ordered" or not _is_close(g, 403) or _same_refusal(d):
        return False
    op = c.op("gw", g.get("op"))
    if not op or op["m"] not in ("basic.publish", "queue.bind", "queue.unbind", "exchange.bind",
                                 "exchange.unbind"):
        return False
    m = _TOPIC.match(c.raw_text(g))
    if not m:
        return False
    perm, key, x = m.group(1) or "write", m.group(2), m.group(3)
    declared = False
    for ref, o in sorted(c.gw["ops"].items(), key=lambda kv: op_key(kv[0])):
        if op_key(ref) >= op_key(g["op"]):
            break
        name = (o.get("a") or {}).get("exchange")
        if o["ch"] != op["ch"] or name != x:
            continue
        if o["m"] == "exchange.declare" and not o["a"].get("passive"):
            declared = bool(o["a"].get("nowait")) and o["a"].get("type") != "topic"
        elif o["m"] == "exchange.delete":
            declared = False
    if not declared:
        return False
    if any(p.topic(perm, c.vhost, x, key) for p in c.perms_at(g["op"])):
        return False
    return _order_ok(d, op, c)


def server_named_probe(d, c: Ctx) -> bool:
    """F-PROBE: `queue.declare ""` is checked against a random probe `amq.gen-…` name, not
    the name the broker then chooses; scopes that match some `amq.gen-…` names but not
    others decide differently."""
    g, r = d.gw, d.ref
    if d.kind != "ordered" or g is None or r is None or g.get("op") != r.get("op"):
        return False
    op = c.op("gw", g.get("op"))
    if not op or op["m"] != "queue.declare" or op["a"].get("queue") != "" or op["a"].get("passive"):
        return False
    # Both refuse, one naming the probe and the other the chosen name.
    gen = re.compile(r"amq\.gen#\d+")
    if _is_close(g, 403) and _is_close(r, 403) and gen.sub("amq.gen#", g["data"][1]) == \
            gen.sub("amq.gen#", r["data"][1]):
        return True
    partial = [gr for p in c.perms_at(g["op"]) for gr in p.grants
               if gr[0] in ("configure", "read") and gr[2].startswith("amq.gen-") and gr[2] != "amq.gen-*"]
    return bool(partial)


def non_utf8_name(d, c: Ctx) -> bool:
    """F-UTF8: the gateway closes the connection (502) over a method whose names are not
    valid UTF-8; RabbitMQ accepts any bytes."""
    g = d.gw
    if d.kind != "ordered" or g is None or g["kind"] != "conn-close" or g["data"][0] != 502:
        return False
    if "cannot decode" not in g["data"][1]:
        return False
    for s in c.seq["steps"]:
        for o in s["ops"]:
            if any(isinstance(v, str) and any(0xDC80 <= ord(ch) <= 0xDCFF for ch in v)
                   for v in o.get("a", {}).values()):
                return True
    return False


def internal_exchange(d, c: Ctx) -> bool:
    """F-INTERNAL: a publish to an internal exchange whose topic check fails: both refuse it
    (403), RabbitMQ with `cannot publish to internal exchange`, which it checks before the
    topic, the gateway with the topic refusal (it checks permissions only)."""
    g, r = d.gw, d.ref
    if d.kind != "ordered" or not (_is_close(g, 403) and _is_close(r, 403)):
        return False
    if g.get("op") != r.get("op") or g["data"][2] != "basic.publish":
        return False
    m = _TOPIC.match(g["data"][1])
    return bool(m) and r["data"][1].startswith(
        f"ACCESS_REFUSED - cannot publish to internal exchange '{m.group(3)}'")


_GENERATED = re.compile(r"(amq\.gen|amq\.ctag)#\d+")


def generated_names(d, c: Ctx) -> bool:
    """R-NAMES (harness): the same event for the same method on both sides, but naming a
    different server-chosen queue or consumer tag in the order of first appearance: the
    runner resolves `$gen`/`$ctag` placeholders from replies that, in a step it does not
    wait on, may not have arrived yet (and the gateway's probe name for a refused
    server-named declare is not the broker's)."""
    if d.kind == "async":
        # The same asynchronous events (consume-ok for `""` tags on several channels),
        # numbered in another order of arrival.
        def norm(e: dict) -> tuple:
            return e["kind"], e.get("op") or "", _GENERATED.sub("#", json.dumps(e["data"]))
        return bool(d.ref_extra) and sorted(map(norm, d.ref_extra)) == sorted(map(norm, d.gw_extra))
    g, r = d.gw, d.ref
    if d.kind != "ordered" or g is None or r is None or g["kind"] != r["kind"]:
        return False
    if g.get("op") != r.get("op"):
        return False
    a, b = json.dumps(g["data"]), json.dumps(r["data"])
    return a != b and _GENERATED.sub("#", a) == _GENERATED.sub("#", b)


# `basic.get` takes a message: two channels' gets of one message race for it.
_MUTATING = {"queue.delete", "exchange.delete", "queue.purge", "queue.declare", "exchange.declare",
             "queue.bind", "queue.unbind", "exchange.bind", "exchange.unbind", "basic.get"}


def _names(side: dict, op: dict, ref: str) -> set[str]:
    """The queues and exchanges `op` names; `""` is the channel's last declared queue."""
    a = op.get("a") or {}
    out = {a[k] for k in ("queue", "exchange", "source", "destination") if a.get(k)}
    if a.get("queue") == "":
        oks = [e for e in side["events"] if e["ch"] == op["ch"] and e["kind"] == "reply"
               and e["data"][0] == "queue.declare-ok" and op_key(e.get("op")) < op_key(ref)]
        if oks:
            out.add(oks[-1]["data"][1])
    return out


def _unwaited_from(c: Ctx, step: int) -> int:
    """The first step of the run of steps that go out together with `step` (steps the
    runner does not wait on run together with the next ones)."""
    first = step
    while first > 0 and not c.seq["steps"][first - 1].get("wait"):
        first -= 1
    return first


def _unwaited_to(c: Ctx, step: int) -> int:
    """The last step of that run: the first one from `step` on that the runner waits on."""
    last = step
    while last < len(c.seq["steps"]) - 1 and not c.seq["steps"][last].get("wait"):
        last += 1
    return last


def _state_race(d, c: Ctx) -> bool:
    """Final states that differ only in the message counts of queues that a publish
    raced for with a declare, delete, purge, bind or get of that queue on another
    channel."""
    def queues(lines: list[str]) -> dict:
        out = {}
        for line in lines:
            if not line.startswith("queues: "):
                return {}
            q = json.loads(line[len("queues: "):])
            out[q[0]] = q
        return out
    r, g = queues(d.ref_extra), queues(d.gw_extra)
    if not r or r.keys() != g.keys() or any(r[q][:-1] != g[q][:-1] for q in r):
        return False
    ops = sorted(c.gw["ops"].items(), key=lambda kv: op_key(kv[0]))
    for q in r:
        raced = False
        for ref_, op in ops:
            if op["m"] != "basic.publish":
                continue
            step = op_key(ref_)[0]
            lo, hi = _unwaited_from(c, step), step
            # ... or a later step sent before this one was waited on
            while hi + 1 < len(c.seq["steps"]) and not c.seq["steps"][hi].get("wait"):
                hi += 1
            for r2, other in ops:
                if lo <= op_key(r2)[0] <= hi and other["ch"] != op["ch"] \
                        and other["m"] in _MUTATING and q in _names(c.gw, other, r2):
                    raced = True
        if not raced:
            return False
    return True


def _state_exchange_race(d, c: Ctx) -> bool:
    """Final states that differ only in exchanges, and in bindings from or to them, that
    an `exchange.declare` and an `exchange.delete` on different channels, sent without a
    wait between them, raced for: which of the two the broker ran last is not defined."""
    ops = c.gw["ops"].items()
    declares = [(op_key(r)[0], op["ch"], op["a"].get("exchange")) for r, op in ops
                if op["m"] == "exchange.declare" and not op["a"].get("passive")]
    raced = set()
    for r, op in ops:
        if op["m"] != "exchange.delete":
            continue
        step, x = op_key(r)[0], op["a"].get("exchange")
        first, last = _unwaited_from(c, step), _unwaited_to(c, step)
        if any(first <= s <= last and ch != op["ch"] and name == x for s, ch, name in declares):
            raced.add(x)
    if not raced:
        return False
    for line in d.ref_extra + d.gw_extra:
        kind, _, rest = line.partition(": ")
        row = json.loads(rest)
        if kind == "exchanges":
            involved = {row[0]}
        elif kind == "bindings":
            involved = {row[0]} | ({row[1]} if row[2] == "exchange" else set())
        else:
            return False
        if not involved & raced:
            return False
    return True


def cross_channel_race(d, c: Ctx) -> bool:
    """R-CROSS-CHANNEL (race): the divergent method shares a queue or exchange with a
    method sent with it (in its step, or in steps the runner did not wait between) on
    another channel, one of them changing it (declare, delete, purge, bind, unbind, or a
    `basic.get` taking a message). RabbitMQ runs channels concurrently: which one the
    broker handles first is not defined, and the gateway's pauses (a type lookup, a
    server-named declare) change the timing."""
    if d.kind == "async":
        # Deliveries on one side only to a consumer whose channel failed around that step
        # (on both sides): whether a publish from another channel reached the queue before
        # the failing channel's consumers were removed is a race.
        extra = d.ref_extra + d.gw_extra
        if not extra or (d.ref_extra and d.gw_extra) or any(e["kind"] != "deliver" for e in extra):
            return False

        def failed_near(side: dict, step: int) -> bool:
            return any(x["ch"] == d.ch and x["kind"] == "close" and abs(x["step"] - step) <= 1
                       for x in side["events"])
        return all(failed_near(c.gw, e["step"]) and failed_near(c.ref, e["step"]) for e in extra)
    if d.kind == "state":
        return _state_race(d, c) or _state_exchange_race(d, c)
    if d.kind != "ordered":
        return False
    for e in (d.gw, d.ref):
        if e is None or not e.get("op"):
            continue
        side = c.gw if e is d.gw else c.ref
        op = side["ops"].get(e["op"])
        if not op:
            continue
        step = op_key(e["op"])[0]
        first, last = _unwaited_from(c, step), _unwaited_to(c, step)
        names = _names(side, op, e["op"])
        for r, other in side["ops"].items():
            if not (first <= op_key(r)[0] <= last) or other["ch"] == op["ch"] \
                    or not (_names(side, other, r) & names):
                continue
            if other["m"] in _MUTATING or op["m"] in _MUTATING:
                return True
        if op["m"] == "basic.consume" and _exclusive_holder_closed(c, side, op, first, last):
            return True
    return False


def _exclusive_holder_closed(c: Ctx, side: dict, op: dict, first: int, last: int) -> bool:
    """An exclusive consumer on `op`'s queue, on another channel that failed (closed by the
    broker) within the same run of steps: whether the broker had removed it when `op`'s
    consume came ("in exclusive use" or not) is a race between the two channels."""
    q = op["a"].get("queue")
    for other in side["ops"].values():
        if other["m"] != "basic.consume" or other["ch"] == op["ch"] \
                or not other["a"].get("exclusive") or other["a"].get("queue") != q:
            continue
        if any(x["ch"] == other["ch"] and x["kind"] == "close" and first <= x["step"] <= last
               for x in c.ref["events"] + c.gw["events"]):
            return True
    return False


def lost_before_close_ok(d, c: Ctx) -> bool:
    """R-LOST-REPLIES (race): on both sides the client's `channel.close` was answered with
    `close-ok` while replies to methods sent before it were still awaited, and the sides
    differ only in which reply was the first one lost. RabbitMQ 3.10.8's channel process
    can die with methods still queued (a `consume-ok` after a cancel crashes it); its
    reader then answers the client's close with `close-ok`, and how far the channel got
    first depends on timing. Both sides show it, so it is not the gateway's."""
    if d.kind != "ordered" or d.ref is None or d.gw is None:
        return False
    return all(e["kind"] == "unexpected" and e["data"][0] == "channel.close-ok"
               and e["ch"] == d.ch for e in (d.ref, d.gw)) and d.ref["step"] == d.gw["step"]


GATEWAY_541 = "INTERNAL_ERROR - gateway: the broker did not answer channel.close"


def broker_internal_error(d, c: Ctx) -> bool:
    """R-BROKER-541 (race): one side's connection was closed with `541 INTERNAL_ERROR`,
    after a step that pipelined a `basic.consume` and a `basic.cancel` of the same tag on
    one channel. It is RabbitMQ 3.10.8's own crash on that pipeline (`badkey` in its
    channel's `consumer_monitor`, reproduced straight against the broker): relayed as it
    comes, or, when the channel died while a refusal's close of the gateway's was on its
    way, the gateway's own 541 once that close went unanswered for
    `backend.close_timeout_ms` (the refusal reached the client first). Whether the broker
    crashes depends on timing, so either side may show it."""
    if d.kind != "ordered" or d.ch != 0:
        return False
    mine = [e for e in (d.ref, d.gw) if e is not None]
    crash = [e for e in mine if e["kind"] == "conn-close" and e["data"][0] == 541]
    # Both sides crashed: their texts differ (RabbitMQ's bare one, the gateway's own).
    both = len(crash) == 2 and any(e["data"][1].startswith(GATEWAY_541) for e in crash)
    if not crash or len(crash) == 2 and not both or len(crash) == 1 and len(mine) == 2 \
            and mine[0]["kind"] == mine[1]["kind"] == "conn-close":
        return False
    for i, step in enumerate(c.seq["steps"][:crash[0]["step"] + 1]):
        first = _unwaited_from(c, i)
        ops = [o for s in c.seq["steps"][first:i + 1] for o in s["ops"]]
        consumed = {(o["ch"], o["a"].get("consumer_tag")) for o in ops if o["m"] == "basic.consume"}
        if any(o["m"] == "basic.cancel" and (o["ch"], o["a"].get("consumer_tag")) in consumed
               for o in ops):
            return True
    return False


def answered_second_close(d, c: Ctx) -> bool:
    """R-SECOND-CLOSE (harness): RabbitMQ closes one side's connection with `504 expected
    'channel.open'` for a `channel.close-ok` the runner sent in answer to 3.10.8's late
    second close (`404 no previously declared queue`, for a `""` method its closing channel
    expanded). That close reached the runner, on that side only, after it had sent its own
    close: it took it for the channel's and answered it; on the other side it came before
    and was recorded as the old channel's. When it arrives depends on timing."""
    if d.kind != "ordered":
        return False
    second = [404, "NOT_FOUND - no previously declared queue"]

    def seconds(sd: dict, before: int, answered: bool) -> bool:
        return any(e["ch"] == d.ch and e["kind"] == "close" and e["data"][:2] == second
                   and e["n"] < before and bool(e.get("op")) == answered for e in sd["events"])
    if d.ch != 0:
        # On the channel: one side's runner took that close for its own (and answered it),
        # the other's recorded it as the old channel's; what follows differs.
        pairs = ((c.ref, d.ref, c.gw, d.gw), (c.gw, d.gw, c.ref, d.ref))
        if d.ref is not None and d.gw is not None:
            return any(seconds(a, ea["n"], True) and seconds(b, eb["n"], False)
                       for a, ea, b, eb in pairs)
        # Or it came while the runner's own channel.close was out: a crossing close, taken
        # as the answer, so that side has no close-ok where the other has one.
        return any(ea is None and eb is not None and eb["kind"] == "reply"
                   and seconds(a, 1 << 62, True) and seconds(b, eb["n"], False)
                   for a, ea, b, eb in pairs)
    for mine, side in ((d.ref, c.ref), (d.gw, c.gw)):
        if mine is None or mine["kind"] != "conn-close" or mine["data"][:3] != [
                504, "CHANNEL_ERROR - expected 'channel.open'", "channel.close-ok"]:
            continue
        other = d.gw if mine is d.ref else d.ref
        if other is not None and other["kind"] == "conn-close":
            continue
        if any(e["kind"] == "close" and e["data"][:2] == [404, "NOT_FOUND - no previously declared queue"]
               and e.get("op") and e["n"] < mine["n"] for e in side["events"]):
            return True
    return False


def runner_reopen(d, c: Ctx) -> bool:
    """R-REOPEN (harness): the runner reopened a channel on one side only. Its channel had
    been closed on both sides, by a method in a step it did not wait on; whether that
    close had been read when the next step decided its opens depends on timing (the
    gateway's refusals take one more round trip than RabbitMQ's). Never for a gateway
    that stopped answering: a timeout on the gateway side is no such case."""
    if d.kind != "ordered":
        return False
    if any(e["kind"] == "timeout" for e in c.gw["events"]):
        return False

    def closes(sd: dict, before: int) -> bool:
        return any(e["ch"] == d.ch and e["kind"] == "close" and e["n"] < before
                   for e in sd["events"])

    def last_open(sd: dict, before: int) -> dict | None:
        opens = [e for e in sd["events"] if e["ch"] == d.ch and e["kind"] == "reply"
                 and e["data"] == ["channel.open-ok"] and (e.get("op") or "").endswith("/open")
                 and e["n"] < before]
        return opens[-1] if opens else None

    # The reopens may line up in the event lists (open-oks are compared without their op)
    # while standing for different steps: the earlier one is the one-sided reopen.
    if d.gw is not None and d.ref is not None:
        lg, lr = last_open(c.gw, d.gw["n"]), last_open(c.ref, d.ref["n"])
        if lg and lr and lg["op"] != lr["op"]:
            early, early_side, late_side = (lg, c.gw, c.ref) if op_key(lg["op"]) < op_key(lr["op"]) \
                else (lr, c.ref, c.gw)
            if not any(e["ch"] == d.ch and e.get("op") == early["op"] for e in late_side["events"]) \
                    and closes(early_side, early["n"]) and closes(late_side, 10 ** 9):
                return True
    for mine, side, other_side in ((d.gw, c.gw, c.ref), (d.ref, c.ref, c.gw)):
        if mine is None or mine["kind"] != "reply" or mine["data"] != ["channel.open-ok"] \
                or not (mine.get("op") or "").endswith("/open"):
            continue
        other = d.ref if mine is d.gw else d.gw
        if other is not None and any(
                e["ch"] == d.ch and e.get("op") == mine["op"] for e in other_side["events"]):
            continue  # the other side reopened too, elsewhere: a real difference
        if closes(side, mine["n"]) and closes(other_side, 10 ** 9):
            return True
    return False


RULES = [
    ("V-PASSIVE", passive_declare),
    ("V-CC-BCC", cc_bcc_topic),
    ("V-UPDATE-SECRET", update_secret),
    ("F-DLX-AE", dlx_ae_existing),
    ("F-MISSING-X", missing_exchange_topic),
    ("F-NOWAIT-X", nowait_declared_exchange),
    ("F-PROBE", server_named_probe),
    ("F-UTF8", non_utf8_name),
    ("F-INTERNAL", internal_exchange),
    ("R-CROSS-CHANNEL", cross_channel_race),
    ("R-NAMES", generated_names),
    ("R-REOPEN", runner_reopen),
    ("R-LOST-REPLIES", lost_before_close_ok),
    ("R-BROKER-541", broker_internal_error),
    ("R-SECOND-CLOSE", answered_second_close),
]


def explain(d, c: Ctx) -> str | None:
    for rid, f in RULES:
        try:
            if f(d, c):
                return rid
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
    return None


# ------------------------------------------------------------------------------------------
# oracles on the gateway's recording


def _exchange_types(c: Ctx) -> list[tuple[str, str, str | None]]:
    """(op ref, exchange, type after it) for each exchange.declare/delete that the broker
    processed on the gateway side, in order."""
    out = []
    for ref, op in sorted(c.gw["ops"].items(), key=lambda kv: op_key(kv[0])):
        fate = c.gw["fates"].get(ref)
        if fate not in ("answered", "settled"):
            continue
        if op["m"] == "exchange.declare" and not op["a"].get("passive"):
            out.append((ref, op["a"]["exchange"], op["a"].get("type")))
        elif op["m"] == "exchange.delete":
            out.append((ref, op["a"]["exchange"], None))
    return out


def _type_at(c: Ctx, types, ref: str, x: str) -> str | None:
    if x == "amq.topic":
        return "topic"
    t = None
    for r, name, ty in types:
        if name == x and op_key(r) < op_key(ref):
            t = ty
    return t


def oracle_cc_bcc(c: Ctx) -> list[str]:
    """O-CC-BCC: every publish the gateway let through to a topic exchange has all of its
    routing keys (the key, the first CC entry's, the first BCC entry's) topic-permitted."""
    out = []
    types = _exchange_types(c)
    for ref, op in c.gw["ops"].items():
        if op["m"] != "basic.publish" or c.gw["fates"].get(ref) != "settled":
            continue
        x = op["a"]["exchange"]
        if _type_at(c, types, ref, x) != "topic":
            continue
        perms = c.perms_at(ref)
        for k in routing_keys(op):
            if all(not p.topic("write", c.vhost, x, k) for p in perms):
                out.append(f"publish {ref} to topic exchange '{x}' with routing keys {routing_keys(op)} "
                           f"passed the gateway, but 4.2 refuses key '{k}'")
                break
    return out


def oracle_passive(c: Ctx) -> list[str]:
    """O-PASSIVE: every passive declare the gateway let through is permitted by any of
    read/write/configure (4.2.7+)."""
    out = []
    for ref, op in c.gw["ops"].items():
        if op["m"] not in ("queue.declare", "exchange.declare") or not op["a"].get("passive"):
            continue
        if c.gw["fates"].get(ref) not in ("answered", "settled"):
            continue
        kind = op["m"].split(".")[0]
        name = op["a"].get(kind, "")
        if all(not p.any_resource(c.vhost, name) for p in c.perms_at(ref)):
            out.append(f"passive {op['m']} {ref} of '{name}' passed the gateway without any permission")
    return out


def oracle_update_secret(c: Ctx) -> list[str]:
    """O-UPDATE-SECRET: after update-secret-ok, every consumer whose queue the new token
    cannot read is cancelled (basic.cancel to a client with consumer_cancel_notify) and gets
    no delivery after that."""
    sc = c.gw.get("secret_consumers")
    if not sc:
        return []
    out = []
    events = c.gw["events"]
    notify = c.seq.get("cancel_notify", True)
    for x in _must_cancel(c):
        tag = x["tag"]
        cancels = [e for e in events if e["kind"] == "cancel" and e["data"][0] == tag]
        after = sc["n"]
        if notify:
            if not cancels:
                closed = any(e["kind"] == "close" and e["ch"] == x["ch"] and e["n"] > sc["n"] for e in events)
                client_cancel = any(e["kind"] == "reply" and e["data"][:2] == ["basic.cancel-ok", tag]
                                    for e in events)
                lost = c.gw.get("conn_close") is not None
                # The client closed the channel after the refresh: the runner records
                # nothing but replies on a channel it is closing (a cancel then is as racy
                # as a delivery), and the consumer ends with the channel.
                secret = (c.secret_step, c.secret_index)
                client_closed = any(
                    op["m"] == "channel.close" and op["ch"] == x["ch"] and op_key(r) > secret
                    and c.gw["fates"].get(r) in ("sent", "settled", "answered")
                    for r, op in c.gw["ops"].items())
                if not (closed or client_cancel or lost or client_closed):
                    out.append(f"consumer '{x['tag']}' on '{x['queue']}' not cancelled after update-secret")
                continue
            after = max(after, cancels[0]["n"])
        late = [e for e in events if e["kind"] == "deliver" and e["data"][0] == tag and e["n"] > after]
        if late:
            out.append(f"consumer '{tag}' on '{x['queue']}' got {len(late)} deliveries after it lost read "
                       "access (update-secret)")
    return out


ORACLES = [("O-CC-BCC", oracle_cc_bcc), ("O-PASSIVE", oracle_passive),
           ("O-UPDATE-SECRET", oracle_update_secret)]


def run_oracles(c: Ctx) -> list[tuple[str, str]]:
    out = []
    for oid, f in ORACLES:
        for msg in f(c):
            out.append((oid, msg))
    return out
