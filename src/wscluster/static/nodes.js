// The page's node chooser, and the fallbacks of a page served by a node itself: read from
// /nodes.json (answered by nginx with paths, or by a node with the live nodes' ports).
import { $, el } from "./view.js";

/**
 * Keep the chooser (and, on a node's own page, the client's fallback URLs) up to date.
 * ctx: {client, base, own, wsScheme, token, identity: () => ({me, byToken}),
 *   rooms: () => [joined room names], positions: () => "" or the tab's positions (store.js)}.
 * @returns {() => Promise<void>} read the list again now
 */
export function nodeChooser(ctx) {
  const { client, base, own, wsScheme, token } = ctx;
  $("node-select").onchange = (ev) => {
    const opt = ev.target.selectedOptions[0];
    if (!opt || !opt.value) return;
    // another origin has its own storage: what this tab knows goes in the URL's fragment,
    // which is never sent to a server (the positions too, so that the page there resumes
    // where this one is)
    location.href = opt.value + (opt.dataset.cross ? carried() : "");
  };

  function carried() {
    const { me, byToken } = ctx.identity();
    const carry = new URLSearchParams();
    if (me && !byToken) carry.set("name", me);
    if (token) carry.set("token", token);
    const rooms = ctx.rooms();
    if (rooms.length) carry.set("rooms", JSON.stringify(rooms));
    if (ctx.positions()) carry.set("positions", ctx.positions());
    return carry.toString() ? "#" + carry : "";
  }
  // Read again every 30 s; every 3 s at first while a node lists only itself (it may lag).
  let nodesShown = "", nodesTimer = 0, nodesTries = 0;
  async function loadNodes() {
    const { me, byToken } = ctx.identity();
    let list;
    try {
      // behind nginx, /nodes.json is answered by nginx (paths); on a node, by the node (ports)
      const res = await fetch("/nodes.json", { cache: "no-store" });
      list = (await res.json()).nodes;
    } catch { /* read again later */ }
    clearTimeout(nodesTimer);
    const alone = !Array.isArray(list) || list.length < 2;
    nodesTimer = setTimeout(loadNodes, alone && ++nodesTries < 20 ? 3000 : 30000);
    if (!Array.isArray(list) || JSON.stringify([me, list]) === nodesShown) return;
    nodesShown = JSON.stringify([me, list]);
    const options = [];
    if (list.some((n) => n.path)) options.push({ label: "any node", href: "/", here: base === "/" });
    const others = [];
    for (const n of list) {
      if (typeof n.path === "string") { // same origin: sessionStorage carries the name and rooms
        options.push({ label: String(n.label), href: n.path, here: base === n.path });
      } else if (Number.isInteger(n.port)) { // another origin: name, rooms, token go in the fragment
        const here = String(n.port) === location.port;
        const href = `${location.protocol}//${location.hostname}:${n.port}/`;
        options.push({ label: String(n.label), href, here, cross: true });
        if (!here) others.push(`${wsScheme}//${location.hostname}:${n.port}/ws`);
      }
    }
    if (base === "/" && others.length) client.urls = [own, ...others]; // when this node is gone
    $("node-select").replaceChildren(...options.map((o) => {
      const opt = el("option", "", o.here ? o.label + " (this page)" : o.label);
      opt.value = o.href;
      opt.selected = o.here;
      if (o.cross) opt.dataset.cross = "1";
      return opt;
    }));
  }
  return loadNodes;
}
