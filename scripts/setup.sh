#!/usr/bin/env bash
# Prepares a Debian machine (as root) for the test suite. Idempotent and fast when
# everything is already there:
#   - Debian packages: rabbitmq-server, openssl, curl, prometheus (for promtool), python3
#     with venv, haproxy (benches/compare.sh; its service is not started), chromium and
#     chromium-driver (the management UI's browser test), kubectl (kubernetes-client, to
#     render deploy/kubernetes), docker.io, docker-compose and debootstrap (the container
#     tests); apt-get update once, only when
#     something is missing;
#   - a running RabbitMQ node on 127.0.0.1:5672 with the default `guest` user, which the
#     test gateway uses as its backend service user, and the management plugin on
#     127.0.0.1:15672 (the gateway looks exchange types up there), and the OAuth 2.0
#     plugin set up for the development gateway's backend tokens (its key is created in
#     the gateway's state directory when missing);
#   - .venv with tests/python/requirements.txt installed;
#   - amqp-tools (librabbitmq's CLI), Node.js and npm, and tests/node/node_modules from
#     its lockfile (npm ci) for the client compatibility suite.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# shellcheck source=SCRIPTDIR/lib.sh
source "$ROOT/scripts/lib.sh"

# --- Debian packages -------------------------------------------------------------------

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
installed rabbitmq-server || missing+=(rabbitmq-server)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# promtool checks the gateway's /metrics output in the tests.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v openssl >/dev/null 2>&1 || installed openssl || missing+=(openssl)
# The client compatibility suite: librabbitmq's CLI tools, Node.js and npm.
command -v amqp-publish >/dev/null 2>&1 || missing+=(amqp-tools)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# benches/compare.sh (and its smoke in test.sh) runs HAProxy as the TLS-terminating baseline.
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
# The management UI's browser test (tests/python/test_management.py): headless Chromium
# driven through ChromeDriver, both from Debian.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
# The Kubernetes manifests are rendered with `kubectl kustomize` (tests/python/test_kubernetes.py);
# any kubectl will do, Debian's is kubernetes-client.
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
# The container tests (tests/python/test_containers.py): Docker Engine, Compose v1, and
# debootstrap for a base image without a registry. dockerd is started by the tests.
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

apt_install "${missing[@]}"

# --- RabbitMQ --------------------------------------------------------------------------

rabbit_up() { timeout 30 rabbitmqctl -q status >/dev/null 2>&1; }

if rabbit_up; then
    log "RabbitMQ is running"
else
    log "starting RabbitMQ"
    rabbitmq-server -detached || true
    deadline=$((SECONDS + 60))
    until timeout 20 rabbitmqctl -q await_startup >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "RabbitMQ did not start within 60 s (see /var/log/rabbitmq/)"
        sleep 1
    done
    log "RabbitMQ started"
fi

# The gateway under test logs in as guest/guest (allowed from loopback only, which is
# where the gateway connects from). A fresh install has it; recreate it if it was removed.
if ! rabbitmqctl -q list_users | awk '{print $1}' | grep -qx guest; then
    log "creating the guest user"
    rabbitmqctl -q add_user guest guest
    rabbitmqctl -q set_user_tags guest administrator
fi
rabbitmqctl -q set_permissions -p / guest '.*' '.*' '.*' >/dev/null
# As the gateway's service user, guest needs `impersonator` so that the user_id properties the
# gateway has validated pass the broker's own check (the README's advice for real deployments).
if ! rabbitmqctl -q list_users | grep -E '^guest\s' | grep -q impersonator; then
    rabbitmqctl -q set_user_tags guest administrator impersonator
fi

# The management API answers the gateway's exchange-type lookups (backend.management_url).
if ! curl -sf -o /dev/null -u guest:guest http://127.0.0.1:15672/api/overview; then
    log "enabling the management plugin"
    rabbitmq-plugins -q enable rabbitmq_management >/dev/null
    deadline=$((SECONDS + 60))
    until curl -sf -o /dev/null -u guest:guest http://127.0.0.1:15672/api/overview; do
        ((SECONDS < deadline)) || die "the management API did not come up within 60 s"
        sleep 1
    done
