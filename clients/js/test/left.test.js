// Unit tests of the `left` frame (a login whose token no longer allows a joined group) against
// the in-memory fake WebSocket (test/fake.js).
import { test } from "node:test";
import assert from "node:assert/strict";

import { WsclusterClient } from "../wscluster.js";
import { FakeCluster, defaultHandler, once, waitFor } from "./fake.js";

const FAST = { backoffBase: 1, backoffCap: 5 };

function setup(options = {}) {
  const cluster = new FakeCluster();
  const client = new WsclusterClient("ws://a/ws", { WebSocket: cluster.WebSocket, ...FAST, ...options });
  return { cluster, client };
}

const positioned = (f) => (f.type === "join" ? { type: "ack", id: f.id, epoch: "e", offset: 4 } : defaultHandler(f));

test("left: an event; the group and its position are forgotten, not re-joined nor resumed", async () => {
  const { cluster, client } = setup({ token: "T1" });
  cluster.handler = positioned;
  await client.connect();
  await client.join("ab", { presence: true });
  await client.join("ac");
  assert.deepEqual(client.positions(), { "group:ab": ["e", 4], "group:ac": ["e", 4] });
  const events = [];
  client.on("left", (f) => events.push(f));
  // the server's answer to a narrower token: `left` before the login's ack
  cluster.handler = (f) => {
    if (f.type !== "login") return defaultHandler(f);
    const sock = cluster.last;
    setTimeout(() => sock.push({ type: "left", group: "ab", reason: "forbidden" }), 0);
    return { type: "ack", id: f.id, uid: "from-token" }; // pushed after it
  };
  await client.login({ token: "T2" });
  assert.deepEqual(events, [{ type: "left", group: "ab", reason: "forbidden" }]);
  assert.deepEqual([...client.groups], [["ac", false]]);
  assert.deepEqual(client.positions(), { "group:ac": ["e", 4] });
  cluster.handler = defaultHandler;
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.last.sent.map(({ id, ...f }) => f), [
    { type: "login", token: "T2" },
    { type: "resume", streams: { "group:ac": ["e", 4] } },
  ]);
  client.close();
});

test("left overtakes a join of the group still in flight", async () => {
  const { cluster, client } = setup({ uid: "u" });
  await client.connect();
  const held = [];
  cluster.handler = (f) => { held.push(f); return null; };
  const sock = cluster.last;
  const join = client.join("g");
  const other = client.join("h");
  await waitFor(() => held.length === 2);
  sock.push({ type: "left", group: "g", reason: "forbidden" }); // the join was acked, then left
  for (const f of held) sock.push({ type: "ack", id: f.id });
  await Promise.all([join, other]);
  assert.deepEqual([...client.groups], [["h", false]]);
  assert.equal(client._ops.size, 0);
  cluster.handler = defaultHandler;
  await client.join("g"); // a later join is not affected
  assert.deepEqual([...client.groups].map(([g]) => g).sort(), ["g", "h"]);
  client.close();
});

test("a malformed left is only an event", async () => {
  const { cluster, client } = setup({ uid: "u" });
  await client.connect();
  await client.join("g");
  const events = [];
  client.on("left", (f) => events.push(f));
  cluster.last.push({ type: "left", group: 7 });
  await waitFor(() => events.length === 1);
  assert.deepEqual([...client.groups], [["g", false]]);
  client.close();
});
