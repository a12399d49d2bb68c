// wscluster-client: the errors its promises reject with. See README.md beside it.

/** The server answered a request with an `error` frame (or it timed out: code "timeout"). */
export class ServerError extends Error {
  /** @param {string} code @param {string} message @param {object|null} [frame] */
  constructor(code, message, frame = null) {
    super(`${code}: ${message}`);
    Object.assign(this, { name: "ServerError", code, frame, id: frame ? frame.id : null });
  }
}

/** The link (or the whole client) is gone; `code`/`reason` are the close code and reason seen. */
export class ConnectionClosed extends Error {
  /** @param {number|null} code @param {string} [reason] @param {{cause?: unknown}} [options] */
  constructor(code, reason = "", options = undefined) {
    const what = code == null ? "connection closed" : `connection closed (code ${code})`;
    super(reason ? `${what}: ${reason}` : what, options);
    Object.assign(this, { name: "ConnectionClosed", code, reason });
  }
}
