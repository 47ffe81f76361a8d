#!/usr/bin/env bash
# The scale-out stack's tests alone (docker-compose.scale-out.yml; the test command runs them
# with the other container tests): HAProxy with send-proxy-v2 in front of two gateways in
# front of a two-node RabbitMQ cluster; load spread, a gateway stopped with SIGTERM and with
# SIGKILL under publishers with confirms and consumers, a RabbitMQ node stopped, the
# clients' addresses in the audit logs. About a minute once the images exist (about 2 on a
# new machine). Needs scripts/setup.sh; builds the gateway if it is missing. Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export GATEWAY_BIN="${GATEWAY_BIN:-target/debug/amqp-iam-gateway}"
[[ -x "$GATEWAY_BIN" ]] || cargo build --features test-switches
[[ -x target/lean/amqp-iam-gateway ]] || { bash scripts/build-lean.sh && cargo build --features test-switches; }
exec .venv/bin/python -m pytest tests/python/test_containers.py -q -p no:cacheprovider \
    -k "spread or stopped" "$@"
