"""The fuzz loop, confirmation of differences, the shrinker and regression files."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .compare import Verdict, judge
from .gen import count_methods, generate

REPO = Path(__file__).resolve().parents[3]
REGRESSIONS = REPO / "tests" / "session_fuzz" / "regressions"


def check(env, seq: dict) -> tuple[Verdict, dict]:
    res = env.run_pair(seq)
    v = judge(seq, res["ref"], res["gw"], res["ref"]["vhost"],
              service_users=env.sides["gw"].service_users)
    return v, res


def reproduces(env, seq: dict, want: set[str] | None, times: int = 2, tries: int = 3) -> tuple[bool, Verdict | None]:
    """Whether a problem (with a signature in `want`, or any when None) shows up `times`
    times in at most `tries` runs."""
    hits, last = 0, None
    for i in range(tries):
        v, _ = check(env, seq)
        sig = set(v.signatures())
        if sig and (want is None or sig & want):
            hits += 1
            last = v
            if hits >= times:
                return True, last
        elif tries - i - 1 < times - hits:
            return False, last
    return False, last


@dataclass
class Stats:
    sequences: int = 0
    methods: int = 0  # methods the client sent, both sides together
    seconds: float = 0.0
    clean: int = 0
    explained: Counter = field(default_factory=Counter)  # rule -> sequences
    consequences: Counter = field(default_factory=Counter)
    unexplained: Counter = field(default_factory=Counter)  # signature -> confirmed sequences
    flaky: Counter = field(default_factory=Counter)
    found: list = field(default_factory=list)  # (signature list, problems, seq, file)

    def report(self) -> str:
        lines = [f"sequences executed: {self.sequences} ({self.sequences / max(self.seconds, 1e-9):.2f}/s)",
                 f"methods executed:   {self.methods} ({self.methods / max(self.seconds, 1e-9):.1f}/s, both sides)",
                 f"agreeing sequences: {self.clean}"]
        if self.explained:
            lines.append("explained differences (sequences per rule): " +
                         ", ".join(f"{k} {v}" for k, v in sorted(self.explained.items())))
        if self.consequences:
            lines.append("later divergences counted as consequences: " +
                         ", ".join(f"{k} {v}" for k, v in sorted(self.consequences.items())))
        lines.append(f"UNEXPLAINED (confirmed): {sum(self.unexplained.values())}")
        for k, v in self.unexplained.most_common():
            lines.append(f"  {v:4d}  {k}")
        if self.flaky:
            lines.append(f"not reproduced (timing, ignored): {sum(self.flaky.values())}")
            for k, v in self.flaky.most_common(5):
                lines.append(f"  {v:4d}  {k}")
        for sigs, problems, _seq, f in self.found:
            lines.append(f"found: {' ; '.join(sigs)}")
            for p in problems[:4]:
                lines.append(f"    {p}")
            if f:
                lines.append(f"    shrunk: {f}")
        return "\n".join(lines)


def fuzz(env, seconds: float, seed: int, *, shrink: bool = False, shrink_budget: float = 120,
         max_found: int = 20, confirm: int = 1, log=print) -> Stats:
    """Runs generated sequences for `seconds`. A difference counts when it shows again in
    `confirm` of two more runs (1: two of three in all; 2: three of three, for CI, where
    a difference that depends on timing must not fail the build at random)."""
    st = Stats()
    r = random.Random(seed)
    t0 = time.monotonic()
    known: set[str] = set()
    i = 0
    while time.monotonic() - t0 < seconds:
        seq_seed = r.getrandbits(48)
        seq = generate(random.Random(seq_seed))
        seq["seed"] = seq_seed
        i += 1
        v, res = check(env, seq)
        st.sequences += 1
        st.methods += res["ref"]["methods"] + res["gw"]["methods"]
        for rid, _ in v.explained:
            pass
        for rid in {rid for rid, _ in v.explained}:
            st.explained[rid] += 1
        for k, n in v.consequences.items():
            st.consequences[k] += n
        if v.ok:
            if not v.explained:
                st.clean += 1
            continue
        sigs = set(v.signatures())
        ok, v2 = reproduces(env, seq, sigs, times=confirm, tries=2)
        st.sequences += 1 if ok else 2
        if not ok:
            for s in sigs:
                st.flaky[s] += 1
            continue
        for s in sigs:
            st.unexplained[s] += 1
        new = sigs - known
        if not new or len(st.found) >= max_found:
            continue
        known |= sigs
        log(f"[{time.monotonic() - t0:6.1f}s] sequence {i} (seed {seq_seed}): "
            + "; ".join(v.problems()[:3]))
        f = None
        if shrink:
            # One signature at a time, the most specific first: shrinking toward "any of
            # them" drifts to the easiest one.
            target = sorted(new, key=lambda s_: (s_.startswith("order|"), s_))[0]
            small, sv = shrink_seq(env, seq, {target}, budget=shrink_budget, log=log)
            f = write_regression(small, sv or v, seq_seed, sequences_before=i)
            log(f"    shrunk to {count_methods(small)} methods: {f}")
        st.found.append((sorted(new), v.problems(), seq, f))
    st.seconds = time.monotonic() - t0
    return st


# ------------------------------------------------------------------------------------------
# shrinking


def _ddmin(items: list, test, budget_end: float) -> list:
    """Classic delta debugging: the smallest sublist (1-minimal, within budget) for which
    `test` holds."""
    n = 2
    while len(items) >= 2 and time.monotonic() < budget_end:
        chunk = max(1, len(items) // n)
        removed = False
        for start in range(0, len(items), chunk):
            cand = items[:start] + items[start + chunk:]
            if cand and test(cand):
                items = cand
                n = max(n - 1, 2)
                removed = True
                break
            if time.monotonic() >= budget_end:
                return items
        if not removed:
            if n >= len(items):
                break
            n = min(len(items), n * 2)
    return items


def _arg_variants(op: dict):
    """Simpler versions of one op: an optional argument dropped or a flag cleared."""
    a = op.get("a") or {}
    for k, v in a.items():
        if k in ("exchange", "queue", "routing_key", "body", "destination", "source", "token",
                 "consumer_tag", "delivery_tag", "type", "reply_code", "reply_text"):
            continue
        if isinstance(v, bool) and v:
            yield {**op, "a": {**a, k: False}}
        elif isinstance(v, list) and v:
            for i in range(len(v)):
                yield {**op, "a": {**a, k: v[:i] + v[i + 1:]}}
        elif isinstance(v, dict) and v:
            for kk in list(v):
                if kk == "headers" and v[kk]:
                    for i in range(len(v[kk])):
                        yield {**op, "a": {**a, k: {**v, kk: v[kk][:i] + v[kk][i + 1:]}}}
                yield {**op, "a": {**a, k: {x: y for x, y in v.items() if x != kk}}}


def shrink_seq(env, seq: dict, want: set[str], *, budget: float = 120, log=print):
    end = time.monotonic() + budget
    last: list = [None]
    tests = [0]

    def fails(s: dict) -> bool:
        tests[0] += 1
        ok, v = reproduces(env, s, want, times=2, tries=2)
        if ok:
            last[0] = v
        return ok

    cur = copy.deepcopy(seq)
    # 1. steps
    steps = _ddmin(cur["steps"], lambda st: fails({**cur, "steps": st}), end)
    cur["steps"] = steps
    # 2. ops inside each step
    for i in range(len(cur["steps"])):
        ops = cur["steps"][i]["ops"]
        if len(ops) > 1:
            def t(o, i=i):
                s = copy.deepcopy(cur)
                s["steps"][i]["ops"] = o
                return fails(s)
            cur["steps"][i]["ops"] = _ddmin(ops, t, end)
    # 3. waits off, steps merged
    for i in range(len(cur["steps"])):
        if time.monotonic() >= end:
            break
        if cur["steps"][i]["wait"] and i < len(cur["steps"]) - 1:
            s = copy.deepcopy(cur)
            s["steps"][i]["wait"] = False
            if fails(s):
                cur = s
    # 4. arguments
    changed = True
    while changed and time.monotonic() < end:
        changed = False
        for i, step in enumerate(cur["steps"]):
            for j, op in enumerate(step["ops"]):
                for var in _arg_variants(op):
                    if time.monotonic() >= end:
                        break
                    s = copy.deepcopy(cur)
                    s["steps"][i]["ops"][j] = var
                    if fails(s):
                        cur, changed = s, True
                        break
    # 5. scopes
    for ti in range(len(cur["tokens"])):
        def t(sc, ti=ti):
            s = copy.deepcopy(cur)
            s["tokens"][ti]["scopes"] = sc
            return fails(s)
        if time.monotonic() < end:
            cur["tokens"][ti]["scopes"] = _ddmin(cur["tokens"][ti]["scopes"], t, end)
    log(f"    shrink: {tests[0]} tests, {count_methods(seq)} -> {count_methods(cur)} methods")
    return cur, last[0]


def write_regression(seq: dict, v: Verdict, seed: int | None, sequences_before: int | None = None) -> Path:
    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    body = {k: seq[k] for k in ("tokens", "cancel_notify", "auto_close_ok", "pipeline_open", "types", "steps") if k in seq}
    h = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
    doc = {
        "signature": v.signatures() if v else [],
        "difference": v.problems() if v else [],
        "found_from_seed": seed,
        "sequences_before": sequences_before,
        "sequence": body,
    }
    path = REGRESSIONS / f"{h}.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=True) + "\n")
    return path


def replay(env, path: Path) -> tuple[bool, Verdict | None]:
    """Whether the recorded difference (any problem, in fact) still shows: True while it
    shows in each of three runs (a fixed difference never shows; one that depends on
    timing may show now and then, and must not fail the build at random)."""
    doc = json.loads(path.read_text())
    return reproduces(env, doc["sequence"], None, times=3, tries=3)
