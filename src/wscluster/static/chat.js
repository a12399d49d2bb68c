// The wscluster chat page: rooms, private chats, who is online, system messages.
// Text that comes from the network is only ever put into the page with textContent, and names
// and messages sit in isolates (<bdi>, or FSI…PDI in plain text) so that right-to-left marks in
// them cannot reorder the text around them.
import { WsclusterClient } from "./wscluster.js";
import { $, bdi, el, isolate, textOf, timeOf } from "./view.js";
import { nodeChooser } from "./nodes.js";
import { LOBBY, roomWatcher } from "./rooms.js";
import { forgetTab, givenName, savedRooms, savePositions, saveRooms, tabPositions, token } from "./store.js";

const MAX_ITEMS = 500; // messages kept per conversation (and shown at once)
const RECENT = 50; // messages a reload or a new tab shows again per room and of the uid's stream

// Where this page was loaded from: "/" on a node, or "/n/2/" behind nginx (pinned to node 2).
// Fallbacks, tried when that node is gone: nginx's /ws, or the other nodes' ports (nodes.json).
// The token (JWT clusters) goes in the handshake as a subprotocol, never in a URL (URLs get logged).
const base = location.pathname.replace(/[^/]*$/, "");
const wsScheme = location.protocol === "https:" ? "wss:" : "ws:";
const own = `${wsScheme}//${location.host}${base}ws`;
const client = new WsclusterClient(base === "/" ? [own] : [own, `${wsScheme}//${location.host}/ws`],
  { maxHandshakeRetries: 30, handshakeToken: token || undefined }); // a few minutes: a browser sees a refused handshake only as 1006
const convs = new Map(); // key ("room:x", "dm:bob", "system") -> conversation
let me = null, current = null, toastTimer = 0;
let byToken = false; // me comes from the token (the welcome), not from a login by name
let welcomed = false, lostNoted = false; // a welcome since the last drop; its loss was noted
let refused = null; // why the cluster refused this page (it needs a token), once known
let rewinding = false; // the page's first resume (the recent messages) is being answered
const loadNodes = nodeChooser({
  client, base, own, wsScheme, token, identity: () => ({ me, byToken }), rooms: () => savedRooms(),
  positions: () => (me ? tabPositions(me, client.positions()) : ""),
});
const { watchRoom, unwatch, refreshRoom, renderOnline } = roomWatcher({
  client, convs, add, conv, open, current: () => current, me: () => me,
});

// --- rendering --------------------------------------------------------------------------

function conv(key, kind, name) {
  let c = convs.get(key);
  if (!c) {
    const prefix = kind === "room" ? "# " : kind === "dm" ? "@ " : "";
    c = { key, kind, name, prefix, items: [], unread: 0, at: Date.now(), members: null, soon: 0, late: 0 };
    convs.set(key, c);
    renderConvs();
  }
  return c;
}
const titleOf = (c) => (c.kind === "system" ? ["System"] : [c.prefix, bdi(c.name)]);

function add(c, item) {
  c.items.push(item);
  if (c.items.length > MAX_ITEMS) c.items.shift();
  c.at = Date.now();
  if (c === current) appendItem(item);
  else if (item.kind !== "note" && !rewinding) c.unread += 1; // shown before: not new
  renderConvs();
}

function appendItem(item) {
  const box = $("messages");
  const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const div = el("div", "msg " + item.kind);
  if (item.from && item.kind !== "mine") div.append(el("span", "from", bdi(item.from)));
  if (item.who !== undefined) div.append(bdi(item.who));
  div.append(item.kind === "note" ? item.text : bdi(item.text));
  if (item.kind !== "note") div.append(el("time", "", timeOf(item.ts)));
  box.append(div);
  while (box.childElementCount > MAX_ITEMS) box.firstElementChild.remove();
  if (stick || item.kind === "mine") box.scrollTop = box.scrollHeight;
}

