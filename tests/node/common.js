'use strict';
// Shared by the Node client tests. tests/python/test_clients_node.py starts the gateway,
// mints the tokens and runs `node --test` with:
//   GATEWAY_PORT     the gateway's AMQPS port on 127.0.0.1 (certificate for localhost)
//   GATEWAY_CA       the PEM file of the CA that signed the gateway's certificate
//   COMPAT_USERS     JSON {client: {sub, full, read_only}}: per client, a token with
//                    configure/write/read on compat.* and a read-only token, same sub
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');

function env(name) {
  const v = process.env[name];
  assert.ok(v, `${name} is not set: run these through tests/python/test_clients_node.py`);
  return v;
}

const port = Number(env('GATEWAY_PORT'));
const ca = fs.readFileSync(env('GATEWAY_CA'));

function user(client) {
  const u = JSON.parse(env('COMPAT_USERS'))[client];
  assert.ok(u, `no tokens for ${client}`);
  return {
    ...u,
    refused: (kind, resource, name) =>
      `ACCESS_REFUSED - ${kind} access to ${resource} '${name}' in vhost '/' refused for user '${u.sub}'`,
  };
}

// The URL form: empty username, the token as password, vhost "/" as %2f.
const url = (token) => `amqps://:${token}@localhost:${port}/%2f`;
const unique = (prefix) => `${prefix}-${crypto.randomUUID()}`;
const N = 20;

module.exports = { ca, port, user, url, unique, N };
