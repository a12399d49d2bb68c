// wscluster-client: the browser and Node (>= 20) client of wscluster, wire protocol version 1.
// ES modules (this one and the wscluster-*.js beside it), no dependencies, no build step.
// See README.md beside it.
import { ServerError } from "./wscluster-errors.js";
import { TRANSIENT, WsclusterConnection } from "./wscluster-connection.js";
import { isStream, Streams } from "./wscluster-streams.js";

export { ConnectionClosed, ServerError } from "./wscluster-errors.js";
export * from "./wscluster-backoff.js";
export { MAX_WAITING } from "./wscluster-connection.js";
export { MAX_HOLD, isPosition } from "./wscluster-streams.js";

/** The subprotocol a node selects when a client offers it (with its token as "bearer.<token>"). */
export const SUBPROTOCOL = "wscluster.v1";
// what a subprotocol may be made of (RFC 6455 4.1: an HTTP token); a JWT always is
const SUBPROTOCOL_CHARS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/**
 * @typedef {import("./wscluster-connection.js").Frame} Frame
 * @typedef {[string|null, number]} Position
 * @typedef {{uid?: string, token?: string, handshakeToken?: boolean|string, WebSocket?: any, reconnect?: boolean,
 *   backoffBase?: number, backoffCap?: number, maxHandshakeRetries?: number,
 *   requestTimeout?: number, maxWaiting?: number, positions?: Object<string, Position>,
 *   maxHold?: number, recent?: number}} Options
 */

/** A wscluster connection that reconnects, logs in again and resumes or re-joins its streams. */
export class WsclusterClient extends WsclusterConnection {
  /** @param {string|string[]} urls @param {Options} [options] */
  constructor(urls, options = {}) {
    super(urls, options);
    const o = options;
    if (o.uid != null && o.token != null) throw new TypeError("pass uid or token, not both");
    if (o.handshakeToken != null && !["boolean", "string"].includes(typeof o.handshakeToken)) {
      throw new TypeError("handshakeToken is a boolean or a token");
    }
    /** true: a token login's token goes in the handshake too; false: never; a string: this token (no login) */
    this.handshakeToken = o.handshakeToken ?? true;
    if (o.recent != null && !(Number.isInteger(o.recent) && o.recent >= 1)) throw new TypeError("recent is an integer >= 1");
    /** streams resumed from [null, 0] replay at most this many (the newest); null: all retained */
    this.recent = o.recent ?? null;
    /** @type {string|null} */ this.uid = null;
    /** @type {Frame|null} the login frame replayed after each welcome */
    this._login = o.uid != null ? { type: "login", uid: o.uid } : o.token != null ? { type: "login", token: o.token } : null;
    /** @type {Map<string, boolean>} */ this._groups = new Map();
    this._streams = new Streams((event, frame) => this._emit(event, frame), o.positions, o.maxHold);
    this._ops = new Map();    // "login" or "group:<name>" -> {applied, inflight}; _opSeq numbers them
    this._opSeq = 0;
  }

  /** Joined groups (name -> presence flag), a copy. */ get groups() { return new Map(this._groups); }

  /** The last position [epoch, offset] of every stream with history seen: {stream: position}. */
  positions() { return this._streams.all(); }

  // -- the session, restored on every new link --------------------------------------------

  /**
   * The token of a token login (else a handshakeToken string) goes in the handshake too, as
   * the subprotocol bearer.<token> beside SUBPROTOCOL, which the node selects: a browser
   * cannot set headers, a URL (?token=) ends up in access logs, and a JWT node refuses a
   * handshake without a token.
   */
  _protocols() {
    const given = this.handshakeToken;
    if (given === false) return undefined;
    const token = this._login?.token ?? (typeof given === "string" ? given : undefined);
    if (typeof token !== "string" || !SUBPROTOCOL_CHARS.test(token)) return undefined;
    return [SUBPROTOCOL, `bearer.${token}`];
  }

  _prepare(link, welcome) {
    // a token login is not replayed when the handshake already authenticated (welcome.uid)
    const login = this._login;
    link.login = login && !(login.token != null && welcome.uid != null) ? login : null;
    if (!link.login) this.uid = welcome.uid ?? null;
    link.held = this._resumable(welcome.uid ?? link.login?.uid ?? this.uid); // held until resumed
    this._streams.hold(link.held);
  }

  /** Replay the login, the resume, then the other joins (in that order). */
  async _restore(link) {
    const login = link.login;
    const ack = login && (await this._sendOn(link, login, this.requestTimeout));
    if (login) this.uid = ack.uid ?? login.uid ?? null;
    const streams = this._resumable(this.uid); // known before this login's ack: resumed
    if (ack && this.uid != null) this._streams.acked(`uid:${this.uid}`, ack);
    for (const [group, presence] of await this._resumeOn(link, streams)) {
      try {
        this._streams.acked(`group:${group}`, await this._sendOn(link, joinFrame(group, presence), this.requestTimeout));
      } catch (err) {
        if (!(err instanceof ServerError) || TRANSIENT.includes(err.code)) throw err;
        this._refused(group, err.frame ?? { type: "error", id: null, code: err.code, message: err.message });
      }
    }
  }

  /** Streams to resume: the uid's and the joined groups', those with a known position. */
  _resumable(uid) {
    const streams = [...(uid != null ? [`uid:${uid}`] : []), ...[...this._groups.keys()].map((g) => `group:${g}`)];
    return streams.filter((s) => this._streams.get(s));
  }

