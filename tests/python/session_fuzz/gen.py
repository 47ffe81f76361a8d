"""The sequence generator.

A sequence is JSON-shaped (so regressions are plain files):

    {"tokens": [{"sub": "alice", "scopes": [...]}, {"sub": "alice", "scopes": [...]}],
     "cancel_notify": true, "auto_close_ok": true,
     "types": {"xa": "topic", ...},
     "steps": [{"ops": [{"ch": 1, "m": "queue.declare", "a": {...}}, ...], "wait": true}, ...]}

`tokens[0]` logs in; an op `connection.update-secret` with `{"token": 1}` refreshes to
`tokens[1]`. Scopes are written with `{V}` for the sequence's vhost (filled in per run).
Names come from a small universe so that operations collide often. Symbolic values the
runner resolves per side: `$gen1`, `$gen2`… (the n-th server-named queue that side saw),
`$ctag1`… (the n-th server-generated consumer tag), delivery tags `last` / `first` / `zero`.
"""

from __future__ import annotations

import random

QUEUES = ["qa", "qb", "qc"]
EXCHANGES = ["xa", "xb", "xc"]
MISSING_X = "xz"
BUILTIN_X = ["amq.direct", "amq.topic", "amq.fanout", "amq.headers"]
TYPES = ["direct", "fanout", "topic", "headers"]
PUBLISH_RKS = ["a.b", "a.c", "b.c", "a", "qa", "qb", "qc", ""]
BIND_RKS = ["a.b", "a.*", "#", "b.*", "a.#", "qa", "qb", ""]
NAME_PATTERNS = ["*", "qa", "qb", "q*", "xa", "xb", "x*", "*a", "*b", "amq.*", "amq.gen-*",
                 "amq.default", "amq.topic", "amq.direct"]
X_PATTERNS = ["*", "xa", "xb", "x*", "amq.topic", "*a"]
RK_PATTERNS = ["*", "a.*", "a.b", "b.*", "q*", "qa", "*c"]
SUB = "alice"
OTHER_USER = "bob"


def gen_scopes(r: random.Random, *, vhost_access: bool = True) -> list[str]:
    out = []
    vh = lambda: "{V}" if r.random() < 0.75 else "*"  # noqa: E731
    for perm in ("configure", "write", "read"):
        if r.random() < 0.55:
            out.append(f"rabbitmq.{perm}:{vh()}/*")
        else:
            for p in r.sample(NAME_PATTERNS, r.randint(0, 4)):
                out.append(f"rabbitmq.{perm}:{vh()}/{p}")
        if perm in ("write", "read") and r.random() < 0.6:
            for _ in range(r.randint(1, 2)):
                out.append(f"rabbitmq.{perm}:{vh()}/{r.choice(X_PATTERNS)}/{r.choice(RK_PATTERNS)}")
    if r.random() < 0.15:
        out.append("rabbitmq.read:othervhost/*")
    if r.random() < 0.1:
        out.append("rabbitmq.tag:management")
    if not vhost_access:
        return [s.replace("{V}", "othervhost").replace(":*/", ":othervhost/") for s in out] or \
            ["rabbitmq.read:othervhost/*"]
    if not any("{V}" in s or ":*/" in s for s in out):
        out.append("rabbitmq.read:{V}/zzz")
    r.shuffle(out)
    return out


def narrowed(r: random.Random, scopes: list[str]) -> list[str]:
    """The same scopes with read (mostly) narrowed: consumers tend to lose their queue."""
    out = [s for s in scopes if not s.startswith("rabbitmq.read:") or r.random() < 0.2]
    for p in r.sample(["qa", "qb", "q*", "amq.gen-*", "xa", "*b"], r.randint(0, 2)):
        out.append(f"rabbitmq.read:{{V}}/{p}")
    if not any("{V}" in s or ":*/" in s for s in out):
        out.append("rabbitmq.read:{V}/zzz")
    return out


