// wscluster-client: the events of a client (on, off). See README.md ("Events") beside it.

export class Emitter {
  constructor() { this._listeners = new Map(); }

  /** @param {string} event @param {(arg: any) => void} fn @returns {() => void} unsubscribe */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /** @param {string} event @param {(arg: any) => void} fn */
  off(event, fn) { this._listeners.get(event)?.delete(fn); }

  /** Call every listener of `event`; one that throws breaks nothing (`listenerError`). */
  _emit(event, arg) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try { fn.call(this, arg); } catch (error) {
        if (event !== "listenerError" && this._listeners.get("listenerError")?.size) this._emit("listenerError", { event, error });
        else console.error(`wscluster: a "${event}" listener threw`, error);
      }
    }
  }
}
