// Small DOM helpers of the chat page. Text from the network only ever goes in through
// textContent / append(string), never as HTML.
export const $ = (id) => document.getElementById(id);
export const isolate = (text) => `\u2068${text}\u2069`; // FSI…PDI: bidi-safe plain text

export function el(tag, cls, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  node.append(...children);
  return node;
}
export const bdi = (text) => el("bdi", "", String(text));

export function textOf(data) {
  if (typeof data === "string") return data;
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return String(JSON.stringify(data));
}

export function timeOf(ts) {
  const d = typeof ts === "number" ? new Date(ts) : new Date();
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