  /** The resume of a restore (its streams held since the welcome). @returns the groups to join plainly */
  async _resumeOn(link, streams) {
    this._streams.hold(streams);
    this._streams.release(link.held.splice(0, Infinity, ...streams));
    const plain = [...this._groups].filter(([group]) => !streams.includes(`group:${group}`));
    if (!streams.length) return plain;
    let ack;
    try {
      ack = await this._sendOn(link, this._streams.resumeFrame(streams, (s) => this._groups.get(s.slice(6)) === true, this.recent), this.requestTimeout);
    } catch (err) {
      if (!(err instanceof ServerError) || TRANSIENT.includes(err.code)) throw err;
      this._streams.release(link.held.splice(0)); // refused as a whole (a node without resume): join
      return [...this._groups];
    }
    const results = this._streams.resumeAck(ack, streams);
    for (const s of streams) {
      const code = results[s]?.error;
      if (code && s.startsWith("group:")) this._refused(s.slice(6), { type: "error", id: null, code, message: `resume of ${s} refused` });
    }
    this._streams.release(link.held.splice(0));
    return plain;
  }

  _refused(group, frame) { // a group the server refuses now: forget it, and say so
    this._groups.delete(group);
    this._streams.forget(`group:${group}`);
    this._emit("error", frame);
  }

  _pushed(frame) {
    if (frame.type === "message") this._streams.message(frame);
    else if (frame.type === "gap") this._streams.gap(frame);
    else if (frame.type === "left") this._left(frame);
    else super._pushed(frame);
  }

  /** The server made us leave a group (a new token does not allow it): forget it, say so. */
  _left(frame) {
    if (typeof frame.group === "string") {
      const key = `group:${frame.group}`;
      this._groups.delete(frame.group);
      this._streams.forget(key);
      const op = this._ops.get(key);
      if (op) op.applied = this._opSeq; // a request about it still in flight no longer applies
    }
    this._emit("left", frame);
  }

  _gone(link) { this._streams.release(link.held?.splice(0) ?? []); } // what was received goes out, in order

  // -- requests that change the session -------------------------------------------------

  // A request changing what is replayed (login/logout; join/leave/resume of groups): its ack
  // applies to each key (`login`, `group:<name>`) unless a later request on that key was acked
  // first (acks may come back out of order). apply(ack, the keys it applies to).
  async _change(keys, frame, apply) {
    const seq = ++this._opSeq;
    const ops = keys.map((key) => {
      const op = this._ops.get(key) ?? { applied: 0, inflight: 0 };
      this._ops.set(key, op);
      op.inflight += 1;
      return op;
    });
    try {
      const ack = await this.request(frame);
      apply(ack, keys.filter((_, i) => seq > ops[i].applied && (ops[i].applied = seq)));
      return ack;
    } finally {
      keys.forEach((key, i) => { if (--ops[i].inflight === 0) this._ops.delete(key); });
    }
  }

  /** Bind the connection to a uid (anonymous mode) or a JWT's subject; replayed after reconnects. */
  async login({ uid, token } = {}) {
    if ((uid == null) === (token == null)) throw new TypeError("pass exactly one of uid and token");
    const frame = uid != null ? { type: "login", uid } : { type: "login", token };
    return this._change(["login"], frame, (ack, won) => {
      if (!won.length) return;
      this._login = frame;
      this.uid = ack.uid ?? uid ?? null;
      if (this.uid != null) this._streams.acked(`uid:${this.uid}`, ack);
    });
  }

  /** Unbind the uid (the connection stays open) and forget the login. */
  logout() {
    return this._change(["login"], { type: "logout" }, (_, won) => { if (won.length) { this._login = null; this.uid = null; } });
  }

  /** Join a group (with presence events when `presence`); re-joined after reconnects. */
  join(group, { presence = false } = {}) {
    return this._change([`group:${group}`], joinFrame(group, presence), (ack, won) => {
      if (!won.length) return;
      this._groups.set(group, Boolean(presence));
      this._streams.acked(`group:${group}`, ack);
    });
  }

  /** Leave a group and forget it (and its position). */
  leave(group) {
    return this._change([`group:${group}`], { type: "leave", group }, (_, won) => {
      if (won.length) { this._groups.delete(group); this._streams.forget(`group:${group}`); }
    });
  }

  /**
   * Resume streams: `{stream: position}` (a position `[epoch, offset]` replaces the known one;
   * null: the known one, else `[null, 0]`, everything retained) or a list of streams. Their
   * messages are held until the ack and then go out in offset order; a `recovered` event per
   * stream comes with the ack. Groups are joined (and resumed after reconnects), with presence
   * events for the streams listed in `presence`. @returns {Promise<Frame>} the ack
   */
  async resume(streams, { presence = [], recent = this.recent } = {}) {
    const given = Array.isArray(streams) ? streams.map((s) => [s, null]) : Object.entries(streams ?? {});
    if (!given.length || !given.every(([s]) => isStream(s))) throw new TypeError("resume uid:… and group:… streams");
    for (const [s, p] of given) if (p != null) this._streams.set(s, p);
    const names = given.map(([s]) => s);
    const frame = this._streams.resumeFrame(names, (s) => presence.includes(s), recent);
    this._streams.hold(names);
    try {
      return await this._change(names.filter((s) => s.startsWith("group:")), frame, (ack, won) => {
        const results = this._streams.resumeAck(ack, names);
        for (const s of names) if (results[s]?.error) this._streams.forget(s);
        for (const s of won) if (results[s] && !results[s].error) this._groups.set(s.slice(6), presence.includes(s));
      });
    } finally {
      this._streams.release(names);
    }
  }
}

function joinFrame(group, presence) {
  return presence ? { type: "join", group, presence: true } : { type: "join", group };
}
