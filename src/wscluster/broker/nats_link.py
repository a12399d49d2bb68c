"""The NATS connection pieces of NatsBroker: channel <-> subject mapping, a nats-py client
that hands messages straight to the broker, and one connection's barrier (a marker message
on the same connection proves the server processed everything sent before it)."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from wscluster.routing import is_utf8

log = logging.getLogger("wscluster.broker")

MAX_BATCH = 10_000  # messages per acknowledged batch
MAX_BATCH_BYTES = 4 << 20  # payload bytes per batch (at least one message is sent)
PING_INTERVAL = 1.0  # seconds between keep-alive PINGs
MAX_OUTSTANDING_PINGS = 3  # unanswered PINGs before the link is declared dead
MAX_CHANNEL_BYTES = 2048  # UTF-8 bytes: subject lines stay within max_control_line (4 KiB)

Item = tuple[str, bytes, asyncio.Future[None]]
LINK_ERRORS = (ConnectionError, NatsError)


@functools.lru_cache(maxsize=4096)
def channel_subject(channel: str) -> str:
    """The NATS subject of a channel (one token: no '.', '*', '>' or whitespace)."""
    return "wsc.c" + base64.urlsafe_b64encode(channel.encode()).rstrip(b"=").decode("ascii")


def refused(channel: str) -> str:
    """Why a channel cannot be a subject ('' when it can): not UTF-8, or too long (a subject
    line over the server's max_control_line makes it drop the connection)."""
    if not is_utf8(channel):
        return "channel not valid UTF-8"
    if len(channel) > MAX_CHANNEL_BYTES // 4 and len(channel.encode()) > MAX_CHANNEL_BYTES:
        return f"channel longer than {MAX_CHANNEL_BYTES} bytes"
    return ""


@functools.lru_cache(maxsize=4096)
def subject_channel(subject: bytes) -> str | None:
    """The channel of a subject made by ``channel_subject`` (None for any other subject)."""
    if not subject.startswith(b"wsc.c"):
        return None
    token = subject[5:] + b"=" * (-(len(subject) - 5) % 4)
    try:
        channel = base64.urlsafe_b64decode(token).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    return channel if channel_subject(channel) == subject.decode() else None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Client(Client):
    """nats-py's client, with every message handed to ``on_msg(subject, payload)`` by its
    reader task, in wire order. Its subscriptions carry a dummy ``future``, so nats-py starts
    no task and queue per subscription (memory, and lost order between channels)."""

    def __init__(self, on_msg: Callable[[bytes, bytes], None]) -> None:
        super().__init__()
        self.wsc_on_msg = on_msg

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.wsc_on_msg(subject, data)


class Link:
    """One connection: its subscriptions and its outstanding markers (the barriers)."""

    def __init__(self, deliver: Callable[[str, bytes], None]) -> None:
        self.nc = _Client(self._on_msg)
        self.deliver = deliver
        self.lost = asyncio.Event()
        self.ready = False  # every remembered channel confirmed after the (re)connect
        self.subs: dict[str, Subscription | None] = {}  # None: being subscribed
        self.inbox = self.nc.new_inbox()
        self._inbox = self.inbox.encode()
        self.never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._seq = 0

    async def subscribe(self, subject: str) -> Subscription:
        return await self.nc.subscribe(subject, future=self.never)

    async def barrier(self, within: float) -> None:
        """Return once the server processed every command this link sent before."""
        if self.lost.is_set():
            raise ConnectionError("connection lost")
        self._seq += 1
        seq = self._seq
        fut = self._acks[seq] = asyncio.get_running_loop().create_future()
        try:
            await self.nc.publish(self.inbox, b"%d" % seq)
            async with asyncio.timeout(within):
                await fut
        except TimeoutError:
            raise ConnectionError(f"no answer from the server within {within} s") from None
        finally:
            self._acks.pop(seq, None)

    def _on_msg(self, subject: bytes, payload: bytes) -> None:
        if subject != self._inbox:
            channel = subject_channel(bytes(subject))
            if channel is not None:
                self.deliver(channel, payload)
            return
        seq = int(payload) if payload.isdigit() else 0
        while self._acks:
            first = next(iter(self._acks))
            if first > seq:
                break
            fut = self._acks.pop(first)
            if not fut.done():
                fut.set_result(None)

    def fail(self) -> None:
        self.lost.set()
        acks, self._acks = self._acks, {}
        for fut in acks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
