// The wscluster chat page: rooms, private chats, who is online, system messages.
// Text that comes from the network is only ever put into the page with textContent, and names
// and messages sit in isolates (<bdi>, or FSI…PDI in plain text) so that right-to-left marks in
// them cannot reorder the text around them.
import { WsclusterClient } from "./wscluster.js";
import { $, bdi, el, isolate, textOf, timeOf } from "./view.js";
import { nodeChooser } from "./nodes.js";

const LOBBY = "lobby"; // every user joins it with presence: its members are "online"
const MAX_ITEMS = 500; // messages kept per conversation (and shown at once)
const REFRESH_MS = [300, 2500]; // presence is re-read after an event: the store may lag a heartbeat

// ?name= and ?rooms= (the node chooser passes them to another origin) and ?token= (a JWT) go to
// sessionStorage and out of the address bar, so a reload uses the latest name.
const params = new URLSearchParams(location.search);
const token = params.get("token") || sessionStorage.getItem("wscluster.token");
const givenName = params.get("name") || sessionStorage.getItem("wscluster.name");
if (params.get("token")) sessionStorage.setItem("wscluster.token", token);
if (params.get("rooms")) sessionStorage.setItem("wscluster.rooms", params.get("rooms"));
if (["token", "name", "rooms"].some((p) => params.has(p))) {
  ["token", "name", "rooms"].forEach((p) => params.delete(p));
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
}

// Where this page was loaded from: "/" on a node, or "/n/2/" behind nginx (pinned to node 2).
// Fallbacks, tried when that node is gone: nginx's /ws, or the other nodes' ports (nodes.json).
const base = location.pathname.replace(/[^/]*$/, "");
const wsScheme = location.protocol === "https:" ? "wss:" : "ws:";
const auth = token ? "?token=" + encodeURIComponent(token) : "";
const own = `${wsScheme}//${location.host}${base}ws${auth}`;
const client = new WsclusterClient(base === "/" ? [own] : [own, `${wsScheme}//${location.host}/ws${auth}`],
  { maxHandshakeRetries: 30 }); // a few minutes: a browser sees a refused handshake only as 1006
const convs = new Map(); // key ("room:x", "dm:bob", "system") -> conversation
let me = null, current = null, toastTimer = 0;
let byToken = false; // me comes from the token (the welcome), not from a login by name
let welcomed = false, lostNoted = false; // a welcome since the last drop; its loss was noted
let refused = null; // why the cluster refused this page (it needs a token), once known
const loadNodes = nodeChooser({
  client, base, own, wsScheme, auth, token, identity: () => ({ me, byToken }), rooms: () => savedRooms(),
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
  else if (item.kind !== "note") c.unread += 1;
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

// --- who is in a room (the lobby: who is online) ----------------------------------------

// Read from the cluster when a room is opened or joined, and after each presence event of it.
// Joins and leaves are told from the difference, so a second tab (or a reconnect on another
// node) of someone already there is no news, and neither is one of their two tabs closing.
function watchRoom(c) {
  if (!c.soon) c.soon = setTimeout(() => { c.soon = 0; refreshRoom(c); }, REFRESH_MS[0]);
  clearTimeout(c.late);
  c.late = setTimeout(() => refreshRoom(c), REFRESH_MS[1]);
}
const unwatch = (c) => { clearTimeout(c.soon); clearTimeout(c.late); };

async function refreshRoom(c) {
  const ack = await client.presence("group:" + c.name).catch(() => null); // else: next event
  if (!ack || convs.get(c.key) !== c || !Array.isArray(ack.uids)) return; // or left meanwhile
  const uids = new Set(ack.uids.map(String));
  if (c.members && c.name !== LOBBY) {
    for (const uid of uids) if (!c.members.has(uid)) add(c, { kind: "note", who: uid, text: " joined the room" });
    for (const uid of c.members) if (!uids.has(uid)) add(c, { kind: "note", who: uid, text: " left the room" });
  }
  c.members = uids;
  if (c === current) {
    const people = uids.size === 1 ? "1 person" : `${uids.size} people`;
    $("conv-info").textContent = `${people}, ${ack.count === 1 ? "1 connection" : `${ack.count} connections`}`;
  }
  if (c.name === LOBBY) renderOnline(uids);
}

function renderOnline(uids) {
  const sorted = [...uids].sort((a, b) => a.localeCompare(b));
  $("online-count").textContent = `(${sorted.length})`;
  $("online").replaceChildren(...sorted.map((uid) => {
    const li = el("li", uid === me ? "self" : "");
    li.dataset.uid = uid;
    if (uid === me) {
      li.append(el("span", "name", bdi(uid), " (you)"));
    } else {
      const button = el("button", "", el("span", "name", bdi(uid)));
      button.type = "button";
      button.title = "private chat with " + isolate(uid);
      button.onclick = () => open(conv("dm:" + uid, "dm", uid));
      li.append(button);
    }
    return li;
  }));
}

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
    toast(label + ": " + isolate(text));
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

client.on("presence", (f) => {
  const c = convs.get("room:" + f.group);
  if (c) watchRoom(c);
});

// A refused handshake reaches a browser only as close code 1006. When an attempt on this page's
// own origin fails before its welcome, ask the same URL over plain HTTP why: a node answers
// 401 with the reason when it needs a token (a bad one, or none).
let probing = false;
async function diagnose(url) {
  const http = url.replace(/^ws/, "http");
  if (probing || refused !== null || new URL(http).host !== location.host) return;
  probing = true;
  try {
    const res = await fetch(http, { cache: "no-store" });
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
  const c = conv("room:" + name, "room", name);
  if (save) saveRooms();
  if (focus) open(c);
  else refreshRoom(c);
  return c;
}

function saveRooms() {
  const rooms = [...convs.values()].filter((c) => c.kind === "room" && c.name !== LOBBY);
  sessionStorage.setItem("wscluster.rooms", JSON.stringify(rooms.map((c) => c.name)));
}

function savedRooms() {
  let rooms = [];
  try { rooms = JSON.parse(sessionStorage.getItem("wscluster.rooms") || "[]"); } catch { /* none */ }
  return Array.isArray(rooms) ? rooms.filter((r) => typeof r === "string" && r !== LOBBY) : [];
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

/** Show the chat as `uid`, in the lobby and the rooms this tab was in (read before any join). */
async function enter(uid, viaToken) {
  me = uid;
  byToken = viaToken;
  if (!viaToken) sessionStorage.setItem("wscluster.name", me);
  $("me").textContent = me;
  $("logout-btn").textContent = viaToken ? "log out" : "change name";
  show("chat");
  for (const room of [LOBBY, ...savedRooms()]) {
    await joinRoom(room, room === LOBBY, false).catch((err) => toast(`could not join ${isolate(room)}: ${err.code || err.message}`));
  }
  saveRooms();
  $("text").focus();
  loadNodes(); // the links to other nodes carry the name
}

async function logout() {
  for (const key of ["wscluster.name", "wscluster.rooms", "wscluster.token"]) sessionStorage.removeItem(key);
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
  if (value) location.replace(location.pathname + "?token=" + encodeURIComponent(value));
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
  saveRooms();
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
    await client.send(to, { text });
    // a room echoes our own message back to us; a private message to someone else does not
    if (c.kind === "dm" && c.name !== me) add(c, { kind: "mine", text, ts: Date.now() });
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