class Gen:
    def __init__(self, r: random.Random):
        self.r = r
        self.types = {x: r.choice(TYPES) for x in EXCHANGES}
        self.n_channels = r.choice([1, 1, 2, 2, 3])
        self.body_n = 0
        self.tags = 0
        self.gen_seen = 0  # server-named declares generated
        self.ctag_gen = 0  # consumes with "" tag generated
        self.secret_done = False

    # -- names
    def queue(self, allow_empty=True) -> str:
        r = self.r
        x = r.random()
        if allow_empty and x < 0.15:
            return ""
        if self.gen_seen and x < 0.25:
            return f"$gen{r.randint(1, self.gen_seen)}"
        if x < 0.27:
            return "amq.q"
        return r.choice(QUEUES)

    def exchange(self) -> str:
        r = self.r
        x = r.random()
        if x < 0.6:
            return r.choice(EXCHANGES)
        if x < 0.85:
            return r.choice(BUILTIN_X)
        if x < 0.95:
            return MISSING_X
        return ""

    def extra_args(self) -> list:
        """Harmless arguments of every RabbitMQ table type, sometimes nested."""
        r = self.r
        vals = [("S", "v"), ("t", True), ("b", -3), ("B", 200), ("s", -300), ("u", 60000),
                ("I", -70000), ("i", 4000000000), ("l", -(2 ** 40)), ("L", 2 ** 40),
                ("T", 1700000000), ("d", 1.5), ("f", 2.5), ("D", [2, 12345]), ("x", "00ff"),
                ("V", None), ("A", [["S", "e"], ["I", 1], ["A", [["t", False]]]]),
                ("F", [["k", "S", "v"], ["k", "I", 2], ["n", "F", [["z", "V", None]]]])]
        out = []
        for _ in range(r.randint(1, 3)):
            t, v = r.choice(vals)
            out.append([f"x-fz-{r.randint(1, 3)}", t, v])
        return out

    def dlx_args(self) -> list:
        r = self.r
        out = []
        x = r.random()
        names = EXCHANGES + [MISSING_X, "amq.direct", ""]
        if x < 0.6:
            out.append(["x-dead-letter-exchange", "S", r.choice(names)])
            if r.random() < 0.4:  # duplicated with another value: RabbitMQ reads the first
                out.append(["x-dead-letter-exchange", "S", r.choice(names)])
        elif x < 0.75:
            t = r.choice(["I", "x", "A"])
            out.append(["x-dead-letter-exchange", t, {"I": 5, "x": "7861", "A": [["S", "xa"]]}[t]])
        if r.random() < 0.2:
            t = r.choice(["I", "l", "s"])
            out.append(["x-message-ttl", t, 100 if t == "s" or r.random() < .5 else 60000])
        if r.random() < 0.3:
            out += self.extra_args()
        if r.random() < 0.3:
            r.shuffle(out)
        return out

    def ae_args(self) -> list:
        r = self.r
        out = []
        names = EXCHANGES + [MISSING_X, "amq.direct"]
        x = r.random()
        if x < 0.65:
            out.append(["alternate-exchange", "S", r.choice(names)])
            if r.random() < 0.4:
                out.append(["alternate-exchange", "S", r.choice(names)])
        elif x < 0.8:
            t = r.choice(["I", "x", "F"])
            out.append(["alternate-exchange", t, {"I": 7, "x": "7861", "F": [["k", "S", "xa"]]}[t]])
        if r.random() < 0.3:
            out += self.extra_args()
        return out

    def cc_headers(self) -> list:
        r = self.r
        out = []
        for key in ("CC", "BCC"):
            if r.random() < 0.45:
                n = r.randint(1, 2)
                out.append([key, "A", [["S", r.choice(PUBLISH_RKS)] for _ in range(n)]])
                if r.random() < 0.35:  # a duplicate key: RabbitMQ reads the first entry
                    out.append([key, "A", [["S", r.choice(PUBLISH_RKS)]]])
                if r.random() < 0.1:
                    out[-1][2].append(["I", 3])  # non-longstr elements are ignored
        if r.random() < 0.3:
            out += self.extra_args()
        if r.random() < 0.3:
            r.shuffle(out)
        return out

    # -- ops
    def op(self, ch: int) -> dict:
        r = self.r
        kinds = [
            ("queue.declare", 14), ("exchange.declare", 10), ("queue.bind", 10),
            ("exchange.bind", 4), ("queue.unbind", 3), ("exchange.unbind", 2),
            ("basic.publish", 18), ("basic.get", 7), ("basic.consume", 7), ("basic.cancel", 3),
            ("queue.purge", 4), ("queue.delete", 3), ("exchange.delete", 3), ("basic.qos", 2),
            ("ack", 5), ("confirm.select", 2), ("tx.select", 1), ("tx.commit", 1),
            ("channel.close", 2), ("channel.close-ok", 1), ("channel.open", 1),
            ("connection.update-secret", 2),
        ]
        m = r.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        if m == "connection.update-secret":
            if self.secret_done:
                m = "basic.publish"
            else:
                self.secret_done = True
                return {"ch": 0, "m": m, "a": {"token": 1}}
        a: dict = {}
        if m == "queue.declare":
            q = self.queue()
            a = {"queue": "" if q.startswith("$gen") and r.random() < 0.5 else q,
                 "passive": r.random() < 0.2, "nowait": r.random() < 0.2,
                 "durable": r.random() < 0.15, "exclusive": r.random() < 0.2,
                 "auto_delete": r.random() < 0.15}
            if r.random() < 0.35:
                a["arguments"] = self.dlx_args()
            if a["queue"] == "" and not a["passive"]:
                self.gen_seen += 1
        elif m == "exchange.declare":
            x = self.exchange() if r.random() < 0.3 else r.choice(EXCHANGES)
            t = self.types.get(x, "direct") if r.random() < 0.85 else r.choice(TYPES)
            if x in BUILTIN_X:
                t = x.split(".")[1] if r.random() < 0.8 else t
            a = {"exchange": x, "type": t, "passive": r.random() < 0.2,
                 "nowait": r.random() < 0.2, "durable": r.random() < 0.15 or x in BUILTIN_X,
                 "auto_delete": r.random() < 0.1, "internal": r.random() < 0.07}
            if r.random() < 0.35:
                a["arguments"] = self.ae_args()
        elif m in ("queue.bind", "queue.unbind"):
            q = self.queue()
            x = self.exchange()
            rk = "" if q == "" and r.random() < 0.6 else r.choice(BIND_RKS)
            a = {"queue": q, "exchange": x, "routing_key": rk}
            if m == "queue.bind":
                a["nowait"] = r.random() < 0.15
            if self.types.get(x) == "headers" or x == "amq.headers":
                a["arguments"] = [["x-match", "S", r.choice(["all", "any"])],
                                  ["h", "S", r.choice(["1", "2"])]]
        elif m in ("exchange.bind", "exchange.unbind"):
            a = {"destination": r.choice(EXCHANGES + ["amq.direct"]), "source": self.exchange(),
                 "routing_key": r.choice(BIND_RKS), "nowait": r.random() < 0.15}
        elif m == "basic.publish":
            x = r.random()
            if x < 0.2:
                ex = ""
            elif x < 0.7:
                ex = r.choice(EXCHANGES)
            elif x < 0.82:
                ex = "amq.topic"
            elif x < 0.92:
                ex = r.choice(["amq.direct", "amq.fanout", "amq.headers"])
            else:
                ex = MISSING_X
            rk = r.choice(QUEUES + ["$gen1"] * bool(self.gen_seen)) if ex == "" and r.random() < 0.8 \
                else r.choice(PUBLISH_RKS)
            props: dict = {}
            if r.random() < 0.45:
                props["headers"] = self.cc_headers()
                if ex == "amq.headers" or self.types.get(ex) == "headers":
                    props["headers"].append(["h", "S", r.choice(["1", "2"])])
            if r.random() < 0.15:
                props["user_id"] = SUB if r.random() < 0.6 else OTHER_USER
            self.body_n += 1
            a = {"exchange": ex, "routing_key": rk, "mandatory": r.random() < 0.3,
                 "props": props, "body": f"m{self.body_n}"}
        elif m == "basic.get":
            a = {"queue": self.queue(), "no_ack": r.random() < 0.5}
        elif m == "basic.consume":
            tag = ""
            if r.random() < 0.6:
                self.tags += 1
                tag = f"c{self.tags}"
            else:
                self.ctag_gen += 1
            a = {"queue": self.queue(), "consumer_tag": tag, "no_ack": r.random() < 0.5,
                 "exclusive": r.random() < 0.1, "nowait": r.random() < 0.2 and tag != ""}
        elif m == "basic.cancel":
            choices = [f"c{i}" for i in range(1, self.tags + 1)] + \
                      [f"$ctag{i}" for i in range(1, self.ctag_gen + 1)] + ["nope"]
            a = {"consumer_tag": r.choice(choices), "nowait": r.random() < 0.15}
        elif m == "queue.purge":
            a = {"queue": self.queue(), "nowait": r.random() < 0.1}
        elif m == "queue.delete":
            a = {"queue": self.queue(), "if_unused": r.random() < 0.1,
                 "if_empty": r.random() < 0.1, "nowait": r.random() < 0.1}
        elif m == "exchange.delete":
            a = {"exchange": r.choice(EXCHANGES) if r.random() < 0.9 else self.exchange(),
                 "if_unused": r.random() < 0.1, "nowait": r.random() < 0.1}
        elif m == "basic.qos":
            a = {"prefetch_count": r.randint(0, 3), "global": r.random() < 0.2}
        elif m == "ack":
            m = r.choice(["basic.ack", "basic.ack", "basic.nack", "basic.reject"])
            a = {"delivery_tag": r.choices(["last", "first", "zero"], [7, 2, 1])[0],
                 "multiple": r.random() < 0.3, "requeue": r.random() < 0.5}
        elif m == "confirm.select":
            a = {"nowait": r.random() < 0.2}
        elif m == "channel.close":
            a = {"reply_code": 200, "reply_text": "bye"}
        return {"ch": ch, "m": m, "a": a}

    # -- shapes aimed at the gateway's state tracking (see the module docstring of compare)
    def template(self, ch: int) -> list[dict]:
        """A few ops that belong together, emitted as one pipelined step."""
        r = self.r
        t = r.choice(["shortcut", "shortcut-bind", "pipeline-fail", "cc-dup", "dlx-dup"])
        q1, q2 = r.sample(QUEUES, 2)
        if t == "shortcut":
            return [{"ch": ch, "m": "queue.declare", "a": {"queue": q2, "passive": r.random() < .7,
                                                          "nowait": r.random() < .7}},
                    {"ch": ch, "m": r.choice(["basic.get", "queue.purge", "basic.consume",
                                              "queue.delete"]),
                     "a": {"queue": "", "no_ack": True, "consumer_tag": ""}}]
        if t == "shortcut-bind":
            x = r.choice(EXCHANGES + ["amq.topic"])
            return [{"ch": ch, "m": "queue.declare", "a": {"queue": q2, "nowait": r.random() < .5,
                                                          "passive": r.random() < .5}},
                    {"ch": ch, "m": r.choice(["queue.bind", "queue.unbind"]),
                     "a": {"queue": "", "exchange": x, "routing_key": ""}}]
        if t == "pipeline-fail":
            first = r.choice([
                {"m": "queue.declare", "a": {"queue": "nq" + str(r.randint(1, 9)), "passive": True}},
                {"m": "exchange.declare", "a": {"exchange": MISSING_X, "type": "direct", "passive": True}},
                {"m": "queue.declare", "a": {"queue": q1}},
                {"m": "exchange.declare", "a": {"exchange": r.choice(EXCHANGES), "type": r.choice(TYPES)}},
                {"m": "basic.publish", "a": {"exchange": MISSING_X, "routing_key": "a", "props": {},
                                             "body": "pf", "mandatory": False}},
            ])
            first = {"ch": ch, **first}
            return [first, self.op(ch), self.op(ch)]
        if t == "cc-dup":
            self.body_n += 1
            k1, k2 = r.sample(PUBLISH_RKS, 2)
            key = r.choice(["CC", "BCC"])
            return [{"ch": ch, "m": "basic.publish",
                     "a": {"exchange": r.choice(["amq.topic"] + [x for x in EXCHANGES if self.types[x] == "topic"]),
                           "routing_key": r.choice(PUBLISH_RKS), "mandatory": r.random() < .5,
                           "props": {"headers": [[key, "A", [["S", k1]]], [key, "A", [["S", k2]]]]},
                           "body": f"m{self.body_n}"}}]
        # dlx-dup / ae-dup on a new resource
        if r.random() < 0.5:
            e1, e2 = r.sample(EXCHANGES + [MISSING_X], 2)
            return [{"ch": ch, "m": "queue.declare",
                     "a": {"queue": r.choice(QUEUES + [""]),
                           "arguments": [["x-dead-letter-exchange", "S", e1],
                                         ["x-dead-letter-exchange", "S", e2]]}}]
        e1, e2 = r.sample(EXCHANGES + [MISSING_X], 2)
        x = r.choice(EXCHANGES)
        return [{"ch": ch, "m": "exchange.declare",
                 "a": {"exchange": x, "type": self.types[x],
                       "arguments": [["alternate-exchange", "S", e1], ["alternate-exchange", "S", e2]]}}]


