"""The memory a client connection can pin on a node: the node's RSS per connection when N
connections sit idle after doing one thing each.

    python -m bench.pin [--connections 500] [--frames 900,200] [--half 40]

For each state a fresh node (``wscluster serve --anonymous`` on an embedded valkey) is
started, N clients connect (raw sockets, hand-made frames), do the thing, and then stay
idle; the figure is (VmRSS after - VmRSS before the clients came) / N:

  idle        connected and welcomed, nothing else (the baseline)
  frame K KB  one text frame of K KB (a ``send`` over the 64 KiB message limit), then idle:
              under the frame limit the node answers ``too_large`` and keeps the
              connection; over it the node closes 1009 (the "outcome" column says which)
  half K KB   the first K KB of a fragmented text message that is never finished; the RSS is
              read a few seconds after (before the node's --fragment-timeout, when it has
              one), then again after --after seconds (0: not) with the closes counted

Numbers include everything the node keeps per connection (Python objects, picows' read
buffer, kernel memory is not in RSS). Results vary by a few KiB between runs: compare
orders of magnitude, not digits. Benchmarks print; they never assert.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from wscluster.embedded import EmbeddedRedis, die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A masked client frame (the all-zero mask leaves the payload as it is)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class Node:
    """One ``wscluster serve`` process on the given broker."""

    def __init__(self, broker: str, args: list[str], logdir: Path) -> None:
        self.port = free_port()
        self.log = logdir / f"node-{self.port}.log"
        cmd = [sys.executable, "-m", "wscluster", "serve", "--anonymous", "--host", "127.0.0.1",
               "--port", str(self.port), "--api-port", str(free_port()), "--broker", broker,
               "--namespace", f"pin{uuid.uuid4().hex[:6]}", "--max-connections", "100000",
               "--max-connections-per-uid", "0", "--rate-limit", "0", "--log-level", "warning",
               "--ping-interval", "600", *args]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT,
                                         preexec_fn=die_with_parent)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("node not healthy in 60 s") from None
                time.sleep(0.1)

    @property
    def rss(self) -> int:
        return rss_kib(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Client:
    """A raw WebSocket client: what the node answered, and whether it closed."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answers: list[str] = field(default_factory=list)  # error codes / "ack" / "message"
    close_code: int | None = None
    ended: bool = False  # the TCP link is gone
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode(errors="replace"))
        client = cls(reader, writer)
        opcode, payload = await client._frame()
        if opcode != 0x1 or b'"welcome"' not in payload:
            raise RuntimeError(f"no welcome: {payload[:200]!r}")
        client.task = asyncio.ensure_future(client._read())
        return client

    async def _frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def _read(self) -> None:
        try:
            while True:
                opcode, payload = await self._frame()
                if opcode == 0x8:
                    self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                    self.answered.set()
                    self.writer.write(frame(payload[:2], 0x8))  # the closing handshake
                elif opcode == 0x9:
                    self.writer.write(frame(payload, 0xA))
                elif opcode == 0x1:
                    code = payload.split(b'"code":"', 1)[1].split(b'"')[0] if b'"code":"' in (
                        payload) else payload.split(b'"type":"', 1)[1].split(b'"')[0]  # fmt: skip
                    self.answers.append(code.decode())
                    self.answered.set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        self.ended = True
        self.answered.set()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError:
            pass  # the node closed while we wrote (a frame over its limit)

    def outcome(self) -> str:
        if self.close_code is not None:
            return f"closed {self.close_code}"
        if self.ended:
            return "dropped"
        return ", ".join(self.answers) or "open"

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()


def big_send(size: int) -> bytes:
    """A ``send`` frame's payload of ``size`` bytes (valid JSON, over the message limit)."""
    bare = b'{"type":"send","id":1,"to":"uid:nobody","data":""}'
    return bare[:-2] + b"x" * (size - len(bare)) + bare[-2:]


