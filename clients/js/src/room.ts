import type { RequestOptions } from "./client.js";
import { Emitter } from "./emitter.js";
import { WsgateError } from "./errors.js";
import type {
  ChatMessage,
  Position,
  Publication,
  PresenceChange,
  PresencePage,
  PresenceUser,
  RoomJoined,
  ServerMessage,
  Typing,
} from "./protocol.js";

export interface RoomEvents {
  /**
   * Joined; after a reconnect `rejoined` is true and `recovered` says whether every message
   * missed meanwhile follows (true: they come as `message` events, each once, before any new
   * one) or could not be given (false: the room's history no longer has them, or the stream
   * started over — a single node restarted, Redis lost its data; show a gap or fetch the history
   * your backend keeps). On a first join `recovered` is absent.
   */
  joined: RoomJoined & { rejoined: boolean };
  message: ChatMessage;
  /** A backend's publication to the room (`POST /api/publish` with `room`), in the room's
   * stream with the chat messages (recovered with them, each once). */
  publication: Publication & { room: string; offset?: number };
  user_joined: PresenceChange;
  user_left: PresenceChange;
  typing: Typing;
  /** Messages of the room were lost on their way and are no longer in its history: the SDK
   * joins it again at once (`joined` follows, with the room's position). */
  resync: { room: string };
  /** Out of the room without having left it: the gateway took the connection out (a refreshed
   * token no longer allows it), or a rejoin after a reconnect was refused. */
  left: { room: string; reason: string };
}

/** What a room needs of its client. */
export interface RoomHost {
  request(type: string, payload: object, options?: RequestOptions): Promise<ServerMessage>;
  notify(type: string, payload: object): boolean;
  isConnected(): boolean;
}

/** The next `messageId`s: random per page load, counted after. */
const idPrefix = Math.random().toString(36).slice(2, 10);
let idCount = 0;

/** A room, joined (and joined again after each reconnect) until left. */
export class Room extends Emitter<RoomEvents> {
  readonly name: string;
  #host: RoomHost;
  /** The application wants to be in it (joined, not left). */
  #wanted = false;
  /** Joined on the current connection, and the answer. */
  #joined: RoomJoined | undefined;
  /** A `join_room` is on its way. */
  #joining = false;
  /** Joined on an earlier connection: the next join is a rejoin. */
  #everJoined = false;
  /** The last message seen: what `since` sends back. */
  #position: Position | undefined;
  /** `join()` calls waiting for the room to be joined. */
  #waiting: Array<{ resolve: (joined: RoomJoined) => void; reject: (error: unknown) => void }> = [];

  /** @internal */
  constructor(name: string, host: RoomHost) {
    super();
    this.name = name;
    this.#host = host;
  }

  /** Whether the connection is in the room now. */
  get joined(): boolean {
    return this.#joined !== undefined;
  }

  /** The last offset (and its epoch) seen in the room. */
  get position(): Position | undefined {
    return this.#position && { ...this.#position };
  }

  /** Joins the room: now when connected, else once connected (a connection lost on the way
   * does not fail it: the room is joined on the next); from then on the room is joined again
   * after each reconnect, with `since`, until `leave()`. Rejected when the gateway refuses. */
  join(): Promise<RoomJoined> {
    this.#wanted = true;
    if (this.#joined) return Promise.resolve(this.#joined);
    const joined = new Promise<RoomJoined>((resolve, reject) => {
      this.#waiting.push({ resolve, reject });
    });
    if (this.#host.isConnected()) this.#join();
    return joined;
  }

  /** Leaves the room (and stops joining it after reconnects; a later `join()` is a first join).
   * A connection lost meanwhile left every room: that is no failure. */
  async leave(): Promise<void> {
    this.#wanted = false;
    const joined = this.#joined;
    this.#joined = undefined;
    this.#position = undefined;
    this.#everJoined = false;
    this.#reject(new WsgateError("closed", `left ${this.name} before it was joined`));
    if (joined && this.#host.isConnected()) {
      await this.#host.request("leave_room", { room: this.name }).catch((error: unknown) => {
        if (!(error instanceof WsgateError && (error.kind === "disconnected" || error.kind === "not_connected"))) {
          throw error;
        }
      });
    }
  }

