// Unit tests of wscluster.js against an in-memory fake WebSocket (test/fake.js).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  WsclusterClient, ServerError, ConnectionClosed, backoffDelay, retryHint, TERMINAL_CLOSE_CODES, STABLE_SESSION_MS,
} from "../wscluster.js";
import { FakeCluster, sleep, waitFor, once } from "./fake.js";

const FAST = { backoffBase: 1, backoffCap: 5 };

function setup(urls = "ws://a/ws", options = {}) {
  const cluster = new FakeCluster();
  const client = new WsclusterClient(urls, { WebSocket: cluster.WebSocket, ...FAST, ...options });
  return { cluster, client };
}

test("exports", () => {
  assert.deepEqual([...TERMINAL_CLOSE_CODES], [1008, 4001]);
  assert.ok(new ServerError("x", "y") instanceof Error);
  assert.ok(new ConnectionClosed(1000) instanceof Error);
});

test("backoffDelay stays within [0, min(cap, base * 2**n))", () => {
  assert.equal(backoffDelay(0, 200, 10000, () => 0), 0);
  assert.equal(backoffDelay(0, 200, 10000, () => 0.5), 100);
  assert.equal(backoffDelay(3, 200, 10000, () => 0.5), 800);
  assert.equal(backoffDelay(6, 200, 10000, () => 0.5), 5000);
  assert.equal(backoffDelay(7, 200, 10000, () => 0.5), 5000);   // 25600 capped at 10000
  assert.equal(backoffDelay(1000, 200, 10000, () => 0.5), 5000); // no overflow
  for (let n = 0; n < 40; n++) {
    for (let i = 0; i < 50; i++) {
      const d = backoffDelay(n, 200, 10000);
      assert.ok(d >= 0 && d < Math.min(10000, 200 * 2 ** n), `${n}: ${d}`);
    }
  }
});

test("retryHint reads {retry_ms} and nothing else", () => {
  assert.equal(retryHint('{"retry_ms": 500}'), 500);
  assert.equal(retryHint('{"retry_ms": 1e9}'), 60000);
  for (const r of ["", "going away", "[1]", '{"retry_ms": -1}', '{"retry_ms": "5"}', "null"]) {
    assert.equal(retryHint(r), null, r);
  }
});

test("connect resolves with the welcome, logs in, sets the properties", async () => {
  const { cluster, client } = setup("ws://a/ws", { uid: "alice" });
  const states = [];
  client.on("state", (s) => states.push(s));
  assert.equal(client.state, "idle");
  const welcome = await client.connect();
  assert.equal(welcome.type, "welcome");
  assert.deepEqual(cluster.last.sent, [{ type: "login", uid: "alice", id: 1 }]);
  assert.equal(client.state, "open");
  assert.equal(client.uid, "alice");
  assert.equal(client.clientId, welcome.client_id);
  assert.equal(client.node, "ws://a/ws");
  assert.equal(client.url, "ws://a/ws");
  assert.deepEqual(states, ["connecting", "open"]);
  assert.equal(await client.connect(), welcome); // already open
  client.close();
});

test("token login frame; requests before connect() reject", async () => {
  const { cluster, client } = setup("ws://a/ws", { token: "T" });
  await assert.rejects(client.ping(), ConnectionClosed);
  await client.connect();
  assert.deepEqual(cluster.last.sent[0], { type: "login", token: "T", id: 1 });
  client.close();
});

test("replies are matched by id, in any order", async () => {
  const { cluster, client } = setup();
  const held = [];
  cluster.handler = (frame) => { held.push(frame); return null; };
  await client.connect();
  const p1 = client.request({ type: "custom", n: 1 });
  const p2 = client.ping();
  const p3 = client.send("uid:bob", { text: "hi" });
  await waitFor(() => held.length === 3);
  assert.deepEqual(held.map((f) => f.id), [1, 2, 3]);
  assert.deepEqual(held[2], { type: "send", to: "uid:bob", data: { text: "hi" }, id: 3 });
  const sock = cluster.last;
  sock.push({ type: "pong", id: 2 });
  sock.push({ type: "ack", id: 3, which: "send" });
  sock.push({ type: "ack", id: 1, which: "custom" });
  assert.deepEqual(await p1, { type: "ack", id: 1, which: "custom" });
  assert.deepEqual(await p2, { type: "pong", id: 2 });
  assert.deepEqual(await p3, { type: "ack", id: 3, which: "send" });
  client.close();
});