@dataclass
class Row:
    state: str
    conns: int
    outcome: str
    delta_kib: int

    def cells(self) -> list[str]:
        per = self.delta_kib / self.conns if self.conns else 0.0
        return [self.state, str(self.conns), self.outcome, f"{self.delta_kib / 1024:.1f} MiB",
                f"{per:.1f} KiB"]  # fmt: skip


def summary(clients: list[Client]) -> str:
    counts = Counter(c.outcome() for c in clients)
    return "; ".join(f"{k}: {v}" for k, v in counts.most_common())


async def run_state(
    broker: str, args: argparse.Namespace, logdir: Path, state: str, kb: int = 0
) -> list[Row]:
    node = Node(broker, args.node_args.split(), logdir)
    clients: list[Client] = []
    try:
        await asyncio.sleep(1.0)  # let the node's start settle
        before = node.rss
        for i in range(0, args.connections, 50):  # open in batches of 50
            batch = min(50, args.connections - i)
            clients += await asyncio.gather(*(Client.open(node.port) for _ in range(batch)))
        if state == "frame":
            data = frame(big_send(kb * 1000))
            for c in clients:  # one at a time: the node reads each whole frame
                await c.send(data)
            await asyncio.wait_for(
                asyncio.gather(*(c.answered.wait() for c in clients)), args.answer_timeout
            )
        elif state == "half":
            data = frame(b'{"type":"send","to":"uid:nobody","data":"' + b"y" * (kb * 1000),
                         fin=False)  # fmt: skip
            for c in clients:
                await c.send(data)
        await asyncio.sleep(args.settle)
        label = {"idle": "idle", "frame": f"frame {kb} KB", "half": f"half {kb} KB"}[state]
        rows = [Row(label, len(clients), summary(clients), node.rss - before)]
        if state == "half" and args.after > 0:
            await asyncio.sleep(args.after)
            rows.append(Row(f"half {kb} KB +{args.after:g}s", len(clients), summary(clients),
                            node.rss - before))  # fmt: skip
        return rows
    finally:
        for c in clients:
            c.close()
        node.stop()


def table(rows: list[Row]) -> str:
    head = ["state", "conns", "outcome", "RSS delta", "per conn"]
    cells = [head] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i in (0, 2) else c[i].rjust(widths[i])
                       for i in range(len(head))) for c in cells]  # fmt: skip
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


async def main(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.connections + 100 > hard:
        raise SystemExit(f"--connections {args.connections}: only {hard} file descriptors")
    redis = EmbeddedRedis()
    redis.start()
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pin-") as tmp:
            logdir = Path(tmp)
            rows += await run_state(redis.url, args, logdir, "idle")
            for kb in args.frames:
                rows += await run_state(redis.url, args, logdir, "frame", kb)
            if args.half > 0:
                rows += await run_state(redis.url, args, logdir, "half", args.half)
    finally:
        redis.cleanup()
    import wscluster

    print(f"wscluster from {Path(wscluster.__file__).parent}; node args: {args.node_args!r}")
    print(table(rows))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.pin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--connections", type=int, default=500, help="clients per state")
    ap.add_argument(
        "--frames",
        default="900,200",
        help="sizes in KB of the single frames, comma-separated ('' for none)",
    )
    ap.add_argument(
        "--half",
        type=int,
        default=40,
        help="KB of the unfinished fragmented message (0: skip that state)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds between the last client's frame and the RSS reading",
    )
    ap.add_argument(
        "--after",
        type=float,
        default=12.0,
        help="seconds more before the second reading of the 'half' state, past "
        "the default --fragment-timeout of 10 s (0: no second reading)",
    )
    ap.add_argument(
        "--answer-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the node's answers to the frames",
    )
    ap.add_argument(
        "--node-args",
        default="",
        help="more `wscluster serve` options, e.g. '--max-frame-size 1048576'",
    )
    return ap


def cli() -> None:
    args = parser().parse_args()
    args.frames = [int(x) for x in args.frames.split(",") if x.strip()]
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
