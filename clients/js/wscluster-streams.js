// wscluster-client: positions of streams with history, the duplicate filter, and the hold of
// messages while a resume is answered. See README.md ("History and resume") beside it.

/** Messages (and marks) held at most; beyond it the lowest held ones of a stream go out. */
export const MAX_HOLD = 10000;

/** A stream with history: `uid:…` or `group:…`. */
export const isStream = (s) => typeof s === "string" && /^(uid|group):./s.test(s);

/** A position `[epoch, offset]`; the epoch null (or "") asks a resume for everything retained. */
export function isPosition(p) {
  return Array.isArray(p) && p.length === 2 && (p[0] === null || typeof p[0] === "string")
    && Number.isInteger(p[1]) && p[1] >= 0;
}

/** The stream a message counts in: its `to`, or for a carbon its sender's own uid stream. */
const streamOf = (f) => (f.carbon === true ? (typeof f.from?.uid === "string" ? `uid:${f.from.uid}` : null) : f.to);
const rank = (item) => (item.kind === "message" ? 0 : 1);
const before = (a, b) => a.offset < b.offset || (a.offset === b.offset && rank(a) <= rank(b));
const placed = (f) => typeof f.epoch === "string" && Number.isInteger(f.offset);

/**
 * The last position per stream. A message whose offset is not above it (same epoch) is a
 * duplicate and dropped; a new epoch is taken. While a stream is held (resumes pending for
 * it) its messages, gaps and resume positions are kept in offset order, and go out in that
 * order when the last resume for it settles.
 */
export class Streams {
  /** @param {(event: string, frame: object) => void} emit @param {object} [positions] @param {number} [maxHold] */
  constructor(emit, positions = {}, maxHold = MAX_HOLD) {
    this._emit = emit;
    this.maxHold = maxHold;
    /** @type {Map<string, [string|null, number]>} */ this._positions = new Map();
    this._held = new Map(); // stream -> {holders, items: [{kind, epoch, offset, frame}] in order}
    this._heldCount = 0;
    for (const [stream, p] of Object.entries(positions ?? {})) this.set(stream, p);
  }

  /** @returns {[string|null, number]|undefined} */
  get(stream) { const p = this._positions.get(stream); return p && [p[0], p[1]]; }

  set(stream, p) {
    if (!isStream(stream) || !isPosition(p)) throw new TypeError(`not a stream and a position: ${stream} ${JSON.stringify(p)}`);
    this._positions.set(stream, [p[0], p[1]]);
  }

  forget(stream) { this._positions.delete(stream); }

  /** Every position, as a JSON-ready object {stream: [epoch, offset]}. */
  all() { return Object.fromEntries([...this._positions].map(([s, p]) => [s, [p[0], p[1]]])); }

  /** A join or login ack's position: taken only when none is known (a known one is resumed from). */
  acked(stream, ack) {
    if (!this._positions.has(stream) && placed(ack)) this._positions.set(stream, [ack.epoch, ack.offset]);
  }

  hold(streams) {
    for (const s of streams) {
      const h = this._held.get(s) ?? { holders: 0, items: [] };
      h.holders += 1;
      this._held.set(s, h);
    }
  }

  release(streams) {
    for (const s of streams) {
      const h = this._held.get(s);
      if (!h || --h.holders > 0) continue;
      this._held.delete(s);
      this._heldCount -= h.items.length;
      for (const item of h.items) this._process(s, item);
    }
  }

  /** A `message` frame: out now, or held, or dropped as a duplicate. */
  message(frame) {
    const stream = streamOf(frame);
    if (!isStream(stream) || !placed(frame)) return this._emit("message", frame);
    this._put(stream, { kind: "message", epoch: frame.epoch, offset: frame.offset, frame });
  }

  /** A `gap` frame: later messages of the stream continue after its offset. */
  gap(frame) {
    if (!isStream(frame.stream) || !placed(frame)) return this._emit("gap", frame);
    this._put(frame.stream, { kind: "gap", epoch: frame.epoch, offset: frame.offset, frame });
  }

  /**
   * The `resume` frame for these streams: known positions, else `[null, 0]` (everything
   * retained, or the newest `recent` when given).
   */
  resumeFrame(streams, withPresence, recent = null) {
    const positions = streams.map((s) => [s, this.get(s) ?? [null, 0]]);
    const frame = { type: "resume", streams: Object.fromEntries(positions) };
    if (recent != null && positions.some(([, p]) => !p[0] && p[1] === 0)) frame.recent = recent;
    const presence = streams.filter((s) => s.startsWith("group:") && withPresence(s));
    return presence.length ? { ...frame, presence } : frame;
  }

  /**
   * A resume ack: each stream's position goes in after what is held of it (it goes out when the
   * stream is released), and a `recovered` event says how each went. @returns {object} the entries
   */
  resumeAck(ack, streams) {
    const entries = ack.streams !== null && typeof ack.streams === "object" ? ack.streams : {};
    for (const stream of streams) {
      const entry = entries[stream];
      if (entry === null || typeof entry !== "object") continue;
      this._emit("recovered", { ...entry, stream });
      if (placed(entry)) this._put(stream, { kind: "mark", epoch: entry.epoch, offset: entry.offset, frame: null });
    }
    return entries;
  }

  _put(stream, item) {
    const h = this._held.get(stream);
    if (!h) return this._process(stream, item);
    let lo = 0, hi = h.items.length; // after every item not above it: a mark after its message
    while (lo < hi) { const mid = (lo + hi) >> 1; if (before(h.items[mid], item)) lo = mid + 1; else hi = mid; }
    h.items.splice(lo, 0, item);
    if (++this._heldCount > this.maxHold) { // bounded: the lowest of this stream goes out now
      this._heldCount -= 1;
      this._process(stream, h.items.shift());
    }
  }

  _process(stream, item) {
    const p = this._positions.get(stream);
    const newer = !p || p[0] !== item.epoch || item.offset > p[1];
    if (newer) this._positions.set(stream, [item.epoch, item.offset]);
    if (item.kind === "message" ? newer : item.kind === "gap") this._emit(item.kind, item.frame);
  }
}