test("an error reply rejects with ServerError carrying code and frame", async () => {
  const { client } = setup("ws://a/ws", { uid: "u" });
  await client.connect();
  const err = await client.send("nonsense", 1).catch((e) => e);
  assert.ok(err instanceof ServerError);
  assert.equal(err.code, "bad_request");
  assert.equal(err.frame.message, "bad address");
  assert.equal(err.id, err.frame.id);
  client.close();
});

test("no answer: ServerError timeout; late answers are dropped", async () => {
  const { cluster, client } = setup("ws://a/ws", { requestTimeout: 50 });
  await client.connect();
  cluster.handler = () => null;
  const seen = [];
  for (const e of ["error", "message", "presence"]) client.on(e, (f) => seen.push(f));
  const err = await client.ping().catch((e) => e);
  assert.ok(err instanceof ServerError);
  assert.equal(err.code, "timeout");
  cluster.last.push({ type: "pong", id: 1 });
  cluster.last.push({ type: "error", id: 1, code: "internal", message: "late" });
  await sleep(10);
  assert.deepEqual(seen, []);
  client.close();
});

test("pushed frames become events; unsolicited errors are 'error' events", async () => {
  const { cluster, client } = setup();
  await client.connect();
  const got = { message: [], presence: [], error: [] };
  for (const e of Object.keys(got)) client.on(e, (f) => got[e].push(f));
  const msg = { type: "message", to: "all", from: null, data: [1], ts: 1 };
  const pres = { type: "presence", group: "g", event: "join", uid: "b", client_id: "x" };
  const unsolicited = { type: "error", id: null, code: "bad_json", message: "?" };
  const foreign = { type: "error", id: "abc", code: "bad_request", message: "?" };
  for (const f of [msg, pres, unsolicited, foreign, { type: "ack", id: 999 }]) cluster.last.push(f);
  assert.deepEqual(got, { message: [msg], presence: [pres], error: [unsolicited, foreign] });
  client.close();
});

test("garbage frames are ignored", async () => {
  const { cluster, client } = setup();
  await client.connect();
  const events = [];
  for (const e of ["message", "presence", "error", "welcome", "frame"]) client.on(e, (f) => events.push([e, f]));
  for (const junk of ["not json", "[1,2]", "null", "42", '"text"', "{", new ArrayBuffer(4), undefined]) {
    cluster.last.push(junk);
  }
  assert.deepEqual(events, []);
  assert.equal((await client.ping()).type, "pong");
  client.close();
});

test("listener exceptions are isolated", async (t) => {
  const { cluster, client } = setup();
  await client.connect();
  const received = [];
  const reported = [];
  client.on("message", () => { throw new Error("boom"); });
  client.on("message", (f) => received.push(f));
  const off = client.on("listenerError", (e) => reported.push(e));
  cluster.last.push({ type: "message", to: "all", from: null, data: 1, ts: 1 });
  assert.equal(received.length, 1);
  assert.equal(reported[0].event, "message");
  assert.equal(reported[0].error.message, "boom");
  off();
  const logged = t.mock.method(console, "error", () => {});
  cluster.last.push({ type: "message", to: "all", from: null, data: 2, ts: 2 });
  assert.equal(received.length, 2);
  assert.equal(logged.mock.callCount(), 1);
  assert.equal((await client.ping()).type, "pong");
  client.close();
});

