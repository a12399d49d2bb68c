// wscluster-client: the browser and Node (>= 20) client of wscluster, wire protocol version 1.
// One ES module, no dependencies. See README.md beside it.

/** Close codes after which the client must not reconnect: 1008 policy, 4001 kicked. */
export const TERMINAL_CLOSE_CODES = Object.freeze([1008, 4001]);
/** Requests waiting for the session to be (re)established, at most. */
export const MAX_WAITING = 1000;
/** Upper bound on a 1012 close reason's `retry_ms` hint. */
export const MAX_RETRY_HINT_MS = 60000;
/** A session that lasted this long (ms) before it dropped restarts the backoff from its base. */
export const STABLE_SESSION_MS = 5000;
/** Error codes that make a session restore start over on a new link (others end the client). */
const TRANSIENT = ["timeout", "unavailable", "rate_limited"];

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

/**
 * @typedef {{type: string, [key: string]: any}} Frame
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"} State
 * @typedef {{uid?: string, token?: string, WebSocket?: any, reconnect?: boolean,
 *   backoffBase?: number, backoffCap?: number, maxHandshakeRetries?: number,
 *   requestTimeout?: number, maxWaiting?: number}} Options
 */

/** A wscluster connection that reconnects, logs in again and re-joins its groups. */
export class WsclusterClient {
  /** @param {string|string[]} urls @param {Options} [options] */
  constructor(urls, options = {}) {
    this.urls = urls;
    const o = options;
    this.WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket (Node 20: --experimental-websocket or the ws package)");
    }
    this.reconnect = o.reconnect ?? true;
    this.backoffBase = o.backoffBase ?? 200;
    this.backoffCap = o.backoffCap ?? 10000;
    this.maxHandshakeRetries = o.maxHandshakeRetries ?? 8;
    this.requestTimeout = o.requestTimeout ?? 10000;
    this.maxWaiting = o.maxWaiting ?? MAX_WAITING;
    if (o.uid != null && o.token != null) throw new TypeError("pass uid or token, not both");
    /** @type {State} */ this._state = "idle";
    /** @type {string|null} */ this.clientId = null;
    /** @type {string|null} */ this.node = null;
    /** @type {string|null} */ this.uid = null;
    /** @type {Frame|null} the last welcome frame */ this.welcome = null;
    this.url = this._urls[0];
    this.reconnects = 0;
    /** @type {Frame|null} the login frame replayed after each welcome */
    this._login = o.uid != null ? { type: "login", uid: o.uid } : o.token != null ? { type: "login", token: o.token } : null;
    /** @type {Map<string, boolean>} */ this._groups = new Map();
    this._ops = new Map();    // "login" or "group:<name>" -> {applied, inflight}; _opSeq numbers them
    this._opSeq = 0;
    this._listeners = new Map();
    this._waiting = [];       // requests made while not open: {frame, deadline, resolve, reject, timer}
    this._openWaiters = [];   // connect() callers: {resolve, reject}
    this._link = null;        // {ws, pending: Map<id, entry>, welcome, timer, login, restored}
    this._lastId = 0;
    this._failures = 0;       // consecutive attempts without a restored session (URL index, retry cap)
    this._backoffAttempt = 0; // reset when a session that lasted STABLE_SESSION_MS drops
    this._wasOpen = false;
    this._retryTimer = null;
    this._finished = null;    // the ConnectionClosed that ended the client
  }

  /** @returns {State} */ get state() { return this._state; }
  /** The URLs to try (a copy). Assigning a URL or a list takes effect at the next attempt. */
  get urls() { return [...this._urls]; }
  set urls(urls) {
    const list = (Array.isArray(urls) ? urls : [urls]).map(String);
    if (!list.length) throw new TypeError("at least one URL is needed");
    this._urls = list;
  }
  /** Joined groups (name -> presence flag), a copy. */ get groups() { return new Map(this._groups); }

  // -- events ---------------------------------------------------------------------------

  /** @param {string} event @param {(arg: any) => void} fn @returns {() => void} unsubscribe */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /** @param {string} event @param {(arg: any) => void} fn */
  off(event, fn) { this._listeners.get(event)?.delete(fn); }

  _emit(event, arg) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try { fn.call(this, arg); } catch (error) {
        if (event !== "listenerError" && this._listeners.get("listenerError")?.size) this._emit("listenerError", { event, error });
        else console.error(`wscluster: a "${event}" listener threw`, error);
      }
    }
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  // -- lifecycle ------------------------------------------------------------------------

  /** Connect (and log in when uid/token was given). @returns {Promise<Frame>} the welcome */
  connect() {
    if (this._finished) return Promise.reject(this._closedError());
    if (this._state === "open") return Promise.resolve(this.welcome);
    const promise = new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject }));
    if (this._state === "idle") {
      this._setState("connecting");
      this._attempt();
    }
    return promise;
  }

  /** Stop for good: no reconnect; pending requests reject with ConnectionClosed. */
  close(code = 1000) {
    if (this._finished) return;
    const link = this._link;
    this._finish(new ConnectionClosed(code, "closed by the client"));
    if (link?.ws) closeQuietly(link.ws, code);
  }

  _attempt() {
    this._retryTimer = null;
    if (this._finished) return;
    this.url = this._urls[this._failures % this._urls.length];
    const link = { ws: null, pending: new Map(), welcome: null, timer: null, login: null, restored: false, restoredAt: 0 };
    this._link = link;
    link.timer = setTimeout(() => this._abandon(link, "no welcome in time"), Math.min(this.requestTimeout, 10000));
    try {
      link.ws = new this.WebSocket(this.url);
    } catch (err) { // e.g. a malformed URL: count it as an attempt without welcome
      setTimeout(() => this._dropped(link, 1006, String(err?.message ?? err)), 0);
      return;
    }
    link.ws.onmessage = (ev) => { if (link === this._link) this._received(link, ev.data); };
    link.ws.onclose = (ev) => this._dropped(link, ev.code ?? 1006, ev.reason ?? "");
    link.ws.onerror = () => {}; // a close event follows
  }

  /** Drop a link that is alive but useless (no welcome, restore timed out). */
  _abandon(link, reason) {
    if (link !== this._link) return;
    if (link.ws) closeQuietly(link.ws, 1000);
    this._dropped(link, 1006, reason);
  }

  _dropped(link, code, reason) {
    if (link !== this._link) return;
    this._detach(link, () => new ConnectionClosed(code, reason));
    let delayMs = null, fatal = null;
    if (!link.restored) this._failures += 1; // no welcome, or the session setup failed on it
    else if (Date.now() - link.restoredAt >= STABLE_SESSION_MS) this._backoffAttempt = 0;
    if (TERMINAL_CLOSE_CODES.includes(code) || !this.reconnect) fatal = new ConnectionClosed(code, reason);
    else if (this._failures > this.maxHandshakeRetries) {
      fatal = new ConnectionClosed(code, `gave up after ${this._failures} attempts without a session${reason ? ` (${reason})` : ""}`);
    } else {
      const hint = code === 1012 ? retryHint(reason) : null;
      delayMs = backoffDelay(this._backoffAttempt++, this.backoffBase, this.backoffCap) + (hint ?? 0);
    }
    if (!fatal && this._state === "open") this._setState("reconnecting");
    this._emit("disconnected", { code, reason, willRetry: !fatal, delayMs });
    if (fatal) this._finish(fatal);
    else if (!this._finished) this._retryTimer = setTimeout(() => this._attempt(), delayMs); // a listener may close()
  }

  _received(link, data) {
    if (typeof data !== "string") return;
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) return;
    this._emit("frame", frame);
    const type = frame.type;
    if (type === "welcome" && !link.welcome) return this._welcomed(link, frame);
    if (type === "ack" || type === "pong" || type === "error") {
      const entry = Number.isInteger(frame.id) ? link.pending.get(frame.id) : undefined;
      if (entry) {
        link.pending.delete(frame.id);
        clearTimeout(entry.timer);
        if (type === "error") entry.reject(new ServerError(String(frame.code), String(frame.message ?? ""), frame));
        else entry.resolve(frame);
        return;
      }
      // a late answer to one of our own requests (it timed out) is dropped
      if (type !== "error" || (Number.isInteger(frame.id) && frame.id > 0 && frame.id <= this._lastId)) return;
    }
    if (type === "message" || type === "presence" || type === "error") this._emit(type, frame);
  }

  _welcomed(link, welcome) {
    clearTimeout(link.timer);
    link.welcome = welcome;
    this.welcome = welcome;
    this.clientId = welcome.client_id ?? null;
    this.node = welcome.node ?? null;
    // a token login is not replayed when the handshake already authenticated (welcome.uid)
    const login = this._login;
    link.login = login && !(login.token != null && welcome.uid != null) ? login : null;
    if (!link.login) this.uid = welcome.uid ?? null;
    this._emit("welcome", welcome);
    if (link === this._link) this._restore(link, welcome); // unless a listener closed the client
  }

  /** Replay the login, then every join (in that order), then let the waiting requests go. */
  async _restore(link, welcome) {
    try {
      const login = link.login;
      if (login) {
        const ack = await this._sendOn(link, login, this.requestTimeout);
        this.uid = ack.uid ?? login.uid ?? null;
      }
      for (const [group, presence] of [...this._groups]) {
        try {
          await this._sendOn(link, joinFrame(group, presence), this.requestTimeout);
        } catch (err) {
          if (!(err instanceof ServerError) || TRANSIENT.includes(err.code)) throw err;
          this._groups.delete(group); // refused now: forget it, and say so
          this._emit("error", err.frame ?? { type: "error", id: null, code: err.code, message: err.message });
        }
      }
    } catch (err) {
      if (link !== this._link) return; // the link dropped meanwhile: _dropped handled it
      if (err instanceof ConnectionClosed || TRANSIENT.includes(err.code)) return this._abandon(link, `session setup failed: ${err.message}`);
      this._finish(new ConnectionClosed(null, `session setup failed: ${err.message}`, { cause: err }));
      return closeQuietly(link.ws, 1000);
    }
    if (link !== this._link || this._finished) return;
    Object.assign(link, { restored: true, restoredAt: Date.now() });
    this._failures = 0;
    for (const w of this._waiting.splice(0)) { // they go out before any listener runs
      clearTimeout(w.timer);
      this._sendOn(link, w.frame, w.deadline - Date.now()).then(w.resolve, w.reject);
    }
    this._setState("open");
    for (const w of this._openWaiters.splice(0)) w.resolve(welcome);
    if (link !== this._link) return; // a listener closed the client, or the link dropped
    if (this._wasOpen) { this.reconnects += 1; this._emit("reconnected", welcome); }
    this._wasOpen = true;
  }

  _finish(error) {
    if (this._finished) return;
    this._finished = error;
    clearTimeout(this._retryTimer);
    if (this._link) this._detach(this._link, () => this._closedError());
    for (const w of this._waiting.splice(0)) { clearTimeout(w.timer); w.reject(this._closedError()); }
    for (const w of this._openWaiters.splice(0)) w.reject(this._closedError());
    this._setState("closed");
    this._emit("closed", { code: error.code, reason: error.reason });
  }

  _closedError() {
    const e = this._finished;
    return new ConnectionClosed(e.code, e.reason, e.cause ? { cause: e.cause } : undefined);
  }

  /** Forget the current link: no more events from it, its requests in flight reject. */
  _detach(link, makeError) {
    this._link = null;
    clearTimeout(link.timer);
    if (link.ws) link.ws.onmessage = link.ws.onclose = null;
    const entries = [...link.pending.values()];
    link.pending.clear();
    for (const entry of entries) { clearTimeout(entry.timer); entry.reject(makeError()); }
  }

  // -- requests -------------------------------------------------------------------------

  /** Send a frame on a link with a fresh integer id; resolve with its ack/pong. */
  _sendOn(link, frame, timeoutMs) {
    return new Promise((resolve, reject) => {
      const id = ++this._lastId;
      const entry = { resolve, reject, timer: null };
      entry.timer = setTimeout(() => {
        link.pending.delete(id);
        reject(new ServerError("timeout", `no answer to "${frame.type}" in ${this.requestTimeout} ms`));
      }, Math.max(timeoutMs, 0));
      link.pending.set(id, entry);
      try { link.ws.send(JSON.stringify({ ...frame, id })); } catch (err) {
        link.pending.delete(id);
        clearTimeout(entry.timer);
        reject(new ConnectionClosed(null, `cannot send: ${err?.message ?? err}`));
      }
    });
  }

  /**
   * Send any frame with a fresh integer `id` (replacing one it has).
   * @param {Frame} frame @returns {Promise<Frame>} the ack (a pong for ping)
   */
  request(frame) {
    if (frame === null || typeof frame !== "object" || typeof frame.type !== "string") {
      return Promise.reject(new TypeError("a frame is an object with a string type"));
    }
    if (this._finished) return Promise.reject(this._closedError());
    if (this._state === "idle") return Promise.reject(new ConnectionClosed(null, "not connected: call connect() first"));
    if (this._state === "open" && this._link) return this._sendOn(this._link, frame, this.requestTimeout);
    if (this._waiting.length >= this.maxWaiting) {
      return Promise.reject(new ServerError("overloaded", `${this._waiting.length} requests already wait for the connection`));
    }
    return new Promise((resolve, reject) => {
      const w = { frame, deadline: Date.now() + this.requestTimeout, resolve, reject, timer: null };
      w.timer = setTimeout(() => {
        const at = this._waiting.indexOf(w);
        if (at >= 0) this._waiting.splice(at, 1);
        reject(new ServerError("timeout", `not connected within ${this.requestTimeout} ms`));
      }, this.requestTimeout);
      this._waiting.push(w);
    });
  }

  // A request changing what is replayed (login/logout; join/leave of one group): its ack applies
  // unless a later request on the same key was acked first (acks may come back out of order).
  async _change(key, frame, apply) {
    const seq = ++this._opSeq;
    const op = this._ops.get(key) ?? { applied: 0, inflight: 0 };
    this._ops.set(key, op);
    op.inflight += 1;
    try {
      const ack = await this.request(frame);
      if (seq > op.applied) { op.applied = seq; apply(ack); }
      return ack;
    } finally {
      if (--op.inflight === 0) this._ops.delete(key);
    }
  }

  /** Bind the connection to a uid (anonymous mode) or a JWT's subject; replayed after reconnects. */
  async login({ uid, token } = {}) {
    if ((uid == null) === (token == null)) throw new TypeError("pass exactly one of uid and token");
    const frame = uid != null ? { type: "login", uid } : { type: "login", token };
    return this._change("login", frame, (ack) => { this._login = frame; this.uid = ack.uid ?? uid ?? null; });
  }

  /** Unbind the uid (the connection stays open) and forget the login. */
  logout() {
    return this._change("login", { type: "logout" }, () => { this._login = null; this.uid = null; });
  }

  /** Join a group (with presence events when `presence`); re-joined after reconnects. */
  join(group, { presence = false } = {}) {
    return this._change(`group:${group}`, joinFrame(group, presence), () => this._groups.set(group, Boolean(presence)));
  }

  /** Leave a group and forget it. */
  leave(group) {
    return this._change(`group:${group}`, { type: "leave", group }, () => this._groups.delete(group));
  }

  /** Deliver `data` (any JSON value) to an address: uid:…, group:…, client:… or all. */
  send(to, data) { return this.request({ type: "send", to, data }); }

  /** Ask who is online: {online} for uid:…, {uids, count} for group:…. */
  presence(to) { return this.request({ type: "presence", to }); }

  /** Round trip to the node. @returns {Promise<Frame>} the pong */
  ping() { return this.request({ type: "ping" }); }
}

function closeQuietly(ws, code) {
  try { ws.close(code); } catch { try { ws.close(); } catch { /* already closed */ } }
}

function joinFrame(group, presence) {
  return presence ? { type: "join", group, presence: true } : { type: "join", group };
}
