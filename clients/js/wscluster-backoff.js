// wscluster-client: when to reconnect, and how long to wait first. See README.md beside it.

/** Close codes after which the client must not reconnect: 1008 policy, 4001 kicked. */
export const TERMINAL_CLOSE_CODES = Object.freeze([1008, 4001]);
/** Upper bound on a 1012 close reason's `retry_ms` hint. */
export const MAX_RETRY_HINT_MS = 60000;
/** A session that lasted this long (ms) before it dropped restarts the backoff from its base. */
export const STABLE_SESSION_MS = 5000;

/** Capped exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)) ms.
 * @param {number} attempt 0 for the first retry @param {number} base @param {number} cap @param {() => number} [random] */
export function backoffDelay(attempt, base, cap, random = Math.random) {
  return random() * Math.min(cap, base * 2 ** Math.min(Math.max(attempt, 0), 32));
}

/** The `retry_ms` of a close reason like `{"retry_ms": 500}` (capped), else null. */
export function retryHint(reason) {
  let obj;
  try { obj = JSON.parse(reason); } catch { return null; }
  const ms = obj && typeof obj === "object" ? obj.retry_ms : undefined;
  return typeof ms === "number" && Number.isFinite(ms) && ms >= 0 ? Math.min(ms, MAX_RETRY_HINT_MS) : null;
}
