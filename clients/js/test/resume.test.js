// Unit tests of the history rules of wscluster.js (positions, duplicates, resume, hold) against
// the in-memory fake WebSocket (test/fake.js); the fake node answers what each test says.
import { test } from "node:test";
import assert from "node:assert/strict";

import { WsclusterClient, MAX_HOLD, isPosition } from "../wscluster.js";
import { FakeCluster, defaultHandler, sleep, waitFor, once } from "./fake.js";

const FAST = { backoffBase: 1, backoffCap: 5 };
const E = "e1c0";

function setup(options = {}) {
  const cluster = new FakeCluster();
  const client = new WsclusterClient("ws://a/ws", { WebSocket: cluster.WebSocket, ...FAST, ...options });
  client.got = [];
  for (const event of ["message", "recovered", "gap", "error"]) client.on(event, (f) => client.got.push([event, f]));
  return { cluster, client };
}

const msg = (to, offset, epoch = E, data = offset) => ({ type: "message", to, from: { uid: "x", client_id: "c" }, data, ts: 1, offset, epoch });
/** What the client delivered, compactly: "message to offset", "gap to offset", "recovered stream …". */
function seen(client) {
  return client.got.map(([event, f]) => (event === "message" ? `${f.to} ${f.offset ?? f.data}`
    : event === "gap" ? `gap ${f.stream} ${f.offset}`
      : event === "recovered" ? `recovered ${f.stream} ${f.error ?? `${f.recovered} ${f.reason ?? ""}`.trim()}`
        : `error ${f.code}`));
}
/** Push these frames to the socket, in order, after the current event (like a node would). */
const later = (sock, ...frames) => setTimeout(() => frames.forEach((f) => sock.push(f)), 0);
const sentOf = (sock, type) => sock.sent.filter((f) => f.type === type).map(({ id, ...f }) => f);

test("isPosition and MAX_HOLD", () => {
  for (const p of [[E, 0], [null, 0], ["", 0], [E, 2 ** 40]]) assert.ok(isPosition(p), JSON.stringify(p));
  for (const p of [[E], [E, -1], [E, 1.5], [1, 1], [E, "3"], null, "x", [E, 1, 2]]) assert.ok(!isPosition(p), JSON.stringify(p));
  assert.equal(MAX_HOLD, 10000);
  assert.throws(() => new WsclusterClient("ws://a/ws", { WebSocket: class {}, positions: { "uid:a": [E] } }), TypeError);
  assert.throws(() => new WsclusterClient("ws://a/ws", { WebSocket: class {}, positions: { "client:a": [E, 1] } }), TypeError);
});

test("messages: in order, duplicates (same epoch, offset not above) dropped, positions kept", async () => {
  const { cluster, client } = setup();
  await client.connect();
  const sock = cluster.last;
  for (const f of [msg("group:g", 1), msg("group:g", 2), msg("group:g", 2), msg("group:g", 1), msg("uid:u", 7),
    msg("group:g", 4), msg("group:g", 3), { type: "message", to: "all", from: null, data: "x", ts: 1 }]) sock.push(f);
  assert.deepEqual(seen(client), ["group:g 1", "group:g 2", "uid:u 7", "group:g 4", "all x"]);
  assert.deepEqual(client.positions(), { "group:g": [E, 4], "uid:u": [E, 7] });
  const copy = client.positions();
  copy["group:g"][1] = 99; // a copy: the client's own stays
  assert.deepEqual(client.positions()["group:g"], [E, 4]);
  client.close();
});

test("a new epoch is taken: its offsets start again", async () => {
  const { cluster, client } = setup({ positions: { "group:g": [E, 40] } });
  await client.connect();
  const sock = cluster.last;
  for (const f of [msg("group:g", 40), msg("group:g", 41), msg("group:g", 1, "9f31"), msg("group:g", 2, "9f31"), msg("group:g", 2, "9f31")]) sock.push(f);
  assert.deepEqual(seen(client), ["group:g 41", "group:g 1", "group:g 2"]);
  assert.deepEqual(client.positions(), { "group:g": ["9f31", 2] });
  client.close();
});

