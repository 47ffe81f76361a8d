"""The differential session fuzzer, short: about 60 s of generated sequences (a fixed seed,
then a random one that is printed for reproduction), then every regression file in
tests/session_fuzz/regressions replayed on both sides (each fails while its difference
still shows). docs/conformance.md, "Differential session fuzzer", has the long runs.

Starts the reference node (scripts/reference-node.sh; CONFORMANCE_KEEP_REFERENCE=1 leaves
it running) and a gateway, and stops both.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

import conftest
from session_fuzz import fuzz as fuzzmod
from session_fuzz.harness import Env

FIXED_SEED = 20240611
SECONDS = float(os.environ.get("SESSION_FUZZ_SECONDS", "60"))
REGRESSION_FILES = sorted(fuzzmod.REGRESSIONS.glob("*.json"))


@pytest.fixture(scope="module")
def env():
    conftest.gateway_binary()  # a clear failure when the binary is missing
    keep = os.environ.get("CONFORMANCE_KEEP_REFERENCE") == "1"
    with Env(keep_reference=keep) as e:
        yield e


def _run(env, seed: int, seconds: float) -> None:
    st = fuzzmod.fuzz(env, seconds, seed, confirm=2, log=lambda m: None)
    report = st.report() + f"\n(reproduce: .venv/bin/python -m tests.python.session_fuzz --seed {seed} " \
                            f"--seconds {seconds:.0f} --shrink)"
    conftest.TERMINAL_REPORTS.append((f"session fuzz, seed {seed}", report))
    assert st.sequences > 0
    if st.unexplained:
        pytest.fail(f"the session fuzzer found differences that tests/session_fuzz/differences.md "
                    f"does not explain:\n{report}", pytrace=False)


def test_session_fuzz_fixed_seed(env):
    _run(env, FIXED_SEED, SECONDS * 2 / 3)


def test_session_fuzz_random_seed(env):
    seed = random.SystemRandom().getrandbits(32)
    print(f"session fuzz random seed: {seed}")
    _run(env, seed, SECONDS / 3)


@pytest.mark.parametrize("path", REGRESSION_FILES, ids=[p.stem for p in REGRESSION_FILES])
def test_regression(env, path: Path):
    doc = json.loads(path.read_text())
    still, v = fuzzmod.replay(env, path)
    if still:
        pytest.fail(f"{path.name}: the difference still shows ({doc.get('signature')}):\n  "
                    + "\n  ".join((v.problems() if v else [])[:6]), pytrace=False)