test("in-flight requests reject with ConnectionClosed when the link drops", async () => {
  const { cluster, client } = setup();
  await client.connect();
  cluster.handler = () => null;
  const p = client.send("uid:x", 1);
  cluster.last.drop(1006, "");
  const err = await p.catch((e) => e);
  assert.ok(err instanceof ConnectionClosed);
  assert.equal(err.code, 1006);
  client.close();
});

test("reconnect replays login then every join, then releases waiting requests", async () => {
  const { cluster, client } = setup("ws://a/ws", { uid: "alice" });
  await client.connect();
  await client.join("g1", { presence: true });
  await client.join("g2");
  await client.join("gone");
  await client.leave("gone");
  assert.deepEqual(cluster.last.sent.slice(1, 4).map((f) => f.presence), [true, undefined, undefined]);
  const events = [];
  for (const e of ["disconnected", "welcome", "reconnected", "state"]) client.on(e, (a) => events.push(e === "state" ? a : e));
  const first = cluster.last;
  first.drop(1006, "");
  assert.equal(client.state, "reconnecting");
  const queued = client.send("group:g1", "after"); // waits for the restored session
  const reconnected = await once(client, "reconnected");
  assert.notEqual(cluster.last, first);
  assert.deepEqual(cluster.last.sent.map(({ id, ...f }) => f), [
    { type: "login", uid: "alice" },
    { type: "join", group: "g1", presence: true },
    { type: "join", group: "g2" },
    { type: "send", to: "group:g1", data: "after" },
  ]);
  assert.equal((await queued).type, "ack");
  assert.equal(reconnected.client_id, client.clientId);
  assert.deepEqual(events, ["reconnecting", "disconnected", "welcome", "open", "reconnected"]);
  assert.equal(client.reconnects, 1);
  assert.equal(client.uid, "alice");
  assert.deepEqual([...client.groups], [["g1", true], ["g2", false]]);
  client.close();
});

test("a refused re-join is forgotten and reported; logout is not replayed", async () => {
  const { cluster, client } = setup("ws://a/ws", { uid: "alice" });
  await client.connect();
  await client.join("ok");
  await client.join("banned");
  await client.logout();
  assert.equal(client.uid, null);
  cluster.handler = (f) => f.group === "banned"
    ? { type: "error", id: f.id, code: "forbidden", message: "no" }
    : { type: "ack", id: f.id };
  const errors = [];
  client.on("error", (f) => errors.push(f.code));
  cluster.last.drop(1011, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.last.sent.map((f) => f.type), ["join", "join"]);
  assert.deepEqual([...client.groups.keys()], ["ok"]);
  assert.deepEqual(errors, ["forbidden"]);
  client.close();
});

test("a refused re-login ends the client", async () => {
  const { cluster, client } = setup("ws://a/ws", { uid: "alice" });
  await client.connect();
  cluster.handler = (f) => ({ type: "error", id: f.id, code: "forbidden", message: "no" });
  cluster.last.drop(1001, "");
  const closed = await once(client, "closed");
  assert.equal(client.state, "closed");
  assert.match(closed.reason, /session setup failed: forbidden/);
  await assert.rejects(client.ping(), ConnectionClosed);
});

test("requests waiting for the link are bounded and time out", async () => {
  const { cluster, client } = setup("ws://a/ws", { maxWaiting: 2, requestTimeout: 80, maxHandshakeRetries: 1000 });
  await client.connect();
  cluster.down.add("ws://a/ws");
  cluster.last.drop(1006, "");
  const a = client.ping();
  const b = client.ping();
  const c = await client.ping().catch((e) => e);
  assert.ok(c instanceof ServerError);
  assert.equal(c.code, "overloaded");
  for (const p of [a, b]) assert.equal((await p.catch((e) => e)).code, "timeout");
  client.close();
});