test("join and login acks give a position only when none is known; leave forgets it", async () => {
  const { cluster, client } = setup({ positions: { "uid:alice": [E, 3] } });
  cluster.handler = (f) => (f.type === "leave" ? defaultHandler(f) : { ...defaultHandler(f), epoch: E, offset: 50 });
  await client.connect();
  await client.login({ uid: "alice" });
  await client.join("g");
  await client.join("h");
  cluster.handler = defaultHandler; // no history for k: no position
  await client.join("k");
  assert.deepEqual(client.positions(), { "uid:alice": [E, 3], "group:g": [E, 50], "group:h": [E, 50] });
  await client.leave("h");
  assert.deepEqual(Object.keys(client.positions()), ["uid:alice", "group:g"]);
  client.close();
});

test("reconnect: login, one resume (uid and positioned groups, presence listed), then plain joins", async () => {
  const { cluster, client } = setup({ uid: "alice" });
  cluster.handler = (f) => (f.type === "join" && f.group === "plain" ? defaultHandler(f) : { ...defaultHandler(f), epoch: E, offset: 5 });
  await client.connect();
  await client.join("g1", { presence: true });
  await client.join("plain", { presence: true });
  await client.join("g3");
  assert.deepEqual(sentOf(cluster.last, "resume"), []); // a login ack's position is not resumed on its link
  cluster.last.push(msg("group:g3", 9));
  const resumes = [];
  cluster.handler = (f) => {
    if (f.type !== "resume") return defaultHandler(f);
    resumes.push(f);
    const streams = Object.fromEntries(Object.entries(f.streams).map(([s, p]) => [s, { recovered: true, epoch: E, offset: p[1], replayed: 0 }]));
    return { type: "ack", id: f.id, streams };
  };
  cluster.last.drop(1006, "");
  const queued = client.send("group:g1", "after");
  await once(client, "reconnected");
  await queued;
  assert.deepEqual(cluster.last.sent.map(({ id, ...f }) => f), [
    { type: "login", uid: "alice" },
    { type: "resume", streams: { "uid:alice": [E, 5], "group:g1": [E, 5], "group:g3": [E, 9] }, presence: ["group:g1"] },
    { type: "join", group: "plain", presence: true },
    { type: "send", to: "group:g1", data: "after" },
  ]);
  assert.deepEqual([...client.groups], [["g1", true], ["plain", true], ["g3", false]]);
  assert.deepEqual(seen(client).slice(1), ["recovered uid:alice true", "recovered group:g1 true", "recovered group:g3 true"]);
  client.close();
});

test("hold and sort: from the welcome to the resume ack, then in offset order without duplicates", async () => {
  const { cluster, client } = setup({ uid: "alice", positions: { "uid:alice": [E, 5] } });
  let deliveredAtAck = null;
  client.on("recovered", () => { deliveredAtAck ??= seen(client).filter((s) => s.startsWith("uid:")).length; });
  cluster.handler = (f, sock) => {
    if (f.type === "login") { // live messages right after the login, before the resume is answered
      later(sock, { type: "ack", id: f.id, uid: "alice" }, msg("uid:alice", 10), msg("uid:alice", 11));
      return null;
    }
    if (f.type !== "resume") return defaultHandler(f);
    assert.deepEqual(f.streams, { "uid:alice": [E, 5] });
    later(sock, msg("uid:alice", 6), msg("uid:alice", 8), msg("uid:alice", 7), msg("uid:alice", 9), msg("uid:alice", 10),
      msg("group:other", 1), // not resumed: not held
      { type: "ack", id: f.id, streams: { "uid:alice": { recovered: true, epoch: E, offset: 11, replayed: 5 } } },
      msg("uid:alice", 11), msg("uid:alice", 12));
    return null;
  };
  await client.connect();
  await waitFor(() => seen(client).includes("uid:alice 12"));
  assert.deepEqual(seen(client), ["group:other 1", "recovered uid:alice true",
    ...[6, 7, 8, 9, 10, 11, 12].map((n) => `uid:alice ${n}`)]);
  assert.equal(deliveredAtAck, 0); // nothing of the stream went out before the ack
  assert.deepEqual(client.positions()["uid:alice"], [E, 12]);
  client.close();
});

