/** A JWT's claims, read without verifying them (the gateway verifies): empty when the token is
 * not a JWT. */
export function tokenClaims(token: string): Record<string, unknown> {
  const payload = token.split(".")[1];
  if (payload === undefined) return {};
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "="));
    const claims: unknown = JSON.parse(json);
    return typeof claims === "object" && claims !== null ? (claims as Record<string, unknown>) : {};
  } catch {
    return {};
  }
}

/** A JWT's `exp` (seconds since the Unix epoch): undefined when the token is not a JWT or has
 * none. */
export function tokenExpiry(token: string): number | undefined {
  const exp = tokenClaims(token)["exp"];
  return typeof exp === "number" ? exp : undefined;
}
