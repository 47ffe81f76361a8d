#!/usr/bin/env bash
# The scale-out stack's tests (docker-compose.scale-out.yml): HAProxy with send-proxy-v2 in
# front of two gateways in front of a two-node RabbitMQ cluster; load spread, a gateway
# stopped with SIGTERM and with SIGKILL under publishers with confirms and consumers, a
# RabbitMQ node stopped, the clients' addresses in the audit logs. About 3 minutes; not yet
# part of scripts/test.sh (its time budget). Needs scripts/setup.sh and a built gateway.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export GATEWAY_BIN="${GATEWAY_BIN:-target/debug/amqp-iam-gateway}"
[[ -x "$GATEWAY_BIN" ]] || cargo build --features test-switches
SCALE_OUT_TESTS=1 exec .venv/bin/python -m pytest tests/python/test_containers.py -q \
    -p no:cacheprovider -rA -k "spread or stopped"
