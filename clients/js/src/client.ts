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
   * time, the next when it fails. */
  url: string | string[];
  /** The connection's JWT, or a function that gets a fresh one from your backend: called before
   * a connection when there is no token or it is about to expire, after a close for an expired
   * token (4001), and to refresh the token of a connection before it expires. */
  token?: string | (() => string | Promise<string>);
  /** Refresh a connection's token this long before it expires (ms; at most half of what is left
   * of it). Default 30 s. Needs `token` to be a function. */
  refreshBefore?: number;
  backoff?: Partial<BackoffOptions>;
  /** Requests (chat messages, joins, …) kept while not connected, sent once connected again, in
   * order; chat messages that were on their way when the connection closed are sent again (their
   * `messageId` makes that safe). 0 (the default): refused at once, `not_connected`. */
  maxQueued?: number;
  /** How long a request waits for its answer once sent (ms). Default 10 s. */
  requestTimeout?: number;
  /** Whether to connect again after the application closed the connection with `code`
   * (4000–4999 other than 4001: a disconnect through the server API, a connect proxy's refusal).
   * Default: no. */
  reconnectAfter?: (code: number, reason: string) => boolean;
  /** The WebSocket class: by default the global one (browsers, Node ≥ 22). */
  WebSocket?: typeof WebSocket;
}

export interface ClientEvents {
  state: { state: State; previous: State };
  /** Greeted by the gateway; `reconnected` after the first time. Rooms are joined again next. */
  connected: Connected & { url: string; reconnected: boolean };
  /**
   * The connection closed, or an attempt failed. `why` is what the SDK made of the close code
   * (see {@link CloseKind}); `reconnect` whether it connects again, in `delay` ms. A connection
   * refused at the upgrade (a bad token, a foreign `Origin`, limits) shows to browsers only as
   * code 1006 with `opened: false`: the gateway's reason is in its answer, which browsers hide.
   */
  disconnected: {
    code: number;
    reason: string;
    why: CloseKind | "closed";
    opened: boolean;
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
  /** An error that answers no request of the SDK's: a refusal without an id (the rate limits
   * refuse before reading a message), or the token function failing. */
  error: WsgateError;
}

/** How a request is made. */
export interface RequestOptions {
  /** Sent again after a reconnect rather than failed, when there is a queue (for messages that
   * are safe to send twice: chat messages with a `messageId`). */
  retry?: boolean;
  /** Called with the answer as it is read, before any later message is handled (a promise
   * settles only after the messages read with it). */
  onAnswer?: (answer: ServerMessage) => void;
}

interface Pending {
  frame: { type: string; payload: object; id: number };
  onAnswer: ((answer: ServerMessage) => void) | undefined;
  resolve: (answer: ServerMessage) => void;
  reject: (error: WsgateError) => void;
  /** Sent again after a reconnect rather than failed (chat messages, which carry a
   * `messageId`), when there is a queue. */
  retry: boolean;
  timer?: ReturnType<typeof setTimeout>;
}

const ROOM_MESSAGES = new Set(["chat_message", "user_joined", "user_left", "typing", "resync", "room_left"]);

/**
 * A connection to a wsgate gateway that stays connected: it reconnects by itself (exponential
 * backoff with full jitter, reading the close codes), fails over between URLs, joins its rooms
 * again with `since` so that missed messages are recovered, refreshes its token before it
 * expires, and matches answers to requests.
 */
export class WsgateClient extends Emitter<ClientEvents> {
  #urls: string[];
  #url = 0;
  #token: string | undefined;
  #getToken: (() => string | Promise<string>) | undefined;
  #refreshBefore: number;
  #backoff: BackoffOptions;
  #maxQueued: number;
  #requestTimeout: number;
  #reconnectAfter: (code: number, reason: string) => boolean;
  #WebSocket: typeof WebSocket;