def generate(r: random.Random) -> dict:
    g = Gen(r)
    tok1 = gen_scopes(r)
    x = r.random()
    if x < 0.45:
        tok2 = narrowed(r, tok1)
    elif x < 0.93:
        tok2 = gen_scopes(r)
    else:
        tok2 = gen_scopes(r, vhost_access=False)
    steps = []
    n_steps = r.randint(3, 14)
    # Most sequences start by declaring a few things so later operations find them.
    if r.random() < 0.8:
        setup = []
        for x_ in r.sample(EXCHANGES, r.randint(1, 3)):
            setup.append({"ch": 1, "m": "exchange.declare", "a": {"exchange": x_, "type": g.types[x_]}})
        for q in r.sample(QUEUES, r.randint(1, 3)):
            setup.append({"ch": 1, "m": "queue.declare", "a": {"queue": q}})
        steps.append({"ops": setup, "wait": True})
    for i in range(n_steps):
        ch = r.randint(1, g.n_channels)
        if r.random() < 0.12:
            ops = g.template(ch)
        else:
            n = 1 if r.random() < 0.5 else r.randint(2, 4)
            ops = []
            for _ in range(n):
                c = ch if r.random() < 0.8 else r.randint(1, g.n_channels)
                ops.append(g.op(c))
        steps.append({"ops": ops, "wait": r.random() < 0.6 or i == n_steps - 1})
    return {
        "tokens": [{"sub": SUB, "scopes": tok1}, {"sub": SUB, "scopes": tok2}],
        "cancel_notify": r.random() < 0.85,
        "auto_close_ok": r.random() < 0.85,
        # channel.open pipelined with the step's methods, or in a round trip of its own
        "pipeline_open": r.random() < 0.5,
        "types": g.types,
        "steps": steps,
    }


def count_methods(seq: dict) -> int:
    return sum(len(s["ops"]) for s in seq["steps"])
