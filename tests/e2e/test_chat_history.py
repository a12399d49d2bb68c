"""The chat page on a cluster with history: a reload, a page that went away and came back or
a new tab shows the last messages of each room and private conversation it had (its own
private messages too: they are sent with carbon, so they are in its own stream), once each, in
order, then goes on live; the rooms joined are remembered per name."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.cluster.wsclient import WS
from tests.e2e.conftest import artifacts_dir
from tests.e2e.pages import WAIT, expect, join, logged_in, messages, open_conv, open_page, send

pytestmark = pytest.mark.timeout(120)

# a room keeps its last 3 messages; private messages keep 100
HISTORY = ["--history", "group:*=3/300s", "--history", "uid:*=100/300s"]


async def shown(page: Any, pattern: str) -> list[str]:
    return re.findall(pattern, "\n".join(await messages(page).all_inner_texts()))


async def test_page_shows_the_recent_messages_again(
    valkey: Any, make_cluster: Any, browser: Any, unique: str
) -> None:
    cluster = make_cluster(valkey.url, 2, [*HISTORY, "--node-heartbeat", "0.5"])
    alice, bob, room = f"alice{unique}", f"bob{unique}", f"hist{unique}"
    url = cluster.nodes[0].http_url + "/"
    a = await open_page(browser, url, alice)
    await join(a, room)
    b = await WS.open(cluster.nodes[1].ws_url, bob)
    await b.ok({"type": "join", "group": room})
    dm, in_room = f"uid:{alice}", f"group:{room}"
    await b.ok({"type": "send", "to": in_room, "data": {"text": "room before"}})
    await b.ok({"type": "send", "to": dm, "data": {"text": "dm before"}})
    await expect(messages(a).filter(has_text="room before")).to_have_count(1, timeout=WAIT)
    await open_conv(a, f"dm:{bob}")
    await expect(messages(a).filter(has_text="dm before")).to_have_count(1, timeout=WAIT)

    # the tab goes to another site and comes back: the conversations show their recent
    # messages again (what was read and what was missed), once each, in order
    await a.goto("about:blank")
    for i in range(2):
        await b.ok({"type": "send", "to": dm, "data": {"text": f"dm away {i}"}})
    for i in range(5):
        await b.ok({"type": "send", "to": in_room, "data": {"text": f"room away {i}"}})
    await a.goto(url)
    await logged_in(a, alice)
    await open_conv(a, f"dm:{bob}")
    await expect(messages(a).filter(has_text="dm away 1")).to_have_count(1, timeout=WAIT)
    assert await shown(a, r"dm (?:away \d|before)|could not be recovered") == [
        "dm before", "dm away 0", "dm away 1"]  # fmt: skip
    # the room kept only its last 3: those, and no note (the page asked for the last ones)
    await open_conv(a, f"room:{room}")
    await expect(messages(a).filter(has_text="room away 4")).to_have_count(1, timeout=WAIT)
    assert await shown(a, r"room (?:away \d|before)|could not be recovered") == [
        "room away 2", "room away 3", "room away 4"]  # fmt: skip
    await a.screenshot(path=str(artifacts_dir() / "history-resumed.png"), full_page=True)

    # a new tab of this browser (no sessionStorage) that logs in by that name joins the same
    # rooms and shows the private messages, those sent while no tab was open too
    context = a.context
    await a.close()
    await b.ok({"type": "send", "to": dm, "data": {"text": "dm while closed"}})
    c = await context.new_page()
    errors: list[str] = []
    c.on("pageerror", lambda exc: errors.append(str(exc)))
    await c.goto(url)
    await expect(c.locator("#conn-state")).to_have_text("connected", timeout=WAIT)
    await c.fill("#name", alice)
    await c.press("#name", "Enter")
    await logged_in(c, alice)
    await open_conv(c, f"dm:{bob}")
    await expect(messages(c).filter(has_text="dm while closed")).to_have_count(1, timeout=WAIT)
    assert await shown(c, r"dm (?:away \d|before|while closed)") == [
        "dm before", "dm away 0", "dm away 1", "dm while closed"]  # fmt: skip
    # and it is live: a message now arrives once
    await b.ok({"type": "send", "to": dm, "data": {"text": "dm live"}})
    await expect(messages(c).filter(has_text="dm live")).to_have_count(1, timeout=WAIT)
    await open_conv(c, f"room:{room}")
    await expect(messages(c).filter(has_text="room away 4")).to_have_count(1, timeout=WAIT)
    assert a.errors == errors == []


async def test_reload_shows_what_the_user_sent_and_read(
    valkey: Any, make_cluster: Any, browser: Any, unique: str
) -> None:
    cluster = make_cluster(valkey.url, 2, ["--history", "group:*=100/300s",
                                           "--history", "uid:*=100/300s"])  # fmt: skip
    alice, bob, room = f"alice{unique}", f"bob{unique}", f"talk{unique}"
    url = cluster.nodes[0].http_url + "/"
    a = await open_page(browser, url, alice)
    await join(a, room)
    b = await WS.open(cluster.nodes[1].ws_url, bob)
    await b.ok({"type": "join", "group": room})
    await send(a, "hello room")
    # the page sends when Enter is pressed, without waiting: let it reach the room first
    assert (await b.next(timeout=15, type="message"))["data"] == {"text": "hello room"}
    await b.ok({"type": "send", "to": f"group:{room}", "data": {"text": "hi alice, in the room"}})
    await b.ok({"type": "send", "to": f"uid:{alice}", "data": {"text": "psst alice"}})
    await open_conv(a, f"dm:{bob}")
    await send(a, "psst bob")
    got = await b.next(type="message")
    while got["to"] != f"uid:{bob}":  # the room's messages first
        got = await b.next(type="message")
    assert got["data"] == {"text": "psst bob"} and "carbon" not in got
    pattern = r"psst (?:alice|bob)|hello room|hi alice, in the room"
    await expect(messages(a).filter(has_text="psst bob")).to_have_count(1, timeout=WAIT)
    assert await shown(a, pattern) == ["psst alice", "psst bob"]  # the carbon, shown once

    for _ in range(2):  # a reload (twice: what the first showed is not doubled)
        await a.reload()
        await logged_in(a, alice)
        await open_conv(a, f"dm:{bob}")
        await expect(messages(a).filter(has_text="psst bob")).to_have_count(1, timeout=WAIT)
        assert await shown(a, pattern) == ["psst alice", "psst bob"]
        await open_conv(a, f"room:{room}")
        await expect(messages(a).filter(has_text="in the room")).to_have_count(1, timeout=WAIT)
        assert await shown(a, pattern) == ["hello room", "hi alice, in the room"]
    # then live, once each, with no gap
    await b.ok({"type": "send", "to": f"group:{room}", "data": {"text": "room live"}})
    await expect(messages(a).filter(has_text="room live")).to_have_count(1, timeout=WAIT)
    await open_conv(a, f"dm:{bob}")
    await send(a, "psst again")
    await expect(messages(a).filter(has_text="psst again")).to_have_count(1, timeout=WAIT)
    assert await shown(a, pattern + "|psst again") == ["psst alice", "psst bob", "psst again"]
    await a.screenshot(path=str(artifacts_dir() / "history-reloaded.png"), full_page=True)
    assert a.errors == []
