// The wscluster chat page: rooms, private chats, who is online, system messages.
// Text that comes from the network is only ever put into the page with textContent.
import { WsclusterClient } from "./wscluster.js";

const LOBBY = "lobby"; // every user joins it with presence: its members are "online"
const MAX_ITEMS = 500; // messages kept per conversation
const $ = (id) => document.getElementById(id);

// Where this page was loaded from: "/" on a node, or "/n/2/" behind nginx (pinned to node 2).
const base = location.pathname.replace(/[^/]*$/, "");
const wsOrigin = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
const urls = [wsOrigin + base + "ws"];
if (base !== "/") urls.push(wsOrigin + "/ws"); // the pinned node is gone: any node will do

// A page keeps trying for a few minutes (a browser cannot tell a refused handshake from a
// node that is down: both are 1006), then offers a reload.
const client = new WsclusterClient(urls, { maxHandshakeRetries: 30 });
const convs = new Map(); // key ("room:x", "dm:bob", "system") -> conversation
let me = null;
let current = null;
let toastTimer = 0;

// --- rendering --------------------------------------------------------------------------

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function textOf(data) {
  if (typeof data === "string") return data;
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}

function timeOf(ts) {
  const d = typeof ts === "number" ? new Date(ts) : new Date();
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function conv(key, kind, name) {
  let c = convs.get(key);
  if (!c) {
    const title = kind === "room" ? "# " + name : kind === "dm" ? "@ " + name : "System";
    c = { key, kind, name, title, items: [], unread: 0, at: Date.now() };
    convs.set(key, c);
    renderConvs();
  }
  return c;
}

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
  if (item.from && item.kind !== "mine") div.append(el("span", "from", item.from));
  div.append(document.createTextNode(item.text));
  if (item.kind !== "note") div.append(el("time", "", timeOf(item.ts)));
  box.append(div);
  if (stick || item.kind === "mine") box.scrollTop = box.scrollHeight;
}

function renderConvs() {
  const order = { room: 1, system: 2, dm: 3 };
  const list = [...convs.values()].sort((a, b) =>
    a.name === LOBBY && a.kind === "room" ? -1 : b.name === LOBBY && b.kind === "room" ? 1
      : order[a.kind] - order[b.kind] || b.at - a.at);
  $("convs").replaceChildren(...list.map((c) => {
    const li = el("li", c === current ? "active" : "");
    li.dataset.conv = c.key;
    li.append(el("span", "", c.title), el("span", "badge", c.unread ? String(c.unread) : ""));
    li.onclick = () => open(c);
    return li;
  }));
}

function open(c) {
  current = c;
  c.unread = 0;
  $("conv-title").textContent = c.title;
  $("conv-info").textContent = "";
  $("leave-btn").hidden = !(c.kind === "room" && c.name !== LOBBY);
  $("text").disabled = $("send-btn").disabled = c.kind === "system";
  $("text").placeholder = c.kind === "system" ? "system messages are read-only" : "message " + c.title;
  $("messages").replaceChildren();
  c.items.forEach(appendItem);
  $("messages").scrollTop = $("messages").scrollHeight;
  renderConvs();
  if (c.kind === "room") roomInfo(c);
}

async function roomInfo(c) {
  try {
    const ack = await client.presence("group:" + c.name);
    const people = ack.uids.length === 1 ? "1 person" : `${ack.uids.length} people`;
    const conns = ack.count === 1 ? "1 connection" : `${ack.count} connections`;
    if (current === c) $("conv-info").textContent = `${people}, ${conns}`;
  } catch { /* not important */ }
}

function toast(text) {
  $("toast").textContent = text;
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").hidden = true; }, 6000);
}

function note(text) {
  if (current) add(current, { kind: "note", text });
}

// --- who is online ----------------------------------------------------------------------

let onlineTimer = 0;
function refreshOnline(delay = 0) { // presence events come before the store is updated
  clearTimeout(onlineTimer);
  onlineTimer = setTimeout(async () => {
    if (!me) return;
    try {
      const ack = await client.presence("group:" + LOBBY);
      renderOnline(ack.uids);
    } catch { /* retried at the next event or reconnect */ }
  }, delay);
}

