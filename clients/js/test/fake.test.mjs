// The SDK against a scripted socket: what a real gateway rarely does on cue — answers out of
// order, an answer and a message in one tick, a join answered after a leave, a token function that
// hangs, a connection that goes silent, a close for a message too big, a close in the middle of
// connecting — made to happen, deterministically.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { WsgateClient } from '../dist/index.js';
import { next, record, until } from './support.mjs';

/** A WebSocket the test plays the gateway of. */
class FakeSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closed = null;
    FakeSocket.all.push(this);
  }
  static get last() { return FakeSocket.all.at(-1); }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code = 1000) { this.closed = code; }
  /** Opens and greets, as the gateway does. */
  greet(clientId = 'n.0.0.1') {
    this.onopen?.({});
    this.deliver({ type: 'connected', clientId, timestamp: Date.now() });
  }
  /** Delivers `messages` one after the other in the same tick, as a runtime does for one read. */
  deliver(...messages) {
    for (const message of messages) this.onmessage?.({ data: JSON.stringify(message) });
  }
  serverClose(code, reason = '') { this.onclose?.({ code, reason }); }
  sentOf(type) { return this.sent.filter((m) => m.type === type); }
}

function client(options = {}) {
  FakeSocket.all = [];
  const c = new WsgateClient({ url: 'ws://gateway/ws', token: 'x.e30.y', WebSocket: FakeSocket, pingInterval: 0, ...options });
  c.connect();
  return c;
}

async function greeted(c) {
  await until('a socket', () => FakeSocket.last);
  FakeSocket.last.greet();
  assert.equal(c.state, 'connected');
  return FakeSocket.last;
}

test('answers settle their own request, whatever their order', async (t) => {
  const c = client();
  t.after(() => c.close());
  const socket = await greeted(c);
  const first = c.request('echo', { n: 1 });
  const second = c.request('echo', { n: 2 });
  const [a, b] = socket.sent;
  socket.deliver({ type: 'echo', payload: b.payload, id: b.id }, { type: 'error', error: 'no', id: a.id });
  assert.deepEqual((await second).payload, { n: 2 });
  await assert.rejects(first, (e) => e.kind === 'refused' && e.message === 'no');
});

test('a message read with its join answer is the room\'s; a copy already seen is not told twice', async (t) => {
  const c = client();
  t.after(() => c.close());
  const socket = await greeted(c);
  const room = c.room('r');
  const messages = record(room, 'message');
  const publications = record(room, 'publication');
  const joined = room.join();
  const join = socket.sentOf('join_room')[0];
  const chat = (offset) => ({ type: 'chat_message', room: 'r', username: 'a', userId: 'a', message: `m${offset}`, timestamp: 1, offset });
  socket.deliver(
    { type: 'room_joined', room: 'r', members: 1, offset: 4, epoch: 'e', id: join.id },
    chat(5),
    chat(5),
    { type: 'publication', room: 'r', data: { x: 1 }, timestamp: 1, offset: 6 },
    chat(4),
  );
  assert.equal((await joined).offset, 4);
  assert.deepEqual(messages.map((m) => m.offset), [5]);
  assert.deepEqual(publications.map((p) => p.offset), [6]);
  assert.deepEqual(room.position, { offset: 6, epoch: 'e' });
  // Not joined any more: what still comes for the room is not told.
  const leaving = room.leave();
  socket.deliver({ type: 'ack', id: socket.sentOf('leave_room')[0].id }, chat(7));
  await leaving;
  assert.equal(messages.length, 1);
});

test('a join answered after a leave is left at once', async (t) => {
  const c = client();
  t.after(() => c.close());
  const socket = await greeted(c);
  const room = c.room('r');
  const joins = record(room, 'joined');
  const joining = room.join().catch((e) => e);
  const left = room.leave();
  socket.deliver({ type: 'room_joined', room: 'r', members: 1, offset: 0, epoch: 'e', id: socket.sentOf('join_room')[0].id });
  await left;
  assert.equal((await joining).kind, 'closed');
  assert.equal(room.joined, false);
  assert.equal(joins.length, 0);
  assert.equal(socket.sentOf('leave_room').length, 1, 'the gateway is told');
});

