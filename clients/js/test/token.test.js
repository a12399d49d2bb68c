// The token in the handshake: offered as the subprotocol "bearer.<token>" beside
// "wscluster.v1" (a browser cannot set headers, and a URL ends up in access logs). Unit tests
// on the fake WebSocket, then against a real JWT node when WSCLUSTER_TEST_JWT names one
// (JSON {"ws": url, "secret": HS256 secret}; tests/cluster/test_js_client.py starts it).
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";

import { WsclusterClient, ConnectionClosed } from "../wscluster.js";
import { FakeCluster, once } from "./fake.js";

const FAST = { backoffBase: 1, backoffCap: 5 };
const JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"; // shaped like one

function setup(options = {}) {
  const cluster = new FakeCluster();
  const client = new WsclusterClient("ws://a/ws", { WebSocket: cluster.WebSocket, ...FAST, ...options });
  return { cluster, client };
}

test("a token goes in the handshake as the subprotocol bearer.<token>, never in the URL", async () => {
  const { cluster, client } = setup({ token: JWT });
  await client.connect();
  assert.equal(cluster.last.url, "ws://a/ws");
  assert.deepEqual(cluster.last.protocols, ["wscluster.v1", `bearer.${JWT}`]);
  // an anonymous node (welcome without uid) still gets the login frame
  assert.deepEqual(cluster.last.sent[0], { type: "login", token: JWT, id: 1 });
  client.close();
});

test("a reconnect's handshake carries the latest token (login({token}) replaces it)", async () => {
  const { cluster, client } = setup({ token: JWT });
  await client.connect();
  await client.login({ token: `${JWT}x` });
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.last.protocols, ["wscluster.v1", `bearer.${JWT}x`]);
  await client.logout();
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.equal(cluster.last.protocols, undefined); // logged out: no token to send
  client.close();
});

test("no subprotocol without a token, with a uid, or with handshakeToken: false", async () => {
  for (const options of [{}, { uid: "alice" }, { token: JWT, handshakeToken: false }]) {
    const { cluster, client } = setup(options);
    await client.connect();
    assert.equal(cluster.last.protocols, undefined, JSON.stringify(options));
    client.close();
  }
  const { cluster, client } = setup({ handshakeToken: false });
  await client.connect();
  await client.login({ token: JWT }); // the old way: only in the login frame
  assert.deepEqual(cluster.last.sent.at(-1), { type: "login", token: JWT, id: 1 });
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.equal(cluster.last.protocols, undefined);
  client.close();
});

test("handshakeToken: a token for the handshake only (no login frame; a uid login may follow)", async () => {
  const { cluster, client } = setup({ handshakeToken: JWT });
  await client.connect();
  assert.deepEqual(cluster.last.protocols, ["wscluster.v1", `bearer.${JWT}`]);
  assert.deepEqual(cluster.last.sent, []);
  assert.equal(client.uid, null); // the fake is anonymous: the welcome names no uid
  await client.login({ uid: "alice" }); // e.g. a page on an anonymous cluster: pick a name
  cluster.last.drop(1006, "");
  await once(client, "reconnected");
  assert.deepEqual(cluster.last.protocols, ["wscluster.v1", `bearer.${JWT}`]);
  assert.deepEqual(cluster.last.sent.map((f) => f.type), ["login"]);
  client.close();
  for (const bad of [1, {}, []]) {
    assert.throws(() => setup({ handshakeToken: bad }), TypeError, String(bad));
  }
});

test("a token a subprotocol cannot carry goes only in the login frame", async () => {
  for (const token of ["has space", "semi;colon", "comma,", "é", ""]) {
    const { cluster, client } = setup({ token });
    await client.connect();
    assert.equal(cluster.last.protocols, undefined, token);
    assert.deepEqual(cluster.last.sent[0], { type: "login", token, id: 1 });
    client.close();
  }
});

// -- against a real JWT node ----------------------------------------------------------------

const node = process.env.WSCLUSTER_TEST_JWT ? JSON.parse(process.env.WSCLUSTER_TEST_JWT) : null;
const skip = node ? false : "no JWT node (WSCLUSTER_TEST_JWT)";
const b64 = (v) => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");

function sign(sub, ttl = 60) {
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, iat: now, exp: now + ttl })}`;
  return `${input}.${createHmac("sha256", node.secret).update(input).digest("base64url")}`;
}

/** The WebSocket class, recording what each handshake was given. */
function recorder(made) {
  return class extends globalThis.WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      made.push({ url: String(url), protocols, ws: this });
    }
  };
}

test("a JWT node takes the token from the subprotocol and selects wscluster.v1", { skip, timeout: 20000 }, async () => {
  const sub = `js-${Math.random().toString(36).slice(2, 10)}`;
  const token = sign(sub);
  const made = [];
  const client = new WsclusterClient(node.ws, { token, WebSocket: recorder(made), ...FAST });
  try {
    const welcome = await client.connect();
    assert.equal(welcome.uid, sub); // authenticated at the handshake
    assert.equal(client.uid, sub);
    assert.equal(made.length, 1);
    assert.equal(made[0].url, node.ws);
    assert.ok(!made[0].url.includes(token) && !made[0].url.includes("token="));
    assert.deepEqual(made[0].protocols, ["wscluster.v1", `bearer.${token}`]);
    assert.equal(made[0].ws.protocol, "wscluster.v1"); // selected; the token is never echoed
    assert.equal((await client.ping()).type, "pong");
  } finally {
    client.close();
  }
});

test("handshakeToken alone: the welcome names the token's subject", { skip, timeout: 20000 }, async () => {
  const sub = `hs-${Math.random().toString(36).slice(2, 10)}`;
  const client = new WsclusterClient(node.ws, { handshakeToken: sign(sub), ...FAST });
  try {
    assert.equal((await client.connect()).uid, sub);
    assert.equal(client.uid, sub);
  } finally {
    client.close();
  }
});

test("a JWT node refuses a bad token, and a client that keeps it out of the handshake", { skip, timeout: 20000 }, async () => {
  for (const options of [{ token: sign("late", -60) }, { token: sign("old-way"), handshakeToken: false }]) {
    // Node 20's WebSocket reports a refused handshake (401) with an error but no close event:
    // the client gives up when no welcome came in time (requestTimeout); a browser closes (1006)
    const client = new WsclusterClient(node.ws, { ...options, maxHandshakeRetries: 0, requestTimeout: 1500, ...FAST });
    await assert.rejects(client.connect(), ConnectionClosed);
    assert.equal(client.state, "closed");
  }
});