  /**
   * Sends a chat message; resolves with the offset the room gave it once published. It carries a
   * `messageId` (yours, or one made here), so that the gateway publishes it once even when it is
   * sent again — after a reconnect, from the queue — within its dedup window (2 minutes).
   */
  async send(message: string, options: { messageId?: string } = {}): Promise<{ offset: number; messageId: string }> {
    const messageId = options.messageId ?? `${idPrefix}-${++idCount}`;
    const ack = await this.#host.request(
      "chat_message",
      { room: this.name, message, messageId },
      { retry: true },
    );
    return { offset: ack["offset"] as number, messageId };
  }

  /** Tells the other members whether this user is typing (not queued: dropped when not
   * connected). */
  typing(isTyping: boolean): void {
    if (this.#joined) void this.#host.notify("typing", { room: this.name, isTyping });
  }

  /** One page of the room's users (across the cluster), from `after` (a page's `next`). */
  async presencePage(after?: string): Promise<PresencePage> {
    const payload = after === undefined ? { room: this.name } : { room: this.name, after };
    return (await this.#host.request("presence", payload)) as unknown as PresencePage;
  }

  /** Every user in the room, page after page. */
  async *presence(): AsyncGenerator<PresenceUser, void, undefined> {
    let after: string | undefined;
    do {
      const page = await this.presencePage(after);
      yield* page.users;
      after = page.next;
    } while (after !== undefined);
  }

  /** @internal A connection was greeted: the room is joined (again) if wanted. */
  _connected(): void {
    if (this.#wanted) this.#join();
  }

  /** @internal The connection closed. */
  _disconnected(): void {
    this.#joined = undefined;
  }

  /** @internal The client was closed: `join()` calls still waiting fail. */
  _closed(): void {
    this.#joined = undefined;
    this.#reject(new WsgateError("closed", "the client was closed"));
  }

  /** @internal A message for this room (dropped when the room is not joined: left, or a
   * late copy). */
  _receive(message: ServerMessage): void {
    if (!this.#joined && message.type !== "room_left") return;
    switch (message.type) {
      case "chat_message":
        if (this.#advance(message)) this.emit("message", message as unknown as ChatMessage);
        break;
      case "publication":
        if (this.#advance(message)) {
          this.emit("publication", message as unknown as Publication & { room: string; offset?: number });
        }
        break;
      case "user_joined":
      case "user_left":
        this.emit(message.type, message as unknown as PresenceChange);
        break;
      case "typing":
        this.emit("typing", message as unknown as Typing);
        break;
      case "resync":
        this.emit("resync", { room: this.name });
        // The stream goes on from where it is now (its offsets may have started over).
        this.#position = undefined;
        if (this.#wanted && this.#host.isConnected()) this.#join();
        break;
      case "room_left":
        this.#wanted = false;
        this.#joined = undefined;
        this.emit("left", { room: this.name, reason: String(message["reason"] ?? "") });
        break;
    }
  }

  /** Whether a message of the room's stream is new, moving the position on: each message once
   * (one already seen — a replay racing a live copy — is skipped). */
  #advance(message: ServerMessage): boolean {
    const offset = message["offset"];
    if (typeof offset !== "number" || !this.#position) return true;
    if (offset <= this.#position.offset) return false;
    this.#position.offset = offset;
    return true;
  }

  /** Sends `join_room` (with `since` when a position is known), unless one is on its way. */
  #join(): void {
    if (this.#joining) return;
    this.#joining = true;
    const rejoined = this.#everJoined;
    const payload: { room: string; since?: Position } = { room: this.name };
    if (this.#position) payload.since = this.#position;
    // The answer is taken as it is read: the messages read after it are the room's from then on.
    const onAnswer = (answer: ServerMessage): void => {
      this.#joining = false;
      if (!this.#wanted) {
        // Left while the join was on its way.
        this.#host.request("leave_room", { room: this.name }).catch(() => {});
        return;
      }
      const { id: _id, type: _type, ...fields } = answer;
      const joined = fields as unknown as RoomJoined;
      this.#joined = joined;
      this.#everJoined = true;
      // Recovered: the missed messages follow and move the position on; otherwise the stream
      // is taken from where it is now.
      if (joined.recovered !== true) {
        this.#position = { offset: joined.offset, epoch: joined.epoch };
      }
      this.emit("joined", { ...joined, rejoined });
      for (const waiting of this.#waiting.splice(0)) waiting.resolve(joined);
    };
    // No timeout: the gateway answers every join (a room being synced first answers late); a
    // connection lost meanwhile fails it.
    this.#host.request("join_room", payload, { onAnswer, timeout: Infinity, ahead: true }).catch(
      (error: unknown) => {
        this.#joining = false;
        if (error instanceof WsgateError && error.kind === "disconnected") {
          // Joined on the next connection.
          return;
        }
        if (error instanceof WsgateError && error.kind === "refused") {
          // Refused (not allowed, limits): not tried again after reconnects.
          this.#wanted = false;
          if (rejoined) this.emit("left", { room: this.name, reason: error.message });
        }
        this.#reject(error);
      },
    );
  }

  #reject(error: unknown): void {
    for (const waiting of this.#waiting.splice(0)) waiting.reject(error);
  }
}
