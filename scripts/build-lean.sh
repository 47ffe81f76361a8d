#!/usr/bin/env bash
# Builds the lean production gateway (`--no-default-features`: no development mode, no STS
# emulator) in the debug profile and puts it at target/lean/amqp-iam-gateway, where the
# scale-out stack's image takes it from. The test command runs it once, so the lean build
# keeps compiling and is what the scale-out test serves with. Only the gateway's own crate
# is compiled again (its dependencies do not change with the feature). It leaves the lean
# binary in target/debug too: build the full one after it (the test command does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --no-default-features --bin amqp-iam-gateway
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
mkdir -p "$TARGET_DIR/lean"
cp "$TARGET_DIR/debug/amqp-iam-gateway" "$TARGET_DIR/lean/amqp-iam-gateway"
echo "build-lean: $TARGET_DIR/lean/amqp-iam-gateway ($(du -h "$TARGET_DIR/lean/amqp-iam-gateway" | cut -f1))"
