// The test client page, driven in headless Chromium like a person would: two tabs connect, join a
// room, see each other typing, chat, and see an error reply rendered; over http and https.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chromium } from 'playwright-core';

const BIN = process.env.GATEWAY_BIN ?? new URL('../../target/release/wsgate', import.meta.url).pathname;
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

let browser;
const gateways = [];

// A gateway started with `env` (on `port`, or a free one); resolves once it listens to its base
// `url`, its `port`, and `stop()` (SIGTERM, resolved at its exit).
async function startGateway(env, port = 0) {
  const gateway = spawn(BIN, ['--listen', `127.0.0.1:${port}`, '--shards', '2'], {
    env: { ...process.env, WSGATE_LOG: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  gateways.push(gateway);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('gateway did not start')), 10_000);
    gateway.stdout.on('data', (chunk) => {
      const match = /listening on (https?:\/\/\S+)/.exec(chunk.toString());
      if (match) {
        clearTimeout(timer);
        resolve({
          url: match[1],
          port: Number(new URL(match[1]).port),
          stop: () => new Promise((done) => { gateway.once('exit', done); gateway.kill('SIGTERM'); }),
        });
      }
    });
    gateway.on('exit', (code) => reject(new Error(`gateway exited with ${code}`)));
  });
}

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    // BROWSER_HOME holds the NSS database that trusts the run's CA (scripts/browser-test.sh).
    env: { ...process.env, HOME: process.env.BROWSER_HOME ?? process.env.HOME },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  for (const gateway of gateways) gateway.kill();
});

async function openAndJoin(baseUrl, name) {
  const page = await browser.newPage();
  page.on('pageerror', (err) => assert.fail(`${name}: page error ${err}`));
  await page.goto(baseUrl);
  assert.equal(await page.title(), 'wsgate test client');
  // Dev mode (no key configured): the page gets a token for this name from /dev/token.
  await page.fill('#user', name);
  await page.click('#connect');
  await page.locator('#status', { hasText: /^connected$/ }).waitFor();
  await page.locator('#clientId', { hasText: /^id \w+\.\w+\.\w+\.\w+$/ }).waitFor();
  await page.click('#joinForm button');
  await page.locator('.room.active', { hasText: '#general' }).waitFor();
  return page;
}

// The same suite over plain http and over https (wss: from the page), each on its own gateway.
const schemes = {
  http: {},
  https: {
    WSGATE_TLS_CERT_FILE: process.env.TLS_CERT_FILE,
    WSGATE_TLS_KEY_FILE: process.env.TLS_KEY_FILE,
  },
};
for (const [scheme, env] of Object.entries(schemes)) {
  describe(scheme, () => {
    let baseUrl;
    before(async () => {
      if (scheme === 'https') {
        assert.ok(env.WSGATE_TLS_CERT_FILE, 'run through scripts/browser-test.sh (it makes the CA)');
      }
      baseUrl = (await startGateway(env)).url;
      assert.ok(baseUrl.startsWith(`${scheme}://`), baseUrl);
    });

  test(`two tabs chat through the test page (${scheme})`, async () => {
    const alice = await openAndJoin(baseUrl, 'alice');
    const bob = await openAndJoin(baseUrl, 'bob');
    // Alice saw Bob join; the member count is in Bob's room list.
    await alice.locator('#log', { hasText: 'bob joined #general' }).waitFor();
    assert.equal(await bob.locator('.room.active small').textContent(), '2');
    assert.equal(await alice.locator('.room.active small').textContent(), '2');

    await alice.fill('#message', 'hello from alice');
    await bob.locator('#typing', { hasText: 'typing' }).waitFor();
    await alice.click('#sendForm button:has-text("Send")');
    await bob.locator('#log', { hasText: '#general alice: hello from alice' }).waitFor();
    await alice.locator('#log', { hasText: '#general alice: hello from alice' }).waitFor();
    await bob.locator('#typing', { hasText: /^$/ }).waitFor();

    // An error reply is shown, and the connection stays usable.
    await bob.fill('#roomName', 'not a valid room');
    await bob.click('#joinForm button');
    await bob.locator('#log .err', { hasText: 'error: Invalid room name' }).waitFor();
    await bob.fill('#message', 'still here');
    await bob.click('#sendForm button:has-text("Send")');
    await alice.locator('#log', { hasText: 'bob: still here' }).waitFor();

    // Leaving tells the other tab.
    await bob.click('#leave');
    await alice.locator('#log', { hasText: 'bob left #general' }).waitFor();
    assert.equal(await alice.locator('.room.active small').textContent(), '1');
    await alice.screenshot({ path: new URL(`../../target/test-page-${scheme}.png`, import.meta.url).pathname });
  });

  test(`a tab that reconnects gets what it missed (${scheme})`, async () => {
    const carol = await openAndJoin(baseUrl, 'carol');
    const dave = await openAndJoin(baseUrl, 'dave');
    await carol.fill('#message', 'before the break');
    await carol.click('#sendForm button:has-text("Send")');
    await dave.locator('#log', { hasText: 'carol: before the break' }).waitFor();

    await dave.click('#connect'); // disconnect
    await dave.locator('#status', { hasText: 'disconnected' }).waitFor();
    await carol.locator('#log', { hasText: 'dave left #general' }).waitFor();
    await carol.fill('#message', 'while you were away');
    await carol.click('#sendForm button:has-text("Send")');
    await carol.locator('#log', { hasText: 'carol: while you were away' }).waitFor();

    await dave.click('#connect'); // back: the page rejoins with `since`
    await dave.locator('#log', { hasText: 'back in #general: 1 missed message follows' }).waitFor();
    await dave.locator('#log', { hasText: 'carol: while you were away' }).waitFor();
    // Once: the message from before the break is not replayed.
    assert.equal(await dave.locator('#log div', { hasText: 'carol: before the break' }).count(), 1);
  });
  });
}

