import {
  type BackoffOptions,
  type CloseKind,
  DEFAULT_BACKOFF,
  classifyClose,
  reconnectDelay,
} from "./backoff.js";
import { Emitter } from "./emitter.js";
import { WsgateError } from "./errors.js";
import type { Connected, Publication, ServerMessage } from "./protocol.js";
import { Room } from "./room.js";
import { tokenExpiry } from "./token.js";

/** `connecting` covers the wait before a reconnect too. */
export type State = "disconnected" | "connecting" | "connected";

export interface ClientOptions {
  /** The gateway's WebSocket URL (`wss://chat.example.com/ws`), or several: one is used at a
   * time, the next when it fails or is shutting down. */
  url: string | string[];
  /** The connection's JWT, or a function that gets a fresh one from your backend: called before
   * a connection when there is no token or it is about to expire, after a close for an expired
   * or refused token (4001, 4401), after a connection refused at the upgrade, and to refresh the
   * token of a connection before it expires. Without a token the connection is anonymous (where the gateway
   * allows it). */
  token?: string | (() => string | Promise<string>);
  /** Refresh a connection's token this long before it expires (ms; at most half of what is left
   * of it). Default 30 s. Needs `token` to be a function. */
  refreshBefore?: number;
  backoff?: Partial<BackoffOptions>;
  /** Requests (chat messages, joins, …) kept while not connected, sent once connected again, in
   * order and paced below the gateway's rate limits; with a token, chat messages that were on
   * their way when the connection closed are sent again (their `messageId` makes that safe).
   * 0 (the default): refused at once, `not_connected`. */
  maxQueued?: number;
  /** How long a request may wait in the queue (ms): less than the gateway's dedup window, so that
   * a chat message sent again is still recognised. Default 60 s. */
  queueTimeout?: number;
  /** How long a request waits for its answer once sent (ms). Default 10 s. */
  requestTimeout?: number;
  /** How long a connection may take to be greeted, the token function included (ms). Default
   * 10 s. */
  connectTimeout?: number;
  /** After this long without a message from the gateway (ms), it is asked for one (an `echo`):
   * no answer within `requestTimeout` and the connection counts as lost. Browsers cannot see the
   * gateway's WebSocket pings. Default 25 s; 0: never. */
  pingInterval?: number;
  /** Whether to connect again after the application closed the connection with `code`
   * (4000–4999 other than 4001: a disconnect through the server API, a connect proxy's refusal).
   * Default: no. */
  reconnectAfter?: (code: number, reason: string) => boolean;
  /** The WebSocket class: by default the global one (browsers, Node ≥ 22). */
  WebSocket?: typeof WebSocket;
}

/** How a request is made. */
export interface RequestOptions {
  /** Sent again after a reconnect rather than failed, when there is a queue and a token (for
   * messages that are safe to send twice: chat messages with a `messageId`). */
  retry?: boolean;
  /** How long to wait for the answer once sent (ms); default `requestTimeout`. */
  timeout?: number;
  /** Sent ahead of what is queued (joins: what is queued for a room goes after its join). */
  ahead?: boolean;
  /** Called with the answer as it is read, before any later message is handled (a promise
   * settles only after the messages read with it). */
  onAnswer?: (answer: ServerMessage) => void;
}

export interface ClientEvents {
  state: { state: State; previous: State };
  /** Greeted by the gateway; `reconnected` after the first time since `connect()`. Rooms are
   * joined again next. */
  connected: Connected & { url: string; reconnected: boolean };
  /**
   * The connection closed, or an attempt failed. `why` is what the SDK made of the close code
   * (see {@link CloseKind}); `reconnect` whether it connects again, in `delay` ms. The gateway
   * tells the SDK why it refused an upgrade's token (4401) or `Origin` (4403) in a close frame
   * with the reason; a refusal for limits (or by a proxy in front) shows to browsers only as code
   * 1006 before any greeting (`greeted: false`).
   */
  disconnected: {
    code: number;
    reason: string;
    why: CloseKind | "closed";
    greeted: boolean;
    reconnect: boolean;
    delay?: number;
  };
  /** The connection's token was refreshed: it expires at `expiresAt` (seconds since the epoch). */
  token_refreshed: { expiresAt: number };
  /** A backend published to this user (on every connection of the user). */
  user: Publication;
  /** A backend broadcast to every client. */
  publication: Publication;
  /** Broadcasts missed while this client was too slow to read them. */
  dropped: { count: number };
  /** An error that answers no request of the SDK's: a refusal without an id, or the token
   * function failing. */
  error: WsgateError;
}

