'use strict';
// rabbitmq-client through the gateway over TLS: URL form with an empty username (the TLS
// options go beside the URL), confirms, consume and ack, a 403 that closes one channel only.
//
// rabbitmq-client 5.0.8 has no connection.update-secret (its codec does not know the
// method); the way to move to a new token is a new Connection (or letting the gateway's
// `320 CONNECTION_FORCED - credential expired` close it, after which the client reconnects
// with the options it was built with: the old token). Its default frameMax is 8192; the
// gateway takes the tune values the client sends back.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { Connection } = require('rabbitmq-client');
const { ca, user, url, unique, N } = require('./common');

test('rabbitmq-client: round trip, refusal on one channel', async () => {
  const u = user('rabbitmq-client');
  const rabbit = new Connection({ url: url(u.full), tls: { ca: [ca] }, retryLow: 100, retryHigh: 500 });
  const connErrors = [];
  rabbit.on('error', (e) => connErrors.push(e));
  try {
    await rabbit.onConnect(10000);
    const ch = await rabbit.acquire();
    const ex = unique('compat.rabbitmq-client.x');
    const q = unique('compat.rabbitmq-client.q');
    await ch.exchangeDeclare({ exchange: ex, type: 'direct' });
    await ch.queueDeclare({ queue: q });
    await ch.queueBind({ queue: q, exchange: ex, routingKey: 'rk' });
    await ch.confirmSelect();
    // In confirm mode basicPublish resolves on the broker's ack (and rejects on a nack).
    // A body above frameMax (8192) spans several body frames.
    const big = Buffer.alloc(50000, 7);
    for (let i = 0; i < N; i++) {
      await ch.basicPublish({ exchange: ex, routingKey: 'rk', messageId: String(i) }, i === N - 1 ? big : `m${i}`);
    }

    const got = [];
    let resolveAll;
    const all = new Promise((resolve) => { resolveAll = resolve; });
    const { consumerTag } = await ch.basicConsume({ queue: q }, (msg) => {
      got.push(msg.body);
      ch.basicAck({ deliveryTag: msg.deliveryTag });
      if (got.length === N) resolveAll();
    });
    const timer = setTimeout(resolveAll, 10000);
    await all;
    clearTimeout(timer);
    await ch.basicCancel(consumerTag);
    assert.equal(got.length, N);
    got.slice(0, N - 1).forEach((b, i) => assert.equal(b, `m${i}`)); // text bodies decode to strings
    assert.ok(Buffer.isBuffer(got[N - 1]) && got[N - 1].equals(big));

    // A forbidden operation: 403 on that channel only.
    const bad = await rabbit.acquire();
    const forbidden = unique('forbidden.rabbitmq-client');
    await assert.rejects(bad.queueDeclare({ queue: forbidden }), (e) => {
      assert.equal(e.code, 'ACCESS_REFUSED');
      assert.equal(e.message, `QueueDeclare: ${u.refused('configure', 'queue', forbidden)}`);
      return true;
    });
    assert.equal(bad.active, false);
    assert.ok(rabbit.ready, 'the connection must stay up');

    // The first channel and a new one keep working.
    await ch.basicPublish({ exchange: ex, routingKey: 'rk' }, 'after');
    const ch2 = await rabbit.acquire();
    let msg;
    for (let i = 0; i < 50 && !msg; i++) {
      msg = await ch2.basicGet({ queue: q });
      if (!msg) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(msg, 'basic.get found nothing');
    assert.equal(msg.body, 'after');
    ch2.basicAck({ deliveryTag: msg.deliveryTag });
    await ch2.queueDelete({ queue: q });
    await ch2.exchangeDelete({ exchange: ex });
    await ch.close();
    await ch2.close();
    assert.deepEqual(connErrors, []);
  } finally {
    await rabbit.close();
  }
});