test("resume with a changed epoch: recovered false, the new epoch's messages delivered", async () => {
  const { cluster, client } = setup({ uid: "alice", positions: { "uid:alice": [E, 41] } });
  cluster.handler = (f, sock) => {
    if (f.type !== "resume") return defaultHandler(f);
    later(sock, msg("uid:alice", 2, "9f31"), msg("uid:alice", 1, "9f31"),
      { type: "ack", id: f.id, streams: { "uid:alice": { recovered: false, reason: "epoch_changed", epoch: "9f31", offset: 2, replayed: 2 } } },
      msg("uid:alice", 2, "9f31"), msg("uid:alice", 3, "9f31"));
    return null;
  };
  const recovered = once(client, "recovered");
  await client.connect();
  assert.deepEqual(await recovered, { stream: "uid:alice", recovered: false, reason: "epoch_changed", epoch: "9f31", offset: 2, replayed: 2 });
  await waitFor(() => seen(client).includes("uid:alice 3"));
  assert.deepEqual(seen(client), ["recovered uid:alice false epoch_changed", "uid:alice 1", "uid:alice 2", "uid:alice 3"]);
  assert.deepEqual(client.positions(), { "uid:alice": ["9f31", 3] });
  client.close();
});

test("the hold is bounded: beyond maxHold the lowest held go out, still in order", async () => {
  const { cluster, client } = setup({ uid: "alice", positions: { "uid:alice": [E, 0] }, maxHold: 50 });
  let early = -1;
  client.on("recovered", () => { early = client.got.filter(([e]) => e === "message").length; });
  cluster.handler = (f, sock) => {
    if (f.type === "login") { // three live ones first, then the replay of 1..100 in order
      later(sock, { type: "ack", id: f.id, uid: "alice" }, ...[101, 102, 103].map((n) => msg("uid:alice", n)));
      return null;
    }
    if (f.type !== "resume") return defaultHandler(f);
    later(sock, ...Array.from({ length: 100 }, (_, i) => msg("uid:alice", i + 1)),
      { type: "ack", id: f.id, streams: { "uid:alice": { recovered: true, epoch: E, offset: 103, replayed: 100 } } });
    return null;
  };
  await client.connect();
  await waitFor(() => client.got.length === 104);
  const offsets = client.got.filter(([e]) => e === "message").map(([, f]) => f.offset);
  assert.deepEqual(offsets, Array.from({ length: 103 }, (_, i) => i + 1));
  assert.equal(early, 103 - 50); // out before the ack: all but the 50 held
  client.close();
});

test("no resume ack in time: what was held goes out in order, the next link resumes from there", async () => {
  const { cluster, client } = setup({ uid: "alice", positions: { "uid:alice": [E, 5] }, requestTimeout: 80 });
  const resumes = [];
  cluster.handler = (f, sock) => {
    if (f.type !== "resume") return defaultHandler(f);
    resumes.push(f.streams["uid:alice"]);
    if (resumes.length === 1) { later(sock, msg("uid:alice", 7), msg("uid:alice", 6)); return null; } // never acked
    return { type: "ack", id: f.id, streams: { "uid:alice": { recovered: true, epoch: E, offset: 7, replayed: 0 } } };
  };
  const dropped = once(client, "disconnected");
  await client.connect();
  assert.match((await dropped).reason, /session setup failed: timeout/);
  assert.deepEqual(resumes, [[E, 5], [E, 7]]);
  assert.deepEqual(seen(client), ["uid:alice 6", "uid:alice 7", "recovered uid:alice true"]);
  assert.equal(cluster.sockets.length, 2);
  client.close();
});