for (const code of TERMINAL_CLOSE_CODES) {
  test(`close code ${code} is terminal`, async () => {
    const { cluster, client } = setup();
    await client.connect();
    const pending = client.request({ type: "slow" });
    cluster.handler = () => null;
    const dis = once(client, "disconnected");
    const closed = once(client, "closed");
    cluster.last.drop(code, "bye");
    assert.deepEqual(await dis, { code, reason: "bye", willRetry: false, delayMs: null });
    assert.deepEqual(await closed, { code, reason: "bye" });
    assert.equal(client.state, "closed");
    await pending.catch(() => {});
    await sleep(30);
    assert.equal(cluster.sockets.length, 1);
    await assert.rejects(client.connect(), ConnectionClosed);
  });
}

test("reconnect: false makes every drop terminal", async () => {
  const { cluster, client } = setup("ws://a/ws", { reconnect: false });
  await client.connect();
  const closed = once(client, "closed");
  cluster.last.drop(1012, "");
  await closed;
  await sleep(20);
  assert.equal(cluster.sockets.length, 1);
});

test("close(): no reconnect, pending and waiting requests reject", async () => {
  const { cluster, client } = setup();
  await client.connect();
  cluster.handler = () => null;
  const inflight = client.ping();
  const closed = once(client, "closed");
  client.close();
  assert.deepEqual(await closed, { code: 1000, reason: "closed by the client" });
  assert.ok((await inflight.catch((e) => e)) instanceof ConnectionClosed);
  assert.equal(cluster.last.closedByClient, 1000);
  await sleep(20);
  assert.equal(cluster.sockets.length, 1);
  client.close(); // idempotent
});

test("1012 with retry_ms waits about that long before the first retry", async () => {
  const { cluster, client } = setup("ws://a/ws", { backoffBase: 20, backoffCap: 1000 });
  await client.connect();
  const dis = once(client, "disconnected");
  const dropped = Date.now();
  cluster.last.drop(1012, '{"retry_ms": 150}');
  const info = await dis;
  assert.ok(info.willRetry && info.delayMs >= 150 && info.delayMs < 170, `delay ${info.delayMs}`);
  await once(client, "reconnected");
  const waited = cluster.created[1].at - dropped;
  assert.ok(waited >= 145 && waited < 400, `waited ${waited} ms`);
  client.close();
});

test("handshake-retry cap: attempts without a welcome give up", async () => {
  const { cluster, client } = setup("ws://a/ws", { maxHandshakeRetries: 3 });
  await client.connect();
  cluster.welcome = null; // opens, never welcomes: the fake closes it below
  cluster.down.add("ws://a/ws");
  const disconnects = [];
  client.on("disconnected", (d) => disconnects.push(d.willRetry));
  cluster.last.drop(1006, "");
  const closed = await once(client, "closed");
  assert.equal(cluster.sockets.length, 1 + 4); // 1 + (1 try + 3 retries)
  assert.deepEqual(disconnects, [true, true, true, true, false]);
  assert.match(closed.reason, /gave up after 4 attempts/);
});

test("initial connect gives up with ConnectionClosed; no welcome in time counts too", async () => {
  const { cluster, client } = setup("ws://a/ws", { maxHandshakeRetries: 2, requestTimeout: 30 });
  cluster.welcome = null; // sockets open but stay silent: the handshake timer drops them
  const err = await client.connect().catch((e) => e);
  assert.ok(err instanceof ConnectionClosed);
  assert.equal(cluster.sockets.length, 3);
  assert.equal(client.state, "closed");
});

test("several URLs: rotate on failures, back to urls[0] after a welcome", async () => {
  const urls = ["ws://a/ws", "ws://b/ws", "ws://c/ws"];
  const { cluster, client } = setup(urls);
  cluster.down.add("ws://a/ws");
  await client.connect();
  assert.equal(client.url, "ws://b/ws");
  assert.equal(client.node, "ws://b/ws");
  cluster.down.add("ws://b/ws");
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.equal(client.url, "ws://c/ws");
  cluster.down.clear();
  cluster.last.drop(1001, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.created.map((c) => c.url.slice(5, 6)), ["a", "b", "a", "b", "c", "a"]);
  assert.equal(client.reconnects, 2);
  client.close();
});

