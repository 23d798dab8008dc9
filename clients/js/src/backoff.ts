/** How long to wait before connecting again, in milliseconds. */
export interface BackoffOptions {
  /** The first delay's upper bound, doubled after each failed attempt up to `maxDelay`. */
  minDelay: number;
  maxDelay: number;
  /** After a close for flooding (1008 "rate limit exceeded"): at least this long. */
  rateLimitDelay: number;
  /** After the server said it is shutting down (1001): within this long, spread at random so
   * that its clients do not all come back at once. */
  restartSpread: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = {
  minDelay: 500,
  maxDelay: 20_000,
  rateLimitDelay: 10_000,
  restartSpread: 5_000,
};

/**
 * What a close code says about the next attempt:
 * - `token_expired` (4001): a new token first, then at once;
 * - `unauthorized` (4401: the upgrade's token was refused — missing, malformed, expired, badly
 *   signed): a new token from the token function, backing off; final with a fixed token;
 * - `rate_limited` (1008 "rate limit exceeded"): back off longer;
 * - `restarting` (1001, the server is shutting down): come back soon, spread out (another URL
 *   first, when there are several);
 * - `kicked` (4000–4999, the application closed the connection: a disconnect through the server
 *   API, a connect proxy's refusal, an `Origin` not allowed (4403)): do not come back unless
 *   `reconnectAfter` says so;
 * - `failed`: the connection never opened (refused at the upgrade, unreachable): another URL, and
 *   back off;
 * - `lost`: anything else (a network failure, a heartbeat timeout, a slow reader closed): back off.
 */
export type CloseKind =
  | "token_expired"
  | "unauthorized"
  | "rate_limited"
  | "restarting"
  | "kicked"
  | "failed"
  | "lost";

export function classifyClose(code: number, reason: string, greeted: boolean): CloseKind {
  if (code === 4001) return "token_expired";
  if (code === 4401) return "unauthorized";
  if (code >= 4000 && code <= 4999) return "kicked";
  if (code === 1008 && /rate limit/i.test(reason)) return "rate_limited";
  if (code === 1001) return "restarting";
  return greeted ? "lost" : "failed";
}

/** The delay before attempt number `attempt` (0 for the first after a connection ended), with
 * full jitter: a random point below an exponentially growing bound. */
export function reconnectDelay(
  kind: CloseKind,
  attempt: number,
  options: BackoffOptions,
  random: () => number = Math.random,
): number {
  const bound = Math.min(options.maxDelay, options.minDelay * 2 ** Math.min(attempt, 30));
  switch (kind) {
    case "token_expired":
      return random() * options.minDelay;
    case "rate_limited":
      return options.rateLimitDelay + random() * Math.max(bound, options.rateLimitDelay);
    case "restarting":
      return attempt === 0 ? random() * options.restartSpread : random() * bound;
    default:
      return random() * bound;
  }
}