interface Pending {
  frame: { type: string; payload: object; id: number };
  options: RequestOptions;
  resolve: (answer: ServerMessage) => void;
  reject: (error: WsgateError) => void;
  /** The answer's deadline once sent, the queue's while queued. */
  timer?: ReturnType<typeof setTimeout>;
}

/** Messages that belong to a room's stream or presence. */
const ROOM_MESSAGES = new Set([
  "chat_message",
  "publication",
  "user_joined",
  "user_left",
  "typing",
  "resync",
  "room_left",
]);
/** Closes after which what was on its way is not sent again: it may be what caused them. */
const POISONED = new Set([1007, 1009]);
/** The queue is sent this many at once after a reconnect, then one per interval: below the
 * gateway's default message rate (20/s, burst 40), the rejoins counted. */
const FLUSH_BURST = 20;
const FLUSH_INTERVAL = 100;
/** `setTimeout` takes at most this (about 24.8 days). */
const MAX_TIMER = 2 ** 31 - 1;

/**
 * A connection to a wsgate gateway that stays connected: it reconnects by itself (exponential
 * backoff with full jitter, reading the close codes), fails over between URLs, joins its rooms
 * again with `since` so that missed messages are recovered, refreshes its token before it
 * expires, notices a dead connection, and matches answers to requests.
 */
export class WsgateClient extends Emitter<ClientEvents> {
  #urls: string[];
  #url = 0;
  #token: string | undefined;
  #getToken: (() => string | Promise<string>) | undefined;
  #refreshBefore: number;
  #backoff: BackoffOptions;
  #maxQueued: number;
  #queueTimeout: number;
  #requestTimeout: number;
  #connectTimeout: number;
  #pingInterval: number;
  #reconnectAfter: (code: number, reason: string) => boolean;
  #WebSocket: typeof WebSocket;

  #state: State = "disconnected";
  /** `connect()` was called, and not `close()` since. */
  #wanted = false;
  /** Numbers each attempt: what an older one finishes late is ignored. */
  #attemptId = 0;
  #socket: WebSocket | undefined;
  /** When the gateway was last heard from (ms since the epoch). */
  #lastHeard = 0;
  #greeted = false;
  #everGreeted = false;
  #clientId: string | undefined;
  /** Failed attempts in a row. */
  #attempt = 0;
  #reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  #connectTimer: ReturnType<typeof setTimeout> | undefined;
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  #pingTimer: ReturnType<typeof setTimeout> | undefined;
  #flushTimer: ReturnType<typeof setTimeout> | undefined;
  #nextId = 1;
  /** Sent, waiting for their answer. */
  #pending = new Map<number, Pending>();
  /** Waiting to be sent. */
  #queue: Pending[] = [];
  #rooms = new Map<string, Room>();