  #state: State = "disconnected";
  /** `connect()` was called, and not `close()` since. */
  #wanted = false;
  #socket: WebSocket | undefined;
  #greeted = false;
  #everGreeted = false;
  #clientId: string | undefined;
  /** Failed attempts in a row. */
  #attempt = 0;
  #reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  #nextId = 1;
  /** Sent, waiting for their answer. */
  #pending = new Map<number, Pending>();
  /** Waiting for a connection. */
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
    this.#requestTimeout = options.requestTimeout ?? 10_000;
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

  /** Connects, and stays connected until `close()`. */
  connect(): void {
    if (this.#wanted) return;
    this.#wanted = true;
    void this.#open();
  }

  /** Closes the connection for good (until `connect()`): requests waiting and queued fail with
   * `closed`. */
  close(): void {
    this.#wanted = false;
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#refreshTimer);
    this.#reconnectTimer = undefined;
    const socket = this.#socket;
    this.#socket = undefined;
    socket?.close(1000);
    const closed = new WsgateError("closed", "the client was closed");
    this.#failPending(() => closed, false);
    for (const queued of this.#queue.splice(0)) queued.reject(closed);
    for (const room of this.#rooms.values()) room._closed();
    if (this.#greeted || socket) {
      this.emit("disconnected", { code: 1000, reason: "", why: "closed", opened: this.#greeted, reconnect: false });
    }
    this.#greeted = false;
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
      const pending: Pending = {
        frame: { type, payload, id: this.#nextId++ },
        onAnswer: options.onAnswer,
        resolve,
        reject,
        retry: options.retry ?? false,
      };
      if (this.#greeted) this.#send(pending);
      else if (this.#wanted && this.#queue.length < this.#maxQueued) this.#queue.push(pending);
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
    pending.timer = setTimeout(() => {
      this.#pending.delete(pending.frame.id);
      pending.reject(new WsgateError("timeout", `no answer to ${pending.frame.type} within ${this.#requestTimeout} ms`));
    }, this.#requestTimeout);
    this.#socket!.send(JSON.stringify(pending.frame));
  }

  async #open(): Promise<void> {
    this.#reconnectTimer = undefined;
    this.#setState("connecting");
    let token: string | undefined;
    try {
      token = await this.#currentToken();
    } catch (cause) {
      this.emit("error", new WsgateError("token", `the token function failed: ${String(cause)}`));
      this.#retry("failed", 1006, "", false);
      return;
    }
    if (!this.#wanted || this.#socket) return;
    const url = this.url;
    // Browsers cannot set headers: the token goes as a subprotocol entry, next to `wsgate`, which
    // the gateway answers with (it never echoes the token).
    const protocols = token ? ["wsgate", `bearer.${token}`] : ["wsgate"];
    let socket: WebSocket;
    try {
      socket = new this.#WebSocket(url, protocols);
    } catch (cause) {
      this.emit("error", new WsgateError("not_connected", `cannot connect to ${url}: ${String(cause)}`));
      this.#retry("failed", 1006, "", false);
      return;
    }
    this.#socket = socket;
    socket.onmessage = (event: MessageEvent) => {
      if (this.#socket === socket && typeof event.data === "string") this.#receive(event.data, url);
    };
    socket.onclose = (event: CloseEvent) => {
      if (this.#socket === socket) this.#closed(event.code, event.reason);
    };
    let opened = false;
    socket.onopen = () => {
      opened = true;
    };
    // A connection that fails before it opens fires `error`, and in some runtimes (Node 22's)
    // no `close` after it: the failure is handled here, once.
    socket.onerror = () => {
      if (this.#socket === socket && !opened) this.#closed(1006, "");
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
        this.emit("error", new WsgateError("refused", String(message["error"]), message["code"] as number | undefined));
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
      pending.reject(new WsgateError("refused", String(message["error"]), message["code"] as number | undefined));
    } else {
      pending.onAnswer?.(message);
      pending.resolve(message);
    }
    return true;
  }

  #onGreeted(greeting: Connected, url: string): void {
    this.#greeted = true;
    this.#attempt = 0;
    this.#clientId = greeting.clientId;
    const reconnected = this.#everGreeted;
    this.#everGreeted = true;
    this.#setState("connected");
    this.emit("connected", { ...greeting, url, reconnected });
    // Rooms first, then what was queued: the gateway reads in order, so a queued chat message
    // reaches its room after the join.
    for (const room of this.#rooms.values()) room._connected();
    for (const queued of this.#queue.splice(0)) this.#send(queued);
    this.#scheduleRefresh(this.#token === undefined ? undefined : tokenExpiry(this.#token));
  }

  #scheduleRefresh(expiresAt: number | undefined): void {
    clearTimeout(this.#refreshTimer);
    if (!this.#getToken || expiresAt === undefined) return;
    const left = expiresAt * 1000 - Date.now();
    const delay = Math.max(0, left - Math.min(this.#refreshBefore, left / 2));
    this.#refreshTimer = setTimeout(() => void this.#refresh(), delay);
  }

  async #refresh(): Promise<void> {
    if (!this.#greeted || !this.#getToken) return;
    try {
      const token = await this.#getToken();
      const answer = await this.request("refresh", { token });
      this.#token = token;
      const expiresAt = Number(answer["expiresAt"]);
      this.emit("token_refreshed", { expiresAt });
      this.#scheduleRefresh(expiresAt);
    } catch (cause) {
      if (!this.#greeted) return;
      const error = cause instanceof WsgateError ? cause : new WsgateError("token", `the token function failed: ${String(cause)}`);
      this.emit("error", error);
      // Tried again in a while: the connection is closed with 4001 if the token expires first,
      // and a new token is asked for then.
      this.#refreshTimer = setTimeout(() => void this.#refresh(), 5_000);
    }
  }

  #closed(code: number, reason: string): void {
    const greeted = this.#greeted;
    this.#socket = undefined;
    this.#greeted = false;
    clearTimeout(this.#refreshTimer);
    for (const room of this.#rooms.values()) room._disconnected();
    const kind = classifyClose(code, reason, greeted);
    if (kind === "token_expired") this.#token = undefined;
    this.#failPending((pending) => new WsgateError("disconnected", `the connection closed before the answer to ${pending.frame.type} (it may or may not have been done)`), this.#maxQueued > 0);
    let reconnect = this.#wanted;
    if (kind === "kicked") reconnect &&= this.#reconnectAfter(code, reason);
    if (kind === "token_expired") reconnect &&= this.#getToken !== undefined;
    this.#retry(kind, code, reason, greeted, reconnect);
  }

  /** Fails what waits for an answer, or (`requeue`) puts the chat messages among it back at the
   * head of the queue, in the order they were sent. */
  #failPending(error: (pending: Pending) => WsgateError, requeue: boolean): void {
    const again: Pending[] = [];
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      if (requeue && pending.retry) again.push(pending);
      else pending.reject(error(pending));
    }
    this.#pending.clear();
    this.#queue.unshift(...again);
  }

  /** After a connection ended (or an attempt failed): connects again after a delay that suits
   * `kind`, or stays disconnected. */
  #retry(kind: CloseKind, code: number, reason: string, opened: boolean, reconnect = this.#wanted): void {
    if (!reconnect) {
      this.#wanted = false;
      const stopped = new WsgateError("closed", `disconnected (${code}${reason ? ` ${reason}` : ""})`);
      for (const queued of this.#queue.splice(0)) queued.reject(stopped);
      this.emit("disconnected", { code, reason, why: kind, opened, reconnect: false });
      this.#setState("disconnected");
      return;
    }
    // Another gateway first when this one failed or is going away.
    if (kind === "failed" || kind === "restarting") this.#url = (this.#url + 1) % this.#urls.length;
    const delay = reconnectDelay(kind, this.#attempt, this.#backoff);
    this.#attempt += 1;
    this.emit("disconnected", { code, reason, why: kind, opened, reconnect: true, delay });
    this.#setState("connecting");
    this.#reconnectTimer = setTimeout(() => void this.#open(), delay);
  }

  #setState(state: State): void {
    const previous = this.#state;
    if (previous === state) return;
    this.#state = state;
    this.emit("state", { state, previous });
  }
}
