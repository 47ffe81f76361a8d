#!/usr/bin/env bash
# Runs the gateway locally on proxy-config/dev.toml: TLS on 127.0.0.1:5671 and plain AMQP on
# 127.0.0.1:5674, in front of RabbitMQ on 127.0.0.1:5672 (guest), trusting a local RS256
# signing key. Creates the development CA, server certificate and signing key in .dev/ on
# first use (throw-away material: never use it outside your machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .dev
if [ ! -f .dev/server.pem ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=amqp-iam-gateway dev CA" \
    -keyout .dev/ca-key.pem -out .dev/ca.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout .dev/server-key.pem -out .dev/server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > .dev/server.ext
  openssl x509 -req -in .dev/server.csr -CA .dev/ca.pem -CAkey .dev/ca-key.pem -CAcreateserial \
    -days 825 -extfile .dev/server.ext -out .dev/server.pem 2>/dev/null
  echo "created .dev/ca.pem (trust it in clients) and .dev/server.pem"
fi
if [ ! -f .dev/signing-key.pem ]; then
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out .dev/signing-key.pem 2>/dev/null
  openssl pkey -in .dev/signing-key.pem -pubout -out .dev/signing-key.pub.pem
  echo "created .dev/signing-key.pem (mint tokens with scripts/mint-token.py)"
fi
exec cargo run --release -- serve --config proxy-config/dev.toml
