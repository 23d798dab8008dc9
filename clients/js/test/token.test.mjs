// Tokens that expire: refreshed before they do (the connection stays), and when a refresh fails,
// the close for an expired token (4001) is followed by a new token and a new connection.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { WsgateClient } from '../dist/index.js';
import { next, record, startGateway, token } from './support.mjs';

// Expired means expired: no leeway, so that a 3-second token ends in 3 seconds.
const gateway = await startGateway({ env: { WSGATE_JWT_LEEWAY: '0s' } });
after(() => gateway.stop());

test('a token about to expire is refreshed and the connection stays', async (t) => {
  let minted = 0;
  const alice = new WsgateClient({
    url: gateway.url,
    token: () => { minted += 1; return token('alice', 4); },
    refreshBefore: 2000,
  });
  t.after(() => alice.close());
  const disconnects = record(alice, 'disconnected');
  alice.connect();
  await alice.room('general').join();
  const { clientId } = alice;
  const refreshed = await next(alice, 'token_refreshed', 5000);
  assert.ok(refreshed.expiresAt * 1000 > Date.now() + 2000, JSON.stringify(refreshed));
  // Past the first token's expiry: still the same connection.
  await sleep(3000);
  assert.deepEqual([alice.state, alice.clientId, disconnects.length], ['connected', clientId, 0]);
  assert.ok(minted >= 2, `minted ${minted}`);
});

test('a token that expires unrefreshed ends the connection; a new token brings it back', async (t) => {
  let calls = 0;
  const bob = new WsgateClient({
    url: gateway.url,
    token: () => {
      calls += 1;
      if (calls === 2) throw new Error('the backend is down');
      return token('bob', calls === 1 ? 2 : 3600);
    },
    backoff: { minDelay: 100 },
  });
  t.after(() => bob.close());
  const errors = record(bob, 'error');
  bob.connect();
  const room = bob.room('general');
  await room.join();
  const closed = await next(bob, 'disconnected', 6000);
  assert.deepEqual([closed.code, closed.why, closed.reconnect], [4001, 'token_expired', true]);
  assert.equal(errors[0]?.kind, 'token', 'the failed refresh was told');
  const back = await next(bob, 'connected', 5000);
  assert.equal(back.reconnected, true);
  assert.equal((await next(room, 'joined')).rejoined, true);
  assert.equal(calls, 3);
});

test('with a fixed token, an expired one is final', async (t) => {
  const carol = new WsgateClient({ url: gateway.url, token: token('carol', 2) });
  t.after(() => carol.close());
  carol.connect();
  const closed = await next(carol, 'disconnected', 6000);
  assert.deepEqual([closed.code, closed.why, closed.reconnect], [4001, 'token_expired', false]);
  assert.equal(carol.state, 'disconnected');
});

test('a token the gateway refuses is told with its reason; a token function gets a new one', async (t) => {
  // A fixed token that is not the gateway's: told why (4401), and final.
  const forged = new WsgateClient({ url: gateway.url, token: token('mallory', 3600, 'not-the-gateways-secret') });
  t.after(() => forged.close());
  forged.connect();
  const closed = await next(forged, 'disconnected');
  assert.deepEqual(
    [closed.code, closed.reason, closed.why, closed.greeted, closed.reconnect],
    [4401, 'bad_signature: invalid token signature', 'unauthorized', false, false],
  );
  // A token function whose first token is expired: refused, then a new one, connected.
  let calls = 0;
  const erin = new WsgateClient({
    url: gateway.url,
    token: () => token('erin', ++calls === 1 ? -60 : 3600),
    backoff: { minDelay: 50 },
  });
  t.after(() => erin.close());
  const refused = next(erin, 'disconnected');
  erin.connect();
  const first = await refused;
  assert.deepEqual([first.code, first.reason, first.reconnect], [4401, 'token_expired: token expired', true]);
  await next(erin, 'connected');
  assert.equal(calls, 2);
});