test('a token function that hangs fails the attempt, and the next one asks again', async (t) => {
  let calls = 0;
  const c = client({ token: () => { calls += 1; return new Promise(() => {}); }, connectTimeout: 50, backoff: { minDelay: 10 } });
  t.after(() => c.close());
  const failed = await next(c, 'disconnected', 2000);
  assert.deepEqual([failed.why, failed.greeted, failed.reconnect], ['failed', false, true]);
  await until('asked again', () => calls >= 2, 2000);
  assert.equal(FakeSocket.all.length, 0, 'no socket without a token');
});

test('a connection that goes silent is found lost by its ping, and replaced', async (t) => {
  const c = client({ pingInterval: 50, requestTimeout: 50, backoff: { minDelay: 10 } });
  t.after(() => c.close());
  const socket = await greeted(c);
  const lost = await next(c, 'disconnected', 2000);
  assert.deepEqual([lost.code, lost.reason, lost.why, lost.reconnect], [1006, 'no answer to a ping', 'lost', true]);
  assert.equal(socket.sentOf('echo').length, 1);
  assert.notEqual(socket.closed, null, 'the silent socket was closed');
  await until('a new socket', () => FakeSocket.all.length === 2, 2000);
});

test('an answered ping keeps the connection', async (t) => {
  const c = client({ pingInterval: 30, requestTimeout: 200 });
  t.after(() => c.close());
  const socket = await greeted(c);
  const lost = record(c, 'disconnected');
  for (let n = 0; n < 3; n += 1) {
    await until('a ping', () => socket.sentOf('echo').length > n, 2000);
    const ping = socket.sentOf('echo')[n];
    socket.deliver({ type: 'echo', payload: {}, id: ping.id });
  }
  assert.equal(lost.length, 0);
});

test('what was on its way when a close for a message too big came is not sent again', async (t) => {
  const c = client({ maxQueued: 10, backoff: { minDelay: 10 } });
  t.after(() => c.close());
  const socket = await greeted(c);
  const room = c.room('r');
  const sending = room.send('x'.repeat(100)).catch((e) => e);
  socket.serverClose(1009, 'message too big');
  assert.equal((await sending).kind, 'disconnected');
  await until('back', () => FakeSocket.all.length === 2, 2000);
  FakeSocket.last.greet();
  assert.equal(FakeSocket.last.sentOf('chat_message').length, 0);
});

test('a chat message on its way at a close is sent again, under its messageId, and queued ones paced', async (t) => {
  const c = client({ maxQueued: 50, backoff: { minDelay: 10 } });
  t.after(() => c.close());
  const socket = await greeted(c);
  const room = c.room('r');
  const inFlight = room.send('first');
  const { messageId } = socket.sentOf('chat_message')[0].payload;
  socket.serverClose(1006);
  const queued = Array.from({ length: 29 }, (_, n) => c.request('echo', { n }));
  await until('back', () => FakeSocket.all.length === 2, 2000);
  const again = FakeSocket.last;
  again.greet();
  // The one on its way first, then a burst of 20 in all; the rest paced.
  assert.equal(again.sent.length, 20);
  assert.deepEqual(again.sent[0].payload.messageId, messageId);
  again.deliver({ type: 'ack', id: again.sent[0].id, offset: 9 });
  assert.equal((await inFlight).offset, 9);
  await until('the rest, paced', () => again.sent.length === 30, 3000);
  for (const m of again.sent.slice(1)) again.deliver({ type: 'echo', payload: m.payload, id: m.id });
  assert.equal((await Promise.all(queued)).length, 29);
});

test('close() in the middle of connecting, then connect(): one connection, the late token ignored', async (t) => {
  let release;
  const late = new Promise((resolve) => { release = resolve; });
  let calls = 0;
  const c = client({ token: () => (++calls === 1 ? late : 'x.e30.y') });
  t.after(() => c.close());
  await sleep(5);
  c.close();
  c.connect();
  await until('a socket', () => FakeSocket.all.length === 1);
  FakeSocket.last.greet();
  release('x.e30.late');
  await sleep(20);
  assert.equal(FakeSocket.all.length, 1, 'the first attempt did not open a socket late');
  assert.equal(c.state, 'connected');
});
