// What the chat page keeps in the browser. In sessionStorage (this tab, across reloads): the
// name, the token, the rooms and the tab's stream positions; the positions also per name in
// localStorage, so that a reload, a new tab or a return later resumes where the page was.
import { isPosition } from "./wscluster.js";

const LOBBY = "lobby";
const TAB_POSITIONS = "wscluster.positions"; // {name, positions} of this tab
const positionsKey = (name) => "wscluster.positions." + name;

// name=, rooms=, positions= (the node chooser passes them to another origin) and token= (a
// JWT), in the fragment (#token=…: never sent to a server, so never in its logs) or the query,
// go to sessionStorage and out of the address bar, so a reload uses the latest name.
const params = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));
const given = (p) => fragment.get(p) || params.get(p);
export const token = given("token") || sessionStorage.getItem("wscluster.token");
export const givenName = given("name") || sessionStorage.getItem("wscluster.name");
const carried = { token: "wscluster.token", rooms: "wscluster.rooms", positions: TAB_POSITIONS };
for (const [param, key] of Object.entries(carried)) if (given(param)) sessionStorage.setItem(key, given(param));
const names = ["name", ...Object.keys(carried)];
if (names.some((p) => params.has(p) || fragment.has(p))) {
  names.forEach((p) => { params.delete(p); fragment.delete(p); });
  const [rest, hash] = [params.toString(), fragment.toString()];
  history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + (hash ? "#" + hash : ""));
}

/** Forget what this tab keeps (logged out). */
export function forgetTab() {
  for (const key of ["wscluster.name", "wscluster.rooms", "wscluster.token", TAB_POSITIONS]) sessionStorage.removeItem(key);
}

export function saveRooms(names) {
  sessionStorage.setItem("wscluster.rooms", JSON.stringify(names.filter((r) => r !== LOBBY)));
}

export function savedRooms() {
  const rooms = parse(sessionStorage.getItem("wscluster.rooms"));
  return Array.isArray(rooms) ? rooms.filter((r) => typeof r === "string" && r !== LOBBY) : [];
}

/** `name`'s positions: this tab's when they are `name`'s, else the last ones kept for `name`. */
export function loadPositions(name) {
  const tab = parse(sessionStorage.getItem(TAB_POSITIONS));
  const kept = tab?.name === name ? tab.positions : parse(localStorage.getItem(positionsKey(name)));
  const entries = kept && typeof kept === "object" ? Object.entries(kept) : [];
  return Object.fromEntries(entries.filter(([s, p]) => ours(name, s) && isPosition(p)));
}

/** Keep `name`'s positions (its uid's and its groups') from the client's. */
export function savePositions(name, positions) {
  const kept = Object.fromEntries(Object.entries(positions).filter(([s]) => ours(name, s)));
  try {
    sessionStorage.setItem(TAB_POSITIONS, tabPositions(name, kept));
    localStorage.setItem(positionsKey(name), JSON.stringify(kept));
  } catch { /* storage full or refused: the page still works, it just resumes less */ }
}

/** What the node chooser carries to another origin (`?positions=`). */
export const tabPositions = (name, positions) => JSON.stringify({ name, positions });

const ours = (name, stream) => stream === "uid:" + name || stream.startsWith("group:");

function parse(text) {
  try { return JSON.parse(text || "null"); } catch { return null; }
}
