// A single node restarts: the client comes back by itself, spread out, rejoins its rooms (the
// room's stream started over with the node: reported as not recovered), and what was queued
// while it was down is sent.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WsgateClient } from '../dist/index.js';
import { next, record, startGateway, token, until } from './support.mjs';

test('after its node restarts the client reconnects, rejoins and sends what was queued', async (t) => {
  let gateway = await startGateway();
  const alice = new WsgateClient({
    url: gateway.url,
    token: () => token('alice'),
    maxQueued: 10,
    backoff: { minDelay: 100, maxDelay: 1000, restartSpread: 300 },
  });
  t.after(async () => { alice.close(); await gateway.stop(); });
  alice.connect();
  const room = alice.room('general');
  const first = await room.join();
  assert.equal(first.recovered, undefined, 'a first join asks for nothing');
  const before = await room.send('before');
  const { clientId } = alice;

  const disconnected = next(alice, 'disconnected');
  await gateway.stop('SIGTERM');
  const closed = await disconnected;
  assert.deepEqual(
    [closed.code, closed.why, closed.reconnect],
    [1001, 'restarting', true],
  );
  assert.ok(closed.delay <= 300, `spread within restartSpread: ${closed.delay}`);
  // Sent while the node is down: kept until the client is back.
  const queued = room.send('while down');
  const rejoined = next(room, 'joined', 15_000);
  const messages = record(room, 'message');
  gateway = await startGateway({ port: gateway.port });

  const joined = await rejoined;
  assert.equal(joined.rejoined, true);
  assert.equal(joined.recovered, false, 'the restarted node started the room over');
  assert.notEqual(alice.clientId, clientId);
  const sent = await queued;
  assert.ok(sent.offset >= 1);
  // The ack and the message may come in either order.
  await until('the queued message came back', () => messages.length === 1);
  assert.deepEqual(messages.map((m) => [m.message, m.offset]), [['while down', sent.offset]]);
  assert.notEqual(joined.epoch, first.epoch);
  assert.ok(before.offset >= 1);
});
