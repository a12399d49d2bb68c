// An in-memory stand-in for a wscluster cluster, reached through an injected WebSocket class.

/** One fake socket; the test drives the "server" side through its methods. */
class FakeSocket {
  constructor(url, cluster, protocols) {
    this.url = url;
    this.protocols = protocols; // as the client passed them (undefined: none)
    this.protocol = [].concat(protocols ?? []).includes("wscluster.v1") ? "wscluster.v1" : ""; // selected
    this.cluster = cluster;
    this.readyState = 0;
    this.sent = [];            // frames the client sent, parsed
    this.closedByClient = null;
    cluster.sockets.push(this);
    cluster.created.push({ url, protocols, at: Date.now() });
    setTimeout(() => {
      if (this.readyState !== 0) return;
      if (cluster.down.has(url)) return this.drop(1006, "");
      this.readyState = 1;
      this.onopen?.({});
      if (cluster.welcome) this.push(cluster.welcome(this));
    }, 0);
  }

  send(text) {
    if (this.readyState === 0) throw new Error("InvalidStateError: still connecting");
    if (this.readyState !== 1) return;
    const frame = JSON.parse(text);
    this.sent.push(frame);
    this.cluster.log.push({ url: this.url, frame });
    const reply = this.cluster.handler(frame, this);
    if (reply) setTimeout(() => this.push(reply), 0);
  }

  close(code, reason = "") {
    if (this.readyState >= 2) return;
    this.closedByClient = code ?? 1005;
    this.readyState = 2;
    setTimeout(() => this.drop(code ?? 1005, reason), 0);
  }

  // -- server side --
  /** Deliver a frame (an object is JSON-encoded; a string or anything else goes as is). */
  push(frame) {
    if (this.readyState !== 1) return;
    const data = frame !== null && typeof frame === "object" && !(frame instanceof ArrayBuffer) ? JSON.stringify(frame) : frame;
    this.onmessage?.({ data });
  }

  /** The link ends with this close code and reason. */
  drop(code = 1006, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
}

/** Answers like an anonymous-mode node: login → ack with uid, ping → pong, else ack. */
export function defaultHandler(frame) {
  if (frame.id === undefined) return null;
  if (frame.type === "ping") return { type: "pong", id: frame.id };
  if (frame.type === "login") return { type: "ack", id: frame.id, uid: frame.uid ?? "from-token" };
  if (frame.type === "send" && !String(frame.to).includes(":") && frame.to !== "all") {
    return { type: "error", id: frame.id, code: "bad_request", message: "bad address" };
  }
  return { type: "ack", id: frame.id };
}

export class FakeCluster {
  constructor() {
    this.sockets = [];
    this.created = [];
    this.log = [];
    this.down = new Set();     // URLs whose connections close (1006) before opening
    this.handler = defaultHandler;
    let n = 0;
    this.welcome = (sock) => ({ type: "welcome", client_id: `${sock.url}.${++n}`, node: sock.url, uid: null, heartbeat: 25 });
    const cluster = this;
    this.WebSocket = class extends FakeSocket {
      constructor(url, protocols) { super(url, cluster, protocols); }
    };
  }

  /** The newest socket. */
  get last() { return this.sockets[this.sockets.length - 1]; }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolve once predicate() is truthy (polled), reject after timeoutMs. */
export async function waitFor(predicate, timeoutMs = 2000, what = "condition") {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** The next emission of `event` on client. */
export function once(client, event, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no "${event}" event in ${timeoutMs} ms`)); }, timeoutMs);
    const off = client.on(event, (arg) => { clearTimeout(timer); off(); resolve(arg); });
  });
}
