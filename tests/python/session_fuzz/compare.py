"""Normalises the two sides' recordings, compares them, and judges each difference.

Normalisation (per side): server-named queues `amq.gen-…` and server consumer tags
`amq.ctag-…` become `amq.gen#1`, `amq.ctag#1`… by first appearance; the user name and the
gateway's service user become `<user>`; the permission word RabbitMQ 4.x puts in refusals
(`configure access to queue …`) is dropped (3.10.8 says `access to queue …`); message counts
are not recorded at all (racy); delivery tags are not compared.

Comparison, per channel: the ordered events (replies, closes, returns, gets, and on
channel 0 the login, update-secret-ok and connection.close) as sequences, the asynchronous
ones (deliveries, server cancels, confirms) as multisets. Each channel's first divergence
has the step it was read in. The earliest divergences are judged by the rules in
`rules.py` (tests/session_fuzz/differences.md): once one is explained, everything read
from that step on, on every channel, and the final broker state are consequences of it and
are counted as explained by that rule, not compared. With no divergence at all the final
broker states are compared. The gateway oracles (`rules.ORACLES`) run on the gateway's
recording whatever the comparison says.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

ORDERED = {"login", "reply", "close", "return", "unexpected", "conn-close", "conn-lost", "timeout"}
ASYNC = {"deliver", "cancel", "confirm", "consume-ok"}
_PERM_WORD = re.compile(r"\b(configure|write|read) access to ")


def normalizer(result: dict, users: list[str]):
    gens: dict[str, str] = {}
    tags: dict[str, str] = {}
    for g in result.get("gen_names") or []:
        gens.setdefault(g, f"amq.gen#{len(gens) + 1}")
    for t in result.get("ctags") or []:
        tags.setdefault(t, f"amq.ctag#{len(tags) + 1}")

    def sub_gen(m):
        return gens.setdefault(m.group(0), f"amq.gen#{len(gens) + 1}")

    def sub_tag(m):
        return tags.setdefault(m.group(0), f"amq.ctag#{len(tags) + 1}")

    def norm(v):
        if isinstance(v, str):
            v = re.sub(r"amq\.gen-[A-Za-z0-9_\-]{6,}", sub_gen, v)
            v = re.sub(r"amq\.ctag-[A-Za-z0-9_\-]{6,}", sub_tag, v)
            v = _PERM_WORD.sub("access to ", v)
            for u in users:
                v = v.replace(f"'{u}'", "'<user>'")
            return v
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v
    return norm


def op_key(ref: str | None) -> tuple:
    """Order of op references `step.index[/open]`."""
    if not ref:
        return (10 ** 9, 0)
    base, _, suffix = ref.partition("/")
    s, _, i = base.partition(".")
    return (int(s), int(i) - (0.5 if suffix else 0))


@dataclass
class Divergence:
    ch: int
    kind: str  # ordered | async | state
    step: int
    ref: dict | None = None  # the first differing ordered events
    gw: dict | None = None
    ref_extra: list = field(default_factory=list)  # unmatched async events
    gw_extra: list = field(default_factory=list)

    def describe(self) -> str:
        if self.kind == "ordered":
            return (f"ch{self.ch} step {self.step}: reference {_ev(self.ref)} / gateway {_ev(self.gw)}")
        if self.kind == "async":
            return (f"ch{self.ch} step {self.step}: async only in reference {[_ev(e) for e in self.ref_extra]}"
                    f" / only in gateway {[_ev(e) for e in self.gw_extra]}")
        return f"final state: {self.ref_extra} / {self.gw_extra}"

    def signature(self) -> str:
        g, r = self.gw, self.ref
        if (self.kind == "ordered" and g is not None and g["kind"] == "close" and g["data"][0] in (403, 406)
                and r is not None and (r["kind"] == "return" or (
                    r["kind"] in ("reply", "close") and op_key(r.get("op")) < op_key(g.get("op"))))):
            what = {"reply": "reply", "close": "error", "return": "basic.return"}[r["kind"]]
            return (f"order|the gateway's {g['data'][0]} comes before the broker's {what} to an "
                    "earlier pipelined method")
        if self.kind == "ordered":
            return f"ordered|{_sig(self.ref)}|{_sig(self.gw)}"
        if self.kind == "async":
            return ("async|" + ",".join(sorted({e['kind'] for e in self.ref_extra})) + "|"
                    + ",".join(sorted({e['kind'] for e in self.gw_extra})))
        return "state"


def _ev(e: dict | None) -> str:
    if e is None:
        return "(nothing)"
    d = e["data"]
    return f"{e['kind']} {json.dumps(d)}" + (f" [op {e.get('op')}]" if e.get("op") else "")


def _sig(e: dict | None) -> str:
    if e is None:
        return "-"
    d = e["data"]
    if e["kind"] in ("close", "conn-close"):
        return f"{e['kind']} {d[0]} {d[2]}"
    return f"{e['kind']} {d[0] if d else ''}"


def normalized_events(result: dict, users: list[str]) -> list[dict]:
    norm = normalizer(result, users)
    out = []
    for e in result["events"]:
        e2 = dict(e)
        e2["data"] = norm(e["data"])
        if e["kind"] == "reply" and e["data"] and e["data"][0] in ("channel.flow-ok", "channel.open-ok"):
            e2["data"] = [e["data"][0]]
        out.append(e2)
    return out


def _consume_ok_dropped(e: dict, other: list[dict], ch: int, ops: dict) -> bool:
    """Whether consume-ok `e` (recorded on one side only) may have been dropped on the
    other side by a close of its channel after the consume. A close may be attributed to a
    consume of `""` itself (the runner cannot tell which queue `""` meant): the channels'
    closes are compared as ordered events anyway, so a consume that failed on one side
    only still shows there."""
    if e["kind"] != "consume-ok" or not e.get("op"):
        return False
    empty = ops.get(e["op"], {}).get("a", {}).get("queue") == ""
    return any(o["ch"] == ch and o["kind"] == "close" and o["step"] >= e["step"]
               and (op_key(o.get("op")) > op_key(e["op"])
                    or (empty and o.get("op") == e["op"])) for o in other)


def _is_cancel_ok(e: dict) -> bool:
    return e["kind"] == "reply" and e["data"][0] == "basic.cancel-ok"


def _without_dropped_cancel_oks(a: list[dict], b: list[dict]) -> list[dict]:
    """`a` without the cancel-oks that `b` lacks where `b`'s channel closed after the
    cancel: RabbitMQ's queue process sends cancel-ok for the channel (so that it cannot
    overtake a delivery), and a close the channel sends meanwhile may go first, after
    which the cancel-ok is dropped with the channel."""
    seen = {(json.dumps(e["data"]), e.get("op")) for e in b if _is_cancel_ok(e)}
    return [e for e in a if not (
        _is_cancel_ok(e) and (json.dumps(e["data"]), e.get("op")) not in seen
        and any(o["kind"] == "close" and op_key(o.get("op")) > op_key(e.get("op")) for o in b))]


def divergences(ref: dict, gw: dict, users: list[str]) -> list[Divergence]:
    r_ev = normalized_events(ref, users)
    g_ev = normalized_events(gw, users)
    chans = sorted({e["ch"] for e in r_ev} | {e["ch"] for e in g_ev})
    out = []
    for ch in chans:
        ro = [e for e in r_ev if e["ch"] == ch and e["kind"] in ORDERED]
        go = [e for e in g_ev if e["ch"] == ch and e["kind"] in ORDERED]
        ro, go = _without_dropped_cancel_oks(ro, go), _without_dropped_cancel_oks(go, ro)
        # Sent by the queue process like consume-ok: later replies may overtake a
        # cancel-ok, so where it falls among them is not compared, only that it came.
        rc_ok = [e for e in ro if _is_cancel_ok(e)]
        gc_ok = [e for e in go if _is_cancel_ok(e)]
        ro = [e for e in ro if not _is_cancel_ok(e)]
        go = [e for e in go if not _is_cancel_ok(e)]
        for i in range(max(len(ro), len(go))):
            a = ro[i] if i < len(ro) else None
            b = go[i] if i < len(go) else None
            if a is None or b is None or (a["kind"], a["data"]) != (b["kind"], b["data"]):
                steps = [e["step"] for e in (a, b) if e is not None]
                out.append(Divergence(ch, "ordered", min(steps), a, b))
                break
        ra = sorted([e for e in r_ev if e["ch"] == ch and e["kind"] in ASYNC] + rc_ok,
                    key=lambda e: e["n"])
        ga = sorted([e for e in g_ev if e["ch"] == ch and e["kind"] in ASYNC] + gc_ok,
                    key=lambda e: e["n"])
        key = lambda e: json.dumps([e["kind"], e["data"]])  # noqa: E731
        rc, gc = Counter(map(key, ra)), Counter(map(key, ga))
        only_r, only_g = rc - gc, gc - rc
        if only_r or only_g:
            # Of equal events, the later ones are the extra ones (the earlier ones match):
            # a side that stopped early lacks its last ones.
            rx, gx = [], []
            for e in reversed(ra):
                k = key(e)
                if only_r.get(k, 0) > 0:
                    only_r[k] -= 1
                    rx.insert(0, e)
            for e in reversed(ga):
                k = key(e)
                if only_g.get(k, 0) > 0:
                    only_g[k] -= 1
                    gx.insert(0, e)
            # RabbitMQ's queue process sends consume-ok on its own: a channel closed right
            # after the consume (an error, a refusal) drops it. Missing on the side whose
            # channel closed after the consume, it is no difference.
            rx = [e for e in rx if not _consume_ok_dropped(e, g_ev, ch, ref.get("ops", {}))]
            gx = [e for e in gx if not _consume_ok_dropped(e, r_ev, ch, gw.get("ops", {}))]
            if rx or gx:
                step = min(e["step"] for e in rx + gx)
                out.append(Divergence(ch, "async", step, ref_extra=rx, gw_extra=gx))
    out.sort(key=lambda d: (d.step, d.ch))
    return out


def state_divergence(ref: dict, gw: dict, users: list[str]) -> Divergence | None:
    if ref.get("state") is None or gw.get("state") is None:
        return None
    a = normalizer(ref, users)(ref["state"])
    b = normalizer(gw, users)(gw["state"])
    if all(sorted(map(json.dumps, a[k])) == sorted(map(json.dumps, b[k]))
           for k in ("queues", "exchanges", "bindings")):
        return None
    diff_r, diff_g = [], []
    for k in ("queues", "exchanges", "bindings"):
        ra = {json.dumps(x) for x in a[k]}
        gb = {json.dumps(x) for x in b[k]}
        diff_r += [f"{k}: {x}" for x in sorted(ra - gb)]
        diff_g += [f"{k}: {x}" for x in sorted(gb - ra)]
    return Divergence(-1, "state", 10 ** 6, ref_extra=diff_r, gw_extra=diff_g)


@dataclass
class Verdict:
    explained: list = field(default_factory=list)  # [(rule id, Divergence)]
    consequences: dict = field(default_factory=dict)  # rule id -> count
    unexplained: list = field(default_factory=list)  # [Divergence]
    oracle: list = field(default_factory=list)  # [(oracle id, message)]

    @property
    def ok(self) -> bool:
        return not self.unexplained and not self.oracle

    def problems(self) -> list[str]:
        return ([f"UNEXPLAINED {d.describe()}" for d in self.unexplained]
                + [f"ORACLE {o}: {m}" for o, m in self.oracle])

    def signatures(self) -> list[str]:
        return sorted({d.signature() for d in self.unexplained} | {f"oracle|{o}" for o, _ in self.oracle})


def judge(seq: dict, ref: dict, gw: dict, vhost: str, service_users=()) -> Verdict:
    from . import rules
    users = [t.get("sub", "alice") for t in seq["tokens"]] + list(service_users)
    v = Verdict()
    ctx = rules.Ctx(seq, ref, gw, vhost, users)
    divs = divergences(ref, gw, users)
    # The earliest step with a divergence is judged, each of its divergences on its own;
    # whatever diverges later follows from those and is counted, not judged.
    first_step = divs[0].step if divs else None
    first_rule = None
    # A channel's ordered divergence comes first: what arrives asynchronously on it at that
    # step (a confirm, a delivery) follows from it.
    ordered_chans = {d.ch for d in divs if d.step == first_step and d.kind == "ordered"}
    # A connection that ended on one side at that step (explained on channel 0) ends every
    # channel with it: their divergences at that step follow from it.
    conn_end = None
    for d in divs:
        if d.step == first_step and d.ch == 0 and d.kind == "ordered" and any(
                e is not None and e["kind"] in ("conn-close", "conn-lost") for e in (d.ref, d.gw)):
            conn_end = rules.explain(d, ctx)
    # Channel 0 is judged first (sorted by step, then channel).
    for d in divs:
        if d.ch != 0 and d.step == first_step and conn_end:
            v.consequences[conn_end] = v.consequences.get(conn_end, 0) + 1
            continue
        if d.step != first_step or (d.kind == "async" and d.ch in ordered_chans):
            key = first_rule or "after an unexplained difference"
            v.consequences[key] = v.consequences.get(key, 0) + 1
            continue
        rule = rules.explain(d, ctx)
        if rule:
            v.explained.append((rule, d))
            first_rule = first_rule or rule
        else:
            v.unexplained.append(d)
    if not divs:
        sd = state_divergence(ref, gw, users)
        if sd:
            rule = rules.explain(sd, ctx)
            if rule:
                v.explained.append((rule, sd))
            else:
                v.unexplained.append(sd)
    v.oracle = rules.run_oracles(ctx)
    return v
