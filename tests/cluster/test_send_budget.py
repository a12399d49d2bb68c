"""One user could get another closed 1013: three connections sending 64 KB messages to
`uid:victim` at their frame rate filled a victim that read as fast as it could in 0.5 s. A
sender now has a byte budget (--send-rate-bytes, 512 KiB/s after --send-burst-bytes, 1 MiB):
over it the node reads it more slowly, with no error, and the default --max-outbox (8 MiB)
holds the bursts of five senders. A victim that stops reading is still closed 1013."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .test_slow_receiver import PING, TEXT, SlowReceiver, StreamError, closes_1013
from .wsclient import WS

SENDERS = 5
SIZE = 60_000  # bytes of data per message (the message frame is ~100 bytes more)
RATE, BURST = 512 * 1024, 1024 * 1024  # the defaults
# conftest turns the budget off for other tests: set the defaults again (the default
# --max-outbox is the one the budget is sized for)
BUDGET = ["--send-rate-bytes", str(RATE), "--send-burst-bytes", str(BURST)]


class PacedReceiver(SlowReceiver):
    """Reads at most ``rate`` bytes per second, like a client on a slow link."""

    rate = 10e6

    async def _fill(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        while len(self.buf) < n:
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                raise StreamError(f"EOF after {self.frames} frames")
            self.buf += data
            await asyncio.sleep(len(data) / self.rate)


async def flood(ws: WS, to: str, until: float, stop: asyncio.Event) -> int:
    """Send SIZE-byte messages as fast as the node acks them; how many were acked."""
    n = 0
    while time.monotonic() < until and not stop.is_set():
        reply = await ws.request({"type": "send", "to": to, "data": "x" * SIZE}, timeout=30)
        assert reply["type"] == "ack", reply  # never rate_limited: the sender just slows
        n += 1
    return n


async def test_senders_within_their_budget_cannot_close_a_reader(
    valkey: EmbeddedRedis, make_cluster: Any, unique: str
) -> None:
    c: Cluster = make_cluster(valkey.url, 1, BUDGET)
    node = c.nodes[0]
    victim = await PacedReceiver.open(node.port, 65536, 1 << 20)
    await victim.login(f"v{unique}")
    senders = [await WS.open(node.ws_url, uid=f"s{i}{unique}") for i in range(SENDERS)]
    stop = asyncio.Event()
    got = 0

    async def read() -> None:
        nonlocal got
        while True:
            opcode, payload = await victim.frame()
            if opcode == PING:
                continue
            assert opcode == TEXT, (opcode, payload)  # a close here is the bug
            assert json.loads(payload)["type"] == "message"
            got += 1

    reader = asyncio.create_task(read())
    t0 = time.monotonic()
    counts = await asyncio.gather(
        *(flood(s, f"uid:v{unique}", t0 + 10, stop) for s in senders)
    )
    elapsed = time.monotonic() - t0
    total = sum(counts)
    async with asyncio.timeout(30):  # everything acked reaches the reader
        while got < total and not reader.done():
            await asyncio.sleep(0.05)
    if reader.done():
        reader.result()  # raises what the reader saw (a close, EOF)
    reader.cancel()
    assert got == total
    assert await closes_1013(node.api_url) == 0
    frame = SIZE + 150
    budget = SENDERS * (BURST + RATE * elapsed) / frame
    assert total <= budget * 1.2 + SENDERS, (total, budget)  # the budget held them back
    assert total >= budget * 0.5, (total, budget)  # ...without stopping them


async def test_a_victim_that_stops_reading_is_still_closed(
    valkey: EmbeddedRedis, make_cluster: Any, unique: str
) -> None:
    c: Cluster = make_cluster(valkey.url, 1, BUDGET)
    node = c.nodes[0]
    victim = await SlowReceiver.open(node.port, 4096, 1 << 20)
    await victim.login(f"v{unique}")
    victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    senders = [await WS.open(node.ws_url, uid=f"s{i}{unique}") for i in range(SENDERS)]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(flood(s, f"uid:v{unique}", time.monotonic() + 40, stop))
        for s in senders
    ]
    try:
        async with asyncio.timeout(40):
            while await closes_1013(node.api_url) < 1:
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