test("on() returns an unsubscribe function; off() works too", async () => {
  const { cluster, client } = setup();
  await client.connect();
  let n = 0;
  const fn = () => n++;
  const off = client.on("message", fn);
  cluster.last.push({ type: "message", data: 1 });
  off();
  cluster.last.push({ type: "message", data: 2 });
  client.on("message", fn);
  client.off("message", fn);
  cluster.last.push({ type: "message", data: 3 });
  assert.equal(n, 1);
  client.close();
});

test("a token login is not replayed when the handshake authenticated", async () => {
  const { cluster, client } = setup("ws://a/ws", { token: "T" });
  await client.connect();
  assert.equal(client.uid, "from-token");
  cluster.welcome = (sock) => ({ type: "welcome", client_id: "c2", node: sock.url, uid: "jwt-user", heartbeat: 25 });
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.last.sent, []);
  assert.equal(client.uid, "jwt-user");
  client.close();
});

test("a transient refusal during the session setup retries on the next URL", async () => {
  const { cluster, client } = setup(["ws://a/ws", "ws://b/ws"], { uid: "alice" });
  await client.connect();
  let refusals = 1;
  cluster.handler = (f) => f.type === "login" && refusals-- > 0
    ? { type: "error", id: f.id, code: "unavailable", message: "broker down" }
    : { type: "ack", id: f.id, uid: f.uid };
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.created.map((c) => c.url), ["ws://a/ws", "ws://a/ws", "ws://b/ws"]);
  assert.equal(client.state, "open");
  client.close();
});

test("requests from a 'disconnected' listener on a terminal close reject cleanly", async () => {
  const { cluster, client } = setup();
  await client.connect();
  let attempt;
  client.on("disconnected", () => { attempt = client.ping(); });
  cluster.last.drop(4001, "kicked");
  assert.ok((await attempt.catch((e) => e)) instanceof ConnectionClosed);
});

test("connect() while reconnecting resolves once the session is back", async () => {
  const { cluster, client } = setup();
  await client.connect();
  cluster.last.drop(1006, "");
  const welcome = await client.connect();
  assert.equal(client.state, "open");
  assert.equal(welcome, client.welcome);
  assert.equal(client.reconnects, 1);
  client.close();
});

// -- regressions found by review ---------------------------------------------------------

for (const event of ["disconnected", "state", "welcome"]) {
  test(`close() from a '${event}' listener stops for good: no new socket, nothing after 'closed'`, async () => {
    const { cluster, client } = setup("ws://a/ws", { uid: "u" });
    await client.connect();
    const seen = [];
    for (const e of ["welcome", "reconnected", "closed"]) client.on(e, () => seen.push(e));
    client.on(event, () => client.close());
    cluster.last.drop(1006, "");
    await waitFor(() => client.state === "closed" && seen.includes("closed"), 2000, "closed");
    await sleep(50);
    const expectedSockets = event === "welcome" ? 2 : 1;
    assert.equal(cluster.sockets.length, expectedSockets);
    assert.ok(cluster.sockets.every((s) => s.readyState !== 1), "a socket was left open");
    assert.equal(seen.at(-1), "closed", seen.join(","));
    assert.equal(client.reconnects, 0);
  });
}

test("a server that welcomes (and takes the login) then closes at once: the backoff grows", async (t) => {
  t.mock.method(Math, "random", () => 0.999); // each delay is the whole backoff window
  const { cluster, client } = setup("ws://a/ws", { uid: "u", backoffBase: 10, backoffCap: 80, maxHandshakeRetries: 1000 });
  await client.connect();
  const handler = cluster.handler;
  cluster.handler = (f, sock) => { setTimeout(() => sock.drop(1011, ""), 5); return handler(f, sock); }; // after the ack
  const delays = [];
  client.on("disconnected", (d) => delays.push(Math.round(d.delayMs)));
  cluster.last.drop(1011, "");
  await waitFor(() => delays.length >= 6, 3000, "6 drops");
  client.close();
  assert.deepEqual(delays.slice(0, 6), [10, 20, 40, 80, 80, 80]);
  assert.ok(client.reconnects >= 4); // the sessions were restored: the backoff still grew
});

