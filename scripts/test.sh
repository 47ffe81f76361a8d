#!/usr/bin/env bash
# The one test command: setup, the gate (cargo fmt --check, clippy -D warnings, the module
# graph without cycles), build (and the lean production build), the Rust tests, then the
# integration tests in
# tests/python against the freshly built gateway: pika, aio-pika, kombu/py-amqp, the
# amqp-tools CLI, boto3, and the Node.js clients (tests/node, run by
# tests/python/test_clients_node.py with `node --test`), a short run of every fuzz target
# (scripts/fuzz.sh), and last the smoke of the benchmark harness (benches/compare.sh
# --smoke: every cell gets a number, ratios are not judged). Works from any directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

STEP="setup"
FUZZ_BUILD_PID=""
on_exit() {
    local rc=$?
    # The background fuzz build (its own process group), should the run end before it.
    if [[ -n $FUZZ_BUILD_PID ]]; then kill -- "-$FUZZ_BUILD_PID" 2>/dev/null || true; fi
    if ((rc != 0)); then echo; echo "test.sh: FAILED at step: $STEP (exit $rc)"; fi
}
trap on_exit EXIT

# Each step says when it starts (seconds since the command began), so that the log shows
# where the time goes.
step() { STEP="$1"; echo; echo "==> [$SECONDS s] $1"; }

step "setup"
bash scripts/setup.sh

command -v cargo >/dev/null 2>&1 || { echo "cargo not found" >&2; exit 1; }

# The test build carries the `test-switches` feature (`[testing]` in the config: the proof
# that RabbitMQ enforces backend tokens by itself); release builds never do. One feature set
# for every step, so nothing is compiled twice.
export GATEWAY_FEATURES=test-switches

step "gate: cargo fmt --check, cargo clippy --all-targets -D warnings, module graph without cycles"
cargo fmt --check
cargo clippy --all-targets --features "$GATEWAY_FEATURES" -- -D warnings
"$ROOT/.venv/bin/python" scripts/module-graph.py

# The lean production gateway (--no-default-features) first: it keeps compiling, and the
# scale-out stack serves with it (target/lean/). The full build after it puts the full
# binary back in target/debug.
step "lean build (scripts/build-lean.sh: --no-default-features)"
bash scripts/build-lean.sh

step "cargo build"
cargo build --features "$GATEWAY_FEATURES"

if cargo nextest --version >/dev/null 2>&1; then
    step "rust tests (cargo nextest run)"
    # nextest skips doctests; the crate has none (its doc blocks are `text`).
    cargo nextest run --features "$GATEWAY_FEATURES"
else
    step "rust tests (cargo test)"
    cargo test --features "$GATEWAY_FEATURES"
fi

TARGET_DIR="$(cargo metadata --format-version 1 --no-deps \
    | "$ROOT/.venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
export GATEWAY_BIN="$TARGET_DIR/debug/amqp-iam-gateway"

# The fuzz smoke's targets build in the background while the integration tests run (they
# leave about half of the CPU idle, waiting on brokers and clients), niced so that the
# tests keep their CPU; the smoke itself runs after them. The build's output goes to a log
# printed after the tests.
export FUZZ_SECONDS="${FUZZ_SECONDS:-5}" FUZZ_PROFILE="${FUZZ_PROFILE:-dev}"
FUZZ_BUILD_LOG="$TARGET_DIR/fuzz-build.log"
FUZZ_BUILD_ONLY=1 setsid nice -n 19 bash scripts/fuzz.sh >"$FUZZ_BUILD_LOG" 2>&1 &
FUZZ_BUILD_PID=$!

step "integration tests (pytest tests/python: Python clients, amqp-tools, Node clients via node --test; the fuzz targets build meanwhile)"
"$ROOT/.venv/bin/python" -m pytest tests/python -q -p no:cacheprovider --durations=25

# A smoke: every target builds and runs clean from its seeds for a few seconds, in the dev
# profile (debug assertions and overflow checks on; it builds in half the release build's
# time). Real runs: scripts/fuzz.sh alone, release by default.
step "fuzz smoke (scripts/fuzz.sh: every cargo-fuzz target, ${FUZZ_SECONDS} s each, ${FUZZ_PROFILE} profile)"
fuzz_build_rc=0
wait "$FUZZ_BUILD_PID" || fuzz_build_rc=$?
FUZZ_BUILD_PID=""
if ((fuzz_build_rc != 0)); then
    cat "$FUZZ_BUILD_LOG"
    echo "fuzz: the background build failed (exit $fuzz_build_rc)" >&2
    exit 1
fi
tail -5 "$FUZZ_BUILD_LOG"
bash scripts/fuzz.sh

step "benchmark smoke (benches/compare.sh --smoke: direct, HAProxy, the gateway, the gateway with backend tokens, RabbitMQ TLS with OAuth 2.0; debug build)"
bash benches/compare.sh --smoke

STEP="done"
echo
echo "test.sh: $SECONDS s in all"
echo "test.sh: ALL PASSED (setup, gate, lean and full builds, rust tests, python integration tests, fuzz smoke, benchmark smoke)"
