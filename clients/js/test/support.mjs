// What the SDK's tests start: the real gateway binary (GATEWAY_BIN, or the workspace's debug
// build), redis-server, tokens signed as a backend would (HS256).
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { createServer } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export const BIN = process.env.GATEWAY_BIN
  ?? new URL('../../../target/debug/wsgate', import.meta.url).pathname;
export const SECRET = 'sdk-test-secret-0123456789';
export const API_KEY = 'sdk-test-api-key-0123456789';

const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

/** A free TCP port on loopback. */
export async function freePort() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A gateway on `port` (a free one by default), with WSGATE_* `env`; resolves once it listens. */
export async function startGateway({ env = {}, port } = {}) {
  port ??= await freePort();
  const child = spawn(BIN, ['--listen', `127.0.0.1:${port}`, '--shards', '1'], {
    env: {
      ...process.env,
      WSGATE_LOG: 'warn',
      WSGATE_JWT_SECRET: SECRET,
      WSGATE_API_KEY: API_KEY,
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  let logs = '';
  child.stderr.on('data', (chunk) => { logs += chunk; });
  child.on('exit', () => children.delete(child));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway did not start:\n${logs}`)), 15_000);
    child.stdout.on('data', (chunk) => {
      if (/listening on/.test(chunk.toString())) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.on('exit', (code) => reject(new Error(`gateway exited with ${code}:\n${logs}`)));
  });
  return {
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    http: `http://127.0.0.1:${port}`,
    /** SIGTERM (a graceful stop: clients get 1001) or SIGKILL (a crash); resolves once exited. */
    stop(signal = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill(signal);
      return exited;
    },
  };
}

/** A redis-server on a free port, without persistence. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  children.add(child);
  await new Promise((resolve, reject) => {
    child.stdout.on('data', (chunk) => {
      if (/Ready to accept connections/.test(chunk.toString())) resolve();
    });
    child.on('exit', (code) => reject(new Error(`redis-server exited with ${code}`)));
  });
  return { url: `redis://127.0.0.1:${port}`, stop: () => child.kill('SIGKILL') };
}

/** A token for `user`, expiring in `ttl` seconds, as a backend signs one (with `secret`). */
export function token(user, ttl = 3600, secret = SECRET) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const header = encode({ alg: 'HS256', typ: 'JWT' });
  const claims = encode({ sub: user, username: user, exp: Math.floor(Date.now() / 1000) + ttl });
  const signature = createHmac('sha256', secret).update(`${header}.${claims}`).digest('base64url');
  return `${header}.${claims}.${signature}`;
}

/** POST `body` to the server API's `path` on `gateway`. */
export async function api(gateway, path, body) {
  const response = await fetch(`${gateway.http}/api/${path}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

/** Resolves with the next `event` of `emitter` (rejects after `ms`). */
export function next(emitter, event, ms = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const off = emitter.on(event, (value) => {
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/** Resolves once `check()` is true (rejects after `ms`). */
export async function until(what, check, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`never: ${what}`);
    await sleep(20);
  }
}

/** Every `event` of `emitter`, as they come. */
export function record(emitter, event) {
  const seen = [];
  emitter.on(event, (value) => seen.push(value));
  return seen;
}
