/**
 * Why a request failed:
 * - `refused`: the gateway answered with an error (`message` is its words; `code` the backend's,
 *   when a proxy refused);
 * - `not_connected`: not connected, and not queued (no queue, or it is full);
 * - `disconnected`: the connection closed before the answer came — the gateway may or may not have
 *   carried it out (a chat message with a `messageId` can be sent again safely);
 * - `timeout`: no answer within `requestTimeout`;
 * - `closed`: `close()` was called;
 * - `token`: the application's token function failed.
 */
export type ErrorKind = "refused" | "not_connected" | "disconnected" | "timeout" | "closed" | "token";

export class WsgateError extends Error {
  readonly kind: ErrorKind;
  /** The backend's code, when a proxy refused with one. */
  readonly code: number | undefined;

  constructor(kind: ErrorKind, message: string, code?: number) {
    super(message);
    this.name = "WsgateError";
    this.kind = kind;
    this.code = code;
  }
}