describe('the page on the SDK', () => {
  const shots = (name) => new URL(`../../target/test-page-${name}.png`, import.meta.url).pathname;

  test('on a phone, by keyboard alone: connect, join, chat; own messages stand out', async () => {
    const { url } = await startGateway({});
    const page = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
    page.on('pageerror', (err) => assert.fail(`page error ${err}`));
    await page.goto(url);
    await page.focus('#user');
    await page.keyboard.press('Control+A');
    await page.keyboard.type('erin');
    await page.keyboard.press('Enter'); // submits the connect form
    await page.locator('#status', { hasText: /^connected$/ }).waitFor();
    await page.focus('#roomName');
    await page.keyboard.press('Enter'); // joins "general"
    await page.locator('.room.active', { hasText: '#general' }).waitFor();
    await page.focus('#message');
    await page.keyboard.type('hello from a phone');
    await page.keyboard.press('Enter');
    await page.locator('#log .me', { hasText: 'hello from a phone' }).waitFor();
    // Another user's message is not highlighted.
    const other = await openAndJoin(url, 'frank');
    await other.fill('#message', 'hi erin');
    await other.click('#sendForm button:has-text("Send")');
    await page.locator('#log div', { hasText: 'frank: hi erin' }).waitFor();
    assert.equal(await page.locator('#log div.me', { hasText: 'frank' }).count(), 0);
    // The rooms are a row above the messages, which get most of the height; nothing is wider
    // than the screen.
    const nav = await page.locator('nav').boundingBox();
    const log = await page.locator('#log').boundingBox();
    assert.ok(nav.y + nav.height <= log.y + 1, JSON.stringify({ nav, log }));
    assert.ok(log.height > 844 / 2, `messages get ${log.height} px`);
    assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= 390));
    await page.screenshot({ path: shots('phone') });
  });

  test('a page whose gateway restarts comes back by itself and keeps its rooms', async () => {
    let gateway = await startGateway({});
    const page = await openAndJoin(gateway.url, 'gina');
    await page.fill('#message', 'before the restart');
    await page.click('#sendForm button:has-text("Send")');
    await page.locator('#log', { hasText: 'gina: before the restart' }).waitFor();
    await gateway.stop();
    await page.locator('#log .note', { hasText: 'the server is restarting' }).waitFor();
    gateway = await startGateway({}, gateway.port);
    // Rejoined without a click; the room started over with the node: said calmly, not in red.
    await page.locator('#log .note', { hasText: 'back in #general: messages from before may be missing' }).waitFor();
    await page.locator('#status', { hasText: /^connected$/ }).waitFor();
    assert.equal(await page.locator('.room.active', { hasText: '#general' }).count(), 1);
    await page.fill('#message', 'after the restart');
    await page.click('#sendForm button:has-text("Send")');
    await page.locator('#log', { hasText: 'gina: after the restart' }).waitFor();
    await page.setViewportSize({ width: 1280, height: 800 });
    await page.screenshot({ path: shots('desktop') });
  });

  test('a connection refused at the upgrade is explained in words, not shown as a bare 1006', async () => {
    const { url } = await startGateway({ WSGATE_JWT_SECRET: 'browser-test-secret-0123456789' });
    const page = await browser.newPage();
    await page.goto(url);
    // No token, no dev mode: the page says what is needed and does not retry.
    await page.click('#connect');
    await page.locator('#log .err', { hasText: 'this gateway needs a token' }).waitFor();
    await page.locator('#status', { hasText: /^disconnected$/ }).waitFor();
    // A token the gateway refuses: its reason, read from the close frame (4401).
    await page.fill('#token', 'not.a.token');
    await page.click('#connect');
    await page.locator('#log .err', { hasText: 'the gateway refused the token (malformed_token: malformed token)' }).waitFor();
    assert.equal(await page.locator('#log', { hasText: '1006' }).count(), 0);
    await page.click('#connect'); // stop retrying
    await page.locator('#status', { hasText: /^disconnected$/ }).waitFor();

    // A page whose origin the gateway does not allow: said so (4403), not retried.
    const strict = await startGateway({ WSGATE_ALLOWED_ORIGINS: '["https://app.example"]' });
    const foreign = await browser.newPage();
    await foreign.goto(strict.url);
    await foreign.click('#connect');
    await foreign.locator('#log .err', { hasText: 'the gateway does not accept pages from this origin' }).waitFor();
    await foreign.locator('#status', { hasText: /^disconnected$/ }).waitFor();
  });
});

