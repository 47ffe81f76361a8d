'use strict';
// amqplib through the gateway over TLS: URL form with an empty username, confirm channel,
// consume and ack, a 403 that closes one channel only, and connection.updateSecret.
//
// Quirk: a channel closed by the server emits 'error' on the channel object; without an
// 'error' listener on that channel the emit throws inside amqplib's frame handling and
// amqplib closes the whole connection (same against RabbitMQ directly). Workaround: attach
// an 'error' listener to every channel that may be refused (the error is also the
// rejection of the pending operation). The second test shows the behaviour.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const amqp = require('amqplib');
const { ca, user, url, unique, N } = require('./common');

test('amqplib: round trip, refusal on one channel, update-secret', async () => {
  const u = user('amqplib');
  const conn = await amqp.connect(url(u.full), { ca: [ca] });
  try {
    const ch = await conn.createConfirmChannel();
    const ex = unique('compat.amqplib.x');
    const q = unique('compat.amqplib.q');
    await ch.assertExchange(ex, 'direct', { durable: false });
    await ch.assertQueue(q, { durable: false });
    await ch.bindQueue(q, ex, 'rk');
    for (let i = 0; i < N; i++) ch.publish(ex, 'rk', Buffer.from(`m${i}`));
    await ch.waitForConfirms(); // rejects if any publish was nacked

    const got = [];
    let resolveAll;
    const all = new Promise((resolve) => { resolveAll = resolve; });
    const { consumerTag } = await ch.consume(q, (msg) => {
      got.push(msg.content.toString());
      ch.ack(msg);
      if (got.length === N) resolveAll();
    });
    const timer = setTimeout(() => resolveAll(), 10000);
    await all;
    clearTimeout(timer);
    await ch.cancel(consumerTag);
    assert.deepEqual(got, Array.from({ length: N }, (_, i) => `m${i}`));

    // A forbidden operation: 403 on that channel only.
    const bad = await conn.createChannel();
    const errors = [];
    bad.on('error', (e) => errors.push(e));
    const forbidden = unique('forbidden.amqplib');
    const text = u.refused('configure', 'queue', forbidden);
    await assert.rejects(bad.assertQueue(forbidden), (e) => {
      assert.match(e.message, /403 \(ACCESS-REFUSED\)/);
      assert.ok(e.message.includes(text), e.message);
      return true;
    });
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, 403);
    assert.equal(errors[0].message, `Channel closed by server: 403 (ACCESS-REFUSED) with message "${text}"`);

    // The connection and the first channel keep working; a new channel too.
    ch.publish(ex, 'rk', Buffer.from('after'));
    await ch.waitForConfirms();
    const ch2 = await conn.createChannel();
    let msg = false;
    for (let i = 0; i < 50 && !msg; i++) {
      msg = await ch2.get(q);
      if (!msg) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(msg, 'basic.get found nothing');
    assert.equal(msg.content.toString(), 'after');
    ch2.ack(msg);
    await ch.close();
    await ch2.deleteQueue(q);
    await ch2.deleteExchange(ex);

    // connection.update-secret: refresh to the read-only token of the same user.
    await conn.updateSecret(Buffer.from(u.read_only), 'refresh');
    const ch3 = await conn.createChannel();
    ch3.on('error', () => {});
    const again = unique('compat.amqplib.q');
    await assert.rejects(ch3.assertQueue(again), (e) => {
      assert.ok(e.message.includes(u.refused('configure', 'queue', again)), e.message);
      return true;
    });
    const ch4 = await conn.createChannel(); // still usable
    await ch4.close();
  } finally {
    await conn.close();
  }
});

test('amqplib quirk: no channel error listener, the refusal closes the connection', async () => {
  const u = user('amqplib');
  const conn = await amqp.connect(url(u.full), { ca: [ca] });
  const connErrors = [];
  conn.on('error', (e) => connErrors.push(e));
  const closed = new Promise((resolve) => conn.on('close', resolve));
  const bad = await conn.createChannel(); // no bad.on('error', ...)
  const forbidden = unique('forbidden.amqplib');
  await assert.rejects(bad.assertQueue(forbidden), /403 \(ACCESS-REFUSED\)/);
  await closed; // amqplib closed the connection itself
  assert.equal(connErrors.length, 1);
  assert.ok(connErrors[0].message.includes(u.refused('configure', 'queue', forbidden)));
});
