// A real wscluster for the integration tests: the one named by WSCLUSTER_TEST_CLUSTER
// (JSON {"ws": [...], "api": [...]}, 3 nodes with the HISTORY rules below), else a private one
// from `wscluster up`.
import { spawn } from "node:child_process";
import net from "node:net";
import { fileURLToPath } from "node:url";

const NODES = 3;
/** The history rules of the cluster (tests/cluster/test_js_client.py gives its nodes the same). */
export const HISTORY = ["group:*=1000/300s", "uid:*=1000/300s"];

/** @returns {Promise<boolean>} whether 127.0.0.1:port can be bound now */
function portFree(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once("error", () => resolve(false));
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
  });
}

async function freeBase() {
  for (let i = 0; i < 50; i++) {
    const base = 20000 + 10 * Math.floor(Math.random() * 1800); // nodes base+1.., APIs base+1001..
    const ports = [];
    for (let n = 1; n <= NODES; n++) ports.push(base + n, base + n + 1000);
    if ((await Promise.all(ports.map(portFree))).every(Boolean)) return base;
  }
  throw new Error("no free port range for a test cluster");
}

async function healthy(url) {
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(1000) });
    return r.status === 200;
  } catch {
    return false;
  }
}

/**
 * @returns {Promise<{ws: string[], api: string[], stop: () => Promise<void>, output: () => string}>}
 */
export async function getCluster() {
  const given = process.env.WSCLUSTER_TEST_CLUSTER;
  if (given) {
    const { ws, api } = JSON.parse(given);
    if (ws.length < NODES || api.length < NODES) throw new Error(`WSCLUSTER_TEST_CLUSTER needs ${NODES} nodes`);
    return { ws, api, stop: async () => {}, output: () => "" };
  }
  const python = process.env.WSCLUSTER_PYTHON ?? fileURLToPath(new URL("../../../.venv/bin/python", import.meta.url));
  const base = await freeBase();
  const args = ["-m", "wscluster", "up", "--nodes", String(NODES), "--base-port", String(base), ...HISTORY.flatMap((h) => ["--history", h])];
  const child = spawn(python, args, {
    detached: true, // its own process group: stop() ends up, the nodes and the broker together
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout.on("data", (d) => { out += d; });
  child.stderr.on("data", (d) => { out += d; });
  let exited = false;
  const exit = new Promise((resolve) => child.once("exit", () => { exited = true; resolve(); }));
  child.once("error", (err) => { out += `spawn failed: ${err.message}\n`; exited = true; });
  const killGroup = (signal) => { try { process.kill(-child.pid, signal); } catch { /* gone */ } };
  process.once("exit", () => killGroup("SIGKILL"));
  const stop = async () => {
    if (exited) return;
    killGroup("SIGTERM"); // `up` stops its nodes and broker
    const timer = setTimeout(() => killGroup("SIGKILL"), 5000);
    await exit;
    clearTimeout(timer);
  };
  const ports = Array.from({ length: NODES }, (_, i) => base + i + 1);
  const deadline = Date.now() + 40000;
  for (const port of ports) {
    while (!(await healthy(`http://127.0.0.1:${port}/healthz`))) {
      if (exited || Date.now() > deadline) {
        await stop();
        throw new Error(`the test cluster did not start (${python} -m wscluster up):\n${out}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return {
    ws: ports.map((p) => `ws://127.0.0.1:${p}/ws`),
    api: ports.map((p) => `http://127.0.0.1:${p + 1000}`),
    stop,
    output: () => out,
  };
}
