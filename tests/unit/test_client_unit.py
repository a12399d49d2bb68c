"""wscluster.client without a node: id matching, the bounded queue, close-code rules,
handshake refusals (against a tiny in-process picows server that only refuses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from picows import (
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from wscluster.client import Client, ConnectionClosed, HandshakeRefused
from wscluster.client.protocol import (
    Pending,
    PushQueue,
    decode_frame,
    is_terminal_close,
    retry_hint,
    route,
)
from wscluster.embedded import free_port


def msg(n: int) -> dict[str, object]:
    return {"type": "message", "to": "all", "from": None, "data": n, "ts": 0}


# -- close codes and hints -------------------------------------------------------------


@pytest.mark.parametrize("code", [1008, 4001])
def test_terminal_close_codes(code: int) -> None:
    assert is_terminal_close(code)


@pytest.mark.parametrize("code", [None, 1000, 1001, 1005, 1006, 1009, 1011, 1012, 1013, 4000])
def test_other_close_codes_reconnect(code: int | None) -> None:
    assert not is_terminal_close(code)


def test_retry_hint() -> None:
    assert retry_hint('{"retry_ms": 1500}') == 1.5
    assert retry_hint('{"retry_ms": 0}') == 0.0
    assert retry_hint('{"retry_ms": 10000000}') == 60.0  # capped
    for reason in ("", "draining", "[1]", '{"retry_ms": -1}', '{"retry_ms": true}', "{"):
        assert retry_hint(reason) is None


def test_decode_frame() -> None:
    assert decode_frame(b'{"type": "ack", "id": 1}') == {"type": "ack", "id": 1}
    assert decode_frame(memoryview(b'{"a": [1, 2]}')) == {"a": [1, 2]}
    assert decode_frame(b"[1]") is None
    assert decode_frame(b"not json") is None
    assert decode_frame(b"\xff\xfe") is None


# -- the pushed-frame queue ------------------------------------------------------------


async def test_queue_drops_oldest_when_full() -> None:
    q = PushQueue(3)
    for n in range(5):
        q.put(msg(n))
    assert len(q) == 3
    assert q.dropped == 2
    assert [(await q.get())["data"] for _ in range(3)] == [2, 3, 4]


async def test_queue_get_waits_for_put() -> None:
    q = PushQueue(2)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not getter.done()
    q.put(msg(7))
    assert (await asyncio.wait_for(getter, 1))["data"] == 7


async def test_queue_close_drains_then_raises() -> None:
    q = PushQueue(5)
    q.put(msg(1))
    waiter = PushQueue(5)
    blocked = asyncio.create_task(waiter.get())
    await asyncio.sleep(0)
    q.close(ConnectionClosed(4001, "kicked"))
    waiter.close(ConnectionClosed(1000, "bye"))
    assert (await q.get())["data"] == 1
    with pytest.raises(ConnectionClosed) as info:
        await q.get()
    assert (info.value.code, info.value.reason) == (4001, "kicked")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(blocked, 1)


async def test_queue_cancelled_get_leaves_no_waiter() -> None:
    q = PushQueue(2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(q.get(), 0.01)
    q.put(msg(1))
    assert (await q.get())["data"] == 1


def test_queue_needs_room() -> None:
    with pytest.raises(ValueError):
        PushQueue(0)


# -- matching replies by id ------------------------------------------------------------


async def test_replies_resolve_their_request_by_id() -> None:
    pending, q = Pending(), PushQueue(10)
    first, second = pending.add(1), pending.add(2)
    route({"type": "pong", "id": 2}, pending, q.put, last_id=2)
    route({"type": "error", "id": 1, "code": "bad_request", "message": "x"}, pending, q.put, 2)
    assert second.result() == {"type": "pong", "id": 2}
    assert first.result()["code"] == "bad_request"
    assert len(pending) == 0
    assert len(q) == 0


async def test_unsolicited_frames_go_to_the_queue() -> None:
    pending, q = Pending(), PushQueue(10)
    fut = pending.add(5)
    route(msg(1), pending, q.put, last_id=5)
    route({"type": "error", "id": None, "code": "bad_json", "message": "?"}, pending, q.put, 5)
    route({"type": "presence", "group": "g", "event": "join"}, pending, q.put, 5)
    route({"type": "ack", "id": "mine"}, pending, q.put, 5)  # a send_nowait frame's own id
    route({"type": "ack", "id": 99}, pending, q.put, 5)  # not one of ours
    assert [(await q.get())["type"] for _ in range(5)] == [
        "message", "error", "presence", "ack", "ack"
    ]  # fmt: skip
    assert not fut.done()


async def test_late_reply_to_timed_out_request_is_dropped() -> None:
    pending, q = Pending(), PushQueue(10)
    pending.add(3)
    pending.pop(3)  # the request gave up
    route({"type": "ack", "id": 3}, pending, q.put, last_id=3)
    route({"type": "ack", "id": True}, pending, q.put, last_id=3)  # bool is not an id of ours
    assert len(q) == 1


async def test_fail_all_fails_requests_in_flight() -> None:
    pending = Pending()
    futs = [pending.add(n) for n in (1, 2)]
    pending.fail_all(ConnectionClosed(1012, "restart"))
    for fut in futs:
        with pytest.raises(ConnectionClosed) as info:
            fut.result()
        assert info.value.code == 1012
    assert not pending.resolve({"type": "ack", "id": 1})


# -- client without a server -----------------------------------------------------------


async def test_request_before_connect_raises() -> None:
    client = Client("ws://127.0.0.1:9/ws")
    with pytest.raises(ConnectionClosed):
        await client.ping()
    with pytest.raises(ConnectionClosed):
        client.send_nowait({"type": "ping"})
    await client.close()


async def test_connect_refused_port_raises_connection_closed() -> None:
    client = Client(f"ws://127.0.0.1:{free_port()}/ws")
    with pytest.raises(ConnectionClosed) as info:
        await client.connect()
    assert info.value.code is None
    await client.close()
    with pytest.raises(ConnectionClosed):
        await client.connect()  # closed for good


async def test_login_needs_exactly_one_of_uid_and_token() -> None:
    client = Client("ws://127.0.0.1:9/ws")
    with pytest.raises(ValueError):
        await client.login()
    with pytest.raises(ValueError):
        await client.login("a", token="t")


class Refuser:
    """A picows server that refuses every handshake with one HTTP status, counting them."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.attempts = 0

    def __call__(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        self.attempts += 1
        response = WSUpgradeResponse.create_error_response(self.status, b"refused")
        return WSUpgradeResponseWithListener(response, None)


@pytest.fixture
async def refuser_url() -> AsyncIterator[tuple[Refuser, str]]:
    refuser = Refuser(503)
    server = await ws_create_server(refuser, "127.0.0.1", 0, use_aiofastnet=False)
    port = server.sockets[0].getsockname()[1]
    yield refuser, f"ws://127.0.0.1:{port}/ws"
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("status", [401, 403, 404, 426])  # token, origin, path, app's own
async def test_auth_refusals_are_terminal(refuser_url: tuple[Refuser, str], status: int) -> None:
    refuser, url = refuser_url
    refuser.status = status
    client = Client(url, backoff_base=0.001, backoff_cap=0.002)
    with pytest.raises(HandshakeRefused) as info:
        await client.connect()
    assert info.value.status == status
    assert refuser.attempts == 1


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_busy_refusals_are_retried_a_bounded_number_of_times(
    refuser_url: tuple[Refuser, str], status: int
) -> None:
    refuser, url = refuser_url
    refuser.status = status
    client = Client(url, backoff_base=0.001, backoff_cap=0.002, max_handshake_retries=3)
    with pytest.raises(HandshakeRefused) as info:
        await client.connect()
    assert info.value.status == status
    assert refuser.attempts == 4  # the first try and 3 retries


def test_positions_are_checked_and_kept_until_connected() -> None:
    stored = {"uid:a": ["e1", 7], "group:g": [None, 0]}
    client = Client("ws://127.0.0.1:9/ws", positions=stored)
    assert client.positions() == stored and client.positions() is not stored
    for bad in ({"all": ["e", 1]}, {"uid:a": ["e", -1]}, {"group:g": "e:1"}):
        with pytest.raises(ValueError):
            Client("ws://127.0.0.1:9/ws", positions=bad)


async def test_left_forgets_the_group_and_overtakes_requests_in_flight() -> None:
    """A `left` frame (a new token no longer allows the group): the group and its position
    are forgotten, the frame is queued, and a request about the group that was in flight
    (e.g. a join acked just before the `left`) does not bring it back."""
    client = Client("ws://127.0.0.1:9/ws", positions={"group:g": ["e", 3], "group:h": ["e", 1]})
    client._groups.update(g=True, h=False)
    frame = {"type": "left", "group": "g", "reason": "forbidden"}
    with client._latest(["group:g", "group:h"]) as latest:  # in flight
        client._left(frame)
    assert latest == {"group:h"} and client._intents == {}
    assert client.groups == {"h": False}
    assert client.positions() == {"group:h": ["e", 1]}
    assert await client.recv(1) == frame
    with client._latest(["group:g"]) as latest:  # a later request is not affected
        pass
    assert latest == {"group:g"}
    client._left({"type": "left", "group": 7})  # malformed: only queued
    assert client.groups == {"h": False}
    await client.close()
