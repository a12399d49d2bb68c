// wscluster-client: one reconnecting connection to a cluster, with requests matched to their
// answers and pushed frames as events; wscluster.js adds the session (login, groups, streams)
// that is restored on every new link. See README.md beside it.
import { ConnectionClosed, ServerError } from "./wscluster-errors.js";
import { Emitter } from "./wscluster-events.js";
import { backoffDelay, retryHint, STABLE_SESSION_MS, TERMINAL_CLOSE_CODES } from "./wscluster-backoff.js";

/** Requests waiting for the session to be (re)established, at most. */
export const MAX_WAITING = 1000;
/** Error codes that make a session restore start over on a new link (others end the client). */
export const TRANSIENT = Object.freeze(["timeout", "unavailable", "rate_limited"]);

/**
 * @typedef {{type: string, [key: string]: any}} Frame
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"} State
 */

export class WsclusterConnection extends Emitter {
  /** @param {string|string[]} urls @param {import("./wscluster.js").Options} [options] */
  constructor(urls, options = {}) {
    super();
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
    /** @type {State} */ this._state = "idle";
    /** @type {string|null} */ this.clientId = null;
    /** @type {string|null} */ this.node = null;
    /** @type {Frame|null} the last welcome frame */ this.welcome = null;
    this.url = this._urls[0];
    this.reconnects = 0;
    this._waiting = [];       // requests made while not open: {frame, deadline, resolve, reject, timer}
    this._openWaiters = [];   // connect() callers: {resolve, reject}
    this._link = null;        // {ws, pending: Map<id, entry>, welcome, timer, restored, restoredAt} + the session's
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

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  // -- what the session adds (wscluster.js) ---------------------------------------------

  /** The subprotocols a new link offers (undefined: none). */
  _protocols() { return undefined; }
  /** A welcome came on a link (link, welcome): note what to restore, before the `welcome` event. */
  _prepare() {}
  /** Restore the session on a link (link); a throw starts over on a new link or ends the client. */
  async _restore() {}
  /** A pushed frame that answers no request. */
  _pushed(frame) { if (["message", "presence", "error"].includes(frame.type)) this._emit(frame.type, frame); }
  /** A link is gone (link): it dropped, or the client closed. */
  _gone() {}

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
    const link = { ws: null, pending: new Map(), welcome: null, timer: null, restored: false, restoredAt: 0 };
    this._link = link;
    link.timer = setTimeout(() => this._abandon(link, "no welcome in time"), Math.min(this.requestTimeout, 10000));
    try {
      const protocols = this._protocols();
      link.ws = protocols ? new this.WebSocket(this.url, protocols) : new this.WebSocket(this.url);
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
    this._pushed(frame);
  }

  _welcomed(link, welcome) {
    clearTimeout(link.timer);
    link.welcome = welcome;
    this.welcome = welcome;
    this.clientId = welcome.client_id ?? null;
    this.node = welcome.node ?? null;
    this._prepare(link, welcome);
    this._emit("welcome", welcome);
    if (link === this._link) this._restoreOn(link, welcome); // unless a listener closed the client
  }

  /** Restore the session, then let the waiting requests go. */
  async _restoreOn(link, welcome) {
    try {
      await this._restore(link);
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
    this._gone(link);
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

  /** Deliver `data` (any JSON value) to an address: uid:…, group:…, client:… or all. */
  /** `carbon`: a send to a `uid:` is also stored in (and delivered to) the sender's own uid stream. */
  send(to, data, { carbon = false } = {}) { return this.request(carbon ? { type: "send", to, data, carbon: true } : { type: "send", to, data }); }

  /** Ask who is online: {online} for uid:…, {uids, count} for group:…. */
  presence(to) { return this.request({ type: "presence", to }); }

  /** Round trip to the node. @returns {Promise<Frame>} the pong */
  ping() { return this.request({ type: "ping" }); }
}

function closeQuietly(ws, code) {
  try { ws.close(code); } catch { try { ws.close(); } catch { /* already closed */ } }
}
