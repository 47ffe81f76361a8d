#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and prints, per target, the
# executions, the coverage reached and whether it crashed. The test command runs it
# briefly (a smoke run, so the targets keep building and the seeds keep passing); longer
# runs use the same script with more seconds.
#
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS each (default 10)
#   scripts/fuzz.sh frame jwt       only these targets
#
# Settings (environment, all optional):
#   FUZZ_SECONDS   seconds per target                                  [10]
#   FUZZ_WORK      where each run's corpus grows (a copy of the seeds) [fuzz/target/runs]
#   FUZZ_NICE      niceness of the fuzzers                             [0]
#   FUZZ_PROFILE   release (-O, for real runs) or dev (no optimisation, with debug
#                  assertions and overflow checks: builds in about half the time, runs
#                  5-30 times slower; the test command's smoke uses it)          [release]
#   FUZZ_BUILD_ONLY  1: build the targets and stop (the test command builds them in the
#                  background, niced, while the integration tests run)           [0]
#
# It installs cargo-fuzz (a pinned version, about 30 s) when it is missing. cargo-fuzz needs
# unstable compiler flags; RUSTC_BOOTSTRAP=1 allows them on the stable toolchain. No
# sanitizer: the crate has no `unsafe` of its own, and without AddressSanitizer the targets
# run about twice as fast. A crash fails the script; its input is in
# fuzz/artifacts/<target>/, and `RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -O
# <target> <file>` (in fuzz/) replays it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
FUZZ="$(pwd)"

CARGO_FUZZ_VERSION="0.13.2"
SECONDS_EACH="${FUZZ_SECONDS:-10}"
WORK="${FUZZ_WORK:-$FUZZ/target/runs}"
NICE="${FUZZ_NICE:-0}"
case "${FUZZ_PROFILE:-release}" in
    release) PROFILE=(-O) ;;
    dev) PROFILE=(--dev) ;;
    *) echo "fuzz: FUZZ_PROFILE must be release or dev" >&2; exit 2 ;;
esac
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
fi

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz: building ${targets[*]} (${FUZZ_PROFILE:-release})"
cargo fuzz build --sanitizer none "${PROFILE[@]}"
if [[ ${FUZZ_BUILD_ONLY:-0} == 1 ]]; then
    echo "fuzz: built"
    exit 0
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    run="$WORK/$t"
    rm -rf "$run"
    mkdir -p "$run"
    if [[ -d "corpus/$t" ]]; then
        cp -r "corpus/$t/." "$run/"
    fi
    log="$WORK/$t.log"
    echo "fuzz: $t for ${SECONDS_EACH} s"
    rc=0
    nice -n "$NICE" cargo fuzz run --sanitizer none "${PROFILE[@]}" "$t" "$run" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    # libFuzzer's last status line: "#<runs> DONE cov: <n> ft: <n> corp: <n>/<size> ..."
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)"
    execs="$(grep -E '^stat::number_of_executed_units:' "$log" | awk '{print $2}' | tail -1 || true)"
    cov="$(sed -nE 's/.* cov: ([0-9]+) ft: ([0-9]+) corp: ([0-9]+).*/cov \1, ft \2, corpus \3/p' <<<"$done_line")"
    if ((rc != 0)) || [[ -z "$done_line" ]]; then
        failed+=("$t")
        summary+=("$(printf '%-10s FAILED (exit %s); log: %s' "$t" "$rc" "$log")")
        tail -40 "$log" >&2
    else
        summary+=("$(printf '%-10s %12s executions in %s s, %s' "$t" "${execs:-?}" "$SECONDS_EACH" "$cov")")
    fi
done

echo
echo "fuzz summary (${SECONDS_EACH} s per target, --sanitizer none ${PROFILE[*]}):"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]} > 0)); then
    echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