test("gap frames: an event, and the position moves past it (in order when held)", async () => {
  const { cluster, client } = setup({ uid: "alice" });
  await client.connect();
  const sock = cluster.last;
  const gap = { type: "gap", stream: "uid:alice", epoch: E, offset: 90, reason: "lost" };
  for (const f of [msg("uid:alice", 80), gap, msg("uid:alice", 90), msg("uid:alice", 91)]) sock.push(f);
  assert.deepEqual(seen(client), ["uid:alice 80", "gap uid:alice 90", "uid:alice 91"]);
  assert.deepEqual(client.got[1][1], gap);
  // held during a resume: the gap goes out between the messages around its offset
  client.got.length = 0;
  cluster.handler = (f, s) => {
    if (f.type !== "resume") return defaultHandler(f);
    later(s, msg("uid:alice", 95), { ...gap, offset: 93 }, msg("uid:alice", 92), msg("uid:alice", 93),
      { type: "ack", id: f.id, streams: { "uid:alice": { recovered: true, epoch: E, offset: 95, replayed: 3 } } });
    return null;
  };
  sock.drop(1006, "");
  await once(client, "reconnected");
  await waitFor(() => client.got.length === 5);
  assert.deepEqual(seen(client), ["recovered uid:alice true", "uid:alice 92", "uid:alice 93", "gap uid:alice 93", "uid:alice 95"]);
  client.close();
});

test("resume(): explicit positions or [null, 0], held until the ack, groups joined and resumed later", async () => {
  const { cluster, client } = setup({ uid: "alice" });
  await client.connect();
  let sock = cluster.last;
  cluster.handler = (f) => (f.type === "resume" ? null : defaultHandler(f));
  const acked = client.resume({ "uid:alice": [null, 0], "group:r": [E, 3], "group:q": null }, { presence: ["group:r"] });
  await waitFor(() => sentOf(sock, "resume").length === 1);
  assert.deepEqual(sentOf(sock, "resume"), [{ type: "resume",
    streams: { "uid:alice": [null, 0], "group:r": [E, 3], "group:q": [null, 0] }, presence: ["group:r"] }]);
  const id = sock.sent.at(-1).id;
  for (const f of [msg("group:r", 5), msg("group:r", 4), msg("uid:alice", 1)]) sock.push(f);
  assert.deepEqual(seen(client), []); // held
  sock.push({ type: "ack", id, streams: {
    "uid:alice": { recovered: true, epoch: E, offset: 1, replayed: 1 },
    "group:r": { recovered: false, reason: "too_old", epoch: E, offset: 5, replayed: 2 },
    "group:q": { error: "forbidden" },
  } });
  assert.deepEqual((await acked).id, id);
  assert.deepEqual(seen(client), ["recovered uid:alice true", "recovered group:r false too_old", "recovered group:q forbidden",
    "uid:alice 1", "group:r 4", "group:r 5"]);
  assert.deepEqual([...client.groups], [["r", true]]); // q was refused: not joined
  assert.deepEqual(client.positions(), { "uid:alice": [E, 1], "group:r": [E, 5] });
  await assert.rejects(client.resume({ "client:x": null }), TypeError);
  await assert.rejects(client.resume({ "group:r": [E] }), TypeError);
  // after a reconnect: resumed from where it is
  cluster.handler = (f) => (f.type === "resume"
    ? { type: "ack", id: f.id, streams: Object.fromEntries(Object.keys(f.streams).map((s) => [s, { recovered: true }])) }
    : defaultHandler(f));
  sock.drop(1006, "");
  await once(client, "reconnected");
  sock = cluster.last;
  assert.deepEqual(sentOf(sock, "resume"), [{ type: "resume", streams: { "uid:alice": [E, 1], "group:r": [E, 5] }, presence: ["group:r"] }]);
  client.close();
});