fi

# --- backend tokens for development mode ------------------------------------------------
# The development gateway (`amqp-iam-gateway` with no arguments) mints a token per client for
# RabbitMQ's OAuth 2.0 plugin, signed with its own key (backend-token.pem in its state
# directory), so that RabbitMQ checks every operation too. This node gets the plugin,
# auth_backends = internal then oauth2 (guest and the service users keep their passwords),
# resource_server_id = rabbitmq, and the key's public half as signing key
# amqp-iam-gateway-dev. Set at runtime (rabbitmqctl eval): a node restart forgets it until
# the next run of this script.
STATE_DIR="${AMQP_IAM_GATEWAY_STATE:-${XDG_STATE_HOME:-${HOME:-.}/.local/state}/amqp-iam-gateway}"
[[ -n ${AMQP_IAM_GATEWAY_STATE:-} || -n ${XDG_STATE_HOME:-} || -n ${HOME:-} ]] \
    || STATE_DIR=".amqp-iam-gateway"
DEV_KEY="$STATE_DIR/backend-token.pem"
if [[ ! -f $DEV_KEY ]]; then
    log "creating the development gateway's backend token key ($DEV_KEY)"
    mkdir -p "$STATE_DIR"
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DEV_KEY")
fi
openssl pkey -in "$DEV_KEY" -pubout -out "$STATE_DIR/backend-token.pub.pem" 2>/dev/null
if ! rabbitmq-plugins -q list -e -m 2>/dev/null | grep -qx rabbitmq_auth_backend_oauth2; then
    log "enabling rabbitmq_auth_backend_oauth2 (backend tokens)"
    rabbitmq-plugins -q enable rabbitmq_auth_backend_oauth2 >/dev/null
fi
pem="$(awk '{printf "%s\\n", $0}' "$STATE_DIR/backend-token.pub.pem")"
out="$(rabbitmqctl -q eval "
    App = rabbitmq_auth_backend_oauth2,
    ok = application:set_env(rabbit, auth_backends,
                             [rabbit_auth_backend_internal, rabbit_auth_backend_oauth2]),
    ok = application:set_env(App, resource_server_id, <<\"rabbitmq\">>),
    KC = application:get_env(App, key_config, []),
    Keys = proplists:get_value(signing_keys, KC, #{}),
    ok = application:set_env(App, key_config,
        [{signing_keys, Keys#{<<\"amqp-iam-gateway-dev\">> => {pem, <<\"$pem\">>}}}
         | proplists:delete(signing_keys, KC)]),
    ok.")" || die "configuring backend tokens on the node failed: $out"
[[ $out == ok ]] || die "configuring backend tokens on the node: $out"
log "RabbitMQ accepts the development gateway's backend tokens (kid amqp-iam-gateway-dev)"

# --- Python venv -----------------------------------------------------------------------

REQ="$ROOT/tests/python/requirements.txt"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
    && "$VENV/bin/python" -c 'import pika, jwt, cryptography, pytest, aio_pika, kombu, amqp' >/dev/null 2>&1; then
    log "Python requirements already installed"
else
    log "installing Python requirements"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
    echo "$want" >"$STAMP"
fi

# --- Node.js clients (tests/node) -------------------------------------------------------

NODE_DIR="$ROOT/tests/node"
NODE_STAMP="$NODE_DIR/node_modules/.package-lock.sha256"
want="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ -f "$NODE_STAMP" && "$(cat "$NODE_STAMP")" == "$want" ]]; then
    log "Node requirements already installed"
else
    log "installing Node requirements (npm ci in tests/node)"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$NODE_STAMP"
fi

# The AWS CLI (v1, from PyPI) in a venv of its own: it pins a botocore other than boto3's.
AWSCLI_VENV="$ROOT/.venv-awscli"
if [[ ! -x "$AWSCLI_VENV/bin/aws" ]]; then
    log "installing the AWS CLI into $AWSCLI_VENV"
    python3 -m venv "$AWSCLI_VENV"
    "$AWSCLI_VENV/bin/python" -m pip install -q --disable-pip-version-check "awscli==1.46.3"
fi

log "done"
