// A client that floods is refused, then closed for it (1008): the SDK backs off for at least
// `rateLimitDelay` before it connects again.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { WsgateClient } from '../dist/index.js';
import { next, startGateway, token } from './support.mjs';

const gateway = await startGateway({
  env: {
    WSGATE_RATE_LIMIT_MESSAGES: '2',
    WSGATE_RATE_LIMIT_BURST: '2',
    WSGATE_RATE_LIMIT_STRIKES: '3',
  },
});
after(() => gateway.stop());

test('refused while flooding, closed for it, and back only after the longer back-off', async (t) => {
  const mallory = new WsgateClient({
    url: gateway.url,
    token: token('mallory'),
    backoff: { minDelay: 100, rateLimitDelay: 1500 },
  });
  t.after(() => mallory.close());
  mallory.connect();
  await next(mallory, 'connected');
  const closed = next(mallory, 'disconnected');
  // Two pass (the burst), some are refused (each a strike), and the close fails the rest.
  const flood = Array.from({ length: 12 }, (_, n) => mallory.request('echo', { n }).catch((e) => e));
  const close = await closed;
  const closedAt = Date.now();
  assert.deepEqual([close.code, close.why, close.reconnect], [1008, 'rate_limited', true]);
  assert.ok(close.delay >= 1500, `backed off ${close.delay} ms`);
  const outcomes = await Promise.all(flood);
  assert.deepEqual(outcomes.slice(0, 2).map((o) => o.payload), [{ n: 0 }, { n: 1 }]);
  const refused = outcomes.filter((o) => o.kind === 'refused');
  assert.ok(refused.length >= 3, JSON.stringify(outcomes));
  assert.ok(refused.every((o) => o.message === 'Rate limit exceeded: slow down'));
  assert.ok(outcomes.some((o) => o.kind === 'disconnected'), 'the unanswered ones failed');
  await next(mallory, 'connected', 10_000);
  assert.ok(Date.now() - closedAt >= 1400, 'not back before the back-off');
});
