"""The chat page on a cluster with history: a page that went away (to another site, or closed
for good) gets what it missed when it comes back, once each, from the positions it kept in the
browser; a room that kept fewer messages than were missed says so in the conversation."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.cluster.wsclient import WS
from tests.e2e.conftest import artifacts_dir
from tests.e2e.pages import WAIT, expect, join, logged_in, messages, open_conv, open_page

pytestmark = pytest.mark.timeout(120)

# a room keeps its last 3 messages: missing 5 is a loss; private messages keep 100
HISTORY = ["--history", "group:*=3/300s", "--history", "uid:*=100/300s"]


async def test_page_resumes_what_it_missed(
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

    # the tab goes to another site and comes back: its sessionStorage (name, rooms) and the
    # positions it kept on the way out bring back what it missed
    await a.goto("about:blank")
    for i in range(2):
        await b.ok({"type": "send", "to": dm, "data": {"text": f"dm away {i}"}})
    for i in range(5):
        await b.ok({"type": "send", "to": in_room, "data": {"text": f"room away {i}"}})
    await a.goto(url)
    await logged_in(a, alice)
    await open_conv(a, f"dm:{bob}")
    for text in ("dm away 0", "dm away 1"):
        await expect(messages(a).filter(has_text=text)).to_have_count(1, timeout=WAIT)
    # in order, once each; not what it had seen before; nothing lost
    shown = "\n".join(await messages(a).all_inner_texts())
    assert re.findall(r"dm (?:away \d|before)|could not be recovered", shown) == [
        "dm away 0",
        "dm away 1",
    ], shown

    # the room kept only its last 3: the page says some are missing, then shows those 3
    await open_conv(a, f"room:{room}")
    lost = messages(a).filter(has_text="some messages could not be recovered")
    await expect(lost).to_have_count(1, timeout=WAIT)
    await expect(lost).to_contain_text("too_old")
    await expect(messages(a).filter(has_text="room away 4")).to_have_count(1, timeout=WAIT)
    shown = "\n".join(await messages(a).all_inner_texts())
    assert re.findall(r"room (?:away \d|before)|could not be recovered", shown) == [
        "could not be recovered",
        "room away 2",
        "room away 3",
        "room away 4",
    ], shown
    await a.screenshot(path=str(artifacts_dir() / "history-resumed.png"), full_page=True)

    # the page stored its positions per name in localStorage; a new tab of this browser (no
    # sessionStorage) that logs in by that name gets the private messages sent while no tab
    # was open
    kept = json.loads(await a.evaluate(f"localStorage.getItem('wscluster.positions.{alice}')"))
    assert set(kept) == {dm, "group:lobby", in_room}, kept
    assert all(isinstance(p[0], str) and p[1] >= 1 for s, p in kept.items() if s != "group:lobby")
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
    assert await messages(c).filter(has_text="dm away").count() == 0
    # and it is live: a message now arrives once
    await b.ok({"type": "send", "to": dm, "data": {"text": "dm live"}})
    await expect(messages(c).filter(has_text="dm live")).to_have_count(1, timeout=WAIT)
    assert a.errors == errors == []
