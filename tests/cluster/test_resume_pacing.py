"""A resume's replay is paced by the connection's outbox (PROTOCOL: "History, offsets and
resume"): clients that ask for 1,000 retained 60 KB messages and never read cost the node
about a page each, not the whole history; they are closed 1013 after one heartbeat interval,
like any slow consumer. A client that reads gets all of it, in order, with the same ack."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from wscluster import Cluster as Publisher
from wscluster.broker.redis_history import RedisHistory
from wscluster.embedded import EmbeddedRedis
from wscluster.naming import Names

from .conftest import Cluster
from .rawframes import CLOSE, client_frame
from .wsclient import WS

MakeCluster = Callable[..., Cluster]
RULE = "group:pace:*=1000/600s"
MAX_OUTBOX = 1 << 20
COUNT = 1000
BLOB = "x" * 60_000
OPTIONS = ["--history", RULE, "--max-replay", str(COUNT), "--max-outbox", str(MAX_OUTBOX),
           "--ping-interval", "2"]  # fmt: skip
HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def filled(valkey: EmbeddedRedis) -> tuple[str, str]:
    """(namespace, stream): a stream holding COUNT messages ``[i, BLOB]``, written once for
    the module; every test starts its own node on this namespace (a fresh process: its RSS
    owes nothing to an earlier test)."""
    namespace, stream = f"t{uuid.uuid4().hex[:10]}", "group:pace:room"

    async def fill() -> None:
        async with Publisher(valkey.url, namespace=namespace, history=[RULE]) as pub:
            for i in range(COUNT):  # one by one: offset i + 1 carries i
                await pub.send(stream, [i, BLOB])

    asyncio.run(fill())
    return namespace, stream


def node(make_cluster: MakeCluster, valkey: EmbeddedRedis, namespace: str) -> Cluster:
    # the last --namespace wins over the one make_cluster puts first
    return make_cluster(valkey.url, 1, [*OPTIONS, "--namespace", namespace])


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert m is not None
    return int(m[1]) * 1024


async def metric(api_url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{api_url}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m[1]) if m else 0.0


class Stalled:
    """A hand-made WebSocket client on a socket with a small receive buffer: it sends one
    ``resume`` and never reads again (until ``ending``)."""

    opened: list[socket.socket] = []

    @classmethod
    async def resume(cls, port: int, stream: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        cls.opened.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the window
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, HANDSHAKE)
        head = b""
        while b"\r\n\r\n" not in head:  # the response head, byte by byte: nothing after it
            byte = await loop.sock_recv(sock, 1)
            assert byte, head
            head += byte
        assert head.startswith(b"HTTP/1.1 101"), head
        frame = json.dumps({"type": "resume", "id": 1, "streams": {stream: [None, 0]}})
        await loop.sock_sendall(sock, client_frame(frame.encode(), mask=b"\x5a\xc3\x0f\x99"))
        return sock

    @staticmethod
    async def ending(sock: socket.socket) -> int | None:
        """Read what is left: the close frame's code, or None when the link ended without
        one reaching us (the node aborts a link whose close frame is stuck behind data)."""
        loop, buf, code = asyncio.get_running_loop(), bytearray(), None
        try:
            while data := await loop.sock_recv(sock, 1 << 16):
                buf += data
        except ConnectionResetError:
            pass
        while len(buf) >= 2:  # the frames, from the welcome on
            size, head = buf[1] & 0x7F, 2
            if size >= 126:
                n = 2 if size == 126 else 8
                size, head = int.from_bytes(buf[2 : 2 + n], "big"), 2 + n
            if len(buf) < head + size:
                break
            if buf[0] & 0x0F == CLOSE:
                code = int.from_bytes(buf[head : head + 2], "big")
            del buf[: head + size]
        return code


@pytest.fixture(autouse=True)
def _close_stalled() -> Iterator[None]:
    yield
    opened, Stalled.opened = Stalled.opened, []
    for sock in opened:
        sock.close()


async def warm_up(url: str, stream: str) -> str:
    """A small resume by a reading client (the node's first one loads its code paths and
    opens its store links); the stream's epoch."""
    ws = await WS.open(url)
    group = stream.partition(":")[2]
    ack = await ws.ok({"type": "join", "group": group})
    assert ack["offset"] == COUNT, ack
    ack = await ws.ok({"type": "resume", "streams": {stream: [ack["epoch"], COUNT - 5]}})
    assert ack["streams"][stream]["replayed"] == 5, ack
    await ws.close()
    return str(ack["streams"][stream]["epoch"])