test("a session that lasted STABLE_SESSION_MS restarts the backoff from its base", async (t) => {
  t.mock.method(Math, "random", () => 0.999);
  const realNow = Date.now;
  let offset = 0;
  t.mock.method(Date, "now", () => realNow() + offset);
  const { cluster, client } = setup("ws://a/ws", { backoffBase: 10, backoffCap: 1000 });
  await client.connect();
  const delays = [];
  client.on("disconnected", (d) => delays.push(Math.round(d.delayMs)));
  for (let i = 0; i < 3; i++) { // short sessions: 10, 20, 40
    const back = once(client, "reconnected");
    cluster.last.drop(1006, "");
    await back;
  }
  offset += STABLE_SESSION_MS; // this one stayed up long enough
  const back = once(client, "reconnected");
  cluster.last.drop(1006, "");
  await back;
  assert.deepEqual(delays, [10, 20, 40, 10]);
  client.close();
});

test("welcomes whose login never completes count towards maxHandshakeRetries", async () => {
  const { cluster, client } = setup("ws://a/ws", { uid: "u", maxHandshakeRetries: 3 });
  await client.connect();
  cluster.handler = (f, sock) => { setTimeout(() => sock.drop(1013, "try later"), 1); return null; };
  cluster.last.drop(1006, "");
  const closed = await once(client, "closed");
  assert.equal(cluster.sockets.length, 1 + 4);
  assert.match(closed.reason, /gave up after 4 attempts without a session/);
});

test("join/leave and login/logout acks out of order: the last request wins", async () => {
  const { cluster, client } = setup("ws://a/ws", { uid: "u" });
  await client.connect();
  const held = [];
  cluster.handler = (f) => { held.push(f); return null; };
  const sock = cluster.last;
  const answer = (type) => { const f = held.find((h) => h.type === type); sock.push({ type: "ack", id: f.id, uid: f.uid }); };
  const join = client.join("g", { presence: true });
  const leave = client.leave("g");
  const login = client.login({ uid: "v" });
  const logout = client.logout();
  await waitFor(() => held.length === 4);
  answer("leave"); answer("join"); // the server applied join then leave: not in g
  answer("logout"); answer("login"); // logged in then out: no uid
  await Promise.all([join, leave, login, logout]);
  assert.deepEqual([...client.groups], []);
  assert.equal(client.uid, null);
  // and the other way round
  held.length = 0;
  const p = [client.leave("h"), client.join("h"), client.logout(), client.login({ uid: "w" })];
  await waitFor(() => held.length === 4);
  for (const f of held) sock.push({ type: "ack", id: f.id, uid: f.uid });
  await Promise.all(p);
  assert.deepEqual([...client.groups], [["h", false]]);
  assert.equal(client.uid, "w");
  assert.equal(client._ops.size, 0);
  cluster.handler = (await import("./fake.js")).defaultHandler;
  sock.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.last.sent.map(({ id, ...f }) => f), [{ type: "login", uid: "w" }, { type: "join", group: "h" }]);
  client.close();
});

test("a failed later request leaves the earlier acked one in force", async () => {
  const { cluster, client } = setup();
  await client.connect();
  cluster.handler = (f) => f.type === "leave"
    ? { type: "error", id: f.id, code: "unavailable", message: "x" } : { type: "ack", id: f.id };
  const [joined, left] = await Promise.allSettled([client.join("g"), client.leave("g")]);
  assert.equal(joined.status, "fulfilled");
  assert.equal(left.status, "rejected");
  assert.deepEqual([...client.groups.keys()], ["g"]);
  client.close();
});

