// Who is in a room (the lobby: who is online), for the chat page.
import { $, bdi, el, isolate } from "./view.js";

export const LOBBY = "lobby"; // every user joins it with presence: its members are "online"
const REFRESH_MS = [300, 2500]; // presence is re-read after an event: the store may lag a heartbeat

/**
 * Read from the cluster when a room is opened or joined, and after each presence event of it.
 * Joins and leaves are told from the difference, so a second tab (or a reconnect on another
 * node) of someone already there is no news, and neither is one of their two tabs closing.
 * ctx: {client, convs, add, conv, open, current: () => conversation, me: () => uid}.
 */
export function roomWatcher(ctx) {
  const { client, convs, add } = ctx;

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
    if (c === ctx.current()) {
      const people = uids.size === 1 ? "1 person" : `${uids.size} people`;
      $("conv-info").textContent = `${people}, ${ack.count === 1 ? "1 connection" : `${ack.count} connections`}`;
    }
    if (c.name === LOBBY) renderOnline(uids);
  }

  function renderOnline(uids) {
    const me = ctx.me();
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
        button.onclick = () => ctx.open(ctx.conv("dm:" + uid, "dm", uid));
        li.append(button);
      }
      return li;
    }));
  }

  return { watchRoom, unwatch, refreshRoom, renderOnline };
}