@pytest.mark.parametrize("n", [5, 50])
async def test_resumers_that_never_read_hold_about_a_page(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, filled: tuple[str, str], n: int
) -> None:
    cluster = node(make_cluster, valkey, filled[0])
    stream, proc = filled[1], cluster.nodes[0].proc
    assert proc is not None
    await warm_up(cluster.ws_urls[0], stream)
    await asyncio.sleep(0.5)
    base = peak = rss(proc.pid)
    bound = n * MAX_OUTBOX + 10 * 2**20
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss(proc.pid))
            if peak - base > bound:
                return  # failed already: no need to watch the node eat more
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    port = cluster.nodes[0].port
    socks = await asyncio.gather(*(Stalled.resume(port, stream) for _ in range(n)))
    await asyncio.wait([sampler], timeout=5)
    stop.set()
    await sampler
    print(f"\nRSS growth, {n} clients resuming without reading: {(peak - base) / 2**20:.1f} MiB")
    assert peak - base < bound, f"{(peak - base) / 2**20:.1f} MiB"

    # every one of them is closed as a slow consumer (after --ping-interval without reading)
    api = cluster.nodes[0].api_url
    async with asyncio.timeout(30):
        while await metric(api, 'wscluster_server_closes_total{code="1013"}') < n:
            await asyncio.sleep(0.2)
    async with asyncio.timeout(30):
        codes = await asyncio.gather(*(Stalled.ending(s) for s in socks))
    assert set(codes) <= {1013, None}, codes
    # having read only what they had room for: what the kernel's socket buffers took (a few
    # MB each), then one page; nothing after the close (5 were the warm-up's)
    replayed = await metric(api, "wscluster_history_replayed_total") - 5
    assert replayed < n * COUNT / 5, replayed
    assert "Traceback" not in cluster.nodes[0].log()


async def test_a_resumer_that_reads_gets_everything_in_order(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, filled: tuple[str, str]
) -> None:
    cluster = node(make_cluster, valkey, filled[0])
    stream = filled[1]
    epoch = await warm_up(cluster.ws_urls[0], stream)
    ws = await WS.open(cluster.ws_urls[0])
    started = time.monotonic()
    ack = await ws.ok({"type": "resume", "streams": {stream: [None, 0]}}, timeout=60)
    print(f"\n{COUNT} x 60 KB replayed in {time.monotonic() - started:.2f} s")
    got = [m for m in ws.pushed if m["type"] == "message"]
    assert [m["offset"] for m in got] == list(range(1, COUNT + 1))
    assert all(m["data"] == [m["offset"] - 1, BLOB] and m["epoch"] == epoch for m in got)
    result = ack["streams"][stream]
    assert result == {"recovered": True, "epoch": epoch, "offset": COUNT, "replayed": COUNT}
    # and from a position: only what came after it
    ws.pushed = []
    ack = await ws.ok({"type": "resume", "streams": {stream: [epoch, COUNT - 300]}}, timeout=60)
    assert [m["offset"] for m in ws.pushed] == list(range(COUNT - 299, COUNT + 1))
    assert ack["streams"][stream]["replayed"] == 300
    assert "Traceback" not in cluster.nodes[0].log()


async def test_the_store_reads_in_pages_bounded_by_bytes_and_count(
    valkey: EmbeddedRedis, filled: tuple[str, str]
) -> None:
    namespace, stream = filled
    store = RedisHistory(valkey.url, Names(namespace))
    try:
        page = await store.read(stream, "", 0, COUNT, count=COUNT, budget=256 * 1024)
        assert (page.top, page.oldest) == (COUNT, 1)
        assert [o for o, _ in page.entries] == [1, 2, 3, 4]  # 4 x ~60 KB fit, 5 do not
        epoch = page.epoch
        page = await store.read(stream, epoch, 10, COUNT, count=COUNT, budget=1)
        assert [o for o, _ in page.entries] == [11]  # one entry even over the budget
        page = await store.read(stream, epoch, 990, COUNT, count=3, budget=1 << 20, upto=995)
        assert [o for o, _ in page.entries] == [991, 992, 993]
        page = await store.read(stream, epoch, 993, COUNT, count=9, budget=1 << 20, upto=995)
        assert [o for o, _ in page.entries] == [994, 995]  # never past the window's end
        page = await store.read(stream, "gone", 993, COUNT, count=9, budget=1, upto=995)
        assert page.epoch == epoch and page.entries == []  # a later page of a lost epoch
        page = await store.read(stream, "", 0, 5)  # unpaged, as the repair reads: the newest
        assert [o for o, _ in page.entries] == [996, 997, 998, 999, 1000]
        page = await store.read(stream, epoch, 997, 5)
        assert [o for o, _ in page.entries] == [998, 999, 1000]
    finally:
        await store.close()
