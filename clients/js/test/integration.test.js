// The client against a real 3-node cluster (see test/cluster.js for where it comes from).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";

import { WsclusterClient, ServerError } from "../wscluster.js";
import { getCluster } from "./cluster.js";
import { waitFor, once } from "./fake.js";

let cluster;
const clients = [];
const tag = () => Math.random().toString(36).slice(2, 10);

before(async () => { cluster = await getCluster(); }, { timeout: 60000 });

after(async () => {
  for (const c of clients) c.close();
  await cluster?.stop();
});

/** A connected client that records every message and presence event in `inbox`. */
async function client(urls, options = {}, connect = true) {
  const c = new WsclusterClient(urls, { backoffBase: 50, backoffCap: 500, requestTimeout: 5000, ...options });
  c.inbox = [];
  c.on("message", (f) => c.inbox.push(f));
  c.on("presence", (f) => c.inbox.push(f));
  c.on("gap", (f) => c.inbox.push(f));
  c.on("recovered", (e) => c.inbox.push({ type: "recovered", ...e }));
  clients.push(c);
  if (connect) await c.connect();
  return c;
}

const received = (c, pred, what = "a frame") => waitFor(() => c.inbox.find(pred), 5000, what);
/** The messages `c` got on a stream (`to`), and what they carry. */
const on = (c, to) => c.inbox.filter((f) => f.type === "message" && f.to === to);
const ns = (c, to) => on(c, to).map((f) => f.data?.n ?? f.data);
const range = (a, b) => Array.from({ length: b - a }, (_, i) => a + i);

async function api(i, path, body) {
  const r = await fetch(cluster.api[i] + path, body === undefined ? {} : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  });
  assert.equal(r.status, 200, `${path}: HTTP ${r.status}`);
  return r.json();
}

test("private messages both ways between nodes", { timeout: 20000 }, async () => {
  const [ua, ub] = [`a-${tag()}`, `b-${tag()}`];
  const a = await client(cluster.ws[0], { uid: ua });
  const b = await client(cluster.ws[1], { uid: ub });
  assert.notEqual(a.node, b.node);
  assert.equal(a.uid, ua);
  assert.equal((await a.send(`uid:${ub}`, { text: "hi b" })).type, "ack");
  const m1 = await received(b, (f) => f.type === "message" && f.data?.text === "hi b");
  assert.equal(m1.to, `uid:${ub}`);
  assert.deepEqual(m1.from, { uid: ua, client_id: a.clientId });
  await b.send(`uid:${ua}`, { text: "hi a" });
  const m2 = await received(a, (f) => f.type === "message" && f.data?.text === "hi a");
  assert.deepEqual(m2.from, { uid: ub, client_id: b.clientId });
});