  constructor(options: ClientOptions) {
    super();
    this.#urls = Array.isArray(options.url) ? [...options.url] : [options.url];
    if (this.#urls.length === 0) throw new TypeError("url: at least one gateway URL");
    if (typeof options.token === "function") this.#getToken = options.token;
    else this.#token = options.token;
    this.#refreshBefore = options.refreshBefore ?? 30_000;
    this.#backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    this.#maxQueued = options.maxQueued ?? 0;
    this.#queueTimeout = options.queueTimeout ?? 60_000;
    this.#requestTimeout = options.requestTimeout ?? 10_000;
    this.#connectTimeout = options.connectTimeout ?? 10_000;
    this.#pingInterval = options.pingInterval ?? 25_000;
    this.#reconnectAfter = options.reconnectAfter ?? (() => false);
    const WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
    if (!WebSocketClass) {
      throw new TypeError("no WebSocket class: use Node >= 22 or a browser, or pass options.WebSocket");
    }
    this.#WebSocket = WebSocketClass;
  }

  get state(): State {
    return this.#state;
  }

  /** This connection's id (from the gateway's greeting), while connected. */
  get clientId(): string | undefined {
    return this.#greeted ? this.#clientId : undefined;
  }

  /** The URL in use, or tried next. */
  get url(): string {
    return this.#urls[this.#url]!;
  }

  /** Connects, and stays connected until `close()`. While waiting to reconnect: tries at once
   * (e.g. when the browser says it is back `online`). */
  connect(): void {
    if (this.#wanted && this.#reconnectTimer === undefined) return;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = undefined;
    if (!this.#wanted) {
      this.#wanted = true;
      this.#everGreeted = false;
      this.#attempt = 0;
    }
    void this.#open();
  }

  /** Closes the connection for good (until `connect()`, which joins the rooms again): requests
   * waiting and queued fail with `closed`. */
  close(): void {
    const wasActive = this.#wanted || this.#socket !== undefined;
    this.#wanted = false;
    this.#attemptId += 1;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = undefined;
    const socket = this.#socket;
    const greeted = this.#greeted;
    this.#detach();
    socket?.close(1000);
    const closed = new WsgateError("closed", "the client was closed");
    this.#failPending(() => closed, false);
    this.#failQueue(closed);
    for (const room of this.#rooms.values()) room._closed();
    if (wasActive) {
      this.emit("disconnected", { code: 1000, reason: "", why: "closed", greeted, reconnect: false });
    }
    this.#setState("disconnected");
  }

  /** The room named `name` (the same object each time): join it, listen to it. */
  room(name: string): Room {
    let room = this.#rooms.get(name);
    if (!room) {
      room = new Room(name, {
        request: (type, payload, options) => this.request(type, payload, options),
        notify: (type, payload) => this.#notify(type, payload),
        isConnected: () => this.#greeted,
      });
      this.#rooms.set(name, room);
    }
    return room;
  }

  /**
   * Sends `{type, payload, id}` and resolves with the gateway's answer (the message carrying the
   * id: `room_joined`, `presence`, `ack`, …); rejects with a {@link WsgateError} — `refused` when
   * the gateway answered with an error.
   */
  request(type: string, payload: object = {}, options: RequestOptions = {}): Promise<ServerMessage> {
    return new Promise((resolve, reject) => {
      const pending: Pending = { frame: { type, payload, id: this.#nextId++ }, options, resolve, reject };
      // Behind what is queued, to keep the order.
      if (this.#greeted && (this.#queue.length === 0 || options.ahead)) this.#send(pending);
      else if (this.#wanted && this.#queue.length < this.#maxQueued) this.#enqueue(pending);
      else {
        const why = this.#maxQueued > 0 && this.#wanted ? "not connected, and the queue is full" : "not connected";
        reject(new WsgateError("not_connected", why));
      }
    });
  }

  /** Sends a message that gets no answer; false when not connected (not queued). */
  #notify(type: string, payload: object): boolean {
    if (!this.#greeted || !this.#socket) return false;
    this.#socket.send(JSON.stringify({ type, payload }));
    return true;
  }

  #send(pending: Pending): void {
    this.#pending.set(pending.frame.id, pending);
    clearTimeout(pending.timer);
    const timeout = pending.options.timeout ?? this.#requestTimeout;
    pending.timer = setTimeout(() => {
      this.#pending.delete(pending.frame.id);
      pending.reject(new WsgateError("timeout", `no answer to ${pending.frame.type} within ${timeout} ms`));
    }, Math.min(timeout, MAX_TIMER));
    this.#socket!.send(JSON.stringify(pending.frame));
  }

  #enqueue(pending: Pending, first = false): void {
    clearTimeout(pending.timer);
    pending.timer = setTimeout(() => {
      const at = this.#queue.indexOf(pending);
      if (at >= 0) this.#queue.splice(at, 1);
      pending.reject(new WsgateError("timeout", `not sent within ${this.#queueTimeout} ms: not connected`));
    }, this.#queueTimeout);
    if (first) this.#queue.unshift(pending);
    else this.#queue.push(pending);
  }

  /** Sends what is queued: `burst` at once, then one per interval. */
  #flush(burst = FLUSH_BURST): void {
    this.#flushTimer = undefined;
    while (this.#greeted && this.#queue.length > 0 && burst-- > 0) this.#send(this.#queue.shift()!);
    if (this.#greeted && this.#queue.length > 0) {
      this.#flushTimer = setTimeout(() => this.#flush(1), FLUSH_INTERVAL);
    }
  }

  async #open(): Promise<void> {
    const attempt = ++this.#attemptId;
    this.#reconnectTimer = undefined;
    this.#setState("connecting");
    // Greeted within connectTimeout, the token function included, or the attempt has failed.
    this.#connectTimer = setTimeout(() => {
      if (attempt !== this.#attemptId) return;
      const socket = this.#socket;
      this.#detach();
      socket?.close();
      this.#lost(1006, "not greeted in time", false);
    }, this.#connectTimeout);
    let token: string | undefined;
    try {
      token = await this.#currentToken();
    } catch (cause) {
      if (attempt !== this.#attemptId) return;
      clearTimeout(this.#connectTimer);
      this.emit("error", new WsgateError("token", `the token function failed: ${String(cause)}`));
      // The same gateway again: it is the token that failed.
      this.#retry("failed", 1006, "", false, this.#wanted, false);
      return;
    }
    if (attempt !== this.#attemptId) return;
    const url = this.url;
    // Browsers cannot set headers: the token goes as a subprotocol entry, next to `wsgate`, which
    // the gateway answers with (it never echoes the token).
    const protocols = token ? ["wsgate", `bearer.${token}`] : ["wsgate"];
    let socket: WebSocket;
    try {
      socket = new this.#WebSocket(url, protocols);
    } catch (cause) {
      clearTimeout(this.#connectTimer);
      this.emit("error", new WsgateError("not_connected", `cannot connect to ${url}: ${String(cause)}`));
      this.#retry("failed", 1006, "", false);
      return;
    }
    this.#socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
    };
    socket.onmessage = (event: MessageEvent) => {
      if (this.#socket === socket && typeof event.data === "string") this.#receive(event.data, url);
    };
    socket.onclose = (event: CloseEvent) => {
      if (this.#socket === socket) this.#lost(event.code, event.reason, this.#greeted);
    };
    // A connection that fails before it opens fires `error`, and in some runtimes (Node 22's)
    // no `close` after it: the failure is handled here, once.
    socket.onerror = () => {
      if (this.#socket === socket && !opened) this.#lost(1006, "", false);
    };
  }

  /** The token to connect with: a fresh one from the token function when there is none or it
   * expires within `refreshBefore`. */
  async #currentToken(): Promise<string | undefined> {
    if (!this.#getToken) return this.#token;
    const expiry = this.#token === undefined ? undefined : tokenExpiry(this.#token);
    const stale = this.#token === undefined || (expiry !== undefined && expiry * 1000 - Date.now() < this.#refreshBefore);
    if (stale) this.#token = await this.#getToken();
    return this.#token;
  }

  #receive(text: string, url: string): void {
    this.#lastHeard = Date.now();
    let message: ServerMessage;
    try {
      message = JSON.parse(text) as ServerMessage;
    } catch {
      return;
    }
    if (typeof message.id === "number" && this.#answer(message.id, message)) return;
    if (ROOM_MESSAGES.has(message.type) && typeof message["room"] === "string") {
      this.#rooms.get(message["room"])?._receive(message);
      return;
    }
    switch (message.type) {
      case "connected":
        this.#onGreeted(message as unknown as Connected, url);
        break;
      case "ping":
        // The gateway's JSON heartbeat (heartbeat_mode = "json").
        this.#notify("pong", {});
        break;
      case "user":
      case "publication":
        this.emit(message.type, message as unknown as Publication);
        break;
      case "dropped":
        this.emit("dropped", { count: Number(message["count"]) });
        break;
      case "error":
        this.emit("error", refusal(message));
        break;
    }
  }

  /** Settles the request `id`; false when it is not one of the SDK's (any more). */
  #answer(id: number, message: ServerMessage): boolean {
    const pending = this.#pending.get(id);
    if (!pending) return false;
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    if (message.type === "error") {
      pending.reject(refusal(message));
    } else {
      pending.options.onAnswer?.(message);
      pending.resolve(message);
    }
    return true;
  }

  #onGreeted(greeting: Connected, url: string): void {
    clearTimeout(this.#connectTimer);
    this.#greeted = true;
    this.#attempt = 0;
    this.#clientId = greeting.clientId;
    const reconnected = this.#everGreeted;
    this.#everGreeted = true;
    const attempt = this.#attemptId;
    this.#setState("connected");
    this.emit("connected", { ...greeting, url, reconnected });
    // A listener may have closed the client.
    if (attempt !== this.#attemptId || !this.#greeted) return;
    // Rooms first, then what was queued: the gateway reads in order, so a queued chat message
    // reaches its room after the join.
    for (const room of this.#rooms.values()) room._connected();
    this.#flush();
    this.#scheduleRefresh(this.#token === undefined ? undefined : tokenExpiry(this.#token));
    this.#armPing();
  }

  /** Asks the gateway for a message once it has been silent for `pingInterval`. */
  #armPing(): void {
    clearTimeout(this.#pingTimer);
    if (!this.#greeted || this.#pingInterval <= 0) return;
    const wait = this.#pingInterval - (Date.now() - this.#lastHeard);
    this.#pingTimer = setTimeout(() => this.#ping(), Math.max(wait, 0));
  }

  #ping(): void {
    if (Date.now() - this.#lastHeard < this.#pingInterval) {
      this.#armPing();
      return;
    }
    const socket = this.#socket;
    this.request("echo", {}).then(
      () => this.#armPing(),
      (error: unknown) => {
        if (error instanceof WsgateError && error.kind === "timeout" && socket && this.#socket === socket) {
          // Silent past a ping and its answer's time: the connection is gone, whatever the
          // socket says.
          this.#detach();
          socket.close();
          this.#lost(1006, "no answer to a ping", true);
        }
      },
    );
  }

  #scheduleRefresh(expiresAt: number | undefined): void {
    clearTimeout(this.#refreshTimer);
    if (!this.#getToken || expiresAt === undefined) return;
    const left = expiresAt * 1000 - Date.now();
    const delay = Math.max(0, left - Math.min(this.#refreshBefore, left / 2));
    this.#refreshTimer = setTimeout(() => {
      // A far expiry is looked at again when the longest timer ends.
      if (delay > MAX_TIMER) this.#scheduleRefresh(expiresAt);
      else void this.#refresh();
    }, Math.min(delay, MAX_TIMER));
  }

  async #refresh(): Promise<void> {
    if (!this.#greeted || !this.#getToken) return;
    const attempt = this.#attemptId;
    try {
      const token = await this.#getToken();
      const answer = await this.request("refresh", { token });
      if (attempt !== this.#attemptId) return;
      this.#token = token;
      const expiresAt = Number(answer["expiresAt"]);
      this.emit("token_refreshed", { expiresAt });
      this.#scheduleRefresh(expiresAt);
    } catch (cause) {
      if (attempt !== this.#attemptId || !this.#greeted) return;
      const error = cause instanceof WsgateError ? cause : new WsgateError("token", `the token function failed: ${String(cause)}`);
      this.emit("error", error);
      // Tried again in a while: the connection is closed with 4001 if the token expires first,
      // and a new token is asked for then.
      clearTimeout(this.#refreshTimer);
      this.#refreshTimer = setTimeout(() => void this.#refresh(), 5_000);
    }
  }

  /** Lets go of the socket and its timers (its events are ignored from now on). */
  #detach(): void {
    this.#socket = undefined;
    this.#greeted = false;
    for (const timer of [this.#connectTimer, this.#refreshTimer, this.#pingTimer, this.#flushTimer]) clearTimeout(timer);
    this.#flushTimer = undefined;
  }

  /** The connection closed (or an attempt failed) with `code`. */
  #lost(code: number, reason: string, greeted: boolean): void {
    this.#attemptId += 1;
    this.#detach();
    for (const room of this.#rooms.values()) room._disconnected();
    const kind = classifyClose(code, reason, greeted);
    // Sent again: retriable requests (chat messages: their messageId makes it safe) with a queue
    // and a token (an anonymous connection's ids are its own), unless the close may be theirs.
    const identified = this.#token !== undefined || this.#getToken !== undefined;
    const requeue = this.#maxQueued > 0 && identified && !POISONED.has(code);
    // An expired or refused token, or a refusal at the upgrade (perhaps of the token): a new one
    // next time.
    if (kind === "token_expired" || kind === "unauthorized" || (kind === "failed" && this.#getToken)) {
      this.#token = undefined;
    }
    this.#failPending(
      (pending) => new WsgateError("disconnected", `the connection closed before the answer to ${pending.frame.type} (it may or may not have been done)`),
      requeue,
    );
    let reconnect = this.#wanted;
    if (kind === "kicked") reconnect &&= this.#reconnectAfter(code, reason);
    if (kind === "token_expired" || kind === "unauthorized") reconnect &&= this.#getToken !== undefined;
    this.#retry(kind, code, reason, greeted, reconnect);
  }

  /** Fails what waits for an answer, or (`requeue`) puts the retriable among it back at the
   * head of the queue, in the order they were sent. */
  #failPending(error: (pending: Pending) => WsgateError, requeue: boolean): void {
    const again: Pending[] = [];
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      if (requeue && pending.options.retry) again.push(pending);
      else pending.reject(error(pending));
    }
    this.#pending.clear();
    for (const pending of again.reverse()) this.#enqueue(pending, true);
  }

  #failQueue(error: WsgateError): void {
    for (const queued of this.#queue.splice(0)) {
      clearTimeout(queued.timer);
      queued.reject(error);
    }
  }

  /** After a connection ended (or an attempt failed): connects again after a delay that suits
   * `kind`, or stays disconnected. */
  #retry(kind: CloseKind, code: number, reason: string, greeted: boolean, reconnect = this.#wanted, nextUrl = true): void {
    if (!reconnect) {
      this.#wanted = false;
      // What was queued or sent again may have been published before the close: not `closed`.
      this.#failQueue(new WsgateError("disconnected", `disconnected for good (${code}${reason ? ` ${reason}` : ""})`));
      for (const room of this.#rooms.values()) room._closed();
      this.emit("disconnected", { code, reason, why: kind, greeted, reconnect: false });
      this.#setState("disconnected");
      return;
    }
    // Another gateway first when this one failed or is going away.
    if (nextUrl && (kind === "failed" || kind === "restarting")) this.#url = (this.#url + 1) % this.#urls.length;
    const delay = reconnectDelay(kind, this.#attempt, this.#backoff);
    this.#attempt += 1;
    this.emit("disconnected", { code, reason, why: kind, greeted, reconnect: true, delay });
    if (!this.#wanted) return; // closed by a listener
    this.#setState("connecting");
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = setTimeout(() => void this.#open(), delay);
  }

  #setState(state: State): void {
    const previous = this.#state;
    if (previous === state) return;
    this.#state = state;
    this.emit("state", { state, previous });
  }
}

/** A refusal from the gateway, as an error. */
function refusal(message: ServerMessage): WsgateError {
  const code = typeof message["code"] === "number" ? message["code"] : undefined;
  return new WsgateError("refused", String(message["error"]), code);
}