test("a group refused at the reconnect's resume is forgotten and reported", async () => {
  const { cluster, client } = setup({ uid: "alice", positions: { "group:ok": [E, 1], "group:banned": [E, 1] } });
  await client.connect();
  await client.join("ok");
  await client.join("banned");
  cluster.handler = (f) => (f.type === "resume" ? { type: "ack", id: f.id, streams: {
    "group:ok": { recovered: true, epoch: E, offset: 1, replayed: 0 }, "group:banned": { error: "forbidden" } } } : defaultHandler(f));
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual([...client.groups.keys()], ["ok"]);
  assert.deepEqual(seen(client), ["recovered group:ok true", "recovered group:banned forbidden", "error forbidden"]);
  assert.equal(client.positions()["group:banned"], undefined);
  client.close();
});

test("a node that refuses the resume frame itself: the groups are joined plainly", async () => {
  const { cluster, client } = setup({ uid: "alice", positions: { "uid:alice": [E, 2], "group:g": [E, 1] } });
  cluster.handler = (f) => (f.type === "resume" ? { type: "error", id: f.id, code: "unknown_type", message: "?" } : defaultHandler(f));
  await client.connect();
  await client.join("g", { presence: true });
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.last.sent.map((f) => f.type), ["login", "resume", "join"]);
  assert.deepEqual(cluster.last.sent[2].presence, true);
  assert.equal(client.state, "open");
  client.close();
});

test("a link that drops during the hold delivers what it held, in order, before reconnecting", async () => {
  const { cluster, client } = setup({ uid: "alice", positions: { "uid:alice": [E, 0] } });
  await client.connect(); // the fake acks the first resume with no streams: nothing recovered
  cluster.handler = (f, sock) => {
    if (f.type !== "resume") return defaultHandler(f);
    later(sock, msg("uid:alice", 2), msg("uid:alice", 1));
    setTimeout(() => sock.drop(1006, ""), 5);
    return null;
  };
  const order = [];
  client.on("message", (f) => order.push(f.offset));
  client.on("disconnected", () => order.push("disconnected"));
  cluster.last.drop(1006, "");
  await waitFor(() => order.filter((x) => x === "disconnected").length === 2);
  assert.deepEqual(order.slice(0, 4), ["disconnected", 1, 2, "disconnected"]);
  client.close();
  await sleep(10);
});

test("carbons count in the sender's uid stream; send({carbon}) and resume({recent}) frames", async () => {
  const { cluster, client } = setup({ recent: 5 });
  cluster.handler = (f) => (f.type === "resume"
    ? { type: "ack", id: f.id, streams: Object.fromEntries(Object.keys(f.streams).map((s) => [s, { recovered: true, replayed: 0, epoch: E, offset: 0 }])) }
    : defaultHandler(f));
  await client.connect();
  const sock = cluster.last;
  const carbon = (offset) => ({ ...msg("uid:bob", offset), from: { uid: "alice", client_id: "c" }, carbon: true });
  for (const f of [msg("uid:alice", 1), carbon(2), carbon(2), msg("uid:bob", 2)]) sock.push(f);
  assert.deepEqual(seen(client), ["uid:alice 1", "uid:bob 2", "uid:bob 2"]);
  assert.deepEqual(client.positions(), { "uid:alice": [E, 2], "uid:bob": [E, 2] });
  await client.send("uid:bob", "hi", { carbon: true });
  await client.send("uid:bob", "plain");
  assert.deepEqual(sentOf(sock, "send"), [{ type: "send", to: "uid:bob", data: "hi", carbon: true }, { type: "send", to: "uid:bob", data: "plain" }]);
  await client.resume({ "group:r": [null, 0] });
  await client.resume({ "group:q": [E, 3] });
  await client.resume({ "group:p": [null, 0] }, { recent: 2 });
  assert.deepEqual(sentOf(sock, "resume").map((f) => f.recent), [5, undefined, 2]);
  assert.throws(() => new WsclusterClient("ws://a/ws", { WebSocket: class {}, recent: 0 }), TypeError);
  client.close();
});
