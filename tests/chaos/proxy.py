"""A TCP proxy between one node and valkey that can make the node's existing broker links
"deaf": everything keeps flowing both ways (commands, replies, PING answers, subscribe
confirmations) except the pub/sub pushes from the server (``message``/``pmessage``/
``smessage``, RESP2 ``*`` or RESP3 ``>``), which are dropped. Connections opened after
``go_deaf`` are not affected, so a node that restarts its subscriber hears again."""

from __future__ import annotations

import asyncio
import contextlib

from wscluster.embedded import free_port

_PUSHES = (b"$7\r\nmessage\r\n", b"$8\r\npmessage\r\n", b"$8\r\nsmessage\r\n")


def resp_end(buf: bytes | bytearray, i: int = 0) -> int | None:
    """The index just after the RESP value that starts at ``buf[i]``; None if incomplete."""
    nl = buf.find(b"\r\n", i)
    if nl < 0:
        return None
    kind, head = buf[i : i + 1], buf[i + 1 : nl]
    if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
        return nl + 2
    n = int(head)
    if kind in (b"$", b"=", b"!"):
        end = nl + 2 + n + 2
        return nl + 2 if n < 0 else (end if end <= len(buf) else None)
    if kind in (b"*", b">", b"~", b"%"):
        j: int | None = nl + 2
        for _ in range(max(n, 0) * (2 if kind == b"%" else 1)):
            assert j is not None
            j = resp_end(buf, j)
            if j is None:
                return None
        return j
    raise ValueError(f"not RESP: {bytes(buf[i : i + 20])!r}")


def is_push(value: bytes | bytearray) -> bool:
    """A pub/sub message push (not a subscribe confirmation, not a PING answer)."""
    return value[:1] in (b"*", b">") and value[4:].startswith(_PUSHES)


class _Link:
    def __init__(self, *writers: asyncio.StreamWriter) -> None:
        self.deaf = False
        self.writers = writers

    def close(self) -> None:
        for w in self.writers:
            w.close()


class DeafProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.dropped = 0  # pushes dropped
        self.links: list[_Link] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def go_deaf(self) -> int:
        """Make every link open now deaf; how many there are."""
        for link in self.links:
            link.deaf = True
        return len(self.links)

    async def close(self) -> None:
        """Stop listening and close every link (the handlers then end by themselves)."""
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            self._tasks.discard(task)
            return
        link = _Link(cw, sw)
        self.links.append(link)
        try:
            await asyncio.gather(self._up(cr, sw), self._down(sr, cw, link))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.close()
            for w in link.writers:
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            self.links.remove(link)
            self._tasks.discard(task)

    async def _up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    async def _down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: _Link) -> None:
        buf = bytearray()
        while data := await r.read(65536):
            buf += data
            start = 0
            while (end := resp_end(buf, start)) is not None:
                if link.deaf and is_push(buf[start:end]):
                    self.dropped += 1
                else:
                    w.write(buf[start:end])
                start = end
            del buf[:start]
            await w.drain()
        w.close()