function renderConvs() {
  const order = { room: 1, system: 2, dm: 3 };
  const list = [...convs.values()].sort((a, b) =>
    a.name === LOBBY && a.kind === "room" ? -1 : b.name === LOBBY && b.kind === "room" ? 1
      : order[a.kind] - order[b.kind] || b.at - a.at);
  $("convs").replaceChildren(...list.map((c) => {
    const button = el("button", "", el("span", "name", ...titleOf(c)),
      el("span", "badge", c.unread ? String(c.unread) : ""));
    button.type = "button";
    button.onclick = () => open(c);
    if (c === current) button.setAttribute("aria-current", "true");
    const li = el("li", c === current ? "active" : "", button);
    li.dataset.conv = c.key;
    return li;
  }));
}

function open(c) {
  current = c;
  c.unread = 0;
  $("conv-title").replaceChildren(...titleOf(c));
  $("conv-info").textContent = "";
  $("leave-btn").hidden = !(c.kind === "room" && c.name !== LOBBY);
  $("text").disabled = $("send-btn").disabled = c.kind === "system";
  $("text").placeholder = c.kind === "system" ? "system messages are read-only"
    : "message " + c.prefix + isolate(c.name);
  $("messages").replaceChildren();
  c.items.forEach(appendItem);
  $("messages").scrollTop = $("messages").scrollHeight;
  renderConvs();
  if (c.kind === "room") refreshRoom(c);
}

function toast(text) {
  $("toast").textContent = text.length > 160 ? text.slice(0, 160) + "…" : text;
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").hidden = true; }, 6000);
}

/** Show one view: "name" (pick a name), "wait" (for the token's uid), "token" (ask for one), "chat". */
function show(view) {
  $("chat-view").hidden = view !== "chat";
  $("login-view").hidden = view === "chat";
  $("login-form").hidden = view !== "name";
  $("token-wait").hidden = view !== "wait";
  $("token-form").hidden = view !== "token";
}

function note(text) {
  if (current) add(current, { kind: "note", text });
}
const roomNames = () => [...convs.values()].filter((c) => c.kind === "room").map((c) => c.name);

// --- the network ------------------------------------------------------------------------

client.on("state", (state) => {
  const label = { open: "connected", connecting: "connecting…", reconnecting: "reconnecting…",
    closed: "disconnected" }[state] || state;
  $("conn-state").textContent = label;
  $("conn-state").className = "state " + state;
});

client.on("welcome", (welcome) => {
  welcomed = true;
  $("node").textContent = welcome.node;
  if (me || !token || $("token-wait").hidden) return;
  if (welcome.uid != null) return void enter(welcome.uid, true); // the token names us
  show("name"); // a token, but a cluster in anonymous mode: pick a name
  if (givenName) login(givenName);
});
client.on("disconnected", (ev) => {
  if (ev.willRetry && !lostNoted) {
    lostNoted = true; // once per drop, not once per failed attempt
    note(`connection lost (${ev.code}); reconnecting…`);
  }
  if (!welcomed) diagnose(client.url);
  welcomed = false;
});
client.on("reconnected", (welcome) => {
  lostNoted = false;
  note(`reconnected, now on node ${welcome.node}`);
  for (const c of convs.values()) if (c.kind === "room") refreshRoom(c);
  loadNodes();
});
client.on("closed", (ev) => {
  if (byToken && ev.code === 1008) needToken(ev.reason || "refused"); // e.g. it expired
  if (refused !== null) return;
  note(`disconnected for good (${ev.code}${ev.reason ? ": " + ev.reason : ""}); reload the page`);
  toast("disconnected: reload the page to reconnect");
});
client.on("error", (f) => toast(`the server says ${f.code}: ${f.message ?? ""}`));

client.on("message", (f) => {
  const from = f.from;
  const to = String(f.to ?? "");
  const text = textOf(f.data);
  if (from == null || to === "all") {
    const label = from == null ? "system" : "broadcast from " + isolate(from.uid);
    add(conv("system", "system", "system"), { kind: "system", from: label, text, ts: f.ts });
    if (!rewinding) toast(label + ": " + isolate(text)); // a replayed one is not news
    return;
  }
  const mine = me !== null && from.uid === me;
  const item = { kind: mine ? "mine" : "theirs", from: from.uid || from.client_id, text, ts: f.ts };
  if (to.startsWith("group:")) {
    const room = to.slice(6);
    if (client.groups.has(room)) add(conv("room:" + room, "room", room), item);
  } else if (from.uid) {
    const peer = mine && to.startsWith("uid:") ? to.slice(4) : from.uid;
    add(conv("dm:" + peer, "dm", peer), item);
  }
});