test("urls can be replaced: the next attempt uses the new list", async () => {
  const { cluster, client } = setup("ws://a/ws");
  assert.deepEqual(client.urls, ["ws://a/ws"]);
  await client.connect();
  client.urls = ["ws://a/ws", "ws://b/ws"];
  assert.throws(() => { client.urls = []; }, TypeError);
  cluster.down.add("ws://a/ws");
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.equal(client.url, "ws://b/ws");
  client.urls = "ws://c/ws";
  assert.deepEqual(client.urls, ["ws://c/ws"]);
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.equal(client.url, "ws://c/ws");
  client.close();
});

test("200 forced reconnects leave no pending entry, timer, listener or open socket behind", async () => {
  const timers = () => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
  await sleep(10); // the previous test's fake sockets finish closing
  const before = timers();
  const { cluster, client } = setup(["ws://a/ws", "ws://b/ws"], { uid: "u", requestTimeout: 5000 });
  await client.connect();
  await client.join("g1", { presence: true });
  await client.join("g2");
  const settled = [];
  for (let i = 0; i < 200; i++) {
    const silent = i % 3 === 0; // pings go unanswered: in flight when the link drops
    cluster.handler = silent ? (f) => (f.type === "ping" ? null : { type: "ack", id: f.id, uid: f.uid }) : (await import("./fake.js")).defaultHandler;
    settled.push(client.ping().catch(() => {}));
    const back = once(client, "reconnected");
    if (i % 5 === 0) cluster.down.add("ws://a/ws"); // some attempts fail before the welcome
    cluster.last.drop(i % 2 ? 1006 : 1012, i % 2 ? "" : '{"retry_ms": 0}');
    settled.push(client.ping().catch(() => {}), client.send("group:g1", i).catch(() => {})); // they wait
    if (i % 5 === 0) setTimeout(() => cluster.down.clear(), 2);
    await back;
  }
  cluster.handler = (await import("./fake.js")).defaultHandler;
  await Promise.all(settled);
  assert.equal(client.reconnects, 200);
  assert.equal(client._link.pending.size, 0);
  assert.equal(client._waiting.length, 0);
  assert.equal(client._openWaiters.length, 0);
  assert.equal(client._ops.size, 0);
  assert.ok([...client._listeners.values()].every((set) => set.size === 0));
  assert.ok(cluster.sockets.slice(0, -1).every((s) => s.readyState === 3 && !s.onmessage && !s.onclose));
  assert.deepEqual([...client.groups.keys()], ["g1", "g2"]);
  client.close();
  await sleep(10);
  assert.equal(timers(), before);
});

test("close() while connecting: connect() rejects, the socket is closed, no retry", async () => {
  const { cluster, client } = setup("ws://a/ws", { uid: "u" });
  const first = client.connect();
  const second = client.connect(); // twice: both settle the same way
  assert.equal(cluster.sockets.length, 1);
  client.close();
  for (const p of [first, second]) assert.ok((await p.catch((e) => e)) instanceof ConnectionClosed);
  await sleep(30);
  assert.equal(cluster.sockets.length, 1);
  assert.equal(cluster.last.closedByClient, 1000);
  assert.equal(client.state, "closed");
});

test("1012 hints: huge is capped, negative or not JSON is ignored, other codes ignore it", async (t) => {
  t.mock.method(Math, "random", () => 0); // the backoff part is 0: delayMs is the hint alone
  const { cluster, client } = setup("ws://a/ws", { maxHandshakeRetries: 100 });
  await client.connect();
  const cases = [
    [1012, '{"retry_ms": 1e12}', 60000], [1012, '{"retry_ms": -5}', 0], [1012, "retry_ms=5", 0],
    [1012, '{"retry_ms": 30}', 30], [1013, '{"retry_ms": 500}', 0],
  ];
  for (const [code, reason, expected] of cases) {
    const dis = once(client, "disconnected");
    cluster.last.drop(code, reason);
    assert.equal((await dis).delayMs, expected, `${code} ${reason}`);
    if (expected > 1000) { // do not wait a minute: retry now
      clearTimeout(client._retryTimer);
      client._attempt();
    }
    await once(client, "reconnected");
  }
  client.close();
});
