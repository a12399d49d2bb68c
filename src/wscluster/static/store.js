// What the chat page keeps in the browser. In sessionStorage (this tab, across reloads): the
// name, the token, the rooms and the tab's stream positions; the rooms and the positions also
// per name in localStorage, so that a new tab joins the same rooms (and shows their recent
// messages) and the node chooser carries the positions to another origin.

const LOBBY = "lobby";
const TAB_POSITIONS = "wscluster.positions"; // {name, positions} of this tab
const positionsKey = (name) => "wscluster.positions." + name;
const roomsKey = (name) => "wscluster.rooms." + name;

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

/** Keep the rooms joined: this tab's, and `name`'s (a new tab of this browser joins them too). */
export function saveRooms(names, name = null) {
  const text = JSON.stringify(names.filter((r) => r !== LOBBY));
  sessionStorage.setItem("wscluster.rooms", text);
  try {
    if (name !== null) localStorage.setItem(roomsKey(name), text);
  } catch { /* storage full or refused: only this tab remembers them */ }
}

/** This tab's rooms; in a new tab, the ones kept for `name`. */
export function savedRooms(name = null) {
  const tab = sessionStorage.getItem("wscluster.rooms");
  const rooms = parse(tab === null && name !== null ? localStorage.getItem(roomsKey(name)) : tab);
  return Array.isArray(rooms) ? rooms.filter((r) => typeof r === "string" && r !== LOBBY) : [];
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
