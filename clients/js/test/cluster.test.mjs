// Two nodes joined by a real redis-server: the node a client is on is killed (SIGKILL, no
// goodbye); the client fails over to the other URL, rejoins with `since`, and gets every message
// it missed meanwhile, once each, in order.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WsgateClient } from '../dist/index.js';
import { next, record, startGateway, startRedis, token, until } from './support.mjs';

test('a client on a killed node fails over and recovers what it missed', async (t) => {
  const redis = await startRedis();
  const env = { WSGATE_BROKER: 'redis', WSGATE_REDIS_URL: redis.url };
  const one = await startGateway({ env });
  const two = await startGateway({ env });
  const backoff = { minDelay: 100, maxDelay: 1000 };
  // While `away` is set, alice's token function waits on it: she stays away until it is let go.
  let away = null;
  const alice = new WsgateClient({
    url: [one.url, two.url],
    token: async () => { await away?.promise; return token('alice'); },
    backoff,
  });
  const bob = new WsgateClient({ url: two.url, token: () => token('bob'), backoff });
  t.after(async () => {
    alice.close();
    bob.close();
    await Promise.all([one.stop(), two.stop()]);
    redis.stop();
  });
  alice.connect();
  bob.connect();
  const [aliceRoom, bobRoom] = [alice.room('general'), bob.room('general')];
  await aliceRoom.join();
  await bobRoom.join();
  assert.equal(alice.url, one.url);
  const got = record(aliceRoom, 'message');
  await bobRoom.send('m1');
  await until('alice got m1', () => got.length === 1);

  const failedOver = next(alice, 'connected', 15_000);
  const rejoined = next(aliceRoom, 'joined', 15_000);
  away = Promise.withResolvers();
  await one.stop('SIGKILL');
  // Published once alice's node is dead: she can only get them by recovery on the other node
  // (where her new token is held back until they are published).
  await bobRoom.send('m2');
  await bobRoom.send('m3');
  away.resolve();
  const connected = await failedOver;
  assert.equal(connected.url, two.url);
  assert.equal(connected.reconnected, true);
  const joined = await rejoined;
  assert.deepEqual([joined.rejoined, joined.recovered], [true, true]);
  await bobRoom.send('m4');
  await until('alice got m4', () => got.length === 4);
  assert.deepEqual(got.map((m) => m.message), ['m1', 'm2', 'm3', 'm4']);
  assert.deepEqual(got.map((m) => m.offset), [1, 2, 3, 4].map((n) => got[0].offset + n - 1));
});
