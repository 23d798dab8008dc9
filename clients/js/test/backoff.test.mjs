// What the SDK makes of close codes, and the delays it waits (no gateway needed).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_BACKOFF, classifyClose, reconnectDelay, tokenClaims, tokenExpiry } from '../dist/index.js';
import { token } from './support.mjs';

test('close codes are read as the gateway means them', () => {
  assert.equal(classifyClose(4001, 'token expired', true), 'token_expired');
  assert.equal(classifyClose(4401, 'bad_signature: invalid token signature', false), 'unauthorized');
  assert.equal(classifyClose(4003, 'banned', true), 'kicked');
  assert.equal(classifyClose(4403, 'denied', false), 'kicked');
  assert.equal(classifyClose(1008, 'rate limit exceeded', true), 'rate_limited');
  assert.equal(classifyClose(1008, 'slow consumer', true), 'lost');
  assert.equal(classifyClose(1001, 'server shutting down', true), 'restarting');
  assert.equal(classifyClose(1006, '', true), 'lost');
  assert.equal(classifyClose(1006, '', false), 'failed');
});

test('delays grow with full jitter, and are longer after flooding', () => {
  const options = DEFAULT_BACKOFF;
  const top = () => 0.999999;
  const bottom = () => 0;
  assert.ok(reconnectDelay('lost', 0, options, top) < options.minDelay);
  assert.equal(reconnectDelay('lost', 3, options, bottom), 0, 'full jitter reaches zero');
  assert.ok(reconnectDelay('lost', 3, options, top) > options.minDelay * 7);
  assert.ok(reconnectDelay('lost', 50, options, top) <= options.maxDelay, 'bounded');
  assert.ok(reconnectDelay('rate_limited', 0, options, bottom) >= options.rateLimitDelay);
  assert.ok(reconnectDelay('restarting', 0, options, top) <= options.restartSpread);
  assert.ok(reconnectDelay('token_expired', 9, options, top) <= options.minDelay);
});

test("a token's expiry is read from its claims", () => {
  const exp = tokenExpiry(token('alice', 60));
  assert.ok(Math.abs(exp - (Date.now() / 1000 + 60)) < 5);
  assert.equal(tokenExpiry('not a token'), undefined);
  assert.equal(tokenExpiry('a.b.c'), undefined);
  assert.equal(tokenClaims(token('alice', 60)).sub, 'alice');
  assert.deepEqual(tokenClaims('not a token'), {});
});