function renderOnline(uids) {
  const sorted = [...uids].sort((a, b) => a.localeCompare(b));
  $("online-count").textContent = `(${sorted.length})`;
  $("online").replaceChildren(...sorted.map((uid) => {
    const li = el("li", uid === me ? "self" : "", uid === me ? uid + " (you)" : uid);
    li.dataset.uid = uid;
    if (uid !== me) li.onclick = () => open(conv("dm:" + uid, "dm", uid));
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

client.on("welcome", (welcome) => { $("node").textContent = welcome.node; });
client.on("disconnected", (ev) => {
  if (ev.willRetry) note(`connection lost (${ev.code}); reconnecting…`);
});
client.on("reconnected", (welcome) => {
  note(`reconnected, now on node ${welcome.node}`);
  refreshOnline();
  loadNodes();
  if (current && current.kind === "room") roomInfo(current);
});
client.on("closed", (ev) => {
  note(`disconnected for good (${ev.code}${ev.reason ? ": " + ev.reason : ""}); reload the page`);
  toast("disconnected: reload the page to reconnect");
});

client.on("message", (f) => {
  const from = f.from;
  const text = textOf(f.data);
  if (from === null || f.to === "all") {
    const label = from === null ? "system" : "broadcast from " + from.uid;
    add(conv("system", "system", "system"), { kind: "system", from: label, text, ts: f.ts });
    toast(label + ": " + text);
    return;
  }
  const mine = from.uid === me;
  const item = { kind: mine ? "mine" : "theirs", from: from.uid || from.client_id, text, ts: f.ts };
  if (f.to.startsWith("group:")) {
    const room = f.to.slice(6);
    if (client.groups.has(room)) add(conv("room:" + room, "room", room), item);
  } else if (from.uid) {
    const peer = mine ? f.to.replace(/^uid:/, "") : from.uid;
    add(conv("dm:" + peer, "dm", peer), item);
  }
});

client.on("presence", (f) => {
  const c = convs.get("room:" + f.group);
  if (c === current) setTimeout(() => roomInfo(c), 300);
  if (f.group === LOBBY) refreshOnline(300);
  else if (c && f.uid) {
    add(c, { kind: "note", text: `${f.uid} ${f.event === "join" ? "joined" : "left"} the room` });
  }
});

async function joinRoom(name, show) {
  await client.join(name, { presence: true });
  const c = conv("room:" + name, "room", name);
  saveRooms();
  if (show) open(c);
  return c;
}

function saveRooms() {
  const rooms = [...convs.values()].filter((c) => c.kind === "room" && c.name !== LOBBY);
  sessionStorage.setItem("wscluster.rooms", JSON.stringify(rooms.map((c) => c.name)));
}

async function login(name) {
  $("login-error").textContent = "";
  $("login-btn").disabled = true;
  try {
    const ack = await client.login({ uid: name });
    me = ack.uid || name;
    sessionStorage.setItem("wscluster.name", me);
    $("me").textContent = me;
    $("login-view").hidden = true;
    $("chat-view").hidden = false;
    const lobby = await joinRoom(LOBBY, true);
    let rooms = [];
    try { rooms = JSON.parse(sessionStorage.getItem("wscluster.rooms") || "[]"); } catch { /* */ }
    for (const room of rooms) if (typeof room === "string") await joinRoom(room, false);
    open(lobby);
    refreshOnline();
    $("text").focus();
  } catch (err) {
    $("login-error").textContent = `could not log in: ${err.code || ""} ${err.message}`;
  } finally {
    $("login-btn").disabled = false;
  }
}

async function logout() {
  for (const c of convs.values()) if (c.kind === "room") await client.leave(c.name).catch(() => {});
  await client.logout().catch(() => {});
  sessionStorage.removeItem("wscluster.name");
  sessionStorage.removeItem("wscluster.rooms");
  me = null;
  current = null;
  convs.clear();
  $("chat-view").hidden = true;
  $("login-view").hidden = false;
  $("name").focus();
}

// --- the forms --------------------------------------------------------------------------

$("login-form").onsubmit = (ev) => {
  ev.preventDefault();
  const name = $("name").value.trim();
  if (name) login(name);
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
    toast(`could not join ${name}: ${err.code || err.message}`);
  }
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

// --- the node chooser -------------------------------------------------------------------

async function loadNodes() {
  let list;
  try {
    // behind nginx, /nodes.json is answered by nginx (paths); on a node, by the node (ports)
    const res = await fetch("/nodes.json", { cache: "no-store" });
    list = (await res.json()).nodes;
  } catch {
    return;
  }
  if (!Array.isArray(list)) return;
  const select = $("node-select");
  const options = [];
  const name = me ? "?name=" + encodeURIComponent(me) : "";
  if (list.some((n) => n.path)) options.push({ label: "any node", href: "/" + name, here: base === "/" });
  for (const n of list) {
    if (typeof n.path === "string") {
      options.push({ label: String(n.label), href: n.path + name, here: base === n.path });
    } else if (Number.isInteger(n.port)) {
      const href = `${location.protocol}//${location.hostname}:${n.port}/${name}`;
      options.push({ label: String(n.label), href, here: String(n.port) === location.port });
    }
  }
  select.replaceChildren(...options.map((o) => {
    const opt = el("option", "", o.here ? o.label + " (this page)" : o.label);
    opt.value = o.href;
    opt.selected = o.here;
    return opt;
  }));
}
$("node-select").onchange = (ev) => { if (ev.target.value) location.href = ev.target.value; };

// --- start ------------------------------------------------------------------------------

client.connect().catch((err) => toast(`cannot connect: ${err.message}`));
loadNodes();
const given = new URLSearchParams(location.search).get("name") || sessionStorage.getItem("wscluster.name");
if (given) {
  $("name").value = given;
  login(given);
} else {
  $("name").focus();
}
