// One gateway, clients of the SDK: requests answered by id, chat, refusals, presence pages,
// typing, a backend's publication to a user, leaving, the queue, a disconnect from the backend.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { WsgateClient, WsgateError } from '../dist/index.js';
import { api, next, record, startGateway, token, until } from './support.mjs';

const gateway = await startGateway();
after(() => gateway.stop());

function connected(user, options = {}) {
  const client = new WsgateClient({ url: gateway.url, token: token(user), ...options });
  client.connect();
  return client;
}

test('chat reaches every member once, answers match their requests, refusals reject', async (t) => {
  const alice = connected('alice');
  const bob = connected('bob');
  t.after(() => { alice.close(); bob.close(); });
  const [aliceRoom, bobRoom] = [alice.room('general'), bob.room('general')];
  // Joined once connected.
  const joined = await aliceRoom.join();
  assert.equal(joined.room, 'general');
  assert.equal(typeof joined.epoch, 'string');
  assert.equal(alice.state, 'connected');
  assert.match(alice.clientId, /^\w+\.\w+\.\w+\.\w+$/);
  const bobJoins = next(aliceRoom, 'user_joined');
  await bobRoom.join();
  assert.equal((await bobJoins).userId, 'bob');

  const [aliceGot, bobGot] = [record(aliceRoom, 'message'), record(bobRoom, 'message')];
  const sent = await aliceRoom.send('hi bob');
  assert.ok(sent.offset > joined.offset, JSON.stringify(sent));
  await until('both got it', () => aliceGot.length === 1 && bobGot.length === 1);
  assert.deepEqual(
    [bobGot[0].message, bobGot[0].userId, bobGot[0].offset],
    ['hi bob', 'alice', sent.offset],
  );
  // Sent again under its messageId: published once, answered with the first one's offset.
  assert.equal((await aliceRoom.send('hi bob', { messageId: sent.messageId })).offset, sent.offset);

  await assert.rejects(alice.room('elsewhere').send('x'), (error) => error instanceof WsgateError
    && error.kind === 'refused' && error.message === 'Not a member of room: elsewhere');
  await assert.rejects(alice.room('no spaces').join(), (error) => error.kind === 'refused'
    && /Invalid room name/.test(error.message));

  const users = [];
  for await (const user of aliceRoom.presence()) users.push(user.userId);
  assert.deepEqual(users.sort(), ['alice', 'bob']);

  const typing = next(bobRoom, 'typing');
  aliceRoom.typing(true);
  assert.deepEqual([(await typing).userId, (await typing).isTyping], ['alice', true]);

  const published = next(bob, 'user');
  assert.equal((await api(gateway, 'publish', { user: 'bob', data: { invoice: 42 } })).status, 200);
  assert.deepEqual((await published).data, { invoice: 42 });

  const aliceLeaves = next(bobRoom, 'user_left');
  await aliceRoom.leave();
  assert.equal((await aliceLeaves).userId, 'alice');
  assert.equal(aliceRoom.joined, false);
  assert.equal(aliceGot.length, 1, 'nothing twice');
});

test('without a queue a request while disconnected fails at once; with one it waits, bounded', async (t) => {
  const idle = new WsgateClient({ url: gateway.url, token: token('carol') });
  await assert.rejects(idle.request('echo', {}), (error) => error.kind === 'not_connected');

  const queued = new WsgateClient({ url: gateway.url, token: token('carol'), maxQueued: 2 });
  t.after(() => queued.close());
  queued.connect();
  // Not greeted yet: kept, then sent in order once connected.
  const first = queued.request('echo', { n: 1 });
  const second = queued.request('echo', { n: 2 });
  await assert.rejects(queued.request('echo', { n: 3 }), (error) => error.kind === 'not_connected'
    && /queue is full/.test(error.message));
  assert.deepEqual([(await first).payload, (await second).payload], [{ n: 1 }, { n: 2 }]);
});

test('a user disconnected by the backend is told so and not connected again', async () => {
  const dave = connected('dave');
  await dave.room('general').join();
  const disconnected = next(dave, 'disconnected');
  const answer = await api(gateway, 'disconnect', { user: 'dave', code: 4003, reason: 'banned' });
  assert.equal(answer.body.connections, 1);
  assert.deepEqual(await disconnected, {
    code: 4003, reason: 'banned', why: 'kicked', greeted: true, reconnect: false,
  });
  assert.equal(dave.state, 'disconnected');
  await assert.rejects(dave.room('general').send('back?'), (error) => error.kind === 'not_connected');
});
