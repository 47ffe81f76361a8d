"""CLI: `.venv/bin/python -m tests.python.session_fuzz --seconds N --seed S [--shrink]`
(from the repository root; `python tests/python/session_fuzz` works too).

Starts the reference node (scripts/reference-node.sh) and a gateway, runs random sequences
for N seconds, prints the statistics and the differences found, and cleans up. Exit status 1
when an unexplained difference or an oracle violation was confirmed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # `python tests/python/session_fuzz`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "session_fuzz"  # noqa: A001

import importlib  # noqa: E402

fuzzmod = importlib.import_module(f"{__package__}.fuzz")
harness = importlib.import_module(f"{__package__}.harness")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="session_fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--shrink", action="store_true",
                    help="shrink each new difference and write tests/session_fuzz/regressions/<hash>.json")
    ap.add_argument("--shrink-budget", type=float, default=120, help="seconds per difference")
    ap.add_argument("--keep-reference", action="store_true",
                    help="leave the reference node running afterwards")
    ap.add_argument("--sequence-seed", type=int, action="append", metavar="SEED",
                    help="check (and with --shrink, shrink) the sequence generated from SEED, as "
                         "printed by a fuzz run; repeatable")
    ap.add_argument("--replay", nargs="*", metavar="FILE",
                    help="replay regression files instead of fuzzing (all when none given)")
    ap.add_argument("--runs", type=int, default=0, metavar="N",
                    help="with --replay and/or --sequence-seed: run each N times and print every "
                         "divergence with the rule that explains it (or UNEXPLAINED), then the "
                         "counts; exit status 1 if any was unexplained")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    keep = args.keep_reference or os.environ.get("CONFORMANCE_KEEP_REFERENCE") == "1"
    with harness.Env(keep_reference=keep) as env:
        if args.runs > 0 and (args.replay is not None or args.sequence_seed):
            return _runs(env, args)
        if args.replay is not None:
            bad = 0
            for f in _replay_files(args):
                still, v = fuzzmod.replay(env, f)
                print(f"{f.name}: {'STILL DIFFERS' if still else 'agrees'}")
                if still and v:
                    for p in v.problems()[:5]:
                        print(f"    {p}")
                bad += still
            return 1 if bad else 0
        if args.sequence_seed:
            bad = 0
            for ss in args.sequence_seed:
                seq = fuzzmod.generate(random.Random(ss))
                ok, v = fuzzmod.reproduces(env, seq, None, times=2, tries=3)
                print(f"sequence {ss}: {'DIFFERS' if ok else 'agrees (or not reproduced)'}")
                if ok and v:
                    for p in v.problems()[:5]:
                        print(f"    {p}")
                    if args.shrink:
                        target = sorted(v.signatures(), key=lambda s_: (s_.startswith("order|"), s_))[0]
                        small, sv = fuzzmod.shrink_seq(env, seq, {target}, budget=args.shrink_budget)
                        print(f"    shrunk: {fuzzmod.write_regression(small, sv or v, ss)}")
                bad += ok
            return 1 if bad else 0
        print(f"session fuzz: seed {seed}, {args.seconds:.0f} s, gateway port {env.plain_port}",
              flush=True)
        st = fuzzmod.fuzz(env, args.seconds, seed, shrink=args.shrink,
                          shrink_budget=args.shrink_budget, log=lambda m: print(m, flush=True))
        print(st.report())
        print(f"(reproduce with --seed {seed})")
        return 1 if st.unexplained else 0


def _replay_files(args) -> list[Path]:
    """The files `--replay` names, or every regression file when it names none."""
    return [Path(f) for f in args.replay] or sorted(fuzzmod.REGRESSIONS.glob("*.json"))


def _runs(env, args) -> int:
    """`--runs N`: how often a sequence diverges, and which rule explains each divergence."""
    seqs = [(f.name, json.loads(f.read_text())["sequence"])
            for f in (_replay_files(args) if args.replay is not None else [])]
    seqs += [(f"sequence {ss}", fuzzmod.generate(random.Random(ss)))
             for ss in args.sequence_seed or []]
    failed = 0
    for name, seq in seqs:
        diverged = unexplained = 0
        rules = Counter()
        for i in range(args.runs):
            v, _ = fuzzmod.check(env, seq)
            for rule, d in v.explained:
                print(f"{name} run {i + 1}: {rule}: {d.describe()[:300]}", flush=True)
            for p in v.problems():
                print(f"{name} run {i + 1}: {p[:300]}", flush=True)
            diverged += bool(v.explained or not v.ok)
            unexplained += not v.ok
            rules.update(r for r, _ in v.explained)
        failed += unexplained
        print(f"{name}: {args.runs} runs, {diverged} diverged, {unexplained} with an unexplained "
              f"difference; rules: {', '.join(f'{r} {n}' for r, n in sorted(rules.items())) or 'none'}",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