test("a group with presence events across nodes; presence queries", { timeout: 20000 }, async () => {
  const g = `room-${tag()}`;
  const [ua, ub] = [`a-${tag()}`, `b-${tag()}`];
  const a = await client(cluster.ws[0], { uid: ua });
  const b = await client(cluster.ws[1], { uid: ub });
  await a.join(g, { presence: true });
  await b.join(g);
  assert.deepEqual([...a.groups], [[g, true]]);
  const joined = await received(a, (f) => f.type === "presence" && f.event === "join", "presence join");
  assert.deepEqual(joined, { type: "presence", group: g, event: "join", uid: ub, client_id: b.clientId });

  await a.send(`group:${g}`, "hello room");
  const m = await received(b, (f) => f.type === "message" && f.data === "hello room");
  assert.equal(m.to, `group:${g}`);

  let group; // read from the shared store: allow it a moment to catch up
  for (let i = 0; i < 50; i++) {
    group = await b.presence(`group:${g}`);
    if (group.count === 2) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.equal(group.count, 2);
  assert.deepEqual([...group.uids].sort(), [ua, ub].sort());
  assert.equal((await b.presence(`uid:${ua}`)).online, true);
  assert.equal((await b.presence(`uid:nobody-${tag()}`)).online, false);

  await b.leave(g);
  assert.equal(b.groups.size, 0);
  const left = await received(a, (f) => f.type === "presence" && f.event === "leave", "presence leave");
  assert.equal(left.uid, ub);
});

test("a broadcast from the HTTP API reaches every node", { timeout: 20000 }, async () => {
  const a = await client(cluster.ws[0], { uid: `a-${tag()}` });
  const b = await client(cluster.ws[1]); // no uid: still in `all`
  const marker = tag();
  assert.deepEqual(await api(1, "/api/send", { to: "all", data: { marker } }), { ok: true });
  for (const c of [a, b]) {
    const m = await received(c, (f) => f.type === "message" && f.data?.marker === marker);
    assert.equal(m.from, null);
    assert.equal(m.to, "all");
  }
});

test("errors: bad address, send before login, unknown type", { timeout: 20000 }, async () => {
  const a = await client(cluster.ws[0], { uid: `a-${tag()}` });
  const err = await a.send("nowhere", 1).catch((e) => e);
  assert.ok(err instanceof ServerError);
  assert.equal(err.code, "bad_request");
  const anon = await client(cluster.ws[1]);
  assert.equal(anon.uid, null);
  const err2 = await anon.send(`uid:x-${tag()}`, 1).catch((e) => e);
  assert.ok(err2 instanceof ServerError);
  assert.equal(err2.code, "not_logged_in");
  assert.equal((await a.request({ type: "frobnicate" }).catch((e) => e)).code, "unknown_type");
  // the connections are still usable, and a login works later on
  assert.equal((await anon.ping()).type, "pong");
  const uid = `late-${tag()}`;
  assert.equal((await anon.login({ uid })).uid, uid);
  assert.equal(anon.uid, uid);
  assert.equal((await anon.send(`uid:${uid}`, "me")).type, "ack");
  await received(anon, (f) => f.type === "message" && f.data === "me");
});

test("a kick (close 4001 from the API) is terminal", { timeout: 20000 }, async () => {
  const uid = `k-${tag()}`;
  const k = await client(cluster.ws[1], { uid });
  const dropped = once(k, "disconnected");
  const closed = once(k, "closed");
  assert.deepEqual(await api(0, "/api/close", { to: `uid:${uid}` }), { ok: true });
  assert.equal((await dropped).willRetry, false);
  assert.equal((await closed).code, 4001);
  assert.equal(k.state, "closed");
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(k.state, "closed");
  assert.equal(k.reconnects, 0);
});

test("join+leave and login+logout sent together: the client ends where the server is", { timeout: 20000 }, async () => {
  // a join is acked once it holds cluster-wide, a leave at once: their acks cross
  const uid = `o-${tag()}`;
  const c = await client(cluster.ws[0], { uid });
  const groups = Array.from({ length: 5 }, () => `rapid-${tag()}`);
  for (const g of groups) await Promise.all([c.join(g), c.leave(g)]);
  assert.deepEqual([...c.groups], []);
  for (const g of groups) { // and the cluster's presence agrees: the leave came last
    const ack = await c.presence(`group:${g}`);
    assert.equal(ack.count, 0, g);
  }
  await Promise.all([c.login({ uid: `o2-${tag()}` }), c.logout()]);
  assert.equal(c.uid, null);
  const kept = `kept-${tag()}`;
  await Promise.all([c.leave(kept), c.join(kept)]);
  assert.deepEqual([...c.groups], [[kept, false]]);
  // what is replayed after a reconnect is the server's view too (close 4000: not terminal)
  const back = once(c, "reconnected", 10000);
  assert.deepEqual(await api(1, "/api/close", { to: `client:${c.clientId}`, code: 4000 }), { ok: true });
  await back;
  assert.equal(c.uid, null);
  assert.deepEqual([...c.groups], [[kept, false]]);
  assert.equal((await c.presence(`group:${kept}`)).count, 1);
  const rejoined = async () => (await Promise.all(groups.map((g) => c.presence(`group:${g}`)))).some((p) => p.count > 0);
  for (let i = 0; i < 20 && (await rejoined()); i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(await rejoined(), false); // the new connection did not re-join what was left
});

// -- history (the cluster has the HISTORY rules of test/cluster.js) ------------------------

test("a client away while its group and uid get messages resumes on another node: each once, in order", { timeout: 30000 }, async (t) => {
  const g = `hist-${tag()}`;
  const [ur, us] = [`r-${tag()}`, `s-${tag()}`];
  const [G, U] = [`group:${g}`, `uid:${ur}`];
  const r = await client(cluster.ws[0], { uid: ur, backoffBase: 1500, backoffCap: 1500 });
  await r.join(g, { presence: true });
  const s = await client(cluster.ws[1], { uid: us });
  const sendBoth = async (n) => { await s.send(G, { n }); await s.send(U, { n }); };
  for (let n = 0; n < 3; n++) await sendBoth(n);
  await waitFor(() => ns(r, G).length === 3 && ns(r, U).length === 3, 5000, "the first messages");
  const before = r.node;
  t.mock.method(Math, "random", () => 0.999); // the first retry waits about 1.5 s
  const dropped = once(r, "disconnected");
  const reconnected = once(r, "reconnected", 20000);
  r.urls = [cluster.ws[2]]; // it comes back on the third node
  assert.deepEqual(await api(0, "/api/close", { to: `client:${r.clientId}`, code: 4000 }), { ok: true });
  await dropped;
  t.mock.restoreAll();
  let away = 0;
  for (let n = 3; n < 13; n++) { await sendBoth(n); if (r.state !== "open") away += 1; }
  await reconnected;
  for (let n = 13; n < 16; n++) await sendBoth(n);
  await waitFor(() => ns(r, G).length >= 16 && ns(r, U).length >= 16, 10000, "every message");
  await new Promise((resolve) => setTimeout(resolve, 200)); // a duplicate would come now
  assert.ok(away >= 5, `only ${away} rounds were sent while the client was away`);
  assert.notEqual(r.node, before);
  assert.equal(r.url, cluster.ws[2]);
  for (const stream of [G, U]) {
    assert.deepEqual(ns(r, stream), range(0, 16), stream); // exactly once, in order
    const offsets = on(r, stream).map((f) => f.offset);
    assert.deepEqual(offsets, range(offsets[0], offsets[0] + 16), stream);
    assert.equal(new Set(on(r, stream).map((f) => f.epoch)).size, 1);
    const rec = r.inbox.find((f) => f.type === "recovered" && f.stream === stream);
    assert.equal(rec?.recovered, true, JSON.stringify(rec));
    assert.ok(rec.replayed >= 1, JSON.stringify(rec));
    assert.deepEqual(r.positions()[stream], [on(r, stream)[0].epoch, offsets.at(-1)]);
  }
  assert.deepEqual([...r.groups], [[g, true]]);
  assert.equal(r.inbox.filter((f) => f.type === "gap").length, 0);
});

test("offline delivery: uid messages sent while it had no connection come with its stored positions", { timeout: 30000 }, async () => {
  const ua = `off-${tag()}`;
  const U = `uid:${ua}`;
  const a = await client(cluster.ws[0], { uid: ua });
  const s = await client(cluster.ws[1], { uid: `s-${tag()}` });
  await s.send(U, "seen");
  await received(a, (f) => f.data === "seen");
  const stored = JSON.parse(JSON.stringify(a.positions())); // as a page keeps them in localStorage
  assert.deepEqual(Object.keys(stored), [U]);
  a.close();
  for (let i = 0; i < 50 && (await s.presence(U)).online; i++) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal((await s.presence(U)).online, false);
  for (let n = 0; n < 5; n++) await s.send(U, { n });
  const back = await client(cluster.ws[2], { uid: ua, positions: stored }, false);
  await back.connect();
  await waitFor(() => ns(back, U).length >= 5, 5000, "the offline messages");
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.deepEqual(ns(back, U), range(0, 5));
  const rec = back.inbox.find((f) => f.type === "recovered");
  assert.deepEqual([rec.stream, rec.recovered, rec.replayed], [U, true, 5]);
  // a new device without positions asks for everything retained
  const fresh = await client(cluster.ws[1], { uid: ua });
  const ack = await fresh.resume({ [U]: [null, 0] });
  assert.equal(ack.streams[U].replayed, 6, JSON.stringify(ack));
  assert.deepEqual(ns(fresh, U), ["seen", ...range(0, 5)]);
  assert.deepEqual(fresh.positions()[U], back.positions()[U]);
});

test("resume() joins a group and replays it; a wrong epoch is recovered: false, epoch_changed", { timeout: 20000 }, async () => {
  const g = `replay-${tag()}`;
  const G = `group:${g}`;
  const s = await client(cluster.ws[1], { uid: `s-${tag()}` });
  for (let n = 0; n < 3; n++) await s.send(G, { n }); // nobody is in it: kept in its history only
  const c = await client(cluster.ws[0], { uid: `c-${tag()}` });
  const ack = await c.resume({ [G]: ["no-such-epoch", 1] }, { presence: [G] });
  const entry = ack.streams[G];
  assert.deepEqual([entry.recovered, entry.reason, entry.replayed], [false, "epoch_changed", 3], JSON.stringify(ack));
  assert.deepEqual(ns(c, G), [0, 1, 2]); // out before resume() resolved
  assert.deepEqual(c.inbox.find((f) => f.type === "recovered"), { type: "recovered", stream: G, ...entry });
  assert.deepEqual([...c.groups], [[g, true]]);
  const joined = received(c, (f) => f.type === "presence" && f.event === "join", "presence join");
  const d = await client(cluster.ws[2], { uid: `d-${tag()}` });
  await d.join(g);
  await joined;
  await d.send(G, { n: 3 });
  await waitFor(() => ns(c, G).length === 4, 5000, "the live message");
  assert.deepEqual(c.positions()[G], [entry.epoch, entry.offset + 1]);
});

// Last: it kills the third node for good.
test("a killed node: the client moves to the next URL with its uid and groups", { timeout: 30000 }, async () => {
  const [dead, live] = [cluster.ws[2], cluster.ws[0]];
  const stats = await api(0, "/api/stats");
  const victim = stats.nodes.find((n) => n.ws_port === Number(new URL(dead).port));
  assert.ok(victim?.pid, `no node with port ${new URL(dead).port} in ${JSON.stringify(stats)}`);
  const g = `team-${tag()}`;
  const [ur, us] = [`r-${tag()}`, `s-${tag()}`];
  const r = await client([dead, live], { uid: ur });
  await r.join(g, { presence: true });
  const s = await client(cluster.ws[1], { uid: us });
  assert.equal(r.url, dead);
  const before = { node: r.node, clientId: r.clientId };
  const reconnected = once(r, "reconnected", 20000);
  process.kill(victim.pid, "SIGKILL");
  const welcome = await reconnected;
  assert.equal(r.state, "open");
  assert.equal(r.url, live);
  assert.equal(welcome.node, r.node);
  assert.notEqual(r.node, before.node);
  assert.notEqual(r.clientId, before.clientId);
  assert.equal(r.uid, ur);
  assert.deepEqual([...r.groups], [[g, true]]);
  assert.equal(r.reconnects, 1);
  await s.send(`group:${g}`, "to the team");
  await s.send(`uid:${ur}`, "to you");
  await received(r, (f) => f.type === "message" && f.data === "to the team" && f.from?.uid === us);
  await received(r, (f) => f.type === "message" && f.data === "to you" && f.to === `uid:${ur}`);
});
