"""The chat page as a person uses it: two headless Chromium pages behind nginx, each pinned to
a different node, chatting privately, in a room, receiving an operator's broadcast, seeing
the online list change, and surviving the death of the node behind one of them."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.conftest import Nginx, artifacts_dir
from tests.e2e.pages import WAIT, expect, messages, open_conv, open_page, send

pytestmark = pytest.mark.timeout(240)


async def test_chat_across_nodes_behind_nginx(
    valkey: Any, make_cluster: Any, nginx_factory: Any, browser: Any, unique: str
) -> None:
    cluster = make_cluster(valkey.url, 2, ["--node-heartbeat", "0.5", "--node-ttl", "3"])
    nginx: Nginx = nginx_factory([f"127.0.0.1:{n.port}" for n in cluster.nodes])
    alice, bob, carol = f"alice{unique}", f"bob{unique}", f"carol{unique}"

    a = await open_page(browser, f"{nginx.url}/n/1/", alice)
    b = await open_page(browser, f"{nginx.url}/n/2/", bob)
    # each page shows the node it is pinned to, and offers the others
    await expect(a.locator("#node")).to_have_text(re.compile("^node0-"))
    await expect(b.locator("#node")).to_have_text(re.compile("^node1-"))
    await expect(a.locator("#node-select option")).to_have_count(3, timeout=WAIT)  # any, 1, 2

    # who is online, live, on both pages
    for page in (a, b):
        for uid in (alice, bob):
            await expect(page.locator(f'#online li[data-uid="{uid}"]')).to_be_visible(timeout=WAIT)

    # a private message both ways, across nodes; hostile text stays text
    await a.click(f'#online li[data-uid="{bob}"]')
    hostile = '<img src=x onerror="window.pwned=1"><b>hi bob</b>'
    await send(a, hostile)
    await expect(messages(a).last).to_contain_text(hostile)
    await open_conv(b, f"dm:{alice}")
    await expect(messages(b).last).to_contain_text(hostile, timeout=WAIT)
    assert await b.locator("#messages img, #messages b").count() == 0
    assert await b.evaluate("window.pwned") is None
    await send(b, "hello alice, from node 2")
    await open_conv(a, f"dm:{bob}")
    await expect(messages(a).last).to_contain_text("hello alice, from node 2", timeout=WAIT)
    # a user typed in by name (not from the online list) gets it on every device
    await a.fill("#dm-name", bob)
    await a.press("#dm-name", "Enter")
    await expect(a.locator("#convs li.active")).to_have_attribute("data-conv", f"dm:{bob}")
    await send(a, "typed the name")
    await expect(messages(b).filter(has_text="typed the name")).to_have_count(1, timeout=WAIT)

    # a room on both nodes
    room = f"room{unique}"
    for page in (a, b):
        await page.fill("#room-name", room)
        await page.click("#join-btn")
        active = page.locator("#convs li.active")
        await expect(active).to_have_attribute("data-conv", f"room:{room}")
    await send(a, "hello room")
    await expect(messages(b).filter(has_text="hello room")).to_have_count(1, timeout=WAIT)
    await expect(messages(a).filter(has_text="hello room")).to_have_count(1, timeout=WAIT)

    # an operator's broadcast reaches both pages as a system message
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "wscluster", "send", "--broker", cluster.redis_url,
         "--namespace", cluster.namespace, "--to", "all", '{"text": "maintenance at 22:00"}'],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    for page in (a, b):
        await open_conv(page, "system")
        await expect(messages(page).filter(has_text="maintenance at 22:00")).to_have_count(1)

    # the online list follows a page that closes
    c = await open_page(browser, f"{nginx.url}/n/2/", carol)
    await expect(a.locator(f'#online li[data-uid="{carol}"]')).to_be_visible(timeout=WAIT)
    await c.context.close()
    await expect(a.locator(f'#online li[data-uid="{carol}"]')).to_have_count(0, timeout=WAIT)

    for name, page in (("alice-node1", a), ("bob-node2", b)):
        await page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=True)

    # the node behind bob's page dies: the page falls back to /ws (nginx skips the dead node)
    cluster.kill(1)
    await expect(b.locator("#node")).to_have_text(re.compile("^node0-"), timeout=WAIT)
    await expect(b.locator("#conn-state")).to_have_text("connected", timeout=WAIT)
    await open_conv(b, f"room:{room}")
    await send(b, "back after the node died")
    await open_conv(a, f"room:{room}")
    back = messages(a).filter(has_text="back after the node died")
    await expect(back).to_have_count(1, timeout=WAIT)
    await open_conv(b, f"dm:{alice}")
    await open_conv(a, f"dm:{bob}")
    await send(a, "still there?")
    await expect(messages(b).filter(has_text="still there?")).to_have_count(1, timeout=WAIT)
    await expect(a.locator(f'#online li[data-uid="{bob}"]')).to_be_visible()
    await b.screenshot(path=str(artifacts_dir() / "bob-after-failover.png"), full_page=True)

    # the dead node's connection of bob is purged (TTL 3 s): alice's room then counts 2
    # connections again, and says nothing about bob leaving: he never left, he moved
    await open_conv(a, f"room:{room}")
    await expect(a.locator("#conv-info")).to_have_text("2 people, 2 connections", timeout=WAIT)
    notes = messages(a).filter(has_text=re.compile(f"^{bob} (left|joined) the room"))
    await expect(notes).to_have_count(1)  # the first join only (he joined after alice)
    await expect(notes).to_have_text(f"{bob} joined the room")

    for page in (a, b):
        assert page.errors == [], page.errors