// History: a reload or a new tab shows the last RECENT messages of each room and of the uid's
// stream (what others sent us, and carbons of what we sent), then goes on live; missed messages
// come back by themselves after a reconnect (the client resumes from its positions); when some
// could not, the conversation says so (not for the first resume: it asked for the last ones).
client.on("recovered", (r) => {
  if (r.recovered === false && r.reason !== "no_history" && !rewinding) lost(r.stream, r.reason);
});
client.on("gap", (f) => { // of a stream with history: the uid's, or a room still joined
  if (typeof f.stream === "string" && (!f.stream.startsWith("group:") || client.groups.has(f.stream.slice(6)))) lost(f.stream, f.reason);
});
function lost(stream, reason) {
  const room = stream.startsWith("group:") ? stream.slice(6) : null;
  const c = room !== null ? conv("room:" + room, "room", room) : conv("system", "system", "system");
  add(c, { kind: "note", text: `some ${room === null ? "private " : ""}messages could not be recovered (${reason})` });
}
let keepTimer = 0;
function keepPositions() { // soon, not on every message; and when the page goes
  if (!keepTimer) keepTimer = setTimeout(() => { keepTimer = 0; if (me) savePositions(me, client.positions()); }, 500);
}
for (const event of ["message", "recovered", "gap"]) client.on(event, keepPositions);
addEventListener("pagehide", () => { if (me && refused === null) savePositions(me, client.positions()); });

client.on("left", (f) => { // a new token no longer allows the room: the node took us out
  const c = convs.get("room:" + f.group);
  if (c) add(c, { kind: "note", text: "you were removed from this room (your access to it ended)" });
  saveRooms(roomNames().filter((r) => r !== f.group), me);
  toast(`removed from room ${f.group}`);
});
client.on("presence", (f) => {
  const c = convs.get("room:" + f.group);
  if (c) watchRoom(c);
});

// A refused handshake reaches a browser only as close code 1006. When an attempt on this page's
// own origin fails before its welcome, ask the same URL over plain HTTP why: a node answers
// 401 with the reason when it needs a token (a bad one, or none). The token goes in the
// Authorization header (a page cannot send a Sec-WebSocket-Protocol header with fetch).
let probing = false;
async function diagnose(url) {
  const http = url.replace(/^ws/, "http");
  if (probing || refused !== null || new URL(http).host !== location.host) return;
  probing = true;
  try {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const res = await fetch(http, { cache: "no-store", headers });
    if (res.status === 401) {
      const body = await res.json().catch(() => ({}));
      needToken(typeof body.error === "string" ? body.error : "unauthorized");
    }
  } catch { /* the node is down: keep trying */ } finally {
    probing = false;
  }
}

function needToken(reason) {
  refused = reason;
  client.close();
  sessionStorage.removeItem("wscluster.token");
  show("token");
  $("token-error").textContent = token ? `The cluster refused this token: ${reason}.` : "";
  $("token").focus();
}

async function joinRoom(name, focus, save = true) {
  await client.join(name, { presence: true });
  return showRoom(name, focus, save);
}

function showRoom(name, focus, save) {
  const c = conv("room:" + name, "room", name);
  if (save) saveRooms(roomNames(), me);
  if (focus) open(c);
  else refreshRoom(c);
  return c;
}

async function login(name) {
  $("login-error").textContent = "";
  $("login-btn").disabled = true;
  const ack = await client.login({ uid: name }).catch((err) => {
    $("login-error").textContent = `could not log in: ${err.code || ""} ${err.message}`;
  });
  $("login-btn").disabled = false;
  if (ack) await enter(ack.uid || name, false);
}

/**
 * Show the chat as `uid`, in the lobby and the rooms this tab (else this name) was in: the uid
 * and the rooms are resumed at once with their last RECENT messages (no message of them can
 * come between the replay and the live ones, none twice), the rooms it refuses joined.
 */
