// Peer server for `python -m bench --peer socketio-node`: socket.io 4 with the Redis adapter.
// Events (each acked when it has been handed to the adapter):
//   login(uid)          join room "uid:<uid>"
//   join(group)         join room "group:<group>"
//   send({to, data})    emit "message" {to, from, data, ts} to room `to` ("client:<sid>" -> sid)
// Usage: node server.js --port 8001 --redis redis://127.0.0.1:6379/0
"use strict";
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

async function main() {
  const port = Number(arg("port", "8001"));
  const host = arg("host", "127.0.0.1");
  const pub = createClient({ url: arg("redis", "redis://127.0.0.1:6379/0") });
  const sub = pub.duplicate();
  pub.on("error", (e) => console.error("redis pub:", e.message));
  sub.on("error", (e) => console.error("redis sub:", e.message));
  await Promise.all([pub.connect(), sub.connect()]);
  const io = new Server({ transports: ["websocket"], adapter: createAdapter(pub, sub) });

  io.on("connection", (socket) => {
    const ok = (ack) => { if (typeof ack === "function") ack(true); };
    socket.on("login", (uid, ack) => {
      socket.data.uid = String(uid);
      socket.join(`uid:${uid}`);
      ok(ack);
    });
    socket.on("join", (group, ack) => {
      socket.join(`group:${group}`);
      ok(ack);
    });
    socket.on("send", (msg, ack) => {
      const to = String(msg && msg.to);
      const room = to.startsWith("client:") ? to.slice(7) : to;
      io.to(room).emit("message", {
        to, from: { uid: socket.data.uid ?? null, client_id: socket.id },
        data: msg.data, ts: Date.now(),
      });
      ok(ack);
    });
  });

  const http = require("http").createServer((req, res) => {
    res.writeHead(req.url === "/healthz" ? 200 : 404);
    res.end();
  });
  io.attach(http);
  http.listen(port, host, () => console.log(`listening on ${host}:${port}`));
  const stop = () => { io.close(); pub.quit().catch(() => {}); sub.quit().catch(() => {}); process.exit(0); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => { console.error(e); process.exit(1); });