describe('compression', () => {
  test('Chromium agrees to permessage-deflate with the page and chats compressed both ways', async () => {
    const { url } = await startGateway({ WSGATE_COMPRESSION: 'on' });
    const alice = await openAndJoin(url, 'alice');
    const bob = await openAndJoin(url, 'bob');
    // Long enough for both sides to compress it (the gateway compresses 256 bytes and more).
    const text = `compressed both ways: ${'lorem ipsum dolor sit amet '.repeat(8)}end`;
    await alice.fill('#message', text);
    await alice.click('#sendForm button:has-text("Send")');
    await bob.locator('#log', { hasText: `alice: ${text}` }).waitFor();
    await alice.locator('#log', { hasText: `alice: ${text}` }).waitFor();
    const metrics = await (await fetch(new URL('/metrics', url))).text();
    const total = (name) => metrics.split('\n')
      .filter((line) => line.startsWith(`${name}{`))
      .reduce((sum, line) => sum + Number(line.split(' ').pop()), 0);
    assert.equal(total('wsgate_compressed_connections_total'), 2, metrics);
    assert.ok(total('wsgate_compressed_messages_received_total') >= 1, 'Chromium compressed its message');
    assert.ok(total('wsgate_compressed_publications_total') >= 1, 'the chat message went out compressed');
  });
});

describe('the admin UI', () => {
  test('nodes, rooms and presence; publish to a room and disconnect a user, with the key asked once', async () => {
    const key = 'admin-test-key-0123456789';
    const { url } = await startGateway({ WSGATE_API_KEY: key });
    const user = await openAndJoin(url, 'henry');
    const admin = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    admin.on('pageerror', (err) => assert.fail(`admin: page error ${err}`));
    await admin.goto(`${url}admin`);
    assert.equal(await admin.title(), 'wsgate admin');
    await admin.fill('#key', 'not-the-key');
    await admin.press('#key', 'Enter');
    await admin.locator('#loginOut', { hasText: 'the key was refused' }).waitFor();
    await admin.fill('#key', key);
    await admin.press('#key', 'Enter');
    await admin.locator('#nodes tbody tr').first().waitFor();
    // The key is kept for the tab: a reload does not ask again.
    await admin.reload();
    await admin.locator('#nodes tbody tr').first().waitFor();
    assert.equal(await admin.locator('#login').isHidden(), true);
    assert.equal(await admin.locator('#nodes tbody tr').count(), 1);
    assert.equal(await admin.locator('#nodes tbody tr td').nth(1).textContent(), '1');
    // Rates show once two statuses were read.
    await admin.locator('#nodes tbody tr td').nth(3).filter({ hasText: /^\d+\.\d$/ }).waitFor();
    const room = admin.locator('#rooms tbody tr', { hasText: 'general' });
    await room.waitFor();
    await room.click();
    await admin.locator('#presence tbody tr', { hasText: 'henry' }).waitFor();

    await admin.fill('#pubRoom', 'general');
    await admin.fill('#pubText', 'maintenance at 5');
    await admin.click('#publishForm button');
    await admin.locator('#publishOut', { hasText: /published to #general at offset \d+/ }).waitFor();
    await user.locator('#log', { hasText: '#general Admin: maintenance at 5' }).waitFor();
    await admin.screenshot({ path: new URL('../../target/admin.png', import.meta.url).pathname });

    await admin.fill('#discUser', 'henry');
    await admin.fill('#discReason', 'bye');
    await admin.click('#disconnectForm button');
    await admin.locator('#disconnectOut', { hasText: '1 connection of henry closed on 1 node' }).waitFor();
    await user.locator('#log .err', { hasText: 'disconnected by the server (4000: bye)' }).waitFor();
    await admin.click('#signout');
    await admin.locator('#login').waitFor();
  });
});