async function enter(uid, viaToken) {
  const rooms = [LOBBY, ...savedRooms(uid)];
  const streams = Object.fromEntries([`uid:${uid}`, ...rooms.map((r) => "group:" + r)].map((s) => [s, [null, 0]]));
  const presence = Object.keys(streams).filter((s) => s.startsWith("group:"));
  rewinding = true;
  const resumed = client.resume(streams, { presence, recent: RECENT }).catch((err) => {
    toast(`could not resume: ${err.code || err.message}`); // then the rooms are joined below
  }).finally(() => { rewinding = false; });
  me = uid;
  byToken = viaToken;
  if (!viaToken) sessionStorage.setItem("wscluster.name", me);
  $("me").textContent = me;
  $("logout-btn").textContent = viaToken ? "log out" : "change name";
  show("chat");
  await resumed;
  for (const room of rooms) {
    if (client.groups.has(room)) showRoom(room, room === LOBBY, false);
    else await joinRoom(room, room === LOBBY, false).catch((err) => toast(`could not join ${isolate(room)}: ${err.code || err.message}`));
  }
  saveRooms(rooms.filter((r) => client.groups.has(r)), me);
  keepPositions();
  $("text").focus();
  loadNodes(); // the links to other nodes carry the name
}

async function logout() {
  savePositions(me, client.positions()); // for this name's return
  forgetTab();
  if (byToken) { // the token is this page's identity: start again without it
    refused = "logged out";
    client.close();
    location.replace(location.pathname);
    return;
  }
  for (const c of convs.values()) if (c.kind === "room") await client.leave(c.name).catch(() => {});
  await client.logout().catch(() => {});
  me = null;
  current = null;
  convs.forEach(unwatch);
  convs.clear();
  renderConvs();
  renderOnline([]);
  $("messages").replaceChildren();
  show("name");
  $("name").focus();
}

// --- the forms --------------------------------------------------------------------------

$("login-form").onsubmit = (ev) => {
  ev.preventDefault();
  const name = $("name").value.trim();
  if (name) login(name);
};
$("token-form").onsubmit = (ev) => {
  ev.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  sessionStorage.setItem("wscluster.token", value); // not in the address: a URL gets logged
  location.replace(location.pathname);
};
$("logout-btn").onclick = () => logout();

$("join-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const name = $("room-name").value.trim();
  if (!name) return;
  try {
    await joinRoom(name, true);
    $("room-name").value = "";
  } catch (err) {
    toast(`could not join ${isolate(name)}: ${err.code || err.message}`);
  }
};

$("dm-form").onsubmit = (ev) => { // anyone, online or not (what they miss is not kept)
  ev.preventDefault();
  const name = $("dm-name").value.trim();
  if (!name) return;
  $("dm-name").value = "";
  open(conv("dm:" + name, "dm", name));
};

$("leave-btn").onclick = async () => {
  const c = current;
  if (!c || c.kind !== "room" || c.name === LOBBY) return;
  try {
    await client.leave(c.name);
  } catch (err) {
    toast(`could not leave: ${err.code || err.message}`);
    return;
  }
  unwatch(c);
  convs.delete(c.key);
  saveRooms(roomNames(), me);
  open(conv("room:" + LOBBY, "room", LOBBY));
};

$("compose").onsubmit = async (ev) => {
  ev.preventDefault();
  const c = current;
  const text = $("text").value;
  if (!c || c.kind === "system" || !text.trim()) return;
  const to = c.kind === "room" ? "group:" + c.name : "uid:" + c.name;
  $("text").value = "";
  try {
    // a room echoes our own message back to us; a private one comes back as a carbon (kept in
    // our own stream too: our other tabs and a reload show it)
    await client.send(to, { text }, { carbon: c.kind === "dm" && c.name !== me });
  } catch (err) {
    add(c, { kind: "note", text: `not sent (${err.code || err.message}): ${text}` });
  }
};

// --- start ------------------------------------------------------------------------------

client.connect().catch((err) => { if (refused === null) toast(`cannot connect: ${err.message}`); });
loadNodes();
if (givenName) $("name").value = givenName;
if (token) {
  show("wait"); // the welcome says whom the token names (see "welcome")
} else if (givenName) {
  login(givenName);
} else {
  $("name").focus();
}
